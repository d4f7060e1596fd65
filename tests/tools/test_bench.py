"""``medusa-vllm bench`` without an engine: a fake run function with known speeds
checks the schedule, the record format, the within-round ratios and their
spread, the best settings, and the JSON / markdown / PNG outputs."""

from __future__ import annotations

import argparse
import json

import pytest

import medusa_vllm.training.prompts as prompts_mod
from medusa_vllm.tools import bench
from medusa_vllm.tools.bench import cli, configs, report
from medusa_vllm.tools.bench.http import parse_spec_metrics
from medusa_vllm.tools.bench.prompts import EVERYDAY_PROMPTS, load_prompts
from medusa_vllm.training.corpora.common import MissingCorpus, missing_corpus

APT = "apt-get update && apt-get install -y --no-install-recommends fortunes"


def parse(*argv: str) -> argparse.Namespace:
    return cli.add_bench_args(argparse.ArgumentParser()).parse_args(list(argv))


# ------------------------------------------------------------------ prompts
@pytest.fixture
def no_corpus(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path / "cache"))  # no cached draw either

    def missing(*args, **kwargs):
        raise missing_corpus("fortune files", "/usr/share/games/fortunes", "fortunes")

    monkeypatch.setattr(prompts_mod, "build_prompts", missing)


def test_bench_refuses_without_its_corpus_and_names_the_install_command(no_corpus, tmp_path, capsys):
    args = parse("--model", "m", "--heads", "h", "--prompts", "corpus", "--out", str(tmp_path / "out"))
    assert cli.bench_main(args, run=lambda *a: pytest.fail("ran an engine")) == 2
    err = capsys.readouterr().err
    assert err.startswith("medusa-vllm bench: error: bench draws its prompts from the offline Debian corpora")
    assert "Debian package fortunes" in err and APT in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_calibrate_cost_curve_refuses_too(no_corpus, tmp_path):
    from medusa_vllm.tools.calibrate import measure_cost_curve
    from medusa_vllm.tools.tiny_models import write_medusa_heads_config

    heads = write_medusa_heads_config(tmp_path / "heads", num_heads=2)
    with pytest.raises(MissingCorpus, match=APT.replace("&", r"\&")):
        measure_cost_curve("model", str(heads), [2], 1, run=lambda spec: pytest.fail("ran an engine"))


def test_corpus_prompts_come_from_the_heldout_split(monkeypatch):
    calls = []
    monkeypatch.setattr(prompts_mod, "build_prompts", lambda n, seed, split: calls.append((n, seed, split))
                        or [f"p{i}" for i in range(n)])
    assert bench.bench_prompts(3, seed=1234) == ["p0", "p1", "p2"]
    assert load_prompts("corpus", 2) == ["p0", "p1"]
    assert calls == [(3, 1234, "heldout"), (2, 1234, "heldout")]
    mix = load_prompts("mix", 5)
    assert mix == ["p0", EVERYDAY_PROMPTS[0], "p1", EVERYDAY_PROMPTS[1], "p2"]


def test_corpus_draws_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(prompts_mod, "build_prompts", lambda n, seed, split: calls.append(n)
                        or [f"p{i}" for i in range(n)])
    assert load_prompts("corpus", 3, cache=True) == ["p0", "p1", "p2"]
    assert load_prompts("corpus", 3, cache=True) == ["p0", "p1", "p2"] and calls == [3]
    assert load_prompts("corpus", 2, cache=True) == ["p0", "p1"] and calls == [3, 2]  # other size
    assert len(list((tmp_path / "bench").glob("corpus-prompts-*.json"))) == 2


def test_everyday_and_file_prompts(tmp_path):
    n = len(EVERYDAY_PROMPTS)
    every = load_prompts("everyday", n + 2)
    assert every[:n] == list(EVERYDAY_PROMPTS) and every[n:] == list(EVERYDAY_PROMPTS[:2])  # cycles
    kinds = " ".join(EVERYDAY_PROMPTS).lower()
    for word in ("explain", "list", "poem", "email", "recipe", "python"):
        assert word in kinds
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n"b"\n{"text": "c"}\n')
    assert load_prompts(str(f), 4) == ["a", "b", "c", "a"]
    f.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="line 1 has no 'prompt'"):
        load_prompts(str(f), 1)
    with pytest.raises(ValueError, match="corpus, everyday, mix"):
        load_prompts("nope", 1)


