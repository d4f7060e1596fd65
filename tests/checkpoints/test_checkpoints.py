"""Tests for medusa_vllm.checkpoints: layouts in/out, cross-loading, bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medusa_vllm.checkpoints import (
    MedusaCheckpointError,
    add_convert_args,
    check_compatible,
    convert,
    convert_main,
    detect_layout,
    expand_draft_vocab,
    load_backbone_lm_head,
    load_heads,
    save_heads,
)
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig, token_map_from_counts

H, V = 8, 24


# -------------------------------------------------------------------- helpers
def random_heads(seed: int = 0, **cfg_kwargs) -> MedusaHeads:
    """Heads with random (non-zero) weights; token_map drawn if truncated."""
    kwargs = {"hidden_size": H, "vocab_size": V, "num_heads": 3, "num_layers": 2}
    kwargs.update(cfg_kwargs)
    cfg = MedusaHeadsConfig(**kwargs)
    g = torch.Generator().manual_seed(seed)
    tm = None
    if cfg.truncated_vocab_size is not None:
        tm = torch.randperm(cfg.vocab_size, generator=g)[: cfg.truncated_vocab_size]
    heads = MedusaHeads(cfg, token_map=tm)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return heads


def hidden(n: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def assert_same_heads(a: MedusaHeads, b: MedusaHeads) -> None:
    """Same logits (to float rounding: a shared LM layer runs one batched
    matmul); bit-identical tensors when the two have the same structure."""
    assert a.config.num_heads == b.config.num_heads
    x = hidden()
    la, lb = a.full_logits(x), b.full_logits(x)
    assert torch.equal(torch.isinf(la), torch.isinf(lb))
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    if a.config.original_lm_head == b.config.original_lm_head:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name


class RefResBlock(torch.nn.Module):
    """FasterDecoding/Medusa's ResBlock structure (``linear`` + SiLU)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, hidden_size)


def write_reference(
    heads: MedusaHeads, d: Path, fmt: str = "safetensors", share_layers: bool = False
) -> Path:
    """Write ``heads`` the way FasterDecoding/Medusa does: the state dict of
    ``ModuleList([Sequential(*ResBlocks, Linear(H, V, bias=False))])`` as
    ``medusa_lm_head.{safetensors,pt}`` plus a ``medusa_num_heads`` config.

    ``share_layers`` reproduces the reference's ``[ResBlock(h)] * L`` (one block
    object repeated: every layer of a head has the same weights).
    """
    cfg = heads.config
    modules = []
    for k in range(cfg.num_heads):
        if share_layers:
            one = RefResBlock(cfg.hidden_size)
            blocks = [one] * cfg.num_layers
        else:
            blocks = [RefResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)]
        with torch.no_grad():
            for j, blk in enumerate(blocks):
                src = heads.blocks[k].layers[0 if share_layers else j]
                blk.linear.weight.copy_(src.weight)
                blk.linear.bias.copy_(src.bias)
        lm = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.no_grad():
            lm.weight.copy_(heads.lm_layers[k].weight)
        modules.append(torch.nn.Sequential(*blocks, lm))
    state = torch.nn.ModuleList(modules).state_dict()
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        torch.save(state, d / "medusa_lm_head.pt")
    else:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(d / "medusa_lm_head.safetensors"),
        )
    (d / "config.json").write_text(
        json.dumps(
            {
                "medusa_num_heads": cfg.num_heads,
                "medusa_num_layers": cfg.num_layers,
                "base_model_name_or_path": "lmsys/vicuna-7b-v1.3",
                "transformers_version": "4.33.0",
            }
        )
    )
    return d


