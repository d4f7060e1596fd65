"""vLLM ``general_plugins`` entry point and the ``medusa_tree`` translation.

vLLM calls :func:`register` once in every process it starts (API server,
engine core, each worker / TP rank). It is cheap and idempotent: it applies the
small vLLM patches in :mod:`medusa_vllm_patches` (each one checks whether it
is already in place).

Users enable tree Medusa with any of::

    LLM(model, speculative_config={"method": "medusa_tree", "model": HEADS,
                                   "tree": "auto", "acceptance": "rejection",
                                   "posterior_threshold": 0.09, "posterior_alpha": 0.3})
    vllm serve MODEL --speculative-config '{"method": "medusa_tree", "model": HEADS}'
    vllm serve MODEL --speculative-model medusa:HEADS [--speculative-config '{...}']
    vllm serve MODEL --spec-method medusa_tree --spec-model HEADS

vLLM 0.32 cannot take a new method name (``SpeculativeConfig.method`` is a
closed ``Literal`` and extra keys are forbidden), so :func:`translate` rewrites
the request, before vLLM validates it, into vLLM's own extension points:

- ``speculative_config = {"method": "custom_class", "model": PROPOSER_CLASS,
  "num_speculative_tokens": <tree nodes>, **other SpeculativeConfig keys}``
- ``additional_config["medusa"] = MedusaTreeConfig(...).resolved().to_dict()``
  (tree pinned to an explicit ``medusa_choices`` list, heads path absolute)
- ``worker_cls = WORKER_CLASSES[<platform device type>]`` when it is ``"auto"``.

The same function also validates (and completes) the hand-written
``custom_class`` form, so translating twice changes nothing. vLLM's built-in
``"method": "medusa"`` (a top-1 chain) is never touched.

Once vLLM has built the backbone's ``ModelConfig`` and the ``ParallelConfig``,
:func:`check_engine_compatibility` refuses, with the setting and the fix, what
tree Medusa would run silently wrong (M-RoPE positions, pipeline parallelism,
hybrid or attention-free layers, a ``logprobs_mode`` other than
``raw_logprobs``, a ``worker_cls`` that is not ours) and heads built for
another backbone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medusa_vllm.engine.options import (
    ADDITIONAL_CONFIG_KEY,
    MedusaConfigError,
    MedusaTreeConfig,
)

if TYPE_CHECKING:
    from vllm.config import ModelConfig, ParallelConfig

__all__ = [
    "METHOD",
    "PROPOSER_CLASS",
    "Translation",
    "WORKER_CLASSES",
    "LOGPROBS_MODES",
    "check_engine_compatibility",
    "is_medusa_tree",
    "register",
    "translate",
    "translate_engine_args",
]

# Under vLLM's logger namespace so that vLLM's logging set-up shows our lines.
logger = logging.getLogger("vllm.plugins.medusa_vllm")

METHOD = "medusa_tree"
PROPOSER_CLASS = "medusa_vllm.engine.proposer.MedusaTreeProposer"
# Platform device type -> worker class that installs the tree model runner.
# GPU hook: add e.g. "cuda": "medusa_vllm.engine.gpu.worker.MedusaTreeGPUWorker" once the
# GPU runner and tree-attention backend exist; until then GPU runs are refused.
# A user-set worker_cls must be the platform's entry or a subclass of it
# (check_engine_compatibility resolves both by import).
WORKER_CLASSES: dict[str, str] = {"cpu": "medusa_vllm.engine.cpu.worker.MedusaTreeCPUWorker"}
# speculative_config keys that are Medusa options (besides "model" = heads).
_OPTION_KEYS = ("heads", "tree", "acceptance", "posterior_threshold", "posterior_alpha", "max_nodes",
                "nodes_by_batch", "ngram_nodes", "ngram_min", "ngram_max", "cost_curve",
                "online_fit", "adaptive", "adaptive_node_cost")
_SOURCE = f"speculative_config (method {METHOD!r})"
# vLLM logprobs_mode values the tree verifier honours: it returns, for each
# emitted token, log_softmax of the raw target logits row that scored it.
LOGPROBS_MODES = ("raw_logprobs",)
_NO_MEDUSA = "or run without speculative_config (no speculative decoding)"

_REGISTERED = False


def register() -> None:
    """Entry point (``vllm.general_plugins``): apply the vLLM patches once."""
    global _REGISTERED
    if _REGISTERED:
        return
    import medusa_vllm_patches as patches

    patches.apply_all(strict=False)
    _install_cli_excepthook()
    _REGISTERED = True


def _install_cli_excepthook() -> None:
    """In the `vllm` command's process, a :class:`MedusaConfigError` that ends the
    process (a start-up refusal) prints as one error line naming the problem and
    its fix, not under a traceback of vLLM's CLI and event loop (exit code 1)."""
    import sys
    from pathlib import Path

    if Path(sys.argv[0] if sys.argv else "").name != "vllm":
        return
    previous = sys.excepthook
    if getattr(previous, "__medusa_vllm__", False):
        return

    def hook(exc_type, exc, tb):  # noqa: ANN001 - sys.excepthook signature
        if isinstance(exc, MedusaConfigError):
            print(f"vllm serve: error: MedusaConfigError: {exc}", file=sys.stderr, flush=True)
        else:
            previous(exc_type, exc, tb)

    hook.__medusa_vllm__ = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# ------------------------------------------------------------- translation
