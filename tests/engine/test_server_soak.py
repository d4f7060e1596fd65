"""A soak of `vllm serve --speculative-model medusa:HEADS` beside a vanilla server:
a few hundred requests in bursts of up to 64 concurrent clients (asyncio +
`openai.AsyncOpenAI`), mixed prompt and output lengths, greedy / sampled /
typical acceptance, streamed and not, a fifth of the streaming clients
disconnecting mid-stream. Afterwards each server is up, every completed greedy
output of ours equals vanilla's for the same request, and the KV cache usage on
/metrics is back at its idle value (no leaked blocks). The figures (requests,
disconnects, requests/s, latency percentiles, KV usage) are printed and written
to ``soak.json`` in the test's tmp dir."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.engine.servers import log_dir, metric, metrics_text, tiny_model_and_heads, vllm_servers

pytestmark = pytest.mark.slow

NUM_REQUESTS = 300
MAX_BURST = 64
SEED = 0
KV_USAGE = "vllm:kv_cache_usage_perc"
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Medusa", "adds", "extra", "decoding", "heads", "to", "predict", "several", "tokens", "at", "once", "tree", "of", "candidate", "continuations", "is", "verified", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "once", "upon", "a", "time", "there", "was", "little", "girl", "who", "loved", "read", "stories"]


@dataclass(frozen=True)
class Req:
    """One client's request: what it asks and how it behaves."""

    i: int
    prompt: str
    max_tokens: int
    kind: str  # "greedy" | "sampled" | "typical"
    stream: bool
    disconnect_after: int | None  # chunks read before the client hangs up (streams only)

    def body(self) -> dict:
        extra: dict = {"ignore_eos": self.i % 3 != 0 or self.disconnect_after is not None}
        kw: dict = {"temperature": 0.0}
        if self.kind == "sampled":
            kw = {"temperature": 0.8, "top_p": 0.95}
        elif self.kind == "typical":
            kw = {"temperature": 0.7}
            extra["vllm_xargs"] = {"medusa_acceptance": "typical",
                                   "medusa_posterior_threshold": 0.1}
        return {"prompt": self.prompt, "max_tokens": self.max_tokens, "stream": self.stream,
                "extra_body": extra, **kw}


def _requests(n: int = NUM_REQUESTS, seed: int = SEED) -> list[Req]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 3, 8, 20, 60])))
        kind = rng.choices(["greedy", "sampled", "typical"], weights=[3, 1, 1])[0]
        stream = rng.random() < 0.5
        # a fifth of the streaming clients hang up after a few chunks (long outputs, so mid-stream)
        disconnect = stream and rng.random() < 0.2
        out.append(Req(i, prompt, 96 if disconnect else rng.choice([4, 16, 32, 64, 96]), kind,
                       stream, rng.randint(1, 4) if disconnect else None))
    return out


def _bursts(reqs: list[Req], seed: int = SEED) -> list[list[Req]]:
    rng = random.Random(seed + 1)
    out, k = [], 0
    while k < len(reqs):
        size = rng.choice([8, 24, 48, MAX_BURST])
        out.append(reqs[k:k + size])
        k += size
    return out


@dataclass
class Run:
    texts: dict[int, str] = field(default_factory=dict)  # completed requests
    latencies: list[float] = field(default_factory=list)  # completed requests, seconds
    disconnects: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


async def _one(client: openai.AsyncOpenAI, model: str, req: Req, run: Run) -> None:
    t0 = time.perf_counter()
    try:
        if req.stream:
            stream = await client.completions.create(model=model, **req.body())
            parts = []
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].text)
                if req.disconnect_after is not None and len(parts) >= req.disconnect_after:
                    await stream.close()  # the client hangs up mid-stream
                    run.disconnects += 1
                    return
            text = "".join(parts)
        else:
            r = await client.completions.create(model=model, **req.body())
            text = r.choices[0].text
    except Exception as err:  # noqa: BLE001 - collected, the test fails on any
        cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
        run.errors.append(f"request {req.i}: {type(err).__name__}: {err}{cause}")
        return
    run.latencies.append(time.perf_counter() - t0)
    run.texts[req.i] = text


