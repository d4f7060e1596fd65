"""Run one vLLM engine in a fresh process and get its outputs back as JSON.

Every offline engine this package starts goes through :func:`run_engine`:
``medusa-vllm bench`` and ``calibrate`` (timed greedy runs), self-distillation
(:mod:`medusa_vllm.training.distill`), the default-heads recipe
(:mod:`medusa_vllm.training.default_heads`) and the end-to-end tests. Each run
gets a clean vLLM (plugins, environment, engine-core process), its threads and
KV cache are gone when it returns, and nothing is left running when the caller
fails or the run times out.

One :class:`EngineJob` (LLM arguments, prompts, sampling parameters, what to
measure) goes to ``python -m medusa_vllm.tools.engine_proc JOB RESULT`` as
JSON; the child runs :func:`run_job` and writes an :class:`EngineResult` back.
A child that fails raises :class:`EngineRunError` with the error lines and the
tail of its output. The child's CPU threads are bound by :func:`engine_env`.

In-process engines (``in_process=True`` or ``$MEDUSA_VLLM_ENGINE_IN_PROCESS=1``;
the test suite sets it): a single-rank engine runs its engine core and worker inside
the child (vLLM's ``uni`` executor, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of
two more processes that each import vLLM and torch again. Same scheduler, runner,
proposer and verifier, the engine starts in about a third of the time on a 2-core
machine; only the inter-process queues are skipped (``vllm serve``, Ray and
multi-rank engines keep them, and their tests cover that path). Benchmarks keep
vLLM's default.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from medusa_vllm.core.dict_fields import DictFields

__all__ = [
    "IN_PROCESS_ENV",
    "SMALL_MACHINE_CORES",
    "EngineJob",
    "EngineResult",
    "EngineRunError",
    "chat_prompt",
    "engine_env",
    "engine_kwargs",
    "run_engine",
    "run_job",
]

SMALL_MACHINE_CORES = 4
WARMUP_TOKENS = 8  # greedy tokens per prompt of the untimed warm-up pass
IN_PROCESS_ENV = "MEDUSA_VLLM_ENGINE_IN_PROCESS"  # default of run_engine(in_process=)
PREEMPTIONS = "vllm:num_preemptions"  # vLLM counter of preempted requests
_TAIL_BYTES = 64 * 1024  # child output kept for the error message
_ERROR_LINES = 40


def engine_env(environ: dict[str, str] | None = None, cores: set[int] | None = None) -> dict[str, str]:
    """Environment of a single-rank benchmark engine subprocess.

    vLLM's CPU backend (``VLLM_CPU_OMP_THREADS_BIND=auto``) keeps one core per
    rank for its scheduler process and runs the model on the others: on a
    2-core machine the model gets one thread, half the machine, while the
    scheduler sits idle during an offline run. On machines with at most
    ``SMALL_MACHINE_CORES`` usable cores the worker is therefore bound to all
    of them, unless the caller set ``VLLM_CPU_OMP_THREADS_BIND`` (kept as is).
    Every configuration of a run gets the same binding, so ratios stay fair.
    """
    env = dict(os.environ if environ is None else environ)
    cores = set(os.sched_getaffinity(0)) if cores is None else cores
    if "VLLM_CPU_OMP_THREADS_BIND" not in env and 1 < len(cores) <= SMALL_MACHINE_CORES:
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(cores))
    return env


def engine_kwargs(model: str | os.PathLike[str], *, dtype: str = "float32", max_model_len: int = 1024,
                  speculative_config: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """``LLM(**kwargs)`` of the engines this package runs on CPU: eager (no graph
    capture), engine seed 0, 30% of the (CPU) memory budget, ``dtype``; plus
    ``speculative_config`` when given and any other ``LLM`` argument in ``extra``."""
    kwargs: dict[str, Any] = dict(model=str(model), dtype=dtype, enforce_eager=True,
                                  gpu_memory_utilization=0.3, max_model_len=max_model_len, seed=0)
    if speculative_config:
        kwargs["speculative_config"] = dict(speculative_config)
    kwargs.update(extra)
    return kwargs


def chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str | None:
    """The text of ``messages`` plus the assistant's generation prompt under the
    tokenizer's chat template; ``None`` when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class EngineJob(DictFields):
    """What one engine run does (JSON-serialisable; sent to the child as is)."""

    llm: dict[str, Any]  # LLM(**llm) arguments, speculative_config included (see engine_kwargs)
    prompts: list[str] | list[list[int]]  # texts, or token ids per prompt
    # SamplingParams arguments: one dict for every prompt, or one dict per prompt
    sampling: dict[str, Any] | list[dict[str, Any]] = field(default_factory=dict)
    # text prompts become one user turn under the tokenizer's chat template (if it has one)
    chat_template: bool = False
    warmup: int = 0  # untimed greedy pass over the first `warmup` prompts before the timed run
    repeat: int = 1  # timed generate() calls over all prompts; outputs concatenated
    # SamplingParams arguments submitted first, one request each, each expected to be refused
    refuse: list[dict[str, Any]] = field(default_factory=list)
    metrics: bool = True  # spec-decode metrics of the timed run (turns vLLM's stats logging on)
    use_tqdm: bool = False  # vLLM's progress bar on the child's stderr
    # "module:function" called in the child after the run as function(llm, probe_args); its
    # JSON-serialisable return value is EngineResult.probe (in-engine measurements)
    probe: str | None = None
    probe_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineResult(DictFields):
    """What one engine run returned: one entry per completion (prompt order, a
    request's ``n`` completions together, ``repeat`` runs one after the other)."""

    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str | None]
    # per completion that asked for logprobs: one {token id (str): logprob} per generated token
    logprobs: list[list[dict[str, float]]]
    refused: list[str | None]  # error message (or None: accepted) per EngineJob.refuse entry
    wall_s: float  # seconds of the timed run (all repeats)
    metrics: dict[str, Any] = field(default_factory=dict)  # SpecDecodeSummary.to_dict() of the timed run
    num_preemptions: int = 0  # requests the scheduler preempted during the timed run
    probe: Any = None

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


