"""The fused C++ tree-attention kernel (``csrc/tree_attention.cpp``), built at first use.

It reads each tree row's keys and values in place from vLLM's paged CPU KV
cache, for any tile layout vLLM writes (``vec``, ``vec16``, ``amx``: the
element offsets come from :func:`~medusa_vllm.engine.cpu.cache_layout.probe_cache_layout`),
and computes prefix + ancestor attention in float32 in one pass per
``(row, KV head)``: no gathered copies, no additive-mask tensors, no per-layer
torch op chain. :func:`~medusa_vllm.engine.cpu.attention.paged_tree_attention`
(torch) remains the fallback and a second reference.

Build: ``torch.utils.cpp_extension.load`` with ninja and ``-O3 -march=native``,
cached under ``$MEDUSA_VLLM_CACHE`` (default ``~/.cache/medusa-vllm``) in a
folder keyed by the source, the torch install and this CPU's ISA flags, so a host
with another ISA never loads a binary built for a different one. The first
build takes about a minute; later processes load it in well under a second.
``MEDUSA_VLLM_TREE_KERNEL=torch`` turns the kernel off (torch path).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from medusa_vllm.core.paths import cache_root

__all__ = ["KERNEL_ENV", "build_dir", "kernel_enabled", "tree_attention_op"]

logger = logging.getLogger("vllm.plugins.medusa_vllm.tree_kernel")

KERNEL_ENV = "MEDUSA_VLLM_TREE_KERNEL"  # "torch" disables the C++ kernel
SOURCE = Path(__file__).with_name("csrc") / "tree_attention.cpp"


def kernel_enabled() -> bool:
    """False when ``MEDUSA_VLLM_TREE_KERNEL=torch`` asks for the torch path."""
    return os.environ.get(KERNEL_ENV, "").strip().lower() not in ("torch", "off", "0")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def build_dir() -> Path:
    """Build folder for this source, torch install (version and path: another
    virtualenv compiles with other include paths, and ninja would rebuild on
    every switch) and CPU ISA."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + torch.__file__.encode()
        + _cpu_flags().encode()
    ).hexdigest()[:16]
    return cache_root() / "kernels" / f"tree_attention-{key}"


@functools.cache
def tree_attention_op() -> Callable[..., torch.Tensor] | None:
    """The compiled ``tree_attention`` op, or ``None`` when the build failed
    (logged once; the torch path serves). Callers check :func:`kernel_enabled`."""
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        module = load(
            name="medusa_tree_attention",
            sources=[str(SOURCE)],
            build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - any build failure falls back to torch
        logger.warning("medusa_tree: the C++ tree-attention kernel could not be built in %s (%s); "
                       "using the torch path", folder, err)
        return None
    logger.info("medusa_tree: C++ tree-attention kernel ready (%s, %.1f s)", folder,
                time.perf_counter() - t0)
    return module.tree_attention