async def _soak(base_v1: str, model: str, reqs: list[Req]) -> Run:
    run = Run()
    # Idle keep-alive connections expire on the client well before uvicorn's 5 s
    # keep-alive timeout closes them: with httpx's default (also 5 s) a request can
    # go out on a connection the server is closing at that moment (CI saw one such
    # "Connection error." in 300); a real client retries those, this one must not
    # need to, since max_retries=0 keeps every server error visible.
    http = openai.DefaultAsyncHttpxClient(limits=httpx.Limits(
        max_connections=1000, max_keepalive_connections=100, keepalive_expiry=1.0))
    async with openai.AsyncOpenAI(base_url=base_v1, api_key="unused", timeout=1200,
                                  max_retries=0, http_client=http) as client:
        t0 = time.perf_counter()
        for burst in _bursts(reqs):
            await asyncio.gather(*(_one(client, model, r, run) for r in burst))
        run.wall_s = time.perf_counter() - t0
    return run


def _kv_usage(base: str) -> float:
    return metric(metrics_text(base), KV_USAGE)


def _settle(server, client, model: str, idle: float, timeout: float = 60.0) -> float:
    """KV usage once a last one-token request has run (aborts are applied at the
    next step) and the gauge stops moving; at most ``timeout`` seconds."""
    client.completions.create(model=model, prompt="settle", max_tokens=1, temperature=0)
    deadline = time.monotonic() + timeout
    usage = _kv_usage(server.base)
    while usage != idle and time.monotonic() < deadline:
        time.sleep(2)
        usage = _kv_usage(server.base)
    return usage


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0.0


@pytest.mark.timeout(3000)
def test_soak_bursts_disconnects_mixed_sampling(tmp_path):
    model, heads = tiny_model_and_heads()
    name = str(model)
    reqs = _requests()
    figures: dict = {"requests": len(reqs), "max_burst": MAX_BURST,
                     "bursts": len(_bursts(reqs)),
                     "greedy": sum(r.kind == "greedy" for r in reqs),
                     "streams": sum(r.stream for r in reqs),
                     "planned_disconnects": sum(r.disconnect_after is not None for r in reqs)}
    logs = log_dir("soak")
    specs = [(model, logs / "vanilla.log"),
             (model, logs / "medusa.log", "--speculative-model", f"medusa:{heads}")]
    runs: dict[str, Run] = {}
    with vllm_servers(*specs) as servers:
        for label, server in zip(("vanilla", "medusa"), servers):
            client = openai.OpenAI(base_url=server.v1, api_key="unused", timeout=900, max_retries=0)
            client.completions.create(model=name, prompt="warm up", max_tokens=8, temperature=0)
            idle = _kv_usage(server.base)
            run = runs[label] = asyncio.run(_soak(server.v1, name, reqs))
            after = _settle(server, client, name, idle)
            metrics = metrics_text(server.base)
            figures[label] = {
                "completed": len(run.texts), "disconnects": run.disconnects,
                "errors": len(run.errors), "wall_s": round(run.wall_s, 2),
                "requests_per_s": round(len(run.texts) / run.wall_s, 2),
                "latency_p50_s": round(_pct(run.latencies, 50), 3),
                "latency_p99_s": round(_pct(run.latencies, 99), 3),
                "kv_usage_idle_before": idle, "kv_usage_after": after,
                "running_after": metric(metrics, "vllm:num_requests_running"),
                "alive_after": server.alive(),
            }
            if label == "medusa":
                drafts = metric(metrics, "vllm:spec_decode_num_drafts_total")
                accepted = metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
                figures[label]["mean_accepted_length"] = round(1 + accepted / max(drafts, 1), 3)
            assert not run.errors, run.errors[:5]
    greedy = [r.i for r in reqs if r.kind == "greedy" and r.i in runs["medusa"].texts
              and r.i in runs["vanilla"].texts]
    diffs = [i for i in greedy if runs["medusa"].texts[i] != runs["vanilla"].texts[i]]
    figures["greedy_compared"], figures["greedy_differences"] = len(greedy), len(diffs)
    print("soak figures:", json.dumps(figures, indent=1), flush=True)
    (logs / "soak.json").write_text(json.dumps(figures, indent=1))
    tmp_path.mkdir(parents=True, exist_ok=True)  # pytest may have pruned it on a busy machine
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=1))

    for label in ("vanilla", "medusa"):
        f = figures[label]
        assert f["alive_after"], f"{label} server down after the soak"
        assert f["disconnects"] == figures["planned_disconnects"]
        assert f["completed"] == len(reqs) - figures["planned_disconnects"]
        assert f["kv_usage_after"] == f["kv_usage_idle_before"], f"{label}: KV blocks leaked"
        assert f["running_after"] == 0
    assert len(greedy) >= 100
    assert not diffs, [(i, runs["vanilla"].texts[i], runs["medusa"].texts[i]) for i in diffs[:3]]
    assert figures["medusa"]["mean_accepted_length"] > 1.0