def write_trtllm(heads: MedusaHeads, d: Path, tp: int = 1) -> Path:
    """Write ``heads`` as TensorRT-LLM's examples/medusa/convert_checkpoint.py
    does: medusa tensors split along dim 0 over ``rank{r}.safetensors``."""
    cfg = heads.config
    d.mkdir(parents=True, exist_ok=True)
    full: dict[str, torch.Tensor] = {
        "transformer.ln_f.weight": torch.ones(cfg.hidden_size),  # backbone tensors
        "lm_head.weight": torch.zeros(cfg.vocab_size, cfg.hidden_size),
    }
    for k in range(cfg.num_heads):
        for j in range(cfg.num_layers):
            layer = heads.blocks[k].layers[j]
            p = f"medusa_heads.{k}.medusa_layers.{j}.linear."
            full[p + "weight"] = layer.weight.detach()
            full[p + "bias"] = layer.bias.detach()
        full[f"medusa_heads.{k}.lm_head.weight"] = heads.lm_layers[k].weight.detach()
    for r in range(tp):
        shard = {n: torch.chunk(t, tp, dim=0)[r].contiguous() for n, t in full.items()}
        save_file(shard, str(d / f"rank{r}.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "architecture": "MedusaForCausalLM",
                "dtype": "float32",
                "hidden_size": cfg.hidden_size,
                "vocab_size": cfg.vocab_size,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
                "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
                "max_draft_len": 63,
                "num_medusa_heads": cfg.num_heads,
                "num_medusa_layers": cfg.num_layers,
            }
        )
    )
    return d


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def edit_tensors(file: Path, fn) -> None:
    state = load_file(str(file))
    fn(state)
    save_file(state, str(file))


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", ["medusa_vllm", "vllm", "medusa"])
@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_each_layout(tmp_path, layout, shared):
    heads = random_heads(original_lm_head=shared)
    out = save_heads(heads, tmp_path / layout, layout=layout)
    assert detect_layout(out) == layout
    loaded = load_heads(out)
    assert_same_heads(heads, loaded)
    if layout != "medusa":  # FasterDecoding has no shared LM layer: duplicated
        assert loaded.config == heads.config


def test_cross_load_chain_gives_identical_logits(tmp_path):
    heads = random_heads(seed=7, num_layers=1, base_model_name_or_path="tiny/base")
    a = save_heads(heads, tmp_path / "ours")
    b = convert(a, tmp_path / "vllm", "vllm")
    c = convert(b, tmp_path / "ours2", "medusa_vllm")
    d = convert(c, tmp_path / "ref", "medusa")
    e = convert(d, tmp_path / "ours3")
    for path in (a, b, c, d, e):
        assert_same_heads(heads, load_heads(path))
    assert load_heads(e).config.base_model_name_or_path == "tiny/base"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_reference_layout_loads(tmp_path, fmt):
    heads = random_heads(seed=3)
    d = write_reference(heads, tmp_path / "ref", fmt=fmt)
    assert detect_layout(d) == "medusa"
    loaded = load_heads(d)
    assert loaded.config.hidden_size == H and loaded.config.vocab_size == V
    assert loaded.config.base_model_name_or_path == "lmsys/vicuna-7b-v1.3"
    assert_same_heads(heads, loaded)
    # ... and converts to ours and to vLLM's layout unchanged.
    assert_same_heads(heads, load_heads(convert(d, tmp_path / "ours")))
    assert_same_heads(heads, load_heads(convert(d, tmp_path / "vllm", "vllm")))


def test_reference_layout_with_shared_resblock_object(tmp_path):
    """The reference builds ``[ResBlock(h)] * L`` (one object, L names)."""
    heads = random_heads(seed=4, num_layers=2)
    with torch.no_grad():
        for block in heads.blocks:
            block.layers[1].weight.copy_(block.layers[0].weight)
            block.layers[1].bias.copy_(block.layers[0].bias)
    d = write_reference(heads, tmp_path / "ref", fmt="pt", share_layers=True)
    assert_same_heads(heads, load_heads(d))


@pytest.mark.parametrize("tp", [1, 2])
def test_trtllm_converted_checkpoint_loads(tmp_path, tp):
    heads = random_heads(seed=5)
    d = write_trtllm(heads, tmp_path / "trt", tp=tp)
    assert detect_layout(d) == "trtllm"
    assert_same_heads(heads, load_heads(d))


