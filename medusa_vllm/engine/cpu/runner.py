"""MedusaTreeCPUModelRunner: the Medusa tree runner on vLLM 0.32's CPU model runner.

:class:`medusa_vllm.engine.runner.MedusaTreeRunnerMixin` holds the four
overrides; this class adds only what is CPU-specific: KV copies in the CPU
paged cache (:func:`medusa_vllm.engine.cpu.kv_copy.compact_kv`). Tree rows are
served by the CPU tree-attention backend (:mod:`medusa_vllm.engine.cpu.attention`),
which the worker registers before the model is built.
"""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from medusa_vllm.engine.cpu.kv_copy import compact_kv
from medusa_vllm.engine.runner import MedusaTreeRunnerMixin

__all__ = ["MedusaTreeCPUModelRunner"]


class MedusaTreeCPUModelRunner(MedusaTreeRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner verifying Medusa trees."""

    def _copy_kv_slots(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        compact_kv(self, src_slots, dst_slots)
