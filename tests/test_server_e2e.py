"""`vllm serve MODEL --speculative-model medusa:HEADS`, as a user runs it: real
HTTP server on 127.0.0.1, OpenAI completions, Prometheus metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from medusa_vllm.testing import build_tiny_llama, distill_tiny_heads

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_speculative_model_medusa(tmp_path):
    model = build_tiny_llama(tmp_path / "model", vocab=512, hidden=64, layers=2, seed=0)
    heads = distill_tiny_heads(model, tmp_path / "heads", steps=300)
    vllm_bin = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm_bin, "the vllm command is not installed next to this Python"
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [vllm_bin, "serve", str(model), "--speculative-model", f"medusa:{heads}",
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "512", "--gpu-memory-utilization", "0.3"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "server did not start in 600 s"
            time.sleep(2)
        texts = []
        for prompt in ["The quick brown fox", "Medusa adds extra decoding heads", "0 1 2 3 4"]:
            out = _post(base + "/v1/completions", {"model": str(model), "prompt": prompt,
                                                   "max_tokens": 32, "temperature": 0, "ignore_eos": True})
            assert out["usage"]["completion_tokens"] == 32
            texts.append(out["choices"][0]["text"])
        # per-request overrides through vllm_xargs: a bad one is a 400 naming the key,
        # a good one (typical acceptance, sampled) is served, and so is the next request
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(base + "/v1/completions", {"model": str(model), "prompt": "x", "max_tokens": 8,
                                             "temperature": 0.8, "vllm_xargs": {"medusa_acceptance": "fast"}})
        assert err.value.code == 400 and "medusa_acceptance" in err.value.read().decode()
        out = _post(base + "/v1/completions", {
            "model": str(model), "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0.7,
            "ignore_eos": True, "vllm_xargs": {"medusa_acceptance": "typical", "medusa_posterior_threshold": 0.2}})
        assert out["usage"]["completion_tokens"] == 16
        again = _post(base + "/v1/completions", {"model": str(model), "prompt": "The quick brown fox",
                                                 "max_tokens": 32, "temperature": 0, "ignore_eos": True})
        assert again["choices"][0]["text"] == texts[0]
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            metrics = r.read().decode()
        drafts = [ln for ln in metrics.splitlines() if ln.startswith("vllm:spec_decode_num_drafts")]
        assert drafts and float(drafts[0].split()[-1]) > 0, "no speculative steps in /metrics"
        accepted = [ln for ln in metrics.splitlines() if ln.startswith("vllm:spec_decode_num_accepted_tokens_total")
                    or ln.startswith("vllm:spec_decode_num_accepted_tokens{")]
        assert accepted and float(accepted[0].split()[-1]) > 0, "no accepted draft tokens in /metrics"
        log_text = (tmp_path / "server.log").read_text()
        assert "MedusaTreeCPUWorker" in log_text or "medusa_tree" in log_text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
