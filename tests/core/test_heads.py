"""Tests for medusa_vllm.core.heads: head math, vocab options, LM-layer init."""

from __future__ import annotations

import pytest
import torch

from medusa_vllm.core.heads import (
    MedusaHeads,
    MedusaHeadsConfig,
    strip_vocab_padding,
    token_map_from_counts,
    truncate_lm_head,
)


def randomize(heads: MedusaHeads, seed: int = 0) -> MedusaHeads:
    """Fill every parameter with non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return heads


def silu(v: torch.Tensor) -> torch.Tensor:
    return v * (1.0 / (1.0 + torch.exp(-v)))


# ------------------------------------------------------------------ head math
def test_forward_matches_hand_computation():
    cfg = MedusaHeadsConfig(hidden_size=3, vocab_size=5, num_heads=2, num_layers=2)
    heads = randomize(MedusaHeads(cfg, dtype=torch.float64), seed=1)
    x = torch.randn(4, 3, dtype=torch.float64)

    expected = []
    for k in range(2):
        h = x.clone()
        for j in range(2):
            W = heads.blocks[k].layers[j].weight
            b = heads.blocks[k].layers[j].bias
            pre = torch.einsum("bi,oi->bo", h, W) + b
            h = h + silu(pre)
        U = heads.lm_heads[k].weight
        expected.append(torch.einsum("bi,vi->bv", h, U))
    expected = torch.stack(expected)

    out = heads(x)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_forward_keeps_leading_dims_and_casts_input():
    cfg = MedusaHeadsConfig(hidden_size=4, vocab_size=7, num_heads=3)
    heads = randomize(MedusaHeads(cfg))
    x = torch.randn(2, 5, 4)
    out = heads(x)
    assert out.shape == (3, 2, 5, 7)
    flat = heads(x.reshape(10, 4)).reshape(3, 2, 5, 7)
    torch.testing.assert_close(out, flat)
    # A bf16 backbone hidden state is cast to the heads' dtype.
    out16 = heads(x.to(torch.bfloat16))
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, heads(x.to(torch.bfloat16).float()))


def test_no_bias_and_zero_layers():
    cfg = MedusaHeadsConfig(
        hidden_size=3, vocab_size=4, num_heads=2, num_layers=1, resblock_bias=False
    )
    heads = randomize(MedusaHeads(cfg), seed=2)
    assert heads.blocks[0].layers[0].bias is None
    x = torch.randn(2, 3)
    W, U = heads.blocks[1].layers[0].weight, heads.lm_heads[1].weight
    torch.testing.assert_close(heads(x)[1], (x + silu(x @ W.T)) @ U.T)

    cfg0 = MedusaHeadsConfig(hidden_size=3, vocab_size=4, num_heads=2, num_layers=0)
    heads0 = randomize(MedusaHeads(cfg0), seed=3)
    torch.testing.assert_close(heads0(x)[0], x @ heads0.lm_heads[0].weight.T)


def test_hidden_size_mismatch_is_reported():
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=4, vocab_size=6, num_heads=1))
    with pytest.raises(ValueError, match=r"hidden_size=4.*\[2, 5\]"):
        heads(torch.randn(2, 5))


# ------------------------------------------------------- init from backbone
@pytest.mark.parametrize("shared", [False, True])
def test_fresh_heads_reproduce_backbone_logits(shared):
    cfg = MedusaHeadsConfig(
        hidden_size=6, vocab_size=11, num_heads=3, num_layers=2, original_lm_head=shared
    )
    backbone_lm = torch.randn(11, 6)
    heads = MedusaHeads(cfg, lm_head_weight=backbone_lm)
    for block in heads.blocks:
        for layer in block.layers:
            assert torch.count_nonzero(layer.weight) == 0
            assert torch.count_nonzero(layer.bias) == 0
    x = torch.randn(5, 6)
    backbone_logits = x @ backbone_lm.T
    out = heads(x)
    for k in range(3):
        torch.testing.assert_close(out[k], backbone_logits)
    # Medusa-1 trains per-head LM layers; the shared one is the backbone's.
    assert heads.lm_layers[0].weight.requires_grad is (not shared)


def test_init_lm_head_copies_per_head():
    cfg = MedusaHeadsConfig(hidden_size=3, vocab_size=5, num_heads=2)
    w = torch.randn(5, 3)
    heads = MedusaHeads(cfg)
    heads.init_lm_head_from(w)
    assert heads.lm_heads[0].weight is not heads.lm_heads[1].weight
    with torch.no_grad():
        heads.lm_heads[0].weight.add_(1.0)
    torch.testing.assert_close(heads.lm_heads[1].weight, w)  # independent copies


def test_shared_lm_head_tie_shares_storage_and_freezes():
    cfg = MedusaHeadsConfig(hidden_size=4, vocab_size=9, num_heads=3, original_lm_head=True)
    backbone = torch.nn.Linear(4, 9, bias=False)
    heads = MedusaHeads(cfg)
    heads.init_lm_head_from(backbone.weight, tie=True)
    assert heads.lm_head.weight is backbone.weight
    assert len(list(heads.parameters())) == 3 * 2 + 1  # 3 blocks (w+b) + 1 shared LM
    assert not heads.lm_head.weight.requires_grad
    x = torch.randn(2, 4)
    before = heads(x)
    with torch.no_grad():
        backbone.weight.mul_(2.0)
    torch.testing.assert_close(heads(x), 2.0 * before)


def test_tie_refused_for_per_head_and_reduced_vocab():
    w = torch.randn(9, 4)
    per_head = MedusaHeads(MedusaHeadsConfig(hidden_size=4, vocab_size=9, num_heads=2))
    with pytest.raises(ValueError, match="original_lm_head=True"):
        per_head.init_lm_head_from(w, tie=True)
    cfg = MedusaHeadsConfig(
        hidden_size=4,
        vocab_size=9,
        num_heads=2,
        original_lm_head=True,
        truncated_vocab_size=3,
    )
    reduced = MedusaHeads(cfg, token_map=torch.tensor([4, 0, 8]))
    with pytest.raises(ValueError, match="full-vocabulary weight"):
        reduced.init_lm_head_from(w, tie=True)


def test_init_lm_head_rejects_wrong_shape():
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=4, vocab_size=9, num_heads=2))
    with pytest.raises(ValueError, match=r"\[9, 4\].*found \[8, 4\]"):
        heads.init_lm_head_from(torch.randn(8, 4))


# --------------------------------------------------------- reduced vocabulary
def test_token_map_from_counts_orders_by_frequency_then_id():
    counts = torch.tensor([5, 0, 9, 5, 1, 9])
    assert token_map_from_counts(counts, 4).tolist() == [2, 5, 0, 3]
    assert token_map_from_counts(counts, 6).dtype == torch.long
    with pytest.raises(ValueError, match=r"\[1, 6\], found 7"):
        token_map_from_counts(counts, 7)
    with pytest.raises(ValueError, match="1-D"):
        token_map_from_counts(counts.reshape(2, 3), 2)


def test_truncate_lm_head_selects_rows():
    w = torch.arange(12.0).reshape(6, 2)
    tm = torch.tensor([5, 1, 3])
    assert truncate_lm_head(w, tm).tolist() == [[10.0, 11.0], [2.0, 3.0], [6.0, 7.0]]


@pytest.mark.parametrize("shared", [False, True])
def test_reduced_vocab_logits_map_and_topk(shared):
    V, H, D = 13, 5, 6
    counts = torch.randint(0, 100, (V,), generator=torch.Generator().manual_seed(4))
    tm = token_map_from_counts(counts, D)
    cfg = MedusaHeadsConfig(
        hidden_size=H,
        vocab_size=V,
        num_heads=3,
        truncated_vocab_size=D,
        original_lm_head=shared,
    )
    backbone_lm = torch.randn(V, H)
    heads = MedusaHeads(cfg, token_map=tm, lm_head_weight=backbone_lm)
    assert heads.token_map.tolist() == tm.tolist()
    x = torch.randn(4, H)
    out = heads(x)
    assert out.shape == (3, 4, D)
    # Fresh heads: draft logits are the backbone's logits at the mapped ids.
    torch.testing.assert_close(out[1], (x @ backbone_lm.T)[:, tm])

    full = heads.full_logits(x)
    assert full.shape == (3, 4, V)
    outside = torch.ones(V, dtype=torch.bool)
    outside[tm] = False
    assert torch.isneginf(full[..., outside]).all()
    torch.testing.assert_close(full[..., tm], out)

    ids = heads.topk(x, 3)
    assert ids.shape == (4, 3, 3) and ids.dtype == torch.long
    expected = torch.topk(full, 3, dim=-1).indices.permute(1, 0, 2)
    assert torch.equal(ids, expected)
    assert torch.equal(
        heads.map_to_full(torch.tensor([[0, D - 1]])), tm[torch.tensor([[0, D - 1]])]
    )


def test_topk_full_vocab_and_bounds():
    cfg = MedusaHeadsConfig(hidden_size=4, vocab_size=10, num_heads=2)
    heads = randomize(MedusaHeads(cfg), seed=5)
    x = torch.randn(3, 4)
    ids = heads.topk(x, 4)
    assert ids.shape == (3, 2, 4)
    assert torch.equal(ids[:, 1], torch.topk(heads(x)[1], 4).indices)
    assert torch.equal(heads.map_to_full(ids), ids)
    with pytest.raises(ValueError, match=r"\[1, 10\].*11"):
        heads.topk(x, 11)


@pytest.mark.parametrize(
    ("token_map", "match"),
    [
        (None, "needs a token_map"),
        (torch.tensor([1, 2]), r"shape \[3\].*\[2\]"),
        (torch.tensor([1, 2, 9]), r"\[0, 9\).*max 9"),
        (torch.tensor([1, 2, -1]), "min -1"),
        (torch.tensor([1, 2, 2]), "appears more than once"),
        (torch.tensor([1.0, 2.0, 3.0]), "integer token ids"),
    ],
)
def test_token_map_validation(token_map, match):
    cfg = MedusaHeadsConfig(hidden_size=2, vocab_size=9, num_heads=1, truncated_vocab_size=3)
    with pytest.raises(ValueError, match=match):
        MedusaHeads(cfg, token_map=token_map)


def test_token_map_without_truncation_is_refused():
    cfg = MedusaHeadsConfig(hidden_size=2, vocab_size=9, num_heads=1)
    with pytest.raises(ValueError, match="truncated_vocab_size is None"):
        MedusaHeads(cfg, token_map=torch.tensor([0, 1]))


# --------------------------------------------------------------------- config
def test_config_round_trip_and_draft_vocab():
    cfg = MedusaHeadsConfig(
        hidden_size=8,
        vocab_size=100,
        num_heads=4,
        num_layers=2,
        truncated_vocab_size=30,
        original_lm_head=True,
        resblock_bias=False,
        base_model_name_or_path="tiny/llama",
    )
    again = MedusaHeadsConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.draft_vocab_size == 30
    assert (
        MedusaHeadsConfig(hidden_size=8, vocab_size=100, num_heads=1).draft_vocab_size == 100
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -3}, "vocab_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_layers": -1}, "num_layers"),
        ({"num_heads": 2.5}, "num_heads"),
        ({"num_heads": True}, "num_heads"),
        ({"truncated_vocab_size": 100}, "truncated_vocab_size"),
        ({"truncated_vocab_size": 0}, "truncated_vocab_size"),
        ({"original_lm_head": "yes"}, "original_lm_head"),
        ({"resblock_bias": 1}, "resblock_bias"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path"),
    ],
)
def test_config_validate_names_the_field(changes, field):
    data = {"hidden_size": 8, "vocab_size": 100, "num_heads": 2, **changes}
    with pytest.raises(ValueError, match=f"MedusaHeadsConfig.{field}"):
        MedusaHeadsConfig(**data).validate()
    with pytest.raises(ValueError, match=field):
        MedusaHeads(MedusaHeadsConfig(**data))


def test_config_from_dict_unknown_and_missing():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['medusa_num_heads'\]"):
        MedusaHeadsConfig.from_dict(
            {"hidden_size": 8, "vocab_size": 10, "num_heads": 1, "medusa_num_heads": 3}
        )
    with pytest.raises(
        ValueError, match=r"missing required field\(s\) \['num_heads'\]"
    ):
        MedusaHeadsConfig.from_dict({"hidden_size": 8, "vocab_size": 10})


def test_gradients_reach_trainable_parameters():
    cfg = MedusaHeadsConfig(hidden_size=4, vocab_size=6, num_heads=2)
    heads = MedusaHeads(cfg, lm_head_weight=torch.randn(6, 4))
    heads(torch.randn(3, 4)).sum().backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None, name


def test_vllm_padded_lm_head_weight_is_accepted():
    """vLLM's ParallelLMHead pads rows to a multiple of 64 (zeros)."""
    V, H = 70, 4
    real = torch.randn(V, H)
    padded = torch.cat([real, torch.zeros(128 - V, H)])
    assert strip_vocab_padding(padded, V).data_ptr() == padded.data_ptr()
    assert torch.equal(strip_vocab_padding(padded, V), real)
    assert strip_vocab_padding(torch.randn(100, H), V).shape[0] == 100  # not padding
    shared = MedusaHeads(
        MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2, original_lm_head=True)
    )
    shared.init_lm_head_from(padded, tie=True)
    assert shared.lm_head.weight.shape == (V, H)
    assert shared.lm_head.weight.data_ptr() == padded.data_ptr()
    per_head = MedusaHeads(MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=2))
    per_head.init_lm_head_from(padded)
    torch.testing.assert_close(per_head.lm_heads[1].weight, real)
    with pytest.raises(ValueError, match=r"\[70, 4\].*found \[100, 4\]"):
        per_head.init_lm_head_from(torch.randn(100, H))

