"""vLLM 0.32's CPU paged KV cache layout, learned from vLLM's own op, and the readers over it.

KV cache layout: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
per layer; each ``(block, kv_head)`` tile of ``2 * block_size * head_size``
elements is laid out by vLLM's ``cpu_attn_reshape_and_cache`` in an
ISA-specific way (``vec``/``vec16``: K transposed ``[D, BS]`` then V
``[BS, D]``; ``amx``: VNNI-packed). :func:`probe_cache_layout` learns the
layout *from vLLM's own op* (it writes known values and reads where they
land), so reads and copies are correct for any ISA whose op runs on this host
and a layout change in a future vLLM fails loudly instead of silently.

Readers: :func:`gather_kv` (logical K/V of whole blocks), and the reading
plan the tree-attention kernel reuses across layers (:func:`kv_reads` +
:func:`read_kv`: whole tiles for the K-transposed layouts, flat element
indices from :func:`kv_gather_index` otherwise).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops

__all__ = [
    "CacheTileLayout",
    "KVReads",
    "gather_kv",
    "kv_gather_index",
    "kv_reads",
    "probe_cache_layout",
    "read_kv",
    "tile_view",
]


@dataclass(frozen=True)
class CacheTileLayout:
    """Where vLLM's CPU op puts token ``t``'s K/V inside a ``(block, kv_head)`` tile.

    A tile is ``kv_cache[b, h]`` flattened: ``2 * block_size * head_size``
    elements. ``k_offsets[t, d]`` / ``v_offsets[t, d]`` give the element offset
    of ``K[t, d]`` / ``V[t, d]``. ``k_transposed`` marks the ``vec``/``vec16``
    layout (K as ``[D, BS]`` then V as ``[BS, D]``), which has a strided fast path.
    """

    isa: str
    dtype: torch.dtype
    block_size: int
    head_size: int
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor
    k_transposed: bool

    @property
    def tile_numel(self) -> int:
        return 2 * self.block_size * self.head_size

    def slot_offsets(self) -> torch.Tensor:
        """``[block_size, 2 * head_size]``: K offsets then V offsets of each in-block slot."""
        return torch.cat([self.k_offsets, self.v_offsets], dim=1)


def _transposed_layout_offsets(block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(block_size).view(-1, 1)
    d = torch.arange(head_size).view(1, -1)
    k = d * block_size + t
    v = block_size * head_size + t * head_size + d
    return k, v


@functools.cache
def probe_cache_layout(
    isa: str, dtype: torch.dtype, block_size: int, head_size: int
) -> CacheTileLayout:
    """Learn the tile layout of ``ops.cpu_attn_reshape_and_cache`` for ``isa``.

    Writes one block of tokens whose values encode their own ``(K|V, t, d)``
    index (base-64 digits, exact in fp32/bf16/fp16) into a scratch cache,
    reads back where each one landed, checks the result is a bijection onto
    the tile that leaves other blocks untouched, and round-trips random data.
    Raises ``RuntimeError`` (naming isa/dtype/sizes) when the op does not run on
    this host or the layout is not a per-tile permutation.
    """
    bs, d = int(block_size), int(head_size)
    where = f"probe_cache_layout(isa={isa!r}, dtype={dtype}, block_size={bs}, head_size={d})"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"{where}: KV cache dtype must be fp32/bf16/fp16, found {dtype}")
    tile = 2 * bs * d
    base = 64
    num_digits = max(1, math.ceil(math.log(tile, base)))
    ids = torch.arange(tile, dtype=torch.int64)
    k_ids = ids[: bs * d].view(bs, 1, d)
    v_ids = ids[bs * d :].view(bs, 1, d)
    slots = torch.arange(bs, 2 * bs, dtype=torch.int64)  # block 1; block 0 must stay zero

    def write(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = torch.zeros(2, 1, bs, 2 * d, dtype=dtype)
        key_cache, value_cache = kv.view(2, 1, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa
        )
        return kv

    found = torch.zeros(tile, dtype=torch.int64)
    try:
        for p in range(num_digits):
            scale = base**p  # digit + 1, so that 0 means "not written"
            kv = write((k_ids // scale) % base + 1, (v_ids // scale) % base + 1)
            if bool(kv[0].ne(0).any()):
                raise RuntimeError(f"{where}: the op wrote outside the addressed block")
            got = kv[1].reshape(-1).to(torch.float64).round().to(torch.int64)
            if bool((got < 1).any()) or bool((got > base).any()):
                raise RuntimeError(
                    f"{where}: {(got < 1).sum().item()} of {tile} tile elements were not "
                    f"written by one full block of tokens; the layout is not a per-tile "
                    f"permutation"
                )
            found += (got - 1) * scale
    except RuntimeError as err:
        if str(err).startswith(where):
            raise
        raise RuntimeError(
            f"{where}: vLLM's cpu_attn_reshape_and_cache does not run on this host ({err}); "
            f"tree attention cannot read this KV cache layout"
        ) from err
    if not torch.equal(found.sort().values, ids):
        raise RuntimeError(f"{where}: the op's tile layout is not a bijection")
    offsets = torch.empty(tile, dtype=torch.int64)
    offsets[found] = torch.arange(tile, dtype=torch.int64)
    k_off = offsets[: bs * d].view(bs, d)
    v_off = offsets[bs * d :].view(bs, d)
    kt, vt = _transposed_layout_offsets(bs, d)
    layout = CacheTileLayout(
        isa=isa,
        dtype=dtype,
        block_size=bs,
        head_size=d,
        k_offsets=k_off,
        v_offsets=v_off,
        k_transposed=bool(torch.equal(k_off, kt) and torch.equal(v_off, vt)),
    )
    # Round-trip random data through the op and our reader.
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(bs, 1, d, generator=gen).to(dtype)
    v = torch.randn(bs, 1, d, generator=gen).to(dtype)
    kv = write(k, v)
    k_back, v_back = gather_kv(kv, torch.tensor([[1]]), layout)
    if not (torch.equal(k_back[0, 0], k[:, 0]) and torch.equal(v_back[0, 0], v[:, 0])):
        raise RuntimeError(f"{where}: random round trip through the learned layout failed")
    return layout


def tile_view(kv_cache: torch.Tensor, layout: CacheTileLayout, where: str) -> torch.Tensor:
    """``kv_cache`` viewed as ``[num_blocks, kv_heads, tile_numel]`` tiles, after
    checking its shape and dtype against ``layout`` (``ValueError`` naming ``where``)."""
    if kv_cache.dim() != 4:
        raise ValueError(f"{where}: kv_cache must be [num_blocks, kv_heads, block_size, 2*head_size], found shape {tuple(kv_cache.shape)}")
    nb, h, bs, c = kv_cache.shape
    if bs != layout.block_size or c != 2 * layout.head_size or kv_cache.dtype != layout.dtype:
        raise ValueError(
            f"{where}: kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} does not match the "
            f"layout (block_size={layout.block_size}, head_size={layout.head_size}, {layout.dtype})"
        )
    return kv_cache.view(nb, h, layout.tile_numel)


def gather_kv(
    kv_cache: torch.Tensor, blocks: torch.Tensor, layout: CacheTileLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical K and V of the listed blocks: ``[R, kv_heads, nblk * block_size, D]`` each.

    ``blocks`` is ``[R, nblk]`` (block ids, e.g. rows of the block table);
    token ``j`` of request ``r`` is at ``[r, :, j]``. Reads through the same
    code as :func:`medusa_vllm.engine.cpu.attention.paged_tree_attention`
    (:func:`kv_reads` + :func:`read_kv`).
    """
    tile_view(kv_cache, layout, "gather_kv")  # shape/dtype check
    r, nblk = blocks.shape
    h, length = kv_cache.shape[1], nblk * layout.block_size
    kt, v = read_kv(kv_cache, kv_reads(blocks, h, layout, length, kv_cache.device), r, layout)
    d = layout.head_size
    return kt.transpose(1, 2).view(r, h, length, d), v.view(r, h, length, d)


