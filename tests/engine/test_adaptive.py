"""Adaptive head selection policy (engine/adaptive.py): pure logic, no vLLM."""

from __future__ import annotations

import random

import pytest

from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine.adaptive import AdaptiveDepth, linear_cost, nodes_at_depth

TREE = MedusaTree.load("sparse-16", 3)
LEVELS = nodes_at_depth(TREE.position_offsets.tolist())


def _run(policy: AdaptiveDepth, req: str, steps: int, accept_prob: float, seed: int = 0) -> list[int]:
    """Drive ``policy`` for one request whose heads hit each depth with ``accept_prob``;
    returns the nodes drafted per step."""
    rng = random.Random(seed)
    drafted = []
    for _ in range(steps):
        n = policy.nodes(req)
        drafted.append(n)
        depth = policy.depth_of(n)
        acc = 0
        while acc < depth and rng.random() < accept_prob:
            acc += 1
        policy.observe(req, depth, acc)
    return drafted


def test_nodes_at_depth_of_a_bfs_tree():
    assert LEVELS[0] == 0 and LEVELS[-1] == 16 and len(LEVELS) == TREE.max_depth + 1
    by_depth = [sum(1 for p in TREE.medusa_choices if len(p) <= d) for d in range(4)]
    assert LEVELS == by_depth
    assert nodes_at_depth(MedusaTree.chain(3).position_offsets.tolist()) == [0, 1, 2, 3]


def test_heads_that_always_miss_stop_drafting_but_probe():
    policy = AdaptiveDepth(LEVELS, linear_cost(0.05), probe_every=8)
    drafted = _run(policy, "r", 80, accept_prob=0.0)
    assert drafted[0] == 16  # a new request starts with the whole tree
    tail = drafted[40:]
    assert tail.count(0) >= 30, tail  # stopped paying for the heads
    assert set(tail) <= {0, LEVELS[1]}  # ... except one probe of depth 1 every 8 steps
    assert tail.count(LEVELS[1]) == len(tail) // 8
    assert sum(drafted) < 0.15 * 16 * 80


def test_heads_that_hit_keep_the_whole_tree():
    policy = AdaptiveDepth(LEVELS, linear_cost(0.05))
    drafted = _run(policy, "r", 60, accept_prob=0.9)
    assert drafted[10:].count(16) >= 45


def test_depth_follows_cost():
    """The same acceptance pays for depth 3 when nodes are cheap, not when they are dear."""
    accept = [0.6, 0.4, 0.3]
    assert AdaptiveDepth(LEVELS, linear_cost(0.0)).best_depth(accept) == 3
    assert AdaptiveDepth(LEVELS, linear_cost(1.0)).best_depth(accept) == 0
    mid = AdaptiveDepth(LEVELS, linear_cost(0.05))
    # brute force: the depth with most expected tokens per unit of step time
    rates = []
    for d in range(4):
        reach, tokens = 1.0, 1.0
        for j in range(d):
            reach *= accept[j]
            tokens += reach
        rates.append(tokens / (1 + 0.05 * LEVELS[d]))
    assert mid.best_depth(accept) == rates.index(max(rates))
    # a measured cost curve plugs in as a function of the node count
    curve = {0: 1.0, 6: 1.05, 12: 3.0, 16: 9.0}
    assert AdaptiveDepth(LEVELS, lambda n: curve[n]).best_depth(accept) == 1


def test_conditional_acceptance_ignores_depths_not_reached():
    policy = AdaptiveDepth([0, 1, 2, 3], linear_cost(0.0), decay=0.5)
    policy.observe("r", 3, 0)  # missed at depth 1: depths 2, 3 were never judged
    assert policy.states["r"].accept == [0.5, 1.0, 1.0]
    policy.observe("r", 3, 3)
    assert policy.states["r"].accept == [0.75, 1.0, 1.0]
    policy.observe("r", 2, 1)  # reached 1, missed 2; depth 3 not drafted
    assert policy.states["r"].accept == [0.875, 0.5, 1.0]
    with pytest.raises(ValueError, match="accepted=3 outside"):
        policy.observe("r", 2, 3)


def test_state_is_per_request_and_dropped_when_it_finishes():
    policy = AdaptiveDepth(LEVELS, linear_cost(0.05), probe_every=0)
    # two concurrent requests, interleaved step by step: one always misses, one always hits
    for _ in range(30):
        for req, acc in (("miss", lambda d: 0), ("hit", lambda d: d)):
            n = policy.nodes(req)
            d = policy.depth_of(n)
            policy.observe(req, d, acc(d))
    assert policy.nodes("miss") == 0 and policy.nodes("hit") == 16
    assert len(policy) == 2
    policy.drop("miss")
    assert "miss" not in policy.states and len(policy) == 1
    # a new request reusing the id starts fresh: the whole tree again
    assert policy.nodes("miss") == 16
    assert policy.states["miss"].accept == [1.0] * 3
    assert policy.nodes("hit") == 16
    policy.drop("never-seen")  # no error


def test_depth_of_counts_partial_levels():
    policy = AdaptiveDepth([0, 2, 6, 14])
    assert [policy.depth_of(n) for n in (0, 1, 2, 3, 6, 7, 14)] == [0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match=r"num_nodes must be in \[0, 14\]"):
        policy.depth_of(15)


@pytest.mark.parametrize("kwargs,match", [
    ({"nodes_at_depth": [1, 2]}, "must start at 0"),
    ({"nodes_at_depth": [0, 2], "decay": 0.0}, "decay must be in"),
    ({"nodes_at_depth": [0, 2], "prior": 1.5}, "prior must be in"),
    ({"nodes_at_depth": [0, 2], "probe_every": -1}, "probe_every must be"),
    ({"nodes_at_depth": [0, 2], "step_cost": lambda n: 0.0}, "step_cost must be > 0"),
])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveDepth(**kwargs)
