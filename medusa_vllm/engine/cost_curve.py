"""``tree: "auto"`` fitted where it runs: the cost curve timed inside the engine at start-up.

After the worker has loaded the model and allocated the KV cache
(``compile_or_warm_up_model``), :func:`fit_tree_at_startup`

1. looks the curve up in the cache (:func:`medusa_vllm.core.cost_curve.read_cached`,
   keyed by CPU model, ISA, dtype, threads, TP size, backbone, heads shape, vLLM
   version and tree-attention kernel; ``cost_curve="remeasure"`` skips the lookup);
2. else times real engine steps (:func:`measure_cost_curves`): vLLM's own
   ``_dummy_run`` with ``b`` requests of ``1 + n`` query tokens each over a
   ``context``-token prefix, the tree published to the attention backend exactly as
   a verification step publishes it (tree rows through the tree kernel, chains
   through vLLM's causal kernel), then the logits of every row and their argmax, as
   the verifier reads them; and the heads drafting to each depth. Batch sizes 1, 4,
   16, 64 (up to ``max_num_seqs``), at most :data:`TOKEN_BUDGET` query tokens per
   forward pass, the minimum of up to :data:`REPEATS` rounds (small passes run once
   untimed first), within :data:`MAX_SECONDS`, made monotone in size (noise only adds
   time); then caches it, unless the rounds lay more than :data:`NOISE_LIMIT` apart (a
   busy machine's curve steers this engine only; ``$MEDUSA_VLLM_COST_CURVE_NOISE_LIMIT``
   overrides the limit). A cached curve that lacks some of this engine's batch sizes
   gets those timed and added;
3. fits the tree and its size per batch size
   (:func:`medusa_vllm.core.tree_fit.fit_engine_tree`) from that curve and the
   heads' shipped acceptance statistics, logs one INFO line saying what it picked
   and why, and switches the proposer and the runner to it before the first step.

Tensor parallelism: every rank runs the same forward passes (they hold collectives);
rank 0 alone reads the cache, times, writes the cache and fits, and broadcasts each
decision (cache hit or not, the curve, the fit) to the other ranks, so all ranks
adopt the same tree.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medusa_vllm.core.cost_curve import (
    CostCurveKey,
    CostCurves,
    MeasurementPoint,
    cache_path,
    measurement_points,
    read_cached,
    write_cached,
)
from medusa_vllm.core.hydra import HydraHeads
from medusa_vllm.core.online_fit import OnlineNodeFit
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import EngineTreeFit, fit_engine_tree, read_per_rank_accuracy
from medusa_vllm.engine.hydra_draft import draft_tree
from medusa_vllm.engine.options import ADDITIONAL_CONFIG_KEY, MedusaConfigError, MedusaTreeConfig
from medusa_vllm.engine.tree_plan import TreeBatch
from medusa_vllm.engine.verifier import target_argmax

if TYPE_CHECKING:
    from medusa_vllm.engine.runner import MedusaTreeRunnerMixin

__all__ = [
    "CONTEXT_TOKENS",
    "MAX_SECONDS",
    "MAX_SECONDS_ENV",
    "NOISE_LIMIT",
    "NOISE_LIMIT_ENV",
    "REPEATS",
    "TOKEN_BUDGET",
    "WARMUP_TOKENS",
    "curve_key",
    "fit_tree_at_startup",
    "max_seconds",
    "measure_cost_curves",
    "noise_limit",
]

logger = logging.getLogger("vllm.plugins.medusa_vllm")

TOKEN_BUDGET = 128  # query tokens per timed forward pass; beyond, the fit extrapolates
WARMUP_TOKENS = 64  # passes up to this size get one untimed run first (oneDNN primitives)
CONTEXT_TOKENS = 256  # prefix tokens per request while timing (a chat turn's worth)
REPEATS = 4  # timed rounds (after the untimed one) while time remains; a point keeps its minimum
MAX_SECONDS = 20.0  # measurement wall-clock bound (a busy machine gets a coarser curve)
NOISE_LIMIT = 0.15  # rounds further apart than this (CostCurves.noise): used, never cached
NOISE_LIMIT_ENV = "MEDUSA_VLLM_COST_CURVE_NOISE_LIMIT"  # overrides NOISE_LIMIT (e.g. "0.3")
MAX_SECONDS_ENV = "MEDUSA_VLLM_COST_CURVE_MAX_SECONDS"  # overrides MAX_SECONDS (e.g. "60")


def _env_number(name: str, default: float, example: str) -> float:
    """The number >= 0 in ``$name``, else ``default``; anything else is refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0:  # also refuses nan
        raise MedusaConfigError(f"{name}={raw!r}: expected a number >= 0 ({example}); unset it "
                                f"for the default {default}")
    return value


