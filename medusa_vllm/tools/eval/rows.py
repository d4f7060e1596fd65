"""Which rows the translation table has and which engine each runs on.

A row is one decoding strategy scored on the test verses (:class:`RowSpec`); an
engine is one vLLM configuration started once in a subprocess
(:class:`EngineSpec`). Rows that differ only in per-request options (sampling
temperature, ``SamplingParams.extra_args`` acceptance overrides, beam search
instead of ``generate``) share an engine, so each configuration pays its start-up
once:

* ``vanilla``: vanilla greedy (the reference: RTF 1.0, the losslessness
  baseline) and vanilla sampling at the typical rows' temperature.
* ``chain-k`` for k = 1..K: "Medusa greedy, k heads" = the ``chain-k`` preset, the
  top-1 path of the first k heads (a tree of depth k). The fitted tree shipped with
  the heads is reported as its own row (``auto`` engine), since truncating it to
  depth k does not use k heads when it is shallower than K.
* ``auto``: the heads' own tree (``tree: "auto"``): Medusa greedy, typical
  acceptance at the three (epsilon, delta) settings of :data:`TYPICAL_SETTINGS` and
  lossless rejection sampling, all at :data:`SAMPLING_TEMPERATURE`.
* ``beam-W-K``: "Beam W, Medusa Heads K": ``tree: "beam:W:K"`` (``"beam:W"`` for
  K = all heads), the engine's per-step beam-search tree; greedy verification, so
  these rows must match vanilla greedy as well. Where the engine does not accept
  the spec (:func:`beam_tree_spec`), the rows are kept with the reason they are not
  available.
* ``vllm-beam``: vLLM's own output beam search (``LLM.beam_search``) at widths
  :data:`VLLM_BEAM_WIDTHS`, quality columns; its engine admits every beam of every
  verse at once (``max_num_seqs`` :data:`BEAM_SEARCH_MAX_SEQS`), vLLM's beam search
  being one ``generate`` call per token over all live beams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BEAM_HEADS",
    "BEAM_SEARCH_MAX_SEQS",
    "BEAM_WIDTHS",
    "SAMPLING_TEMPERATURE",
    "TYPICAL_SETTINGS",
    "VLLM_BEAM_WIDTHS",
    "EngineSpec",
    "PlanOptions",
    "RowSpec",
    "beam_tree_spec",
    "build_plan",
]

#: (epsilon = posterior_threshold, delta = posterior_alpha) of the typical rows:
#: strict, the Medusa paper's default, loose.
TYPICAL_SETTINGS: tuple[tuple[float, float], ...] = ((0.01, 0.1), (0.09, 0.3), (0.25, 0.5))
SAMPLING_TEMPERATURE = 0.7
BEAM_WIDTHS: tuple[int, ...] = (2, 5, 10)
BEAM_HEADS: tuple[int | None, ...] = (2, None)  # None: all the heads (K_max)
VLLM_BEAM_WIDTHS: tuple[int, ...] = (2, 5, 10)
BEAM_SEARCH_MAX_SEQS = 256


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM configuration: ``speculative_config`` (``None``: vanilla) and the
    ``max_num_seqs`` it runs with; ``unavailable`` says why it cannot run."""

    key: str
    speculative_config: dict[str, Any] | None
    max_num_seqs: int
    unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RowSpec:
    """One row of the table.

    ``kind``: ``"generate"`` (``LLM.generate`` with ``sampling`` + max_tokens, a
    per-verse ``seed`` when sampling) or ``"beam_search"`` (``LLM.beam_search``,
    ``beam_width``). ``lossless``: must emit vanilla greedy's tokens.
    """

    name: str
    group: str  # vanilla | medusa | typical | sampling | beam_medusa | vllm_beam
    engine: str
    kind: str = "generate"
    sampling: dict[str, Any] = field(default_factory=dict)
    beam_width: int = 0
    lossless: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanOptions:
    """What to run (the ``--quick`` preset trims these lists)."""

    heads: str
    num_heads: int
    batch_size: int = 1
    medusa_heads: Sequence[int] | None = None  # None: 1..K
    typical_settings: Sequence[tuple[float, float]] = TYPICAL_SETTINGS
    temperature: float = SAMPLING_TEMPERATURE
    beam_widths: Sequence[int] = BEAM_WIDTHS
    beam_heads: Sequence[int | None] = BEAM_HEADS
    vllm_beam_widths: Sequence[int] = VLLM_BEAM_WIDTHS
    sampling_rows: bool = True  # vanilla sampling and rejection sampling (references for typical)


