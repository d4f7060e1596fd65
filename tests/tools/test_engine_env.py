"""CPU thread binding of the engine subprocesses (bench, calibrate, distill)."""

from __future__ import annotations

from medusa_vllm.tools.engine_proc import SMALL_MACHINE_CORES, engine_env


def test_small_machine_binds_the_worker_to_every_core():
    env = engine_env({"PATH": "/bin"}, cores={1, 0})
    assert env == {"PATH": "/bin", "VLLM_CPU_OMP_THREADS_BIND": "0,1"}


def test_user_binding_and_big_or_single_core_machines_are_left_alone():
    assert engine_env({"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, cores={0, 1}) == {
        "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert engine_env({}, cores=set(range(SMALL_MACHINE_CORES + 1))) == {}
    assert engine_env({}, cores={3}) == {}


def test_default_reads_this_process():
    import os

    env = engine_env()
    assert env.get("PATH") == os.environ.get("PATH")
    n = len(os.sched_getaffinity(0))
    assert ("VLLM_CPU_OMP_THREADS_BIND" in env) == (
        "VLLM_CPU_OMP_THREADS_BIND" in os.environ or 1 < n <= SMALL_MACHINE_CORES)
