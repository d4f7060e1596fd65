"""Tree attention for Medusa verification on vLLM 0.32's CPU paged KV cache.

A Medusa step verifies, per request, a *flattened tree*: the root (the token
sampled last step, at position ``P``) plus ``n`` candidate nodes in BFS order.
vLLM schedules them as ``1 + n`` ordinary query tokens with linear KV slots
``P .. P+n``; only the attention mask differs from a causal chain: node ``i``
may see the whole prefix ``[0, P)`` plus its own ancestors-or-self inside the
tree. vLLM's C++ CPU kernel has no custom-mask argument and returns no LSE, so

- rows of requests *without* a tree (prefills, plain decodes) still go through
  the C++ kernel, unchanged (a batch without any tree takes exactly vLLM's
  code path); so do tree requests whose nodes form a chain (a chain-shaped
  tree, or the leading chain of a truncated one): there the ancestor mask is
  the causal mask;
- rows of tree requests are computed in torch: read the request's keys and
  values ``[0, P+1+n)`` from the paged cache (whole ``(block, kv_head)`` tiles
  for the K-transposed ``vec``/``vec16`` layouts, element indices otherwise;
  the fresh tree K/V were written there by ``do_kv_cache_update`` before
  ``forward``), then batched matmuls + softmax with the additive mask
  ``[zeros(T, P) | ancestor(T, T) ? 0 : -inf]``, GQA folded into the query rows.

How the runner feeds it: before ``_build_attention_metadata`` runs, the runner
publishes a :class:`TreeBatch` (``set_tree_batch`` or ``tree_batch_context``).
:class:`TreeCPUAttentionMetadataBuilder.build` validates it against the
step's ``CommonAttentionMetadata`` and attaches a :class:`TreePlan` to the
metadata it returns; every layer of the KV-cache group shares that plan.

KV cache layout: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
per layer; each ``(block, kv_head)`` tile of ``2 * block_size * head_size``
elements is laid out by vLLM's ``cpu_attn_reshape_and_cache`` in an
ISA-specific way (``vec``/``vec16``: K transposed ``[D, BS]`` then V
``[BS, D]``; ``amx``: VNNI-packed). :func:`probe_cache_layout` learns the
layout *from vLLM's own op* (it writes known values and reads where they
land), so gathers are correct for any ISA whose op runs on this host and a
layout change in a future vLLM fails loudly instead of silently.

GPU port: :func:`paged_tree_attention` and :func:`tree_attention_reference` are
device-agnostic torch; a GPU backend would subclass its paged backend the same
way (``FLASH_ATTN``'s impl/builder), replace :func:`gather_kv` with the GPU
cache layout ``[2, num_blocks, block_size, H, D]`` (a plain ``index_select``) or,
better, pass the tree mask as the kernel's query-query bias (the old
``TREE_ATTN`` backend's ``qq_bias``) and skip the gather entirely.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

__all__ = [
    "TREE_BACKEND_PATH",
    "CacheTileLayout",
    "TreeBatch",
    "TreeCPUAttentionBackend",
    "TreeCPUAttentionBackendImpl",
    "TreeCPUAttentionMetadata",
    "TreeCPUAttentionMetadataBuilder",
    "TreePlan",
    "causal_rows",
    "gather_kv",
    "get_tree_batch",
    "paged_tree_attention",
    "plan_tree_batch",
    "probe_cache_layout",
    "register_tree_backend",
    "set_tree_batch",
    "tree_attention_reference",
    "tree_batch_context",
]

logger = logging.getLogger("vllm.plugins.medusa_vllm.attention")

TREE_BACKEND_PATH = "medusa_vllm.attention.TreeCPUAttentionBackend"


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


# --------------------------------------------------------------- tree batch
@dataclass(frozen=True)
class TreeBatch:
    """Runner -> backend: the requests of this step that verify a tree.

    All tensors are 1-D with one entry per tree request (R of them), in any
    order, except ``tree_mask``.

    - ``query_start``: batch row of the request's root (its ``query_start_loc``).
    - ``num_tokens``: ``T = 1 + n`` query rows (root + ``n`` BFS nodes).
    - ``prefix_lens``: ``P``, tokens already in the KV cache before the root
      (``num_computed_tokens``).
    - ``tree_mask``: ``[N+1, N+1]`` bool, ``[i, j]`` iff node ``j`` is ``i`` or an
      ancestor of ``i`` (static tree, node 0 = root, BFS order); a request with
      ``n`` nodes uses the top-left ``[n+1, n+1]`` slice.
    - ``req_indices``: optional request row in the batch; derived from
      ``query_start`` when omitted.
    """

    query_start: torch.Tensor
    num_tokens: torch.Tensor
    prefix_lens: torch.Tensor
    tree_mask: torch.Tensor
    req_indices: torch.Tensor | None = None


_CURRENT_TREE_BATCH: TreeBatch | None = None


def set_tree_batch(tree_batch: TreeBatch | None) -> None:
    """Publish (or clear with ``None``) the tree batch the next metadata build uses."""
    global _CURRENT_TREE_BATCH
    if tree_batch is not None and not isinstance(tree_batch, TreeBatch):
        raise TypeError(
            f"set_tree_batch: expected a TreeBatch or None, found {type(tree_batch).__name__}"
        )
    _CURRENT_TREE_BATCH = tree_batch


def get_tree_batch() -> TreeBatch | None:
    """The tree batch published for the current step, if any."""
    return _CURRENT_TREE_BATCH


@contextmanager
def tree_batch_context(tree_batch: TreeBatch | None) -> Iterator[None]:
    """``with tree_batch_context(tb): super()._build_attention_metadata(...)``.

    Scopes the tree batch to one metadata build so that a later dummy run can
    never pick up a stale one.
    """
    previous = get_tree_batch()
    set_tree_batch(tree_batch)
    try:
        yield
    finally:
        set_tree_batch(previous)


# ------------------------------------------------------------ cache layout
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


def _tiles(kv_cache: torch.Tensor, layout: CacheTileLayout, where: str) -> torch.Tensor:
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
    code as :func:`paged_tree_attention` (:func:`_kv_reads` + :func:`_read_kv`).
    """
    _tiles(kv_cache, layout, "gather_kv")  # shape/dtype check
    r, nblk = blocks.shape
    h, length = kv_cache.shape[1], nblk * layout.block_size
    kt, v = _read_kv(kv_cache, _kv_reads(blocks, h, layout, length, kv_cache.device), r, layout)
    d = layout.head_size
    return kt.transpose(1, 2).view(r, h, length, d), v.view(r, h, length, d)


