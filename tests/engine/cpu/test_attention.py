"""Tree attention over vLLM 0.32's real CPU paged KV cache vs a brute-force reference.

The cache is allocated by vLLM's own ``allocate_kv_cache``, prefix K/V are
written by vLLM's own ``cpu_attn_reshape_and_cache``, and the step runs
through a real vLLM ``Attention`` layer (backend picked by vLLM's selector
after ``register_tree_backend``), so ``do_kv_cache_update`` + ``forward`` run
exactly as in a model forward. Every KV layout vLLM picks on the CPUs this
project meets (``vec``, ``vec16``, ``amx``; :mod:`tests.kv_layouts`) is a
parameter; layouts this host cannot run are skipped with the reason. Also the
device-agnostic tree plan (:mod:`medusa_vllm.engine.tree_plan`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from vllm.v1.attention.backends import cpu_attn

from medusa_vllm.engine import tree_plan
from medusa_vllm.engine.cpu import attention
from medusa_vllm.engine.cpu.attention import (
    TreeCPUAttentionBackend,
    TreeCPUAttentionBackendImpl,
    TreeCPUAttentionMetadataBuilder,
    register_tree_backend,
    tree_attention_reference,
)
from medusa_vllm.engine.cpu.cache_layout import gather_kv, kv_gather_index, probe_cache_layout
from medusa_vllm.engine.cpu.tree_kernel import KERNEL_ENV, tree_attention_op
from medusa_vllm.engine.tree_plan import (
    TreeBatch,
    causal_rows,
    plan_tree_batch,
    set_tree_batch,
    tree_batch_context,
    tree_rows,
)
from tests.engine.cpu.kv_layouts import (
    BF16,
    BLOCK,
    FP32,
    LAYOUTS,
    TRANSPOSED,
    Layout,
    allocate_kv_caches,
    params,
    require_kernel,
    require_writable,
    write_kv,
)

HEADS, KV_HEADS = 4, 2
NUM_BLOCKS = 40
# the layouts the layer tests run a real vLLM Attention layer over
ENV_LAYOUTS = [Layout("vec", FP32, 64), Layout("vec", BF16, 64), Layout("vec16", BF16, 80),
               Layout("amx", BF16, 64)]
LAYER = "model.layers.0.self_attn.attn"


# ------------------------------------------------------------------ helpers
def random_tree_mask(num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """Ancestor-or-self mask of a random tree whose parents precede children."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, num_nodes + 1)]
    m = torch.zeros(num_nodes + 1, num_nodes + 1, dtype=torch.bool)
    for i in range(num_nodes + 1):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def make_kv_cache(dtype: torch.dtype, head_size: int, kv_heads: int = KV_HEADS):
    """One layer's KV cache exactly as vLLM 0.32 allocates it, and its spec."""
    caches, spec = allocate_kv_caches(dtype, head_size, kv_heads=kv_heads, num_blocks=NUM_BLOCKS,
                                      layers=(LAYER,))
    return caches[LAYER], spec


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def impl(request, monkeypatch):
    """Every test runs with the fused C++ kernel and with the torch path."""
    if request.param == "kernel":
        assert tree_attention_op() is not None, "the C++ tree-attention kernel did not build"
        monkeypatch.delenv(KERNEL_ENV, raising=False)
    else:
        monkeypatch.setenv(KERNEL_ENV, "torch")
    return request.param


