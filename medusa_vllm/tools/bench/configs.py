"""The benchmark's configurations: one table, name -> how to build its engines.

A :class:`BenchConfig` is one thing a user could run (vanilla vLLM, vLLM's
chain Medusa, vLLM's prompt lookup, ours, ...). Its ``variants`` function turns
the run's :class:`BenchContext` into one or more :class:`Variant` (a sweep:
vLLM's Medusa over ``num_speculative_tokens`` 1..K, prompt lookup over a few
settings); each variant is one engine (one ``speculative_config``), and each
engine serves every concurrency level and every :class:`Mode` the config
lists. The best variant of a sweep is picked afterwards
(:mod:`medusa_vllm.tools.bench.report`); every variant's records are kept.

Adding a configuration is one entry in :data:`CONFIGS` (or ``--add-config
NAME=JSON`` on the command line, :func:`config_from_json`). Engine options of
ours arrive through :func:`ours`, e.g. ``ours(ctx, tree="beam:4")``.

A configuration whose engine cannot run here (``available`` returns a reason,
e.g. vLLM's suffix decoding without the ``arctic_inference`` package) is
recorded as unavailable with that reason, never silently dropped.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONFIGS",
    "MODES",
    "BenchConfig",
    "BenchContext",
    "Mode",
    "Variant",
    "config_from_json",
    "cost_curve_config",
    "ours",
    "reference_mode",
    "suffix_unavailable",
]

FAMILIES = ("vanilla", "vllm", "ours", "cost")  # "vllm" = vLLM's own speculators


@dataclass(frozen=True)
class Mode:
    """How the requests of one measurement are sampled."""

    name: str
    sampling: bool  # False: temperature 0
    extra_args: Mapping[str, Any] = field(default_factory=dict)  # SamplingParams.extra_args

    def sampling_params(self, temperature: float, max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
        p: dict[str, Any] = {"temperature": temperature if self.sampling else 0.0,
                                 "max_tokens": max_tokens, "ignore_eos": ignore_eos}
        if self.extra_args:
            p["extra_args"] = dict(self.extra_args)
        return p


MODES: dict[str, Mode] = {
    "greedy": Mode("greedy", sampling=False),
    # vanilla sampling, and vLLM's speculators' own (lossless) rejection sampling
    "sample": Mode("sample", sampling=True),
    # ours: per-request acceptance rule (SamplingParams.extra_args, medusa_vllm.engine.request)
    "typical": Mode("typical", sampling=True, extra_args={"medusa_acceptance": "typical"}),
    "rejection": Mode("rejection", sampling=True, extra_args={"medusa_acceptance": "rejection"}),
}


def reference_mode(mode: str) -> str:
    """The vanilla mode a mode's speedup is taken against: greedy against greedy,
    every sampling mode against vanilla sampling at the same temperature."""
    return "greedy" if not MODES[mode].sampling else "sample"


@dataclass
class BenchContext:
    """What the variant builders need: the run's model, heads and sweep settings."""

    model: str
    heads: str
    num_heads: int
    tree: str = "auto"
    vllm_heads: str = ""  # the Medusa heads converted to vLLM's Medusa layout (when needed)
    # plain Medusa heads for what needs independent depths (vLLM's Medusa, beam trees):
    # ``heads`` themselves unless they are Hydra heads; "" = none
    medusa_heads: str = ""
    medusa_num_heads: int = 0
    medusa_ks: Sequence[int] = ()  # vLLM Medusa's num_speculative_tokens sweep (default 1..K)
    # vLLM prompt lookup sweep: (num_speculative_tokens, prompt_lookup_max)
    ngram_settings: Sequence[tuple[int, int]] = ((2, 3), (2, 5), (4, 3), (4, 5))
    ngram_min: int = 2
    ngram_nodes: int = 4  # how deep prompt lookup goes on our tree's top-1 chain (vLLM's k=4)
    cost_sizes: Sequence[int] = ()
    beam_widths: Sequence[int] = (2, 5)  # medusa_tree_beam's sweep


