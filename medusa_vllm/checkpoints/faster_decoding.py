"""The ``medusa`` layout (FasterDecoding/Medusa, the reference code): read and export.

``config.json`` holds ``medusa_num_heads`` and ``medusa_num_layers``
(optionally ``base_model_name_or_path``); ``medusa_lm_head.safetensors`` or
``medusa_lm_head.pt`` holds ``{k}.{j}.linear.weight|bias`` and
``{k}.{num_layers}.weight``; the sizes come from the tensors. TensorRT-LLM's
``examples/medusa/convert_checkpoint.py --medusa_model_dir`` reads this layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from medusa_vllm.checkpoints.common import (
    Exported,
    RawHeads,
    dtype_name,
    head_counts,
    heads_config,
    listing,
    load_tensors,
    read_config,
    short_list,
)
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.heads import MedusaHeadsConfig

__all__ = ["WEIGHT_FILES", "check_writable", "export", "read"]

WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")

_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def read(d: Path) -> RawHeads:
    """The heads stored in directory ``d`` in FasterDecoding's layout."""
    cfg_file, cfg = read_config(d)
    num_heads, num_layers = head_counts(cfg, cfg_file, "medusa_num_heads", "medusa_num_layers")
    wfile = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
    if wfile is None:
        raise MedusaCheckpointError(
            f"no Medusa weights in {d}: expected {' or '.join(WEIGHT_FILES)} "
            f"(files seen: {listing(d)})"
        )
    tensors = load_tensors(wfile)
    lm_key = f"0.{num_layers}.weight"
    if lm_key not in tensors:
        raise MedusaCheckpointError(
            f"tensor {lm_key!r} (head 0's LM layer, medusa_num_layers="
            f"{num_layers} in {cfg_file}) is missing from {wfile}; found keys "
            f"{short_list(tensors)}"
        )
    lm = tensors[lm_key]
    if lm.dim() != 2:
        raise MedusaCheckpointError(
            f"tensor {lm_key!r} in {wfile} must be 2-D [vocab_size, hidden_size], "
            f"found shape {list(lm.shape)}"
        )
    has_bias = any(k.endswith(".linear.bias") for k in tensors)
    config = heads_config(
        cfg, cfg_file, hidden_size=int(lm.shape[1]), vocab_size=int(lm.shape[0]),
        num_heads=num_heads, num_layers=num_layers,
        resblock_bias=has_bias or num_layers == 0,
    )
    raw = RawHeads("medusa", d, config)
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raw.unexpected[key] = f"tensor {key!r} in {wfile}"
            continue
        head, layer, param = int(m[1]), int(m[2]), m[3]
        if param == "weight" and layer == num_layers:
            raw.add(f"lm_heads.{head}.weight", t, key, wfile)
        elif param.startswith("linear.") and layer < num_layers:
            raw.add(f"blocks.{head}.layers.{layer}.{param[7:]}", t, key, wfile)
        else:
            raw.unexpected[key] = f"tensor {key!r} in {wfile}"
    return raw


def check_writable(cfg: MedusaHeadsConfig) -> None:
    """Refuse heads this layout cannot hold (a reduced draft vocabulary)."""
    if cfg.truncated_vocab_size is not None:
        raise MedusaCheckpointError(
            "the FasterDecoding/Medusa layout has no reduced draft vocabulary "
            f"(truncated_vocab_size={cfg.truncated_vocab_size}); use layout "
            "'medusa_vllm' or 'vllm'"
        )


def export(
    cfg: MedusaHeadsConfig, state: dict[str, torch.Tensor], out_dtype: torch.dtype
) -> Exported:
    """``(config.json, weights file name, its tensors)`` of heads ``cfg`` with
    state dict ``state``, under FasterDecoding's names."""
    ref: dict[str, torch.Tensor] = {}
    h, L = cfg.hidden_size, cfg.num_layers
    for k in range(cfg.num_heads):
        for j in range(L):
            ref[f"{k}.{j}.linear.weight"] = state[f"blocks.{k}.layers.{j}.weight"]
            # The reference ResBlock always has a bias; zeros are equivalent.
            ref[f"{k}.{j}.linear.bias"] = state.get(
                f"blocks.{k}.layers.{j}.bias", torch.zeros(h, dtype=out_dtype)
            )
        lm = (
            state["lm_head.weight"]
            if cfg.original_lm_head
            else state[f"lm_heads.{k}.weight"]
        )
        ref[f"{k}.{L}.weight"] = lm.clone()
    config = {
        "medusa_num_heads": cfg.num_heads,
        "medusa_num_layers": L,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        # Not read by FasterDecoding; lets vLLM's method "medusa" size the
        # heads and keep the ResBlock bias.
        "hidden_size": h,
        "vocab_size": cfg.vocab_size,
        "medusa_fc_bias": True,
        "torch_dtype": dtype_name(out_dtype),
    }
    return config, WEIGHT_FILES[0], ref