@pytest.fixture(scope="module", params=params(ENV_LAYOUTS))
def env(request, tmp_path_factory):
    """A real VllmConfig + vLLM Attention layer served by the tree backend, its
    KV-cache group on the layout ``request.param`` (skipped where this host
    cannot run it)."""
    from transformers import LlamaConfig
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention import selector

    layout: Layout = request.param
    require_kernel(layout, BLOCK)
    dtype, head_size = layout.dtype, layout.head_size
    d = tmp_path_factory.mktemp("tinycfg")
    LlamaConfig(
        vocab_size=128, hidden_size=HEADS * head_size, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=head_size,
        max_position_embeddings=2048,
    ).save_pretrained(d)
    cfg = EngineArgs(
        model=str(d), skip_tokenizer_init=True, dtype=str(dtype).split(".")[-1],
        block_size=BLOCK, max_model_len=2048, enforce_eager=True,
    ).create_engine_config()
    register_tree_backend()
    selector._cached_get_attn_backend.cache_clear()
    with set_current_vllm_config(cfg):
        layer = Attention(
            num_heads=HEADS, head_size=head_size, scale=head_size**-0.5,
            num_kv_heads=KV_HEADS, prefix=LAYER,
        )
        kv, spec = make_kv_cache(dtype, head_size)
        builder = TreeCPUAttentionMetadataBuilder(spec, [LAYER], cfg, torch.device("cpu"))
        vllm_isa = builder.isa  # what vLLM picks for this group on this host
        if builder.isa != layout.isa:
            # e.g. vec on an AMX host: the group's ISA as the builder's fallback sets it
            builder.isa = layout.isa
            builder._set_isa_to_layers([LAYER])
    layer.kv_cache = kv
    yield {"cfg": cfg, "layer": layer, "kv": kv, "spec": spec, "builder": builder,
           "dtype": dtype, "head_size": head_size, "layout": layout, "vllm_isa": vllm_isa}
    set_tree_batch(None)


@dataclasses.dataclass
class Req:
    prefix: int  # tokens already in the cache
    qlen: int  # scheduled query tokens this step
    tree: torch.Tensor | None = None  # [qlen, qlen] ancestor mask for tree requests


