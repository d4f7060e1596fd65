"""engine/cost_curve without an engine: a fake runner records the shapes it is asked to run.

Checks the shapes timed (b requests of 1 + n tokens, the tree published to the attention
backend), the wall-clock bound, the cache (first start measures and writes, the next one
reads and runs nothing), that the fit is applied through the runner hook, and that
explicit nodes_by_batch tables survive.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medusa_vllm.core.cost_curve import CURVE_DIR, MeasurementPoint, measurement_points
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.engine import cost_curve as cc
from medusa_vllm.engine.options import ADDITIONAL_CONFIG_KEY, MedusaConfigError, MedusaTreeConfig

PER_RANK = [[0.80, 0.10, 0.04], [0.70, 0.12, 0.05], [0.60, 0.12, 0.05]]


class FakeRunner:
    """What measure_cost_curves and fit_tree_at_startup use of a model runner. A step of
    T tokens "costs" (in the fake clock) 10 ms + 0.1 ms per token, + 5 ms with a tree."""

    def __init__(self, config: MedusaTreeConfig, clock: list[float]) -> None:
        self.clock = clock
        self.calls: list[tuple[int, int, object]] = []
        self.uniform_decode_query_len = 1 + config.num_speculative_tokens
        self._tree_batch = None
        self.device = torch.device("cpu")
        self.model_config = SimpleNamespace(get_hidden_size=lambda: 16, dtype=torch.float32,
                                            model="/models/fake")
        self.vllm_config = SimpleNamespace(
            model_config=self.model_config,
            parallel_config=SimpleNamespace(tensor_parallel_size=1),
            additional_config={ADDITIONAL_CONFIG_KEY: config.to_dict()})
        self.scheduler_config = SimpleNamespace(max_num_seqs=16)
        self.max_num_tokens = 256
        heads = MedusaHeads(MedusaHeadsConfig(hidden_size=16, vocab_size=32, num_heads=3))
        self.drafter = SimpleNamespace(heads=heads, tree=None, nodes_by_batch=None)
        self.medusa_config = config
        self.model = SimpleNamespace(compute_logits=lambda h: h @ torch.ones(16, 32))
        self.reloads = 0

    def _dummy_run(self, num_tokens, **kw):
        t = self.uniform_decode_query_len
        assert kw["uniform_decode"] and kw["force_attention"]
        assert num_tokens % t == 0
        self.calls.append((num_tokens // t, t, self._tree_batch))
        self.clock[0] += 0.010 + 0.0001 * num_tokens + (0.005 if self._tree_batch else 0.0)
        return torch.zeros(num_tokens, 16), None

    def reload_medusa_config(self):
        self.reloads += 1
        self.medusa_config = MedusaTreeConfig.from_vllm_config(self.vllm_config)
        self.drafter.tree = self.medusa_config.engine_tree()
        self.drafter.nodes_by_batch = self.medusa_config.load_nodes_by_batch(self.drafter.tree)


@pytest.fixture
def fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(cc.time, "perf_counter", lambda: clock[0])
    return clock


@pytest.fixture
def stats_heads(heads_dir):
    (heads_dir / "medusa_tree.json").write_text(json.dumps(
        {"medusa_choices": [[0]], "per_rank_accuracy": PER_RANK}))
    return heads_dir


def _config(heads, **options):
    return MedusaTreeConfig.from_dict({"heads": str(heads), **options}).resolved()


def test_shapes_timed_are_b_requests_of_one_plus_n_tokens_with_the_tree_published(
        stats_heads, fake_clock):
    runner = FakeRunner(_config(stats_heads), fake_clock)
    query_len = runner.uniform_decode_query_len  # 1 + the fit's budget (64 + lookup chain)
    assert query_len == 1 + 64 + 3
    points = [MeasurementPoint(4, "vanilla", 0), MeasurementPoint(4, "chain", 2),
              MeasurementPoint(4, "tree", 8), MeasurementPoint(4, "draft", 3)]
    curves = cc.measure_cost_curves(runner, points, context=100, repeats=2)
    shapes = {(b, t, tb is not None) for b, t, tb in runner.calls}
    assert shapes == {(4, 1, False), (4, 3, True), (4, 9, True)}
    chain_tb = next(tb for b, t, tb in runner.calls if t == 3)
    assert chain_tb.tree_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # a causal chain
    assert chain_tb.prefix_lens.tolist() == [100] * 4
    assert chain_tb.query_start.tolist() == [0, 3, 6, 9]
    tree_tb = next(tb for b, t, tb in runner.calls if t == 9)
    assert not bool(tree_tb.tree_mask[2, 1])  # node 2 is not a child of node 1: a real tree
    # fake clock: vanilla 10.4 ms; chain 10 + 1.2 + 5 ms; tree 10 + 3.6 + 5 ms
    assert curves.vanilla_s[4] == pytest.approx(0.0104)
    assert curves.chain[4][2] == pytest.approx(16.2 / 10.4)
    assert curves.tree[4][8] == pytest.approx(18.6 / 10.4)
    assert curves.draft[4][3] == 0.0  # the heads are timed with the same (frozen) clock
    assert runner._tree_batch is None and runner.uniform_decode_query_len == query_len  # restored


def test_time_bound_drops_the_largest_batch_sizes_first(stats_heads, fake_clock):
    runner = FakeRunner(_config(stats_heads), fake_clock)
    points = measurement_points(3, 64, batch_sizes=(1, 4, 16), max_num_seqs=16)
    full = cc.measure_cost_curves(runner, points, max_seconds=1e9)
    assert full.complete and full.batch_sizes == [1, 4, 16]
    runner.calls.clear()
    short = cc.measure_cost_curves(runner, points, max_seconds=0.15)
    assert len(runner.calls) < len(points)
    assert not short.complete and short.batch_sizes == [1]  # batch 1 whole, the rest dropped
    assert short.tree[1] and short.chain[1] and set(short.vanilla_s) == {1}


def test_first_start_measures_and_caches_the_next_reads_explicit_tables_survive(
        stats_heads, fake_clock, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDUSA_VLLM_COST_CURVE", raising=False)
    first = FakeRunner(_config(stats_heads), fake_clock)
    fit = cc.fit_tree_at_startup(first)
    assert fit is not None and first.reloads == 1 and first.calls
    files = list((tmp_path / "cache" / CURVE_DIR).glob("*.json"))
    assert len(files) == 1
    stored = MedusaTreeConfig.from_vllm_config(first.vllm_config)
    assert stored.fit_max_nodes is None and stored.tree == fit.heads_tree.to_list()
    assert first.drafter.nodes_by_batch == fit.nodes_by_batch
    assert first.drafter.tree.num_nodes <= 64

    second = FakeRunner(_config(stats_heads), fake_clock)
    again = cc.fit_tree_at_startup(second)
    assert second.calls == [] and again.tree == fit.tree  # read from the cache: nothing ran

    explicit = FakeRunner(_config(stats_heads, nodes_by_batch={"1": 3, "8": 0}), fake_clock)
    cc.fit_tree_at_startup(explicit)
    assert explicit.calls == []
    assert explicit.medusa_config.nodes_by_batch == {1: 3, 8: 0}  # the user's, kept

    monkeypatch.setenv("MEDUSA_VLLM_COST_CURVE", "remeasure")
    forced = FakeRunner(_config(stats_heads), fake_clock)
    cc.fit_tree_at_startup(forced)
    assert forced.calls  # measured again despite the cache


def test_explicit_trees_and_cost_curve_off_are_not_fitted(stats_heads, fake_clock, caplog):
    for config in (_config(stats_heads, tree="sparse-8"), _config(stats_heads, tree=[[0], [1]])):
        assert config.fit_max_nodes is None
        assert cc.fit_tree_at_startup(FakeRunner(config, fake_clock)) is None
    with caplog.at_level("WARNING", logger="vllm.plugins.medusa_vllm"):
        off = _config(stats_heads, cost_curve="off")
    assert off.fit_max_nodes is None and off.tree == [[0]]
    assert "fitted elsewhere" in caplog.text and "cost_curve='off'" in caplog.text


def test_heads_without_statistics_fall_back_with_a_warning(heads_dir, caplog):
    with caplog.at_level("WARNING", logger="vllm.plugins.medusa_vllm"):
        config = _config(heads_dir)
    assert config.fit_max_nodes is None
    assert "no acceptance statistics" in caplog.text and "fitted elsewhere" in caplog.text


def test_reserve_and_the_ngram_branch_budget(stats_heads):
    # ngram_nodes="auto" (the default) with tree="auto": a lookup chain as deep as the 3 heads
    assert _config(stats_heads).num_speculative_tokens == 64 + 3
    assert _config(stats_heads, ngram_nodes=0).num_speculative_tokens == 64
    assert _config(stats_heads, max_nodes=8, ngram_nodes=0).num_speculative_tokens == 8
    assert _config(stats_heads, max_nodes=8, ngram_nodes=2).num_speculative_tokens == 10
    assert _config(stats_heads, max_nodes=8).ngram_nodes == 3
    # vLLM's num_speculative_tokens is the fit's budget, even above the fallback's 1 node
    budget = MedusaTreeConfig.from_dict({"heads": str(stats_heads)}).resolved(
        num_speculative_tokens=16)
    # (heads nodes; the lookup chain comes on top, as with an explicit ngram_nodes)
    assert budget.fit_max_nodes == 16 + 3 and budget.tree == [[0]]
    with pytest.raises(ValueError, match="MEDUSA_VLLM_COST_CURVE"):
        import os

        os.environ["MEDUSA_VLLM_COST_CURVE"] = "sometimes"
        try:
            _config(stats_heads)
        finally:
            del os.environ["MEDUSA_VLLM_COST_CURVE"]


def test_a_cached_curve_narrower_than_this_engine_is_measured_again(
        stats_heads, fake_clock, tmp_path, monkeypatch):
    # an engine with max_num_seqs=4 times and caches batch sizes 1 and 4 only; one with
    # max_num_seqs=16 must not extrapolate that curve to batch 16: it times batch 16 and
    # keeps the cached batch sizes 1 and 4 as they were
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDUSA_VLLM_COST_CURVE", raising=False)
    narrow = FakeRunner(_config(stats_heads), fake_clock)
    narrow.scheduler_config.max_num_seqs = 4
    cc.fit_tree_at_startup(narrow)
    assert {b for b, _, _ in narrow.calls} == {1, 4}
    narrow_curve = narrow.medusa_startup_fit["curves"]
    wide = FakeRunner(_config(stats_heads), fake_clock)
    fit = cc.fit_tree_at_startup(wide)
    assert {b for b, _, _ in wide.calls} == {16}
    assert set(fit.nodes_by_batch) == {1, 4, 16}
    wide_curve = wide.medusa_startup_fit["curves"]
    for table in ("vanilla_s", "tree", "chain"):
        assert {b: v for b, v in wide_curve[table].items() if b != "16"} == narrow_curve[table]
    assert wide_curve["chain"]["16"]
    again = FakeRunner(_config(stats_heads), fake_clock)
    again.scheduler_config.max_num_seqs = 4
    cc.fit_tree_at_startup(again)
    assert again.calls == []  # the wider curve covers the narrower engine


def test_no_drafts_from_the_first_batch_size_the_time_bound_left_untimed(
        stats_heads, fake_clock, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))
    measure = cc.measure_cost_curves
    monkeypatch.setattr(cc, "measure_cost_curves",
                        lambda runner, points, **kw: measure(runner, points, max_seconds=0.15))
    runner = FakeRunner(_config(stats_heads, ngram_nodes=2), fake_clock)
    fit = cc.fit_tree_at_startup(runner)
    assert set(runner.drafter.online_fit.curves.batch_sizes) == {1}  # only batch 1 timed
    assert fit.nodes_by_batch[4] == 0 and fit.lookup_nodes_by_batch[4] == 0
    assert runner.medusa_config.nodes_by_batch[4] == 0
    assert "batch size 4 and up were not timed" in runner.medusa_startup_fit["origin"]
    assert not list((tmp_path / "cache").rglob("*.json"))  # an incomplete curve is not cached


def test_hydra_heads_are_timed_drafting_a_chain_through_draft_tree(stats_heads, monkeypatch):
    from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig
    from medusa_vllm.engine.hydra_draft import draft_tree

    runner = FakeRunner(_config(stats_heads), [0.0])
    runner.drafter.heads = HydraHeads(HydraHeadsConfig(hidden_size=16, vocab_size=32,
                                                       num_heads=3)).eval()
    calls = []

    def recording(heads, hidden, roots, tree, **kw):
        calls.append((hidden.shape[0], [tuple(p) for p in tree.paths], roots.tolist()))
        return draft_tree(heads, hidden, roots, tree, **kw)  # runs for real

    monkeypatch.setattr(cc, "draft_tree", recording)
    timer = cc._StepTimer(runner, context=100)
    assert timer.draft(4, 3) > 0.0
    assert calls == [(4, [(), (0,), (0, 0), (0, 0, 0)], [0, 0, 0, 0])]


class NoisyRunner(FakeRunner):
    """The fake runner on a busy machine: each pass of the first timed rounds takes an
    extra ``spikes[i]`` seconds (one entry per call, then none)."""

    def __init__(self, config, clock, spikes):
        super().__init__(config, clock)
        self.spikes = list(spikes)

    def _dummy_run(self, num_tokens, **kw):
        out = super()._dummy_run(num_tokens, **kw)
        if self.spikes:
            self.clock[0] += self.spikes.pop(0)
        return out


def test_a_spike_in_one_round_is_dropped_and_costs_are_monotone(stats_heads, fake_clock):
    points = [MeasurementPoint(1, "vanilla", 0), MeasurementPoint(1, "tree", 2),
              MeasurementPoint(1, "tree", 4)]
    # calls: round 0 is warm-up + timed pass per point (vanilla, tree 2, tree 4), round 1
    # one timed pass each. Round 0's timed 2-node tree pass is 8 ms slow, round 1's is
    # quiet: the minimum over rounds drops the spike
    spikes = [0, 0, 0, 0.008]
    runner = NoisyRunner(_config(stats_heads), fake_clock, spikes)
    curves = cc.measure_cost_curves(runner, points, repeats=2)
    assert curves.tree[1][2] == pytest.approx(15.3 / 10.1)
    # a spike in every round of the small tree: the larger tree, timed faster, bounds it
    spikes = [0, 0, 0, 0.008, 0, 0, 0, 0.008]
    runner = NoisyRunner(_config(stats_heads), fake_clock, spikes)
    curves = cc.measure_cost_curves(runner, points, repeats=2)
    assert curves.tree[1][2] == curves.tree[1][4] == pytest.approx(15.5 / 10.1)
    assert curves.noise == 0.0  # one point of three spread: the median point's rounds agree


def test_costs_stay_ordered_and_a_pass_faster_than_vanilla_bounds_the_vanilla_step():
    from medusa_vllm.core.cost_curve import CostCurves

    raw = CostCurves(vanilla_s={1: 0.04, 4: 0.05}, tree={1: {2: 1.46, 4: 1.35, 8: 1.85},
                                                         4: {2: 1.5}},
                     chain={1: {1: 0.97, 2: 1.20, 3: 1.16}, 4: {1: 1.2}},
                     draft={1: {1: 0.02, 2: 0.01}, 4: {1: 0.01}})
    fixed = raw.monotone()
    # batch 1: the 1-chain was timed at 0.97 of the vanilla step, so the vanilla step
    # takes its time and every ratio at batch 1 is against it: the chain costs 1.0, the
    # trees keep their distance above it
    assert fixed.vanilla_s[1] == pytest.approx(0.04 * 0.97)
    assert fixed.chain[1] == pytest.approx({1: 1.0, 2: 1.16 / 0.97, 3: 1.16 / 0.97})
    assert fixed.tree[1] == pytest.approx({2: 1.35 / 0.97, 4: 1.35 / 0.97, 8: 1.85 / 0.97})
    assert fixed.draft[1] == pytest.approx({1: 0.01 / 0.97, 2: 0.01 / 0.97})
    # batch 4: nothing below vanilla, nothing changes
    assert (fixed.vanilla_s[4], fixed.tree[4], fixed.chain[4], fixed.draft[4]) == (
        0.05, {2: 1.5}, {1: 1.2}, {1: 0.01})
    assert raw.tree[1][2] == 1.46 and raw.vanilla_s[1] == 0.04  # a copy: the measurement is kept


def test_a_noisy_curve_steers_this_engine_but_is_not_cached(
        stats_heads, fake_clock, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDUSA_VLLM_COST_CURVE", raising=False)
    # a busy machine: half the passes, at random, 8 ms (about 50 %) slower
    import random

    rng = random.Random(0)
    runner = NoisyRunner(_config(stats_heads), fake_clock,
                         [rng.choice((0.0, 0.008)) for _ in range(10_000)])
    fit = cc.fit_tree_at_startup(runner)
    assert fit is not None and runner.medusa_startup_fit["curves"]["noise"] > cc.NOISE_LIMIT
    assert "not cached" in runner.medusa_startup_fit["origin"]
    assert not list((tmp_path / "cache").rglob("*.json"))
    quiet = FakeRunner(_config(stats_heads), fake_clock)
    cc.fit_tree_at_startup(quiet)
    assert quiet.calls and quiet.medusa_startup_fit["curves"]["noise"] == 0.0
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1


def test_the_noise_limit_can_be_raised_for_a_machine_that_is_never_quiet(
        stats_heads, fake_clock, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDUSA_VLLM_COST_CURVE", raising=False)
    import random

    rng = random.Random(0)
    delays = [rng.choice((0.0, 0.008)) for _ in range(10_000)]
    monkeypatch.setenv(cc.NOISE_LIMIT_ENV, "5")
    runner = NoisyRunner(_config(stats_heads), fake_clock, delays)
    cc.fit_tree_at_startup(runner)
    assert runner.medusa_startup_fit["curves"]["noise"] > cc.NOISE_LIMIT
    assert "not cached" not in runner.medusa_startup_fit["origin"]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    for bad in ("lots", "-0.1", "nan"):
        monkeypatch.setenv(cc.NOISE_LIMIT_ENV, bad)
        with pytest.raises(MedusaConfigError, match=cc.NOISE_LIMIT_ENV):
            cc.fit_tree_at_startup(NoisyRunner(_config(stats_heads), fake_clock, delays))


def test_the_time_bound_can_be_raised_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv(cc.MAX_SECONDS_ENV, raising=False)
    assert cc.max_seconds() == cc.MAX_SECONDS
    monkeypatch.setenv(cc.MAX_SECONDS_ENV, "90")
    assert cc.max_seconds() == 90.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(cc.MAX_SECONDS_ENV, bad)
        with pytest.raises(MedusaConfigError, match=cc.MAX_SECONDS_ENV):
            cc.max_seconds()
