"""Tree statistics from measured target ranks (medusa_vllm.core.tree_stats)."""

from __future__ import annotations

import itertools

import pytest
import torch

from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import expected_accept_length
from medusa_vllm.core.tree_stats import (
    joint_accept_length,
    path_counts,
    simulate_acceptance,
    tree_from_ranks,
)


def _random_ranks(n_rows: int, num_heads: int, topk: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        n = int(torch.randint(0, 40, (1,), generator=g))
        # rank -1 (miss) about half the time, else 0..topk-1 skewed to low ranks
        r = torch.randint(0, topk, (n, num_heads), generator=g)
        r = torch.minimum(r, torch.randint(0, topk, (n, num_heads), generator=g))
        miss = torch.rand(n, num_heads, generator=g) < 0.45
        rows.append(torch.where(miss, torch.full_like(r, -1), r))
    return rows


def _brute_counts(rows, path):
    n = 0
    for row in rows:
        for pos in row.tolist():
            n += all(pos[d] == r for d, r in enumerate(path))
    return n


def test_path_counts_match_brute_force():
    rows = _random_ranks(6, 3, 3, seed=0)
    counts, n = path_counts(rows)
    assert n == sum(len(r) for r in rows)
    for depth in (1, 2, 3):
        for path in itertools.product(range(3), repeat=depth):
            assert counts.get(path, 0) == _brute_counts(rows, path), path
    short, _ = path_counts(rows, max_depth=1)
    assert all(len(p) == 1 for p in short)


def _prefix_closed_trees(paths, size):
    for combo in itertools.combinations(paths, size):
        s = set(combo)
        if all(p[:-1] in s or len(p) == 1 for p in combo):
            yield combo


def test_tree_from_ranks_is_the_best_tree_of_its_size():
    rows = _random_ranks(8, 2, 3, seed=1)
    paths = [p for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
    for size in (1, 2, 4, 6):
        tree = tree_from_ranks(rows, size)
        assert tree.num_nodes == size
        got = joint_accept_length(tree, rows)
        best = max(joint_accept_length(MedusaTree(t), rows) for t in _prefix_closed_trees(paths, size))
        assert got == pytest.approx(best)


def test_joint_length_sees_correlation_that_independence_misses():
    # head 1 is right exactly when head 0 is (top-1), half of the positions
    rows = [torch.tensor([[0, 0], [-1, -1]] * 50)]
    chain = MedusaTree.chain(2)
    assert joint_accept_length(chain, rows) == pytest.approx(1 + 0.5 + 0.5)
    # the paper's independence model multiplies the marginals: 1 + 0.5 + 0.25
    per_rank = [[0.5, 0.0], [0.5, 0.0]]
    assert expected_accept_length(per_rank, chain.medusa_choices) == pytest.approx(1.75)
    # with independent heads both agree (up to sampling noise)
    g = torch.Generator().manual_seed(3)
    ind = (torch.rand(20000, 2, generator=g) < torch.tensor([0.6, 0.3])).long() - 1
    ind = torch.where(ind == 0, torch.zeros_like(ind), torch.full_like(ind, -1))
    assert joint_accept_length(chain, [ind]) == pytest.approx(1 + 0.6 + 0.18, abs=0.02)


def test_simulate_acceptance_hand_checked():
    chain = MedusaTree.chain(2)
    # positions 0..6; a step at i accepts the matching depth a and moves to i + a + 1
    row = torch.tensor([[0, 0],     # step at 0: depth 2 -> next 3
                        [0, 0],     # (skipped)
                        [-1, 0],    # (skipped)
                        [0, 1],     # step at 3: depth 1 -> next 5
                        [0, 0],     # (skipped)
                        [-1, -1],   # step at 5: depth 0 -> next 6
                        [0, -1]])   # step at 6: depth 1 -> next 8, done
    sim = simulate_acceptance(chain, [row])
    assert sim.steps == 4
    assert sim.mean_accepted_length == pytest.approx((3 + 2 + 1 + 2) / 4)
    assert sim.acceptance_per_depth == pytest.approx([3 / 4, 1 / 4])
    # a wider tree also takes the (0, 1) path at position 3, so the steps start at 0, 3, 6
    wide = MedusaTree([(0,), (0, 0), (0, 1)])
    sim = simulate_acceptance(wide, [row])
    assert (sim.steps, sim.mean_accepted_length) == (3, pytest.approx((3 + 3 + 2) / 3))
    # per position the chain expects 1 + 5/7 (head 0 right) + 3/7 (both right)
    assert joint_accept_length(chain, [row]) == pytest.approx(1 + 5 / 7 + 3 / 7)


def test_bad_ranks_are_refused():
    with pytest.raises(ValueError, match="no ranks rows"):
        path_counts([])
    with pytest.raises(ValueError, match="num_heads of row 0"):
        path_counts([torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="no head is ever right"):
        tree_from_ranks([torch.full((4, 2), -1)], 3)
    with pytest.raises(ValueError, match="every ranks row is empty"):
        simulate_acceptance(MedusaTree.chain(1), [torch.zeros(0, 2, dtype=torch.long)])
