"""vLLM ``general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (API server,
engine core, each worker / TP rank). It must be cheap and idempotent.
"""

from __future__ import annotations

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