@dataclass(frozen=True)
class KVReads:
    """What to read from a paged cache for ``R`` requests, keys ``[0, length)``.

    Transposed (``vec``/``vec16``) tiles are read a whole ``(block, kv_head)``
    tile at a time (one ``index_select`` of ``blocks``) and viewed as
    ``K^T [D, BS]`` / ``V [BS, D]``; other layouts use flat element indices
    ``k_index``/``v_index`` (:func:`kv_gather_index`).
    """

    length: int
    blocks: torch.Tensor | None = None  # [R*nblk] tile rows (transposed layouts)
    k_index: torch.Tensor | None = None  # [R*Hkv*length*D] flat element indices
    v_index: torch.Tensor | None = None


def kv_reads(blocks: torch.Tensor, kv_heads: int, layout: CacheTileLayout, length: int,
             device: torch.device | str) -> KVReads:
    """Reading plan for ``blocks`` ``[R, nblk]``, keys ``[0, length)`` of each request."""
    if layout.k_transposed:
        return KVReads(length, blocks=blocks.reshape(-1).to(device=device, dtype=torch.long))
    k_idx, v_idx = kv_gather_index(blocks, kv_heads, layout, device)
    return KVReads(
        length,
        k_index=k_idx[:, :, :length].reshape(-1).contiguous(),
        v_index=v_idx[:, :, :length].reshape(-1).contiguous(),
    )


