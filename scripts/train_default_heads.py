#!/usr/bin/env python
"""Reproducible recipe for the Medusa heads shipped with the default model.

Builds ``medusa_vllm/assets/default_heads/`` (heads + calibrated tree + accuracies)
for SmolLM2-135M-Instruct with the project's own pipeline, offline:

====== =====================================================================
stage  what it does (output in ``--work``, default ``runs/default_heads``)
====== =====================================================================
prompts  train / held-out prompt sets from the offline Debian texts
         (:func:`medusa_vllm.data.build_prompt_records`, disjoint splits)
distill  self-distillation data: the backbone answers the prompts with vLLM
         (greedy, a sampled set at temperature 0.7, and further greedy answers
         to the extra train prompts), float32, eager
train    Medusa-1 heads on the frozen backbone (hidden states cached on disk),
         evaluated on the held-out distilled answers
tree     optimized sparse tree from the heads' per-rank accuracies and a
         verification cost curve (``MedusaTree.best_for_cost``)
export   copy heads (bf16), ``medusa_tree.json``, ``accuracies.json`` and a
         README into the assets folder
cost     proposer cost (heads + top-k + tree build, the code path of
         ``MedusaTreeProposer.propose_tree``) vs a vanilla vLLM decode step
accept   mean accepted length through the vLLM engine on held-out prompts
medusa2  Medusa-2 (joint LoRA) comparison run from the Medusa-1 heads (this
         folder's, else the shipped ones), beside a Medusa-1 control trained as
         long on the same rows: held-out head accuracy, replayed accepted
         length, and the backbone's held-out perplexity before/after
====== =====================================================================

Every stage caches its output and is skipped when the output exists (delete the
file or folder, or pass ``--force STAGE``, to redo it); the training stages resume
from their last checkpoint. Run all stages::

    .venv/bin/python scripts/train_default_heads.py

or some of them::

    .venv/bin/python scripts/train_default_heads.py --stages prompts,distill
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("prompts", "distill", "train", "tree", "export", "cost", "accept", "medusa2")


@dataclass
class Recipe:
    """Every knob of the recipe (saved as ``recipe.json`` in the work folder)."""

    # data
    train_prompts: int = 2000  # greedy answers
    sampled_prompts: int = 400  # extra answers at temperature 0.7 (other prompts)
    sampled_temperature: float = 0.7
    # further greedy answers, to prompts drawn after the first sets, in files of
    # extra_chunk prompts. The drawing is sequential, so growing this by whole chunks
    # keeps every earlier file, its answers and their hidden-state cache rows valid.
    extra_train_prompts: int = 2000  # 0: session 5's 2,400 rows (top-1 0.421 vs 0.456)
    extra_chunk: int = 2000
    heldout_prompts: int = 256
    prompt_seed: int = 0
    max_tokens: int = 256
    max_model_len: int = 768
    # heads
    num_heads: int = 4
    num_layers: int = 2  # 1 ResBlock: head-0 top-1 0.412; 2: 0.421 (docs/default-heads.md)
    draft_vocab_size: int | None = 4096
    original_lm_head: bool = False
    # Medusa-1 optimisation
    seq_len: int = 640
    batch_size: int = 8
    epochs: float = 5.0  # of 4,400 rows: 2,750 steps
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lambda_decay: float = 0.8
    seed: int = 0
    # tree
    max_tree_nodes: int = 64
    # batch size -> tree sizes whose engine step time is measured
    cost_curves: dict = field(default_factory=lambda: {"1": [2, 4, 8, 16, 32, 64], "8": [2, 4, 8, 16]})
    # batch size -> top-1 chain depths timed beside them (chains verify through vLLM's
    # causal kernel, so they cost less than a tree of as many nodes)
    chain_cost_curves: dict = field(default_factory=lambda: {"1": [1, 2, 3, 4], "8": [1, 2]})
    cost_repeats: int = 2  # timing rounds per curve (medusa_vllm.calibrate.measure_cost_curve)
    # Medusa-2 comparison (smaller)
    m2_rows: int = 240
    m2_steps: int = 60
    m2_batch_size: int = 2
    m2_seq_len: int = 384
    m2_lr: float = 1e-4
    m2_lora_rank: int = 8
    m2_lambda0: float = 0.2
    m2_heads_lr_multiplier: float = 4.0
    # also train the same heads as long on the same rows with the backbone frozen
    # (Medusa-1, heads lr = m2_lr * m2_heads_lr_multiplier): what the joint training
    # adds beyond more heads training
    m2_control: bool = True
    # engine measurement
    accept_prompts: int = 32
    accept_max_tokens: int = 128
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def say(msg: str) -> None:
    print(f"[train_default_heads {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Work:
    """Paths of the work folder."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def prompts_train(self) -> Path:
        return self.root / "prompts-train.jsonl"

    @property
    def prompts_sampled(self) -> Path:
        return self.root / "prompts-sampled.jsonl"

    @property
    def prompts_heldout(self) -> Path:
        return self.root / "prompts-heldout.jsonl"

    def prompts_extra(self, i: int) -> Path:
        return self.root / f"prompts-train-extra-{i}.jsonl"

    @property
    def distill_train(self) -> Path:
        return self.root / "distill-train-greedy.jsonl"

    @property
    def distill_sampled(self) -> Path:
        return self.root / "distill-train-sampled.jsonl"

    def distill_extra(self, i: int) -> Path:
        return self.root / f"distill-train-extra-{i}-greedy.jsonl"

    @property
    def distill_heldout(self) -> Path:
        return self.root / "distill-heldout-greedy.jsonl"

    @property
    def medusa1(self) -> Path:
        return self.root / "medusa1"

    @property
    def medusa2(self) -> Path:
        return self.root / "medusa2"