@dataclass(frozen=True)
class Variant:
    """One engine of a configuration: a label (``""`` if the config has one
    engine) and the ``speculative_config`` (``None``: vanilla)."""

    label: str
    speculative_config: Mapping[str, Any] | None


@dataclass(frozen=True)
class BenchConfig:
    name: str
    family: str  # one of FAMILIES
    modes: tuple[str, ...]
    variants: Callable[[BenchContext], list[Variant]]
    description: str = ""
    # None: runs here; else the reason it cannot (recorded, not skipped silently)
    available: Callable[[], str | None] = lambda: None
    needs_vllm_heads: bool = False  # the heads must be converted to vLLM's layout first
    needs_medusa_heads: bool = False  # needs plain Medusa heads (ctx.medusa_heads)
    offline_only: bool = False  # cost-curve entries: offline, concurrency 1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"bench config {self.name}: family {self.family!r} not in {FAMILIES}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"bench config {self.name}: unknown modes {bad}; known: {sorted(MODES)}")


def ours(ctx: BenchContext, **options: Any) -> dict[str, Any]:
    """``speculative_config`` of ``medusa_tree`` with the run's heads and tree,
    plus engine ``options`` (``ngram_nodes``, ``nodes_by_batch``, ``tree``, ...)."""
    return {"method": "medusa_tree", "model": ctx.heads, "tree": ctx.tree} | options


def suffix_unavailable() -> str | None:
    """Why vLLM's ``method: "suffix"`` cannot run here, or ``None``."""
    if importlib.util.find_spec("arctic_inference") is None:
        return ("vLLM 0.32 suffix decoding needs the arctic_inference package (vLLM asks for "
                "arctic-inference==0.1.1); not installed here. PyPI has only a source "
                "distribution, built with CMake/nanobind against torch 2.10 (this venv: torch "
                "2.13), and it installs a vllm.general_plugins entry point that patches vLLM "
                "(written for vLLM 0.18) in every engine; install it yourself to bench suffix "
                "decoding")
    return None


def _vanilla(ctx: BenchContext) -> list[Variant]:
    return [Variant("", None)]


def _vllm_medusa(ctx: BenchContext) -> list[Variant]:
    ks = list(ctx.medusa_ks) or list(range(1, ctx.medusa_num_heads + 1))
    bad = [k for k in ks if not 1 <= k <= ctx.medusa_num_heads]
    if bad:
        raise ValueError(f"bench: vLLM Medusa num_speculative_tokens {bad} outside "
                         f"1..{ctx.medusa_num_heads} (the Medusa heads' count)")
    return [Variant(f"k={k}", {"method": "medusa", "model": ctx.vllm_heads, "num_speculative_tokens": k})
            for k in ks]


def _vllm_ngram(ctx: BenchContext) -> list[Variant]:
    return [Variant(f"k={k},max={mx}", {"method": "ngram", "num_speculative_tokens": k,
                                       "prompt_lookup_min": min(ctx.ngram_min, mx),
                                       "prompt_lookup_max": mx})
            for k, mx in ctx.ngram_settings]


def _vllm_suffix(ctx: BenchContext) -> list[Variant]:
    # vLLM's defaults: drafts up to suffix_decoding_max_tree_depth (24) tokens, chosen per step
    return [Variant("", {"method": "suffix"})]


def _ours(ctx: BenchContext) -> list[Variant]:
    return [Variant("", ours(ctx))]


def _ours_ngram(ctx: BenchContext) -> list[Variant]:
    # tree auto: the start-up fit sizes requests with and without a lookup continuation
    # per batch size (then refits both from what is accepted); an explicit tree drafts
    # the whole tree (a calibrated table was fitted without prompt lookup)
    table = {} if ctx.tree == "auto" else {"nodes_by_batch": "off"}
    depth = min(ctx.ngram_nodes, ctx.num_heads)  # a tree is at most as deep as the heads
    return [Variant(f"ngram_nodes={depth}",
                    ours(ctx, ngram_nodes=depth, ngram_min=ctx.ngram_min, **table))]


def _ours_adaptive(ctx: BenchContext) -> list[Variant]:
    return [Variant("", ours(ctx, adaptive=True))]


