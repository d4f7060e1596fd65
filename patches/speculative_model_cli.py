# vLLM 0.32 lacks `--speculative-model` (it was dropped; only
# `--speculative-config` JSON and the `--spec-method/--spec-model/--spec-tokens`
# shorthands remain, and `--spec-method` only accepts vLLM's built-in method
# names). Medusa users know `--speculative-model medusa:HEADS` from older vLLM
# and the Medusa docs. vLLM loads general plugins in
# `AsyncEngineArgs.add_cli_args` *before* it calls `EngineArgs.add_cli_args`,
# so this patch wraps `EngineArgs.add_cli_args` to (1) add
# `--speculative-model medusa:HEADS`, which writes
# `{"method": "medusa_tree", "model": HEADS}` into `speculative_config`, merged
# with any `--speculative-config` JSON in either order (the `-sc` action is
# made merge-aware; dotted `-sc.key value` options are appended last by vLLM's
# parser), always building new dicts rather than mutating argparse defaults;
# and (2) add "medusa_tree" to `--spec-method`'s choices. The translation
# itself happens later, in `medusa_vllm_patches.speculative_method`, for all surfaces alike.
"""``--speculative-model medusa:HEADS`` and ``--spec-method medusa_tree`` for the vLLM CLI."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping
from typing import Any

__all__ = ["OPTION", "PREFIXES", "SpeculativeModelAction", "add_arguments", "apply", "is_applied"]

OPTION = "--speculative-model"
PREFIXES = ("medusa:", "medusa_tree:")  # accepted forms: medusa:HEADS, medusa_tree:HEADS
METHOD = "medusa_tree"  # same as medusa_vllm.engine.plugin.METHOD (kept import-free)
_DEST = "speculative_model"
_MARK = "__medusa_vllm_patch__"


def _merge(spec: Any, heads: str, parser_action: argparse.Action | None) -> dict[str, Any]:
    """A new speculative_config dict: ``spec`` plus method/model for ``heads``."""
    if spec is not None and not isinstance(spec, Mapping):
        raise argparse.ArgumentError(
            parser_action, f"--speculative-config must be a JSON object, found {spec!r}"
        )
    out = dict(spec or {})
    method = out.get("method")
    if method not in (None, METHOD):
        raise argparse.ArgumentError(
            parser_action,
            f"{OPTION} medusa:{heads} asks for method {METHOD!r} but --speculative-config "
            f"sets method {method!r}; drop one of them",
        )
    model = out.get("model")
    if model not in (None, heads):
        raise argparse.ArgumentError(
            parser_action,
            f"{OPTION} medusa:{heads} and --speculative-config model {model!r} disagree; "
            "give the heads folder once",
        )
    out["method"] = METHOD
    out["model"] = heads
    return out


class SpeculativeModelAction(argparse.Action):
    """``--speculative-model medusa:HEADS`` -> ``speculative_config`` (merged)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        value = str(values).strip()
        prefix = next((p for p in PREFIXES if value.startswith(p)), None)
        heads = value[len(prefix):].strip() if prefix else ""
        if not prefix or not heads:
            raise argparse.ArgumentError(
                self,
                f"expected medusa:<heads folder> (tree Medusa), found {value!r}; vLLM "
                "0.32 removed --speculative-model, so other methods go in "
                "--speculative-config '{\"method\": ..., \"model\": ...}'",
            )
        setattr(namespace, self.dest, heads)
        namespace.speculative_config = _merge(
            getattr(namespace, "speculative_config", None), heads, self
        )


def _merging_store(action_cls: type[argparse.Action]) -> type[argparse.Action]:
    """A subclass of the ``--speculative-config`` action class that re-applies a
    ``--speculative-model`` given earlier on the command line."""

    class MedusaMergingSpecConfigAction(action_cls):  # type: ignore[valid-type, misc]
        def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
            super().__call__(parser, namespace, values, option_string)
            heads = getattr(namespace, _DEST, None)
            if heads:
                namespace.speculative_config = _merge(values, heads, self)

    setattr(MedusaMergingSpecConfigAction, _MARK, True)
    return MedusaMergingSpecConfigAction


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add our options to a parser that already has vLLM's engine arguments."""
    actions = parser._option_string_actions  # argparse keeps no public index
    sc = actions.get("--speculative-config")
    if OPTION not in actions:
        group: Any = parser
        if sc is not None:
            group = next(
                (g for g in parser._action_groups if sc in g._group_actions), parser
            )
        group.add_argument(
            OPTION,
            dest=_DEST,
            action=SpeculativeModelAction,
            default=None,
            metavar="medusa:HEADS",
            help=(
                "Tree Medusa speculative decoding with the heads in folder HEADS "
                "(medusa-vllm plugin). Same as --speculative-config "
                '\'{"method": "medusa_tree", "model": HEADS}\'; other Medusa options '
                "(tree, acceptance, posterior_threshold, posterior_alpha, max_nodes) "
                "can be added with --speculative-config."
            ),
        )
    if sc is not None and not getattr(type(sc), _MARK, False):
        sc.__class__ = _merging_store(type(sc))
    spec_method = actions.get("--spec-method")
    if spec_method is not None and spec_method.choices is not None:
        if METHOD not in spec_method.choices:
            spec_method.choices = [*spec_method.choices, METHOD]
    return parser


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return getattr(EngineArgs.add_cli_args, _MARK, False)


def apply() -> None:
    """Wrap ``EngineArgs.add_cli_args`` (a staticmethod); no-op if already wrapped."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def add_cli_args(parser, *args: Any, **kwargs: Any):
        parser = original(parser, *args, **kwargs)
        return add_arguments(parser)

    setattr(add_cli_args, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
