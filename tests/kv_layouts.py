"""The CPU KV cache layouts the attention and KV-copy tests run over, and the host checks.

vLLM 0.32 picks one layout per KV-cache group (``cpu_attn._get_attn_isa``):
``vec16`` when the head size is a multiple of 16 but not of 32 (or the block
size is not a multiple of 32), else ``amx`` for bf16 on CPUs with AMX tiles,
else ``vec``. On the CPUs this project meets (AVX2-only, AVX-512,
AVX-512 + AMX) that is ``vec``, ``vec16`` or ``amx``; the tests cover each
``(isa, dtype)`` explicitly instead of whatever this host happens to pick, and
skip only the layouts this host cannot run, saying why.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from medusa_vllm.engine.cpu.cache_layout import CacheTileLayout, probe_cache_layout

BLOCK = 32


class Layout(NamedTuple):
    isa: str
    dtype: torch.dtype
    head_size: int

    @property
    def id(self) -> str:
        return f"{self.isa}-{str(self.dtype).removeprefix('torch.')}-d{self.head_size}"


FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# every (isa, dtype) vLLM can pick here; head size 80 is what makes vLLM pick vec16
LAYOUTS = [
    Layout("vec", FP32, 64), Layout("vec", BF16, 64), Layout("vec", FP16, 64),
    Layout("vec16", FP32, 80), Layout("vec16", BF16, 80), Layout("vec16", FP16, 80),
    Layout("amx", BF16, 64),
]
TRANSPOSED = [layout for layout in LAYOUTS if layout.isa in ("vec", "vec16")]


def params(layouts: list[Layout]) -> list:
    return [pytest.param(layout, id=layout.id) for layout in layouts]


def require_writable(layout: Layout, block_size: int = BLOCK) -> CacheTileLayout:
    """The learned tile layout, or skip: vLLM's cache writer does not run for
    this isa on this host (``probe_cache_layout`` says so, with vLLM's error)."""
    try:
        return probe_cache_layout(layout.isa, layout.dtype, block_size, layout.head_size)
    except RuntimeError as err:
        pytest.skip(f"{layout.id}: this host cannot write the layout: {err}")


def require_kernel(layout: Layout, block_size: int = BLOCK) -> CacheTileLayout:
    """:func:`require_writable`, and skip ``amx`` where vLLM's attention kernel
    cannot run it: vLLM selects ``amx`` only on CPUs with AMX tiles."""
    tile_layout = require_writable(layout, block_size)
    if layout.isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip(
            f"{layout.id}: this host has no AMX tiles (torch.cpu._is_amx_tile_supported() is "
            f"False); vLLM's amx attention kernel needs them and vLLM never selects amx here"
        )
    return tile_layout
