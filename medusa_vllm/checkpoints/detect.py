"""Which layout a heads directory holds, from its ``config.json`` and file names."""

from __future__ import annotations

import os

from medusa_vllm.checkpoints import faster_decoding, trtllm, vllm_medusa
from medusa_vllm.checkpoints.common import (
    CONFIG_NAME,
    READ_LAYOUTS,
    check_dir,
    listing,
    read_json,
)
from medusa_vllm.checkpoints.errors import MedusaCheckpointError

__all__ = ["detect_layout"]


def detect_layout(path: str | os.PathLike[str]) -> str:
    """Name of the layout stored in directory ``path`` (one of ``READ_LAYOUTS``)."""
    d = check_dir(path)
    cfg_file = d / CONFIG_NAME
    if not cfg_file.is_file():
        raise MedusaCheckpointError(
            f"unknown heads layout in {d}: no config.json (tried layouts "
            f"{list(READ_LAYOUTS)}; files seen: {listing(d)})"
        )
    cfg = read_json(cfg_file)
    if "medusa_vllm_format" in cfg:
        return "medusa_vllm"
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "medusa" or vllm_medusa.ARCH in archs:
        return "vllm"
    if cfg.get("architecture") == trtllm.ARCH and "num_medusa_heads" in cfg:
        return "trtllm"
    weight_files = faster_decoding.WEIGHT_FILES
    if "medusa_num_heads" in cfg and any((d / f).is_file() for f in weight_files):
        return "medusa"
    keys = sorted(cfg)[:20]
    raise MedusaCheckpointError(
        f"unknown heads layout in {d}. Tried: medusa_vllm (config.json field "
        f"'medusa_vllm_format'), vllm ('model_type': 'medusa' or architectures "
        f"['{vllm_medusa.ARCH}']), trtllm ('architecture': '{trtllm.ARCH}' with "
        f"'num_medusa_heads'), medusa ('medusa_num_heads' plus "
        f"{' or '.join(weight_files)}). Found config.json keys {keys} and "
        f"files {listing(d)}"
    )
