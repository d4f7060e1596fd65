"""The LM-head weight of a Hugging Face backbone directory, read alone.

Heads that share the backbone's LM layer (``original_lm_head``) may be saved
without it; this supplies it at load or conversion time.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from medusa_vllm.checkpoints.common import INDEX_NAME, check_dir, listing, read_json
from medusa_vllm.checkpoints.errors import MedusaCheckpointError

__all__ = ["load_backbone_lm_head"]

_LM_HEAD_NAMES = ("lm_head.weight",)
_EMBED_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
)


def load_backbone_lm_head(path: str | os.PathLike[str]) -> torch.Tensor:
    """The ``lm_head`` weight ``[vocab_size, hidden]`` of a HF backbone directory.

    Reads only that tensor from ``*.safetensors`` (``lm_head.weight``; for tied
    embeddings — no ``lm_head.weight`` — the input embedding matrix).
    """
    d = check_dir(path, "backbone")
    index = d / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = read_json(index).get("weight_map", {})
    else:
        weight_map = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    weight_map[key] = f.name
    if not weight_map:
        raise MedusaCheckpointError(
            f"no *.safetensors weights in backbone directory {d} (files seen: "
            f"{listing(d)})"
        )
    for name in _LM_HEAD_NAMES + _EMBED_NAMES:
        if name in weight_map:
            file = d / weight_map[name]
            with safe_open(str(file), framework="pt") as sf:
                return sf.get_tensor(name)
    raise MedusaCheckpointError(
        f"backbone {d}: no LM head tensor; tried {list(_LM_HEAD_NAMES + _EMBED_NAMES)}"
    )
