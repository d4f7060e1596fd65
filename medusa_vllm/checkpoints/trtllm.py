"""The ``trtllm`` layout (a TensorRT-LLM converted checkpoint): read only.

The output of TensorRT-LLM's ``examples/medusa/convert_checkpoint.py``:
``config.json`` with ``"architecture": "MedusaForCausalLM"``,
``num_medusa_heads``, ``num_medusa_layers``, ``hidden_size``, ``vocab_size``,
``mapping.tp_size|pp_size``, and ``rank{r}.safetensors`` holding the heads
split along dim 0 across the tensor-parallel ranks (pinned from
``tensorrt_llm/models/medusa/weight.py`` ``load_medusa_hf``). Only unquantized
checkpoints are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from medusa_vllm.checkpoints.common import (
    RawHeads,
    config_int,
    head_counts,
    heads_config,
    load_tensors,
    read_config,
)
from medusa_vllm.checkpoints.errors import MedusaCheckpointError

__all__ = ["ARCH", "read"]

ARCH = "MedusaForCausalLM"

_KEY = re.compile(
    r"^medusa_heads\.(\d+)\.(?:medusa_layers\.(\d+)\.linear\.(weight|bias)"
    r"|lm_head\.(weight))$"
)


def read(d: Path) -> RawHeads:
    """The heads stored in directory ``d`` by TensorRT-LLM's converter."""
    cfg_file, cfg = read_config(d)
    num_heads, num_layers = head_counts(cfg, cfg_file, "num_medusa_heads", "num_medusa_layers")
    hidden = config_int(cfg, "hidden_size", cfg_file, minimum=1)
    vocab = config_int(cfg, "vocab_size", cfg_file, minimum=1)
    quant = cfg.get("quantization") or {}
    if quant.get("quant_algo") is not None:
        raise MedusaCheckpointError(
            f"{cfg_file}: field 'quantization.quant_algo' is "
            f"{quant.get('quant_algo')!r}; only unquantized TensorRT-LLM "
            f"checkpoints (null) can be read"
        )
    mapping = cfg.get("mapping") or {}
    tp = mapping.get("tp_size", 1)
    pp = mapping.get("pp_size", 1)
    if not all(isinstance(x, int) and x >= 1 for x in (tp, pp)):
        raise MedusaCheckpointError(
            f"{cfg_file}: 'mapping.tp_size'/'mapping.pp_size' must be positive "
            f"integers, found {tp!r}/{pp!r}"
        )
    # Medusa heads live with the last pipeline stage: ranks (pp-1)*tp + t.
    files = [d / f"rank{(pp - 1) * tp + t}.safetensors" for t in range(tp)]
    shards = [load_tensors(f) for f in files]
    config = heads_config(
        cfg, cfg_file, hidden_size=hidden, vocab_size=vocab, num_heads=num_heads,
        num_layers=num_layers,
    )
    raw = RawHeads("trtllm", d, config)
    where = f"{files[0].name}..{files[-1].name}" if tp > 1 else files[0].name
    for key in shards[0]:
        if not key.startswith("medusa_heads."):
            continue  # backbone weights share these files
        m = _KEY.match(key)
        if m is None:
            raw.unexpected[key] = f"tensor {key!r} in {files[0]}"
            continue
        for f, shard in zip(files, shards, strict=True):
            if key not in shard:
                raise MedusaCheckpointError(
                    f"tensor {key!r} is in {files[0]} but missing from {f}"
                )
        full = torch.cat([shard[key] for shard in shards], dim=0)
        head = m[1]
        if m[4]:
            if full.dim() == 2 and full.shape[0] > vocab:
                full = full[:vocab]  # tensor-parallel vocab padding
            raw.add(f"lm_heads.{head}.weight", full, key, d / where)
        else:
            raw.add(f"blocks.{head}.layers.{m[2]}.{m[3]}", full, key, d / where)
    if not any(k.endswith(".bias") for k in raw.tensors) and num_layers > 0:
        config.resblock_bias = False
    return raw
