"""MedusaTree buffers against brute-force enumeration."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medusa_vllm.core.tree import PRESETS, MedusaTree
from medusa_vllm.core.tree_fit import (
    best_tree_for_cost,
    expected_accept_length,
    tree_from_accuracies,
)


@st.composite
def prefix_closed(draw, max_depth=4, max_rank=4, max_nodes=40):
    """A random prefix-closed set of paths, in random order."""
    nodes: list[tuple[int, ...]] = []
    frontier = [()]
    n = draw(st.integers(1, max_nodes))
    while len(nodes) < n:
        parent = draw(st.sampled_from(frontier))
        if len(parent) >= max_depth:
            frontier.remove(parent)
            if not frontier:
                break
            continue
        child = (*parent, draw(st.integers(0, max_rank)))
        if child not in nodes:
            nodes.append(child)
            frontier.append(child)
    order = draw(st.permutations(nodes))
    return [list(p) for p in order]


def _is_ancestor_or_self(a: tuple, b: tuple) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


@settings(max_examples=150, deadline=None)
@given(prefix_closed())
def test_buffers_match_brute_force(choices):
    tree = MedusaTree(choices)
    paths = tree.paths
    # BFS order: root first, sorted by (len, path), and the same set as input
    assert paths[0] == ()
    assert sorted(map(tuple, choices), key=lambda p: (len(p), p)) == paths[1:]
    n1 = len(paths)
    assert tree.num_nodes == n1 - 1 == len(tree)
    assert tree.max_depth == max(len(p) for p in paths)
    for i, pi in enumerate(paths):
        assert tree.position_offsets[i] == len(pi)
        for j, pj in enumerate(paths):
            assert bool(tree.tree_mask[i, j]) == _is_ancestor_or_self(pj, pi)
        if i:
            assert paths[tree.parents[i]] == pi[:-1]
            assert tree.head_indices[i] == len(pi) - 1
            assert tree.topk_ranks[i] == pi[-1]
            # children: exactly the nodes whose parent is i, ascending rank
        kids = [j for j, pj in enumerate(paths) if j and pj[:-1] == pi]
        got = [int(c) for c in tree.children[i] if c >= 0]
        assert got == sorted(kids, key=lambda j: paths[j][-1])
    assert tree.parents[0] == -1
    # retrieve_indices: one row per leaf, root->leaf, -1 padded
    leaves = [p for p in paths if not any(len(q) == len(p) + 1 and q[:-1] == p for q in paths)]
    rows = []
    for row in tree.retrieve_indices.tolist():
        valid = [x for x in row if x >= 0]
        assert row[len(valid):] == [-1] * (len(row) - len(valid))
        assert [paths[x] for x in valid] == [paths[valid[-1]][:d] for d in range(len(valid))]
        rows.append(paths[valid[-1]])
    assert sorted(rows) == sorted(leaves)
    assert tree.topk == 1 + max(p[-1] for p in paths[1:])


@settings(max_examples=60, deadline=None)
@given(prefix_closed(), st.data())
def test_truncate_is_prefix_closed_subtree(choices, data):
    tree = MedusaTree(choices)
    n = data.draw(st.integers(0, tree.num_nodes))
    sub = tree.truncate(n)
    assert sub.paths == tree.paths[: n + 1]
    # the mask of the truncated tree is the top-left slice of the full mask
    assert torch.equal(sub.tree_mask, tree.tree_mask[: n + 1, : n + 1])
    assert torch.equal(sub.position_offsets, tree.position_offsets[: n + 1])


def test_node_tokens_gathers_head_topk():
    tree = MedusaTree([[0], [1], [0, 0], [0, 2], [1, 0], [0, 0, 1]])
    B, H, K = 3, 3, 4
    topk = torch.arange(B * H * K).reshape(B, H, K)
    root = torch.tensor([100, 200, 300])
    toks = tree.node_tokens(topk, root)
    assert toks.shape == (B, tree.num_nodes + 1)
    for b in range(B):
        assert toks[b, 0] == root[b]
        for i, p in enumerate(tree.paths[1:], start=1):
            assert toks[b, i] == topk[b, len(p) - 1, p[-1]]
    with pytest.raises(ValueError, match="needs 3 heads with top-3"):
        tree.node_tokens(topk[:, :2], root)


@pytest.mark.parametrize(
    "choices, match",
    [
        ([[1], [0, 1]], r"path \[0, 1\]: its prefix \[0\] is missing"),
        ([[0], [1], [0]], r"medusa_choices\[2\] = \[0\]: duplicate path"),
        ([[0], [-1]], r"medusa_choices\[1\] = \[-1\]: ranks must be >= 0"),
        ([[0], []], r"medusa_choices\[1\] = \[\]"),
        ([[0], [0.5]], r"ranks must be integers"),
        ("[[0]]", r"found the string"),
        ([[0], [0, 0], [0, 0, 0]], r"medusa_choices\[2\] = \[0, 0, 0\]: depth 3 exceeds the number of Medusa heads \(2\)"),
    ],
)
def test_malformed_choices_name_the_bad_path(choices, match):
    with pytest.raises(ValueError, match=match):
        MedusaTree(choices, num_heads=2)


def test_chain():
    tree = MedusaTree.chain(3)
    assert tree.paths == [(), (0,), (0, 0), (0, 0, 0)]
    assert torch.equal(tree.tree_mask, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert tree.retrieve_indices.tolist() == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        MedusaTree.chain(0)


def _all_prefix_closed_trees(num_heads, topk, size):
    """Every prefix-closed set of `size` paths (brute force, tiny spaces only)."""
    universe = [p for d in range(1, num_heads + 1) for p in itertools.product(range(topk), repeat=d)]
    for combo in itertools.combinations(universe, size):
        s = set(combo)
        if all(p[:-1] in s or len(p) == 1 for p in combo):
            yield combo


def _brute_expected_length(acc, paths, rng, samples=0):
    total = 1.0
    for p in paths:
        prob = 1.0
        for d, r in enumerate(p):
            prob *= acc[d][r]
        total += prob
    return total


@pytest.mark.parametrize("seed", range(5))
def test_tree_from_accuracies_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    num_heads, topk = 3, 2
    acc = []
    for _ in range(num_heads):
        row = sorted((rng.random() for _ in range(topk)), reverse=True)
        s = sum(row) * rng.uniform(1.0, 1.6)  # ranks are mutually exclusive events
        acc.append([x / s for x in row])
    for size in (1, 2, 4, 6):
        tree = tree_from_accuracies(acc, size)
        assert tree.num_nodes == size
        got = expected_accept_length(acc, tree.medusa_choices)
        assert got == pytest.approx(_brute_expected_length(acc, tree.medusa_choices, rng))
        best = max(_brute_expected_length(acc, t, rng) for t in _all_prefix_closed_trees(num_heads, topk, size))
        assert got == pytest.approx(best)


def test_expected_accept_length_hand_computed():
    acc = [[0.5, 0.2], [0.4, 0.1]]
    # 1 + 0.5 + 0.2 + 0.5*0.4 + 0.5*0.1
    assert expected_accept_length(acc, [[0], [1], [0, 0], [0, 1]]) == pytest.approx(1.95)
    with pytest.raises(ValueError, match="probabilities"):
        expected_accept_length([[1.5]], [[0]])


def test_best_tree_for_cost_prefers_smaller_trees_when_cost_is_steeper():
    acc = [[0.6, 0.15, 0.05, 0.03], [0.45, 0.1, 0.04, 0.02], [0.35, 0.08, 0.03, 0.02]]
    flat, s_flat = best_tree_for_cost(acc, lambda n: 1.0 + 0.002 * n, 40)
    steep, s_steep = best_tree_for_cost(acc, lambda n: 1.0 + 0.08 * n, 40)
    assert steep.num_nodes < flat.num_nodes
    assert s_flat > s_steep > 1.0
    # the chosen size is the argmax of the brute-force speedup over sizes
    cost = lambda n: 1.0 + 0.08 * n  # noqa: E731
    speeds = [expected_accept_length(acc, tree_from_accuracies(acc, n).medusa_choices) / cost(n)
              for n in range(1, 41)]
    assert steep.num_nodes == 1 + max(range(40), key=lambda i: (speeds[i], -i))
    assert s_steep == pytest.approx(max(speeds))


def test_load_presets_json_and_files(tmp_path):
    for name in PRESETS:
        if name in ("chain-4", "chain-5"):
            with pytest.raises(ValueError, match="exceeds the number of Medusa heads"):
                MedusaTree.load(name, num_heads=3)
            continue
        t = MedusaTree.load(name, num_heads=3)
        assert t.max_depth <= 3
    assert MedusaTree.load("sparse-16", num_heads=4).num_nodes == 16
    t = MedusaTree.load("[[0],[1],[0,0]]")
    assert t.num_nodes == 3
    f = tmp_path / "tree.json"
    t.save(f, note="x")
    assert MedusaTree.load(f) == t
    assert json.loads(f.read_text())["note"] == "x"
    with pytest.raises(ValueError, match="unknown tree 'nope'"):
        MedusaTree.load("nope")


def test_to_device_keeps_buffers():
    t = MedusaTree.load("sparse-8").to("cpu")
    assert t.tree_mask.shape == (9, 9)
    assert t.ancestor_at_depth[0, 0] == 0


def test_nodes_for_batch_uses_the_entry_at_or_below_the_batch():
    from medusa_vllm.core.tree import budget_nodes_by_batch, nodes_for_batch

    table = {1: 16, 4: 8, 8: 3, 32: 0}
    # between entries: the entry below, capped at the tokens per step of the entry above
    assert [nodes_for_batch(table, b, 16) for b in (1, 2, 3, 4, 7, 8, 31, 32, 500)] == [
        16, 16, 11, 8, 3, 3, 0, 0, 0]
    assert nodes_for_batch({1: 4, 8: 0}, 2, 64) == 3 and nodes_for_batch({1: 4, 8: 0}, 4, 64) == 1
    assert nodes_for_batch({2: 5}, 1, 16) == 5  # below the first entry: the first entry
    assert nodes_for_batch({1: 40}, 1, 16) == 16  # capped at the tree size
    assert nodes_for_batch(None, 64, 16) == 16  # no table: the whole tree
    budget = budget_nodes_by_batch(16, 32, batch_sizes=(1, 2, 4, 8, 16, 32, 64))
    assert budget == {1: 16, 2: 15, 4: 7, 8: 3, 16: 1, 32: 0, 64: 0}
    for b, n in budget.items():
        assert n == 0 or b * (n + 1) <= 32 or n == 16
    with pytest.raises(ValueError, match="token_budget"):
        budget_nodes_by_batch(16, 0)


def test_lookup_chain_adds_the_top1_chain_the_tree_lacks():
    from medusa_vllm.core.tree import under_lookup_chain, with_lookup_chain

    base = MedusaTree([[0], [1], [0, 0], [0, 2]])
    tree = with_lookup_chain(base, 3, num_heads=3)
    assert tree.to_list() == [[0], [1], [0, 0], [0, 2], [0, 0, 0]]
    idx = {tuple(p): i + 1 for i, p in enumerate(tree.to_list())}
    row = tree.tree_mask[idx[(0, 0, 0)]]
    assert row.nonzero().flatten().tolist() == [0, idx[(0,)], idx[(0, 0)], idx[(0, 0, 0)]]
    assert with_lookup_chain(base, 2) is base  # nothing to add
    assert with_lookup_chain(base, 0) is base
    with pytest.raises(ValueError, match="exceeds the number of Medusa heads"):
        with_lookup_chain(base, 4, num_heads=3)
    # parents on the top-1 chain (the root included): [0], [1], [0, 0], [0, 2], [0, 0, 0]
    assert under_lookup_chain(tree.medusa_choices) == [True, True, True, True, True]
    assert under_lookup_chain([(1,), (1, 0), (0, 1, 0)]) == [True, False, False]


def test_lookup_candidates_put_the_lookup_first_without_duplicates():
    from medusa_vllm.core.tree import lookup_candidates

    topk = torch.tensor([[[10, 11, 12, 13], [20, 21, 22, 23]],
                         [[30, 31, 32, 33], [40, 41, 42, 43]]])  # [B=2, D=2, k+1=4]
    lookup = torch.tensor([[11, 99], [-1, 40]])
    got = lookup_candidates(topk, lookup)
    assert got.tolist() == [[[11, 10, 12], [99, 20, 21]],   # 11 moved first, 99 new
                            [[30, 31, 32], [40, 41, 42]]]   # none: the heads' top-3; 40 already first
    with pytest.raises(ValueError, match="at least 2 candidates"):
        lookup_candidates(topk[..., :1], lookup)
