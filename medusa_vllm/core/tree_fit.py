"""The paper's optimized sparse tree, fitted to head accuracies and a measured cost curve.

Pure torch, no engine state, never imports vLLM: the fitting half of ``medusa-vllm
calibrate`` (:mod:`medusa_vllm.tools.calibrate` measures, this module decides).

- Accuracy model: ``acc[k][r]`` is the measured probability that head k's rank-r
  candidate is the correct token. A node's expected contribution to the accepted
  length is the product of the accuracies along its path
  (:func:`expected_accept_length`); :func:`tree_from_accuracies` takes the
  ``num_nodes`` nodes with the largest contributions.
- Cost model: a curve ``{nodes: relative step time}`` (vanilla decode = 1.0),
  made monotone (:func:`monotone_curve`) and linearly interpolated
  (:func:`interpolate_cost`). Top-1 chains verify through vLLM's causal kernel, so
  they may carry their own cheaper curve (:func:`is_chain`, :func:`prefix_cost`).
- Fit: :func:`best_tree_for_cost` and :func:`fit_tree` pick the size maximising
  E[tokens per step] / cost(n); :func:`fit_nodes_by_batch` picks, per batch size,
  how many of a tree's BFS-first nodes to draft (0 = plain decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from medusa_vllm.core.tree import MedusaTree, Path, greedy_paths, normalize_choices

__all__ = [
    "best_tree_for_cost",
    "check_accuracies",
    "expected_accept_length",
    "fit_nodes_by_batch",
    "fit_tree",
    "interpolate_cost",
    "is_chain",
    "monotone_curve",
    "prefix_cost",
    "tree_from_accuracies",
]

Accuracies = Sequence[Sequence[float]] | torch.Tensor


# ------------------------------------------------------------- accuracy model
def check_accuracies(acc: Accuracies) -> torch.Tensor:
    """``acc`` as a float64 ``[num_heads, topk]`` tensor of probabilities, or ``ValueError``."""
    a = torch.as_tensor(acc, dtype=torch.float64)
    if a.dim() != 2 or a.numel() == 0:
        raise ValueError(
            f"accuracies must be a [num_heads, topk] table, found shape {tuple(a.shape)}"
        )
    if not torch.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError("accuracies must be probabilities in [0, 1]")
    return a


def _path_prob(a: torch.Tensor, path: Path) -> float:
    prob = 1.0
    for d, r in enumerate(path):
        if d >= a.shape[0] or r >= a.shape[1]:
            return 0.0
        prob *= float(a[d, r])
    return prob


def expected_accept_length(acc: Accuracies, medusa_choices: Iterable[Sequence[int]]) -> float:
    """Expected tokens emitted per step: 1 (bonus) + Σ_nodes Π acc along path.

    Under the paper's model a node is on the accepted path iff each of its
    ranks was the correct token for its head; those events are taken as
    independent across heads and mutually exclusive across ranks.
    """
    a = check_accuracies(acc)
    return 1.0 + sum(_path_prob(a, p) for p in normalize_choices(medusa_choices))


def tree_from_accuracies(acc: Accuracies, num_nodes: int) -> MedusaTree:
    """The paper's optimized sparse tree.

    ``acc[k][r]`` is the measured probability that head k's rank-r
    candidate is the correct token. A node's expected contribution to the
    accepted length is the product of the accuracies along its path; the
    tree greedily takes the ``num_nodes`` nodes with the largest
    contributions. Since a child's product never exceeds its parent's,
    the result is prefix-closed and maximises
    :func:`expected_accept_length` among trees with ``num_nodes`` nodes.
    """
    return MedusaTree(greedy_paths(check_accuracies(acc), num_nodes))


def best_tree_for_cost(
    acc: Accuracies, cost: Callable[[int], float], max_nodes: int
) -> tuple[MedusaTree, float]:
    """Hardware-aware tree: maximise E[tokens per step] / cost(num_nodes).

    ``cost(n)`` is the (relative) time of a verification step with ``n``
    tree nodes. For each size the greedy tree is optimal, so scanning the
    sizes finds the best trade-off. Returns the tree and its expected
    speedup (E[tokens per step] / cost(n) relative to cost(0)).
    """
    a = check_accuracies(acc)
    order = greedy_paths(a, max_nodes)
    base = float(cost(0))
    if not base > 0:
        raise ValueError(f"cost(0) must be > 0, found {base}")
    best_n, best_speed, length = 1, -math.inf, 1.0
    for n in range(1, len(order) + 1):
        length += _path_prob(a, order[n - 1])
        c = float(cost(n))
        if not c > 0:
            raise ValueError(f"cost({n}) must be > 0, found {c}")
        speed = length * base / c
        if speed > best_speed + 1e-12:
            best_n, best_speed = n, speed
    return MedusaTree(order[:best_n]), best_speed


# ----------------------------------------------------------------- cost model
def monotone_curve(curve: dict[int, float]) -> dict[int, float]:
    """``curve`` made non-decreasing in the number of drafted nodes, from vanilla's 1.0
    (running maximum). Verifying more nodes adds rows to every matrix multiply and
    never removes work, so a measured point below a smaller one (or below 1.0) is
    timing noise; pricing it at the smaller one's cost keeps the noise from
    choosing the tree."""
    out: dict[int, float] = {}
    top = 1.0
    for n, c in sorted((int(k), float(v)) for k, v in curve.items()):
        top = c if n == 0 else max(top, c)
        out[n] = top
    return out


def interpolate_cost(curve: dict[int, float]) -> Callable[[int], float]:
    """Piecewise-linear cost(n) through measured points ``{nodes: relative step time}``
    (``0`` = vanilla decode = 1.0 unless given), made monotone
    (:func:`monotone_curve`); extrapolates the last slope."""
    pts = sorted({0: 1.0, **monotone_curve(curve)}.items())
    if len(pts) < 2:
        raise ValueError("cost curve: need at least one measured tree size")

    def cost(n: int) -> float:
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + (y1 - y0) * (n - x1) / (x1 - x0)

    return cost


def is_chain(tree: MedusaTree) -> bool:
    """Every node on one path (what vLLM's causal kernel verifies exactly)."""
    return tree.max_depth == tree.num_nodes


def prefix_cost(tree: MedusaTree, n: int, curve: dict[int, float],
                chain_curve: dict[int, float] | None = None) -> float:
    """Relative step time of ``tree``'s first ``n`` BFS nodes: the chain curve's
    point when that prefix is a measured chain, else the tree curve (both made
    monotone, :func:`monotone_curve`)."""
    chains = monotone_curve(chain_curve or {})
    if n in chains and is_chain(tree.truncate(n)):
        return chains[n]
    return interpolate_cost(curve)(n)


# ------------------------------------------------------------------------ fit
def fit_tree(per_rank: Accuracies, curve: dict[int, float],
             max_nodes: int, chain_curve: dict[int, float] | None = None
             ) -> tuple[MedusaTree, float, float]:
    """Best tree for one batch size: (tree, expected accepted length, expected speedup).

    ``chain_curve`` (``{depth: relative step time}`` of top-1 chains, measured
    separately because chains verify through the cheaper causal kernel) adds
    those chains as candidates.
    """
    tree_cost = interpolate_cost(curve)
    chains = monotone_curve(chain_curve or {})
    num_heads = len(per_rank)

    def cost(n: int) -> float:  # a greedy tree that happens to be a chain is priced as one
        if n in chains:
            return prefix_cost(tree_from_accuracies(per_rank, n), n, curve, chains)
        return tree_cost(n)

    tree, speedup = best_tree_for_cost(per_rank, cost, max_nodes)
    for depth, c in sorted(chains.items()):
        if not 1 <= int(depth) <= min(num_heads, max_nodes):
            continue
        chain = MedusaTree.chain(int(depth))
        speed = expected_accept_length(per_rank, chain.medusa_choices) / max(float(c), 1e-9)
        if speed > speedup + 1e-12:
            tree, speedup = chain, speed
    return tree, expected_accept_length(per_rank, tree.medusa_choices), speedup


def fit_nodes_by_batch(tree: MedusaTree, per_rank: Accuracies,
                       curves: dict[int, dict[int, float]],
                       chain_curves: dict[int, dict[int, float]] | None = None) -> dict[int, int]:
    """``{batch_size: n}``: the BFS prefix of ``tree`` (n nodes, 0 = no drafts)
    maximising E[accepted length] / cost(n) under each batch size's cost curve
    (relative step time, vanilla = 1; chain prefixes priced by ``chain_curves``)."""
    out: dict[int, int] = {}
    for bs, curve in sorted(curves.items()):
        chain_curve = (chain_curves or {}).get(bs)
        best, best_speed = 0, 1.0
        for n in range(1, tree.num_nodes + 1):
            cost = prefix_cost(tree, n, curve, chain_curve)
            speed = expected_accept_length(per_rank, tree.medusa_choices[:n]) / max(cost, 1e-9)
            if speed > best_speed + 1e-9:
                best, best_speed = n, speed
        out[int(bs)] = best
    return out