@dataclasses.dataclass(frozen=True)
class Translation:
    """What a ``medusa_tree`` request becomes in vLLM's own terms."""

    speculative_config: dict[str, Any]  # custom_class form for SpeculativeConfig(**...)
    additional_config: dict[str, Any]  # with ["medusa"] = medusa.to_dict()
    worker_cls: str
    medusa: MedusaTreeConfig  # resolved: tree is an explicit medusa_choices list


def is_medusa_tree(speculative_config: Mapping[str, Any] | None) -> bool:
    """True for the ``medusa_tree`` form and for our ``custom_class`` form."""
    if not isinstance(speculative_config, Mapping):
        return False
    method = speculative_config.get("method")
    return method == METHOD or (
        method in (None, "custom_class") and speculative_config.get("model") == PROPOSER_CLASS
    )


def _speculative_config_fields() -> frozenset[str]:
    from vllm.config import SpeculativeConfig

    return frozenset(f.name for f in dataclasses.fields(SpeculativeConfig) if f.init)


def _platform_worker(device_type: str | None) -> str:
    """Our worker class for ``device_type`` (default: vLLM's current platform's)."""
    if device_type is None:
        from vllm.platforms import current_platform

        device_type = current_platform.device_type
    worker = WORKER_CLASSES.get(device_type or "")
    if worker is None:
        raise MedusaConfigError(
            f"{_SOURCE}: tree Medusa supports the platforms {sorted(WORKER_CLASSES)}, found "
            f"{device_type or 'no detected platform'!r}; run on a supported platform, or "
            "use vLLM's built-in chain Medusa ({'method': 'medusa', ...}) here"
        )
    return worker


def _worker_for(worker_cls: str | None, device_type: str | None) -> str:
    """The user's ``worker_cls`` (checked by :func:`check_engine_compatibility`),
    or ours for the platform when it is ``"auto"``."""
    if worker_cls not in (None, "", "auto"):
        return worker_cls  # type: ignore[return-value]
    return _platform_worker(device_type)


