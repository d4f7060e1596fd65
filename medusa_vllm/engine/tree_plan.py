"""The device-agnostic tree plan: what the runner tells the attention backend, and index math.

A Medusa step verifies, per request, a *flattened tree*: the root (the token
sampled last step, at position ``P``) plus ``n`` candidate nodes in BFS order.
vLLM schedules them as ``1 + n`` ordinary query tokens with linear KV slots
``P .. P+n``; only the attention mask differs from a causal chain: node ``i``
may see the whole prefix ``[0, P)`` plus its own ancestors-or-self inside the
tree. This module holds what every tree-attention backend (CPU today, GPU
later) and the runner share, none of it tied to a device or a kernel:

- :class:`TreeBatch` and the runner -> backend channel (:func:`set_tree_batch`,
  :func:`get_tree_batch`, :func:`tree_batch_context`): before
  ``_build_attention_metadata`` runs, the runner publishes which query rows of
  the step form a tree; the backend's metadata builder reads it.
- :func:`plan_tree_batch`: validates a :class:`TreeBatch` against the step's
  ``CommonAttentionMetadata`` and builds the :class:`TreePlan` (tree rows,
  block ids, prefix + ancestor mask) every layer of a KV-cache group shares;
  :func:`causal_rows` says which requests a causal kernel serves exactly;
  :func:`tree_rows` gives the batch rows of the tree tokens.
- :func:`compaction_slots`: after verification, the ``(src, dst)`` KV slots
  that move each accepted node to the slot of its depth.

Index math runs on host numpy from host-side metadata (``query_start_loc_cpu``);
the tensors of the plan are put on the metadata's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from vllm.v1.attention.backend import CommonAttentionMetadata

__all__ = [
    "TreeBatch",
    "TreePlan",
    "causal_rows",
    "compaction_slots",
    "get_tree_batch",
    "plan_tree_batch",
    "set_tree_batch",
    "tree_batch_context",
    "tree_rows",
]


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


# -------------------------------------------------------------------- plan
@dataclass
class TreePlan:
    """Per-step tree attention plan, shared by all layers of a KV-cache group.

    - ``req_indices`` / ``num_tokens`` / ``prefix_lens``: ``[R]`` batch row,
      ``T`` and ``P`` of each planned tree request.
    - ``rows``: ``[M]`` batch rows of all tree tokens (request-major, node order),
      or a ``slice`` when they are contiguous.
    - ``valid``: ``[R, T_max]`` which ``(request, node)`` slots are real.
    - ``blocks``: ``[R, nblk]`` kernel block ids covering ``[0, P+T)``.
    - ``attn_mask``: ``[R, 1, T_max, nblk*block_size]`` bool SDPA mask, built on
      first use (a backend that applies ``tree_mask`` itself never pays for it).
    - ``tree_mask``: ``[N+1, N+1]`` bool ancestor-or-self mask of the step's tree
      (what a fused kernel applies itself instead of ``attn_mask``).
    - ``layer_cache``: per-step scratch of the backend, filled by the first
      layer and reused by every other layer of the step (e.g. the CPU
      backend's KV reading plan and additive mask, per layout/GQA shape).
    """

    req_indices: torch.Tensor
    num_tokens: torch.Tensor
    prefix_lens: torch.Tensor
    rows: slice | torch.Tensor
    valid: torch.Tensor
    blocks: torch.Tensor
    block_size: int
    tree_mask: torch.Tensor
    layer_cache: dict[Any, Any] = field(default_factory=dict)

    @cached_property
    def attn_mask(self) -> torch.Tensor:
        """Prefix columns ``[0, P)`` for every query row, then the ``[T, T]``
        ancestor block at columns ``[P, P+T)``; padding query rows see only the root."""
        valid = self.valid.cpu().numpy()
        plen = self.prefix_lens.cpu().numpy()
        mask = self.tree_mask.cpu().numpy()
        r, t_max = valid.shape
        length = self.blocks.shape[1] * self.block_size
        node = np.arange(t_max)
        tree = mask[None, :t_max, :t_max] & valid[:, None, :] & valid[:, :, None]
        # padding query rows only see the root, so no row is fully masked (no NaN)
        tree[:, :, 0] |= ~valid
        # T_max spare columns: a short tree right at the end of the gathered
        # length still writes its padding columns in bounds
        prefix = np.arange(length + t_max)[None, None, :] < plen[:, None, None]  # [R, 1, W]
        out = np.repeat(prefix, t_max, axis=1)  # [R, T_max, W]
        cols = plen[:, None] + node[None, :]  # [R, T_max]
        out[np.arange(r)[:, None, None], node[None, :, None], cols[:, None, :]] = tree
        return torch.from_numpy(np.ascontiguousarray(out[:, :, :length])).to(
            self.valid.device).unsqueeze(1)

    @property
    def dense(self) -> bool:
        """Every tree request has ``T_max`` tokens (no query padding needed)."""
        return bool(self.valid.all())


def _as_long_1d(x: torch.Tensor | np.ndarray | list[int], name: str) -> np.ndarray:
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


def tree_rows(query_start: np.ndarray, num_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch row and node index of every tree token, request-major, node order.

    Request ``r`` owns rows ``query_start[r] + [0, num_tokens[r])``; its node
    ``i`` (root ``0``) is at row ``query_start[r] + i``.
    """
    offsets = np.cumsum(num_tokens) - num_tokens
    node = np.arange(int(num_tokens.sum())) - np.repeat(offsets, num_tokens)
    return np.repeat(query_start, num_tokens) + node, node


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
    bt = cm.block_table_tensor
    if bt.shape[1] < nblk:
        raise ValueError(
            f"block_table has {bt.shape[1]} columns but a tree request needs {nblk} blocks "
            f"of {block_size} tokens"
        )
    blocks = bt[torch.from_numpy(req).to(bt.device), :nblk].to("cpu").numpy().astype(np.int64)
    needed = (total + block_size - 1) // block_size
    blocks[np.arange(nblk)[None, :] >= needed[:, None]] = 0  # null block, masked out

    valid = np.arange(t_max)[None, :] < ntok[:, None]  # [R, T_max]
    rows, _ = tree_rows(qsl[req], ntok)
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
        block_size=block_size,
        tree_mask=dev(mask),
    )