def run_step(env, reqs: list[Req], seed: int = 0, publish: bool = True, impl_cls=None):
    """Fill prefixes, run one batch through the layer; return (output, expected, batch)."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context
    from vllm.v1.attention.backend import CommonAttentionMetadata

    dtype, kv, layer, head_size = env["dtype"], env["kv"], env["layer"], env["head_size"]
    gen = torch.Generator().manual_seed(seed)
    kv.zero_()
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1  # block 0 = null block
    width = 2048 // BLOCK
    block_table = torch.zeros(len(reqs), width, dtype=torch.int32)
    used = 0
    prefixes, slots, q, k, v, qsl = [], [], [], [], [], [0]
    for r, req in enumerate(reqs):
        n = math.ceil((req.prefix + req.qlen) / BLOCK)
        block_table[r, :n] = free[used : used + n].to(torch.int32)
        used += n
        pos = torch.arange(req.prefix + req.qlen)
        slot = block_table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
        pk = torch.randn(req.prefix, KV_HEADS, head_size, generator=gen).to(dtype)
        pv = torch.randn(req.prefix, KV_HEADS, head_size, generator=gen).to(dtype)
        write_kv(kv, pk, pv, slot[: req.prefix], layer.isa)
        prefixes.append((pk, pv))
        slots.append(slot[req.prefix :])
        q.append(torch.randn(req.qlen, HEADS, head_size, generator=gen).to(dtype))
        k.append(torch.randn(req.qlen, KV_HEADS, head_size, generator=gen).to(dtype))
        v.append(torch.randn(req.qlen, KV_HEADS, head_size, generator=gen).to(dtype))
        qsl.append(qsl[-1] + req.qlen)
    query, key, value = torch.cat(q), torch.cat(k), torch.cat(v)
    slot_mapping = torch.cat(slots)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    seq_lens = torch.tensor([r.prefix + r.qlen for r in reqs], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl_t, query_start_loc_cpu=qsl_t, seq_lens=seq_lens,
        num_reqs=len(reqs), num_actual_tokens=int(qsl[-1]),
        max_query_len=max(r.qlen for r in reqs), max_seq_len=int(seq_lens.max()),
        block_table_tensor=block_table, slot_mapping=slot_mapping, causal=True,
    )
    trees = [i for i, r in enumerate(reqs) if r.tree is not None]
    tree_batch = None
    if trees and publish:
        big = max(reqs[i].tree.shape[0] for i in trees)
        mask = torch.zeros(big, big, dtype=torch.bool)
        for i in trees:  # all trees are prefixes of one static tree: use the largest
            t = reqs[i].tree
            mask[: t.shape[0], : t.shape[0]] = t
        tree_batch = TreeBatch(
            query_start=torch.tensor([qsl[i] for i in trees]),
            num_tokens=torch.tensor([reqs[i].qlen for i in trees]),
            prefix_lens=torch.tensor([reqs[i].prefix for i in trees]),
            tree_mask=mask,
        )
    builder = env["builder"]
    with tree_batch_context(tree_batch):
        meta = builder.build(0, cm)
    impl = layer.impl
    if impl_cls is not None:
        impl = impl_cls.__new__(impl_cls)
        impl.__dict__.update(layer.impl.__dict__)
    with set_current_vllm_config(env["cfg"]), set_forward_context({LAYER: meta}, env["cfg"], slot_mapping={LAYER: slot_mapping}):
        if impl_cls is None:
            out = layer(query.clone(), key.clone(), value.clone()).view(-1, HEADS, head_size)
        else:  # a plain vLLM impl on the same metadata (after the same cache update)
            layer.impl.do_kv_cache_update(layer, key, value, kv, slot_mapping)
            out = torch.empty_like(query)
            impl.forward(layer, query, key, value, kv, meta, out)
    expected = torch.empty(query.shape, dtype=dtype)
    for i, req in enumerate(reqs):
        rows = slice(qsl[i], qsl[i + 1])
        mask = req.tree if req.tree is not None else torch.ones(req.qlen, req.qlen, dtype=torch.bool).tril()
        expected[rows] = tree_attention_reference(
            query[rows], key[rows], value[rows], *prefixes[i], mask, head_size**-0.5
        )
    return out, expected, meta, qsl


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}


# -------------------------------------------------------------------- layout
@pytest.mark.parametrize("case", params(TRANSPOSED))
def test_probe_learns_the_documented_vec_layout(case):
    layout = require_writable(case)
    head_size = case.head_size
    t = torch.arange(BLOCK).view(-1, 1)
    d = torch.arange(head_size).view(1, -1)
    assert torch.equal(layout.k_offsets, d * BLOCK + t)  # K transposed [D, BS]
    assert torch.equal(layout.v_offsets, BLOCK * head_size + t * head_size + d)  # V [BS, D]
    assert layout.k_transposed


def test_probe_learns_amx_layout_or_refuses_naming_it():
    """vLLM's AMX cache writer runs on some hosts without AMX tiles (it needs
    only AVX-512): there the probe learns its packed layout (checked a bijection
    with a random round trip inside the probe); elsewhere it must refuse,
    naming the isa, never return a wrong layout."""
    try:
        layout = probe_cache_layout("amx", torch.bfloat16, BLOCK, 64)
    except RuntimeError as err:
        assert "isa='amx'" in str(err)
        return
    vec = probe_cache_layout("vec", torch.bfloat16, BLOCK, 64)
    assert layout.tile_numel == vec.tile_numel
    offsets = torch.cat([layout.k_offsets.flatten(), layout.v_offsets.flatten()])
    assert torch.equal(offsets.sort().values, torch.arange(layout.tile_numel))


@pytest.mark.parametrize("case", params(LAYOUTS))
def test_gather_kv_reads_what_vllm_wrote(case):
    layout = require_writable(case)
    isa, dtype, head_size = case
    kv, _ = make_kv_cache(dtype, head_size)
    gen = torch.Generator().manual_seed(1)
    blocks = torch.tensor([[5, 2, 9], [7, 3, 0]])
    n = [3 * BLOCK, 2 * BLOCK - 5]
    ks, vs = [], []
    for r in range(2):
        pos = torch.arange(n[r])
        k = torch.randn(n[r], KV_HEADS, head_size, generator=gen).to(dtype)
        v = torch.randn(n[r], KV_HEADS, head_size, generator=gen).to(dtype)
        write_kv(kv, k, v, blocks[r, pos // BLOCK] * BLOCK + pos % BLOCK, isa)
        ks.append(k)
        vs.append(v)
    generic = dataclasses.replace(layout, k_transposed=False)
    for lay in (layout, generic):  # strided fast path and index path
        k_out, v_out = gather_kv(kv, blocks, lay)
        assert k_out.shape == (2, KV_HEADS, 3 * BLOCK, head_size)
        for r in range(2):
            assert torch.equal(k_out[r, :, : n[r]].transpose(0, 1), ks[r])
            assert torch.equal(v_out[r, :, : n[r]].transpose(0, 1), vs[r])
    # the flat index each layer reuses reads the very same elements
    k_idx, v_idx = kv_gather_index(blocks, KV_HEADS, layout, "cpu")
    k_out, v_out = gather_kv(kv, blocks, layout)
    assert torch.equal(kv.view(-1)[k_idx], k_out) and torch.equal(kv.view(-1)[v_idx], v_out)


def test_reference_is_causal_attention_on_a_chain():
    gen = torch.Generator().manual_seed(2)
    t, p, d = 5, 7, 64
    q = torch.randn(t, HEADS, d, generator=gen, dtype=torch.float64)
    k = torch.randn(p + t, KV_HEADS, d, generator=gen, dtype=torch.float64)
    v = torch.randn(p + t, KV_HEADS, d, generator=gen, dtype=torch.float64)
    chain = torch.ones(t, t, dtype=torch.bool).tril()
    ref = tree_attention_reference(q, k[p:], v[p:], k[:p], v[:p], chain, 0.3)
    causal = torch.ones(t, p + t, dtype=torch.bool).tril(diagonal=p)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=causal, scale=0.3,
    ).transpose(0, 1)
    torch.testing.assert_close(ref, sdpa)
    # a branching tree must differ from the chain for some node
    star = torch.eye(t, dtype=torch.bool)
    star[:, 0] = True
    assert not torch.allclose(tree_attention_reference(q, k[p:], v[p:], k[:p], v[:p], star, 0.3), ref)


# --------------------------------------------------------- backend in vLLM
def test_vllm_selects_the_tree_backend(env):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum.CPU_ATTN.get_class() is TreeCPUAttentionBackend
    assert isinstance(env["layer"].impl, TreeCPUAttentionBackendImpl)
    assert TreeCPUAttentionBackend.get_name() == "CPU_ATTN"
    # the group's ISA reached the real layer (the KV writes use it)
    assert env["builder"].isa == env["layer"].isa == env["layout"].isa
    # vLLM's own pick on this host is one of the layouts the tests cover
    assert env["vllm_isa"] in {layout.isa for layout in LAYOUTS}


def test_tree_rows_match_reference_in_a_mixed_batch(env):
    gen = torch.Generator().manual_seed(3)
    big = random_tree_mask(12, gen)  # one static tree; requests use prefixes of it
    reqs = [
        Req(prefix=0, qlen=9),  # first prefill chunk
        Req(prefix=37, qlen=13, tree=big),  # full tree
        Req(prefix=130, qlen=1),  # plain decode
        Req(prefix=95, qlen=6, tree=big[:6, :6]),  # truncated tree crossing a block edge
        Req(prefix=50, qlen=4),  # chunked prefill continuation
        Req(prefix=3, qlen=1, tree=big[:1, :1]),  # tree request with only the root
        Req(prefix=200, qlen=8, tree=big[:8, :8]),
    ]
    out, expected, meta, qsl = run_step(env, reqs, seed=4)
    assert meta.tree is not None and meta.plain is not None
    assert not isinstance(meta.plain.rows, slice)  # interleaved plain rows
    assert isinstance(meta.tree.rows, torch.Tensor)  # ... so tree rows are indexed
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))
    # the tree really matters: causal attention differs on tree rows
    chain_out, _, _, _ = run_step(env, [dataclasses.replace(r, tree=None) for r in reqs], seed=4)
    rows = slice(qsl[1], qsl[2])
    assert not torch.allclose(out[rows].float(), chain_out[rows].float(), **tol(env["dtype"]))


def test_element_index_reads_match_tile_reads(env, monkeypatch, impl):
    """Layouts that are not K-transposed (e.g. AMX's packing) are read through
    element offsets (torch: flat indices; kernel: the offset table) instead of
    whole tiles: same rows, same answer (on a
    K-transposed layout, forcing the index path checks it against the tile path)."""
    gen = torch.Generator().manual_seed(21)
    tree = random_tree_mask(9, gen)
    reqs = [Req(prefix=70, qlen=10, tree=tree), Req(prefix=5, qlen=1), Req(prefix=33, qlen=4, tree=tree[:4, :4])]
    tile_out, expected, meta, _ = run_step(env, reqs, seed=22)
    transposed = require_kernel(env["layout"]).k_transposed
    if impl == "torch":
        reads = next(iter(meta.tree.layer_cache.values()))
        assert (reads.kv.blocks is not None) == transposed  # whole tiles exactly for vec/vec16
    torch.testing.assert_close(tile_out, expected, **tol(env["dtype"]))
    real = attention.probe_cache_layout
    seen = []

    def generic(*args):
        layout = real(*args)
        seen.append(layout.k_transposed)
        return dataclasses.replace(layout, k_transposed=False)

    monkeypatch.setattr(attention, "probe_cache_layout", generic)
    index_out, _, meta, _ = run_step(env, reqs, seed=22)
    assert seen and set(seen) == {transposed}
    if impl == "torch":
        reads = next(iter(meta.tree.layer_cache.values()))
        assert reads.kv.blocks is None and reads.kv.k_index is not None
    torch.testing.assert_close(index_out, expected, **tol(env["dtype"]))
    # the torch path reads the same values either way; the kernel's two loops sum in
    # another order, so low-precision outputs may differ by one rounding step
    exact = impl == "torch" or env["dtype"] == torch.float32
    torch.testing.assert_close(index_out, tile_out, atol=1e-6 if exact else 1e-5,
                               rtol=1e-6 if exact else 2**-7)


def test_plain_rows_equal_vllm_kernel_output(env):
    gen = torch.Generator().manual_seed(5)
    tree = random_tree_mask(7, gen)
    reqs = [Req(prefix=40, qlen=1), Req(prefix=33, qlen=8, tree=tree), Req(prefix=0, qlen=12)]
    out, _, _, qsl = run_step(env, reqs, seed=6)
    base_out, _, base_meta, _ = run_step(env, reqs, seed=6, publish=False)
    assert base_meta.tree is None
    for i in (0, 2):
        rows = slice(qsl[i], qsl[i + 1])
        torch.testing.assert_close(out[rows], base_out[rows], atol=1e-6, rtol=1e-6)


def test_all_tree_batch_skips_the_kernel(env):
    gen = torch.Generator().manual_seed(7)
    tree = random_tree_mask(10, gen)
    reqs = [Req(prefix=p, qlen=n, tree=tree[:n, :n]) for p, n in [(31, 11), (64, 5), (1, 9)]]
    out, expected, meta, _ = run_step(env, reqs, seed=8)
    assert meta.tree is not None and meta.plain is None
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))


def test_equal_size_trees_take_the_dense_path(env, impl):
    gen = torch.Generator().manual_seed(9)
    tree = random_tree_mask(8, gen)
    reqs = [Req(prefix=p, qlen=8, tree=tree) for p in (31, 70, 2)] + [Req(prefix=12, qlen=1)]
    out, expected, meta, _ = run_step(env, reqs, seed=10)
    assert meta.tree.dense  # no query padding: the query rows are viewed, not scattered
    assert meta.tree.rows == slice(0, 24)  # tree requests first: their rows are a slice
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))
    if impl == "torch":  # one reading plan (tile rows + mask bias) shared by every layer
        assert len(meta.tree.layer_cache) == 1


def test_short_tree_ending_at_a_block_edge_next_to_a_long_tree(env):
    gen = torch.Generator().manual_seed(14)
    tree = random_tree_mask(12, gen)
    # request 0 fills exactly two blocks with the shortest prefix of the tree
    # that is not a chain (chains go to vLLM's kernel); request 1's tree is wider
    n = causal_rows(tree.numpy()) + 1
    reqs = [Req(prefix=2 * BLOCK - n, qlen=n, tree=tree[:n, :n]), Req(prefix=10, qlen=13, tree=tree)]
    out, expected, meta, _ = run_step(env, reqs, seed=15)
    assert meta.tree.req_indices.tolist() == [0, 1]
    assert meta.tree.attn_mask.shape[-1] == 2 * BLOCK
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))


def test_chain_tree_equals_vllm_causal_kernel(env, monkeypatch):
    """A chain-shaped tree must give what vLLM's own C++ kernel gives causally."""
    chain = torch.ones(9, 9, dtype=torch.bool).tril()
    reqs = [Req(prefix=45, qlen=9, tree=chain), Req(prefix=0, qlen=5), Req(prefix=77, qlen=4, tree=chain[:4, :4])]
    kernel, _, base_meta, _ = run_step(
        env, [dataclasses.replace(r, tree=None) for r in reqs], seed=16,
        impl_cls=cpu_attn.CPUAttentionBackendImpl,
    )
    assert base_meta.tree is None
    # chains are left to vLLM's kernel (no tree plan at all) ...
    out, expected, meta, _ = run_step(env, reqs, seed=16)
    assert meta.tree is None
    torch.testing.assert_close(out, kernel, **tol(env["dtype"]))
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))
    # ... and the torch tree path, forced onto the same chains, agrees with it
    monkeypatch.setattr(tree_plan, "causal_rows", lambda mask: 0)
    out, _, meta, _ = run_step(env, reqs, seed=16)
    assert meta.tree is not None and meta.tree.req_indices.tolist() == [0, 2]
    torch.testing.assert_close(out, kernel, **tol(env["dtype"]))


