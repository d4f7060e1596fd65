"""HTTP measurements: ``vllm serve`` on 127.0.0.1 started by the bench, and
the ``openai`` package's async client with exactly ``c`` streaming chat
requests in flight.

Per request the client records the time to the first streamed content chunk
(TTFT), the time of the last one, and the completion tokens the server
reports (``stream_options.include_usage``); time per output token is (last -
first) / (tokens - 1). Spec-decode counters come from the server's Prometheus
``/metrics`` (vLLM's own ``vllm:spec_decode_*`` families) before and after
each measurement; peak RSS is ``VmHWM`` of the server's worker process and
the sum over all its processes (``/proc``). The proposer's share of step time is not measured over
HTTP (the offline runs measure it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medusa_vllm.engine.metrics import SpecDecodeSummary
from medusa_vllm.tools.bench.offline import peak_rss_mb, tree_peak_rss_mb
from medusa_vllm.tools.engine_proc import EngineRunError, engine_env

__all__ = ["VllmServer", "parse_spec_metrics", "run_http"]

SERVED_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_spec_metrics(text: str) -> tuple[SpecDecodeSummary, int]:
    """(spec-decode summary, preemptions) from a Prometheus ``/metrics`` page."""
    from prometheus_client.parser import text_string_to_metric_families

    s = SpecDecodeSummary()
    preempted = 0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if not smp.name.endswith("_total"):
                continue
            name, v = smp.name[: -len("_total")], int(smp.value)
            if name == "vllm:spec_decode_num_drafts":
                s.num_drafts += v
            elif name == "vllm:spec_decode_num_draft_tokens":
                s.num_draft_tokens += v
            elif name == "vllm:spec_decode_num_accepted_tokens":
                s.num_accepted_tokens += v
            elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
                pos = int(smp.labels.get("position", 0))
                if pos >= len(s.accepted_per_depth):
                    s.accepted_per_depth += [0] * (pos + 1 - len(s.accepted_per_depth))
                s.accepted_per_depth[pos] += v
            elif name == "vllm:num_preemptions":
                preempted += v
    return s, preempted


class VllmServer:
    """``vllm serve`` in its own session; ``stop()`` kills it and its engine."""

    def __init__(self, *, model: str, dtype: str, max_model_len: int, max_num_seqs: int,
                 speculative_config: Mapping[str, Any] | None, env: Mapping[str, str],
                 log: str | Path, startup_timeout: float = 900.0) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "vllm"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        cmd += ["serve", model, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
                "--enforce-eager", "--max-model-len", str(max_model_len), "--max-num-seqs",
                str(max_num_seqs), "--seed", "0", "--gpu-memory-utilization", "0.3",
                "--served-model-name", SERVED_NAME]
        if speculative_config:
            cmd += ["--speculative-config", json.dumps(dict(speculative_config))]
        self.cmd = cmd
        self.log_path = Path(log)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**engine_env(), "VLLM_CONFIGURE_LOGGING": "1", **env})
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _tail(self) -> str:
        try:
            return self.log_path.read_bytes()[-4000:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise EngineRunError(f"vllm serve exited ({self.proc.returncode}) before it was ready; "
                                     f"log {self.log_path}\n{self._tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise EngineRunError(f"vllm serve not ready after {timeout:g} s; log {self.log_path}\n{self._tail()}")

    def metrics(self) -> tuple[SpecDecodeSummary, int]:
        import httpx

        return parse_spec_metrics(httpx.get(self.base_url + "/metrics", timeout=30.0).text)

    def peak_rss_mb(self) -> dict[str, float | None]:
        """VmHWM of the largest process under the server (its worker: model and KV
        cache) and the sum over the server and all its processes."""
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        each = [v for v in (peak_rss_mb(k.pid) for k in kids) if v is not None]
        return {"worker": max(each) if each else None, "all_processes": tree_peak_rss_mb(self.proc.pid)}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()


async def _one(client: Any, prompt: str, sampling: Mapping[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"ignore_eos": bool(sampling.get("ignore_eos", False))}
    if sampling.get("extra_args"):
        extra["vllm_xargs"] = dict(sampling["extra_args"])
    t0 = time.perf_counter()
    stream = await client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": prompt}],
        max_tokens=int(sampling["max_tokens"]), temperature=float(sampling["temperature"]),
        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    first = last = None
    parts: list[str] = []
    tokens = None
    finish = None
    async for chunk in stream:
        if chunk.choices:
            ch = chunk.choices[0]
            if ch.delta and ch.delta.content:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                parts.append(ch.delta.content)
            finish = ch.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    n = int(tokens or 0)
    tpot = (last - first) / (n - 1) if first is not None and last is not None and n > 1 and last > first else None
    return {"tokens": n, "ttft_s": (first - t0) if first is not None else None, "tpot_s": tpot,
            "finish_reason": finish, "text": "".join(parts)}


async def _level(base_url: str, prompts: Sequence[str], concurrency: int, num_requests: int,
                 sampling: Mapping[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", timeout=3600.0,
                                  max_retries=0,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=3600.0)) as client:
        todo = list(range(num_requests))
        results: dict[int, dict[str, Any]] = {}

        async def worker() -> None:
            while todo:
                i = todo.pop(0)
                results[i] = await _one(client, prompts[i % len(prompts)], sampling)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
        wall = time.perf_counter() - t0
    return wall, [results[i] for i in range(num_requests)]


def run_http(*, model: str, dtype: str, max_model_len: int, max_num_seqs: int,
             speculative_config: Mapping[str, Any] | None, prompts: Sequence[str],
             concurrency: Sequence[int], requests: Mapping[int, int], modes: Sequence[Mapping[str, Any]],
             env: Mapping[str, str], log: str | Path) -> dict[str, Any]:
    """Start a server for one engine, measure every mode and level, stop it.
    The result has the shape of :func:`medusa_vllm.tools.bench.offline.drive`'s."""
    server = VllmServer(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                        speculative_config=speculative_config, env=env, log=log)
    try:
        # untimed warm-up: a few short greedy requests
        asyncio.run(_level(server.base_url, prompts, 4, min(4, len(prompts)),
                           {"temperature": 0.0, "max_tokens": 8}))
        levels = []
        for mode in modes:
            for c in concurrency:
                spec0, pre0 = server.metrics()
                wall, reqs = asyncio.run(_level(server.base_url, prompts, int(c), int(requests[c]),
                                                mode["sampling"]))
                spec1, pre1 = server.metrics()
                levels.append({"concurrency": int(c), "mode": mode["name"], "wall_s": wall,
                               "requests": reqs, "spec": (spec1 - spec0).to_dict(),
                               "num_preemptions": pre1 - pre0, "timers": None})
        return {"levels": levels, "timers_installed": False, "peak_rss_mb": server.peak_rss_mb()}
    finally:
        server.stop()