def translate(
    speculative_config: Mapping[str, Any] | None,
    additional_config: Mapping[str, Any] | None = None,
    worker_cls: str | None = "auto",
    device_type: str | None = None,
) -> Translation | None:
    """Rewrite a ``medusa_tree`` request into vLLM 0.32's own terms.

    Returns ``None`` (nothing to do) unless :func:`is_medusa_tree`. Inputs are
    never mutated. ``device_type`` defaults to vLLM's current platform's.
    ``num_speculative_tokens`` (or ``--spec-tokens``), if given, caps the tree
    like ``max_nodes``. A user-set ``worker_cls`` is kept (it must subclass
    ours: :func:`check_engine_compatibility` refuses it otherwise). Raises
    :class:`MedusaConfigError` for any bad option.
    """
    if not is_medusa_tree(speculative_config):
        return None
    assert speculative_config is not None
    spec = {str(k).replace("-", "_"): v for k, v in speculative_config.items()}
    extra = dict(additional_config or {})
    stored = extra.get(ADDITIONAL_CONFIG_KEY)
    if stored is not None and not isinstance(stored, Mapping):
        raise MedusaConfigError(
            f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]: expected a dict of Medusa "
            f"options, found {stored!r}"
        )
    cap = spec.pop("num_speculative_tokens", None)

    if spec.get("method") == METHOD:
        options, passthrough = _split_user_form(spec, dict(stored or {}))
        source, labels = _SOURCE, {"heads": "model"}
    else:  # our custom_class form: options live in additional_config
        if not stored:
            raise MedusaConfigError(
                f"speculative_config model {PROPOSER_CLASS!r} needs the Medusa options in "
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}], found none; write "
                f"speculative_config={{'method': {METHOD!r}, 'model': HEADS_DIR}} instead"
            )
        options = dict(stored)
        passthrough = {k: v for k, v in spec.items() if k not in ("method", "model")}
        source, labels = f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]", {}

    medusa = MedusaTreeConfig.from_dict(options, source=source, labels=labels)
    try:
        medusa = medusa.resolved(num_speculative_tokens=cap)
    except MedusaConfigError as exc:
        raise MedusaConfigError(f"{source}: {exc}") from None
    if cap is not None and medusa.max_nodes not in (None, cap) and spec.get("method") == METHOD:
        raise MedusaConfigError(
            f"{_SOURCE}: num_speculative_tokens={cap} and max_nodes={medusa.max_nodes} "
            "disagree; give only max_nodes (the tree size sets num_speculative_tokens)"
        )

    spec_out = {
        **passthrough,
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": medusa.num_speculative_tokens,
    }
    if medusa.fit_max_nodes is not None:
        # tree="auto": the engine fits a tree of at most num_speculative_tokens nodes when
        # it starts. A (no-op) per-batch schedule stops vLLM's scheduler from padding
        # resumed decodes to num_speculative_tokens placeholder drafts, more than that tree.
        spec_out.setdefault("num_speculative_tokens_per_batch_size",
                            [[1, 1, medusa.num_speculative_tokens]])
    extra[ADDITIONAL_CONFIG_KEY] = medusa.to_dict()
    return Translation(
        speculative_config=spec_out,
        additional_config=extra,
        worker_cls=_worker_for(worker_cls, device_type),
        medusa=medusa,
    )


def _split_user_form(
    spec: dict[str, Any], stored: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"method": "medusa_tree", "model": HEADS, <options>, <vLLM keys>}`` ->
    (Medusa options merged with ``additional_config["medusa"]``, vLLM keys)."""
    spec = dict(spec)
    spec.pop("method")
    heads = spec.pop("model", None)
    if "heads" in spec:
        alias = spec.pop("heads")
        if heads is not None and alias != heads:
            raise MedusaConfigError(
                f"{_SOURCE}: 'model' ({heads!r}) and 'heads' ({alias!r}) disagree; "
                "give the heads folder once, as 'model'"
            )
        heads = alias
    options = {k: spec.pop(k) for k in _OPTION_KEYS if k in spec}
    if heads is not None:
        options["heads"] = heads
    for key, value in stored.items():
        if key in options and options[key] != value:
            raise MedusaConfigError(
                f"{_SOURCE}: {key!r} is set both in speculative_config ({options[key]!r}) "
                f"and in additional_config[{ADDITIONAL_CONFIG_KEY!r}] ({value!r}); set it once"
            )
        options.setdefault(key, value)
    if "heads" not in options:
        raise MedusaConfigError(
            f"{_SOURCE}: model: required, expected the path of the Medusa heads folder, "
            'e.g. {"method": "medusa_tree", "model": "/path/to/heads"}'
        )
    vllm_keys = _speculative_config_fields()
    unknown = sorted(k for k in spec if k not in vllm_keys)
    if unknown:
        raise MedusaConfigError(
            f"{_SOURCE}: unknown key(s) {unknown}; Medusa options are "
            f"{['model', *_OPTION_KEYS[1:]]} and any other key must be a vLLM "
            "SpeculativeConfig field"
        )
    return options, spec


# ------------------------------------------------------------ engine glue
def _fold_shorthands(args: Any, spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """Fold ``--spec-method/--spec-model/--spec-tokens`` into the dict, as
    vLLM's ``create_speculative_config`` would, so we can translate it first."""
    method = getattr(args, "spec_method", None) or (spec or {}).get("method")
    if method != METHOD:
        return spec
    out = dict(spec or {})
    for flag, attr, key in (
        ("--spec-method", "spec_method", "method"),
        ("--spec-model", "spec_model", "model"),
        ("--spec-tokens", "spec_tokens", "num_speculative_tokens"),
    ):
        value = getattr(args, attr, None)
        if value is None:
            continue
        if key in out:
            raise MedusaConfigError(
                f"{flag} and speculative_config[{key!r}] are mutually exclusive"
            )
        out[key] = value
        setattr(args, attr, None)
    return out


