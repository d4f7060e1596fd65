"""Verification cost curves measured on one machine: what they hold, what they are keyed by,
where they are cached, and which points a start-up measurement times.

Pure (no vLLM, no engine state): :mod:`medusa_vllm.engine.cost_curve` measures the
points in the running engine; :func:`medusa_vllm.core.tree_fit.fit_engine_tree` turns
them (with the heads' accuracies) into the tree and its size per batch.

- :class:`CostCurveKey`: everything a measured curve is only valid for (CPU model,
  ISA, dtype, threads, tensor-parallel size, backbone, heads shape, vLLM version,
  tree-attention kernel, measurement format). Two engines with equal keys reuse one
  measurement.
- :class:`CostCurves`: per batch size, the step time of vanilla decoding (seconds)
  and, relative to it, the step time with ``n`` tree nodes per request (``tree``),
  with a top-1 chain of depth ``d`` (``chain``: verified by vLLM's causal kernel,
  cheaper than a tree of as many nodes) and the heads' drafting of depth ``d``
  (``draft``: the proposer's cost, paid on every speculative step).
- :func:`read_cached` / :func:`write_cached`: one JSON file per key under
  ``cache_root() / "cost_curves"``; a file whose stored key differs (hash
  collision, hand edit) or that does not parse is ignored, never trusted.
- :func:`measurement_points`: which (batch size, kind, size) points to time under a
  token budget per forward pass (beyond it the fit extrapolates the last slope).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_vllm.core.paths import cache_root

__all__ = [
    "CURVE_DIR",
    "CURVE_FORMAT",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_TREE_SIZES",
    "CostCurveKey",
    "CostCurves",
    "MeasurementPoint",
    "cache_path",
    "measurement_points",
    "read_cached",
    "write_cached",
]

CURVE_DIR = "cost_curves"  # under cache_root()
# Bump when what a measurement times changes: older cached curves are then ignored.
# 2: several timed rounds, costs made monotone in size, the rounds' spread recorded.
# 3: a vanilla step timed slower than a pass with drafts is bounded by it (monotone()).
CURVE_FORMAT = 3
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
DEFAULT_TREE_SIZES = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class CostCurveKey:
    """What a measured cost curve is valid for (see module doc)."""

    cpu_model: str
    isa: str
    dtype: str
    threads: int
    tensor_parallel: int
    model: str  # the backbone (path or name, as the engine was given it)
    heads: str  # the heads' shape: "<num_heads>x<layers> vocab <draft vocab>"
    vllm: str  # vLLM version
    kernel: str  # tree-attention path: "fused" or "torch"
    format: int = CURVE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable 16-hex-digit hash of the key (the cache file name)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for logs: machine, dtype, threads, TP."""
        tp = f", TP={self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        return f"{self.cpu_model} [{self.isa}, {self.dtype}, {self.threads} threads{tp}]"