# -------------------------------------------------------------------- plan
@dataclass
class TreePlan:
    """Per-step tree attention plan, shared by all layers of a KV-cache group.

    - ``rows``: ``[M]`` batch rows of all tree tokens (request-major, node order),
      or a ``slice`` when they are contiguous.
    - ``valid``: ``[R, T_max]`` which ``(request, node)`` slots are real.
    - ``blocks``: ``[R, nblk]`` kernel block ids covering ``[0, P+T)``.
    - ``attn_mask``: ``[R, 1, T_max, nblk*block_size]`` bool SDPA mask.
    - ``plain_rows`` / ``plain_metadata``: the non-tree sub-batch for the C++
      kernel (``None`` when every request verifies a tree); ``plain_rows`` is a
      ``slice`` when those rows are contiguous (no copies).
    """

    req_indices: torch.Tensor
    num_tokens: torch.Tensor
    prefix_lens: torch.Tensor
    rows: slice | torch.Tensor
    valid: torch.Tensor
    blocks: torch.Tensor
    attn_mask: torch.Tensor
    block_size: int
    plain_rows: slice | torch.Tensor | None = None
    plain_metadata: CPUAttentionMetadata | None = None
    # built by the first layer, reused by every other layer of the step: one
    # _LayerReads (what to read from the cache + the additive mask) per layout/GQA shape
    layer_cache: dict = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        """Every tree request has ``T_max`` tokens (no query padding needed)."""
        return bool(self.valid.all())