# ------------------------------------------------------------------ configs
def test_config_table_builds_every_engine(tmp_path):
    ctx = configs.BenchContext(model="m", heads="h", num_heads=3, vllm_heads="hv",
                               medusa_heads="hm", medusa_num_heads=3)
    ks = configs.CONFIGS["vllm_medusa"].variants(ctx)
    assert [v.label for v in ks] == ["k=1", "k=2", "k=3"]  # default sweep 1..K
    assert ks[2].speculative_config == {"method": "medusa", "model": "hv", "num_speculative_tokens": 3}
    ng = configs.CONFIGS["vllm_ngram"].variants(ctx)
    assert len(ng) == 4 and ng[0].speculative_config == {
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    ours = configs.CONFIGS["medusa_tree_ngram"].variants(ctx)[0].speculative_config
    # tree auto (the default): the start-up fit sizes it; an explicit tree: all of it;
    # lookup as deep as the default 4 tokens, capped at the 3 heads' depth
    assert ours["method"] == "medusa_tree" and ours["ngram_nodes"] == 3 and "nodes_by_batch" not in ours
    fixed = configs.BenchContext(model="m", heads="h", num_heads=3, vllm_heads="hv", tree="sparse-16")
    assert configs.CONFIGS["medusa_tree_ngram"].variants(fixed)[0].speculative_config[
        "nodes_by_batch"] == "off"
    assert configs.CONFIGS["medusa_tree"].modes == ("greedy", "typical", "rejection")
    assert configs.CONFIGS["medusa_tree_adaptive"].variants(ctx)[0].speculative_config["adaptive"] is True
    beams = configs.CONFIGS["medusa_tree_beam"].variants(ctx)
    assert [v.speculative_config["tree"] for v in beams] == ["beam:2", "beam:5"]
    assert {v.speculative_config["model"] for v in beams} == {"hm"}  # beams need Medusa heads
    assert configs.CONFIGS["medusa_tree"].variants(ctx)[0].speculative_config["model"] == "h"
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        configs.CONFIGS["vllm_medusa"].variants(configs.BenchContext(
            "m", "h", 3, medusa_ks=[4], medusa_heads="hm", medusa_num_heads=3))
    extra = configs.config_from_json('beam4={"method": "medusa_tree", "tree": "beam:4", '
                                     '"bench_modes": ["greedy", "rejection"]}')
    assert extra.family == "ours" and extra.modes == ("greedy", "rejection")
    assert extra.variants(ctx)[0].speculative_config == {"method": "medusa_tree", "model": "h", "tree": "beam:4"}
    with pytest.raises(ValueError, match="NAME=JSON"):
        configs.config_from_json('{"method": "ngram"}')
    cost = configs.cost_curve_config(16)
    assert cost.offline_only and cost.variants(ctx)[0].speculative_config["tree"] == "sparse-16"
    assert configs.reference_mode("typical") == "sample" and configs.reference_mode("greedy") == "greedy"


def test_sampling_modes_carry_temperature_and_acceptance():
    assert configs.MODES["greedy"].sampling_params(0.7, 16, False) == {
        "temperature": 0.0, "max_tokens": 16, "ignore_eos": False}
    assert configs.MODES["typical"].sampling_params(0.7, 16, True) == {
        "temperature": 0.7, "max_tokens": 16, "ignore_eos": True,
        "extra_args": {"medusa_acceptance": "typical"}}


def test_suffix_is_recorded_unavailable_with_its_reason(monkeypatch, tmp_path, heads):
    monkeypatch.setattr(configs.importlib.util, "find_spec", lambda name: None)
    plan = cli.make_plan(parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick",
                               "--configs", "vanilla,vllm_suffix", "--out", str(tmp_path)))
    assert [s.config.name for s in plan.slots] == ["vanilla"]
    (u,) = plan.unavailable
    assert u["config"] == "vllm_suffix" and u["status"] == "unavailable" and "arctic_inference" in u["reason"]