def test_causal_rows_counts_the_leading_chain():
    chain = np.tril(np.ones((5, 5), dtype=bool))
    assert causal_rows(chain) == 5
    wide = chain.copy()
    wide[2, 1] = False  # node 2 is a second child of the root
    assert causal_rows(wide) == 2
    assert causal_rows(np.ones((1, 1), dtype=bool)) == 1


def test_tree_rows_lists_each_requests_rows_in_node_order():
    rows, node = tree_rows(np.array([4, 0, 9]), np.array([3, 1, 2]))
    assert rows.tolist() == [4, 5, 6, 0, 9, 10]
    assert node.tolist() == [0, 1, 2, 0, 0, 1]


def test_chain_requests_go_to_the_kernel_next_to_a_wide_tree(env):
    gen = torch.Generator().manual_seed(21)
    tree = random_tree_mask(9, gen)  # node 1 is always the root's child
    c = causal_rows(tree.numpy())
    assert 2 <= c < 10
    reqs = [Req(prefix=20, qlen=c, tree=tree[:c, :c]), Req(prefix=50, qlen=10, tree=tree),
            Req(prefix=7, qlen=1)]
    out, expected, meta, _ = run_step(env, reqs, seed=22)
    assert meta.tree.req_indices.tolist() == [1]  # only the wide tree takes the torch path
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))