def noise_limit() -> float:
    """How far apart a curve's rounds may lie and still be cached: the fraction in
    ``$MEDUSA_VLLM_COST_CURVE_NOISE_LIMIT`` (for a machine that is never quiet, e.g. a
    shared CI runner), else :data:`NOISE_LIMIT`."""
    return _env_number(NOISE_LIMIT_ENV, NOISE_LIMIT,
                       "e.g. 0.3 caches curves whose rounds lie up to 30 % apart")


def max_seconds() -> float:
    """The measurement's wall-clock bound: ``$MEDUSA_VLLM_COST_CURVE_MAX_SECONDS`` (for a
    machine where one batch size takes longer, e.g. TP over processes on a slow host),
    else :data:`MAX_SECONDS`."""
    return _env_number(MAX_SECONDS_ENV, MAX_SECONDS, "seconds, e.g. 60")


def _tp_group() -> Any:
    """vLLM's tensor-parallel group, or ``None`` outside a multi-rank group."""
    try:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except (AssertionError, ImportError, RuntimeError):
        return None
    return group if getattr(group, "world_size", 1) > 1 else None


def _broadcast(group: Any, obj: Any) -> Any:
    """``obj`` from rank 0 on every rank (the identity without a TP group)."""
    return obj if group is None else group.broadcast_object(obj, src=0)