def test_hydra_heads_need_medusa_heads_for_vllms_medusa_and_beams(tmp_path, heads):
    hydra = tmp_path / "hydra"
    hydra.mkdir()
    cfg = json.loads((tmp_path / "heads" / "config.json").read_text())
    (hydra / "config.json").write_text(json.dumps(
        {**cfg, "head_type": "hydra", "architectures": ["HydraHeads"]}))
    argv = ["--model", "m", "--heads", str(hydra), "--prompts", "everyday", "--quick",
            "--configs", "vanilla,vllm_medusa,medusa_tree,medusa_tree_beam", "--out", str(tmp_path)]
    plan = cli.make_plan(parse(*argv))
    assert [s.config.name for s in plan.slots] == ["vanilla", "medusa_tree"]
    assert {u["config"] for u in plan.unavailable} == {"vllm_medusa", "medusa_tree_beam"}
    assert all("hydra heads" in u["reason"] and "--medusa-heads" in u["reason"]
               for u in plan.unavailable)
    plan = cli.make_plan(parse(*argv, "--medusa-heads", heads))
    names = {s.config.name: s for s in plan.slots}
    assert set(names) == {"vanilla", "vllm_medusa", "medusa_tree", "medusa_tree_beam"}
    assert names["medusa_tree"].variant.speculative_config["model"] == str(hydra)
    assert names["medusa_tree_beam"].variant.speculative_config["model"] == heads
    assert plan.settings["ctx"].medusa_heads == heads and plan.header["medusa_heads"] == heads
    with pytest.raises(SystemExit, match="plain Medusa heads"):
        cli.make_plan(parse(*argv, "--medusa-heads", str(hydra)))


# ------------------------------------------------------------------ schedule
def test_quick_is_small(tmp_path, heads):
    plan = cli.make_plan(parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick",
                               "--out", str(tmp_path)))
    assert [(s.config.name, s.variant.label, s.modes) for s in plan.slots] == [
        ("vanilla", "", ["greedy", "sample"]), ("vllm_medusa", "k=1", ["greedy"]),
        ("vllm_ngram", "k=4,max=5", ["greedy"]), ("medusa_tree", "", ["greedy", "typical", "rejection"])]
    assert {s.transport for s in plan.slots} == {"offline"} and plan.args.repeats == 2
    assert plan.requests == {1: 2, 4: 8} and plan.header["dtype_reason"] == "this CPU's best: preferred_dtype()"


def test_rounds_alternate_the_slot_order(tmp_path, heads):
    plan = cli.make_plan(parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick",
                               "--configs", "vanilla,vllm_ngram,medusa_tree", "--repeats", "3",
                               "--out", str(tmp_path)))
    names = [s.config.name for s in plan.slots]
    assert names == ["vanilla", "vllm_ngram", "medusa_tree"]
    order = [(r, s.config.name) for r, s in cli.schedule(plan.slots, 3)]
    assert order == [(0, "vanilla"), (0, "vllm_ngram"), (0, "medusa_tree"),
                     (1, "medusa_tree"), (1, "vllm_ngram"), (1, "vanilla"),
                     (2, "vanilla"), (2, "vllm_ngram"), (2, "medusa_tree")]
    with pytest.raises(ValueError, match="repeats"):
        cli.schedule(plan.slots, 0)
    assert cli.requests_per_level(1, 4) == 4 and cli.requests_per_level(16, 4) == 32
    # asking for one sampling mode still measures vanilla sampling, its reference
    plan = cli.make_plan(parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick",
                               "--configs", "vanilla,medusa_tree", "--modes", "typical",
                               "--out", str(tmp_path)))
    assert [(s.config.name, s.modes) for s in plan.slots] == [("vanilla", ["sample"]),
                                                              ("medusa_tree", ["typical"])]


# --------------------------------------------------------- fake engine runs
# tokens/s of each (config, variant, mode, concurrency) at round speed 1.0
SPEED = {
    ("vanilla", "", "greedy"): 10.0, ("vanilla", "", "sample"): 8.0,
    ("vllm_ngram", "k=4,max=5", "greedy"): 12.0, ("vllm_ngram", "k=4,max=5", "sample"): 9.0,
    ("vllm_medusa", "k=1", "greedy"): 11.0, ("vllm_medusa", "k=1", "sample"): 10.0,
    ("vllm_medusa", "k=2", "greedy"): 13.0, ("vllm_medusa", "k=2", "sample"): 6.0,
    ("medusa_tree", "", "greedy"): 15.0, ("medusa_tree", "", "typical"): 12.0,
    ("medusa_tree", "", "rejection"): 10.0,
}
ROUND_SPEED = [1.0, 0.5, 2.0]  # machine drift: cancels out within a round
TOKENS = 40  # per request


