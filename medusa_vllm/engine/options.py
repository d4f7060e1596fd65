"""One validated configuration object for Medusa tree decoding.

:class:`MedusaTreeConfig` holds every engine-wide Medusa option; it is built
once (from the user's ``speculative_config`` by :mod:`medusa_vllm.engine.plugin`),
validated once, and travels to every vLLM process as a plain dict in
``vllm_config.additional_config["medusa"]`` (:data:`ADDITIONAL_CONFIG_KEY`).
In the worker, :class:`medusa_vllm.engine.proposer.MedusaTreeProposer` reads
it back (:meth:`MedusaTreeConfig.from_vllm_config`) and builds the tree once;
the tree runner uses the proposer's ``config`` and ``tree``.

Options (defaults in brackets):

- ``heads``: path of the Medusa heads folder (must exist and hold a
  ``config.json`` naming the number of heads).
- ``tree`` [``"auto"``]: ``"auto"`` = the engine fits the tree when it starts
  (:mod:`medusa_vllm.engine.cost_curve`): it times its own verification steps on
  this machine, dtype and thread count (a few seconds, or the curve cached for
  that key by an earlier start) and combines them with the heads' acceptance
  statistics shipped beside them (``per_rank_accuracy`` in ``medusa_tree.json``,
  else ``eval.json`` / ``accuracies.json``); the tree has at most ``max_nodes``
  (else :data:`DEFAULT_FIT_MAX_NODES`) heads nodes. Without statistics, or with
  ``cost_curve="off"``, ``"auto"`` falls back (with a warning: it was fitted on
  another machine) to ``medusa_tree.json`` saved beside the heads if present,
  else a preset sized to the number of heads (:func:`default_tree_spec`). Else
  a preset name (``"sparse-16"``, ``"chain-3"``, ...); an explicit
  ``medusa_choices`` list (or its JSON string); or the path of a JSON file:
  explicit trees are never refitted.
- ``acceptance`` [``"rejection"``]: ``"rejection"`` (lossless tree rejection
  sampling), ``"typical"`` (the paper's typical acceptance) or ``"greedy"``.
  Requests with temperature 0 are always verified with exact greedy matching.
- ``posterior_threshold`` ε [0.09, ``DEFAULT_POSTERIOR_THRESHOLD`` of
  :mod:`medusa_vllm.core.acceptance`], in (0, 1): typical acceptance's hard
  threshold.
- ``posterior_alpha`` δ [0.3, ``DEFAULT_POSTERIOR_ALPHA``], >= 0: typical
  acceptance's entropy factor.
- ``max_nodes`` [None]: cap on the tree size; a larger tree keeps its first
  ``max_nodes`` nodes in BFS order (always a valid tree, the same cut the
  engine makes near ``max_model_len``). ``tree="auto"`` picks a preset no
  larger than the cap first; for a tuned small tree, pass it explicitly.
- ``nodes_by_batch`` [``"auto"``]: how the tree shrinks as the batch grows
  (verification turns compute-bound with batch size, so a big tree that pays
  at batch 1 costs more than it gains at batch 8). A ``{batch_size: nodes}``
  table (each step drafts the first ``nodes`` BFS nodes; a batch size between
  entries uses the entry below it, capped at the tokens per step of the entry
  above; 0 = no speculation at that batch size);
  ``"auto"`` = with ``tree="auto"`` fitted by the engine at start-up from the
  same measured cost curve (batch sizes 1, 4, 16, 64), else (the fallback) the
  table ``medusa-vllm calibrate`` saved in ``medusa_tree.json`` when
  ``tree="auto"`` uses it, else the whole tree at batch 1 and about
  :data:`DEFAULT_VERIFY_TOKEN_BUDGET` verified tokens per step above it;
  ``"off"`` = always the whole tree. An explicit table is never refitted.
- ``online_fit`` [True]: with a table the engine fitted at start-up
  (``tree="auto"``, ``nodes_by_batch="auto"``), refit it while serving from the
  acceptance each tree node actually gets (:mod:`medusa_vllm.core.online_fit`):
  the heads' shipped statistics are a prior, the requests served decide.
- ``ngram_nodes`` [``"auto"``]: prompt lookup in the tree, up to that many tokens deep:
  for a request whose recent tokens match an n-gram earlier in its own prompt
  and output (vLLM's ``ngram`` method's matcher), the continuation takes the
  tree's top-1 chain and the heads' candidates move one rank down beside it,
  verified in the same pass; requests without a match draft the heads' tree
  as usual. Each kind of request drafts its own number of nodes (with
  ``tree="auto"``, fitted and refitted per batch size). The tree gains the top-1
  chain down to that depth if it lacks it. At most the number of heads; 0 = off;
  not with ``tree="beam:..."``. ``"auto"`` = :data:`DEFAULT_NGRAM_NODES` (at most the
  heads' depth) when the engine fits ``tree="auto"`` at start-up (the fit prices the
  lookup chain and can leave it undrafted), else 0: an explicit tree drafts what it says.
- ``ngram_min`` [2] / ``ngram_max`` [5]: the n-gram lengths matched (as vLLM's
  ``prompt_lookup_min`` / ``prompt_lookup_max``).
- ``cost_curve`` [``$MEDUSA_VLLM_COST_CURVE``, else ``"auto"``]: how ``tree="auto"``
  gets its cost curve: ``"auto"`` (the cached curve for this machine key, else
  measure and cache it), ``"remeasure"`` (measure, overwrite the cache) or
  ``"off"`` (no measurement: the fallback tree above, with a warning).
- ``fit_max_nodes`` [None]: set by :meth:`MedusaTreeConfig.resolved`, not by
  users: the node budget (the prompt-lookup chain included, = vLLM's
  ``num_speculative_tokens``) of the tree the engine fits at start-up; ``None``
  = no start-up fit (the ``tree`` list is final).
- ``tree="beam:W"`` / ``"beam:W:K"``: beam drafts (:mod:`medusa_vllm.core.beam`):
  each step the W best paths of a width-W beam search over the first K heads'
  log-probabilities (K = all heads by default), verified as W disjoint chains
  of depth K in one static tree (``W*K`` nodes, BFS order).
- ``adaptive`` [False]: adaptive head selection (:mod:`medusa_vllm.engine.adaptive`):
  per request, draft only as deep as its recent per-depth acceptance pays for.
- ``adaptive_node_cost`` [None]: the relative step time of one drafted node the
  adaptive policy assumes (``1 + cost * nodes``); None = the cost curve
  ``medusa-vllm calibrate`` saved beside the heads, else
  :data:`~medusa_vllm.engine.adaptive.DEFAULT_NODE_COST`.

Per request, ``SamplingParams.extra_args`` may override the acceptance options
(:mod:`medusa_vllm.engine.request`).

Every error is a :class:`MedusaConfigError` (a ``ValueError``) that names the
field, what was expected and what was found.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from medusa_vllm.checkpoints import TREE_FILE, HeadsInfo, MedusaCheckpointError, read_heads_info
from medusa_vllm.core.acceptance import (
    DEFAULT_POSTERIOR_ALPHA,
    DEFAULT_POSTERIOR_THRESHOLD,
    AcceptanceRule,
)
from medusa_vllm.core.beam import beam_choices, parse_beam_spec
from medusa_vllm.core.tree import (
    PRESETS,
    MedusaTree,
    budget_nodes_by_batch,
    normalize_choices,
    with_lookup_chain,
)
from medusa_vllm.core.tree_fit import read_per_rank_accuracy

__all__ = [
    "ACCEPTANCE_MODES",
    "ADDITIONAL_CONFIG_KEY",
    "COST_CURVE_ENV",
    "COST_CURVE_MODES",
    "DEFAULT_ACCEPTANCE",
    "DEFAULT_FIT_MAX_NODES",
    "DEFAULT_VERIFY_TOKEN_BUDGET",
    "MedusaConfigError",
    "MedusaTreeConfig",
    "default_tree_spec",
]

ACCEPTANCE_MODES = tuple(rule.name.lower() for rule in AcceptanceRule)  # greedy, typical, rejection
DEFAULT_ACCEPTANCE = "rejection"  # lossless: the target distribution, exactly
ADDITIONAL_CONFIG_KEY = "medusa"  # vllm_config.additional_config[...] holds to_dict()
# Uncalibrated trees at batch > 1: about this many verified tokens per step
# (a 2-core CPU turns compute-bound around 16-32 tokens per forward pass).
DEFAULT_VERIFY_TOKEN_BUDGET = 32
# tree="auto": the engine fits a tree of at most this many heads nodes at start-up
# (vLLM's num_speculative_tokens reserves them; each step drafts only what the fit picked)
DEFAULT_FIT_MAX_NODES = 64
# ngram_nodes="auto" with tree="auto" fitted at start-up: prompt lookup this deep (at most
# the heads' depth); vLLM's n-gram speculator drafts 4 by default as well
DEFAULT_NGRAM_NODES = 4
COST_CURVE_MODES = ("auto", "remeasure", "off")
COST_CURVE_ENV = "MEDUSA_VLLM_COST_CURVE"  # default of the cost_curve option
logger = logging.getLogger("vllm.plugins.medusa_vllm")

# What each field expects, for error messages.
_EXPECTED = {
    "heads": "the path of a Medusa heads folder",
    "tree": (
        f'"auto", a preset ({", ".join(sorted(PRESETS))}), a medusa_choices list such '
        'as [[0], [1], [0, 0]], the path of a JSON file, or beam drafts "beam:W" / "beam:W:K"'
    ),
    "medusa_choices": "a list of paths such as [[0], [1], [0, 0]]",
    "acceptance": " or ".join(repr(m) for m in ACCEPTANCE_MODES),
    "posterior_threshold": "a number in the open interval (0, 1)",
    "posterior_alpha": "a number >= 0",
    "max_nodes": "an integer >= 1, or null for no cap",
    "ngram_nodes": ('"auto" or an integer >= 0 (0: no prompt lookup), at most the number of '
                    "heads"),
    "ngram_min": "an integer >= 1",
    "ngram_max": "an integer >= 1, at least ngram_min",
    "online_fit": "true or false",
    "adaptive": "true or false",
    "adaptive_node_cost": "a number >= 0 (relative step time per drafted node), or null",
    "cost_curve": " or ".join(repr(m) for m in COST_CURVE_MODES),
    "fit_max_nodes": "an integer >= 1 (set by the plugin), or null",
    "nodes_by_batch": (
        '"auto", "off", or a {batch_size: tree_nodes} table such as {"1": 32, "8": 4} '
        "(batch sizes >= 1, tree sizes >= 0)"
    ),
}


class MedusaConfigError(ValueError):
    """A Medusa option is invalid; the message names the field and the fix."""


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _finite(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, found the boolean {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, found {value!r}")
    return value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, found the boolean {value!r}")
    return value


Acceptance = Annotated[Literal[ACCEPTANCE_MODES], BeforeValidator(_lower)]  # type: ignore[valid-type]
PosteriorThreshold = Annotated[float, BeforeValidator(_finite), Field(gt=0.0, lt=1.0)]
PosteriorAlpha = Annotated[float, BeforeValidator(_finite), Field(ge=0.0)]
MaxNodes = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
NgramNodes = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)] | Annotated[
    Literal["auto"], BeforeValidator(_lower)]
NgramLength = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
CostCurveMode = Annotated[Literal[COST_CURVE_MODES], BeforeValidator(_lower)]  # type: ignore[valid-type]
NodeCost = Annotated[float, BeforeValidator(_finite), Field(ge=0.0)]


def _nodes_by_batch(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        raise ValueError(f"expected {_EXPECTED['nodes_by_batch']}, found {value!r}")
    if value is None:
        return "off"
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"expected {_EXPECTED['nodes_by_batch']}, found {value!r}")
    out: dict[int, int] = {}
    for k, v in value.items():
        try:
            b = int(k)
        except (TypeError, ValueError):
            b = 0
        if isinstance(k, bool) or b < 1 or str(b) != str(k).strip():
            raise ValueError(f"batch size {k!r}: expected an integer >= 1")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"batch size {b}: tree size {v!r}: expected an integer >= 0")
        out[b] = v
    return dict(sorted(out.items()))


NodesByBatch = Annotated[Any, BeforeValidator(_nodes_by_batch)]


def validation_message(
    exc: ValidationError, source: str, labels: Mapping[str, str]
) -> str:
    """Turn a pydantic error into "source: field: expected X, found Y" lines."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = err.get("loc") or ("",)
        field = str(loc[0])
        label = labels.get(field, field)
        kind = err.get("type", "")
        found = err.get("input")
        if kind == "extra_forbidden":
            valid = ", ".join(labels.get(f, f) for f in MedusaTreeConfig.model_fields)
            lines.append(f"unknown option {label!r} (valid options: {valid})")
        elif kind == "missing":
            lines.append(f"{label}: required, expected {_EXPECTED.get(field, 'a value')}")
        elif kind == "value_error":
            # Our own validators already say what was expected and found.
            msg = str(err.get("ctx", {}).get("error", err.get("msg", "")))
            lines.append(f"{label}: {msg}")
        else:
            lines.append(
                f"{label}: expected {_EXPECTED.get(field, err.get('msg', 'a valid value'))}, "
                f"found {found!r}"
            )
    where = f"{source}: " if source else ""
    if len(lines) == 1:
        return f"{where}{lines[0]}"
    return where + "invalid Medusa options:\n" + "\n".join(f"  - {line}" for line in lines)


