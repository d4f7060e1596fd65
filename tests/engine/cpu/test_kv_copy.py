"""KV compaction on vLLM 0.32's real CPU paged KV cache.

Expected caches are built with vLLM's own ``cpu_attn_reshape_and_cache``
(writing the source tokens' K/V at the destination slots), independently of
the layout map that :mod:`medusa_vllm.engine.cpu.kv_copy` uses, and compared bit
for bit with the compacted cache: accepted nodes land exactly at their depth
slots and every other byte (other requests, other slots) is untouched. Every
KV layout vLLM picks on the CPUs this project meets is a parameter
(:mod:`tests.kv_layouts`); layouts this host cannot write are skipped with the
reason. :func:`medusa_vllm.engine.tree_plan.compaction_slots` (the
device-agnostic slot math the runner calls) is checked here too.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from medusa_vllm.engine.cpu.cache_layout import gather_kv, probe_cache_layout
from medusa_vllm.engine.cpu.kv_copy import compact_kv, compact_layer
from medusa_vllm.engine.tree_plan import compaction_slots
from tests.engine.cpu.kv_layouts import (
    BLOCK,
    LAYOUTS,
    allocate_kv_caches,
    params,
    require_writable,
    write_kv,
)

KV_HEADS, NUM_BLOCKS = 2, 24


def make_kv_cache(dtype, head_size, layers=("l0",)):
    return allocate_kv_caches(dtype, head_size, kv_heads=KV_HEADS, num_blocks=NUM_BLOCKS,
                              layers=layers)[0]


def fill_step(kv, isa, dtype, head_size, prefix_lens, counts, gen):
    """Random prefix + tree K/V for a batch, written with vLLM's op for ``isa``;
    returns (qsl, slot_mapping, K, V) of the step rows."""
    free = torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1
    used, qsl, slots, ks, vs = 0, [0], [], [], []
    for p, t in zip(prefix_lens, counts):
        n = math.ceil((p + t) / BLOCK)
        table = free[used : used + n]
        used += n
        pos = torch.arange(p + t)
        slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
        k = torch.randn(p + t, KV_HEADS, head_size, generator=gen).to(dtype)
        v = torch.randn(p + t, KV_HEADS, head_size, generator=gen).to(dtype)
        write_kv(kv, k, v, slot, isa)
        slots.append(slot[p:])
        ks.append(k[p:])
        vs.append(v[p:])
        qsl.append(qsl[-1] + t)
    return torch.tensor(qsl[:-1]), torch.cat(slots), torch.cat(ks), torch.cat(vs)


def expected_after(kv, isa, key, value, src_rows, dst_slots):
    exp = kv.clone()
    write_kv(exp, key[src_rows], value[src_rows], dst_slots, isa)
    return exp


# ------------------------------------------------------------------ slots
def test_compaction_slots_maps_nodes_to_depths():
    nodes = torch.tensor([[0, 3, 7, -1], [0, 1, 2, 5], [0, -1, -1, -1], [-1, -1, -1, -1]])
    qs = torch.tensor([0, 10, 20, 25])
    sm = torch.arange(100, 130)
    src, dst = compaction_slots(nodes, qs, sm)
    # request 0: 3->1, 7->2; request 1: 1, 2 in place, 5->3; others nothing
    assert src.tolist() == [103, 107, 115]
    assert dst.tolist() == [101, 102, 113]


@pytest.mark.parametrize(
    "nodes,match",
    [
        ([[1, 2]], "root"),
        ([[0, 3, 2]], "strictly increase"),
        ([[0, -1, 4]], "gap"),
        ([[0, 40]], "beyond slot_mapping"),
    ],
)
def test_compaction_slots_rejects_bad_paths(nodes, match):
    with pytest.raises(ValueError, match=match):
        compaction_slots(torch.tensor(nodes), torch.tensor([0]), torch.arange(30))


# ------------------------------------------------------------- one layer
@pytest.mark.parametrize("case", params(LAYOUTS))
def test_compaction_moves_exactly_the_accepted_nodes(case):
    layout = require_writable(case)
    isa, dtype, head_size = case
    gen = torch.Generator().manual_seed(0)
    kv = make_kv_cache(dtype, head_size)["l0"]
    prefix_lens, counts = [30, 5, 100, 64], [13, 9, 13, 4]
    qs, sm, key, value = fill_step(kv, isa, dtype, head_size, prefix_lens, counts, gen)
    nodes = torch.tensor(
        [
            [0, 3, 7, 11],  # crosses the block boundary at position 32
            [0, 1, 4, -1],  # node 1 already in place
            [0, 2, 3, 12],  # overlap: dst of depth 2 is src of depth 1
            [0, -1, -1, -1],  # only the root: nothing moves
        ]
    )
    src, dst = compaction_slots(nodes, qs, sm)
    assert src.numel() == 3 + 1 + 3
    rows = [int(qs[r] + n) for r, path in enumerate(nodes.tolist()) for d, n in enumerate(path) if n >= 0 and n != d]
    expected = expected_after(kv, isa, key, value, torch.tensor(rows), dst)
    before = kv.clone()
    compact_layer(kv, src, dst, layout)
    assert torch.equal(kv, expected)
    assert not torch.equal(kv, before)
    # logical check with the reader: position P+d of each request now holds node n_d
    for r, path in enumerate(nodes.tolist()):
        for d, n in enumerate(path):
            if n < 0:
                continue
            s = int(sm[qs[r] + d])
            k_read, v_read = gather_kv(kv, torch.tensor([[s // BLOCK]]), layout)
            assert torch.equal(k_read[0, :, s % BLOCK], key[qs[r] + n])
            assert torch.equal(v_read[0, :, s % BLOCK], value[qs[r] + n])


def test_swaps_are_safe_because_all_sources_are_read_first():
    isa, dtype, head_size = "vec", torch.bfloat16, 64
    gen = torch.Generator().manual_seed(1)
    kv = make_kv_cache(dtype, head_size)["l0"]
    _, sm, key, value = fill_step(kv, isa, dtype, head_size, [10], [6], gen)
    src, dst = sm[[1, 4]], sm[[4, 1]]
    expected = expected_after(kv, isa, key, value, torch.tensor([1, 4]), dst)
    compact_layer(kv, src, dst, probe_cache_layout(isa, dtype, BLOCK, head_size))
    assert torch.equal(kv, expected)


def test_compact_layer_validates_its_inputs():
    kv = make_kv_cache(torch.float32, 64)["l0"]
    layout = probe_cache_layout("vec", torch.float32, BLOCK, 64)
    with pytest.raises(ValueError, match="same length"):
        compact_layer(kv, torch.tensor([1, 2]), torch.tensor([3]), layout)
    with pytest.raises(ValueError, match="duplicate"):
        compact_layer(kv, torch.tensor([1, 2]), torch.tensor([3, 3]), layout)
    with pytest.raises(ValueError, match="slots must be in"):
        compact_layer(kv, torch.tensor([1]), torch.tensor([NUM_BLOCKS * BLOCK]), layout)
    with pytest.raises(ValueError, match="does not match the layout"):
        compact_layer(kv, torch.tensor([1]), torch.tensor([2]), probe_cache_layout("vec", torch.bfloat16, BLOCK, 64))


# ----------------------------------------------------------- runner level
def fake_runner(caches: dict[str, torch.Tensor], isa: str, groups: list[list[str]] | None = None):
    ctx = {name: SimpleNamespace(kv_cache=kv, isa=isa) for name, kv in caches.items()}
    groups = groups or [list(caches)]
    return SimpleNamespace(
        kv_cache_config=SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=g) for g in groups]),
        compilation_config=SimpleNamespace(static_forward_context=ctx),
    )


def test_compact_kv_touches_every_layer_once_per_tensor():
    isa, dtype, head_size = "vec", torch.float32, 64
    caches = make_kv_cache(dtype, head_size, layers=("l0", "l1"))
    gen = torch.Generator().manual_seed(2)
    qs, sm, key, value = fill_step(caches["l0"], isa, dtype, head_size, [40, 7], [8, 8], gen)
    gen = torch.Generator().manual_seed(2)
    _, _, key1, value1 = fill_step(caches["l1"], isa, dtype, head_size, [40, 7], [8, 8], gen)
    # "l2" shares l1's tensor (KV sharing): it must not be compacted twice
    caches = {**caches, "l2": caches["l1"]}
    nodes = torch.tensor([[0, 2, 3, 6], [0, 5, 7, -1]])
    src, dst = compaction_slots(nodes, qs, sm)
    rows = torch.tensor([2, 3, 6, 8 + 5, 8 + 7])
    exp0 = expected_after(caches["l0"], isa, key, value, rows, dst)
    exp1 = expected_after(caches["l1"], isa, key1, value1, rows, dst)
    touched = compact_kv(fake_runner(caches, isa), src, dst)
    assert touched == 2
    assert torch.equal(caches["l0"], exp0)
    assert torch.equal(caches["l1"], exp1)  # a second pass would shift the overlapping chain again


def test_compact_kv_needs_a_group_when_several_hold_attention():
    caches = make_kv_cache(torch.float32, 64, layers=("a", "b"))
    runner = fake_runner(caches, "vec", groups=[["a"], ["b"]])
    with pytest.raises(NotImplementedError, match="group_id"):
        compact_kv(runner, torch.tensor([1]), torch.tensor([2]))
    before_b = caches["b"].clone()
    caches["a"].view(-1)[:10] = 1.0
    assert compact_kv(runner, torch.tensor([0]), torch.tensor([2]), group_id=0) == 1
    assert torch.equal(caches["b"], before_b)


def test_compact_kv_refuses_layers_without_isa():
    caches = make_kv_cache(torch.float32, 64)
    runner = fake_runner(caches, None)
    with pytest.raises(RuntimeError, match="no .isa"):
        compact_kv(runner, torch.tensor([1]), torch.tensor([2]))