def _int_keys(table: Mapping[Any, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in sorted(table.items(), key=lambda kv: int(kv[0]))}


def _nested(table: Mapping[Any, Mapping[Any, Any]]) -> dict[int, dict[int, float]]:
    return {b: {int(n): float(c) for n, c in _int_keys(row).items()}
            for b, row in _int_keys(table).items()}


@dataclass
class CostCurves:
    """Per batch size: vanilla step seconds, and relative step costs (vanilla = 1.0).

    ``tree[b][n]``: ``n`` tree nodes per request (not a chain: the tree-attention
    path); ``chain[b][d]``: a top-1 chain of depth ``d`` (vLLM's causal kernel);
    ``draft[b][d]``: the heads' drafting for a tree of depth ``d`` (added to either).
    ``context``: prefix tokens per request while timing; ``seconds``: how long the
    measurement took; ``complete``: every planned point was timed; ``noise``: how far
    the timed rounds of one point lay apart (the median over points of a point's median
    round over its fastest one, minus 1; 0.0 when each point ran once).
    """

    vanilla_s: dict[int, float] = field(default_factory=dict)
    tree: dict[int, dict[int, float]] = field(default_factory=dict)
    chain: dict[int, dict[int, float]] = field(default_factory=dict)
    draft: dict[int, dict[int, float]] = field(default_factory=dict)
    context: int = 0
    seconds: float = 0.0
    complete: bool = True  # False: the time bound stopped the measurement early
    noise: float = 0.0

    def __post_init__(self) -> None:
        self.vanilla_s = {b: float(s) for b, s in _int_keys(self.vanilla_s).items()}
        self.tree, self.chain, self.draft = (_nested(self.tree), _nested(self.chain),
                                             _nested(self.draft))

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(b for b in self.vanilla_s if self.tree.get(b) or self.chain.get(b))

    def to_dict(self) -> dict[str, Any]:
        def s(table: Mapping[int, Mapping[int, float]]) -> dict[str, dict[str, float]]:
            return {str(b): {str(n): c for n, c in row.items()} for b, row in table.items()}

        return {"vanilla_s": {str(b): v for b, v in self.vanilla_s.items()},
                "tree": s(self.tree), "chain": s(self.chain), "draft": s(self.draft),
                "context": self.context, "seconds": self.seconds, "complete": self.complete,
                "noise": self.noise}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostCurves:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"CostCurves: unknown field(s) {unknown}; expected {sorted(names)}")
        return cls(**dict(data))

    def monotone(self) -> CostCurves:
        """The curves made physically consistent. Timing noise only ever adds time, so a
        pass timed faster than a smaller one of the same kind bounds the smaller one too:
        each cost becomes the minimum over its own and every larger size (a timing of
        ``tree 2:1.46 4:1.35`` becomes ``2:1.35 4:1.35``). Likewise a vanilla step (one
        token per request) costs at most any pass with drafts at its batch size: where a
        pass was timed below the vanilla step, that pass's time becomes the vanilla step's
        and every ratio of the batch size is taken against it (a chain timed at 0.97 of
        vanilla becomes 1.0, and the trees beside it dearer by 1/0.97). Session 19: on an
        AVX-512-BF16 EPYC the 1-token dummy pass took 28.2 ms, a 5-token one 25.7 ms and
        a real decode step 25 ms; clamping every cost at 1.0 instead priced a 4-chain and
        an 8-node tree alike at 1.00 and the fit drafted the tree, whose real steps cost
        1.8x vanilla's (the chain's 1.3x)."""

        def suffix_min(row: Mapping[int, float], floor: float) -> dict[int, float]:
            out: dict[int, float] = {}
            low = float("inf")
            for n in sorted(row, reverse=True):
                low = min(low, row[n])
                out[n] = max(floor, low)
            return dict(sorted(out.items()))

        # per batch size, the cheapest pass with drafts relative to the vanilla step
        scale = {b: min(1.0, *self.tree.get(b, {}).values(), *self.chain.get(b, {}).values())
                 for b in self.vanilla_s}

        def rescaled(table: Mapping[int, Mapping[int, float]], floor: float):
            return {b: suffix_min({n: c / scale.get(b, 1.0) for n, c in r.items()}, floor)
                    for b, r in table.items()}

        return dataclasses.replace(
            self,
            vanilla_s={b: s * scale[b] for b, s in self.vanilla_s.items()},
            tree=rescaled(self.tree, 1.0),
            chain=rescaled(self.chain, 1.0),
            draft=rescaled(self.draft, 0.0))

    def merged(self, other: CostCurves) -> CostCurves:
        """These curves with ``other``'s batch sizes added (``other`` wins where both
        hold a batch size): an engine that runs larger batches than a cached curve covers
        times only the missing ones and keeps the rest."""
        def join(a: Mapping[int, dict[int, float]], b: Mapping[int, dict[int, float]]):
            return {**{k: v for k, v in a.items() if k not in other.vanilla_s}, **b}

        return CostCurves(
            vanilla_s={**self.vanilla_s, **other.vanilla_s},
            tree=join(self.tree, other.tree), chain=join(self.chain, other.chain),
            draft=join(self.draft, other.draft), context=other.context,
            seconds=self.seconds + other.seconds, complete=self.complete and other.complete,
            noise=max(self.noise, other.noise))

    def describe(self) -> str:
        """Compact text of the curves, e.g. ``b1: tree 2:1.05 4:1.08 | chain 1:1.01``."""
        parts = []
        for b in self.batch_sizes:
            tree = " ".join(f"{n}:{c:.2f}" for n, c in self.tree.get(b, {}).items())
            chain = " ".join(f"{d}:{c:.2f}" for d, c in self.chain.get(b, {}).items())
            parts.append(f"b{b} ({self.vanilla_s[b] * 1e3:.1f} ms): tree {tree} | chain {chain}")
        return "; ".join(parts)


