"""What every layout reader and writer shares: file and layout names, the
readers of ``config.json`` and of tensor files, config-field checks, the file
listings of error messages, and :class:`RawHeads`, a checkpoint read into our
parameter names but not yet checked."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.dtypes import TORCH_DTYPES, dtype_name
from medusa_vllm.core.heads import MedusaHeadsConfig

__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "Exported",
    "INDEX_NAME",
    "READ_LAYOUTS",
    "WEIGHTS_NAME",
    "TREE_FILE",
    "WRITE_LAYOUTS",
    "RawHeads",
    "check_dir",
    "config_bool",
    "config_int",
    "dtype_name",
    "head_counts",
    "heads_config",
    "listing",
    "load_tensors",
    "read_config",
    "read_json",
    "short_list",
]

READ_LAYOUTS = ("medusa_vllm", "vllm", "medusa", "trtllm")
WRITE_LAYOUTS = ("medusa_vllm", "vllm", "medusa")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TREE_FILE = "medusa_tree.json"  # calibrated tree saved beside the heads (tree="auto")

# What a layout writer exports: (config.json, weights file name, its tensors).
Exported = tuple[dict[str, Any], str, dict[str, torch.Tensor]]

DTYPES = TORCH_DTYPES


# ------------------------------------------------------------ error messages
def short_list(names: Iterable[str], limit: int = 8) -> str:
    """At most ``limit`` names in natural order, and how many more there are."""
    names = sorted(names, key=_natural_key)
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


def _natural_key(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def listing(directory: Path) -> str:
    """The files of ``directory`` for an error message (folders end with ``/``)."""
    try:
        files = sorted(
            p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
        )
    except OSError:
        return "(unreadable)"
    return short_list(files, limit=12) if files else "(empty directory)"


# ------------------------------------------------------------------- reading
def check_dir(path: str | os.PathLike[str], what: str = "heads checkpoint") -> Path:
    """``path`` as a ``Path``; raise unless it is an existing directory."""
    d = Path(path)
    if not d.exists():
        raise MedusaCheckpointError(f"{what} directory {d} does not exist")
    if not d.is_dir():
        raise MedusaCheckpointError(
            f"{what} {d} is a file; expected a directory holding config.json and "
            f"the weights (pass its parent directory {d.parent} if this is the "
            f"weights file)"
        )
    return d


def read_json(file: Path) -> dict:
    """The JSON object stored in ``file``."""
    if not file.is_file():
        raise MedusaCheckpointError(
            f"{file} is missing; a heads checkpoint needs a config.json "
            f"(found in {file.parent}: {listing(file.parent)})"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedusaCheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise MedusaCheckpointError(
            f"{file}: expected a JSON object, found {type(data).__name__}"
        )
    return data


def read_config(d: Path) -> tuple[Path, dict]:
    """``(d / config.json, its JSON object)``."""
    cfg_file = d / CONFIG_NAME
    return cfg_file, read_json(cfg_file)


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` / ``.pt`` / ``.bin`` file, on CPU."""
    if not file.is_file():
        raise MedusaCheckpointError(f"weights file {file} is missing")
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file), device="cpu")
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise MedusaCheckpointError(f"cannot read weights file {file}: {e}") from e
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise MedusaCheckpointError(
            f"{file}: expected a flat state dict {{name: tensor}}, found "
            f"{type(data).__name__}"
        )
    return dict(data)


# ------------------------------------------------------------- config fields
def config_int(cfg: dict, key: str, file: Path, *, minimum: int) -> int:
    """Field ``key`` of ``cfg`` (read from ``file``), an integer ``>= minimum``."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MedusaCheckpointError(
            f"{file}: field {key!r} must be an integer >= {minimum}, found {value!r}"
        )
    return value


def config_bool(cfg: dict, key: str, file: Path, default: bool) -> bool:
    """Field ``key`` of ``cfg`` (read from ``file``), a boolean; ``default`` if
    absent or null."""
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MedusaCheckpointError(
            f"{file}: field {key!r} must be true or false, found {value!r}"
        )
    return value


def head_counts(
    cfg: dict, file: Path, heads_key: str, layers_key: str
) -> tuple[int, int]:
    """``(number of heads >= 1, ResBlocks per head >= 0)`` from a layout's two
    fields of that name."""
    return (
        config_int(cfg, heads_key, file, minimum=1),
        config_int(cfg, layers_key, file, minimum=0),
    )


def heads_config(cfg: dict, file: Path, **fields: Any) -> MedusaHeadsConfig:
    """A validated :class:`MedusaHeadsConfig` of ``fields``, with
    ``base_model_name_or_path`` taken from ``cfg`` (read from ``file``)."""
    try:
        return MedusaHeadsConfig(
            **fields, base_model_name_or_path=cfg.get("base_model_name_or_path")
        ).validate()
    except ValueError as e:
        raise MedusaCheckpointError(f"{file}: {e}") from e


# ---------------------------------------------------------------- raw heads
@dataclass
class RawHeads:
    """A checkpoint read into our parameter names, not yet validated."""

    layout: str
    directory: Path
    config: MedusaHeadsConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # our name -> "tensor 'orig' in /path/file" (for error messages)
    origin: dict[str, str] = field(default_factory=dict)
    # names we do not know (original key -> where)
    unexpected: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor, orig: str, file: Path) -> None:
        """Record ``tensor`` (key ``orig`` of ``file``) as our parameter ``name``."""
        where = f"tensor {orig!r} in {file}"
        if name in self.tensors:
            raise MedusaCheckpointError(
                f"{where} duplicates {self.origin[name]} (both are {name!r})"
            )
        self.tensors[name] = tensor
        self.origin[name] = where
