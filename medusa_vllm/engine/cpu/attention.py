"""Tree attention for Medusa verification on vLLM 0.32's CPU paged KV cache.

A Medusa step verifies, per request, a flattened tree: root + ``n`` BFS nodes
scheduled as ``1 + n`` query tokens with linear KV slots, only the mask
differing from a causal chain (:mod:`medusa_vllm.engine.tree_plan`). vLLM's
C++ CPU kernel has no custom-mask argument and returns no LSE, so

- rows of requests *without* a tree (prefills, plain decodes) still go through
  the C++ kernel, unchanged (a batch without any tree takes exactly vLLM's
  code path); so do tree requests whose nodes form a chain (a chain-shaped
  tree, or the leading chain of a truncated one): there the ancestor mask is
  the causal mask;
- rows of tree requests are computed in torch (:func:`paged_tree_attention`):
  read the request's keys and values ``[0, P+1+n)`` from the paged cache
  (:mod:`medusa_vllm.engine.cpu.cache_layout`; the fresh tree K/V were written
  there by ``do_kv_cache_update`` before ``forward``), then batched matmuls +
  softmax with the additive mask ``[zeros(T, P) | ancestor(T, T) ? 0 : -inf]``,
  GQA folded into the query rows. :func:`tree_attention_reference` is the
  float64 brute force the tests compare against.

How the runner feeds it: before ``_build_attention_metadata`` runs, the runner
publishes a :class:`~medusa_vllm.engine.tree_plan.TreeBatch`
(:func:`~medusa_vllm.engine.tree_plan.tree_batch_context`).
:class:`TreeCPUAttentionMetadataBuilder.build` validates it against the
step's ``CommonAttentionMetadata`` and attaches a
:class:`~medusa_vllm.engine.tree_plan.TreePlan` (and the non-tree sub-batch
for the C++ kernel, :class:`PlainSubBatch`) to the metadata it returns; every
layer of the KV-cache group shares them. :func:`register_tree_backend` makes
vLLM's ``CPU_ATTN`` resolve to this backend (:data:`TREE_BACKEND_PATH`).

A GPU backend plugs in beside this one, not into it: see ``docs/gpu-backend.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionLayer, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from medusa_vllm.engine.cpu.cache_layout import (
    CacheTileLayout,
    KVReads,
    kv_reads,
    probe_cache_layout,
    read_kv,
    tile_view,
)
from medusa_vllm.engine.cpu.tree_kernel import kernel_enabled, tree_attention_op
from medusa_vllm.engine.tree_plan import TreePlan, get_tree_batch, plan_tree_batch

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import AttentionSpec

__all__ = [
    "TREE_BACKEND_PATH",
    "PlainSubBatch",
    "TreeCPUAttentionBackend",
    "TreeCPUAttentionBackendImpl",
    "TreeCPUAttentionMetadata",
    "TreeCPUAttentionMetadataBuilder",
    "paged_tree_attention",
    "register_tree_backend",
    "tree_attention_reference",
]

logger = logging.getLogger("vllm.plugins.medusa_vllm.engine.cpu.attention")

TREE_BACKEND_PATH = "medusa_vllm.engine.cpu.attention.TreeCPUAttentionBackend"


def register_tree_backend() -> None:
    """Make vLLM's ``CPU_ATTN`` resolve to :class:`TreeCPUAttentionBackend`.

    Idempotent. Must run in the worker process *before* the model is built
    (``Attention.__init__`` resolves the backend and vLLM caches the answer in
    ``vllm.v1.attention.selector._cached_get_attn_backend``).
    """
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    register_backend(AttentionBackendEnum.CPU_ATTN, TREE_BACKEND_PATH)



# ---------------------------------------------------------------- metadata
@dataclass(frozen=True)
class PlainSubBatch:
    """The non-tree requests of a tree step, for vLLM's C++ kernel.

    ``rows``: their batch rows, a ``slice`` when contiguous (no copies);
    ``metadata``: vLLM's CPU metadata of that sub-batch (own scheduler metadata).
    """

    rows: slice | torch.Tensor
    metadata: CPUAttentionMetadata


@dataclass
class TreeCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus an optional tree plan (``None``: vLLM's path).

    ``plain`` is the non-tree sub-batch of a tree step (``None`` when every
    request verifies a tree).
    """

    tree: TreePlan | None = None
    plain: PlainSubBatch | None = None


