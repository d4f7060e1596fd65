"""Offline measurements: one engine (``LLM``) in a subprocess, every concurrency
level and mode of a configuration timed in it.

Concurrency ``c`` means exactly ``c`` requests in flight: the driver
(:func:`drive`, run in the engine's process through
:func:`medusa_vllm.tools.engine_proc.run_engine`'s probe hook) submits ``c``
requests, and a new one each time one finishes, until ``requests`` requests
are done (``max_num_seqs`` is the largest level, so the scheduler never holds
any back). Per request, vLLM's own request stats give the time to first token
and the time per output token (first to last token over ``n - 1`` tokens).

In the worker process (where the model runs) the driver wraps the model runner's
``execute_model``, ``sample_tokens`` and ``propose_draft_token_ids`` with
timers (``collective_rpc``; needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``,
set by :func:`run_offline`): the proposer's share of step time is the time in
``propose_draft_token_ids`` over the time in the other two (it runs inside
them). The same call reads the worker's peak RSS (``VmHWM``: the model, the
KV cache, the drafter); the sum over the engine's processes is kept beside it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

__all__ = ["drive", "offline_job", "run_offline"]

PROBE = "medusa_vllm.tools.bench.offline:drive"
WARMUP_TOKENS = 8
SERIALIZATION_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # collective_rpc with a function


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size (``VmHWM``) of a process in MiB; ``None`` if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def tree_peak_rss_mb(pid: int) -> float | None:
    """Sum of the peak RSS of a process and all its descendants (the frontend, vLLM's
    engine core and its worker): an upper bound of the engine's peak footprint."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return None
    vals = [v for v in (peak_rss_mb(p.pid) for p in procs) if v is not None]
    return sum(vals) if vals else None


# ------------------------------------------------------------------- worker side
_TIMED = (("execute_model", "execute_s"), ("sample_tokens", "sample_s"),
          ("propose_draft_token_ids", "propose_s"))


def _install_timers(worker: Any) -> bool:
    """Wrap the model runner's step methods with wall-clock timers (once)."""
    mr = worker.model_runner
    if getattr(mr, "_bench_timers", None) is not None:
        return True
    timers = {key: 0.0 for _, key in _TIMED}
    timers.update(steps=0, proposals=0)

    def wrap(name: str, key: str) -> None:
        orig = getattr(mr, name, None)
        if orig is None:
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - t0
                if key == "execute_s":
                    timers["steps"] += 1
                elif key == "propose_s":
                    timers["proposals"] += 1

        setattr(mr, name, timed)

    for name, key in _TIMED:
        wrap(name, key)
    mr._bench_timers = timers
    return True


def _read_timers(worker: Any) -> dict[str, Any]:
    timers = dict(getattr(worker.model_runner, "_bench_timers", None) or {})
    timers["peak_rss_mb"] = peak_rss_mb()
    return timers


