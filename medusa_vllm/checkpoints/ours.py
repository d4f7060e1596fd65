"""The ``medusa_vllm`` layout (ours): read and export.

``config.json`` holds ``"medusa_vllm_format": 1``, ``"architectures":
["MedusaHeads"]`` and the :class:`~medusa_vllm.core.heads.MedusaHeadsConfig`
fields; ``model.safetensors`` holds the
:class:`~medusa_vllm.core.heads.MedusaHeads` state dict under its own names.

Hydra heads (:mod:`medusa_vllm.core.hydra`) use the same layout with
``"head_type": "hydra"``, ``"architectures": ["HydraHeads"]`` and the
:class:`~medusa_vllm.core.hydra.HydraHeadsConfig` fields. A config without
``head_type`` holds Medusa heads (every checkpoint written before Hydra existed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_vllm.checkpoints.common import (
    WEIGHTS_NAME,
    Exported,
    RawHeads,
    dtype_name,
    listing,
    load_tensors,
    read_config,
)
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.heads import MedusaHeadsConfig
from medusa_vllm.core.hydra import HEAD_TYPE as HYDRA
from medusa_vllm.core.hydra import HydraHeadsConfig

__all__ = ["ARCH", "FORMAT_VERSION", "HEAD_TYPES", "HYDRA_ARCH", "check_writable", "export", "read"]

FORMAT_VERSION = 1
ARCH = "MedusaHeads"
HYDRA_ARCH = "HydraHeads"
# config.json "head_type" -> its config class ("medusa" when the key is absent)
HEAD_TYPES: dict[str, type[MedusaHeadsConfig | HydraHeadsConfig]] = {
    "medusa": MedusaHeadsConfig, HYDRA: HydraHeadsConfig}
# Our config.json keys that are not config fields.
_META_KEYS = ("architectures", "medusa_vllm_format", "torch_dtype", "dtype", "head_type")


def read(d: Path) -> RawHeads:
    """The heads stored in directory ``d`` in our layout."""
    cfg_file, cfg = read_config(d)
    version = cfg.get("medusa_vllm_format")
    if version != FORMAT_VERSION:
        raise MedusaCheckpointError(
            f"{cfg_file}: field 'medusa_vllm_format' is {version!r}; this "
            f"medusa-vllm reads format {FORMAT_VERSION}"
        )
    head_type = cfg.get("head_type", "medusa")
    if head_type not in HEAD_TYPES:
        raise MedusaCheckpointError(
            f"{cfg_file}: field 'head_type' is {head_type!r}; this medusa-vllm reads "
            f"{sorted(HEAD_TYPES)} (no field: medusa)")
    fields = {k: v for k, v in cfg.items() if k not in _META_KEYS}
    try:
        config = HEAD_TYPES[head_type].from_dict(fields)
    except (TypeError, ValueError) as e:
        raise MedusaCheckpointError(f"{cfg_file}: {e}") from e
    raw = RawHeads("medusa_vllm", d, config)
    wfile = d / WEIGHTS_NAME
    if not wfile.is_file():
        raise MedusaCheckpointError(
            f"weights file {wfile} is missing (files seen: {listing(d)})"
        )
    for key, t in load_tensors(wfile).items():
        raw.add(key, t, key, wfile)
    return raw


def check_writable(cfg: MedusaHeadsConfig | HydraHeadsConfig) -> None:
    """Every :class:`MedusaHeadsConfig` and :class:`HydraHeadsConfig` can be
    written in our layout."""


def export(
    cfg: MedusaHeadsConfig | HydraHeadsConfig, state: dict[str, torch.Tensor],
    out_dtype: torch.dtype,
) -> Exported:
    """``(config.json, weights file name, its tensors)`` of heads ``cfg`` with
    state dict ``state``."""
    hydra = isinstance(cfg, HydraHeadsConfig)
    config = {
        "architectures": [HYDRA_ARCH if hydra else ARCH],
        "medusa_vllm_format": FORMAT_VERSION,
        **({"head_type": HYDRA} if hydra else {}),
        **cfg.to_dict(),
        "torch_dtype": dtype_name(out_dtype),
    }
    return config, WEIGHTS_NAME, state