def test_trtllm_quantized_is_refused(tmp_path):
    d = write_trtllm(random_heads(), tmp_path / "trt")
    edit_json(d / "config.json", quantization={"quant_algo": "W8A16"})
    with pytest.raises(MedusaCheckpointError, match=r"quant_algo.*W8A16"):
        load_heads(d)


# ---------------------------------------------------------- reduced vocabulary
@pytest.mark.parametrize("layout", ["medusa_vllm", "vllm"])
def test_reduced_vocab_round_trip(tmp_path, layout):
    heads = random_heads(seed=6, truncated_vocab_size=7, original_lm_head=True)
    out = save_heads(heads, tmp_path / layout, layout=layout)
    loaded = load_heads(out)
    assert loaded.config.truncated_vocab_size == 7
    assert torch.equal(loaded.token_map, heads.token_map)
    assert_same_heads(heads, loaded)
    assert torch.equal(loaded.topk(hidden(), 3), heads.topk(hidden(), 3))


def test_reduced_vocab_per_head_round_trips_in_ours_only(tmp_path):
    heads = random_heads(seed=8, truncated_vocab_size=5)
    assert_same_heads(heads, load_heads(save_heads(heads, tmp_path / "ours")))
    with pytest.raises(
        MedusaCheckpointError, match=r"vLLM 0\.32.*truncated_vocab_size=5"
    ):
        save_heads(heads, tmp_path / "vllm", layout="vllm")
    with pytest.raises(MedusaCheckpointError, match="reduced draft vocabulary"):
        save_heads(heads, tmp_path / "ref", layout="medusa")


def test_vllm_full_vocab_lm_weight_is_sliced_by_token_map(tmp_path):
    """vLLM slices an LM weight with more rows than token_map; so do we."""
    counts = torch.arange(V, 0, -1).float()
    tm = token_map_from_counts(counts, 6)
    full_lm = torch.randn(V, H)
    d = tmp_path / "vllm"
    d.mkdir()
    save_file(
        {
            "blocks.0.layers.0.weight": torch.zeros(H, H),
            "lm_heads.0.weight": full_lm,
            "token_map": tm,
        },
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "medusa",
                "hidden_size": H,
                "vocab_size": V,
                "num_heads": 1,
                "num_hidden_layers": 1,
                "truncated_vocab_size": 6,
                "original_lm_head": True,
            }
        )
    )
    heads = load_heads(d)
    assert torch.equal(heads.lm_head.weight, full_lm[tm])
    assert heads.config.resblock_bias is False


def test_vllm_loader_key_variants(tmp_path):
    """``medusa_heads.`` prefixes and FasterDecoding keys, as vLLM remaps them."""
    heads = random_heads(seed=9, num_layers=1)
    d = tmp_path / "vllm"
    d.mkdir()
    state = {}
    for k in range(3):
        layer = heads.blocks[k].layers[0]
        state[f"medusa_heads.{k}.0.linear.weight"] = layer.weight.detach().clone()
        state[f"{k}.0.linear.bias"] = layer.bias.detach().clone()
        state[f"medusa_heads.lm_heads.{k}.weight"] = (
            heads.lm_heads[k].weight.detach().clone()
        )
    save_file(state, str(d / "shard-a.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "medusa",
                "hidden_size": H,
                "vocab_size": V,
                "medusa_num_heads": 3,
                "medusa_num_layers": 1,
                "medusa_fc_bias": True,
            }
        )
    )
    assert_same_heads(heads, load_heads(d))


def test_vllm_bias_without_medusa_fc_bias_warns_and_loads(tmp_path):
    heads = random_heads(seed=10)
    d = save_heads(heads, tmp_path / "vllm", layout="vllm")
    edit_json(d / "config.json", medusa_fc_bias=False)
    with pytest.warns(UserWarning, match="medusa_fc_bias"):
        loaded = load_heads(d)
    assert_same_heads(heads, loaded)