@dataclass
class TreeCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus an optional tree plan (``None``: vLLM's path)."""

    tree: TreePlan | None = None


def _as_long_1d(x, name: str) -> np.ndarray:
    t = x.detach().to("cpu").numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if t.ndim != 1:
        raise ValueError(f"TreeBatch.{name}: expected a 1-D tensor, found shape {tuple(t.shape)}")
    if t.dtype.kind not in "iu":
        raise ValueError(f"TreeBatch.{name}: expected integers, found {t.dtype}")
    return t.astype(np.int64, copy=False)


# Tree masks already validated, by identity: the runner publishes the same
# static mask every step, so the O(N^2) checks (and causal_rows) run once, not per step.
_VALID_MASKS: dict[int, tuple[torch.Tensor, np.ndarray, int]] = {}


def _validate_tree_mask(mask: torch.Tensor) -> tuple[np.ndarray, int]:
    """The validated mask as numpy, and its :func:`causal_rows`."""
    hit = _VALID_MASKS.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1], hit[2]
    m = torch.as_tensor(mask).to("cpu")
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise ValueError(f"TreeBatch.tree_mask: expected a square [N+1, N+1] tensor, found shape {tuple(m.shape)}")
    if m.dtype != torch.bool:
        raise ValueError(f"TreeBatch.tree_mask: expected dtype bool, found {m.dtype}")
    if not bool(m.diagonal().all()) or not bool(m[:, 0].all()):
        raise ValueError("TreeBatch.tree_mask: every node must see itself and the root (column 0)")
    if bool(m.triu(1).any()):
        raise ValueError(
            "TreeBatch.tree_mask: found an ancestor after its descendant; nodes must be in BFS "
            "order (parents before children)"
        )
    arr = m.numpy().copy()
    chain = causal_rows(arr)
    if isinstance(mask, torch.Tensor):
        if len(_VALID_MASKS) >= 16:
            _VALID_MASKS.clear()
        _VALID_MASKS[id(mask)] = (mask, arr, chain)
    return arr, chain


def causal_rows(mask: np.ndarray) -> int:
    """How many leading nodes of a BFS tree mask form a chain (root, its child,
    that child's child, ...): for a request verifying at most that many rows,
    the ancestor mask *is* the causal mask, so vLLM's kernel is exact for it."""
    n = mask.shape[0]
    lower = np.tril(np.ones((n, n), dtype=bool))
    ok = (mask == lower).all(axis=1)
    return n if ok.all() else int(np.argmin(ok))


