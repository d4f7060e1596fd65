"""Saving heads in one of the writable layouts (ours, vLLM's, FasterDecoding's)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

from medusa_vllm.checkpoints import faster_decoding, ours, vllm_medusa
from medusa_vllm.checkpoints.common import CONFIG_NAME, WRITE_LAYOUTS, Exported, listing
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.core.hydra import HydraHeads

__all__ = ["check_write_layout", "save_heads"]


class _Writer(Protocol):
    """What a writable layout's module provides."""

    def check_writable(self, cfg: MedusaHeadsConfig) -> None: ...

    def export(
        self, cfg: MedusaHeadsConfig, state: dict[str, torch.Tensor], out_dtype: torch.dtype
    ) -> Exported: ...


WRITERS: dict[str, _Writer] = {
    "medusa_vllm": ours,
    "vllm": vllm_medusa,
    "medusa": faster_decoding,
}
assert tuple(WRITERS) == WRITE_LAYOUTS

# Files a loader would pick up: removed from an overwritten destination.
_WEIGHT_GLOBS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.pt",
    "*.bin",
    CONFIG_NAME,
)


def check_write_layout(layout: str) -> None:
    """Raise unless ``layout`` is one of ``WRITE_LAYOUTS``."""
    if layout not in WRITERS:
        raise MedusaCheckpointError(
            f"unknown output layout {layout!r}; writable layouts: {list(WRITE_LAYOUTS)}"
        )


def _prepare_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise MedusaCheckpointError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise MedusaCheckpointError(
                f"destination {dst} is not empty (found {listing(dst)}); refusing "
                f"to overwrite it; pass overwrite=True (CLI: --overwrite)"
            )
        # Remove files a loader would pick up, so no stale weights survive.
        for pattern in _WEIGHT_GLOBS:
            for f in dst.glob(pattern):
                if f.is_file():
                    f.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def _cpu_state(
    heads: MedusaHeads | HydraHeads, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in heads.state_dict().items():
        if t.device.type == "meta":
            raise MedusaCheckpointError(
                f"cannot save {name!r}: it is on the meta device"
            )
        t = t.detach().to("cpu")
        if t.dtype.is_floating_point and dtype is not None:
            t = t.to(dtype)
        out[name] = t.contiguous().clone()
    return out


def save_heads(
    heads: MedusaHeads | HydraHeads,
    path: str | os.PathLike[str],
    *,
    layout: str = "medusa_vllm",
    overwrite: bool = False,
    include_lm_head: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``heads`` to directory ``path`` in one of ``WRITE_LAYOUTS``.

    Args:
        layout: ``"medusa_vllm"`` (ours), ``"vllm"`` (vLLM 0.32 ``method:
            "medusa"``) or ``"medusa"`` (FasterDecoding/Medusa; also what
            TensorRT-LLM's converter reads).
        overwrite: allow a non-empty destination; config/weight files in it
            (``config.json``, ``*.safetensors``, ``*.pt``, ``*.bin``) are removed
            first so no stale weights survive.
        include_lm_head: ``False`` omits the shared ``lm_head.weight`` of
            ``original_lm_head`` heads (ours only); it must then be passed as
            ``lm_head_weight`` at load time.
        dtype: cast floating-point tensors (default: keep).

    Returns:
        The destination directory.
    """
    check_write_layout(layout)
    cfg = heads.config
    if isinstance(heads, HydraHeads) and layout != "medusa_vllm":
        raise MedusaCheckpointError(
            f"Hydra heads can only be written in our layout 'medusa_vllm'; the {layout!r} "
            f"layout has no sequentially dependent heads (vLLM and FasterDecoding/Medusa "
            f"read plain Medusa heads only)"
        )
    if not include_lm_head:
        if layout != "medusa_vllm":
            raise MedusaCheckpointError(
                f"include_lm_head=False is only possible for layout 'medusa_vllm'; "
                f"the {layout!r} layout must contain the LM weights"
            )
        if not cfg.original_lm_head:
            raise MedusaCheckpointError(
                "include_lm_head=False needs original_lm_head=True: per-head LM "
                "layers are trained weights and cannot be taken from the backbone"
            )
    writer = WRITERS[layout]
    writer.check_writable(cfg)
    state = _cpu_state(heads, dtype)
    out_dtype = next(t.dtype for t in state.values() if t.dtype.is_floating_point)
    dst = Path(path)
    _prepare_dst(dst, overwrite)
    if not include_lm_head:
        state.pop("lm_head.weight")
    config, weights_name, tensors = writer.export(cfg, state, out_dtype)
    save_file(tensors, str(dst / weights_name), metadata={"format": "pt"})
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return dst