# ------------------------------------------------------------------- driver side
def _timer_delta(after: Mapping[str, Any] | None, before: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not after or not before or "execute_s" not in after:
        return None
    d = {k: after[k] - before[k] for k in after
         if k != "peak_rss_mb" and isinstance(after[k], (int, float)) and k in before}
    busy = d["execute_s"] + d["sample_s"]
    d["step_ms"] = 1000.0 * busy / d["steps"] if d["steps"] else None
    d["proposer_share"] = d["propose_s"] / busy if busy > 0 else None
    return d


def _rpc(llm: Any, fn: Any) -> Any:
    try:
        return llm.collective_rpc(fn)[0]
    except Exception as exc:  # noqa: BLE001 - timers are an extra; the run goes on without them
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run_level(llm: Any, prompts: Sequence[str], concurrency: int, num_requests: int,
               sampling: Mapping[str, Any], keep_tokens: bool) -> dict[str, Any]:
    """``num_requests`` requests with exactly ``concurrency`` in flight."""
    from vllm import SamplingParams

    from medusa_vllm.engine.metrics import counter_total, spec_decode_summary
    from medusa_vllm.tools.engine_proc import PREEMPTIONS

    engine = llm.llm_engine
    before = llm.get_metrics()
    spec0, pre0 = spec_decode_summary(before), counter_total(before, PREEMPTIONS)
    timers0 = _rpc(llm, _read_timers)
    todo = deque(range(num_requests))
    index_of: dict[str, int] = {}
    done: dict[int, Any] = {}
    t0 = time.perf_counter()
    while todo or len(done) < num_requests:
        while todo and len(index_of) - len(done) < concurrency:
            i = todo.popleft()
            (rid,) = llm.enqueue([prompts[i % len(prompts)]], SamplingParams(**sampling), use_tqdm=False)
            # enqueue returns vLLM's internal id ("<external>-<8 random chars>"); outputs carry
            # the external one
            index_of[rid.rsplit("-", 1)[0]] = i
        for out in engine.step():
            if out.finished:
                done[index_of[out.request_id]] = out
    wall = time.perf_counter() - t0
    after = llm.get_metrics()
    timers = _timer_delta(_rpc(llm, _read_timers), timers0)
    reqs = []
    for i in range(num_requests):
        out = done[i]
        c = out.outputs[0]
        st = out.metrics
        n = len(c.token_ids)
        tpot = ((st.last_token_ts - st.first_token_ts) / (n - 1)
                if st is not None and n > 1 and st.last_token_ts > st.first_token_ts else None)
        reqs.append({"tokens": n, "ttft_s": getattr(st, "first_token_latency", None), "tpot_s": tpot,
                     "finish_reason": c.finish_reason,
                     **({"token_ids": list(c.token_ids)} if keep_tokens else {})})
    return {"concurrency": concurrency, "wall_s": wall, "requests": reqs,
            "spec": (spec_decode_summary(after) - spec0).to_dict(),
            "num_preemptions": counter_total(after, PREEMPTIONS) - pre0, "timers": timers}


def drive(llm: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """The probe run in the engine's process: warm up, then for each mode and
    each concurrency level one measurement (:func:`_run_level`)."""
    from vllm import SamplingParams

    from medusa_vllm.tools.engine_proc import chat_prompt

    tok = llm.get_tokenizer()
    prompts = [chat_prompt(tok, [{"role": "user", "content": p}]) or p for p in args["prompts"]]
    timers_ok = _rpc(llm, _install_timers)
    warm = prompts[: max(1, int(args.get("warmup", 4)))]
    llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS), use_tqdm=False)
    levels = []
    for mode in args["modes"]:
        for c in args["concurrency"]:
            n = int(args["requests"][str(c)])
            lv = _run_level(llm, prompts, int(c), n, mode["sampling"], keep_tokens=not mode["sampling"].get(
                "temperature"))
            lv["mode"] = mode["name"]
            levels.append(lv)
    worker = _rpc(llm, _read_timers)
    return {"levels": levels, "timers_installed": timers_ok is True,
            "peak_rss_mb": {"worker": worker.get("peak_rss_mb") if isinstance(worker, dict) else None,
                            "all_processes": tree_peak_rss_mb(os.getpid())}}


# -------------------------------------------------------------------- parent side
def offline_job(*, model: str, dtype: str, max_model_len: int, max_num_seqs: int,
                speculative_config: Mapping[str, Any] | None, prompts: Sequence[str],
                concurrency: Sequence[int], requests: Mapping[int, int],
                modes: Sequence[Mapping[str, Any]]) -> EngineJob:
    """The :class:`EngineJob` of one offline engine: no timed ``generate`` of its
    own, everything in the :func:`drive` probe."""
    return EngineJob(
        llm=engine_kwargs(model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                          speculative_config=speculative_config),
        prompts=[], probe=PROBE,
        probe_args={"prompts": list(prompts), "concurrency": [int(c) for c in concurrency],
                    "requests": {str(c): int(n) for c, n in requests.items()},
                    "modes": [dict(m) for m in modes], "warmup": 4},
    )


def run_offline(job: EngineJob, *, env: Mapping[str, str], log: str | Path | None = None,
                timeout: float | None = None, in_process: bool = False) -> dict[str, Any]:
    """Run ``job`` in a fresh engine subprocess; the :func:`drive` result. By default
    with vLLM's own engine processes, as ``LLM(...)`` runs them, whatever
    ``$MEDUSA_VLLM_ENGINE_IN_PROCESS`` says; ``in_process`` for ``--quick``."""
    res = run_engine(job, timeout=timeout, env={SERIALIZATION_ENV: "1", **env}, log=log,
                     in_process=in_process)
    return res.probe
