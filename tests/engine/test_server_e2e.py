"""`vllm serve MODEL --speculative-model medusa:HEADS`, as a user runs it: real
HTTP servers on 127.0.0.1 queried with the `openai` client, our server's answers
compared with a vanilla server's for the same model and requests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Medusa adds extra decoding heads", "0 1 2 3 4"]
CHATS = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "1 2 3"}]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: Path, log_file: Path, *extra: str) -> Iterator[str]:
    """A `vllm serve` process on 127.0.0.1; yields its base URL, stops it on exit."""
    vllm_bin = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm_bin, "the vllm command is not installed next to this Python"
    port = _free_port()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [vllm_bin, "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--enforce-eager", "--dtype", "float32", "--max-model-len", "512", *extra],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 600
            while True:
                assert proc.poll() is None, log_file.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.time() < deadline, "server did not start in 600 s"
                time.sleep(2)
            yield base
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _answers(base: str, model: Path) -> dict:
    """Greedy completions, chat completions, a streamed completion and logprobs."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)
    name = str(model)
    out: dict = {"completions": [], "chats": []}
    for prompt in PROMPTS:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=32, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 32
        out["completions"].append(r.choices[0].text)
    for messages in CHATS:
        r = client.chat.completions.create(model=name, messages=messages, max_tokens=24,
                                           temperature=0)
        out["chats"].append(r.choices[0].message.content)
    stream = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=32, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    out["streamed"] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    r = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out["logprob_tokens"] = list(lp.tokens)
    out["logprobs"] = list(lp.token_logprobs)
    return out


def _metric(metrics: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$")
    values = [float(m.group(1)) for line in metrics.splitlines() if (m := pattern.match(line))]
    assert values, f"{name} not on /metrics"
    return sum(values)


def test_vllm_serve_speculative_model_medusa_matches_vanilla_server(tmp_path):
    model = build_tiny_llama(tmp_path / "model", vocab=512, hidden=64, layers=2, seed=0)
    heads = distill_tiny_heads(model, tmp_path / "heads", steps=300)

    with vllm_server(model, tmp_path / "vanilla.log") as base:
        vanilla = _answers(base, model)

    with vllm_server(model, tmp_path / "medusa.log", "--speculative-model", f"medusa:{heads}") as base:
        ours = _answers(base, model)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120)
        # a bad per-request override is a 400 naming the key, and the server keeps serving
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=str(model), prompt="x", max_tokens=8, temperature=0.8,
                                      extra_body={"vllm_xargs": {"medusa_acceptance": "fast"}})
        assert "medusa_acceptance" in str(err.value)
        r = client.completions.create(
            model=str(model), prompt=PROMPTS[0], max_tokens=16, temperature=0.7,
            extra_body={"ignore_eos": True, "vllm_xargs": {"medusa_acceptance": "typical",
                                                           "medusa_posterior_threshold": 0.2}})
        assert r.usage.completion_tokens == 16
        with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
        log_text = (tmp_path / "medusa.log").read_text()

    assert ours["completions"] == vanilla["completions"]
    assert ours["chats"] == vanilla["chats"]
    assert ours["streamed"] == vanilla["streamed"] == vanilla["completions"][0]
    assert ours["logprob_tokens"] == vanilla["logprob_tokens"]
    assert ours["logprobs"] == pytest.approx(vanilla["logprobs"], abs=1e-3)
    assert _metric(metrics, "vllm:spec_decode_num_drafts_total") > 0, "no speculative steps"
    assert _metric(metrics, "vllm:spec_decode_num_accepted_tokens_total") > 0, "nothing accepted"
    assert "medusa_tree" in log_text, "the server log does not show the Medusa tree plugin"
