"""The floating-point dtypes heads, caches and backbones are stored or computed in, by config name."""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES", "dtype_name"]

# config / CLI name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a ``torch_dtype`` config value)."""
    return str(dtype).removeprefix("torch.")