def _ours_beam(ctx: BenchContext) -> list[Variant]:
    # beam paths need independent depths: the plain Medusa heads
    return [Variant(f"W={w}", ours(ctx, model=ctx.medusa_heads, tree=f"beam:{w}"))
            for w in ctx.beam_widths]


def cost_curve_config(n: int) -> BenchConfig:
    """``tree-N``: the first ``n`` BFS nodes of ``sparse-64`` (``chain-1`` for 1),
    the whole tree every step, greedy, offline at concurrency 1: its step cost
    against vanilla's (the verification cost curve)."""
    tree = "chain-1" if n == 1 else f"sparse-{n}"
    return BenchConfig(
        name=f"tree-{n}", family="cost", modes=("greedy",), offline_only=True,
        variants=lambda ctx: [Variant("", ours(ctx, tree=tree, nodes_by_batch="off"))],
        description=f"ours, {tree}, whole tree every step (cost curve)")


CONFIGS: dict[str, BenchConfig] = {c.name: c for c in [
    BenchConfig("vanilla", "vanilla", ("greedy", "sample"), _vanilla, "vLLM, no speculation"),
    BenchConfig("vllm_medusa", "vllm", ("greedy", "sample"), _vllm_medusa,
                "vLLM's built-in chain Medusa (method medusa), the Medusa heads in vLLM's layout",
                needs_vllm_heads=True, needs_medusa_heads=True),
    BenchConfig("vllm_ngram", "vllm", ("greedy", "sample"), _vllm_ngram,
                "vLLM's prompt lookup (method ngram)"),
    BenchConfig("vllm_suffix", "vllm", ("greedy", "sample"), _vllm_suffix,
                "vLLM's suffix decoding (method suffix)", available=suffix_unavailable),
    BenchConfig("medusa_tree", "ours", ("greedy", "typical", "rejection"), _ours,
                "ours: Medusa tree; greedy at temperature 0, typical and rejection sampling "
                "per request (extra_args medusa_acceptance)"),
    BenchConfig("medusa_tree_ngram", "ours", ("greedy",), _ours_ngram,
                "ours with prompt lookup on the tree's top-1 chain"),
    BenchConfig("medusa_tree_adaptive", "ours", ("greedy",), _ours_adaptive,
                "ours with adaptive head selection (per-request drafting depth)"),
    BenchConfig("medusa_tree_beam", "ours", ("greedy",), _ours_beam,
                "ours with beam drafts (tree beam:W: the W best paths of a beam search over the "
                "Medusa heads)", needs_medusa_heads=True),
]}

DEFAULT_CONFIGS = ("vanilla", "vllm_medusa", "vllm_ngram", "vllm_suffix", "medusa_tree",
                   "medusa_tree_ngram", "medusa_tree_adaptive")


def config_from_json(spec: str) -> BenchConfig:
    """``NAME=JSON`` (``--add-config``): a configuration with one engine whose
    ``speculative_config`` is the JSON object; ``"bench_modes"`` in it (popped)
    lists its modes (default ``["greedy"]``). ``method: medusa_tree`` counts as
    ours, any other method as one of vLLM's speculators; ``"model"`` defaults to
    the run's heads for medusa_tree."""
    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--add-config {spec!r}: expected NAME=JSON, e.g. "
                         "'beam4={\"method\": \"medusa_tree\", \"tree\": \"beam:4\"}'")
    try:
        sc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--add-config {name}: not JSON ({exc}): {text!r}") from None
    if not isinstance(sc, dict) or "method" not in sc:
        raise ValueError(f"--add-config {name}: expected a JSON object with a 'method' key, found {text!r}")
    modes = tuple(sc.pop("bench_modes", ["greedy"]))
    is_ours = sc["method"] == "medusa_tree"

    def variants(ctx: BenchContext) -> list[Variant]:
        return [Variant("", ours(ctx, **{k: v for k, v in sc.items() if k != "method"}) if is_ours
                        else dict(sc))]

    return BenchConfig(name, "ours" if is_ours else "vllm", modes, variants, f"--add-config {text}")
