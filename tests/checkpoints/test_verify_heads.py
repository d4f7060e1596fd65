"""`verify_heads`: every check of `load_heads` without building the heads (the
front-end refusal of bad heads before an engine starts)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa_vllm.checkpoints import MedusaCheckpointError, load_heads, save_heads
from medusa_vllm.checkpoints.load import verify_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig


def _save(tmp_path, name="h", **cfg):
    torch.manual_seed(0)
    config = MedusaHeadsConfig(**{"hidden_size": 16, "vocab_size": 40, "num_heads": 2, **cfg})
    lm = torch.randn(40, 16) if config.original_lm_head else None
    return save_heads(MedusaHeads(config, lm_head_weight=lm), tmp_path / name,
                      include_lm_head=not config.original_lm_head)


def test_good_heads_verify_and_return_their_config(tmp_path):
    d = _save(tmp_path)
    assert verify_heads(d) == load_heads(d).config


def test_shared_lm_head_left_to_the_backbone_is_accepted(tmp_path):
    d = _save(tmp_path, original_lm_head=True)
    assert verify_heads(d).original_lm_head
    with pytest.raises(MedusaCheckpointError, match="lm_head"):
        load_heads(d)  # the real load needs the backbone's weight


def _edit(d, fn):
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_non_finite_values_are_refused(tmp_path):
    d = _save(tmp_path)
    _edit(d, lambda t: t["blocks.1.layers.0.weight"].view(-1).__setitem__(3, float("inf")))
    with pytest.raises(MedusaCheckpointError, match=r"'blocks.1.layers.0.weight'.*1 NaN/Inf"):
        verify_heads(d)


def test_wrong_shape_is_refused(tmp_path):
    d = _save(tmp_path)
    _edit(d, lambda t: t.__setitem__("blocks.0.layers.0.weight", torch.zeros(16, 8)))
    with pytest.raises(MedusaCheckpointError, match=r"expected shape \[16, 16\]"):
        verify_heads(d)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    d = _save(tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(MedusaCheckpointError, match="cannot read weights file .*model.safetensors"):
        verify_heads(d)
    f.write_bytes(b"garbage" * 3)
    with pytest.raises(MedusaCheckpointError, match="cannot read weights file"):
        verify_heads(d)
