"""Fixtures of the example tests: a tiny Llama with Medusa heads distilled on it, and
a runner that starts an example script in its own process group with a hard time
limit and leaves nothing running (its engines, and for the Ray examples the Ray
processes of its private session folder) whatever happens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def tiny_medusa() -> tuple[str, str]:
    """``(model, heads)``: a 2-layer random Llama (vocabulary 512, hidden 64, seed 0) and 3
    Medusa heads self-distilled on it (400 steps, seed 0; accepted length well above 1 on
    its own greedy text). Both are deterministic for these arguments, so they are built
    once per machine in a cache folder under the temp dir (distillation takes minutes on
    a busy machine) and reused by later sessions."""
    root = Path(tempfile.gettempdir()) / "medusa-vllm-test-cache" / "tiny-medusa-examples-v1"
    if not (root / "done").is_file():
        work = root.with_name(f"{root.name}.{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        model = build_tiny_llama(work / "model", vocab=512, hidden=64, layers=2, seed=0)
        distill_tiny_heads(model, work / "heads", num_heads=3, steps=400, seed=0)
        (work / "done").write_text("ok")
        try:
            work.rename(root)
        except OSError:  # another session finished first
            shutil.rmtree(work, ignore_errors=True)
    return str(root / "model"), str(root / "heads")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ExampleRun:
    returncode: int
    output: str  # merged stdout and stderr
    result: dict[str, Any] | None  # the --json file, if written

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- output (tail) ---\n{self.output[-6000:]}"


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _leftovers(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (the run's private Ray folder),
    and their descendants (vLLM's engine-core and worker processes rename themselves)."""
    found: set[int] = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.add(p.pid)
                found.update(c.pid for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found)


def run_example(script: str, args: list[str], timeout: float, ray: bool = False) -> ExampleRun:
    """Run ``examples/<script> ARGS --json FILE`` (plus a private ``--ray-temp-dir`` with
    ``ray``). After ``timeout`` seconds it gets SIGTERM (its ``finally`` stops Ray), 30 s
    later SIGKILL for its whole process group; then every process still naming the run's
    Ray folder (raylet, GCS, replicas) is killed by pid."""
    with tempfile.TemporaryDirectory(prefix="medusa-ex-") as tmp:
        out_json = Path(tmp) / "result.json"
        cmd = [sys.executable, str(EXAMPLES / script), *args, "--json", str(out_json)]
        ray_dir = None
        if ray:  # short: Ray's socket paths live under it (108-byte limit)
            ray_dir = tempfile.mkdtemp(prefix="rx", dir="/tmp")
            cmd += ["--ray-temp-dir", ray_dir]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=ROOT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            output = (output or "") + f"\n[test] TIMED OUT after {timeout:g} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if ray_dir:
                _kill_tree(_leftovers(ray_dir))
                shutil.rmtree(ray_dir, ignore_errors=True)
        result = json.loads(out_json.read_text()) if out_json.is_file() else None
        return ExampleRun(proc.returncode, output or "", result)


def require_ray() -> None:
    """Skip, with the install command, when Ray Serve / Data LLM cannot be imported."""
    for mod in ("ray", "ray.serve.llm", "ray.data.llm"):
        pytest.importorskip(mod, reason=f"{mod} is not importable: install the ray extra "
                                        "(pip install -e '.[ray]'; never 'ray[llm]')")