def extra_chunks(r: Recipe) -> list[tuple[int, int]]:
    """(start, stop) of each extra prompt file, counted from the first extra prompt."""
    if r.extra_train_prompts and r.extra_chunk < 1:
        raise SystemExit(f"extra_chunk: expected >= 1, found {r.extra_chunk}")
    return [(a, min(a + r.extra_chunk, r.extra_train_prompts))
            for a in range(0, r.extra_train_prompts, max(r.extra_chunk, 1))]


# ----------------------------------------------------------------------------- stages
def stage_prompts(r: Recipe, w: Work, force: bool) -> None:
    """Train (greedy + sampled + extra) and held-out prompt sets, disjoint by
    construction; cached sets are checked against what the recipe draws now."""
    from medusa_vllm.data import build_prompt_records, write_prompts

    t0 = time.perf_counter()
    first = r.train_prompts + r.sampled_prompts
    train = build_prompt_records(first + r.extra_train_prompts, seed=r.prompt_seed, split="train")
    held = build_prompt_records(r.heldout_prompts, seed=r.prompt_seed, split="heldout")
    overlap = {p.text for p in train} & {p.text for p in held}
    if overlap:
        raise RuntimeError(f"{len(overlap)} held-out prompts also appear in the train prompts")
    sets = [(w.prompts_train, train[: r.train_prompts]), (w.prompts_sampled, train[r.train_prompts: first]),
            (w.prompts_heldout, held)]
    for i, (a, b) in enumerate(extra_chunks(r)):
        sets.append((w.prompts_extra(i), train[first + a: first + b]))
    written = 0
    for path, records in sets:
        if path.is_file() and not force:
            # a cached set must be what the recipe draws now (its answers are cached too)
            if [x["text"] for x in read_jsonl(path)] != [p.text for p in records]:
                raise RuntimeError(f"{path} differs from the prompts the recipe draws now; "
                                   f"pass --force prompts,distill to rebuild both")
            continue
        write_prompts(path, records)
        written += 1
    say(f"prompts: {len(train)} train, {len(held)} held-out ({written} of {len(sets)} sets written, "
        f"the others cached and checked) in {time.perf_counter() - t0:.0f} s")


def _generate(r: Recipe, model: Path, prompts: Path, out: Path, temperature: float, seed: int,
              force: bool, timings: dict) -> None:
    from medusa_vllm.training.distill import generate_distill_data

    if out.is_file() and not force:
        say(f"distill: {out.name} cached")
        return
    rows = read_jsonl(prompts)
    messages = [[{"role": "user", "content": row["text"]}] for row in rows]
    say(f"distill: {len(messages)} prompts -> {out.name} (temperature {temperature})")
    t0 = time.perf_counter()
    generate_distill_data(
        model, messages, out, temperature=temperature, max_tokens=r.max_tokens,
        max_model_len=r.max_model_len, seed=seed, dtype="float32", overwrite=True,
    )
    dt = time.perf_counter() - t0
    gen = read_jsonl(out)
    ntok = sum(len(g["response_token_ids"]) for g in gen)
    timings[out.name] = {
        "prompts": len(gen), "response_tokens": ntok, "seconds": round(dt, 1),
        "tokens_per_s": round(ntok / dt, 1),
        "finished_by_eos": sum(g["finish_reason"] == "stop" for g in gen),
    }
    say(f"distill: {out.name}: {ntok} tokens in {dt:.0f} s ({ntok / dt:.0f} tok/s incl. start-up)")