def test_contiguous_plain_rows_use_views(env):
    gen = torch.Generator().manual_seed(9)
    tree = random_tree_mask(5, gen)
    reqs = [Req(prefix=20, qlen=6, tree=tree), Req(prefix=10, qlen=3), Req(prefix=70, qlen=1)]
    out, expected, meta, _ = run_step(env, reqs, seed=10)
    assert meta.plain.rows == slice(6, 10)
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))


def test_without_tree_batch_the_metadata_is_vllms(env):
    reqs = [Req(prefix=12, qlen=1), Req(prefix=0, qlen=7)]
    out, expected, meta, _ = run_step(env, reqs, seed=11)
    assert meta.tree is None
    base, _, _, _ = run_step(env, reqs, seed=11, impl_cls=cpu_attn.CPUAttentionBackendImpl)
    assert torch.equal(out, base)
    torch.testing.assert_close(out, expected, **tol(env["dtype"]))


def test_stale_or_bad_tree_batch_is_refused():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, 1, 6], dtype=torch.int32)
    seq = torch.tensor([10, 25], dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=2,
        num_actual_tokens=6, max_query_len=5, max_seq_len=25,
        block_table_tensor=torch.arange(1, 5, dtype=torch.int32).view(2, 2),
        slot_mapping=torch.zeros(6, dtype=torch.long),
    )
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    ok = TreeBatch(torch.tensor([1]), torch.tensor([5]), torch.tensor([20]), mask)
    plan = plan_tree_batch(ok, cm, BLOCK)
    assert plan.req_indices.tolist() == [1] and plan.rows == slice(1, 6)
    with pytest.raises(ValueError, match="stale"):  # wrong row
        plan_tree_batch(dataclasses.replace(ok, query_start=torch.tensor([0])), cm, BLOCK)
    with pytest.raises(ValueError, match="prefix_lens"):
        plan_tree_batch(dataclasses.replace(ok, prefix_lens=torch.tensor([19])), cm, BLOCK)
    with pytest.raises(ValueError, match="num_tokens"):
        plan_tree_batch(dataclasses.replace(ok, tree_mask=mask[:4, :4]), cm, BLOCK)
    with pytest.raises(ValueError, match="BFS"):
        plan_tree_batch(dataclasses.replace(ok, tree_mask=mask | mask.T), cm, BLOCK)
    with pytest.raises(ValueError, match="bool"):
        plan_tree_batch(dataclasses.replace(ok, tree_mask=mask.float()), cm, BLOCK)