def read_kv(kv_cache: torch.Tensor, reads: KVReads, r: int, layout: CacheTileLayout
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``K^T [R*Hkv, D, length]`` and ``V [R*Hkv, length, D]`` of the planned requests."""
    nb, h, bs, _ = kv_cache.shape
    d, n = layout.head_size, reads.length
    if reads.blocks is not None:
        nblk = reads.blocks.numel() // r
        sel = kv_cache.view(nb, h, 2 * bs * d).index_select(0, reads.blocks).view(r, nblk, h, 2 * bs * d)
        kt = sel[..., : bs * d].view(r, nblk, h, d, bs).permute(0, 2, 3, 1, 4).reshape(r * h, d, nblk * bs)
        v = sel[..., bs * d :].view(r, nblk, h, bs, d).permute(0, 2, 1, 3, 4).reshape(r * h, nblk * bs, d)
        return kt[..., :n], v[:, :n]
    flat = kv_cache.view(-1)
    k = flat.index_select(0, reads.k_index).view(r * h, n, d)
    v = flat.index_select(0, reads.v_index).view(r * h, n, d)
    return k.transpose(1, 2), v


def kv_gather_index(blocks: torch.Tensor, kv_heads: int, layout: CacheTileLayout,
                    device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat element indices ``[R, kv_heads, nblk * block_size, D]`` of K and V
    in a ``[num_blocks, kv_heads, block_size, 2 * D]`` cache for the listed
    blocks (what :func:`gather_kv` reads), so that each layer's gather is one
    ``index_select`` on its flattened cache."""
    r, nblk = blocks.shape
    bs, d, tile = layout.block_size, layout.head_size, layout.tile_numel
    blocks = blocks.to(device=device, dtype=torch.long)
    base = (blocks.view(r, 1, nblk, 1, 1) * kv_heads
            + torch.arange(kv_heads, device=device).view(1, -1, 1, 1, 1)) * tile  # [R, H, nblk, 1, 1]
    k = base + layout.k_offsets.to(device).view(1, 1, 1, bs, d)
    v = base + layout.v_offsets.to(device).view(1, 1, 1, bs, d)
    return k.reshape(r, kv_heads, nblk * bs, d), v.reshape(r, kv_heads, nblk * bs, d)

