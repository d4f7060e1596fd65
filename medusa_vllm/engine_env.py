"""CPU thread binding for the engine subprocesses this package starts
(benchmarks, calibration, self-distillation)."""

from __future__ import annotations

import os

__all__ = ["SMALL_MACHINE_CORES", "engine_env"]

SMALL_MACHINE_CORES = 4


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
