"""What CPU the engine runs on: model, ISA, threads, and the dtype it does best.

One place for the facts that key every machine-dependent choice (the cost
curve cache, the kernel build, the demo's and bench's dtype). bfloat16 is fast
only where the CPU has AMX or AVX-512-BF16 (there it beats float32 by ~1.5x);
on AVX2 it is 3-4x slower than float32, so :func:`preferred_dtype` says
``float32`` there.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["MachineInfo", "cpu_flags", "machine_info", "omp_threads", "preferred_dtype"]

THREADS_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The ISA flags of the first CPU (``/proc/cpuinfo``), empty where unreadable."""
    return frozenset(_cpuinfo().get("flags", "").split())


def omp_threads() -> int:
    """Threads one vLLM CPU worker computes with: the cores in
    ``VLLM_CPU_OMP_THREADS_BIND`` (first rank of a ``|``-separated TP list), else
    the cores this process may run on. (vLLM's own default, ``auto``, binds one
    core per physical core of one NUMA node and may leave cores idle.)"""
    bind = os.environ.get(THREADS_ENV, "").split("|")[0].strip()
    if bind and bind not in ("auto", "all", "nobind"):
        count = 0
        for part in bind.split(","):
            lo, _, hi = part.partition("-")
            try:
                count += int(hi or lo) - int(lo) + 1
            except ValueError:
                return len(os.sched_getaffinity(0))
        return max(count, 1)
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class MachineInfo:
    """The facts a measurement on this CPU is only valid for."""

    cpu_model: str
    isa: str  # "amx", "avx512_bf16", "avx512", "avx2" or the machine name
    cores: int
    threads: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.cpu_model} ({self.isa}, {self.threads} of {self.cores} cores)"


def _isa(flags: frozenset[str]) -> str:
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return platform.machine() or "unknown"


def machine_info() -> MachineInfo:
    flags = cpu_flags()
    return MachineInfo(
        cpu_model=_cpuinfo().get("model name", platform.processor() or "unknown"),
        isa=_isa(flags),
        cores=os.cpu_count() or 1,
        threads=omp_threads(),
    )


def preferred_dtype() -> str:
    """``bfloat16`` where the CPU computes it natively (AMX or AVX-512-BF16), else
    ``float32``."""
    return "bfloat16" if _isa(cpu_flags()) in ("amx", "avx512_bf16") else "float32"