def curve_key(runner: MedusaTreeRunnerMixin) -> CostCurveKey:
    """What the curve measured in ``runner``'s engine is valid for."""
    import vllm

    from medusa_vllm.engine.cpu.machine import machine_info
    from medusa_vllm.engine.cpu.tree_kernel import kernel_enabled

    vc = runner.vllm_config
    info = machine_info()
    heads = runner.drafter.heads
    hc = getattr(heads, "config", None)
    shape = "unknown"
    if hc is not None:
        vocab = getattr(hc, "truncated_vocab_size", None) or getattr(hc, "vocab_size", "?")
        shape = (f"{hc.num_heads}x{getattr(hc, 'num_layers', '?')} hidden {hc.hidden_size} "
                 f"vocab {vocab} {type(heads).__name__}")
    return CostCurveKey(
        cpu_model=info.cpu_model,
        isa=info.isa,
        dtype=str(vc.model_config.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        tensor_parallel=vc.parallel_config.tensor_parallel_size,
        model=str(vc.model_config.model),
        heads=shape,
        vllm=getattr(vllm, "__version__", "unknown"),
        kernel="fused" if kernel_enabled() else "torch",
    )


def _wide_tree(num_nodes: int) -> MedusaTree:
    """A tree of ``num_nodes`` nodes that is no chain past its first node (the BFS
    prefix of ``sparse-64``): its rows take the tree-attention path, whose cost depends
    on the node count, not on the shape."""
    return MedusaTree.load("sparse-64", 5).truncate(num_nodes)


class _StepTimer:
    """Times engine steps of given shapes on ``runner`` (its ``_dummy_run``)."""

    def __init__(self, runner: MedusaTreeRunnerMixin, context: int) -> None:
        self.runner = runner
        self.context = context
        self.heads = runner.drafter.heads
        hidden = runner.model_config.get_hidden_size()
        self.hidden = torch.randn(64, hidden, generator=torch.Generator().manual_seed(0)).to(
            device=runner.device, dtype=runner.model_config.dtype)

    def forward(self, b: int, tree: MedusaTree | None) -> float:
        """Seconds of one step: ``b`` requests of ``1 + nodes`` query tokens, then the
        logits of every row and their argmax."""
        from vllm.config import CUDAGraphMode

        r = self.runner
        t = 1 + (tree.num_nodes if tree is not None else 0)
        saved = r.uniform_decode_query_len
        r.uniform_decode_query_len = t  # _dummy_run's uniform batch: b requests of t tokens
        if tree is not None:
            r._tree_batch = TreeBatch(
                query_start=torch.arange(b, dtype=torch.long) * t,
                num_tokens=torch.full((b,), t, dtype=torch.long),
                prefix_lens=torch.full((b,), self.context, dtype=torch.long),
                tree_mask=tree.tree_mask,
                req_indices=torch.arange(b, dtype=torch.long),
            )
        try:
            start = time.perf_counter()
            hidden, _ = r._dummy_run(b * t, cudagraph_runtime_mode=CUDAGraphMode.NONE,
                                     force_attention=True, uniform_decode=True,
                                     profile_seq_lens=self.context + t)
            logits = r.model.compute_logits(hidden[: b * t])
            if logits is not None:
                target_argmax(logits)
            return time.perf_counter() - start
        finally:
            r.uniform_decode_query_len = saved
            r._tree_batch = None

    def draft(self, b: int, depth: int) -> float:
        """Seconds of the heads drafting ``depth`` levels for ``b`` requests."""
        h = self.hidden[:b] if b <= self.hidden.shape[0] else self.hidden[:1].expand(b, -1)
        if isinstance(self.heads, HydraHeads):
            # Hydra drafts depth by depth, one head call per parent: timed on the top-1
            # chain (one parent row per request and depth), as a chain of ``depth``
            # prices it; wider trees add parent rows to the same ``depth`` calls
            chain = MedusaTree.chain(depth)
            roots = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            start = time.perf_counter()
            draft_tree(self.heads, h, roots, chain)
            return time.perf_counter() - start
        start = time.perf_counter()
        self.heads.topk(h, 1, depth)
        return time.perf_counter() - start


@torch.inference_mode()
def measure_cost_curves(runner: MedusaTreeRunnerMixin, points: list[MeasurementPoint], *,
                        context: int = CONTEXT_TOKENS, repeats: int = REPEATS,
                        max_seconds: float = MAX_SECONDS, group: Any = None) -> CostCurves:
    """Time ``points`` on ``runner`` (see module doc): the minimum of up to ``repeats``
    rounds per point (small passes run once untimed first), each relative to its
    batch size's vanilla step, made monotone (:meth:`CostCurves.monotone`), with the
    rounds' spread in ``noise``. Points run smallest pass first; once ``max_seconds``
    have gone, a point already timed is not timed again and one never timed is
    dropped (the fit extrapolates the curve there). On every TP rank alike (the
    passes hold collectives): rank 0 decides, for each point, whether it runs."""
    start = time.perf_counter()
    timer = _StepTimer(runner, context)
    trees: dict[tuple[str, int], MedusaTree] = {}
    for p in points:
        if p.kind == "chain":
            trees[p.kind, p.size] = MedusaTree.chain(p.size)
        elif p.kind == "tree":
            trees[p.kind, p.size] = _wide_tree(p.size)
    # batch size by batch size (a late stop drops the largest ones), vanilla first, then
    # the heads and the passes by size
    rank = {"vanilla": 0, "draft": 1}
    order = sorted(points, key=lambda p: (p.batch_size, rank.get(p.kind, 2), p.tokens))
    timed: dict[MeasurementPoint, list[float]] = {}

    def run(p: MeasurementPoint) -> float:
        if p.kind == "draft":
            return timer.draft(p.batch_size, p.size)
        return timer.forward(p.batch_size, trees.get((p.kind, p.size)))

    for rnd in range(repeats):
        for p in order:
            late = time.perf_counter() - start > max_seconds
            # late: nothing more is timed, except what the batch size of a point timed
            # already needs for a ratio (its vanilla step)
            if _broadcast(group, late and (p in timed or p.kind != "vanilla"
                                           or p.batch_size not in {q.batch_size for q in timed})):
                continue
            if rnd == 0 and p.tokens <= WARMUP_TOKENS:
                run(p)  # untimed: first-use costs (oneDNN primitives); large passes need none
            timed.setdefault(p, []).append(run(p))
    best = {p: min(ts) for p, ts in timed.items()}
    spreads = [float(np.median(ts)) / max(min(ts), 1e-12) - 1.0
               for p, ts in timed.items() if len(ts) > 1 and p.kind != "draft"]
    curves = CostCurves(context=context, noise=float(np.median(spreads)) if spreads else 0.0)
    for p, s in best.items():
        if p.kind == "vanilla":
            curves.vanilla_s[p.batch_size] = s
    for p, s in best.items():
        if p.kind == "vanilla" or p.batch_size not in curves.vanilla_s:
            continue
        table = getattr(curves, p.kind)
        table.setdefault(p.batch_size, {})[p.size] = s / curves.vanilla_s[p.batch_size]
    curves.seconds = time.perf_counter() - start
    curves.complete = len(best) == len(points)
    return curves.monotone()


def _fit(cfg: MedusaTreeConfig, curves: CostCurves, num_heads: int) -> tuple[EngineTreeFit, str]:
    stats = read_per_rank_accuracy(cfg.heads)
    if stats is None:
        raise MedusaConfigError(f"heads: {cfg.heads} lost its acceptance statistics "
                                "(per_rank_accuracy) after the engine was configured")
    per_rank, source = stats
    assert cfg.fit_max_nodes is not None
    fit = fit_engine_tree(per_rank, curves, cfg.fit_max_nodes, num_heads=num_heads,
                          ngram_nodes=cfg.lookup_depth())
    return fit, source


def fit_tree_at_startup(runner: MedusaTreeRunnerMixin) -> EngineTreeFit | None:
    """Fit ``tree: "auto"`` to this engine (module doc) and switch to it; ``None``
    (nothing fitted) unless the plugin asked for a start-up fit (``fit_max_nodes``).
    What was fitted, and from which curve, is left in ``runner.medusa_startup_fit``."""
    cfg: MedusaTreeConfig = runner.medusa_config
    if cfg.fit_max_nodes is None:
        return None
    spec = getattr(runner, "speculative_config", None)
    if spec is not None and getattr(spec, "num_speculative_tokens_per_batch_size", 0) is None:
        # vLLM dropped the plugin's no-op schedule (it does under data parallelism): its
        # scheduler may then pad decodes to num_speculative_tokens drafts, more than a
        # fitted tree has, and the verifier would refuse that step mid-serving
        raise MedusaConfigError(
            "medusa_tree: tree='auto' needs vLLM's num_speculative_tokens_per_batch_size, "
            "which this engine disabled (data parallelism?); pass an explicit tree (e.g. "
            "tree='sparse-16' or the medusa_choices the log of a single-replica run shows)")
    limit = noise_limit()  # a bad value refuses before anything is timed
    budget = max_seconds()
    group = _tp_group()
    rank0 = group is None or group.rank_in_group == 0
    start = time.perf_counter()
    key = curve_key(runner)
    num_heads = runner.drafter.heads.config.num_heads
    points = measurement_points(num_heads, cfg.fit_max_nodes, token_budget=TOKEN_BUDGET,
                                max_num_seqs=runner.scheduler_config.max_num_seqs,
                                max_num_tokens=runner.max_num_tokens)
    planned = sorted({p.batch_size for p in points})
    cached = None
    if rank0 and cfg.cost_curve != "remeasure":
        hit = read_cached(key)
        if hit is not None:
            cached = hit.to_dict()
    cached = _broadcast(group, cached)
    # a curve cached by an engine with a smaller max_num_seqs lacks batch sizes this one
    # runs: only those are timed, and the wider curve is cached
    known = CostCurves.from_dict(cached) if cached is not None else None
    missing = [p for p in points if known is None or p.batch_size not in known.batch_sizes]
    if known is not None and not missing:
        curves = known
        origin = f"cached in {cache_path(key)}"
    else:
        if rank0:
            sizes = sorted({p.batch_size for p in missing})
            logger.info("medusa_tree: tree='auto': timing %d engine step shapes (batch sizes "
                        "%s) on %s for the cost curve (at most %.0f s; cached afterwards)",
                        len(missing), sizes, key.describe(), budget)
        measured = measure_cost_curves(runner, missing, max_seconds=budget, group=group)
        curves = CostCurves.from_dict(_broadcast(group, measured.to_dict() if rank0 else None))
        origin = f"measured now in {curves.seconds:.1f} s (rounds {curves.noise:.0%} apart)"
        if known is not None:
            curves = known.merged(curves)
            origin += f", batch sizes {known.batch_sizes} from {cache_path(key)}"
        if not curves.complete:
            origin += (f"; only {len(curves.batch_sizes)} batch size(s) timed within "
                       f"{budget:.0f} s, the machine is busy: not cached")
        elif curves.noise > limit:
            origin += (f"; rounds more than {limit:.0%} apart, the machine is busy: "
                       f"not cached (the next start times it again; {NOISE_LIMIT_ENV} "
                       "raises the limit)")
        elif rank0:
            try:
                origin += f", cached in {write_cached(key, curves)}"
            except OSError as exc:
                origin += f" (not cached: {exc})"
    result: Any = None
    if rank0:
        try:
            fit, source = _fit(cfg, curves, runner.drafter.heads.config.num_heads)
            result = {"tree": fit.heads_tree.to_list(), "nodes_by_batch": fit.nodes_by_batch,
                      "describe": fit.describe(), "source": source,
                      "node_prior": fit.node_prior,
                      "lookup_nodes_by_batch": fit.lookup_nodes_by_batch,
                      "lookup_prior": fit.lookup_prior}
        except (ValueError, MedusaConfigError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
    result = _broadcast(group, result)
    if "error" in result:  # e.g. a machine so busy that nothing but vanilla got timed
        if rank0:
            logger.warning(
                "medusa_tree: tree='auto' could not be fitted on %s (%s; curve %s); using "
                "the fallback tree %s, fitted elsewhere: its speed here is unknown. Restart "
                "with MEDUSA_VLLM_COST_CURVE=remeasure on a quieter machine",
                key.describe(), result["error"], origin, cfg.tree)
        update = {"fit_max_nodes": None}
        runner.vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = cfg.model_copy(
            update=update).to_dict()
        runner.reload_medusa_config()
        return None
    update: dict[str, Any] = {"tree": result["tree"], "fit_max_nodes": None}
    unmeasured = [b for b in planned if b not in curves.batch_sizes]
    for table in (result["nodes_by_batch"], result.get("lookup_nodes_by_batch")):
        if table is not None and unmeasured:
            # past the largest batch size timed (the time bound cut the curve short), the
            # fit knows nothing: nothing is drafted from the next planned size on (between
            # the two, nodes_for_batch keeps the tokens per step of the last measured one)
            table[unmeasured[0]] = 0
    if unmeasured:
        origin += f"; batch size {unmeasured[0]} and up were not timed: no drafts there"
    if cfg.nodes_by_batch == "auto":  # an explicit table (or "off") is the user's: kept
        update["nodes_by_batch"] = {int(b): int(n) for b, n in result["nodes_by_batch"].items()}
    # what was fitted and from what, for probes (`medusa-vllm calibrate` reads it back)
    runner.medusa_startup_fit = {"key": key.to_dict(), "curves": curves.to_dict(),
                                 "origin": origin, **result}
    fitted = cfg.model_copy(update=update)
    extra = runner.vllm_config.additional_config
    extra[ADDITIONAL_CONFIG_KEY] = fitted.to_dict()
    runner.reload_medusa_config()
    online = ""
    drafter = runner.drafter
    lookup_table = result.get("lookup_nodes_by_batch")
    if cfg.nodes_by_batch == "auto" and lookup_table is not None:
        lookup_table = {int(b): int(n) for b, n in lookup_table.items()}
        drafter.lookup_nodes_by_batch = lookup_table
    if cfg.nodes_by_batch == "auto" and cfg.online_fit:
        drafter.online_fit = OnlineNodeFit(
            paths=drafter.tree.medusa_choices, prior=np.asarray(result["node_prior"]),
            curves=curves, table=update["nodes_by_batch"])
        if lookup_table is not None:  # requests with a lookup continuation: their own counts
            drafter.lookup_fit = OnlineNodeFit(
                paths=drafter.tree.medusa_choices, prior=np.asarray(result["lookup_prior"]),
                curves=curves, table=lookup_table)
        online = "; refitted while serving from the acceptance observed (online_fit)"
    if rank0:
        logger.info(
            "medusa_tree: tree='auto' fitted on %s (curve %s; vanilla step and relative costs "
            "per batch size: %s; heads' acceptance from %s): %s%s; start-up fit took %.1f s",
            key.describe(), origin, curves.describe(), result["source"], result["describe"],
            online, time.perf_counter() - start)
    return EngineTreeFit(
        heads_tree=MedusaTree(result["tree"]), tree=runner.drafter.tree,
        nodes_by_batch={int(b): int(n) for b, n in result["nodes_by_batch"].items()},
        ngram_nodes=cfg.lookup_depth(), lookup_nodes_by_batch=lookup_table)
