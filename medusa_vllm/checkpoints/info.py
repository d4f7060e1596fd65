"""What a heads folder's ``config.json`` says (number of heads, sizes), read
without the weights: cheap enough for vLLM's API server process."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_vllm.checkpoints.common import CONFIG_NAME
from medusa_vllm.checkpoints.errors import MedusaCheckpointError

__all__ = ["HeadsInfo", "plain_medusa_heads", "read_heads_info"]

# config.json key for the number of heads: ours and vLLM's, FasterDecoding's,
# TensorRT-LLM's (see medusa_vllm.checkpoints for the layouts).
_NUM_HEADS_KEYS = ("num_heads", "medusa_num_heads", "num_medusa_heads")


@dataclass(frozen=True)
class HeadsInfo:
    """What the heads folder's ``config.json`` says about the heads."""

    path: Path  # absolute heads folder
    num_heads: int
    hidden_size: int | None  # None when the config does not say
    vocab_size: int | None  # full vocabulary the heads were trained for
    head_type: str = "medusa"  # config.json "head_type": "medusa" or "hydra" (ours only)

    @property
    def config_file(self) -> Path:
        """The ``config.json`` these values come from."""
        return self.path / CONFIG_NAME


def _first_int(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return key, cfg[key]
    return None


def read_heads_info(heads: str | Path) -> HeadsInfo:
    """Read ``<heads>/config.json`` only (no weights: cheap in the API server).

    The number of heads is ``num_heads`` (ours, vLLM), ``medusa_num_heads``
    (FasterDecoding) or ``num_medusa_heads`` (TensorRT-LLM); ``hidden_size``
    and ``vocab_size`` are read when present (FasterDecoding's config has
    neither: such heads are checked against the backbone when the worker loads
    their weights with :func:`medusa_vllm.checkpoints.load_heads`).

    Raises:
        MedusaCheckpointError: the folder or its ``config.json`` is missing or
            malformed; the message says what was expected and found.
    """
    path = Path(heads).expanduser()
    if not path.is_dir():
        what = "a file" if path.exists() else "nothing"
        raise MedusaCheckpointError(
            f"expected the path of a Medusa heads folder, found {what} at "
            f"{str(path)!r}; pass the folder written by `medusa-vllm convert`/`train` "
            "(it holds config.json and the weights)"
        )
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise MedusaCheckpointError(
            f"expected {cfg_file} (the heads' config.json), found no such file; "
            "is this a Medusa heads folder?"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedusaCheckpointError(f"cannot read {cfg_file} as JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise MedusaCheckpointError(
            f"{cfg_file} must hold a JSON object, found {type(cfg).__name__}"
        )

    def positive_int(keys: tuple[str, ...], required: bool) -> int | None:
        hit = _first_int(cfg, keys)
        if hit is None:
            if required:
                raise MedusaCheckpointError(
                    f"{cfg_file} must give the number of heads as "
                    f"{' or '.join(repr(k) for k in keys)}, found keys {sorted(cfg)}"
                )
            return None
        key, value = hit
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MedusaCheckpointError(
                f"{cfg_file}: {key!r} must be an integer >= 1, found {value!r}"
            )
        return value

    head_type = cfg.get("head_type", "medusa")
    if head_type not in ("medusa", "hydra"):
        raise MedusaCheckpointError(
            f"{cfg_file}: 'head_type' must be 'medusa' or 'hydra', found {head_type!r}"
        )
    return HeadsInfo(
        path=path.resolve(),
        head_type=head_type,
        num_heads=positive_int(_NUM_HEADS_KEYS, required=True),  # type: ignore[arg-type]
        hidden_size=positive_int(("hidden_size",), required=False),
        vocab_size=positive_int(("vocab_size",), required=False),
    )


def plain_medusa_heads(heads: str | Path, medusa_heads: str | Path | None = None) -> str | None:
    """The plain Medusa heads for what needs independent depths (vLLM's built-in
    ``method: "medusa"``, beam trees): ``medusa_heads`` if given, else ``heads``
    themselves if they are Medusa heads, else ``None`` (Hydra heads and no others).

    Raises:
        MedusaCheckpointError: ``medusa_heads`` are not Medusa heads.
    """
    if medusa_heads:
        info = read_heads_info(medusa_heads)
        if info.head_type != "medusa":
            raise MedusaCheckpointError(
                f"{medusa_heads}: {info.head_type} heads; vLLM's Medusa and beam trees need "
                "plain Medusa heads")
        return str(medusa_heads)
    return str(heads) if read_heads_info(heads).head_type == "medusa" else None