class EngineRunError(RuntimeError):
    """An engine subprocess failed or timed out; the message holds its error lines
    and the tail of its output."""


# ------------------------------------------------------------------ parent side
class _OutputSink:
    """The child's merged stdout/stderr, read as it comes: copied to a log file
    and/or this process's stderr, its error lines and its tail kept."""

    def __init__(self, log: IO[bytes] | None, echo: bool) -> None:
        self.log, self.echo = log, echo
        self.tail = bytearray()
        self.error_lines: list[str] = []
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        if self.log is not None:
            self.log.write(chunk)
            self.log.flush()
        if self.echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
        self.tail += chunk
        del self.tail[:-_TAIL_BYTES]
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            if b"Error" in line and len(self.error_lines) < _ERROR_LINES:
                self.error_lines.append(line.decode(errors="replace").rstrip("\r"))

    def pump(self, stream: BinaryIO) -> None:
        while chunk := stream.read1(65536):
            self.feed(chunk)

    def report(self) -> str:
        tail = self.tail.decode(errors="replace")[-4000:]
        return ("--- error lines ---\n" + "\n".join(self.error_lines)
                + f"\n--- output (tail) ---\n{tail}")


def _child_env(env: Mapping[str, str] | None, env_defaults: Mapping[str, str] | None) -> dict[str, str]:
    out = engine_env()
    for k, v in (env_defaults or {}).items():
        out.setdefault(k, v)
    out.update(env or {})
    return out


