"""Held-out measurements the recipe's stages share: the heads' teacher-forced
accuracy and target ranks on the held-out distilled answers (one HF backbone
forward for several heads), a tree's accepted length three ways, and a
backbone's perplexity."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medusa_vllm.training.default_heads.recipe import Recipe, Work, say

__all__ = ["heldout_hidden_eval", "heldout_ranks", "hidden_eval", "perplexity", "tree_measures"]


def hidden_eval(model: Path, heads_list: list, encode: Callable[[Any, Any], Any], max_rows: int = 10_000,
                collect_ranks: bool = False) -> list:
    """Teacher-forced top-k accuracy (and, with ``collect_ranks``, every row's target
    ranks) of each heads in ``heads_list`` on the rows ``encode(tokenizer, lm)`` returns
    (an ``EncodedData``); one HF backbone forward, float32, shared by all of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import collate
    from medusa_vllm.training.evaluate import evaluate_heads

    tok = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    data = encode(tok, lm)
    n = min(len(data), max_rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [collate(data, list(range(s, min(s + 8, n))), pad) for s in range(0, n, 8)]
    with torch.inference_mode():
        hidden = {id(b): backbone_hidden(lm, b.input_ids, b.attention_mask) for b in batches}
    return [evaluate_heads(h, batches, lambda b: hidden[id(b)], lm_head=lm.get_output_embeddings(),
                           collect_ranks=collect_ranks)
            for h in heads_list]


def heldout_hidden_eval(model: Path, heads_list: list, eval_file: Path, seq_len: int,
                        num_heads: int, collect_ranks: bool = False) -> list:
    """:func:`hidden_eval` on the held-out distilled answers."""
    from medusa_vllm.training.data import encode_file

    return hidden_eval(model, heads_list, lambda tok, lm: encode_file(
        eval_file, tok, seq_len=seq_len, num_heads=num_heads, vocab_size=lm.config.vocab_size),
        collect_ranks=collect_ranks)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def heldout_ranks(r: Recipe, w: Work, model: Path) -> list:
    """Target ranks of the trained heads at every held-out step-start position
    (``evaluate_heads(collect_ranks=True)``), cached next to the heads."""
    import torch

    from medusa_vllm.checkpoints import load_heads

    weights = w.medusa1 / "heads" / "model.safetensors"
    out = w.medusa1 / "heldout_ranks.pt"
    digest = _file_digest(weights)
    if out.is_file():
        saved = torch.load(out)
        if saved["heads_digest"] == digest:
            return saved["ranks"]
    say("ranks: target ranks of the heads on the held-out answers")
    heads = load_heads(w.medusa1 / "heads", dtype=torch.float32)
    (acc,) = heldout_hidden_eval(model, [heads], w.distill_heldout, r.seq_len, r.num_heads,
                                 collect_ranks=True)
    ranks = [x.to(torch.int16) for x in acc.ranks]
    torch.save({"heads_digest": digest, "ranks": ranks}, out)
    return ranks


def tree_measures(tree, per_rank, ranks) -> dict:
    """A tree's accepted length three ways: the paper's independence model, the joint
    per-position frequency and the step-by-step replay (what the engine measures)."""
    from medusa_vllm.core.tree_fit import expected_accept_length
    from medusa_vllm.core.tree_stats import joint_accept_length, simulate_acceptance

    sim = simulate_acceptance(tree, ranks)
    return {"expected_accept_length": expected_accept_length(per_rank, tree.to_list()),
            "joint_accept_length": joint_accept_length(tree, ranks),
            "replayed_accept_length": sim.mean_accepted_length,
            "replayed_acceptance_per_depth": sim.acceptance_per_depth}


def perplexity(model_dir: Path, rows: list[tuple[list[int], list[int]]]) -> dict:
    """Token-level perplexity of ``model_dir`` on (context ids, scored ids) pairs."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ctx, tgt in rows:
            ids = torch.tensor([ctx + tgt])
            logits = lm(input_ids=ids).logits[0, len(ctx) - 1: -1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(tgt), reduction="sum"))
            n += len(tgt)
    return {"ppl": math.exp(nll / n), "tokens": n}
