"""KV compaction after tree verification: exact slot-to-slot copies in vLLM's CPU KV cache.

During verification, tree node ``i`` of a request wrote its K/V at the slot of
linear position ``P + i`` (``P`` = root position). After acceptance of the
path ``[0, n_1, ..., n_a]`` (root first, node indices in BFS order), the next
step expects the accepted tokens contiguous: node ``n_d`` must end up at
position ``P + d``. vLLM never moves KV, so the worker does it here, on every
TP rank (each holds its own KV-head shard), before the scheduler can hash the
blocks and before the next forward. Which slots move is device-agnostic index
math (:func:`medusa_vllm.engine.tree_plan.compaction_slots`); this module does
the copies on the CPU cache.

Copies are exact element copies inside vLLM's paged CPU cache, addressed
through the tile layout learned from vLLM's own ``cpu_attn_reshape_and_cache``
(:func:`medusa_vllm.engine.cpu.cache_layout.probe_cache_layout`), so they work for any ISA
layout whose op runs on this host, never requantize, and need no stashed K/V.
All sources are read before any destination is written, so overlapping moves
(a destination that is another move's source) are safe. One gather and one
scatter per layer, batched over all requests, through flat element offsets
computed once per step for all layers of the same cache shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from medusa_vllm.engine.cpu.cache_layout import CacheTileLayout, probe_cache_layout, tile_view

if TYPE_CHECKING:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

__all__ = ["compact_kv", "compact_layer"]


def _slots_1d(x: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D integer tensor of slots, found {t.dtype} {tuple(t.shape)}")
    return t.to(torch.long)


def _checked_slots(
    src_slots: torch.Tensor, dst_slots: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    src = _slots_1d(src_slots, "src_slots")
    dst = _slots_1d(dst_slots, "dst_slots")
    if src.numel() != dst.numel():
        raise ValueError(f"src_slots ({src.numel()}) and dst_slots ({dst.numel()}) must have the same length")
    if src.numel():
        if dst.unique().numel() != dst.numel():
            raise ValueError(f"dst_slots: duplicate destinations in {dst.tolist()}")
        lo, hi = int(torch.minimum(src.min(), dst.min())), int(torch.maximum(src.max(), dst.max()))
        if lo < 0 or hi >= num_slots:
            raise ValueError(f"slots must be in [0, {num_slots}) for this cache, found range [{lo}, {hi}]")
    return src, dst


def element_index(
    slots: torch.Tensor, kv_shape: torch.Size, layout: CacheTileLayout
) -> torch.Tensor:
    """Flat element offsets ``[len(slots) * kv_heads * 2 * head_size]`` of the K and V
    of ``slots`` in a contiguous ``[num_blocks, kv_heads, block_size, 2*head_size]``
    cache laid out as ``layout``: the same for every layer of that shape."""
    _, h, bs, _ = kv_shape
    offs = layout.slot_offsets().to(slots.device)  # [BS, 2D] within a tile
    tile = (slots // bs).view(-1, 1, 1) * h + torch.arange(h, device=slots.device).view(1, -1, 1)
    return (tile * layout.tile_numel + offs[slots % bs].unsqueeze(1)).reshape(-1)


def _compaction_index(
    kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
    layout: CacheTileLayout, where: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked flat element offsets (sources, destinations) of a compaction in
    ``kv_cache`` (and in every cache of its shape and layout)."""
    tile_view(kv_cache, layout, where)  # shape / dtype check
    nb, _, bs, _ = kv_cache.shape
    src, dst = _checked_slots(src_slots, dst_slots, nb * bs)
    src, dst = src.to(kv_cache.device), dst.to(kv_cache.device)
    return (element_index(src, kv_cache.shape, layout),
            element_index(dst, kv_cache.shape, layout))


