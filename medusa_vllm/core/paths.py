"""Where medusa-vllm keeps what it builds on a machine (converted models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "MEDUSA_VLLM_CACHE"


def cache_root() -> Path:
    """Root cache folder: ``$MEDUSA_VLLM_CACHE`` or ``~/.cache/medusa-vllm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medusa-vllm"
