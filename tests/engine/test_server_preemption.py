"""Preemption under memory pressure with Medusa on: a server whose KV cache holds
only a few sequences (a handful of blocks) gets many concurrent long-ish greedy
requests, so vLLM preempts (``vllm:num_preemptions`` > 0) and re-schedules them;
every output equals a vanilla server's under the same pressure, no request hangs
(each has a deadline) and the KV cache is empty afterwards."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.engine.servers import log_dir, metric, metrics_text, tiny_model_and_heads, vllm_servers

pytestmark = pytest.mark.slow

# 8 blocks of 32 tokens (vLLM's CPU attention needs a multiple of 32) = 256 token slots:
# three or four of the requests below at once
PRESSURE_FLAGS = ("--num-gpu-blocks-override", "8", "--block-size", "32", "--max-model-len",
                  "160", "--max-num-seqs", "16")
NUM_REQUESTS = 24
REQUEST_DEADLINE_S = 600.0
PREEMPTIONS = "vllm:num_preemptions_total"


def _prompts() -> list[tuple[str, int]]:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "tree", "heads"]
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(10, 30))), rng.choice([60, 80, 96]))
            for _ in range(NUM_REQUESTS)]


async def _all(base_v1: str, model: str) -> list[str]:
    async with openai.AsyncOpenAI(base_url=base_v1, api_key="unused", timeout=REQUEST_DEADLINE_S,
                                  max_retries=0) as client:
        async def one(prompt: str, max_tokens: int) -> str:
            r = await asyncio.wait_for(client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                extra_body={"ignore_eos": True}), REQUEST_DEADLINE_S)
            assert r.usage.completion_tokens == max_tokens
            return r.choices[0].text

        return list(await asyncio.gather(*(one(p, n) for p, n in _prompts())))


@pytest.mark.timeout(2400)
def test_preemption_under_memory_pressure_equals_vanilla():
    model, heads = tiny_model_and_heads()
    logs = log_dir("preemption")
    specs = [(model, logs / "vanilla.log", *PRESSURE_FLAGS),
             (model, logs / "medusa.log", *PRESSURE_FLAGS,
              "--speculative-model", f"medusa:{heads}")]
    out, figures = {}, {}
    with vllm_servers(*specs) as servers:
        for label, server in zip(("vanilla", "medusa"), servers):
            out[label] = asyncio.run(_all(server.v1, str(model)))
            client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
            client.completions.create(model=str(model), prompt="x", max_tokens=1, temperature=0)
            metrics = metrics_text(server.base)
            figures[label] = {
                "preemptions": metric(metrics, PREEMPTIONS),
                "kv_usage_after": metric(metrics, "vllm:kv_cache_usage_perc"),
                "alive": server.alive(),
            }
            if label == "medusa":
                figures[label]["drafts"] = metric(metrics, "vllm:spec_decode_num_drafts_total")
    print("preemption figures:", figures)
    assert figures["medusa"]["preemptions"] > 0, "no preemption: the pressure is too low"
    assert figures["medusa"]["drafts"] > 0
    for label, f in figures.items():
        assert f["alive"] and f["kv_usage_after"] == 0.0, (label, f)
    diffs = [i for i, (a, b) in enumerate(zip(out["vanilla"], out["medusa"])) if a != b]
    assert not diffs, [(i, out["vanilla"][i], out["medusa"][i]) for i in diffs[:3]]