def _copy_elements(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    if not kv_cache.is_contiguous():  # vLLM's CPU_ATTN layer caches are (LBHNC, one layer)
        raise NotImplementedError(
            f"KV compaction: a layer cache with strides {kv_cache.stride()} is not contiguous; "
            f"only vLLM's CPU_ATTN layout (one contiguous [blocks, kv_heads, block_size, "
            f"2*head_size] tensor per layer) is supported")
    flat = kv_cache.view(-1)
    flat.index_copy_(0, dst, flat.index_select(0, src))  # every source read before any write


def compact_layer(
    kv_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    layout: CacheTileLayout,
) -> None:
    """Copy the K/V of ``src_slots[i]`` to ``dst_slots[i]`` in one layer's cache, in place.

    ``kv_cache``: ``[num_blocks, kv_heads, block_size, 2*head_size]`` (vLLM's CPU
    layer view). Every other slot is left bit-identical.
    """
    src, dst = _compaction_index(kv_cache, src_slots, dst_slots, layout, "compact_layer")
    if src.numel():
        _copy_elements(kv_cache, src, dst)


def _attention_layers(runner: CPUModelRunner, group_id: int | None) -> list[tuple[str, object]]:
    groups = runner.kv_cache_config.kv_cache_groups
    ctx = runner.compilation_config.static_forward_context
    with_layers = [
        g for g, group in enumerate(groups)
        if any(isinstance(getattr(ctx.get(n), "kv_cache", None), torch.Tensor) for n in group.layer_names)
    ]
    if group_id is None:
        if len(with_layers) > 1:
            raise NotImplementedError(
                f"compact_kv: KV-cache groups {with_layers} all hold attention layers and have their "
                f"own block tables; call compact_kv once per group with group_id and that group's slots"
            )
        group_id = with_layers[0] if with_layers else 0
    if not 0 <= group_id < len(groups):
        raise ValueError(f"compact_kv: group_id {group_id} out of range (runner has {len(groups)} groups)")
    return [(n, ctx[n]) for n in groups[group_id].layer_names if n in ctx]


def compact_kv(
    runner: CPUModelRunner,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    group_id: int | None = None,
) -> int:
    """Compact every attention layer of a vLLM CPU model runner; returns layers touched.

    Walks ``runner.kv_cache_config.kv_cache_groups[group_id].layer_names`` and
    the layer objects in ``runner.compilation_config.static_forward_context``
    (as ``CPUModelRunner._zero_block_ids`` does), skipping layers that share a
    cache tensor with an earlier one (KV sharing). The slots must come from
    that group's slot mapping. ``group_id=None``: the only group with
    attention layers (error if there are several).
    """
    src = _slots_1d(src_slots, "src_slots")
    dst = _slots_1d(dst_slots, "dst_slots")
    if src.numel() == 0:
        return 0
    seen: set[int] = set()
    touched = 0
    # the slots are checked and turned into element offsets once per cache shape and
    # layout (every layer of a model shares them), not once per layer
    index: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in _attention_layers(runner, group_id):
        kv = getattr(layer, "kv_cache", None)
        if not isinstance(kv, torch.Tensor) or kv.numel() == 0 or kv.data_ptr() in seen:
            continue
        seen.add(kv.data_ptr())
        isa = getattr(layer, "isa", None)
        if isa is None:
            raise RuntimeError(
                f"compact_kv: layer {name} has no .isa (set by vLLM's CPU attention metadata "
                f"builder); is it a CPU_ATTN layer?"
            )
        if kv.dim() != 4:
            raise NotImplementedError(
                f"compact_kv: layer {name} cache has shape {tuple(kv.shape)}; only "
                f"[blocks, kv_heads, block_size, 2*head_size] (CPU_ATTN) caches are supported"
            )
        layout = probe_cache_layout(isa, kv.dtype, kv.shape[2], kv.shape[3] // 2)
        key = (id(layout), tuple(kv.shape), kv.device)
        if key not in index:
            index[key] = _compaction_index(kv, src, dst, layout, "compact_kv")
        _copy_elements(kv, *index[key])
        touched += 1
    return touched