def plan_tree_batch(
    tree_batch: TreeBatch, cm: CommonAttentionMetadata, block_size: int,
    causal_exact: bool = False,
) -> TreePlan | None:
    """Validate ``tree_batch`` against the step's metadata and build the tree plan.

    With ``causal_exact``, requests whose rows all lie on the tree's leading
    chain (:func:`causal_rows`: a chain-shaped tree, or a tree truncated to
    its chain) are left to vLLM's causal kernel, exact for them; returns
    ``None`` when no request is left.

    Raises ``ValueError`` naming the ``TreeBatch`` field when it disagrees with
    ``query_start_loc`` / ``seq_lens`` (e.g. a stale tree batch left over from
    an earlier step: clear it with ``set_tree_batch(None)``). Index math runs
    in numpy (a few microseconds per call, against ~10 per small torch op on
    CPU): this runs once per step on the critical path.
    """
    num_reqs = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: num_reqs + 1].numpy().astype(np.int64)
    qlen = qsl[1:] - qsl[:-1]
    seq_lens = cm.seq_lens[:num_reqs].to("cpu").numpy().astype(np.int64)
    start = _as_long_1d(tree_batch.query_start, "query_start")
    ntok = _as_long_1d(tree_batch.num_tokens, "num_tokens")
    plen = _as_long_1d(tree_batch.prefix_lens, "prefix_lens")
    mask, chain_rows = _validate_tree_mask(tree_batch.tree_mask)
    r = start.size
    if ntok.size != r or plen.size != r:
        raise ValueError(
            f"TreeBatch: query_start/num_tokens/prefix_lens must have one entry per tree request, "
            f"found lengths {r}/{ntok.size}/{plen.size}"
        )
    if r == 0:
        raise ValueError("TreeBatch: no tree requests; publish None instead of an empty TreeBatch")
    stale = " (stale TreeBatch from another step? clear it with set_tree_batch(None))"
    if tree_batch.req_indices is None:
        # last request whose start <= query_start (skips zero-length requests)
        req = np.clip(np.searchsorted(qsl[:-1], start, side="right") - 1, 0, None)
    else:
        req = _as_long_1d(tree_batch.req_indices, "req_indices")
        if req.size != r:
            raise ValueError(f"TreeBatch.req_indices: expected {r} entries, found {req.size}")
    if ((req < 0) | (req >= num_reqs)).any() or not np.array_equal(qsl[req], start):
        raise ValueError(
            f"TreeBatch.query_start {start.tolist()} does not match query_start_loc "
            f"{qsl.tolist()}{stale}"
        )
    if np.unique(req).size != r:
        raise ValueError(f"TreeBatch.query_start: duplicate requests in {start.tolist()}")
    if (ntok < 1).any() or (ntok > mask.shape[0]).any():
        raise ValueError(
            f"TreeBatch.num_tokens {ntok.tolist()}: each must be in [1, {mask.shape[0]}] "
            f"(tree_mask has {mask.shape[0]} nodes)"
        )
    if not np.array_equal(qlen[req], ntok):
        raise ValueError(
            f"TreeBatch.num_tokens {ntok.tolist()} != scheduled query lengths "
            f"{qlen[req].tolist()}{stale}"
        )
    if (plen < 0).any() or not np.array_equal(seq_lens[req], plen + ntok):
        raise ValueError(
            f"TreeBatch.prefix_lens {plen.tolist()}: expected seq_lens - num_tokens = "
            f"{(seq_lens[req] - ntok).tolist()}{stale}"
        )

    if causal_exact:
        keep = ntok > chain_rows
        if not keep.any():
            return None
        req, start, ntok, plen = req[keep], start[keep], ntok[keep], plen[keep]
        r = start.size
    t_max = int(ntok.max())
    total = plen + ntok
    nblk = int((int(total.max()) + block_size - 1) // block_size)
    length = nblk * block_size
    bt = cm.block_table_tensor
    if bt.shape[1] < nblk:
        raise ValueError(
            f"block_table has {bt.shape[1]} columns but a tree request needs {nblk} blocks "
            f"of {block_size} tokens"
        )
    blocks = bt[torch.from_numpy(req).to(bt.device), :nblk].to("cpu").numpy().astype(np.int64)
    needed = (total + block_size - 1) // block_size
    blocks[np.arange(nblk)[None, :] >= needed[:, None]] = 0  # null block, masked out

    # prefix columns [0, P) for every query row, then the [T, T] ancestor block
    # at columns [P, P+T) (T_max spare columns: a short tree right at the end
    # of the gathered length still writes its padding columns in bounds)
    node = np.arange(t_max)
    valid = node[None, :] < ntok[:, None]  # [R, T_max]
    tree = mask[None, :t_max, :t_max] & valid[:, None, :] & valid[:, :, None]
    # padding query rows only see the root, so no row is fully masked (no NaN)
    tree[:, :, 0] |= ~valid
    prefix = np.arange(length + t_max)[None, None, :] < plen[:, None, None]  # [R, 1, W]
    attn_mask = np.repeat(prefix, t_max, axis=1)  # [R, T_max, W]
    cols = plen[:, None] + node[None, :]  # [R, T_max]
    attn_mask[np.arange(r)[:, None, None], node[None, :, None], cols[:, None, :]] = tree
    attn_mask = np.ascontiguousarray(attn_mask[:, :, :length])  # shared by every layer

    offsets = np.cumsum(ntok) - ntok
    rows = np.arange(int(ntok.sum())) + np.repeat(qsl[req] - offsets, ntok)
    device = cm.query_start_loc.device

    def dev(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(device)

    # contiguous tree rows (e.g. every request of the step verifies a tree):
    # a slice, so each layer reads and writes them without index copies
    contiguous = int(rows[-1]) - int(rows[0]) + 1 == rows.size
    return TreePlan(
        req_indices=dev(req),
        num_tokens=dev(ntok),
        prefix_lens=dev(plen),
        rows=slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else dev(rows),
        valid=dev(valid),
        blocks=dev(blocks),
        attn_mask=dev(attn_mask).unsqueeze(1),
        block_size=block_size,
    )


# ------------------------------------------------------- torch tree path
@dataclass(frozen=True)
class _KVReads:
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


def _kv_reads(blocks: torch.Tensor, kv_heads: int, layout: CacheTileLayout, length: int,
              device: torch.device | str) -> _KVReads:
    """Reading plan for ``blocks`` ``[R, nblk]``, keys ``[0, length)`` of each request."""
    if layout.k_transposed:
        return _KVReads(length, blocks=blocks.reshape(-1).to(device=device, dtype=torch.long))
    k_idx, v_idx = kv_gather_index(blocks, kv_heads, layout, device)
    return _KVReads(
        length,
        k_index=k_idx[:, :, :length].reshape(-1).contiguous(),
        v_index=v_idx[:, :, :length].reshape(-1).contiguous(),
    )


def _read_kv(kv_cache: torch.Tensor, reads: _KVReads, r: int, layout: CacheTileLayout
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


@dataclass(frozen=True)
class _LayerReads:
    """Per-step, per-(layout, KV heads, dtype) plan shared by all layers: what
    to read (keys up to the longest tree request's ``P + T``; nothing past it
    is visible to anyone) and the additive mask."""

    kv: _KVReads
    bias: torch.Tensor  # [R*Hkv, group*T, length] additive mask (0 / -inf)


def _layer_reads(plan: TreePlan, layout: CacheTileLayout, kv_heads: int, group: int,
                 dtype: torch.dtype, device: torch.device) -> _LayerReads:
    length = int((plan.prefix_lens + plan.num_tokens).max())
    return _LayerReads(
        kv=_kv_reads(plan.blocks, kv_heads, layout, length, device),
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
    _tiles(kv_cache, layout, "paged_tree_attention")  # shape/dtype check
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
    kt, v = _read_kv(kv_cache, reads.kv, r, layout)
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

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.tree_layout: CacheTileLayout | None = None
        if (
            getattr(vllm_config, "speculative_config", None) is not None
            and not self.is_cross_attention
            and not self.is_encoder_only_attention
        ):
            self.tree_layout = self._tree_layout_or_fallback(layer_names)

    def _tree_layout_or_fallback(self, layer_names) -> CacheTileLayout:
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
        self._plan_plain_rows(plan, meta, common_attn_metadata)
        meta.tree = plan
        return meta

    def _plan_plain_rows(
        self, plan: TreePlan, meta: CPUAttentionMetadata, cm: CommonAttentionMetadata
    ) -> None:
        """Sub-batch of the non-tree requests for the C++ kernel (own scheduler metadata)."""
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].to(torch.long)
        qlen = qsl[1:] - qsl[:-1]
        is_plain = qlen > 0
        is_plain[plan.req_indices.to("cpu")] = False
        plain = is_plain.nonzero().flatten()
        if plain.numel() == 0:
            return
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
        plan.plain_rows = slice(first, first + n) if contiguous else rows.to(device)
        plan.plain_metadata = dataclasses.replace(
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


class TreeCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    """vLLM's CPU impl; tree rows go through :func:`paged_tree_attention`."""

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata,
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
        if plan.plain_metadata is not None:
            rows = plan.plain_rows
            if isinstance(rows, slice):
                super().forward(
                    layer, query[rows], key, value, kv_cache, plan.plain_metadata, output[rows]
                )
            else:
                sub_out = output.new_empty((rows.numel(), *output.shape[1:]))
                super().forward(
                    layer, query[rows], key, value, kv_cache, plan.plain_metadata, sub_out
                )
                output[rows] = sub_out
        bs, c = kv_cache.shape[2], kv_cache.shape[3]
        if bs != plan.block_size:
            raise ValueError(
                f"tree attention: kv_cache block size {bs} != planned block size {plan.block_size}"
            )
        layout = probe_cache_layout(layer.isa, kv_cache.dtype, bs, c // 2)
        output[plan.rows] = paged_tree_attention(
            query[plan.rows], kv_cache, plan, layout, self.scale
        ).to(output.dtype)
        return output

    def _check_tree_supported(self, layer, output_scale, output_block_scale) -> None:
        unsupported = {
            "sliding_window": self.sliding_window != -1,
            "alibi_slopes": self.alibi_slopes is not None,
            "logits_soft_cap": bool(self.logits_soft_cap),
            "sinks": self.sinks is not None,
            "fp8 kv cache": self.is_fp8_kv_cache,
            "fused output quantization": output_scale is not None or output_block_scale is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
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