def run_engine(job: EngineJob, *, timeout: float | None = 900.0, env: Mapping[str, str] | None = None,
               env_defaults: Mapping[str, str] | None = None, log: str | os.PathLike[str] | None = None,
               echo: bool = False, in_process: bool | None = None) -> EngineResult:
    """Run ``job`` in a fresh ``python -m medusa_vllm.tools.engine_proc`` process.

    The child's environment is :func:`engine_env` (this process's, CPU threads
    bound on small machines), then ``env_defaults`` where not already set, then
    ``env``. Its output (stdout and stderr, where vLLM logs) goes to ``log`` (a
    file) and, with ``echo``, to this process's stderr. After ``timeout``
    seconds (``None``: no limit) the child and its engine processes are killed.
    ``in_process`` (``None``: ``$MEDUSA_VLLM_ENGINE_IN_PROCESS == "1"``) runs a
    single-rank engine's core and worker in the child (see the module docstring).

    Raises:
        EngineRunError: the child failed or timed out (exit code, error lines and
            output tail in the message).
    """
    payload, child_env = _child_job(job, _child_env(env, env_defaults), in_process)
    with tempfile.TemporaryDirectory(prefix="medusa-engine-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(payload))
        with open(log, "wb") if log is not None else contextlib.nullcontext() as log_f:
            sink = _OutputSink(log_f, echo)
            proc = subprocess.Popen(
                [sys.executable, "-m", "medusa_vllm.tools.engine_proc", str(job_file), str(result_file)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=child_env, start_new_session=True,
            )
            reader = threading.Thread(target=sink.pump, args=(proc.stdout,), daemon=True)
            reader.start()
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                reader.join(10)
                raise EngineRunError(
                    f"engine run timed out after {timeout:g} s (model {job.llm.get('model')})\n"
                    + sink.report()) from None
            finally:  # also on success: engine-core processes the child left behind
                _kill_group(proc)
            reader.join(30)
            proc.stdout.close()
        if code != 0 or not result_file.is_file():
            raise EngineRunError(
                f"engine run failed (exit {code}, model {job.llm.get('model')})\n" + sink.report())
        return EngineResult.from_dict(json.loads(result_file.read_text()))


def _child_job(job: EngineJob, env: dict[str, str],
               in_process: bool | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The job (as JSON) and environment the child gets: in-process where asked for
    and the engine has a single rank."""
    if in_process is None:
        in_process = os.environ.get(IN_PROCESS_ENV, "") == "1"
    payload = job.to_dict()
    if in_process and _single_rank(job.llm):
        payload["llm"] = {**job.llm, "distributed_executor_backend": "uni"}
        env = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return payload, env


def _single_rank(llm: Mapping[str, Any]) -> bool:
    """One worker and no executor chosen by the caller: what the ``uni`` executor runs."""
    ranks = (int(llm.get(k) or 1) for k in
             ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"))
    return all(r == 1 for r in ranks) and not llm.get("distributed_executor_backend")


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the session the child leads (it and the engine processes it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ------------------------------------------------------------------- child side
def _check_model(llm: Mapping[str, Any]) -> None:
    """A local model folder that does not exist fails before vLLM is imported."""
    model = str(llm.get("model", ""))
    if (os.path.isabs(model) or model.startswith(".")) and not os.path.exists(model):
        raise FileNotFoundError(f"engine job: model folder {model} does not exist")


def _engine_prompts(llm: Any, job: EngineJob) -> list[Any]:
    """``job.prompts`` as ``LLM.generate`` takes them."""
    prompts: list[Any] = list(job.prompts)
    if prompts and isinstance(prompts[0], list):
        return [{"prompt_token_ids": p} for p in prompts]
    if job.chat_template:
        tok = llm.get_tokenizer()
        prompts = [chat_prompt(tok, [{"role": "user", "content": p}]) or p for p in prompts]
    return prompts


def run_job(job: EngineJob) -> EngineResult:
    """Run ``job`` in this process (what the child of :func:`run_engine` does)."""
    _check_model(job.llm)
    from vllm import LLM, SamplingParams

    from medusa_vllm.engine.metrics import counter_total, spec_decode_summary

    kwargs = dict(job.llm)
    if job.metrics:
        kwargs.setdefault("disable_log_stats", False)
    llm = LLM(**kwargs)
    prompts = _engine_prompts(llm, job)
    if isinstance(job.sampling, list):
        params: Any = [SamplingParams(**s) for s in job.sampling]
    else:
        params = SamplingParams(**job.sampling)
    refused: list[str | None] = []
    for bad in job.refuse:
        try:
            llm.generate(prompts[:1], SamplingParams(**bad), use_tqdm=False)
            refused.append(None)
        except Exception as err:  # noqa: BLE001 - the caller checks the message
            refused.append(f"{type(err).__name__}: {err}")
    if job.warmup and prompts:
        llm.generate(prompts[: job.warmup], SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS),
                     use_tqdm=False)
    before = spec_decode_summary(llm.get_metrics()) if job.metrics else None
    preempted = counter_total(llm.get_metrics(), PREEMPTIONS) if job.metrics else 0
    t0 = time.perf_counter()
    runs = [llm.generate(prompts, params, use_tqdm=job.use_tqdm) for _ in range(job.repeat) if prompts]
    wall = time.perf_counter() - t0
    result = EngineResult(token_ids=[], texts=[], finish_reasons=[], logprobs=[], refused=refused,
                          wall_s=wall)
    if before is not None:
        snapshot = llm.get_metrics()
        result.metrics = (spec_decode_summary(snapshot) - before).to_dict()
        result.num_preemptions = counter_total(snapshot, PREEMPTIONS) - preempted
    for outs in runs:
        for o in outs:
            for c in o.outputs:
                result.token_ids.append(list(c.token_ids))
                result.texts.append(c.text)
                result.finish_reasons.append(c.finish_reason)
                if c.logprobs is not None:
                    result.logprobs.append([{str(k): v.logprob for k, v in d.items()} for d in c.logprobs])
    if job.probe:
        module, _, name = job.probe.partition(":")
        result.probe = getattr(importlib.import_module(module), name)(llm, job.probe_args)
    return result


def _main(job_file: str, result_file: str) -> None:
    job = EngineJob.from_dict(json.loads(Path(job_file).read_text()))
    result = run_job(job)
    tmp = Path(result_file + ".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    os.replace(tmp, result_file)


if __name__ == "__main__":
    _main(*sys.argv[1:])
