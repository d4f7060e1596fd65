"""vLLM ``general_plugins`` entry point and the ``medusa_tree`` translation.

vLLM calls :func:`register` once in every process it starts (API server,
engine core, each worker / TP rank). It is cheap and idempotent: it applies the
small vLLM patches in :mod:`patches` (each one checks whether it is already in
place).

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
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from medusa_vllm.config import (
    ADDITIONAL_CONFIG_KEY,
    MedusaConfigError,
    MedusaTreeConfig,
)

__all__ = [
    "METHOD",
    "PROPOSER_CLASS",
    "Translation",
    "WORKER_CLASSES",
    "check_backbone",
    "is_medusa_tree",
    "register",
    "translate",
    "translate_engine_args",
]

# Under vLLM's logger namespace so that vLLM's logging set-up shows our lines.
logger = logging.getLogger("vllm.plugins.medusa_vllm")

METHOD = "medusa_tree"
PROPOSER_CLASS = "medusa_vllm.proposer.MedusaTreeProposer"
# Platform device type -> worker class that installs the tree model runner.
# GPU hook: add e.g. "cuda": "medusa_vllm.worker.MedusaTreeGPUWorker" once the
# GPU runner and tree-attention backend exist; until then GPU runs are refused.
WORKER_CLASSES: dict[str, str] = {"cpu": "medusa_vllm.worker.MedusaTreeCPUWorker"}
# speculative_config keys that are Medusa options (besides "model" = heads).
_OPTION_KEYS = ("heads", "tree", "acceptance", "posterior_threshold", "posterior_alpha", "max_nodes",
                "nodes_by_batch")
_SOURCE = f"speculative_config (method {METHOD!r})"

_REGISTERED = False


def register() -> None:
    """Entry point (``vllm.general_plugins``): apply the vLLM patches once."""
    global _REGISTERED
    if _REGISTERED:
        return
    import patches

    patches.apply_all(strict=False)
    _REGISTERED = True


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


def _worker_for(worker_cls: str | None, device_type: str | None) -> str:
    if worker_cls not in (None, "", "auto"):
        if worker_cls not in WORKER_CLASSES.values():
            logger.warning(
                "medusa_tree: keeping worker_cls=%s; it must install the Medusa tree "
                "runner (subclass %s) or tree verification will not run",
                worker_cls,
                ", ".join(sorted(set(WORKER_CLASSES.values()))),
            )
        return worker_cls  # type: ignore[return-value]
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
    like ``max_nodes``. Raises :class:`MedusaConfigError` for any bad option.
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
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise MedusaConfigError(
            f"{_SOURCE}: num_speculative_tokens: expected an integer >= 1 (a cap on the "
            f"tree nodes) or nothing, found {cap!r}"
        )

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

    if cap is not None and options.get("max_nodes") not in (None, cap) and spec.get("method") == METHOD:
        raise MedusaConfigError(
            f"{_SOURCE}: num_speculative_tokens={cap} and max_nodes={options['max_nodes']} "
            "disagree; give only max_nodes (the tree size sets num_speculative_tokens)"
        )
    medusa = MedusaTreeConfig.from_dict(options, source=source, labels=labels)
    try:
        tree = medusa.load_tree()
    except MedusaConfigError as exc:
        raise MedusaConfigError(f"{source}: {exc}") from None
    if cap is not None:
        if cap > tree.num_nodes:
            raise MedusaConfigError(
                f"{_SOURCE}: num_speculative_tokens={cap} exceeds the tree's "
                f"{tree.num_nodes} nodes; omit it (the tree sets it) or pick a larger tree"
            )
        tree = tree.truncate(cap)
    table = medusa.load_nodes_by_batch(tree)
    medusa = medusa.model_copy(update={"tree": tree.to_list(), "nodes_by_batch": table or "off"})

    spec_out = {
        **passthrough,
        "method": "custom_class",
        "model": PROPOSER_CLASS,
        "num_speculative_tokens": tree.num_nodes,
    }
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

    Called by the :mod:`patches.speculative_method` patch at the start of
    ``EngineArgs.create_engine_config``. Returns True when it was a Medusa run.
    """
    spec = _fold_shorthands(args, args.speculative_config)
    result = translate(spec, args.additional_config, args.worker_cls)
    if result is None:
        return False
    args.speculative_config = result.speculative_config
    args.additional_config = result.additional_config
    args.worker_cls = result.worker_cls
    logger.info(
        "medusa_tree: %d-node tree, acceptance=%s, heads=%s, worker=%s",
        len(result.medusa.tree),
        result.medusa.acceptance,
        result.medusa.heads,
        result.worker_cls,
    )
    return True


def check_backbone(
    speculative_config: Mapping[str, Any] | None,
    additional_config: Mapping[str, Any] | None,
    target_model_config: Any,
) -> None:
    """Raise unless the heads match the backbone's hidden and vocabulary sizes.

    Called by :mod:`patches.speculative_method` once vLLM has built the
    backbone's ``ModelConfig`` (``EngineArgs.create_speculative_config``).
    """
    if not is_medusa_tree(speculative_config) or target_model_config is None:
        return
    extra = additional_config or {}
    medusa = MedusaTreeConfig.from_dict(
        extra.get(ADDITIONAL_CONFIG_KEY) or {},
        source=f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]",
    )
    try:
        medusa.check_backbone(
            hidden_size=target_model_config.get_hidden_size(),
            vocab_size=target_model_config.get_vocab_size(),
            model=f"the backbone {target_model_config.model!r}",
        )
    except MedusaConfigError as exc:
        raise MedusaConfigError(f"{METHOD}: {exc}") from None
