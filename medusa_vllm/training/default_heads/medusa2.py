"""The recipe's ``medusa2`` stage: Medusa-2 (joint LoRA + heads, continuing the
Medusa-1 heads, self-distilled) beside a Medusa-1 control trained as long on the
same rows; held-out head accuracy, replayed accepted length and the backbone's
held-out perplexity before and after."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from medusa_vllm.training.default_heads.evaluation import (
    heldout_hidden_eval,
    perplexity,
    tree_measures,
)
from medusa_vllm.training.default_heads.recipe import Recipe, Work, read_jsonl, say, write_json

__all__ = ["compare_heads", "m1_heads_dir", "ppl_sets", "stage_medusa2"]


def ppl_sets(r: Recipe, w: Work, model: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Held-out perplexity sets: the backbone's own greedy answers (teacher forced) and
    plain held-out passages of the offline texts (human-written)."""
    from transformers import AutoTokenizer

    from medusa_vllm.training.prompts import build_prompt_records

    tok = AutoTokenizer.from_pretrained(str(model))
    answers = [(row["prompt_token_ids"], row["response_token_ids"])
               for row in read_jsonl(w.distill_heldout)[:128] if len(row["response_token_ids"]) > 4]
    texts = []
    for rec in build_prompt_records(128, seed=99, split="heldout"):
        body = rec.text.split("\n\n", 1)[-1]
        ids = tok(body, add_special_tokens=False)["input_ids"][:256]
        if len(ids) > 8:
            texts.append(([tok.eos_token_id] + ids[:1], ids[1:]))
    return {"heldout_distilled_answers": answers, "heldout_passages": texts}


def m1_heads_dir(w: Work) -> Path:
    """The Medusa-1 heads Medusa-2 starts from: this work folder's, else the shipped ones."""
    from medusa_vllm.tools.default_model import default_medusa_heads_dir

    own = w.medusa1 / "heads"
    return own if (own / "model.safetensors").is_file() else Path(default_medusa_heads_dir())


def compare_heads(r: Recipe, w: Work, runs: dict[str, tuple[Path, Path]]) -> dict:
    """Held-out accuracy and replayed accepted length of each ``name: (backbone, heads)``
    on the held-out distilled answers, for the chains of 2 and 4 and the paper's trees of
    16 and 64 nodes (built from each run's own accuracies)."""
    import torch

    from medusa_vllm.checkpoints import load_heads
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_fit import tree_from_accuracies

    # one backbone forward per distinct backbone, shared by the heads evaluated on it
    by_backbone: dict[Path, list[str]] = {}
    for name, (backbone, _) in runs.items():
        by_backbone.setdefault(backbone, []).append(name)
    accs = {}
    for backbone, names in by_backbone.items():
        heads = [load_heads(runs[n][1], dtype=torch.float32) for n in names]
        accs.update(zip(names, heldout_hidden_eval(backbone, heads, w.distill_heldout, r.seq_len,
                                                   r.num_heads, collect_ranks=True)))
    out = {}
    for name, (backbone, heads_dir) in runs.items():
        acc = accs[name]
        per_rank = acc.per_rank.tolist()
        trees = {"chain-2": MedusaTree.chain(2), "chain-4": MedusaTree.chain(r.num_heads),
                 "paper-16": tree_from_accuracies(per_rank, 16),
                 "paper-64": tree_from_accuracies(per_rank, 64)}
        out[name] = {"backbone": str(backbone), "heads": str(heads_dir), **acc.to_dict(),
                     "trees": {k: tree_measures(t, per_rank, acc.ranks) for k, t in trees.items()}}
        say(f"medusa2: {name}: top-1 " + " / ".join(f"{x[0]:.3f}" for x in acc.cumulative.tolist())
            + "; replayed " + ", ".join(f"{k} {v['replayed_accept_length']:.3f}"
                                        for k, v in out[name]["trees"].items()))
    return out


def stage_medusa2(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Medusa-2 comparison: joint LoRA + heads (continuing the Medusa-1 heads) with
    self-distillation (KL to the adapter-free backbone); held-out accuracy, replayed
    accepted length and the backbone's perplexity, before and after."""
    from medusa_vllm.training import TrainConfig, train
    from medusa_vllm.training.trainer import latest_checkpoint

    out = w.medusa2
    data = w / "medusa2-train.jsonl"
    rows = read_jsonl(w.distill_train)[: r.m2_rows]
    if not data.is_file() or len(read_jsonl(data)) != len(rows):
        data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    start = m1_heads_dir(w)
    # what the Medusa-2 run and its Medusa-1 control share
    common = dict(
        model=str(model), data=[str(data)], eval_data=[str(w.distill_heldout)],
        max_eval_rows=r.heldout_prompts, num_heads=r.num_heads, num_layers=r.num_layers,
        draft_vocab_size=r.draft_vocab_size, original_lm_head=r.original_lm_head,
        heads_init=str(start), seq_len=r.m2_seq_len, max_steps=r.m2_steps,
        batch_size=r.m2_batch_size, lr_warmup_steps=10, lambda_decay=r.lambda_decay, seed=r.seed,
        dtype="float32", save_total_limit=1,
    )
    if not (out / "train_summary.json").is_file() or force:
        resume = not force and latest_checkpoint(out) is not None
        cfg = TrainConfig(
            **common, output=str(out), recipe="medusa2", self_distill=True, lr=r.m2_lr,
            lambda0=r.m2_lambda0, lora_rank=r.m2_lora_rank, lora_alpha=2.0 * r.m2_lora_rank,
            heads_lr_multiplier=r.m2_heads_lr_multiplier, save_steps=25, resume=resume,
            overwrite=not resume,
        )
        say(f"medusa2: {r.m2_steps} steps of {r.m2_batch_size} rows from {len(rows)}, heads from "
            f"{start}" + (" (resuming)" if resume else ""))
        train(cfg)
    control = w / "medusa2-control"
    if r.m2_control and (not (control / "train_summary.json").is_file() or force):
        ccfg = TrainConfig(
            **common, output=str(control), recipe="medusa1",
            lr=r.m2_lr * r.m2_heads_lr_multiplier, cache_hidden="memory", save_steps=10_000,
            overwrite=True,
        )
        say(f"medusa2: control, Medusa-1 on the same rows and steps (heads lr {ccfg.heads_lr:g})")
        train(ccfg)
    res_file = w / "medusa2_compare.json"
    if res_file.is_file() and not force:
        say("medusa2: comparison cached")
        return
    cmp: dict = {"recipe": {k: v for k, v in asdict(r).items() if k.startswith("m2_")},
                 "heads_init": str(start), "perplexity": {}}
    for name, ppl_rows in ppl_sets(r, w, model).items():
        before = perplexity(model, ppl_rows)
        after = perplexity(out / "model", ppl_rows)
        cmp["perplexity"][name] = {"before": before["ppl"], "after_medusa2": after["ppl"],
                                   "tokens": before["tokens"]}
        say(f"medusa2: perplexity on {name}: {before['ppl']:.3f} -> {after['ppl']:.3f}")
    # Accepted length is replayed on the original backbone's greedy answers for both:
    # Medusa-2's merged backbone agrees with them at `backbone_topk_cumulative[0]`.
    runs = {"medusa1": (model, start), "medusa2": (out / "model", out / "heads")}
    if r.m2_control:
        runs["medusa1_control"] = (model, control / "heads")
    cmp["heads"] = compare_heads(r, w, runs)
    write_json(res_file, cmp)
