# vLLM 0.32 lacks a way for a plugin to add a speculative decoding method:
# `SpeculativeConfig.method` is a closed `Literal` and the pydantic dataclass
# forbids unknown keys (`config/utils.py`, extra="forbid"), so
# `speculative_config={"method": "medusa_tree", "tree": ...}` is rejected
# before any plugin code runs in the engine. This patch wraps
# `EngineArgs.create_engine_config` (the one place every entry point - `LLM`,
# `vllm serve`, `AsyncLLM.from_engine_args`, headless - builds the config, and
# after plugins are loaded) to translate that form into vLLM's own
# `custom_class` + `additional_config` + `worker_cls` form first
# (`medusa_vllm.engine.plugin.translate_engine_args`), and wraps
# `EngineArgs.create_speculative_config`, the first place where vLLM has
# built both the backbone's ModelConfig and the ParallelConfig, to refuse what
# tree Medusa would run silently wrong and heads built for another backbone
# (`medusa_vllm.engine.plugin.check_engine_compatibility`). Built-in methods,
# including "medusa", pass through untouched.
"""Translate ``method: "medusa_tree"`` before vLLM validates SpeculativeConfig."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig

__all__ = ["apply", "is_applied"]

_MARK = "__medusa_vllm_patch__"


def is_applied() -> bool:
    from vllm.engine.arg_utils import EngineArgs

    return getattr(EngineArgs.create_engine_config, _MARK, False) and getattr(
        EngineArgs.create_speculative_config, _MARK, False
    )


def apply() -> None:
    """Wrap the two ``EngineArgs`` methods (no-op if already wrapped)."""
    from vllm.engine.arg_utils import EngineArgs

    create_engine_config = EngineArgs.create_engine_config
    if not getattr(create_engine_config, _MARK, False):

        @functools.wraps(create_engine_config)
        def wrapped_create_engine_config(
            self: EngineArgs, *args: Any, **kwargs: Any
        ) -> VllmConfig:
            from medusa_vllm.engine.plugin import translate_engine_args

            translate_engine_args(self)
            return create_engine_config(self, *args, **kwargs)

        setattr(wrapped_create_engine_config, _MARK, True)
        EngineArgs.create_engine_config = wrapped_create_engine_config  # type: ignore[method-assign]

    create_speculative_config = EngineArgs.create_speculative_config
    if not getattr(create_speculative_config, _MARK, False):

        @functools.wraps(create_speculative_config)
        def wrapped_create_speculative_config(
            self: EngineArgs,
            target_model_config: ModelConfig,
            target_parallel_config: ParallelConfig,
        ) -> SpeculativeConfig | None:
            from medusa_vllm.engine.plugin import check_engine_compatibility

            check_engine_compatibility(
                self.speculative_config,
                self.additional_config,
                target_model_config,
                target_parallel_config,
            )
            return create_speculative_config(self, target_model_config, target_parallel_config)

        setattr(wrapped_create_speculative_config, _MARK, True)
        EngineArgs.create_speculative_config = wrapped_create_speculative_config  # type: ignore[method-assign]
