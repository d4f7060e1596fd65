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


def allocate_kv_caches(dtype: torch.dtype, head_size: int, *, kv_heads: int, num_blocks: int,
                       layers: tuple[str, ...] = ("l0",)):
    """Per-layer KV caches exactly as vLLM 0.32 allocates them (LBHNC layer views,
    ``[num_blocks, kv_heads, BLOCK, 2 * head_size]``), and their spec."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
    )
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=head_size,
                             dtype=dtype)
    page = spec.page_size_bytes
    cfg = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=page * num_blocks * len(layers), layers=list(layers),
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(list(layers), spec)],
    )
    caches = allocate_kv_cache(cfg, torch.device("cpu"), KVCacheLayout.LBHNC, [BLOCK])
    for kv in caches.values():
        assert tuple(kv.shape) == (num_blocks, kv_heads, BLOCK, 2 * head_size)
    return caches, spec


def write_kv(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
             isa: str) -> None:
    """Write K/V rows into one layer's cache at ``slots`` with vLLM's own op for ``isa``."""
    from vllm import _custom_ops as ops

    key_cache, value_cache = kv.view(kv.shape[0], kv.shape[1], 2 * kv.shape[2], -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