def stage_distill(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Self-distillation: the backbone's own answers (vLLM, float32, eager)."""
    tfile = w / "distill_timings.json"
    timings = json.loads(tfile.read_text()) if tfile.is_file() else {}
    _generate(r, model, w.prompts_heldout, w.distill_heldout, 0.0, r.seed, force, timings)
    write_json(tfile, timings)
    _generate(r, model, w.prompts_train, w.distill_train, 0.0, r.seed, force, timings)
    write_json(tfile, timings)
    if r.sampled_prompts:
        _generate(r, model, w.prompts_sampled, w.distill_sampled, r.sampled_temperature, r.seed + 1,
                  force, timings)
        write_json(tfile, timings)
    for i in range(len(extra_chunks(r))):
        _generate(r, model, w.prompts_extra(i), w.distill_extra(i), 0.0, r.seed, force, timings)
        write_json(tfile, timings)


def _count_rows(paths: list[Path]) -> int:
    return sum(len(read_jsonl(p)) for p in paths)


def train_files(r: Recipe, w: Work) -> list[Path]:
    """The self-distillation files the heads train on."""
    return ([w.distill_train] + ([w.distill_sampled] if r.sampled_prompts else [])
            + [w.distill_extra(i) for i in range(len(extra_chunks(r)))])


def stage_train(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Medusa-1: frozen backbone, hidden states cached on disk, held-out eval."""
    from medusa_vllm.training import TrainConfig, train
    from medusa_vllm.training.trainer import latest_checkpoint

    out = w.medusa1
    if (out / "train_summary.json").is_file() and not force:
        say("train: cached (medusa1/train_summary.json)")
        return
    files = train_files(r, w)
    steps = max(1, round(r.epochs * _count_rows(files) / r.batch_size))
    resume = not force and latest_checkpoint(out) is not None
    cfg = TrainConfig(
        model=str(model), output=str(out), data=[str(f) for f in files],
        eval_data=[str(w.distill_heldout)], max_eval_rows=r.heldout_prompts,
        recipe="medusa1", num_heads=r.num_heads, num_layers=r.num_layers,
        draft_vocab_size=r.draft_vocab_size, original_lm_head=r.original_lm_head,
        seq_len=r.seq_len, max_steps=steps, batch_size=r.batch_size, lr=r.lr,
        lr_warmup_steps=r.lr_warmup_steps, lambda_decay=r.lambda_decay, seed=r.seed,
        dtype="float32", cache_hidden="disk", cache_dtype="float32",
        save_steps=100, save_total_limit=1, log_steps=10,
        resume=resume, overwrite=not resume,
    )
    say(f"train: medusa1, {steps} steps of {r.batch_size} rows ({r.epochs} epochs)"
        + (" (resuming)" if resume else ""))
    res = train(cfg)
    say(f"train: {res.steps_per_second:.2f} steps/s\n{res.accuracy.table() if res.accuracy else ''}")


# ----------------------------------------------------------------------------- tree
def _curves_to_json(curves: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    """``{batch: {nodes: cost}}`` with string keys, as JSON stores them."""
    return {str(b): {str(n): c for n, c in cv.items()} for b, cv in curves.items()}


def _curves_from_json(saved: dict[str, dict[str, float]]) -> dict[int, dict[int, float]]:
    return {int(b): {int(n): c for n, c in cv.items()} for b, cv in saved.items()}


def stage_tree(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Optimized sparse tree: per-rank accuracies + measured cost curves -> the
    tree (``best_for_cost`` at batch 1) and its size per batch size."""
    from medusa_vllm.calibrate import (
        fit_nodes_by_batch, fit_tree, measure_cost_curves, monotone_curve, prefix_cost)
    from medusa_vllm.tree import MedusaTree
    from medusa_vllm.tree_stats import tree_from_ranks

    d = w / "tree"
    d.mkdir(exist_ok=True)
    if (d / "medusa_tree.json").is_file() and not force:
        say("tree: cached")
        return
    ev = json.loads((w.medusa1 / "eval.json").read_text())
    per_rank = ev["per_rank"]
    curve_file = d / "cost_curves.json"
    curves: dict[int, dict[int, float]] = {}
    chain_curves: dict[int, dict[int, float]] = {}
    if curve_file.is_file() and not force:
        saved = json.loads(curve_file.read_text())
        curves = _curves_from_json(saved["relative_step_time"])
        chain_curves = _curves_from_json(saved.get("chain_relative_step_time", {}))
    for bs, sizes in sorted((int(b), v) for b, v in r.cost_curves.items()):
        if bs in curves:
            continue
        depths = [d for d in r.chain_cost_curves.get(str(bs), []) if d <= r.num_heads]
        say(f"tree: cost curve at batch {bs}, tree sizes {sizes}, chain depths {depths}")
        curves[bs], chain_curves[bs] = measure_cost_curves(
            str(model), str(w.medusa1 / "heads"), sizes, depths, bs, num_prompts=max(8, bs),
            max_tokens=64, repeats=r.cost_repeats)
        write_json(curve_file, {
            "what": "engine step time with an n-node tree (or a top-1 chain of depth n) / vanilla "
                    "decode step time (vLLM, float32, eager, this machine; "
                    "medusa_vllm.calibrate.measure_cost_curves)",
            "relative_step_time": _curves_to_json(curves),
            "chain_relative_step_time": _curves_to_json(chain_curves),
        })
        say(f"tree: batch {bs}: " + ", ".join(f"{n}: {c:.2f}" for n, c in sorted(curves[bs].items()))
            + "; chains " + ", ".join(f"{n}: {c:.2f}" for n, c in sorted(chain_curves[bs].items())))
    tree, exp_len, speed = fit_tree(per_rank, curves[1], r.max_tree_nodes, chain_curves.get(1))
    nodes_by_batch = fit_nodes_by_batch(tree, per_rank, curves, chain_curves)
    ranks = heldout_ranks(r, w, model)

    def row(kind: str, t, c: float) -> dict:
        m = tree_measures(t, per_rank, ranks)
        return {"kind": kind, "nodes": t.num_nodes, **m, "relative_cost": c,
                "expected_speedup": m["expected_accept_length"] / c,
                "replayed_speedup": m["replayed_accept_length"] / c}

    rows = []
    for n in sorted({1, 2, 4, 8, 16, 32, 64, tree.num_nodes}):
        if n > r.max_tree_nodes:
            continue
        t = MedusaTree.from_accuracies(per_rank, n)
        rows.append(row("paper", t, prefix_cost(t, n, curves[1], chain_curves.get(1))))
        # the same size built from the joint (measured) path frequencies
        tj = tree_from_ranks(ranks, n, max_rank=len(per_rank[0]))
        rows.append(row("joint", tj, prefix_cost(tj, tj.num_nodes, curves[1], chain_curves.get(1))))
    for depth in sorted(chain_curves.get(1, {})):
        t = MedusaTree.chain(depth)
        rows.append(row("chain", t, monotone_curve(chain_curves[1])[depth]))
    chain = MedusaTree.chain(r.num_heads)
    info = {
        "source": "scripts/train_default_heads.py stage 'tree': medusa_vllm.calibrate.fit_tree / "
                  "fit_nodes_by_batch (per-rank held-out accuracies, measured cost curves)",
        "expected_accept_length": exp_len,
        "expected_speedup_vs_vanilla_forward": speed,
        f"chain_{r.num_heads}_expected_accept_length": chain.expected_accept_length(per_rank),
        "num_nodes": tree.num_nodes,
        "max_depth": tree.max_depth,
        "topk": tree.topk,
        "nodes_by_batch": {str(b): n for b, n in nodes_by_batch.items()},
        "per_rank_accuracy": per_rank,
        "cost_curves_relative": _curves_to_json(curves),
        "chain_cost_curves_relative": _curves_to_json(chain_curves),
        "candidates_batch_1": rows,
    }
    tree.save(d / "medusa_tree.json", **info)
    say(f"tree: {tree} expected accept length {exp_len:.3f}, expected speedup {speed:.2f}; "
        f"nodes by batch {nodes_by_batch}")
    say("  tree   nodes  E[len] paper / joint / replayed   cost  E[speedup] paper / replayed")
    for x in rows:
        say(f"  {x['kind']:6s} {x['nodes']:5d}  {x['expected_accept_length']:.3f} / "
            f"{x['joint_accept_length']:.3f} / {x['replayed_accept_length']:.3f}   "
            f"{x['relative_cost']:.2f}  {x['expected_speedup']:.2f} / {x['replayed_speedup']:.2f}")


# ----------------------------------------------------------------------------- export
def _hidden_eval(model: Path, heads_list: list, encode, max_rows: int = 10_000,
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


def _heldout_hidden_eval(model: Path, heads_list: list, eval_file: Path, seq_len: int,
                         num_heads: int, collect_ranks: bool = False) -> list:
    """:func:`_hidden_eval` on the held-out distilled answers."""
    from medusa_vllm.training.data import encode_file

    return _hidden_eval(model, heads_list, lambda tok, lm: encode_file(
        eval_file, tok, seq_len=seq_len, num_heads=num_heads, vocab_size=lm.config.vocab_size),
        collect_ranks=collect_ranks)


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def heldout_ranks(r: Recipe, w: Work, model: Path) -> list:
    """Target ranks of the trained heads at every held-out step-start position
    (``evaluate_heads(collect_ranks=True)``), cached next to the heads."""
    import torch

    from medusa_vllm.heads import MedusaHeads

    weights = w.medusa1 / "heads" / "model.safetensors"
    out = w.medusa1 / "heldout_ranks.pt"
    digest = _file_digest(weights)
    if out.is_file():
        saved = torch.load(out)
        if saved["heads_digest"] == digest:
            return saved["ranks"]
    say("ranks: target ranks of the heads on the held-out answers")
    heads = MedusaHeads.from_pretrained(w.medusa1 / "heads", dtype=torch.float32)
    (acc,) = _heldout_hidden_eval(model, [heads], w.distill_heldout, r.seq_len, r.num_heads,
                                  collect_ranks=True)
    ranks = [x.to(torch.int16) for x in acc.ranks]
    torch.save({"heads_digest": digest, "ranks": ranks}, out)
    return ranks


def tree_measures(tree, per_rank, ranks) -> dict:
    """A tree's accepted length three ways: the paper's independence model, the joint
    per-position frequency and the step-by-step replay (what the engine measures)."""
    from medusa_vllm.tree_stats import joint_accept_length, simulate_acceptance

    sim = simulate_acceptance(tree, ranks)
    return {"expected_accept_length": tree.expected_accept_length(per_rank),
            "joint_accept_length": joint_accept_length(tree, ranks),
            "replayed_accept_length": sim.mean_accepted_length,
            "replayed_acceptance_per_depth": sim.acceptance_per_depth}


def stage_export(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Heads (bf16) + medusa_tree.json + accuracies.json + README into the assets."""
    import torch

    from medusa_vllm.default_model import default_heads_dir
    from medusa_vllm.heads import MedusaHeads
    from medusa_vllm.tree import MedusaTree

    dst = default_heads_dir()
    src = w.medusa1 / "heads"
    fp32 = MedusaHeads.from_pretrained(src, dtype=torch.float32)
    fp32.config.base_model_name_or_path = "SmolLM2-135M-Instruct (medusa_vllm.default_model)"
    tmp = w / "export_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    fp32.save_pretrained(tmp, dtype=torch.bfloat16)
    bf16 = MedusaHeads.from_pretrained(tmp, dtype=torch.float32)
    # Same predictions? Compare on held-out hidden states (accuracy) and top-k agreement.
    acc_file = w / "export_check.json"
    if acc_file.is_file() and not force:
        check = json.loads(acc_file.read_text())
    else:
        say("export: checking the bf16 heads against the float32 ones on the held-out set")
        a32, a16 = _heldout_hidden_eval(model, [fp32, bf16], w.distill_heldout, r.seq_len,
                                        r.num_heads)
        g = torch.Generator().manual_seed(0)
        h = torch.randn(4096, fp32.config.hidden_size, generator=g) * 1.5
        with torch.no_grad():
            t32, t16 = fp32.topk(h, 10), bf16.topk(h, 10)
        check = {
            "float32_top1": a32.cumulative[:, 0].tolist(),
            "bfloat16_top1": a16.cumulative[:, 0].tolist(),
            "float32_top5": a32.cumulative[:, 4].tolist(),
            "bfloat16_top5": a16.cumulative[:, 4].tolist(),
            "max_abs_top1_diff": float((a32.cumulative - a16.cumulative).abs().max()),
            "random_hidden_top1_agreement": float((t32[..., 0] == t16[..., 0]).double().mean()),
        }
        write_json(acc_file, check)
    say(f"export: bf16 vs fp32 held-out accuracy max |diff| {check['max_abs_top1_diff']:.4f}")
    if check["max_abs_top1_diff"] > 0.005:
        raise RuntimeError(f"bf16 heads predict differently from fp32 ({check}); export float32")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tmp / name, dst / name)
    shutil.rmtree(tmp)
    ev = json.loads((w.medusa1 / "eval.json").read_text())
    write_json(dst / "accuracies.json", ev["topk_cumulative"])
    tree_info = json.loads((w / "tree" / "medusa_tree.json").read_text())
    MedusaTree.load(w / "tree" / "medusa_tree.json", r.num_heads)  # validates
    shutil.copyfile(w / "tree" / "medusa_tree.json", dst / "medusa_tree.json")
    (dst / "README.md").write_text(_readme(r, w, ev, tree_info, check))
    size = sum(f.stat().st_size for f in dst.iterdir())
    say(f"export: {dst} ({size / 1e6:.1f} MB)")


def _fmt_row(xs: list[float]) -> str:
    return " | ".join(f"{x:.3f}" for x in xs)


def _readme(r: Recipe, w: Work, ev: dict, tree: dict, check: dict) -> str:
    cum = ev["topk_cumulative"]
    summ = json.loads((w.medusa1 / "train_summary.json").read_text())
    timings = json.loads((w / "distill_timings.json").read_text())
    ntok = sum(t["response_tokens"] for k, t in timings.items() if "train" in k)
    lines = [
        "# Default Medusa heads for SmolLM2-135M-Instruct",
        "",
        "Shipped with medusa-vllm so that the default model runs Medusa tree decoding offline",
        "(`tree=\"auto\"` picks up `medusa_tree.json`). Built by `scripts/train_default_heads.py`;",
        "results and discussion in `docs/default-heads.md`.",
        "",
        "## Files",
        "",
        "- `config.json`, `model.safetensors`: medusa_vllm layout, bfloat16 "
        f"({r.num_heads} heads, {r.num_layers} ResBlock{'s' * (r.num_layers != 1)} each, "
        f"per-head LM layer over a "
        f"{r.draft_vocab_size}-token draft vocabulary `token_map`).",
        "- `medusa_tree.json`: the calibrated tree (`medusa_choices`) and how it was chosen.",
        "- `accuracies.json`: held-out cumulative top-1..10 accuracy per head "
        "(`acc[k][j]` = P(token at offset k+2 is in head k's top-(j+1))).",
        "",
        "## Recipe",
        "",
        "```",
        ".venv/bin/python scripts/train_default_heads.py   # all stages, cached in runs/default_heads",
        "```",
        "",
        f"1. Prompts from offline Debian texts (`medusa_vllm.data`, train split): {r.train_prompts} "
        f"answered greedily + {r.sampled_prompts} at temperature {r.sampled_temperature}"
        + (f" + {r.extra_train_prompts} more answered greedily" if r.extra_train_prompts else "")
        + "; "
        f"{r.heldout_prompts} held-out prompts (disjoint split) for evaluation.",
        f"2. Self-distillation with vLLM (float32, eager, max {r.max_tokens} new tokens): "
        f"{ntok} training response tokens.",
        f"3. Medusa-1 (frozen backbone, hidden states cached): {summ['steps']} steps x "
        f"{r.batch_size} rows ({r.epochs} epochs), AdamW lr {r.lr}, cosine, "
        f"head loss weights {r.lambda_decay}^k.",
        "4. Tree: `medusa_vllm.calibrate.fit_tree` (per-rank held-out accuracy, the engine's "
        f"measured step-time curve at batch 1, max {r.max_tree_nodes} nodes) and "
        "`fit_nodes_by_batch` (how many of its BFS-first nodes to draft at each batch size, "
        f"from the curves at batch sizes {sorted(int(b) for b in r.cost_curves)}); top-1 chains "
        "are timed on their own curve (they verify through vLLM's causal kernel) and compete.",
        "",
        "## Held-out accuracy (greedy answers to prompts the heads never saw)",
        "",
        "| head (offset) | top-1 | top-2 | top-3 | top-4 | top-5 |",
        "|---|---|---|---|---|---|",
    ]
    for k, row in enumerate(cum):
        lines.append(f"| {k} (+{k + 2}) | {_fmt_row(row[:5])} |")
    lines += [
        "",
        f"bfloat16 export vs float32: max |accuracy difference| {check['max_abs_top1_diff']:.4f}.",
        "",
        f"Tree: {tree['num_nodes']} nodes, depth {tree['max_depth']}, top-{tree['topk']}; "
        f"expected accepted length {tree['expected_accept_length']:.2f} tokens/step "
        f"(top-1 chain of {r.num_heads}: {tree[f'chain_{r.num_heads}_expected_accept_length']:.2f}); "
        f"nodes drafted per batch size: {tree['nodes_by_batch']}.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- engine
def _engine_worker(spec: dict) -> dict:
    """One vLLM engine run (in its own process): generation + spec-decode metrics, and
    optionally the in-process proposer cost next to the vanilla decode step."""
    from vllm import LLM, SamplingParams

    from medusa_vllm.metrics import spec_decode_summary

    kwargs = dict(model=spec["model"], dtype="float32", enforce_eager=True,
                  gpu_memory_utilization=0.3, max_model_len=spec.get("max_model_len", 1024),
                  max_num_seqs=spec.get("batch_size", 1), seed=0, disable_log_stats=False)
    if spec.get("speculative_config"):
        kwargs["speculative_config"] = spec["speculative_config"]
    llm = LLM(**kwargs)
    out: dict = {"name": spec["name"]}
    if spec.get("prompts"):
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in spec["prompts"]]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        before = spec_decode_summary(llm.get_metrics())
        sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=True)
        wall = time.perf_counter() - t0
        stats = spec_decode_summary(llm.get_metrics()) - before
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        out.update(wall_s=wall, output_tokens=ntok, tokens_per_s=ntok / wall, spec=stats.to_dict(),
                   token_ids=[list(o.outputs[0].token_ids) for o in outs])
    if spec.get("proposer_cost"):
        out["proposer_cost"] = _proposer_cost(llm, spec)
    return out


def _decode_step_seconds(llm, prompt_ids: list[int], n: int = 64) -> float:
    """Seconds per decode step at batch 1: (time for 1 + n tokens - time for 1) / n."""
    from vllm import SamplingParams

    def run(k: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt_ids}], sp, use_tqdm=False)
        return time.perf_counter() - t0

    return (run(1 + n) - run(1)) / n


def _proposer_cost(llm, spec: dict) -> dict:
    """Interleaved medians: vanilla decode step vs ``MedusaTreeProposer.propose_tree``
    (heads forward + top-k + tree node tokens) at batch 1, in the engine's process
    and threads (needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    import statistics
    import types

    import torch

    from medusa_vllm.checkpoints import load_backbone_lm_head
    from medusa_vllm.proposer import MedusaTreeProposer
    from medusa_vllm.tree import MedusaTree

    tree = MedusaTree.load(spec["tree_file"])
    lm_w = load_backbone_lm_head(spec["model"]).float()
    vcfg = types.SimpleNamespace(
        additional_config={"medusa": {"medusa_choices": tree.to_list(), "heads": spec["heads"]}},
        model_config=types.SimpleNamespace(dtype=torch.float32),
    )
    target = torch.nn.Module()
    target.lm_head = torch.nn.Linear(lm_w.shape[1], lm_w.shape[0], bias=False)
    target.lm_head.weight = torch.nn.Parameter(lm_w, requires_grad=False)
    proposer = MedusaTreeProposer(vcfg)
    proposer.load_model(target)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, lm_w.shape[1], generator=g)
    full_lm = target.lm_head

    def time_fn(fn, n: int = 200) -> float:
        for _ in range(10):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    prompt_ids = list(range(1000, 1300))
    steps, props, lms = [], [], []
    with torch.inference_mode():
        for _ in range(spec.get("rounds", 5)):
            steps.append(_decode_step_seconds(llm, prompt_ids))
            props.append(time_fn(lambda: proposer.propose_tree(hidden, [True])))
            lms.append(time_fn(lambda: torch.topk(full_lm(hidden), 10)))
    step, prop, lm = (statistics.median(x) for x in (steps, props, lms))
    return {
        "vanilla_decode_step_ms": step * 1e3,
        "proposer_ms": prop * 1e3,
        "proposer_fraction_of_step": prop / step,
        "full_vocab_lm_head_plus_top10_ms": lm * 1e3,
        "tree_nodes": tree.num_nodes,
        "rounds": {"decode_step_ms": [x * 1e3 for x in steps], "proposer_ms": [x * 1e3 for x in props]},
        "torch_threads": torch.get_num_threads(),
    }


def run_engine(spec: dict, log: Path) -> dict:
    """Run :func:`_engine_worker` in a fresh process; return its JSON result."""
    f = log.with_suffix(".spec.json")
    f.write_text(json.dumps(spec))
    from medusa_vllm.engine_env import engine_env

    env = {**engine_env(), "VLLM_CONFIGURE_LOGGING": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with open(log, "w") as lf:
        proc = subprocess.run([sys.executable, __file__, "--_engine-worker", str(f)], env=env,
                              stdout=subprocess.PIPE, stderr=lf, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"engine run {spec['name']} failed (exit {proc.returncode}); see {log}")


def stage_cost(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Proposer cost (heads + top-k + tree build) vs a vanilla decode step, batch 1."""
    from medusa_vllm.default_model import default_heads_dir

    out = w / "proposer_cost.json"
    if out.is_file() and not force:
        say("cost: cached")
        return
    heads = default_heads_dir()
    res = run_engine({"name": "proposer-cost", "model": str(model), "heads": str(heads),
                      "tree_file": str(heads / "medusa_tree.json"), "proposer_cost": True,
                      "max_model_len": 1024}, w / "cost.log")
    write_json(out, res["proposer_cost"])
    c = res["proposer_cost"]
    say(f"cost: vanilla decode step {c['vanilla_decode_step_ms']:.1f} ms, proposer "
        f"{c['proposer_ms']:.2f} ms = {100 * c['proposer_fraction_of_step']:.1f}% "
        f"(full-vocab lm_head + top-10 alone: {c['full_vocab_lm_head_plus_top10_ms']:.2f} ms)")


def accept_prompts(r: Recipe, w: Work) -> list[str]:
    """Held-out prompts for the engine measurement (seed 1234 as ``medusa-vllm bench``),
    minus any used for the accuracy evaluation."""
    from medusa_vllm.data import build_prompts

    seen = {row["text"] for row in read_jsonl(w.prompts_heldout)}
    cand = build_prompts(r.accept_prompts * 2, seed=1234, split="heldout")
    return [p for p in cand if p not in seen][: r.accept_prompts]


def stage_accept(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Mean accepted length through vLLM (greedy) on held-out prompts; same text as vanilla?"""
    from medusa_vllm.default_model import default_heads_dir

    out = w / "accept.json"
    results = json.loads(out.read_text()) if out.is_file() and not force else {}
    prompts = accept_prompts(r, w)
    heads = str(default_heads_dir())
    base = {"model": str(model), "prompts": prompts, "max_tokens": r.accept_max_tokens,
            "max_model_len": 1024, "batch_size": 1}
    from medusa_vllm.tree import MedusaTree
    from medusa_vllm.tree_stats import simulate_acceptance

    per_rank = json.loads((w.medusa1 / "eval.json").read_text())["per_rank"]
    big = MedusaTree.from_accuracies(per_rank, r.max_tree_nodes).to_list()
    configs = {
        "vanilla": None,
        # the calibrated tree: fastest on this machine
        "medusa_tree": {"method": "medusa_tree", "model": heads, "tree": "auto"},
        f"chain-{r.num_heads}": {"method": "medusa_tree", "model": heads, "tree": f"chain-{r.num_heads}"},
        # the heads' reach: the optimized sparse tree of max_tree_nodes nodes, whatever it costs
        f"tree-{r.max_tree_nodes}": {"method": "medusa_tree", "model": heads, "tree": big,
                                     "nodes_by_batch": "off"},
    }
    for name, sc in configs.items():
        if name in results:
            say(f"accept: {name} cached")
            continue
        say(f"accept: {name} on {len(prompts)} held-out prompts")
        res = run_engine({**base, "name": name, "speculative_config": sc}, w / f"accept-{name}.log")
        results[name] = res
        write_json(out, results)
    van = results["vanilla"]
    summary = {}
    for name, res in results.items():
        s = res.get("spec", {})
        summary[name] = {
            "tokens_per_s": res["tokens_per_s"],
            "speedup_vs_vanilla": res["tokens_per_s"] / van["tokens_per_s"],
            "mean_accepted_length": s.get("mean_accepted_length"),
            "acceptance_per_depth": s.get("acceptance_per_depth"),
            "tree_size": s.get("tree_size"),
            "same_output_as_vanilla": res["token_ids"] == van["token_ids"],
            "output_tokens": res["output_tokens"],
        }
        say(f"accept: {name}: {res['tokens_per_s']:.1f} tok/s, x{summary[name]['speedup_vs_vanilla']:.2f}, "
            f"accepted length {s.get('mean_accepted_length', 1.0):.3f}, same output "
            f"{summary[name]['same_output_as_vanilla']}")
    # the same greedy text replayed offline: do the engine's accepted lengths match
    # what the heads' teacher-forced ranks on exactly this text predict?
    ranks = accept_ranks(model, prompts, van["token_ids"])
    for name, tree in accept_trees(r, big).items():
        if name in summary:
            sim = simulate_acceptance(tree, ranks)
            summary[name]["replayed_accepted_length"] = sim.mean_accepted_length
            summary[name]["replayed_acceptance_per_depth"] = sim.acceptance_per_depth
            say(f"accept: {name}: replayed offline {sim.mean_accepted_length:.3f} "
                f"(engine {summary[name]['mean_accepted_length']:.3f})")
    write_json(w / "accept_summary.json", summary)


def accept_trees(r: Recipe, big: list) -> dict:
    """The trees the accept stage's configurations verify at batch 1."""
    from medusa_vllm.default_model import default_heads_dir
    from medusa_vllm.tree import MedusaTree, nodes_for_batch

    spec = json.loads((default_heads_dir() / "medusa_tree.json").read_text())
    shipped = MedusaTree(spec["medusa_choices"])
    table = {int(b): n for b, n in spec.get("nodes_by_batch", {}).items()} or None
    shipped = shipped.truncate(nodes_for_batch(table, 1, shipped.num_nodes))
    return {"medusa_tree": shipped, f"chain-{r.num_heads}": MedusaTree.chain(r.num_heads),
            f"tree-{r.max_tree_nodes}": MedusaTree(big)}


def accept_ranks(model: Path, prompts: list[str], outputs: list[list[int]]) -> list:
    """Target ranks of the shipped heads on the engine's own greedy outputs (the
    chat-templated prompts as vLLM tokenizes them, then the outputs)."""
    from transformers import AutoTokenizer

    from medusa_vllm.calibrate import measure_target_ranks
    from medusa_vllm.default_model import default_heads_dir

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)).input_ids for p in prompts]
    return measure_target_ranks(str(model), str(default_heads_dir()), ids, outputs)


# ----------------------------------------------------------------------------- medusa-2
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


def ppl_sets(r: Recipe, w: Work, model: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """Held-out perplexity sets: the backbone's own greedy answers (teacher forced) and
    plain held-out passages of the offline texts (human-written)."""
    from transformers import AutoTokenizer

    from medusa_vllm.data import build_prompt_records

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
    from medusa_vllm.default_model import default_heads_dir

    own = w.medusa1 / "heads"
    return own if (own / "model.safetensors").is_file() else Path(default_heads_dir())


def compare_heads(r: Recipe, w: Work, runs: dict[str, tuple[Path, Path]]) -> dict:
    """Held-out accuracy and replayed accepted length of each ``name: (backbone, heads)``
    on the held-out distilled answers, for the chains of 2 and 4 and the paper's trees of
    16 and 64 nodes (built from each run's own accuracies)."""
    import torch

    from medusa_vllm.heads import MedusaHeads
    from medusa_vllm.tree import MedusaTree

    # one backbone forward per distinct backbone, shared by the heads evaluated on it
    by_backbone: dict[Path, list[str]] = {}
    for name, (backbone, _) in runs.items():
        by_backbone.setdefault(backbone, []).append(name)
    accs = {}
    for backbone, names in by_backbone.items():
        heads = [MedusaHeads.from_pretrained(runs[n][1], dtype=torch.float32) for n in names]
        accs.update(zip(names, _heldout_hidden_eval(backbone, heads, w.distill_heldout, r.seq_len,
                                                    r.num_heads, collect_ranks=True)))
    out = {}
    for name, (backbone, heads_dir) in runs.items():
        acc = accs[name]
        per_rank = acc.per_rank.tolist()
        trees = {"chain-2": MedusaTree.chain(2), "chain-4": MedusaTree.chain(r.num_heads),
                 "paper-16": MedusaTree.from_accuracies(per_rank, 16),
                 "paper-64": MedusaTree.from_accuracies(per_rank, 64)}
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "default_heads"), help="work folder (caches)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES}")
    ap.add_argument("--force", default="", help="comma list of stages to redo even if cached")
    ap.add_argument("--recipe", default=None, help="JSON file overriding Recipe fields")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override Recipe fields (JSON values), e.g. --set epochs=2 num_heads=3")
    ap.add_argument("--_engine-worker", dest="engine_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_worker:
        print(json.dumps(_engine_worker(json.loads(Path(args.engine_worker).read_text()))))
        return 0

    r = Recipe()
    overrides = json.loads(Path(args.recipe).read_text()) if args.recipe else {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = json.loads(v)
    for k, v in overrides.items():
        if not hasattr(r, k):
            raise SystemExit(f"--set/--recipe: unknown Recipe field {k!r}; known: {sorted(asdict(r))}")
        setattr(r, k, v)
    w = Work(Path(args.work))
    write_json(w / "recipe.json", asdict(r))
    stages = [s for s in args.stages.split(",") if s]
    force = {s for s in args.force.split(",") if s}
    bad = [s for s in stages + sorted(force) if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages/--force: unknown stage(s) {bad}; expected some of {STAGES}")

    from medusa_vllm.default_model import default_model_dir

    model = default_model_dir()
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        if stage == "prompts":
            stage_prompts(r, w, stage in force)
        else:
            globals()[f"stage_{stage}"](r, w, model, stage in force)
        say(f"{stage}: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