def fake_run(calls: list):
    def run(plan, slot, rnd):
        calls.append((rnd, slot.label))
        levels = []
        for mode in slot.modes:
            for c in slot.concurrency:
                n = plan.requests[c]
                tps = SPEED[slot.config.name, slot.variant.label, mode] * ROUND_SPEED[rnd] * c
                if slot.config.name == "medusa_tree" and mode == "greedy" and rnd == 2:
                    tps *= 1.2  # one noisy round: spread, not one number
                greedy = mode == "greedy"
                reqs = [{"tokens": TOKENS, "ttft_s": 0.01 * (i + 1), "tpot_s": 0.1 / (i + 1),
                         **({"token_ids": [i, 7 if slot.config.name == "vllm_ngram" and i == 0 else 1]}
                            if greedy else {})} for i in range(n)]
                spec = {} if slot.config.name == "vanilla" else {
                    "num_drafts": 10, "num_accepted_tokens": 5, "mean_accepted_length": 1.5,
                    "acceptance_per_depth": [0.4, 0.1, 0.0, 0.0]}
                levels.append({"concurrency": c, "mode": mode, "wall_s": n * TOKENS / tps, "requests": reqs,
                               "spec": spec, "num_preemptions": 0,
                               "timers": {"proposer_share": 0.25, "step_ms": 20.0}})
        return {"levels": levels, "timers_installed": True, "peak_rss_mb": {"worker": 900.0 + rnd,
                                                                              "all_processes": 1500.0}}
    return run


@pytest.fixture
def fake_bench(tmp_path, heads):
    args = parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick", "--repeats", "3",
                 "--num-prompts", "4", "--vllm-modes", "greedy,sample",
                 "--configs", "vanilla,vllm_medusa,vllm_ngram,vllm_suffix,medusa_tree", "--medusa-ks", "1,2",
                 "--out", str(tmp_path / "out"))
    plan = cli.make_plan(args)
    calls: list = []
    records, summary = cli.run_bench(plan, fake_run(calls), say=lambda s: None)
    return plan, records, summary, calls


def _rec(records, **kw):
    out = [r for r in records if all(r.get(k) == v for k, v in kw.items())]
    assert len(out) == 1, (kw, len(out))
    return out[0]


def test_one_record_per_config_variant_transport_concurrency_mode_repeat(fake_bench):
    _, records, _, calls = fake_bench
    ok = [r for r in records if r["status"] == "ok"]
    # engines: vanilla, medusa k=1, k=2, ngram, ours = 5 per round, 3 rounds
    assert len(calls) == 15
    modes = {"vanilla": 2, "vllm_medusa": 2, "vllm_ngram": 2, "medusa_tree": 3}
    per_round = sum(modes[c] * (2 if c == "vllm_medusa" else 1) for c in modes) * 2  # 2 levels
    assert len(ok) == 3 * per_round
    keys = {(r["config"], r["variant"], r["transport"], r["concurrency"], r["mode"], r["repeat"]) for r in ok}
    assert len(keys) == len(ok)
    r = _rec(ok, config="medusa_tree", mode="typical", concurrency=4, repeat=1)
    assert r["requests"] == 8 and r["output_tokens"] == 8 * TOKENS
    assert r["tokens_per_s"] == pytest.approx(12.0 * 0.5 * 4)
    assert r["temperature"] == 0.7 and _rec(ok, config="vanilla", mode="greedy", concurrency=1,
                                            repeat=0)["temperature"] == 0.0
    # per-request percentiles of 1..8 requests' figures (linear interpolation)
    assert r["ttft_ms"]["median"] == pytest.approx(45.0) and r["ttft_ms"]["p90"] == pytest.approx(73.0)
    assert r["mean_accepted_length"] == 1.5 and r["acceptance_per_depth"] == [0.4, 0.1]
    assert r["proposer_share"] == 0.25 and r["peak_rss_mb"] == {"worker": 901.0, "all_processes": 1500.0}
    assert _rec(ok, config="vanilla", mode="greedy", concurrency=1, repeat=0)["mean_accepted_length"] is None
    assert "_outputs" not in r
    (u,) = [r for r in records if r["status"] != "ok"]
    assert u["config"] == "vllm_suffix" and "arctic_inference" in u["reason"]