def beam_tree_spec(heads: str, width: int, depth: int | None, num_heads: int) -> tuple[str | None, str | None]:
    """``(tree spec, None)`` for "Beam ``width``, Medusa Heads ``depth``" if this
    engine's options accept it, else ``(None, reason)``. Tries ``"beam:W:K"``, and
    for all heads also ``"beam:W"``; "accepts" means :class:`MedusaTreeConfig`
    validates it and builds its tree."""
    from medusa_vllm.engine.options import MedusaConfigError, MedusaTreeConfig

    k = num_heads if depth is None else depth
    if k > num_heads:
        return None, f"{k} heads asked, the heads have {num_heads}"
    candidates = [f"beam:{width}:{k}"] + ([f"beam:{width}"] if k == num_heads else [])
    reason = ""
    for spec in candidates:
        try:
            MedusaTreeConfig.from_dict({"heads": heads, "tree": spec}).load_tree(num_heads)
            return spec, None
        except MedusaConfigError as exc:
            reason = str(exc).splitlines()[0]
    return None, f"the engine does not accept tree {candidates[0]!r} ({reason})"


def _medusa(heads: str, tree: str, **extra: Any) -> dict[str, Any]:
    return {"method": "medusa_tree", "model": heads, "tree": tree, **extra}


def build_plan(opt: PlanOptions) -> tuple[list[EngineSpec], list[RowSpec]]:
    """The engines and rows of one evaluation, in run order (vanilla first)."""
    if opt.num_heads < 1:
        raise ValueError(f"num_heads: expected >= 1, found {opt.num_heads}")
    bs = opt.batch_size
    greedy = {"temperature": 0.0}
    engines = [EngineSpec("vanilla", None, bs)]
    rows = [RowSpec("Vanilla greedy", "vanilla", "vanilla", sampling=greedy)]
    t = opt.temperature
    if opt.sampling_rows:
        rows.append(RowSpec(f"Vanilla sampling T={t:g}", "sampling", "vanilla", sampling={"temperature": t}))
    ks = list(range(1, opt.num_heads + 1)) if opt.medusa_heads is None else list(opt.medusa_heads)
    for k in ks:
        if not 1 <= k <= opt.num_heads:
            raise ValueError(f"Medusa heads {k}: expected 1..{opt.num_heads}")
        engines.append(EngineSpec(f"chain-{k}", _medusa(opt.heads, f"chain-{k}"), bs))
        label = "Single Medusa head" if k == 1 else f"Medusa greedy, {k} heads"
        rows.append(RowSpec(label, "medusa", f"chain-{k}", sampling=greedy, lossless=True,
                            note=f"tree chain-{k}"))
    engines.append(EngineSpec("auto", _medusa(opt.heads, "auto"), bs))
    rows.append(RowSpec("Medusa greedy, fitted tree", "medusa", "auto", sampling=greedy, lossless=True,
                        note="tree auto (the heads' medusa_tree.json)"))
    for eps, delta in opt.typical_settings:
        rows.append(RowSpec(f"Medusa typical eps={eps:g} delta={delta:g} T={t:g}", "typical", "auto",
                            sampling={"temperature": t, "extra_args": {
                                "medusa_acceptance": "typical", "medusa_posterior_threshold": eps,
                                "medusa_posterior_alpha": delta}}))
    if opt.sampling_rows:
        rows.append(RowSpec(f"Medusa rejection sampling T={t:g}", "sampling", "auto",
                            sampling={"temperature": t, "extra_args": {"medusa_acceptance": "rejection"}}))
    for w in opt.beam_widths:
        for depth in opt.beam_heads:
            k = opt.num_heads if depth is None else depth
            if k > opt.num_heads:
                continue
            key = f"beam-{w}-{k}"
            if any(e.key == key for e in engines):
                continue
            spec, reason = beam_tree_spec(opt.heads, w, k, opt.num_heads)
            engines.append(EngineSpec(key, _medusa(opt.heads, spec) if spec else None, bs, unavailable=reason))
            rows.append(RowSpec(f"Beam {w}, Medusa Heads {k}", "beam_medusa", key, sampling=greedy,
                                lossless=True, note=f"tree {spec}" if spec else ""))
    if opt.vllm_beam_widths:
        engines.append(EngineSpec("vllm-beam", None, max(bs, BEAM_SEARCH_MAX_SEQS)))
        for w in opt.vllm_beam_widths:
            rows.append(RowSpec(f"vLLM beam search W={w}", "vllm_beam", "vllm-beam", kind="beam_search",
                                beam_width=w, note="LLM.beam_search, output beam search"))
    return engines, rows
