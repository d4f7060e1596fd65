"""The one error type of :mod:`medusa_vllm.checkpoints`."""

from __future__ import annotations

__all__ = ["MedusaCheckpointError"]


class MedusaCheckpointError(ValueError):
    """A heads checkpoint is missing, malformed, or does not fit.

    The message names the file, the tensor or field, what was expected and
    what was found.
    """