def test_ratios_are_within_the_round_against_the_right_vanilla(fake_bench):
    _, records, _, _ = fake_bench
    ok = [r for r in records if r["status"] == "ok"]
    for rnd in range(3):
        # greedy vs vanilla greedy; drift (ROUND_SPEED) cancels
        g = _rec(ok, config="medusa_tree", mode="greedy", concurrency=1, repeat=rnd)
        assert g["speedup_vs_vanilla"] == pytest.approx(1.5 * (1.2 if rnd == 2 else 1.0))
        # sampling modes vs vanilla SAMPLING at the same temperature (8 tok/s, not 10)
        t = _rec(ok, config="medusa_tree", mode="typical", concurrency=4, repeat=rnd)
        assert t["speedup_vs_vanilla"] == pytest.approx(12.0 / 8.0)
        # best vLLM speculator: greedy -> medusa k=2 (13 > 12 > 11); sampling -> medusa k=1 (10)
        assert g["speedup_vs_best_vllm"] == pytest.approx(15.0 / 13.0 * (1.2 if rnd == 2 else 1.0))
        assert g["best_vllm"] == "vllm_medusa k=2"
        assert t["speedup_vs_best_vllm"] == pytest.approx(12.0 / 10.0) and t["best_vllm"] == "vllm_medusa k=1"
        # step cost: TPOT median (same for all) x accepted length / vanilla's TPOT
        assert g["step_cost_vs_vanilla"] == pytest.approx(1.5)
    # greedy outputs compared with vanilla's of the same round: ngram differs on request 0 of 4
    assert _rec(ok, config="vllm_ngram", mode="greedy", concurrency=1, repeat=0)[
        "same_output_as_vanilla"] == pytest.approx(0.75)
    assert _rec(ok, config="medusa_tree", mode="greedy", concurrency=4, repeat=0)["same_output_as_vanilla"] == 1.0
    assert _rec(ok, config="medusa_tree", mode="typical", concurrency=4, repeat=0)["same_output_as_vanilla"] is None


def test_summary_spread_and_best_settings(fake_bench):
    _, _, summary, _ = fake_bench

    def row(**kw):
        return _rec(summary, transport="offline", **kw)

    ours = row(config="medusa_tree", variant="", mode="greedy", concurrency=1)
    assert ours["repeats"] == 3
    assert ours["speedup_vs_vanilla"] == {"min": pytest.approx(1.5), "median": pytest.approx(1.5),
                                          "max": pytest.approx(1.8), "n": 3}
    assert ours["tokens_per_s"]["median"] == pytest.approx(15.0)  # rounds 7.5, 15, 36
    # best setting per (config, mode): k=2 greedy, k=1 sampling; every setting kept
    assert row(config="vllm_medusa", variant="k=2", mode="greedy", concurrency=1)["best"]
    assert not row(config="vllm_medusa", variant="k=1", mode="greedy", concurrency=1)["best"]
    assert row(config="vllm_medusa", variant="k=1", mode="sample", concurrency=1)["best"]
    assert row(config="vanilla", variant="", mode="greedy", concurrency=4)["speedup_vs_vanilla"]["median"] == 1.0
    assert ours["peak_rss_mb"] == 902.0 and ours["same_output_as_vanilla"] == 1.0
    assert ours["acceptance_per_depth"] == [0.4, 0.1]


def test_outputs_json_markdown_png(fake_bench):
    plan, records, summary, _ = fake_bench
    json_path, md_path, pngs = cli.write_outputs(plan, records, summary)
    data = json.loads(json_path.read_text())
    assert data["header"]["dtype"] in ("float32", "bfloat16") and data["header"]["machine"]["cpu_model"]
    assert data["header"]["vllm_version"] and "command" in data["header"]
    assert len(data["records"]) == len(records) and data["summary"]
    md = md_path.read_text()
    assert md.startswith("# medusa-vllm bench") and "- machine: " in md and "## offline" in md
    assert "| 1 | medusa_tree | greedy | – | 15.0 | 1.50 (1.50–1.80) | 1.15 (1.15–1.38) |" in md
    assert "vllm_suffix** (unavailable)" in md and "arctic_inference" in md
    assert "| offline | 1 | vllm_medusa | greedy | k=1 | 1.10 (1.10–1.10) |" in md
    assert {p.name for p in pngs} == {"speedup_offline.png", "acceptance_per_depth.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_main_writes_partial_results_after_every_engine(tmp_path, heads):
    args = parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick", "--num-prompts", "4",
                 "--configs", "vanilla,medusa_tree", "--repeats", "1", "--out", str(tmp_path / "out"))
    seen = []

    def run(plan, slot, rnd):
        part = tmp_path / "out" / "partial" / "bench.json"
        seen.append(len(json.loads(part.read_text())["records"]) if part.exists() else 0)
        return fake_run([])(plan, slot, rnd)

    assert cli.bench_main(args, run=run) == 0
    assert seen == [0, 4]  # vanilla's 2 modes x 2 levels were on disk before ours started
    assert (tmp_path / "out" / "bench.md").read_text().startswith("# medusa-vllm bench")


