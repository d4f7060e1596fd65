"""benchmarks/verify_roofline: the layer shapes it times are the backbone's linear layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "verify_roofline.py"


def _module():
    spec = importlib.util.spec_from_file_location("verify_roofline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layer_shapes_hold_every_linear_weight_of_a_llama_with_tied_embeddings():
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_attention_heads=6,
                         num_key_value_heads=2, num_hidden_layers=3, vocab_size=200,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    shapes = _module().layer_shapes(config)
    assert sum(k * n * count for _, k, n, count in shapes) == linear
    # qkv fused as vLLM fuses it: 6 query heads and 2 kv heads of 8 dims
    assert ("qkv", 48, 6 * 8 + 2 * 2 * 8, 3) in shapes