def translate_engine_args(args: Any) -> bool:
    """Translate an ``EngineArgs`` in place (new dicts, inputs untouched).

    Called by the :mod:`medusa_vllm_patches.speculative_method` patch at the start of
    ``EngineArgs.create_engine_config``. Returns True when it was a Medusa run.
    """
    spec = _fold_shorthands(args, args.speculative_config)
    result = translate(spec, args.additional_config, args.worker_cls)
    if result is None:
        return False
    args.speculative_config = result.speculative_config
    args.additional_config = result.additional_config
    args.worker_cls = result.worker_cls
    fit = result.medusa.fit_max_nodes
    logger.info(
        "medusa_tree: %s, acceptance=%s, heads=%s, worker=%s",
        f"tree fitted by the engine at start-up (at most {fit} nodes)" if fit is not None
        else f"{result.medusa.num_speculative_tokens}-node tree",
        result.medusa.acceptance,
        result.medusa.heads,
        result.worker_cls,
    )
    return True


def check_engine_compatibility(
    speculative_config: Mapping[str, Any] | None,
    additional_config: Mapping[str, Any] | None,
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    device_type: str | None = None,
) -> None:
    """Refuse, before any worker starts, an engine tree Medusa would run wrong.

    Called by :mod:`medusa_vllm_patches.speculative_method` once vLLM has built
    the backbone's ``ModelConfig`` and the ``ParallelConfig``
    (``EngineArgs.create_speculative_config``), on the translated (custom_class)
    form; a no-op unless :func:`is_medusa_tree`. Raises one
    :class:`MedusaConfigError` listing every setting at fault and its fix,
    then checks the heads against the backbone's hidden and vocabulary sizes.
    ``device_type`` defaults to vLLM's current platform's.
    """
    if not is_medusa_tree(speculative_config):
        return
    model = model_config.model
    problems: list[str] = []
    if model_config.uses_mrope:
        problems.append(
            f"the model {model!r} uses M-RoPE positions (an mrope_section in its rope "
            "parameters: 3-D multimodal positions); the tree runner writes one position "
            "per token (prefix length + tree depth), so tree rows would get wrong rotary "
            f"positions: use a model with 1-D RoPE positions {_NO_MEDUSA}"
        )
    if model_config.is_attention_free:
        problems.append(
            f"the model {model!r} is attention-free (state-space / recurrent layers); tree "
            "verification needs attention layers (a tree mask over the KV cache) and rolls "
            f"back rejected nodes only there: use an attention model {_NO_MEDUSA}"
        )
    elif model_config.is_hybrid:
        problems.append(
            f"the model {model!r} is hybrid (mamba / linear-attention layers beside "
            "attention); tree rows and rejected nodes would pass through the recurrent "
            "state, which has no tree mask and no roll-back: use a model whose every layer "
            f"is full attention {_NO_MEDUSA}"
        )
    pp = parallel_config.pipeline_parallel_size
    if pp != 1:
        problems.append(
            f"pipeline_parallel_size={pp}: the Medusa heads read the last layer's hidden "
            "state and the tree verifier its logits, which only the last pipeline stage "
            "has: set pipeline_parallel_size=1 (--pipeline-parallel-size 1)"
        )
    mode = model_config.logprobs_mode
    if mode not in LOGPROBS_MODES:
        problems.append(
            f"logprobs_mode={mode!r}: with tree Medusa the returned logprobs are the raw "
            "target log-probabilities of each emitted token (logprobs_mode='raw_logprobs'); "
            f"set logprobs_mode='raw_logprobs' (--logprobs-mode raw_logprobs, the default) "
            f"{_NO_MEDUSA}"
        )
    problem = _worker_problem(parallel_config.worker_cls, device_type)
    if problem:
        problems.append(problem)
    if len(problems) == 1:
        raise MedusaConfigError(f"{METHOD}: {problems[0]}")
    if problems:
        raise MedusaConfigError(
            f"{METHOD} cannot run this engine correctly:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    _check_backbone(additional_config, model_config)


def _import_class(qualname: str) -> type | str:
    """The class at ``qualname``, or why it could not be imported."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    try:
        obj = resolve_obj_by_qualname(qualname)
    except (ImportError, AttributeError, ValueError) as exc:
        return f"cannot be imported ({type(exc).__name__}: {exc})"
    return obj if isinstance(obj, type) else f"is not a class (found {type(obj).__name__} {obj!r})"


def _worker_problem(worker_cls: str, device_type: str | None) -> str | None:
    """Why ``worker_cls`` would not run the Medusa tree runner, or None.

    Ours (the usual case, set by :func:`translate`) is accepted without an
    import (importing a worker costs seconds in the API server process);
    anything else is resolved by import and must subclass ours.
    """
    ours_name = _platform_worker(device_type)
    if worker_cls == ours_name:
        return None
    ours = _import_class(ours_name)
    if isinstance(ours, str):  # a broken WORKER_CLASSES entry: our bug, say so
        return f"the Medusa worker {ours_name!r} registered for this platform {ours}"
    theirs = _import_class(worker_cls)
    if isinstance(theirs, str):
        why = theirs
    elif issubclass(theirs, ours):
        return None
    else:
        why = f"is not a subclass of {ours_name}"
    return (
        f"worker_cls={worker_cls!r} {why}; that worker would not install the Medusa tree "
        f"runner, so tree drafts would never be verified: leave worker_cls='auto' (the "
        f"plugin sets {ours_name}) or pass a subclass of it"
    )


def _check_backbone(
    additional_config: Mapping[str, Any] | None, model_config: ModelConfig
) -> None:
    """Raise unless the heads match the backbone's hidden and vocabulary sizes."""
    medusa = MedusaTreeConfig.from_dict(
        (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {},
        source=f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]",
    )
    try:
        medusa.check_backbone(
            hidden_size=model_config.get_hidden_size(),
            vocab_size=model_config.get_vocab_size(),
            model=f"the backbone {model_config.model!r}",
        )
    except MedusaConfigError as exc:
        raise MedusaConfigError(f"{METHOD}: {exc}") from None
    _check_weights(medusa.heads)


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")


def _check_weights(heads: str) -> None:
    """Refuse unreadable, truncated, misshapen or non-finite heads weights here,
    in the front-end: the same error raised by the engine's worker when it loads
    the heads would surface as a wall of engine-process tracebacks. A folder
    without any weights file is left to that load (which refuses it)."""
    from pathlib import Path

    from medusa_vllm.checkpoints import MedusaCheckpointError
    from medusa_vllm.checkpoints.load import verify_heads

    if not any(p.suffix in _WEIGHT_SUFFIXES for p in Path(heads).iterdir()):
        return
    try:
        verify_heads(heads)
    except MedusaCheckpointError as exc:
        raise MedusaConfigError(
            f"{METHOD}: the heads in {heads} cannot be loaded: {exc}; re-download, re-train "
            "or re-convert them"
        ) from None