def test_vllm_export_config_fields(tmp_path):
    heads = random_heads(
        seed=11, truncated_vocab_size=9, original_lm_head=True, resblock_bias=False
    )
    d = save_heads(heads, tmp_path / "vllm", layout="vllm")
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "medusa"
    assert cfg["architectures"] == ["MedusaModel"]
    assert (cfg["num_heads"], cfg["num_hidden_layers"]) == (3, 2)
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["truncated_vocab_size"]) == (
        H,
        V,
        9,
    )
    assert cfg["original_lm_head"] is True and cfg["medusa_fc_bias"] is False
    keys = set(load_file(str(d / "model.safetensors")))
    assert keys == {
        f"blocks.{k}.layers.{j}.weight" for k in range(3) for j in range(2)
    } | {"lm_head.weight", "token_map"}


# ------------------------------------------------------------ shared lm_head
def test_shared_lm_head_may_be_omitted_and_supplied_at_load(tmp_path):
    backbone_lm = torch.randn(V, H)
    cfg = MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=3, original_lm_head=True)
    heads = MedusaHeads(cfg, lm_head_weight=backbone_lm)
    d = save_heads(heads, tmp_path / "ours", include_lm_head=False)
    assert "lm_head.weight" not in load_file(str(d / "model.safetensors"))

    with pytest.raises(
        MedusaCheckpointError, match=r"'lm_head\.weight'.*lm_head_weight="
    ):
        load_heads(d)
    loaded = load_heads(d, lm_head_weight=backbone_lm)
    assert_same_heads(heads, loaded)
    # Same dtype and device: no copy, the heads stay tied to the backbone.
    assert loaded.lm_head.weight.data_ptr() == backbone_lm.data_ptr()
    assert not loaded.lm_head.weight.requires_grad

    # vLLM's ParallelLMHead weight (rows padded to 64) is accepted, still tied.
    padded = torch.cat([backbone_lm, torch.zeros(64 - V, H)])
    tied = load_heads(d, lm_head_weight=padded)
    assert_same_heads(heads, tied)
    assert tied.lm_head.weight.data_ptr() == padded.data_ptr()

    with pytest.raises(
        MedusaCheckpointError, match=r"lm_head_weight: expected shape \[24, 8\]"
    ):
        load_heads(d, lm_head_weight=torch.randn(V + 1, H))


def test_shared_lm_head_omitted_with_reduced_vocab(tmp_path):
    backbone_lm = torch.randn(V, H)
    cfg = MedusaHeadsConfig(
        hidden_size=H,
        vocab_size=V,
        num_heads=2,
        original_lm_head=True,
        truncated_vocab_size=4,
    )
    heads = MedusaHeads(
        cfg, token_map=torch.tensor([3, 17, 0, 9]), lm_head_weight=backbone_lm
    )
    d = save_heads(heads, tmp_path / "ours", include_lm_head=False)
    loaded = load_heads(d, lm_head_weight=backbone_lm)  # full weight, sliced on load
    assert_same_heads(heads, loaded)


def test_include_lm_head_false_refusals(tmp_path):
    with pytest.raises(MedusaCheckpointError, match="original_lm_head=True"):
        save_heads(random_heads(), tmp_path / "a", include_lm_head=False)
    shared = random_heads(original_lm_head=True)
    with pytest.raises(
        MedusaCheckpointError, match="only possible for layout 'medusa_vllm'"
    ):
        save_heads(shared, tmp_path / "b", layout="vllm", include_lm_head=False)


