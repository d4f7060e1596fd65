"""Cost-curve key, cache and measurement plan (pure)."""

from __future__ import annotations

import dataclasses
import json

from medusa_vllm.core.cost_curve import (
    CostCurveKey,
    CostCurves,
    cache_path,
    measurement_points,
    read_cached,
    write_cached,
)

KEY = CostCurveKey(cpu_model="AMD EPYC 7B13", isa="avx2", dtype="float32", threads=2,
                   tensor_parallel=1, model="/m/SmolLM2", heads="4x1 hidden 576 vocab 4096",
                   vllm="0.32.0", kernel="fused")
CURVES = CostCurves(vanilla_s={1: 0.05, 4: 0.07}, tree={1: {2: 1.1, 4: 1.2}, 4: {2: 1.3}},
                    chain={1: {1: 1.02}, 4: {1: 1.1}}, draft={1: {1: 0.03}}, context=256,
                    seconds=3.5)


def test_cache_round_trip_and_every_key_field_separates(tmp_path):
    assert read_cached(KEY, tmp_path) is None
    path = write_cached(KEY, CURVES, tmp_path)
    assert path == cache_path(KEY, tmp_path) and path.parent.name == "cost_curves"
    got = read_cached(KEY, tmp_path)
    assert got == CURVES and got.batch_sizes == [1, 4]
    for name, value in (("cpu_model", "Intel Xeon"), ("isa", "amx"), ("dtype", "bfloat16"),
                        ("threads", 4), ("tensor_parallel", 2), ("model", "/other"),
                        ("heads", "3x1"), ("vllm", "0.33.0"), ("kernel", "torch"),
                        ("format", 0)):
        other = dataclasses.replace(KEY, **{name: value})
        assert other.digest() != KEY.digest(), name
        assert read_cached(other, tmp_path) is None, name


def test_a_file_holding_another_key_or_garbage_is_not_trusted(tmp_path):
    path = write_cached(KEY, CURVES, tmp_path)
    data = json.loads(path.read_text())
    data["key"]["threads"] = 64  # e.g. copied from another machine under this name
    path.write_text(json.dumps(data))
    assert read_cached(KEY, tmp_path) is None
    path.write_text("{not json")
    assert read_cached(KEY, tmp_path) is None
    write_cached(KEY, CostCurves(), tmp_path)  # nothing measured
    assert read_cached(KEY, tmp_path) is None


def test_measurement_points_respect_the_token_budget_and_the_engine_limits():
    pts = measurement_points(4, 64, token_budget=256)
    by = {(p.batch_size, p.kind, p.size) for p in pts}
    assert (1, "tree", 64) in by and (1, "chain", 4) in by and (1, "vanilla", 0) in by
    assert (64, "chain", 1) in by and (64, "chain", 3) in by and (64, "chain", 4) not in by
    assert (64, "tree", 2) in by and (64, "tree", 4) not in by
    assert (16, "tree", 8) in by and (16, "tree", 16) not in by
    assert all(p.tokens <= 256 for p in pts)
    assert {p.size for p in pts if p.kind == "draft" and p.batch_size == 1} == {1, 2, 3, 4}
    small = measurement_points(4, 8, max_num_seqs=8, max_num_tokens=64)
    # the engine's own largest batch (8) is timed too, not extrapolated from 4
    assert {p.batch_size for p in small} == {1, 4, 8}
    assert {p.batch_size for p in measurement_points(4, 8, max_num_seqs=64)} == {1, 4, 16, 64}
    assert max(p.size for p in small if p.kind == "tree") == 8
    assert all(p.tokens <= 64 for p in small)
