"""Tree statistics measured on data, without the independence assumption.

:func:`medusa_vllm.core.tree_fit.tree_from_accuracies` and :func:`medusa_vllm.core.tree_fit.expected_accept_length`
follow the paper: a node's value is the *product* of its heads' marginal rank
accuracies, as if the heads erred independently. The functions here work from
the heads' measured **target ranks** instead: ``ranks[i, k]`` is the rank of the
correct token among head ``k``'s candidates at step-start position ``i`` of a
row (``-1`` when it is not among them), one ``[n, num_heads]`` tensor per row
with the positions in order (see ``evaluate_heads(..., collect_ranks=True)``).

- :func:`path_counts`: how often each candidate path is entirely right (joint).
- :func:`joint_accept_length`: expected accepted length per position with the
  joint frequencies (1 + the sum of the tree's node frequencies).
- :func:`tree_from_ranks`: the ``num_nodes`` most frequent paths, the tree that
  maximises :func:`joint_accept_length` (prefix-closed, see there).
- :func:`simulate_acceptance`: greedy decoding replayed step by step: each step
  accepts the tree's deepest matching path plus the backbone's own token and the
  next step starts after them. This is what the engine measures on the same text;
  it is lower than the per-position expectation because steps crowd where the
  heads fail and skip over where they succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_vllm.core.tree import MedusaTree

__all__ = [
    "SimulatedAcceptance",
    "joint_accept_length",
    "path_counts",
    "simulate_acceptance",
    "tree_from_ranks",
]

Path = tuple[int, ...]


def _stack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    mats = [torch.as_tensor(r).long() for r in rows]
    if not mats:
        raise ValueError("no ranks rows: evaluate the heads on at least one row")
    for i, m in enumerate(mats):
        if m.dim() != 2 or m.shape[1] != mats[0].shape[-1]:
            raise ValueError(
                f"ranks row {i} must be [positions, num_heads] with the num_heads of row 0 "
                f"({mats[0].shape[-1]}), found shape {list(m.shape)}")
    return torch.cat(mats)


def path_counts(rows: Sequence[torch.Tensor], max_depth: int | None = None) -> tuple[dict[Path, int], int]:
    """Positions at which each candidate path is entirely right.

    Returns ``(counts, positions)``: ``counts[(r0, .., rd)]`` is the number of
    positions where head ``j``'s correct token has rank ``rj`` for every
    ``j <= d``; ``positions`` is the number of positions.
    """
    r = _stack(rows)
    n, k = r.shape
    depth = k if max_depth is None else min(k, max_depth)
    counts: dict[Path, int] = {}
    alive = torch.ones(n, dtype=torch.bool)
    for d in range(1, depth + 1):
        alive &= r[:, d - 1] >= 0
        if not alive.any():
            break
        paths, cnt = torch.unique(r[alive, :d], dim=0, return_counts=True)
        for p, c in zip(paths.tolist(), cnt.tolist()):
            counts[tuple(p)] = c
    return counts, n


def tree_from_ranks(rows: Sequence[torch.Tensor], num_nodes: int, max_rank: int | None = None) -> MedusaTree:
    """The ``num_nodes`` paths that are right most often (fewer if fewer ever are).

    A path is right only where its parent is, so its count never exceeds its
    parent's; ties go to the shorter path, so the chosen set is prefix-closed and
    maximises :func:`joint_accept_length` among trees of its size.
    ``max_rank`` keeps only candidates of rank ``< max_rank``.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, found {num_nodes}")
    counts, _ = path_counts(rows)
    if max_rank is not None:
        counts = {p: c for p, c in counts.items() if max(p) < max_rank}
    if not counts:
        raise ValueError("no head is ever right in these ranks: no tree can be built from them")
    best = sorted(counts, key=lambda p: (-counts[p], len(p), p))[:num_nodes]
    return MedusaTree(best)


def joint_accept_length(tree: MedusaTree, rows: Sequence[torch.Tensor]) -> float:
    """Expected accepted length per position: 1 + sum over the tree's nodes of the
    frequency with which the node's whole path is right."""
    counts, n = path_counts(rows, tree.max_depth)
    return 1.0 + sum(counts.get(tuple(p), 0) for p in tree.to_list()) / max(n, 1)


@dataclass(frozen=True)
class SimulatedAcceptance:
    """Replayed greedy decoding: ``steps`` verification steps, ``mean_accepted_length``
    tokens per step (the backbone's own token included), ``acceptance_per_depth[d]`` =
    fraction of steps that accepted a draft token at depth ``d + 1``."""

    steps: int
    mean_accepted_length: float
    acceptance_per_depth: list[float]


def simulate_acceptance(tree: MedusaTree, rows: Sequence[torch.Tensor]) -> SimulatedAcceptance:
    """Replay greedy Medusa decoding of each row with ``tree``.

    A step at position ``i`` accepts the deepest tree path whose candidates are
    all right there (depth ``a``), plus the backbone's own token; the next step
    starts at ``i + a + 1``.
    """
    nodes = {tuple(p) for p in tree.to_list()}
    depth = tree.max_depth
    _stack(rows)  # shape checks
    accepted = [0] * (depth + 1)
    steps = 0
    for row in rows:
        ranks = torch.as_tensor(row).long().tolist()
        i = 0
        while i < len(ranks):
            path: Path = ()
            for d in range(min(depth, len(ranks[i]))):
                nxt = path + (ranks[i][d],)
                if ranks[i][d] < 0 or nxt not in nodes:
                    break
                path = nxt
            accepted[len(path)] += 1
            steps += 1
            i += len(path) + 1
    if steps == 0:
        raise ValueError("no positions to replay: every ranks row is empty")
    mean = sum((a + 1) * c for a, c in enumerate(accepted)) / steps
    per_depth = [sum(accepted[d:]) / steps for d in range(1, depth + 1)]
    return SimulatedAcceptance(steps, mean, per_depth)
