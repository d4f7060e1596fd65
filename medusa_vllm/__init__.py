"""medusa-vllm: Medusa speculative decoding (tree attention, typical acceptance,
lossless tree rejection sampling, training) as a vLLM plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["MedusaHeadsConfig", "MedusaHeads", "MedusaTree"]

if TYPE_CHECKING:
    from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
    from medusa_vllm.core.tree import MedusaTree

_LAZY = {
    "MedusaHeadsConfig": "medusa_vllm.core.heads",
    "MedusaHeads": "medusa_vllm.core.heads",
    "MedusaTree": "medusa_vllm.core.tree",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import medusa_vllm.engine.plugin` (run by vLLM in every process)
    # stays cheap and does not depend on optional modules.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medusa_vllm' has no attribute {name!r}")
