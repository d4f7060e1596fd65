"""One real ``medusa-vllm bench`` run on a tiny random model: vanilla and ours,
offline, concurrency 1, one round, greedy (plumbing, not speed)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from medusa_vllm.checkpoints import save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.tools.bench import cli
from medusa_vllm.tools.tiny_models import build_tiny_llama


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_runs_end_to_end_on_a_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(tmp_path / "model", vocab=512, hidden=64, layers=2, seed=0)
    lm = AutoModelForCausalLM.from_pretrained(model).lm_head.weight.detach()
    torch.manual_seed(1)
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=64, vocab_size=512, num_heads=2), lm_head_weight=lm)
    save_heads(heads, tmp_path / "heads", overwrite=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "one two three one two three"}\n{"prompt": "hello there"}\n')
    out = tmp_path / "out"
    args = cli.add_bench_args(argparse.ArgumentParser()).parse_args([
        "--model", str(model), "--heads", str(tmp_path / "heads"), "--tree", "sparse-4",
        "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "8", "--max-model-len", "256",
        "--concurrency", "1", "--transports", "offline", "--repeats", "1", "--modes", "greedy",
        "--configs", "vanilla,medusa_tree", "--dtype", "float32", "--kv-cache-gib", "1", "--out", str(out)])
    assert cli.bench_main(args) == 0
    data = json.loads((out / "bench.json").read_text())
    recs = {r["config"]: r for r in data["records"]}
    assert set(recs) == {"vanilla", "medusa_tree"} and all(r["status"] == "ok" for r in recs.values())
    ours = recs["medusa_tree"]
    assert ours["same_output_as_vanilla"] == 1.0  # float32 greedy: token for token
    assert ours["output_tokens"] == 16 and ours["requests"] == 2
    assert ours["spec"]["num_drafts"] > 0 and ours["mean_accepted_length"] >= 1.0
    assert ours["tpot_ms"]["median"] > 0 and ours["ttft_ms"]["median"] > 0
    assert 0.0 < ours["proposer_share"] < 1.0 and recs["vanilla"]["proposer_share"] == 0.0
    assert 100 < ours["peak_rss_mb"]["worker"] < ours["peak_rss_mb"]["all_processes"]
    assert ours["speedup_vs_vanilla"] > 0
    assert (out / "bench.md").read_text().startswith("# medusa-vllm bench")