def test_load_backbone_lm_head_variants(tmp_path):
    w = torch.randn(V, H)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(
        {"model.norm.weight": torch.ones(H), "lm_head.weight": w},
        str(plain / "model.safetensors"),
    )
    assert torch.equal(load_backbone_lm_head(plain), w)

    tied = tmp_path / "tied"  # tie_word_embeddings: no lm_head.weight, sharded
    tied.mkdir()
    save_file(
        {"model.embed_tokens.weight": w}, str(tied / "model-00001-of-00002.safetensors")
    )
    save_file(
        {"model.norm.weight": torch.ones(H)},
        str(tied / "model-00002-of-00002.safetensors"),
    )
    (tied / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                    "model.norm.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    assert torch.equal(load_backbone_lm_head(tied), w)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        MedusaCheckpointError, match=r"no \*\.safetensors weights in backbone"
    ):
        load_backbone_lm_head(empty)


# ------------------------------------------------------------ convert + CLI
def test_convert_main_cli(tmp_path, capsys):
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    backbone_lm = torch.randn(V, H)
    save_file({"lm_head.weight": backbone_lm}, str(backbone / "model.safetensors"))
    cfg = MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2, original_lm_head=True)
    heads = MedusaHeads(cfg, lm_head_weight=backbone_lm)
    src = save_heads(heads, tmp_path / "src", include_lm_head=False)

    parser = add_convert_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            str(src),
            str(tmp_path / "out"),
            "--layout",
            "vllm",
            "--lm-head-from",
            str(backbone),
            "--dtype",
            "bfloat16",
        ]
    )
    assert convert_main(args) == 0
    assert "wrote vllm heads" in capsys.readouterr().out
    out = load_heads(tmp_path / "out")
    assert out.dtype == torch.bfloat16
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"]
        == "bfloat16"
    )
    torch.testing.assert_close(
        out.lm_head.weight.float(), backbone_lm.bfloat16().float()
    )

    # Again without --overwrite: refused, exit code 2, message on stderr.
    assert convert_main(args) == 2
    assert "not empty" in capsys.readouterr().err


def test_dtype_is_preserved(tmp_path):
    heads = random_heads().to(torch.float16)
    loaded = load_heads(save_heads(heads, tmp_path / "h"))
    assert loaded.dtype == torch.float16
    assert_same_heads(heads, loaded)
    assert load_heads(tmp_path / "h", dtype=torch.float32).dtype == torch.float32


# ----------------------------------------------------------------- bad input
def test_missing_directory(tmp_path):
    with pytest.raises(MedusaCheckpointError, match=r"directory .*nope does not exist"):
        load_heads(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    with pytest.raises(MedusaCheckpointError, match=r"model\.safetensors is a file"):
        load_heads(d / "model.safetensors")


def test_unknown_layout_lists_tried_layouts_and_files(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 8})
    )
    (d / "weights.bin").write_bytes(b"")
    with pytest.raises(MedusaCheckpointError) as e:
        load_heads(d)
    msg = str(e.value)
    for word in (
        "medusa_vllm",
        "vllm",
        "trtllm",
        "medusa_num_heads",
        "'weights.bin'",
        "'model_type'",
    ):
        assert word in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        MedusaCheckpointError, match=r"no config\.json.*empty directory"
    ):
        load_heads(empty)