# -------------------------------------------------------------- compaction
def compaction_slots(
    accepted_nodes: torch.Tensor,
    query_start: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_slots, dst_slots)`` that move each accepted node to its depth.

    - ``accepted_nodes``: ``[B, D+1]`` node indices along each request's accepted
      path, root (0) first, ``-1`` padded (a row of only ``-1`` or ``[0, -1..]``
      moves nothing). Must be strictly increasing (BFS: depth ``d`` node >= d).
    - ``query_start``: ``[B]`` batch row of each request's root.
    - ``slot_mapping``: ``[num_tokens]`` the step's slot of every batch row.

    Node ``n_d`` (row ``query_start + n_d``) goes to the slot of row
    ``query_start + d``; nodes already in place are skipped. The rows are
    worked out on the host; the slots are read from ``slot_mapping`` on its
    own device and returned there.
    """
    nodes = torch.as_tensor(accepted_nodes).to("cpu", torch.long)
    if nodes.dim() != 2:
        raise ValueError(f"accepted_nodes: expected [batch, max_depth+1], found shape {tuple(nodes.shape)}")
    qs = torch.as_tensor(query_start).to("cpu", torch.long)
    if qs.shape != (nodes.shape[0],):
        raise ValueError(
            f"query_start: expected shape ({nodes.shape[0]},) to match accepted_nodes, found {tuple(qs.shape)}"
        )
    present = nodes >= 0
    if bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise ValueError("accepted_nodes: -1 padding must only follow the path, found a gap")
    if bool((present[:, 0] & (nodes[:, 0] != 0)).any()):
        raise ValueError(f"accepted_nodes: each path must start at the root (0), found {nodes[:, 0].tolist()}")
    steps = nodes[:, 1:] - nodes[:, :-1]
    if bool((present[:, 1:] & (steps <= 0)).any()):
        raise ValueError("accepted_nodes: node indices along a path must strictly increase (BFS order)")
    depth = torch.arange(nodes.shape[1]).expand_as(nodes)
    move = present & (nodes != depth)
    req = move.nonzero()[:, 0]
    src_rows = qs[req] + nodes[move]
    dst_rows = qs[req] + depth[move]
    sm = torch.as_tensor(slot_mapping)
    if src_rows.numel() and int(src_rows.max()) >= sm.numel():
        raise ValueError(
            f"accepted_nodes: node row {int(src_rows.max())} is beyond slot_mapping ({sm.numel()} rows)"
        )
    idx = src_rows.to(sm.device)
    return sm[idx].to(torch.long), sm[dst_rows.to(sm.device)].to(torch.long)
