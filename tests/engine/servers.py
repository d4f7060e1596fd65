"""Real `vllm serve` processes for the server tests: started on 127.0.0.1 with a
free port and a bounded start-up wait, stopped (the whole process group) on
exit; plus `/metrics` reading and a run of `vllm serve` expected to fail."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "START_TIMEOUT",
    "Server",
    "failed_serve",
    "launch",
    "log_dir",
    "metric",
    "metrics_text",
    "tiny_model_and_heads",
    "vllm_server",
    "vllm_servers",
]

# Seconds a tiny-model server may take to answer /health: the machine is shared
# by several engines, and a start-up can take minutes under load.
START_TIMEOUT = 1800.0
# The flags every test server gets: tiny models in float32, no graph capture.
BASE_FLAGS = ("--enforce-eager", "--dtype", "float32", "--max-model-len", "512")


def tiny_model_and_heads(dtype: str = "float32", steps: int = 300) -> tuple[Path, Path]:
    """The tiny Llama (vocabulary 512, hidden 64, 2 layers, seed 0) and Medusa heads
    distilled on it, built once per machine in a cache folder under the temp dir
    (both are deterministic for these arguments): several test modules share them."""
    from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

    root = Path(tempfile.gettempdir()) / "medusa-vllm-test-cache" / f"tiny-{dtype}-{steps}-v1"
    if not (root / "done").is_file():
        work = root.with_name(f"{root.name}.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        model = build_tiny_llama(work / "model", vocab=512, hidden=64, layers=2, seed=0,
                                 dtype=dtype)
        distill_tiny_heads(model, work / "heads", steps=steps)
        (work / "done").write_text("ok")
        try:
            work.rename(root)
        except OSError:  # another process finished first
            shutil.rmtree(work, ignore_errors=True)
    return root / "model", root / "heads"


def log_dir(name: str) -> Path:
    """A folder for server logs outside pytest's tmp dirs (which pytest deletes
    once newer sessions start, a problem on a machine where many run)."""
    out = Path(tempfile.gettempdir()) / "medusa-vllm-test-logs" / f"{name}-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_bin() -> str:
    vllm_bin = shutil.which("vllm", path=str(Path(sys.executable).parent))
    assert vllm_bin, "the vllm command is not installed next to this Python"
    return vllm_bin


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    # a step starved by a loaded machine must not kill the engine (vLLM's default: 300 s)
    out.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    out.update(env or {})
    return out


@dataclass
class Server:
    """A running server: its base URL (``http://127.0.0.1:PORT``), log and process."""

    base: str
    log_file: Path
    proc: subprocess.Popen

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def alive(self) -> bool:
        """The process runs and /health answers 200."""
        if self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_ready(self, deadline: float) -> None:
        """Wait until /health answers; AssertionError with the log's tail if the
        process exits or ``deadline`` (``time.monotonic()``) passes first."""
        while not self.alive():
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {self.proc.returncode}:\n"
                                     + self.log()[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError("vllm serve did not answer /health in time:\n"
                                     + self.log()[-4000:])
            time.sleep(2)

    def stop(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def launch(model: str | Path, log_file: Path, *extra: str, env: Mapping[str, str] | None = None,
           base_flags: tuple[str, ...] = BASE_FLAGS) -> Server:
    """Start `vllm serve MODEL` on 127.0.0.1 (1 GiB KV cache unless ``env`` says
    otherwise) without waiting for it: call :meth:`Server.wait_ready`, then :meth:`Server.stop`."""
    port = free_port()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [_vllm_bin(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
             *base_flags, *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env=_env(env),
        )
    return Server(f"http://127.0.0.1:{port}", Path(log_file), proc)


@contextmanager
def vllm_servers(*specs: tuple, start_timeout: float = START_TIMEOUT,
                 env: Mapping[str, str] | None = None) -> Iterator[list[Server]]:
    """Several servers started at once, each spec ``(model, log_file, *flags)``;
    yields them once all answer /health, stops them all on exit."""
    servers: list[Server] = []
    try:
        for model, log_file, *extra in specs:
            servers.append(launch(model, log_file, *extra, env=env))
        deadline = time.monotonic() + start_timeout
        for server in servers:
            server.wait_ready(deadline)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextmanager
def vllm_server(model: str | Path, log_file: Path, *extra: str,
                env: Mapping[str, str] | None = None, start_timeout: float = START_TIMEOUT
                ) -> Iterator[Server]:
    """One `vllm serve MODEL` process (see :func:`launch`); yields it once /health
    answers, stops it on exit."""
    with vllm_servers((model, log_file, *extra), env=env, start_timeout=start_timeout) as servers:
        yield servers[0]


@dataclass
class FailedServe:
    """A `vllm serve` run that exited by itself: its exit code and output."""

    returncode: int
    output: str
    seconds: float


def failed_serve(model: str | Path, *extra: str, env: Mapping[str, str] | None = None,
                 timeout: float = START_TIMEOUT) -> FailedServe:
    """Run `vllm serve MODEL ...` expecting it to exit before serving.

    Raises AssertionError when it is still running after ``timeout`` seconds or
    answers /health (it then served; it is stopped)."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [_vllm_bin(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
         *BASE_FLAGS, *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, env=_env(env),
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(f"vllm serve still running after {timeout:g} s") from None
    finally:
        _stop(proc)  # engine processes left behind, if any
    return FailedServe(proc.returncode, out.decode(errors="replace"), time.monotonic() - t0)


def metrics_text(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        return resp.read().decode()


def metric(metrics: str, name: str, *, required: bool = True) -> float:
    """Sum of a Prometheus metric's samples (all label sets)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$")
    values = [float(m.group(1)) for line in metrics.splitlines() if (m := pattern.match(line))]
    if required:
        assert values, f"{name} not on /metrics"
    return sum(values)