def test_a_failed_engine_is_recorded_and_not_retried(tmp_path, heads):
    from medusa_vllm.tools.engine_proc import EngineRunError

    plan = cli.make_plan(parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick",
                               "--configs", "vanilla,medusa_tree", "--out", str(tmp_path)))
    calls: list = []
    ok_run = fake_run(calls)

    def run(plan, slot, rnd):
        if slot.config.name == "medusa_tree":
            calls.append((rnd, slot.label))
            raise EngineRunError("engine run failed (exit 1)\nValueError: bad tree")
        return ok_run(plan, slot, rnd)

    records, summary = cli.run_bench(plan, run, say=lambda s: None)
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["repeat"] for r in failed] == [0, 1]
    assert "ValueError: bad tree" in failed[0]["reason"] and failed[1]["reason"].startswith("not retried")
    assert [c for c in calls if "medusa_tree" in c[1]] == [(0, "medusa_tree [offline]")]
    assert all(s["config"] == "vanilla" for s in summary)


def test_percentile_and_spread():
    assert report.percentile([1, 2, 3, 4], 50) == 2.5 and report.percentile([5], 90) == 5
    assert report.percentile([], 50) is None
    assert report.spread([None, 2.0, 1.0, 4.0]) == {"min": 1.0, "median": 2.0, "max": 4.0, "n": 3}
    assert report.spread([None]) is None


def test_prometheus_spec_metrics_parse():
    text = """\
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="bench"} 10.0
# TYPE vllm:spec_decode_num_draft_tokens counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="bench"} 30.0
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="bench"} 12.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="bench",position="0"} 8.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="bench",position="2"} 1.0
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="bench"} 2.0
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0"} 99.0
"""
    s, pre = parse_spec_metrics(text)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (10, 30, 12)
    assert s.accepted_per_depth == [8, 0, 1] and pre == 2
    assert s.mean_accepted_length == pytest.approx(2.2)


def test_http_runs_each_swept_mode_at_its_best_offline_setting(tmp_path, heads):
    args = parse("--model", "m", "--heads", heads, "--prompts", "everyday", "--quick", "--repeats", "2",
                 "--num-prompts", "4", "--vllm-modes", "greedy,sample",
                 "--transports", "offline,http", "--configs", "vanilla,vllm_medusa,medusa_tree",
                 "--medusa-ks", "1,2", "--out", str(tmp_path))
    plan = cli.make_plan(args)
    assert [s.label for s in plan.deferred] == ["vllm_medusa k=1 [http]"]
    calls: list = []
    records, _ = cli.run_bench(plan, fake_run(calls), say=lambda s: None)
    labels = [c[1] for c in calls]
    n_off = 2 * 4  # vanilla, k=1, k=2, ours; 2 rounds
    assert all("[offline]" in c for c in labels[:n_off]) and all("[http]" in c for c in labels[n_off:])
    # greedy was best at k=2, sampling at k=1: two HTTP engines for vLLM's Medusa, vanilla first
    assert labels[n_off:n_off + 4] == ["vanilla [http]", "vllm_medusa k=2 [http]", "vllm_medusa k=1 [http]",
                                       "medusa_tree [http]"]
    assert labels[n_off + 4:] == list(reversed(labels[n_off:n_off + 4]))
    http = {(r["variant"], r["mode"]) for r in records
            if r["status"] == "ok" and r["transport"] == "http" and r["config"] == "vllm_medusa"}
    assert http == {("k=2", "greedy"), ("k=1", "sample")}
    ours = _rec(records, config="medusa_tree", transport="http", mode="greedy", concurrency=4, repeat=1)
    assert ours["speedup_vs_vanilla"] == pytest.approx(1.5) and ours["same_output_as_vanilla"] == 1.0
    # offline identity survives the second annotate() pass
    assert _rec(records, config="medusa_tree", transport="offline", mode="greedy",
                concurrency=1, repeat=0)["same_output_as_vanilla"] == 1.0