def cache_path(key: CostCurveKey, root: Path | None = None) -> Path:
    """The cache file of ``key``: ``<root or cache_root()>/cost_curves/<digest>.json``."""
    return (root if root is not None else cache_root()) / CURVE_DIR / f"{key.digest()}.json"


def read_cached(key: CostCurveKey, root: Path | None = None) -> CostCurves | None:
    """The curves cached for ``key``, or ``None`` when there are none usable (no file,
    unreadable JSON, another key stored under the same name, or no measured points)."""
    path = cache_path(key, root)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != key.to_dict():
            return None
        curves = CostCurves.from_dict(data["curves"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return curves if curves.batch_sizes else None


def write_cached(key: CostCurveKey, curves: CostCurves, root: Path | None = None) -> Path:
    """Cache ``curves`` for ``key`` (atomically: a concurrent reader sees the old file
    or the new one, never half of one). Returns the file."""
    path = cache_path(key, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key.to_dict(), "curves": curves.to_dict()}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass(frozen=True)
class MeasurementPoint:
    """One timed shape: ``batch_size`` requests with ``size`` drafted nodes each
    (``kind`` "vanilla": size 0; "chain": a top-1 chain of depth ``size``; "tree": the
    first ``size`` BFS nodes of a wide tree; "draft": the heads drafting to depth ``size``)."""

    batch_size: int
    kind: str
    size: int

    @property
    def tokens(self) -> int:
        """Query tokens of the forward pass (draft points run no backbone pass)."""
        return self.batch_size * (self.size + 1) if self.kind != "draft" else 0


def measurement_points(
    num_heads: int,
    max_nodes: int,
    *,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    tree_sizes: Iterable[int] = DEFAULT_TREE_SIZES,
    token_budget: int = 256,
    max_num_seqs: int | None = None,
    max_num_tokens: int | None = None,
) -> list[MeasurementPoint]:
    """The points a start-up measurement times, batch size by batch size.

    Per batch size ``b`` (at most ``max_num_seqs``, and ``max_num_seqs`` itself when it
    lies below the largest of ``batch_sizes``): vanilla, top-1 chains of depth
    1..``num_heads`` and trees of each of ``tree_sizes`` (at most ``max_nodes``)
    whose forward pass has at most ``token_budget`` query tokens (and at most
    ``max_num_tokens``, the engine's per-step limit; a point that needs more is
    skipped: there the fit extrapolates the curve's last slope, verification being
    compute-bound by then), and the heads drafting to each depth. A batch size whose
    vanilla step alone exceeds the limits is skipped whole.
    """
    if num_heads < 1 or max_nodes < 1:
        raise ValueError(f"measurement_points: need num_heads >= 1 and max_nodes >= 1, "
                         f"found {num_heads} and {max_nodes}")
    cap = token_budget if max_num_tokens is None else min(token_budget, max_num_tokens)
    points: list[MeasurementPoint] = []
    sizes = {int(x) for x in batch_sizes}
    if max_num_seqs is not None and 1 <= max_num_seqs < max(sizes):
        sizes.add(int(max_num_seqs))  # the engine's largest batch is timed, not extrapolated
    for b in sorted(sizes):
        if b < 1 or (max_num_seqs is not None and b > max_num_seqs):
            continue
        if max_num_tokens is not None and b > max_num_tokens:
            continue
        points.append(MeasurementPoint(b, "vanilla", 0))
        for d in range(1, min(num_heads, max_nodes) + 1):
            if b * (d + 1) <= cap or d == 1:
                points.append(MeasurementPoint(b, "chain", d))
        for n in sorted({int(x) for x in tree_sizes}):
            if 2 <= n <= max_nodes and b * (n + 1) <= cap:
                points.append(MeasurementPoint(b, "tree", n))
        points.extend(MeasurementPoint(b, "draft", d) for d in range(1, num_heads + 1))
    # a chain of depth 1 is always timed (the cheapest speculation there is), unless
    # it exceeds the engine's own per-step limit
    if max_num_tokens is not None:
        points = [p for p in points if p.tokens <= max_num_tokens]
    return points
