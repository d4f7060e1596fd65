"""The tree's size per batch size refitted from what the running engine accepts.

``tree: "auto"`` fits its tree and ``nodes_by_batch`` at start-up from the cost
curve timed on this machine and the heads' *shipped* acceptance statistics
(:func:`medusa_vllm.core.tree_fit.fit_engine_tree`). Those statistics come from
the distillation corpora's held-out split; on the requests a server actually
gets they can be far too hopeful (on everyday chat requests head 0 of the
default heads hits 0.21, not 0.47), and then a draft that cannot pay for its
step is drafted at every batch size. :class:`OnlineNodeFit` replaces the prior
with what the engine observes:

- per node of the engine's tree (BFS order, the prompt-lookup chain included), how
  many verified steps drafted it and how many of those accepted it (the node is
  on the accepted path). In greedy verification a node is accepted exactly when
  its tokens are the target's, whatever else was drafted, so the hit rate of a
  node measured under any prefix holds for every prefix that contains it;
- ``p[i] = (hits[i] + w * prior[i]) / (drafted[i] + w)``: the shipped
  probability counts as ``w`` pseudo-steps, so a few steps do not swing the fit;
- every ``refit_every`` observed steps, or sooner once ``refit_observations``
  requests have drafted since the last refit (at batch 16, 8 steps instead of 32:
  the start-up table's drafts, priced with the shipped statistics, stop sooner when
  they do not pay), per measured batch size ``b``, the BFS
  prefix ``n`` with the most expected tokens per unit of step time,
  ``(1 + p[0] + ... + p[n-1]) / step_cost(curves, b, paths[:n])``, or 0 (plain
  decoding) when none beats a plain step;
- probes: nodes the table stops drafting are never observed again, so every
  ``probe_every``-th step at most ``probe_rows`` requests draft one tree level
  deeper than the table says (every node of depth <= the table's depth + 1: a
  node is worth only what its subtree brings, so one level, not one node),
  which keeps the next level's estimates current at a small cost (a few extra
  query tokens in one step of many).

Pure numpy (no vLLM, no torch); greedy output never depends on it: it only
chooses how many BFS nodes are drafted, and every BFS prefix is verified exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medusa_vllm.core.tree import Path, nodes_at_depth, nodes_for_batch
from medusa_vllm.core.tree_fit import step_cost

__all__ = [
    "DEFAULT_PRIOR_WEIGHT",
    "DEFAULT_PROBE_EVERY",
    "DEFAULT_PROBE_ROWS",
    "DEFAULT_REFIT_EVERY",
    "DEFAULT_REFIT_OBSERVATIONS",
    "OnlineNodeFit",
]

DEFAULT_PRIOR_WEIGHT = 16.0  # pseudo-steps the shipped acceptance counts for
DEFAULT_REFIT_EVERY = 32  # observed steps between refits
DEFAULT_REFIT_OBSERVATIONS = 128  # drafting requests between refits, if sooner than that
DEFAULT_PROBE_EVERY = 16  # proposals between probes one tree level past the table
DEFAULT_PROBE_ROWS = 2  # requests that draft the probe level


@dataclass
class OnlineNodeFit:
    """Per-node acceptance counters and the ``nodes_by_batch`` table they imply.

    ``paths``: the engine tree's nodes in BFS order; ``prior``: each node's
    acceptance probability before any observation (the start-up fit's); ``curves``:
    the start-up cost curve (:class:`medusa_vllm.core.cost_curve.CostCurves`);
    ``table``: the start-up ``nodes_by_batch``, replaced at each refit.
    """

    paths: Sequence[Path]
    prior: np.ndarray
    curves: Any
    table: dict[int, int]
    prior_weight: float = DEFAULT_PRIOR_WEIGHT
    refit_every: int = DEFAULT_REFIT_EVERY
    refit_observations: int = DEFAULT_REFIT_OBSERVATIONS
    probe_every: int = DEFAULT_PROBE_EVERY
    probe_rows: int = DEFAULT_PROBE_ROWS
    drafted: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    steps: int = 0
    proposals: int = 0
    refits: int = 0
    # (steps, drafting requests) at the last refit
    _refit_at: tuple[int, int] = field(default=(0, 0), init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.paths)
        self.prior = np.clip(np.asarray(self.prior, dtype=np.float64), 0.0, 1.0)
        if self.prior.shape != (n,):
            raise ValueError(f"prior: expected {n} node probabilities, found shape "
                             f"{self.prior.shape}")
        if not self.curves.batch_sizes:
            raise ValueError("cost curves: no batch size was measured")
        self.drafted = np.zeros(n, dtype=np.int64)
        self.hits = np.zeros(n, dtype=np.int64)
        self.table = {int(b): int(k) for b, k in self.table.items()}
        depths = [len(p) for p in self.paths]
        # BFS prefix covering every node of depth <= d, for d = 0..max depth
        self._level_end = nodes_at_depth([0, *depths])
        self._depth_of_prefix = [0, *depths]  # BFS: prefix k ends at its deepest node
        self._costs = {b: [1.0] + [step_cost(self.curves, b, self.paths[:k])
                               for k in range(1, n + 1)] for b in self.curves.batch_sizes}

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    def observe(self, num_draft_tokens: Sequence[int], accepted_nodes: np.ndarray) -> None:
        """One verified step: request ``r`` drafted BFS nodes ``1..num_draft_tokens[r]``
        (node 0 is the root) and accepted the nodes in ``accepted_nodes[r]`` (the
        path from the root, ``-1`` padded). Refits every ``refit_every`` steps, or
        once ``refit_observations`` requests have drafted since the last refit."""
        nd = np.asarray(num_draft_tokens, dtype=np.int64)
        if not nd.size or not nd.any():
            return
        n = self.num_nodes
        counts = np.bincount(np.minimum(nd, n), minlength=n + 1)
        # node i (1-based) was drafted by every request that drafted >= i nodes
        self.drafted += np.cumsum(counts[::-1])[::-1][1:]
        acc = np.asarray(accepted_nodes, dtype=np.int64)[: nd.size]
        on_path = acc[(acc >= 1) & (acc <= n)]
        if on_path.size:
            self.hits += np.bincount(on_path - 1, minlength=n)[:n]
        self.steps += 1
        steps, drafting = self._refit_at
        if (self.steps - steps >= self.refit_every
                or int(self.drafted[0]) - drafting >= self.refit_observations):
            self.refit()

    def probabilities(self) -> np.ndarray:
        """Each node's acceptance estimate (observed hits, shrunk toward the prior)."""
        w = self.prior_weight
        return (self.hits + w * self.prior) / (self.drafted + w)

    def refit(self) -> dict[int, int]:
        """Recompute ``table`` from the current estimates (module doc) and return it."""
        gain = np.concatenate([[1.0], 1.0 + np.cumsum(self.probabilities())])
        # entries at batch sizes the curve has no cost for (the start-up fit's "not
        # timed: no drafts" bound) stay as they are
        table = {b: n for b, n in self.table.items() if b not in self._costs}
        for b, costs in self._costs.items():
            speed = gain / np.asarray(costs)
            best = int(np.argmax(speed))
            table[b] = best if speed[best] > 1.0 + 1e-9 else 0
        self.table = dict(sorted(table.items()))
        self.refits += 1
        self._refit_at = (self.steps, int(self.drafted[0]) if self.drafted.size else 0)
        return table

    def nodes(self, batch_size: int) -> tuple[int, int, int]:
        """``(n, probe_nodes, probe_rows)`` for the next proposal at ``batch_size``:
        every request drafts ``n`` BFS nodes, except that on a probe step the first
        ``probe_rows`` requests draft ``probe_nodes`` (one level deeper); on other
        steps, and when ``n`` is the whole tree, ``probe_rows`` is 0."""
        self.proposals += 1
        n = nodes_for_batch(self.table, batch_size, self.num_nodes)
        if n >= self.num_nodes or self.proposals % self.probe_every:
            return n, n, 0
        depth = self._depth_of_prefix[n]
        probe_nodes = self._level_end[min(depth + 1, len(self._level_end) - 1)]
        return n, probe_nodes, min(self.probe_rows, batch_size)

    def sizes(self, batch_size: int, num_rows: int) -> list[int]:
        """Nodes each of ``num_rows`` drafting requests drafts at ``batch_size``
        (:meth:`nodes`): the probing requests take turns across probes, so no single
        request's luck sets the next level's estimate."""
        n, probe_nodes, probe_rows = self.nodes(batch_size)
        start = self.proposals // self.probe_every if probe_rows else 0
        return [probe_nodes if (j - start) % num_rows < probe_rows else n
                for j in range(num_rows)]

    def describe(self) -> str:
        p = self.probabilities()
        shown = ", ".join(f"{x:.2f}" for x in p[: min(8, p.size)])
        return (f"after {self.steps} verified steps ({self.refits} refits): node acceptance "
                f"[{shown}{', ...' if p.size > 8 else ''}] (drafted "
                f"{int(self.drafted[0]) if p.size else 0}x at the first node); "
                f"nodes_by_batch {self.table}")