def test_unknown_layout_argument(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    with pytest.raises(MedusaCheckpointError, match="unknown layout 'eagle'"):
        load_heads(d, layout="eagle")
    with pytest.raises(MedusaCheckpointError, match="unknown output layout 'eagle'"):
        save_heads(random_heads(), tmp_path / "x", layout="eagle")


def test_invalid_json_names_file(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    (d / "config.json").write_text("{not json")
    with pytest.raises(MedusaCheckpointError, match=r"config\.json: not valid JSON"):
        load_heads(d)


def test_missing_weights_file_names_it(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    (d / "model.safetensors").unlink()
    with pytest.raises(
        MedusaCheckpointError, match=r"weights file .*model\.safetensors is missing"
    ):
        load_heads(d)
    ref = write_reference(random_heads(), tmp_path / "ref")
    (ref / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(MedusaCheckpointError, match="unknown heads layout"):
        load_heads(ref)
    with pytest.raises(
        MedusaCheckpointError,
        match=r"medusa_lm_head\.safetensors or medusa_lm_head\.pt",
    ):
        load_heads(ref, layout="medusa")


def test_bad_format_version_and_bad_field(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    edit_json(d / "config.json", medusa_vllm_format=99)
    with pytest.raises(MedusaCheckpointError, match=r"'medusa_vllm_format' is 99"):
        load_heads(d)
    edit_json(d / "config.json", medusa_vllm_format=1, num_heads=0)
    with pytest.raises(
        MedusaCheckpointError, match=r"config\.json: MedusaHeadsConfig\.num_heads"
    ):
        load_heads(d)
    ref = write_reference(random_heads(), tmp_path / "ref")
    edit_json(ref / "config.json", medusa_num_layers="one")
    with pytest.raises(
        MedusaCheckpointError, match=r"'medusa_num_layers' must be an integer"
    ):
        load_heads(ref)


def test_heads_that_disagree_on_vocab_name_the_tensor(tmp_path):
    ref = write_reference(random_heads(num_layers=1), tmp_path / "ref")
    edit_tensors(
        ref / "medusa_lm_head.safetensors",
        lambda s: s.__setitem__("1.1.weight", torch.randn(V - 2, H)),
    )
    with pytest.raises(MedusaCheckpointError) as e:
        load_heads(ref)
    msg = str(e.value)
    assert "'1.1.weight'" in msg and "medusa_lm_head.safetensors" in msg
    assert "expected shape [24, 8]" in msg and "found [22, 8]" in msg


def test_heads_that_disagree_on_hidden_size_name_the_tensor(tmp_path):
    ref = write_reference(random_heads(num_layers=1), tmp_path / "ref")
    edit_tensors(
        ref / "medusa_lm_head.safetensors",
        lambda s: s.__setitem__("2.0.linear.weight", torch.randn(H + 1, H + 1)),
    )
    with pytest.raises(
        MedusaCheckpointError, match=r"'2\.0\.linear\.weight'.*found \[9, 9\]"
    ):
        load_heads(ref)


def test_vllm_config_size_disagrees_with_tensors(tmp_path):
    d = save_heads(random_heads(), tmp_path / "v", layout="vllm")
    edit_json(d / "config.json", hidden_size=H * 2)
    with pytest.raises(
        MedusaCheckpointError,
        match=r"'blocks\.0\.layers\.0\.weight'.*expected shape \[16, 16\]",
    ):
        load_heads(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_tensor(tmp_path, bad):
    d = save_heads(random_heads(), tmp_path / "h")

    def poison(state):
        state["blocks.1.layers.0.bias"][3] = bad

    edit_tensors(d / "model.safetensors", poison)
    with pytest.raises(
        MedusaCheckpointError,
        match=r"'blocks\.1\.layers\.0\.bias' in .*model\.safetensors: 1 NaN/Inf",
    ):
        load_heads(d)


def test_missing_keys_are_listed(tmp_path):
    d = save_heads(random_heads(), tmp_path / "h")
    edit_tensors(d / "model.safetensors", lambda s: s.pop("blocks.2.layers.1.weight"))
    with pytest.raises(
        MedusaCheckpointError,
        match=r"missing tensor\(s\).*'blocks\.2\.layers\.1\.weight'",
    ):
        load_heads(d)


def test_unexpected_keys_strict_and_lenient(tmp_path):
    heads = random_heads()
    d = save_heads(heads, tmp_path / "h")
    edit_tensors(
        d / "model.safetensors", lambda s: s.__setitem__("extra.weight", torch.ones(2))
    )
    with pytest.raises(
        MedusaCheckpointError, match=r"unexpected tensor.*'extra\.weight'.*strict=False"
    ):
        load_heads(d)
    with pytest.warns(UserWarning, match="extra.weight"):
        loaded = load_heads(d, strict=False)
    assert_same_heads(heads, loaded)


def test_config_head_count_disagrees_with_tensors(tmp_path):
    ref = write_reference(random_heads(num_heads=4, num_layers=1), tmp_path / "ref")
    edit_json(ref / "config.json", medusa_num_heads=3)
    with pytest.raises(
        MedusaCheckpointError, match=r"unexpected tensor.*'3\.0\.linear\.weight'"
    ):
        load_heads(ref)
    edit_json(ref / "config.json", medusa_num_heads=5)
    with pytest.raises(
        MedusaCheckpointError, match=r"missing tensor.*'lm_heads\.4\.weight'"
    ):
        load_heads(ref)


def test_bad_token_map_in_checkpoint(tmp_path):
    heads = random_heads(truncated_vocab_size=5, original_lm_head=True)
    d = save_heads(heads, tmp_path / "h")

    def out_of_range(state):
        state["token_map"] = torch.tensor([0, 1, 2, 3, V + 5])

    edit_tensors(d / "model.safetensors", out_of_range)
    with pytest.raises(MedusaCheckpointError, match=r"'token_map' in .*max 29"):
        load_heads(d)


def test_pt_file_that_is_not_a_state_dict(tmp_path):
    ref = write_reference(random_heads(), tmp_path / "ref", fmt="pt")
    torch.save([torch.ones(2)], ref / "medusa_lm_head.pt")
    with pytest.raises(
        MedusaCheckpointError, match=r"medusa_lm_head\.pt: expected a flat state dict"
    ):
        load_heads(ref)


def test_refuses_to_overwrite_non_empty_destination(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    (dst / "medusa_lm_head.pt").write_bytes(b"stale")
    heads = random_heads()
    with pytest.raises(
        MedusaCheckpointError, match=r"not empty.*'notes\.txt'.*overwrite=True"
    ):
        save_heads(heads, dst)
    save_heads(heads, dst, overwrite=True)
    assert (dst / "notes.txt").read_text() == "keep me"
    assert not (dst / "medusa_lm_head.pt").exists()  # stale weights removed
    assert_same_heads(heads, load_heads(dst))
    with pytest.raises(MedusaCheckpointError, match="same directory"):
        convert(dst, dst, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedusaCheckpointError, match="not a directory"):
        save_heads(heads, tmp_path / "file")


def test_check_compatible():
    cfg = MedusaHeadsConfig(
        hidden_size=H, vocab_size=V, num_heads=2, base_model_name_or_path="tiny/llama"
    )
    check_compatible(cfg, H, V)
    with pytest.raises(
        MedusaCheckpointError,
        match=r"'tiny/llama'.*hidden_size 8 != backbone hidden_size 16.*vocab_size 24 != backbone vocab_size 32",
    ):
        check_compatible(cfg, 16, 32)
    with pytest.raises(
        MedusaCheckpointError,
        match=r"^my heads .*vocab_size 24 != backbone vocab_size 25$",
    ):
        check_compatible(
            MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2),
            H,
            25,
            source="my heads",
        )


# ------------------------------------------------ vLLM's own Medusa (slow)
_VLLM_SCRIPT = textwrap.dedent(
    """
    import glob, json, os, sys, types
    import torch
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.transformers_utils.configs.medusa import MedusaConfig
    from vllm.model_executor.models.medusa import Medusa
    from medusa_vllm.checkpoints import load_heads

    cases, port = json.loads(sys.argv[1]), sys.argv[2]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        report = {}
        for vllm_dir, ours_dir in cases:
            hf = MedusaConfig.from_pretrained(vllm_dir)
            draft = types.SimpleNamespace(hf_config=hf)
            vc = types.SimpleNamespace(
                speculative_config=types.SimpleNamespace(draft_model_config=draft))
            model = Medusa(vllm_config=vc)
            weights = {}
            for f in sorted(glob.glob(os.path.join(vllm_dir, "*.safetensors"))):
                weights.update(load_file(f))
            model.load_weights(weights.items())
            for mod in model.modules():
                qm = getattr(mod, "quant_method", None)
                if qm is not None and hasattr(qm, "process_weights_after_loading"):
                    qm.process_weights_after_loading(mod)
            ours = load_heads(ours_dir)
            x = torch.randn(4, hf.hidden_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                theirs = torch.stack(model.compute_logits(model(x)))
                mine = ours.full_logits(x)
            same_inf = bool(torch.equal(torch.isinf(theirs), torch.isinf(mine)))
            finite = torch.isfinite(mine)
            diff = float((theirs[finite] - mine[finite]).abs().max())
            report[vllm_dir] = {"shape_ok": theirs.shape == mine.shape,
                                "same_inf": same_inf, "max_abs_diff": diff,
                                "n_heads": len(model.blocks)}
    print("REPORT" + json.dumps(report))
    """
)


def test_expand_draft_vocab_keeps_the_heads_predictions(tmp_path):
    """Per-head draft-vocabulary LM layers expanded to the full vocabulary (what
    vLLM's built-in Medusa can load): draft columns keep their logits, the rest
    are 0, so the top-1 is the draft top-1 whenever that logit is positive."""
    heads = random_heads(seed=30, truncated_vocab_size=7).eval()
    full = expand_draft_vocab(heads).eval()
    assert full.config.truncated_vocab_size is None and full.token_map is None
    x = hidden(64, seed=31)
    with torch.no_grad():
        draft, wide = heads(x), full(x)
    assert wide.shape[-1] == V
    tm = heads.token_map
    torch.testing.assert_close(wide[..., tm], draft)
    others = torch.ones(V, dtype=torch.bool)
    others[tm] = False
    assert bool((wide[..., others] == 0).all())
    pos = draft.max(-1).values > 0  # [K, N]
    assert bool(pos.any())
    top_draft = heads.map_to_full(draft.argmax(-1))
    assert torch.equal(wide.argmax(-1)[pos], top_draft[pos])
    # round trip through the vLLM layout; the un-expanded heads are refused there
    out = save_heads(full, tmp_path / "vllm", layout="vllm")
    assert_same_heads(load_heads(out), full)
    with pytest.raises(MedusaCheckpointError, match="expand"):
        save_heads(heads, tmp_path / "bad", layout="vllm")
    with pytest.raises(MedusaCheckpointError, match="nothing to expand"):
        expand_draft_vocab(full)


@pytest.mark.slow
def test_vllm_builtin_medusa_loads_exports(tmp_path):
    """vLLM 0.32's own ``Medusa`` model loads our vLLM (and FasterDecoding)
    exports and computes the same logits as MedusaHeads, on CPU."""
    variants = {
        "per_head": random_heads(seed=20),
        "shared": random_heads(seed=21, original_lm_head=True),
        "shared_reduced": random_heads(
            seed=22, original_lm_head=True, truncated_vocab_size=7
        ),
        "no_bias_one_layer": random_heads(seed=23, num_layers=1, resblock_bias=False),
        # per-head reduced draft vocabulary: vLLM loads it only expanded
        "per_head_reduced_expanded": expand_draft_vocab(random_heads(seed=25, truncated_vocab_size=7)),
    }
    cases = []
    for name, heads in variants.items():
        ours = save_heads(heads, tmp_path / f"{name}-ours")
        cases.append(
            (
                str(save_heads(heads, tmp_path / f"{name}-vllm", layout="vllm")),
                str(ours),
            )
        )
    # FasterDecoding layout as written by save_heads: vLLM remaps its keys.
    ref = random_heads(seed=24)
    cases.append(
        (
            str(save_heads(ref, tmp_path / "ref-medusa", layout="medusa")),
            str(save_heads(ref, tmp_path / "ref-ours")),
        )
    )

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, json.dumps(cases), str(port)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parents[2],
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT") :])
    assert len(report) == len(cases)
    for vllm_dir, r in report.items():
        assert r["shape_ok"] and r["same_inf"], (vllm_dir, r)
        assert r["n_heads"] == 3, (vllm_dir, r)
        assert r["max_abs_diff"] < 1e-5, (vllm_dir, r)
