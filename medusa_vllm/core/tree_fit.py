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
- In the engine (``tree: "auto"``): :func:`read_per_rank_accuracy` reads the heads'
  shipped statistics, :func:`fit_engine_tree` fits the tree (with the prompt-lookup
  chain) and the size per batch and kind of request to the curves the engine
  measured on its own machine (:mod:`medusa_vllm.core.cost_curve`), drafting cost
  included (:func:`step_cost`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

import torch

from medusa_vllm.core.tree import (
    MedusaTree,
    Path,
    greedy_paths,
    normalize_choices,
    with_lookup_chain,
)

__all__ = [
    "DEFAULT_LOOKUP_ACCEPTANCE",
    "EngineTreeFit",
    "best_tree_for_cost",
    "check_accuracies",
    "expected_accept_length",
    "fit_engine_tree",
    "fit_nodes_by_batch",
    "fit_tree",
    "interpolate_cost",
    "is_chain",
    "monotone_curve",
    "prefix_cost",
    "prefix_value",
    "read_per_rank_accuracy",
    "step_cost",
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
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
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


# ------------------------------------------------------ fit in the running engine
# For a request whose prompt lookup found a continuation, the top-1 chain node at
# depth d holds it and is priced as accepted with probability q**d: the heads'
# statistics say nothing about n-gram matches, so the lookup gets an assumed
# per-token acceptance (vLLM's n-gram speculator accepted ~1.65 of 4 drafted tokens
# per matched step on everyday chat requests, q ~ 0.6). Only requests with a match
# draft by this pricing; the running engine replaces it with what it observes
# (:mod:`medusa_vllm.core.online_fit`).
DEFAULT_LOOKUP_ACCEPTANCE = 0.6
# The share of steps assumed to carry a lookup continuation when the tree's shape is
# chosen: one shape serves both kinds of request, so it is priced for both (how many
# of its nodes each kind drafts per batch size is fitted and refitted apart).
LOOKUP_SHARE = 0.5


def read_per_rank_accuracy(heads_dir: str | FsPath) -> tuple[list[list[float]], str] | None:
    """The heads' own acceptance statistics shipped beside them: ``(per_rank, source)``.

    ``per_rank[k][r]`` is the held-out probability that head k's rank-r candidate is
    the next-but-k token. Read from the first of ``medusa_tree.json``
    (``per_rank_accuracy``, written by ``medusa-vllm calibrate`` and the default
    heads' recipe), ``eval.json`` (``per_rank``) and ``accuracies.json`` (cumulative
    top-k accuracies per head, differenced). ``None`` when none of them has it; a
    file that has it in a bad shape raises ``ValueError`` naming the file.
    """
    folder = FsPath(heads_dir)
    for name, key in (("medusa_tree.json", "per_rank_accuracy"), ("eval.json", "per_rank"),
                      ("accuracies.json", None)):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not readable JSON ({exc})") from None
        if key is not None:
            table = data.get(key) if isinstance(data, dict) else None
            if table is None:
                continue
        else:
            table = data
        try:
            a = check_accuracies(table)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {key or 'the table'} is not a [num_heads, topk] "
                             f"table of probabilities ({exc})") from None
        if key is None:  # cumulative top-k -> per rank
            a = torch.cat([a[:, :1], (a[:, 1:] - a[:, :-1]).clamp(min=0.0)], dim=1)
        return a.tolist(), f"{path}" + (f" ({key})" if key else " (cumulative, differenced)")
    return None


@dataclass
class EngineTreeFit:
    """What :func:`fit_engine_tree` picked.

    ``heads_tree``: the heads' nodes; ``tree``: the tree the engine drafts (the heads'
    nodes plus the top-1 chain prompt lookup fills, if any); ``nodes_by_batch``:
    BFS-first nodes of ``tree`` drafted per batch size (0 = plain decoding) by
    requests without a lookup continuation, ``lookup_nodes_by_batch`` by requests
    with one; per batch size, the expected accepted length and speedup over vanilla
    of the first; ``node_prior`` / ``lookup_prior``: each node's acceptance
    probability as priced for each kind of request.
    """

    heads_tree: MedusaTree
    tree: MedusaTree
    nodes_by_batch: dict[int, int]
    expected_accept_length: dict[int, float] = field(default_factory=dict)
    expected_speedup: dict[int, float] = field(default_factory=dict)
    ngram_nodes: int = 0
    node_prior: list[float] = field(default_factory=list)
    lookup_nodes_by_batch: dict[int, int] | None = None
    lookup_prior: list[float] | None = None

    def describe(self) -> str:
        b1 = min(self.nodes_by_batch)
        chain = (f" + the top-1 chain to depth {self.ngram_nodes} for prompt lookup"
                 if self.ngram_nodes else "")
        per_batch = ", ".join(
            f"{b}: {n} nodes (E[accept] {self.expected_accept_length[b]:.2f}, "
            f"x{self.expected_speedup[b]:.2f})" for b, n in self.nodes_by_batch.items())
        lookup = (f"; with a lookup continuation {self.lookup_nodes_by_batch}"
                  if self.lookup_nodes_by_batch is not None else "")
        return (f"tree of {self.heads_tree.num_nodes} heads nodes{chain}, depth "
                f"{self.tree.max_depth}, at batch {b1}: E[accept] "
                f"{self.expected_accept_length[b1]:.2f}, expected x{self.expected_speedup[b1]:.2f}"
                f" vs vanilla; nodes_by_batch {{{per_batch}}}{lookup}")


def node_probabilities(a: torch.Tensor, paths: Sequence[Path], lookup_depth: int = 0,
                       lookup_acceptance: float = DEFAULT_LOOKUP_ACCEPTANCE) -> list[float]:
    """Each node's chance to be on the accepted path: a heads node's path probability
    under per-rank accuracies ``a``; with ``lookup_depth`` (a request whose prompt
    lookup found a continuation that deep), ``lookup_acceptance ** depth`` for the
    top-1 chain's nodes down to that depth, which hold the continuation (their
    siblings, the heads' candidates one rank down, keep the heads' pricing)."""
    return [lookup_acceptance ** len(p) if len(p) <= lookup_depth and not any(p)
            else _path_prob(a, p) for p in paths]


def prefix_value(a: torch.Tensor, paths: Sequence[Path], lookup_depth: int = 0,
                 lookup_acceptance: float = DEFAULT_LOOKUP_ACCEPTANCE) -> float:
    """Expected tokens per step of a tree's nodes ``paths``: 1 + the sum of
    :func:`node_probabilities`."""
    return 1.0 + sum(node_probabilities(a, paths, lookup_depth, lookup_acceptance))


def step_cost(curves: Any, batch_size: int, paths: Sequence[Path]) -> float:
    """Relative step time (vanilla = 1) at ``batch_size`` of drafting and verifying the
    tree made of ``paths`` (BFS order), under measured ``curves``
    (:class:`medusa_vllm.core.cost_curve.CostCurves`): the chain point when the
    nodes are a measured top-1-style chain (vLLM's causal kernel), else the tree curve
    (interpolated, last slope extrapolated), plus the heads' drafting to that depth."""
    n = len(paths)
    if n == 0:
        return 1.0
    depth = max(len(p) for p in paths)
    chains = monotone_curve(curves.chain.get(batch_size, {}))
    trees = curves.tree.get(batch_size, {})
    if depth == n and n in chains:
        verify = chains[n]
    elif trees:
        verify = interpolate_cost(trees)(n)
    elif chains:  # no tree point fitted under the token budget: price it as a longer chain
        verify = interpolate_cost(chains)(n)
    else:
        raise ValueError(f"cost curves: nothing measured at batch size {batch_size}")
    drafts = curves.draft.get(batch_size, {})
    if drafts:
        draft = drafts.get(depth, drafts[max(d for d in drafts if d <= depth)]
                           if any(d <= depth for d in drafts) else min(drafts.values()))
    else:
        draft = 0.0
    return float(verify) + float(draft)


def _best_prefixes(paths: Sequence[Path], curves: Any, value: Callable[[Sequence[Path]], float]
                   ) -> tuple[dict[int, int], dict[int, float], dict[int, float]]:
    """Per measured batch size: the BFS prefix of ``paths`` with the most expected
    tokens (``value``) per unit of step time, 0 when none beats a plain step; with
    its expected accepted length and speedup."""
    table: dict[int, int] = {}
    lengths: dict[int, float] = {}
    speeds: dict[int, float] = {}
    for b in curves.batch_sizes:
        pick, pick_len, pick_speed = 0, 1.0, 1.0
        for n in range(1, len(paths) + 1):
            length = value(paths[:n])
            speed = length / step_cost(curves, b, paths[:n])
            if speed > pick_speed + 1e-9:
                pick, pick_len, pick_speed = n, length, speed
        table[b], lengths[b], speeds[b] = pick, pick_len, pick_speed
    return table, lengths, speeds


def fit_engine_tree(per_rank: Accuracies, curves: Any, max_nodes: int, *, num_heads: int | None = None,
                    ngram_nodes: int = 0, lookup_acceptance: float = DEFAULT_LOOKUP_ACCEPTANCE
                    ) -> EngineTreeFit:
    """The tree and its size per batch size for this machine (``tree: "auto"``).

    ``curves``: :class:`medusa_vllm.core.cost_curve.CostCurves` measured by the running
    engine; ``per_rank``: the heads' per-rank accuracies; ``max_nodes``: the engine's
    node budget (its ``num_speculative_tokens``), the lookup chain included.

    1. At the smallest measured batch size, every greedy tree of 1..``max_nodes -
       ngram_nodes`` heads nodes (:func:`tree_from_accuracies`) and every top-1 chain
       is priced: E[tokens per step] (:func:`prefix_value`) over :func:`step_cost`
       (with ``ngram_nodes``, averaged with its best prefix for a request with a
       lookup continuation, at :data:`LOOKUP_SHARE`); the best one, plus the top-1
       chain down to ``ngram_nodes`` (:func:`~medusa_vllm.core.tree.with_lookup_chain`),
       is the engine's tree.
    2. Per measured batch size, the BFS prefix of that tree with the best ratio, or
       0 (plain decoding) when none beats vanilla: priced with the heads' statistics
       for requests without a lookup continuation (``nodes_by_batch``) and with the
       lookup chain at the assumed ``lookup_acceptance`` for requests with one
       (``lookup_nodes_by_batch``): the fit decides, per batch size, how many nodes
       each kind of request drafts.
    """
    a = check_accuracies(per_rank)
    if num_heads is not None:
        a = a[:num_heads]
    heads = a.shape[0]
    if ngram_nodes < 0 or ngram_nodes > heads:
        raise ValueError(f"ngram_nodes must be in [0, {heads}] (the heads' depth), found {ngram_nodes}")
    budget = max_nodes - ngram_nodes
    if budget < 1:
        raise ValueError(f"max_nodes={max_nodes} leaves no heads node beside the "
                         f"{ngram_nodes}-deep lookup chain; raise max_nodes")
    sizes = curves.batch_sizes
    if not sizes:
        raise ValueError("cost curves: no batch size was measured")
    b1 = sizes[0]
    order = greedy_paths(a, budget)
    candidates = [MedusaTree(order[:n]) for n in range(1, len(order) + 1)]
    candidates += [MedusaTree.chain(d) for d in range(1, min(heads, budget) + 1)]

    def lookup_speed(paths: Sequence[Path]) -> float:  # its best BFS prefix, as drafted
        return max([1.0] + [prefix_value(a, paths[:n], ngram_nodes, lookup_acceptance)
                            / step_cost(curves, b1, paths[:n]) for n in range(1, len(paths) + 1)])

    best, best_speed = None, -math.inf
    for cand in candidates:
        speed = prefix_value(a, cand.medusa_choices) / step_cost(curves, b1, cand.medusa_choices)
        if ngram_nodes:  # the tree serves both kinds of request: price it for both
            both = with_lookup_chain(cand, ngram_nodes, heads).medusa_choices
            speed = (1 - LOOKUP_SHARE) * speed + LOOKUP_SHARE * lookup_speed(both)
        if speed > best_speed + 1e-12:
            best, best_speed = cand, speed
    assert best is not None
    tree = with_lookup_chain(best, ngram_nodes, heads) if ngram_nodes else best
    paths = tree.medusa_choices
    table, lengths, speeds = _best_prefixes(paths, curves, lambda p: prefix_value(a, p))
    fit = EngineTreeFit(heads_tree=best, tree=tree, nodes_by_batch=table,
                        expected_accept_length=lengths, expected_speedup=speeds,
                        ngram_nodes=ngram_nodes, node_prior=node_probabilities(a, paths))
    if ngram_nodes:
        fit.lookup_nodes_by_batch = _best_prefixes(
            paths, curves, lambda p: prefix_value(a, p, ngram_nodes, lookup_acceptance))[0]
        fit.lookup_prior = node_probabilities(a, paths, ngram_nodes, lookup_acceptance)
    return fit