# ------------------------------------------------------- torch tree path
@dataclass(frozen=True)
class _LayerReads:
    """Per-step, per-(layout, KV heads, dtype) plan shared by all layers: what
    to read (keys up to the longest tree request's ``P + T``; nothing past it
    is visible to anyone) and the additive mask."""

    kv: KVReads
    bias: torch.Tensor  # [R*Hkv, group*T, length] additive mask (0 / -inf)


def _layer_reads(plan: TreePlan, layout: CacheTileLayout, kv_heads: int, group: int,
                 dtype: torch.dtype, device: torch.device) -> _LayerReads:
    length = int((plan.prefix_lens + plan.num_tokens).max())
    return _LayerReads(
        kv=kv_reads(plan.blocks, kv_heads, layout, length, device),
        bias=_additive_bias(plan.attn_mask[..., :length], kv_heads, group, dtype),
    )


def paged_tree_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    plan: TreePlan,
    layout: CacheTileLayout,
    scale: float,
) -> torch.Tensor:
    """Tree attention for the plan's rows: ``query`` ``[M, Hq, D]`` -> ``[M, Hq, D]``.

    Reads each tree request's ``[0, P+T)`` keys/values from the paged cache
    (whole tiles for the transposed CPU layouts, element indices otherwise;
    the reading plan is built by the first layer and reused by the others),
    then batched matmuls with the prefix+ancestor mask as an additive bias,
    GQA folded into the query rows. Device-agnostic torch.
    """
    tile_view(kv_cache, layout, "paged_tree_attention")  # shape/dtype check
    r, t_max = plan.valid.shape
    hq, d = query.shape[1], query.shape[2]
    hkv = kv_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"paged_tree_attention: {hq} query heads not divisible by {hkv} KV heads")
    group = hq // hkv
    key = (layout.isa, layout.dtype, layout.block_size, layout.head_size, hkv, query.dtype)
    reads = plan.layer_cache.get(key)
    if reads is None:
        reads = plan.layer_cache[key] = _layer_reads(plan, layout, hkv, group, query.dtype,
                                                     kv_cache.device)
    kt, v = read_kv(kv_cache, reads.kv, r, layout)
    dense = plan.dense
    if dense:  # rows are request-major, node order: no padding to scatter
        q = query.view(r, t_max, hq, d)
    else:
        q = query.new_zeros(r, t_max, hq, d)
        q[plan.valid] = query
    # GQA folded into the query length: the `group` query heads of a KV head
    # become group*T query rows against that head's keys; then two batched
    # matmuls and a softmax. (torch's SDPA with a boolean mask and enable_gqa
    # took ~10x longer per layer on CPU at these sizes.)
    qf = q.view(r, t_max, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(r * hkv, group * t_max, d)
    scores = torch.baddbmm(reads.bias, qf, kt.to(query.dtype), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.bmm(probs, v.to(query.dtype))  # [R*Hkv, group*T, D]
    out = out.view(r, hkv, group, t_max, d).permute(0, 3, 1, 2, 4).reshape(r, t_max, hq, d)
    return out.reshape(r * t_max, hq, d) if dense else out[plan.valid]


def _additive_bias(attn_mask: torch.Tensor, kv_heads: int, group: int, dtype: torch.dtype
                   ) -> torch.Tensor:
    """``[R, 1, T, L]`` boolean mask -> ``[R*kv_heads, group*T, L]`` additive bias
    (0 where visible, -inf elsewhere), laid out for :func:`paged_tree_attention`."""
    r, _, t, length = attn_mask.shape
    bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
    bias.masked_fill_(~attn_mask, float("-inf"))
    return bias.unsqueeze(2).expand(r, kv_heads, group, t, length).reshape(r * kv_heads, group * t, length)



def tree_attention_reference(
    query: torch.Tensor,
    tree_key: torch.Tensor,
    tree_value: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Brute force for one request: each node attends causally to prefix + its path.

    ``query`` ``[T, Hq, D]``; ``tree_key``/``tree_value`` ``[T, Hkv, D]`` (node
    order, root first); ``prefix_key``/``prefix_value`` ``[P, Hkv, D]``;
    ``tree_mask`` ``[>=T, >=T]`` ancestor-or-self mask. For node ``i`` the key
    sequence is ``prefix + [root, ..., i]`` and ``i`` is its last element, so a
    causal chain over it is exactly "everything". Computed in float64 with an
    explicit softmax per (node, head). Returns ``[T, Hq, D]`` in ``query.dtype``.
    """
    t, hq, _ = query.shape
    hkv = tree_key.shape[1]
    group = hq // hkv
    out = torch.empty(query.shape, dtype=torch.float64)
    q64 = query.to(torch.float64)
    for i in range(t):
        path = [j for j in range(i + 1) if bool(tree_mask[i, j])]
        keys = torch.cat([prefix_key, tree_key[path]]).to(torch.float64)
        vals = torch.cat([prefix_value, tree_value[path]]).to(torch.float64)
        for h in range(hq):
            kh = h // group
            scores = keys[:, kh] @ q64[i, h] * scale
            w = torch.softmax(scores, dim=0)
            out[i, h] = w @ vals[:, kh]
    return out.to(query.dtype)


# ----------------------------------------------------------------- backend
class TreeCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder, plus a :class:`TreePlan` when a tree batch is published.

    When speculative decoding is configured, the builder checks at start-up
    that tree rows can read its KV cache layout (``probe_cache_layout``); if
    the selected ISA cannot be read (e.g. ``amx`` packing the op cannot run),
    the whole group is switched to the ``vec`` ISA (writes and reads use it
    consistently) with a warning, or start-up fails with a clear error.
    """

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tree_layout: CacheTileLayout | None = None
        if (
            getattr(vllm_config, "speculative_config", None) is not None
            and not self.is_cross_attention
            and not self.is_encoder_only_attention
        ):
            self.tree_layout = self._tree_layout_or_fallback(layer_names)

    def _tree_layout_or_fallback(self, layer_names: list[str]) -> CacheTileLayout:
        from vllm.utils.torch_utils import is_quantized_kv_cache

        if is_quantized_kv_cache(self.kv_cache_dtype):
            raise NotImplementedError(
                f"medusa tree attention: kv_cache_dtype={self.kv_cache_dtype!r} is not supported "
                f"(tree rows read the cache in torch); use kv_cache_dtype='auto'"
            )
        try:
            return probe_cache_layout(self.isa, self.dtype, self.block_size, self.head_dim)
        except RuntimeError as err:
            if self.isa == "vec":
                raise
            fallback = "vec" if self.block_size % 32 == 0 else "vec16"
            layout = probe_cache_layout(fallback, self.dtype, self.block_size, self.head_dim)
            logger.warning(
                "medusa tree attention: cannot read the %r KV cache layout (%s); "
                "using ISA %r for this KV-cache group",
                self.isa,
                err,
                fallback,
            )
            self.isa = fallback
            self._set_isa_to_layers(layer_names)
            return layout

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TreeCPUAttentionMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        meta = TreeCPUAttentionMetadata(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        )
        tree_batch = get_tree_batch()
        if tree_batch is None or self.is_cross_attention or self.is_encoder_only_attention:
            return meta
        if self.tree_layout is None:
            self.tree_layout = self._tree_layout_or_fallback(self.layer_names)
        plan = plan_tree_batch(tree_batch, common_attn_metadata, self.block_size,
                               causal_exact=True)
        if plan is None:  # every tree is a chain: vLLM's causal kernel is exact
            return meta
        meta.plain = self._plain_sub_batch(plan, meta, common_attn_metadata)
        meta.tree = plan
        return meta

    def _plain_sub_batch(
        self, plan: TreePlan, meta: CPUAttentionMetadata, cm: CommonAttentionMetadata
    ) -> PlainSubBatch | None:
        """Sub-batch of the non-tree requests for the C++ kernel (own scheduler metadata)."""
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].to(torch.long)
        qlen = qsl[1:] - qsl[:-1]
        is_plain = qlen > 0
        is_plain[plan.req_indices.to("cpu")] = False
        plain = is_plain.nonzero().flatten()
        if plain.numel() == 0:
            return None
        rows = torch.cat([torch.arange(int(qsl[i]), int(qsl[i + 1])) for i in plain])
        n = rows.numel()
        first = int(rows[0])
        contiguous = int(rows[-1]) - first + 1 == n
        device = meta.query_start_loc.device
        plain_dev = plain.to(device)
        sub_qsl = torch.zeros(plain.numel() + 1, dtype=meta.query_start_loc.dtype)
        sub_qsl[1:] = torch.cumsum(qlen[plain], 0)
        sub_qsl = sub_qsl.to(device)
        seq_lens = meta.seq_lens[plain_dev]
        dynamic_causal = (
            meta.dynamic_causal[plain_dev] if meta.dynamic_causal is not None else None
        )
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=plain.numel(),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            seq_lens=seq_lens,
            dtype=self.dtype,
            query_start_loc=sub_qsl,
            causal=meta.causal,
            sliding_window_size=self.window_size,
            isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        metadata = dataclasses.replace(
            CPUAttentionMetadata(
                **{f.name: getattr(meta, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
            ),
            num_actual_tokens=n,
            max_query_len=int(qlen[plain].max()),
            query_start_loc=sub_qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            block_table=meta.block_table[plain_dev],
            slot_mapping=meta.slot_mapping[rows.to(device)],
            scheduler_metadata=scheduler_metadata,
            dynamic_causal=dynamic_causal,
        )
        return PlainSubBatch(
            rows=slice(first, first + n) if contiguous else rows.to(device), metadata=metadata
        )


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    """vLLM's CPU impl; tree rows go through the fused C++ kernel
    (:mod:`medusa_vllm.engine.cpu.tree_kernel`), or :func:`paged_tree_attention`
    where it is unavailable."""

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TreeCPUAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = getattr(attn_metadata, "tree", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale, output_block_scale,
            )
        self._check_tree_supported(layer, output_scale, output_block_scale)
        plain = attn_metadata.plain
        if plain is not None:
            rows = plain.rows
            if isinstance(rows, slice):
                super().forward(
                    layer, query[rows], key, value, kv_cache, plain.metadata, output[rows]
                )
            else:
                sub_out = output.new_empty((rows.numel(), *output.shape[1:]))
                super().forward(
                    layer, query[rows], key, value, kv_cache, plain.metadata, sub_out
                )
                output[rows] = sub_out
        bs, c = kv_cache.shape[2], kv_cache.shape[3]
        if bs != plan.block_size:
            raise ValueError(
                f"tree attention: kv_cache block size {bs} != planned block size {plan.block_size}"
            )
        layout = probe_cache_layout(layer.isa, kv_cache.dtype, bs, c // 2)
        kernel = tree_attention_op() if kernel_enabled() else None
        if kernel is not None and query.dtype == kv_cache.dtype:
            out = kernel(query[plan.rows], kv_cache, layout.k_offsets, layout.v_offsets,
                         layout.k_transposed, plan.blocks, plan.prefix_lens, plan.num_tokens,
                         plan.tree_mask, self.scale)
        else:
            out = paged_tree_attention(query[plan.rows], kv_cache, plan, layout, self.scale)
        output[plan.rows] = out.to(output.dtype)
        return output

    def tree_unsupported(self) -> list[str]:
        """This layer's features that tree rows do not implement (checked for every
        layer when the model is loaded, so such a model is refused at start-up)."""
        unsupported = {
            "sliding_window": self.sliding_window != -1,
            "alibi_slopes": self.alibi_slopes is not None,
            "logits_soft_cap": bool(self.logits_soft_cap),
            "sinks": self.sinks is not None,
            "fp8 kv cache": self.is_fp8_kv_cache,
        }
        return [name for name, on in unsupported.items() if on]

    def _check_tree_supported(
        self,
        layer: AttentionLayer,
        output_scale: torch.Tensor | None,
        output_block_scale: torch.Tensor | None,
    ) -> None:
        bad = self.tree_unsupported()
        if output_scale is not None or output_block_scale is not None:
            bad.append("fused output quantization")
        if bad:
            raise NotImplementedError(
                f"medusa tree attention (layer {getattr(layer, 'layer_name', '?')}): "
                f"{', '.join(bad)} not supported for tree rows"
            )


class TreeCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with tree rows; same name, KV cache shape and layouts as vLLM's."""

    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionBackendImpl]:
        return TreeCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[TreeCPUAttentionMetadataBuilder]:
        return TreeCPUAttentionMetadataBuilder