def test_unsupported_layer_features_are_refused(env):
    gen = torch.Generator().manual_seed(12)
    reqs = [Req(prefix=20, qlen=4, tree=random_tree_mask(3, gen))]
    impl = env["layer"].impl
    impl.sliding_window = 16
    try:
        with pytest.raises(NotImplementedError, match="sliding_window"):
            run_step(env, reqs, seed=13)
    finally:
        impl.sliding_window = -1


def test_unsupported_layers_are_refused_when_the_model_loads(env, monkeypatch):
    """The runner checks every attention layer once the model is loaded, so a model
    whose layers tree rows cannot serve fails at start-up, not at its first tree step."""
    from types import SimpleNamespace

    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from medusa_vllm.engine.cpu.runner import MedusaTreeCPUModelRunner
    from medusa_vllm.engine.options import MedusaConfigError

    monkeypatch.setattr(CPUModelRunner, "load_model", lambda self, *a, **k: None)
    runner = object.__new__(MedusaTreeCPUModelRunner)
    runner.compilation_config = SimpleNamespace(static_forward_context={LAYER: env["layer"]})
    MedusaTreeCPUModelRunner.load_model(runner)  # a plain layer passes
    monkeypatch.setattr(env["layer"].impl, "sliding_window", 16)
    with pytest.raises(MedusaConfigError, match=rf"use sliding_window \(e.g. {LAYER}, 1 layers\)"):
        MedusaTreeCPUModelRunner.load_model(runner)


@pytest.mark.parametrize("env", params([Layout("vec", BF16, 64)]), indirect=True)
def test_builder_falls_back_to_vec_when_layout_unreadable(env, monkeypatch):
    real = attention.probe_cache_layout

    def probe(isa, *args):  # amx unreadable, as on hosts where vLLM's amx writer cannot run
        if isa == "amx":
            raise RuntimeError("probe_cache_layout(isa='amx', ...): op does not run on this host")
        return real(isa, *args)

    monkeypatch.setattr(attention, "probe_cache_layout", probe)
    builder, layer = env["builder"], env["layer"]
    monkeypatch.setattr(builder, "isa", "amx")
    monkeypatch.setattr(layer, "isa", "amx")
    layout = builder._tree_layout_or_fallback([LAYER])
    assert builder.isa == "vec" and layer.isa == "vec" and layout.isa == "vec"
