"""MedusaTreeCPUModelRunner: the Medusa tree runner on vLLM 0.32's CPU model runner.

:class:`medusa_vllm.engine.runner.MedusaTreeRunnerMixin` holds the four
overrides; this class adds only what is CPU-specific: KV copies in the CPU
paged cache (:func:`medusa_vllm.engine.cpu.kv_copy.compact_kv`). Tree rows are
served by the CPU tree-attention backend (:mod:`medusa_vllm.engine.cpu.attention`),
which the worker registers before the model is built.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from medusa_vllm.engine.cpu.attention import TreeCPUAttentionBackendImpl
from medusa_vllm.engine.cpu.kv_copy import compact_kv
from medusa_vllm.engine.options import MedusaConfigError
from medusa_vllm.engine.runner import MedusaTreeRunnerMixin

__all__ = ["MedusaTreeCPUModelRunner"]


class MedusaTreeCPUModelRunner(MedusaTreeRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner verifying Medusa trees."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        # refuse now, before serving, what the first tree step would refuse mid-batch
        found: dict[str, list[str]] = {}
        for name, layer in self.compilation_config.static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if isinstance(impl, TreeCPUAttentionBackendImpl):
                for feature in impl.tree_unsupported():
                    found.setdefault(feature, []).append(name)
        if found:
            listed = "; ".join(f"{f} (e.g. {layers[0]}, {len(layers)} layers)"
                               for f, layers in found.items())
            raise MedusaConfigError(
                f"medusa_tree: the model's attention layers use {listed}, which tree "
                "verification does not implement: use a model without them, or run without "
                "speculative_config (no speculative decoding)"
            )

    def _copy_kv_slots(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        compact_kv(self, src_slots, dst_slots)
