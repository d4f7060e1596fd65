"""Hydra heads in our checkpoint layout: round trip, routing by ``head_type``, refusals,
and Medusa checkpoints unaffected."""

from __future__ import annotations

import json

import pytest
import torch

from medusa_vllm.checkpoints import (
    MedusaCheckpointError,
    convert,
    load_heads,
    read_heads_info,
    save_heads,
)
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig, teacher_forced_paths

H, V = 16, 40


def _hydra(reduced: bool = True) -> HydraHeads:
    torch.manual_seed(0)
    cfg = HydraHeadsConfig(hidden_size=H, vocab_size=V, num_heads=3, num_layers=2,
                           truncated_vocab_size=24 if reduced else None,
                           base_model_name_or_path="tiny")
    heads = HydraHeads(cfg, token_map=torch.randperm(V)[:24] if reduced else None,
                       lm_head_weight=torch.randn(V, H), embed_weight=torch.randn(V, H))
    with torch.no_grad():
        for b in heads.blocks:
            for p in b.parameters():
                p.normal_(0, 0.3)
    return heads.eval()


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
def test_round_trip_same_tensors_and_logits(tmp_path, reduced):
    heads = _hydra(reduced)
    save_heads(heads, tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["head_type"] == "hydra" and cfg["architectures"] == ["HydraHeads"]
    back = load_heads(tmp_path / "h").eval()
    assert isinstance(back, HydraHeads) and back.config == heads.config
    a, b = heads.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not back.embed.weight.requires_grad
    hidden, ids = torch.randn(2, 7, H), torch.randint(0, V, (2, 7))
    assert torch.equal(heads(hidden, ids), back(hidden, ids))
    info = read_heads_info(tmp_path / "h")
    assert (info.head_type, info.num_heads, info.hidden_size, info.vocab_size) == ("hydra", 3, H, V)


def test_bfloat16_export_loads_in_its_dtype(tmp_path):
    save_heads(_hydra(), tmp_path / "h", dtype=torch.bfloat16)
    back = load_heads(tmp_path / "h")
    assert back.dtype == torch.bfloat16 and back.embed.weight.dtype == torch.bfloat16


def test_medusa_checkpoints_unaffected(tmp_path):
    torch.manual_seed(0)
    med = MedusaHeads(MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2))
    save_heads(med, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "head_type" not in cfg and cfg["architectures"] == ["MedusaHeads"]
    back = load_heads(tmp_path / "m")
    assert type(back) is MedusaHeads and back.config == med.config
    assert read_heads_info(tmp_path / "m").head_type == "medusa"
    # Medusa heads still export to vLLM's layout
    convert(tmp_path / "m", tmp_path / "v", "vllm")
    assert type(load_heads(tmp_path / "v")) is MedusaHeads


def test_hydra_refuses_foreign_layouts(tmp_path):
    with pytest.raises(MedusaCheckpointError, match="only be written in our layout"):
        save_heads(_hydra(), tmp_path / "v", layout="vllm")
    save_heads(_hydra(), tmp_path / "h")
    with pytest.raises(MedusaCheckpointError, match="only be written in our layout"):
        convert(tmp_path / "h", tmp_path / "f", "medusa")


def test_bad_head_type_and_shapes_are_named(tmp_path):
    save_heads(_hydra(), tmp_path / "h")
    cfg_file = tmp_path / "h" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "head_type": "eagle"}))
    with pytest.raises(MedusaCheckpointError, match="'head_type' is 'eagle'"):
        load_heads(tmp_path / "h")
    with pytest.raises(MedusaCheckpointError, match="head_type"):
        read_heads_info(tmp_path / "h")
    # a Medusa config over Hydra weights: the Hydra tensors are unexpected
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "head_type"}))
    with pytest.raises(MedusaCheckpointError, match="unexpected tensor"):
        load_heads(tmp_path / "h")
    # a Hydra config with one head more than the weights
    cfg_file.write_text(json.dumps({**cfg, "num_heads": 4}))
    with pytest.raises(MedusaCheckpointError, match="missing tensor"):
        load_heads(tmp_path / "h")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        HydraHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2, num_layers=0).validate()
    with pytest.raises(ValueError, match="truncated_vocab_size"):
        HydraHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2, truncated_vocab_size=V).validate()
    with pytest.raises(ValueError, match="unknown field"):
        HydraHeadsConfig.from_dict({"hidden_size": H, "vocab_size": V, "num_heads": 2,
                                    "original_lm_head": True})


def test_fresh_heads_reproduce_the_backbone_next_token_logits():
    lm = torch.randn(V, H)
    heads = HydraHeads(HydraHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2),
                       lm_head_weight=lm, embed_weight=torch.randn(V, H))
    hidden, ids = torch.randn(3, H), torch.randint(0, V, (3, 2))
    torch.testing.assert_close(heads.head_logits(1, hidden, ids), hidden @ lm.T)


def test_teacher_forced_paths():
    ids = torch.tensor([[10, 11, 12, 13]])
    assert teacher_forced_paths(ids, 0).tolist() == [[[11], [12], [13], [0]]]
    assert teacher_forced_paths(ids, 1, pad=-5).tolist() == [[[11, 12], [12, 13], [13, -5], [-5, -5]]]


def test_out_of_draft_vocab_root_reads_the_zero_row():
    heads = _hydra(True)
    outside = [i for i in range(V) if i not in set(heads.token_map.tolist())]
    rows = heads.embed_rows(torch.tensor([outside[0], int(heads.token_map[3])]))
    assert rows.tolist() == [24, 3]
    assert torch.count_nonzero(heads.embed.weight[24]) == 0
