"""The ``vllm`` layout (vLLM 0.32's built-in ``method: "medusa"``): read and export.

Read exactly as vLLM's ``Medusa.load_weights`` does (``medusa_heads.``
prefixes dropped, FasterDecoding keys remapped, a shared head stored as
``lm_heads.0.weight``, full-vocabulary LM weights sliced with ``token_map``);
the config fields are those of ``vllm/transformers_utils/configs/medusa.py``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from medusa_vllm.checkpoints.common import (
    INDEX_NAME,
    WEIGHTS_NAME,
    Exported,
    RawHeads,
    config_bool,
    dtype_name,
    head_counts,
    heads_config,
    listing,
    load_tensors,
    read_config,
    read_json,
)
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.heads import MedusaHeadsConfig

__all__ = ["ARCH", "check_writable", "export", "read"]

ARCH = "MedusaModel"


def _weight_files(d: Path) -> list[Path]:
    """The files vLLM's default loader would read (safetensors first)."""
    files = sorted(d.glob("*.safetensors"))
    if files:
        index = d / INDEX_NAME
        if index.is_file():
            wanted = set(read_json(index).get("weight_map", {}).values())
            files = [f for f in files if f.name in wanted]
        return files
    return sorted(d.glob("*.bin")) or sorted(d.glob("*.pt"))


_OLD_KEY = re.compile(r"^(\d+)\.(\d+)\.(.+)$")


def _vllm_name(name: str) -> str:
    """vLLM 0.32 ``Medusa.load_weights`` key normalisation."""
    name = name.replace("medusa_heads.", "")
    m = _OLD_KEY.match(name)
    if m:
        head, layer, rest = m.groups()
        parts = rest.split(".")
        if "linear" in parts:
            param = ".".join(parts[parts.index("linear") + 1 :])
            return f"blocks.{head}.layers.{layer}.{param}"
        return f"lm_heads.{head}.{rest}"
    return name


def read(d: Path) -> RawHeads:
    """The heads stored in directory ``d`` in vLLM's layout."""
    cfg_file, cfg = read_config(d)
    cfg = dict(cfg)
    # vLLM's MedusaConfig.from_pretrained renames any key containing "num" and
    # "heads" / "layers" (e.g. medusa_num_heads).
    for key in list(cfg):
        if "num" in key and "heads" in key:
            cfg["num_heads"] = cfg.pop(key)
        elif "num" in key and "layers" in key:
            cfg["num_hidden_layers"] = cfg.pop(key)
    files = _weight_files(d)
    if not files:
        raise MedusaCheckpointError(
            f"no weights in {d}: vLLM's loader reads *.safetensors (or *.bin/*.pt); "
            f"files seen: {listing(d)}"
        )
    tensors: dict[str, tuple[torch.Tensor, str, Path]] = {}
    for f in files:
        for key, t in load_tensors(f).items():
            tensors[key] = (t, key, f)
    original_lm_head = config_bool(cfg, "original_lm_head", cfg_file, False)

    renamed: dict[str, tuple[torch.Tensor, str, Path]] = {}
    for key, (t, orig, f) in tensors.items():
        name = _vllm_name(key)
        if original_lm_head and name == "lm_heads.0.weight":
            name = "lm_head.weight"
        if name in renamed:
            raise MedusaCheckpointError(
                f"tensor {orig!r} in {f} and tensor {renamed[name][1]!r} in "
                f"{renamed[name][2]} both load into {name!r}"
            )
        renamed[name] = (t, orig, f)

    num_heads, num_layers = head_counts(cfg, cfg_file, "num_heads", "num_hidden_layers")
    hidden = cfg.get("hidden_size")
    vocab = cfg.get("vocab_size")
    if hidden is None or vocab is None:
        lm = renamed.get("lm_head.weight") or renamed.get("lm_heads.0.weight")
        if lm is None:
            raise MedusaCheckpointError(
                f"{cfg_file}: fields 'hidden_size'/'vocab_size' are missing and no "
                f"LM weight to infer them from"
            )
        vocab = vocab if vocab is not None else lm[0].shape[0]
        hidden = hidden if hidden is not None else lm[0].shape[1]
    for key, val in (("hidden_size", hidden), ("vocab_size", vocab)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise MedusaCheckpointError(
                f"{cfg_file}: field {key!r} must be a positive integer, found {val!r}"
            )
    truncated = cfg.get("truncated_vocab_size")
    if truncated is not None and truncated == vocab:
        truncated = None  # vLLM: truncated_vocab_size == vocab_size means "full"
    has_bias = any(n.startswith("blocks.") and n.endswith(".bias") for n in renamed)
    fc_bias = config_bool(cfg, "medusa_fc_bias", cfg_file, False)
    if has_bias and not fc_bias:
        warnings.warn(
            f"{cfg_file}: ResBlock bias tensors are present but 'medusa_fc_bias' is "
            f"not true; vLLM 0.32's Medusa would silently ignore them. Loading them "
            f"(re-export with layout='vllm' to set medusa_fc_bias).",
            stacklevel=3,
        )
    config = heads_config(
        cfg, cfg_file, hidden_size=hidden, vocab_size=vocab, num_heads=num_heads,
        num_layers=num_layers, truncated_vocab_size=truncated,
        original_lm_head=original_lm_head, resblock_bias=fc_bias or has_bias,
    )
    raw = RawHeads("vllm", d, config)
    for name, (t, orig, f) in renamed.items():
        raw.add(name, t, orig, f)
    return raw


def check_writable(cfg: MedusaHeadsConfig) -> None:
    """Refuse heads vLLM 0.32's built-in Medusa cannot load."""
    if cfg.truncated_vocab_size is not None and not cfg.original_lm_head:
        raise MedusaCheckpointError(
            "vLLM 0.32's built-in Medusa cannot load per-head LM layers with a "
            "reduced draft vocabulary (truncated_vocab_size="
            f"{cfg.truncated_vocab_size}): its per-head ParallelLMHead has "
            f"vocab_size={cfg.vocab_size} rows. Use original_lm_head=True or the "
            "full vocabulary, keep layout 'medusa_vllm', or expand the LM layers to the "
            "full vocabulary (convert --expand-vocab / expand_draft_vocab)"
        )


def export(
    cfg: MedusaHeadsConfig, state: dict[str, torch.Tensor], out_dtype: torch.dtype
) -> Exported:
    """``(config.json, weights file name, its tensors)`` of heads ``cfg`` with
    state dict ``state`` (our state-dict names are vLLM's)."""
    config: dict[str, Any] = {
        "model_type": "medusa",
        "architectures": [ARCH],
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "truncated_vocab_size": cfg.draft_vocab_size,
        "original_lm_head": cfg.original_lm_head,
        "medusa_fc_bias": cfg.resblock_bias,
        "max_paths": 64,
        "topk": 10,
        "torch_dtype": dtype_name(out_dtype),
    }
    if cfg.base_model_name_or_path is not None:
        config["base_model_name_or_path"] = cfg.base_model_name_or_path
    return config, WEIGHTS_NAME, state
