"""MedusaTreeCPUWorker: vLLM's CPU worker running the Medusa tree runner.

The plugin sets ``parallel_config.worker_cls`` to :class:`MedusaTreeCPUWorker`
for ``method: "medusa_tree"`` runs only; every other run keeps vLLM's worker.
The worker registers the CPU tree-attention backend and builds
:class:`medusa_vllm.engine.cpu.runner.MedusaTreeCPUModelRunner` in place of
vLLM's ``CPUModelRunner``. Once the model is loaded and the KV cache allocated
(``compile_or_warm_up_model``), ``tree: "auto"`` is fitted to this machine
(:func:`medusa_vllm.engine.cost_curve.fit_tree_at_startup`). A GPU worker would do
the same over vLLM's GPU worker (``docs/gpu-backend.md``).
"""

from __future__ import annotations

import vllm.v1.worker.cpu_worker as _cpu_worker
from vllm.utils.torch_utils import set_random_seed
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.worker_base import CompilationTimes

__all__ = ["MedusaTreeCPUWorker"]


class MedusaTreeCPUWorker(CPUWorker):
    """vLLM's CPU worker with the tree-attention backend and the Medusa tree runner."""

    def init_device(self) -> None:
        from medusa_vllm.engine.cpu.attention import register_tree_backend
        from medusa_vllm.engine.cpu.runner import MedusaTreeCPUModelRunner
        from medusa_vllm.engine.cpu.tree_kernel import kernel_enabled, tree_attention_op

        # Tree rows need the tree-attention backend; it must be registered
        # before the model (and its Attention layers) is built.
        register_tree_backend()
        # build (first use on this machine, ~1 min) or load the fused kernel now,
        # not in the middle of the first verification step
        if kernel_enabled():
            tree_attention_op()

        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError(
                "medusa_tree needs vLLM's V1 CPU model runner; unset VLLM_USE_V2_MODEL_RUNNER"
            )
        # CPUWorker.init_device builds `CPUModelRunner(...)` by module-global
        # name; point that name at the tree runner for this call only.
        original = _cpu_worker.CPUModelRunner
        _cpu_worker.CPUModelRunner = MedusaTreeCPUModelRunner
        try:
            super().init_device()
        finally:
            _cpu_worker.CPUModelRunner = original

    def compile_or_warm_up_model(self) -> CompilationTimes:
        from medusa_vllm.engine.cost_curve import fit_tree_at_startup

        times = super().compile_or_warm_up_model()
        # tree="auto": time this engine's own steps (or read their cached curve) and
        # switch to the tree fitted from them, before the first request
        fit_tree_at_startup(self.model_runner)
        # as vLLM does after its warm-up: generation's random state starts fresh
        set_random_seed(self.model_config.seed, self.parallel_config.data_parallel_index)
        return times