def default_tree_spec(num_heads: int, max_nodes: int | None = None) -> str:
    """The preset used by ``tree="auto"`` without a saved tree: 4 nodes per head,
    at most 16 (``sparse-4`` for 1 head, ``sparse-8`` for 2, ``sparse-16`` for
    3+), and no larger than ``max_nodes`` allows (never below ``sparse-4``)."""
    if num_heads < 1:
        raise MedusaConfigError(f"num_heads: expected an integer >= 1, found {num_heads}")
    size = min(16, 4 * 2 ** (min(num_heads, 3) - 1))
    while max_nodes is not None and size > max(4, max_nodes):
        size //= 2
    return f"sparse-{size}"


# -------------------------------------------------------------------- config
class MedusaTreeConfig(BaseModel):
    """All engine-wide Medusa options, validated on construction (see module doc).

    Build with :meth:`from_dict` to get :class:`MedusaConfigError` messages;
    :meth:`resolved` pins ``tree`` to an explicit ``medusa_choices`` list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: str
    tree: str | list[list[int]] = "auto"
    acceptance: Acceptance = DEFAULT_ACCEPTANCE
    posterior_threshold: PosteriorThreshold = DEFAULT_POSTERIOR_THRESHOLD
    posterior_alpha: PosteriorAlpha = DEFAULT_POSTERIOR_ALPHA
    max_nodes: MaxNodes | None = None
    nodes_by_batch: NodesByBatch = "auto"
    ngram_nodes: NgramNodes = "auto"
    ngram_min: NgramLength = 2
    ngram_max: NgramLength = 5
    cost_curve: CostCurveMode = "auto"
    fit_max_nodes: MaxNodes | None = None
    online_fit: Annotated[bool, Field(strict=True)] = True
    adaptive: Annotated[bool, Field(strict=True)] = False
    adaptive_node_cost: NodeCost | None = None

    @field_validator("ngram_max")
    @classmethod
    def _check_ngram_max(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("ngram_min")
        if low is not None and value < low:
            raise ValueError(f"expected an integer >= ngram_min ({low}), found {value}")
        return value

    @field_validator("heads", mode="before")
    @classmethod
    def _check_heads(cls, value: Any) -> str:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"expected the path of a Medusa heads folder, found {value!r}"
            )
        try:
            return str(read_heads_info(value).path)
        except MedusaCheckpointError as exc:  # re-raised as this field's error
            raise ValueError(str(exc)) from None

    @field_validator("tree", mode="before")
    @classmethod
    def _check_tree(cls, value: Any) -> Any:
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str):
            text = value.strip()
            beam = parse_beam_spec(text) if text.lower().split(":")[0] == "beam" else None
            if beam is not None:  # "beam:W" / "beam:W:K" (malformed: parse_beam_spec says so)
                return ":".join(["beam", *(str(x) for x in beam if x is not None)])
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"expected a JSON list of paths such as [[0], [1], [0, 0]], "
                        f"found {text!r} ({exc})"
                    ) from exc
            elif text != "auto" and text not in PRESETS and not Path(text).expanduser().is_file():
                raise ValueError(f"expected {_EXPECTED['tree']}, found {value!r}")
            else:
                return text if text in ("auto", *PRESETS) else str(Path(text).expanduser().resolve())
        if isinstance(value, (list, tuple)):
            try:
                return [list(p) for p in normalize_choices(value)]
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        raise ValueError(f"expected {_EXPECTED['tree']}, found {value!r}")

    # ------------------------------------------------------------ building
    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "medusa config",
        labels: Mapping[str, str] | None = None,
    ) -> MedusaTreeConfig:
        """Validate ``data``; raise :class:`MedusaConfigError` naming the fields.

        ``medusa_choices`` (the explicit tree :meth:`to_dict` also writes) is
        accepted in place of, or consistently with, ``tree``. ``source`` and
        ``labels`` (field -> the user's name for it) shape the error text.
        """
        if not isinstance(data, Mapping):
            raise MedusaConfigError(
                f"{source}: expected a dict of Medusa options, found {type(data).__name__}"
            )
        data = dict(data)
        choices = data.pop("medusa_choices", None)
        if choices is not None:
            if data.get("tree", "auto") in ("auto", None):
                data["tree"] = choices
            elif _as_choices(data["tree"]) != _as_choices(choices):
                raise MedusaConfigError(
                    f"{source}: 'tree' and 'medusa_choices' disagree ({data['tree']!r} vs "
                    f"{choices!r}); give only one of them"
                )
        try:
            return cls(**data)
        except ValidationError as exc:
            raise MedusaConfigError(validation_message(exc, source, labels or {})) from None

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> MedusaTreeConfig:
        """The config the plugin stored in ``vllm_config.additional_config``."""
        extra = getattr(vllm_config, "additional_config", None) or {}
        data = extra.get(ADDITIONAL_CONFIG_KEY) if isinstance(extra, Mapping) else None
        if not data:
            raise MedusaConfigError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]: expected the Medusa options "
                "written by the medusa-vllm plugin, found none; enable Medusa with "
                "speculative_config={'method': 'medusa_tree', 'model': HEADS_DIR}"
            )
        return cls.from_dict(data, source=f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able options; for a resolved config also ``medusa_choices``.

        ``MedusaTreeConfig.from_dict(cfg.to_dict()) == cfg``.
        """
        out = self.model_dump()
        if isinstance(self.nodes_by_batch, dict):  # JSON object keys are strings
            out["nodes_by_batch"] = {str(b): int(n) for b, n in self.nodes_by_batch.items()}
        if isinstance(self.tree, list):
            out["medusa_choices"] = [list(p) for p in self.tree]
        return out

    # ------------------------------------------------------------- derived
    def heads_info(self) -> HeadsInfo:
        """Re-read the heads' ``config.json`` (number of heads, sizes)."""
        try:
            return read_heads_info(self.heads)
        except MedusaCheckpointError as exc:
            raise MedusaConfigError(f"heads: {exc}") from None

    def load_tree(self, num_heads: int | None = None) -> MedusaTree:
        """Resolve ``tree`` (default ``num_heads``: read from the heads) and
        apply ``max_nodes``; raise :class:`MedusaConfigError` naming ``tree``."""
        if num_heads is None:
            num_heads = self.heads_info().num_heads
        spec: Any = self.tree
        origin = repr(spec) if not isinstance(spec, list) else "the medusa_choices list"
        if self.beam is not None:  # W disjoint chains of depth K
            width, depth = self.beam
            if depth is not None and depth > num_heads:
                raise MedusaConfigError(
                    f"tree: {origin} uses {depth} heads but {self.heads} has {num_heads}; "
                    f'use "beam:{width}:K" with K <= {num_heads}, or "beam:{width}" (all heads)'
                )
            spec = [list(p) for p in beam_choices(width, depth or num_heads)]
        if spec == "auto":
            saved = Path(self.heads) / TREE_FILE
            if saved.is_file():
                spec, origin = str(saved), f"'auto' ({saved})"
            else:
                spec = default_tree_spec(num_heads, self.max_nodes)
                origin = f"'auto' (preset {spec})"
        try:
            tree = MedusaTree.load(spec, num_heads)
        except (ValueError, OSError) as exc:
            raise MedusaConfigError(
                f"tree: {origin} is not a valid tree for {num_heads} Medusa heads in "
                f"{self.heads}: {exc}"
            ) from None
        if self.max_nodes is not None and tree.num_nodes > self.max_nodes:
            tree = tree.truncate(self.max_nodes)
        return tree

    def load_nodes_by_batch(self, tree: MedusaTree) -> dict[int, int] | None:
        """Resolve ``nodes_by_batch`` for ``tree`` (see module doc): a
        ``{batch_size: nodes}`` table capped at the tree size, or ``None``
        (always the whole tree)."""
        value = self.nodes_by_batch
        if value == "off":
            return None
        if value == "auto":
            saved = Path(self.heads) / TREE_FILE
            value = None
            if self.tree == "auto" and saved.is_file():
                try:
                    data = json.loads(saved.read_text())
                    raw = data.get("nodes_by_batch") if isinstance(data, dict) else None
                    value = _nodes_by_batch(raw) if raw is not None else None
                except (ValueError, OSError) as exc:
                    raise MedusaConfigError(
                        f"nodes_by_batch: {saved} holds an invalid 'nodes_by_batch' table: {exc}; "
                        "re-run `medusa-vllm calibrate` or fix the file"
                    ) from None
            if value is None:
                table = budget_nodes_by_batch(tree.num_nodes, DEFAULT_VERIFY_TOKEN_BUDGET)
                table[1] = tree.num_nodes
                return table
        return {int(b): min(int(n), tree.num_nodes) for b, n in value.items()}

    def resolved(
        self, num_heads: int | None = None, num_speculative_tokens: int | None = None
    ) -> MedusaTreeConfig:
        """A copy whose ``tree`` is the explicit BFS ``medusa_choices`` list and
        whose ``nodes_by_batch`` is an explicit table (or ``"off"``).

        ``num_speculative_tokens`` (vLLM's setting, if the user gave one) caps
        the tree like ``max_nodes``: the tree keeps its first that many BFS
        nodes; more than the tree has is an error. With ``tree="auto"`` fitted by
        the engine (``fit_max_nodes`` set, ``nodes_by_batch`` left as given), it is
        the fit's budget of heads nodes.
        """
        if self.ngram_nodes == "auto":  # pinned first: the tree and the fit budget read it
            return self.model_copy(update={"ngram_nodes": self.lookup_depth(num_heads)}).resolved(
                num_heads, num_speculative_tokens)
        cap = num_speculative_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise MedusaConfigError(
                "num_speculative_tokens: expected an integer >= 1 (a cap on the tree "
                f"nodes) or nothing, found {cap!r}"
            )
        tree = self.load_tree(num_heads)
        fits = self.tree == "auto" and self._no_fit_reason() is None
        if cap is not None:
            if cap > tree.num_nodes and not fits:  # (a start-up fit takes cap as its budget)
                raise MedusaConfigError(
                    f"num_speculative_tokens={cap} exceeds the tree's {tree.num_nodes} nodes; "
                    "omit it (the tree sets it) or pick a larger tree"
                )
            tree = tree.truncate(min(cap, tree.num_nodes))
        pinned = self.model_copy(update={"tree": tree.to_list()})
        if self.beam is not None:  # beam drafts stay beam drafts: "beam:W:K", cut by max_nodes
            width, depth = self.beam
            depth = depth or num_heads or self.heads_info().num_heads
            cut = tree.num_nodes if tree.num_nodes < width * depth else self.max_nodes
            pinned = self.model_copy(update={"tree": f"beam:{width}:{depth}", "max_nodes": cut})
        budget = self._startup_fit_budget(tree, cap)
        if budget is not None:  # the engine fits tree and table when it starts
            return pinned.model_copy(update={"fit_max_nodes": budget,
                                             "cost_curve": self.cost_curve_mode()})
        table = self.load_nodes_by_batch(pinned.engine_tree(num_heads))
        return pinned.model_copy(update={"nodes_by_batch": table or "off"})

    def cost_curve_mode(self) -> str:
        """``cost_curve`` as given, else ``$MEDUSA_VLLM_COST_CURVE``, else ``"auto"``."""
        if "cost_curve" in self.model_fields_set:
            return self.cost_curve
        env = os.environ.get(COST_CURVE_ENV, "").strip().lower()
        if env and env not in COST_CURVE_MODES:
            raise MedusaConfigError(
                f"{COST_CURVE_ENV}={os.environ[COST_CURVE_ENV]!r}: expected "
                f"{_EXPECTED['cost_curve']}; unset it or fix its value"
            )
        return env or "auto"

    def _no_fit_reason(self) -> str | None:
        """Why the engine cannot fit ``tree="auto"`` at start-up, or ``None``."""
        if self.cost_curve_mode() == "off":
            return f"cost_curve='off' ({COST_CURVE_ENV} or the option)"
        try:
            if read_per_rank_accuracy(self.heads) is None:
                return (f"{self.heads} holds no acceptance statistics (per_rank_accuracy in "
                        f"{TREE_FILE}, eval.json or accuracies.json: `medusa-vllm calibrate "
                        "--data HELD_OUT` writes them)")
        except ValueError as exc:
            return f"its acceptance statistics are unreadable: {exc}"
        return None

    def _startup_fit_budget(self, fallback: MedusaTree, cap: int | None) -> int | None:
        """With ``tree="auto"``: the node budget of the tree the engine fits at start-up
        (heads nodes + the prompt-lookup chain), or ``None`` with a warning that the fallback
        tree ``fallback`` was fitted elsewhere (fit off, or no statistics)."""
        if self.tree != "auto" or self.fit_max_nodes is not None:
            return self.fit_max_nodes
        why = self._no_fit_reason()
        if why is not None:
            saved = Path(self.heads) / TREE_FILE
            origin = f"the tree saved in {saved}" if saved.is_file() else "a generic preset"
            logger.warning(
                "medusa_tree: tree='auto' is not fitted to this machine because %s; using %s "
                "(%d nodes), fitted elsewhere, so its speed here is unknown", why, origin,
                fallback.num_nodes)
            return None
        limits = [x for x in (self.max_nodes, cap) if x is not None]
        heads_nodes = max(min(limits) if limits else DEFAULT_FIT_MAX_NODES, fallback.num_nodes)
        return heads_nodes + self.lookup_depth()

    def engine_tree(self, num_heads: int | None = None) -> MedusaTree:
        """The tree the engine drafts and verifies: :meth:`load_tree` (the heads'
        nodes) plus, with ``ngram_nodes``, the top-1 chain down to that depth where
        prompt-lookup continuations go (:func:`~medusa_vllm.core.tree.with_lookup_chain`)."""
        tree = self.load_tree(num_heads)
        depth = self.lookup_depth(num_heads)
        if not depth:
            return tree
        if self.beam is not None:
            raise MedusaConfigError(
                f"ngram_nodes: prompt lookup does not combine with tree={self.tree!r} (beam "
                f"drafts lay out whole paths, not ranks); use ngram_nodes=0 with beam trees, "
                f"or a static tree (e.g. tree='auto') with prompt lookup")
        if num_heads is None:
            num_heads = self.heads_info().num_heads
        if depth > num_heads:
            raise MedusaConfigError(
                f"ngram_nodes: {depth} is deeper than the {num_heads} Medusa heads in "
                f"{self.heads} (a tree is at most as deep as the heads); use ngram_nodes <= "
                f"{num_heads}"
            )
        return with_lookup_chain(tree, depth, num_heads)

    def lookup_depth(self, num_heads: int | None = None) -> int:
        """``ngram_nodes`` as a depth: as given, or for ``"auto"``
        :data:`DEFAULT_NGRAM_NODES` (at most ``num_heads``, read from the heads when
        ``None``) where the engine fits ``tree="auto"`` at start-up, else 0."""
        if self.ngram_nodes != "auto":
            return self.ngram_nodes
        if self.tree != "auto" or self._no_fit_reason() is not None:
            return 0
        if num_heads is None:
            num_heads = self.heads_info().num_heads
        return min(DEFAULT_NGRAM_NODES, num_heads)

    @property
    def beam(self) -> tuple[int, int | None] | None:
        """``(W, K)`` for ``tree="beam:W:K"`` (``K`` None: all heads), else None."""
        if isinstance(self.tree, str) and self.tree.split(":")[0] == "beam":
            return parse_beam_spec(self.tree)
        return None

    @property
    def num_speculative_tokens(self) -> int:
        """vLLM's ``num_speculative_tokens``: the number of tree nodes (the
        top-1 chain prompt lookup fills included)."""
        if self.fit_max_nodes is not None:  # tree="auto": the budget the start-up fit fills
            return self.fit_max_nodes
        return self.engine_tree().num_nodes

    def check_backbone(
        self, hidden_size: int, vocab_size: int, model: str = "the backbone"
    ) -> None:
        """Raise if the heads were built for another hidden or vocabulary size."""
        info = self.heads_info()
        for name, mine, theirs in (
            ("hidden_size", info.hidden_size, hidden_size),
            ("vocab_size", info.vocab_size, vocab_size),
        ):
            if mine is not None and mine != theirs:
                raise MedusaConfigError(
                    f"heads: {info.config_file} has {name}={mine}, but "
                    f"{model} has {name}={theirs}; these heads were trained for another "
                    "model: train or convert Medusa heads for this backbone "
                    "(`medusa-vllm train`)"
                )


def _as_choices(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, (list, tuple)):
        try:
            return normalize_choices(value)
        except ValueError:
            return value
    return value
