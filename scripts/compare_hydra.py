"""Medusa vs Hydra heads trained on the SAME self-distilled rows, scored on the same
held-out rows: per-head top-1/top-5 and greedy decoding replayed from the heads'
teacher-forced target ranks (:func:`medusa_vllm.core.tree_stats.simulate_acceptance`).

    .venv/bin/python scripts/compare_hydra.py --model MODEL --data DISTILL.jsonl \
        --work runs/hydra_cmp [--heldout 100] [--epochs 4] [--reference HEADS]

``--data`` is one JSONL of generated answers (``medusa-vllm distill``); its last
``--heldout`` rows are held out (or pass ``--heldout-file``). Both runs share one hidden-state cache (Medusa-1,
frozen backbone). ``--reference`` heads (e.g. the shipped ones, trained on other,
larger data) are scored on the same held-out rows for context. Writes
``WORK/compare.json`` and prints a table.

``--tiny`` runs the same A/B on the tiny random Llama of the tests instead (seconds of
CPU per run, not minutes of backbone passes): both head types distilled by
:func:`medusa_vllm.tools.tiny_models.distill_tiny_heads` with the same seed, steps and
rows, scored on greedy continuations of other random prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

TREES = ("chain-2", "chain-4", "sparse-16", "sparse-64")


def split(data: Path, work: Path, heldout: int) -> tuple[Path, Path]:
    rows = [x for x in data.read_text().splitlines() if x.strip()]
    if heldout >= len(rows):
        raise SystemExit(f"{data}: {len(rows)} rows, cannot hold out {heldout}")
    train, held = work / "train.jsonl", work / "heldout.jsonl"
    train.write_text("\n".join(rows[:-heldout]) + "\n")
    held.write_text("\n".join(rows[-heldout:]) + "\n")
    return train, held


def train_one(args, head_type: str, train: Path, held: Path, steps: int) -> Path:
    from medusa_vllm.training import TrainConfig
    from medusa_vllm.training.trainer import train as run

    out = args.work / head_type
    if (out / "heads" / "config.json").is_file() and not args.retrain:
        return out / "heads"
    out.mkdir(parents=True, exist_ok=True)
    shared = args.work / "cache"
    shared.mkdir(exist_ok=True)
    if not (out / "cache").exists():
        os.symlink(shared.resolve(), out / "cache")
    cfg = TrainConfig(
        model=str(args.model), output=str(out), data=[str(train)],
        head_type=head_type, num_heads=4, num_layers=args.num_layers, draft_vocab_size=4096,
        seq_len=args.seq_len, batch_size=8, max_steps=steps, lr=args.lr, cache_hidden="disk",
        save_steps=0, log_steps=10, overwrite=True, eval_fraction=0.0, seed=0,
    )
    t0 = time.time()
    run(cfg)
    print(f"{head_type}: trained {steps} steps in {time.time() - t0:.0f} s", flush=True)
    return out / "heads"


def heldout_batches(args, held: Path):
    """The held-out rows' batches and backbone hidden states, computed once for every
    heads set scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import collate, encode_file

    tok = AutoTokenizer.from_pretrained(str(args.model))
    lm = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    enc = encode_file(str(held), tok, seq_len=args.seq_len, num_heads=4,
                      vocab_size=lm.config.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = []
    with torch.inference_mode():
        for i in range(0, len(enc), 8):
            b = collate(enc, range(i, min(len(enc), i + 8)), pad)
            out.append((b, backbone_hidden(lm, b.input_ids, b.attention_mask)))
    return out


def score(heads_dir: Path, batches) -> dict:
    import torch

    from medusa_vllm.checkpoints import load_heads
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_fit import tree_from_accuracies
    from medusa_vllm.core.tree_stats import simulate_acceptance
    from medusa_vllm.training.evaluate import evaluate_heads

    heads = load_heads(heads_dir, dtype=torch.float32).eval()
    hidden = {id(b): h for b, h in batches}
    with torch.inference_mode():
        acc = evaluate_heads(heads, [b for b, _ in batches], lambda b: hidden[id(b)],
                             collect_ranks=True)
    cum = acc.cumulative
    out = {"heads": str(heads_dir), "positions": acc.totals.tolist(),
           "top1": [round(float(c[0]), 4) for c in cum],
           "top5": [round(float(c[4]), 4) for c in cum], "replayed": {}}
    for spec in TREES:
        tree = MedusaTree.load(spec, heads.config.num_heads)
        out["replayed"][spec] = round(simulate_acceptance(tree, acc.ranks).mean_accepted_length, 4)
    fitted = tree_from_accuracies(acc.per_rank.tolist(), 64)
    out["replayed"]["fitted-64"] = round(simulate_acceptance(fitted, acc.ranks).mean_accepted_length, 4)
    return out


def tiny_ab(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads
    from medusa_vllm.training.data import EncodedData, collate
    from medusa_vllm.training.losses import IGNORE_INDEX

    model = args.work / "model"
    if not (model / "config.json").is_file():
        build_tiny_llama(model, vocab=512, hidden=64, layers=2, seed=0)
    results: dict = {"tiny": True, "steps": args.tiny_steps, "sequences": args.tiny_sequences}
    dirs = {}
    for t in ("medusa", "hydra"):
        dirs[t] = args.work / t
        if not (dirs[t] / "config.json").is_file() or args.retrain:
            t0 = time.time()
            distill_tiny_heads(model, dirs[t], num_heads=3, steps=args.tiny_steps,
                               num_sequences=args.tiny_sequences, seed=0, head_type=t)
            print(f"{t}: distilled in {time.time() - t0:.0f} s", flush=True)
    lm = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    g = torch.Generator().manual_seed(12345)
    prompts = torch.randint(3, 512, (128, 4), generator=g)
    with torch.no_grad():
        seqs = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=60,
                           do_sample=False, pad_token_id=2, eos_token_id=None)
    ids = seqs.tolist()
    labels = [[IGNORE_INDEX] * 4 + row[4:] for row in ids]
    data = EncodedData(ids, labels)
    batches = []
    with torch.no_grad():
        for i in range(0, len(ids), 32):
            b = collate(data, range(i, min(len(ids), i + 32)), 2)
            batches.append((b, lm.model(b.input_ids).last_hidden_state))
    global TREES
    TREES = ("chain-2", "chain-3", "sparse-16", "sparse-64")
    for t, d in dirs.items():
        results[t] = score(d, batches)
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="the A/B on the tests' tiny random Llama")
    p.add_argument("--tiny-steps", type=int, default=400)
    p.add_argument("--tiny-sequences", type=int, default=512)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--heldout-file", type=Path, default=None,
                   help="held-out rows in their own file (then --data is all training rows)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reference", type=Path, default=None)
    p.add_argument("--only", choices=("medusa", "hydra"), default=None)
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        results = tiny_ab(args)
    elif args.model is None or args.data is None:
        raise SystemExit("--model and --data are required (or pass --tiny)")
    else:
        results = real_ab(args)
    (args.work / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'heads':<10} {'top-1 per head':<30} {'top-5 per head':<30} replayed " + " ".join(
        results[next(k for k in ("medusa", "hydra") if k in results)]["replayed"]))
    for name in ("medusa", "hydra", "reference"):
        if name in results:
            r = results[name]
            print(f"{name:<10} {' '.join(f'{x:.3f}' for x in r['top1']):<30} "
                  f"{' '.join(f'{x:.3f}' for x in r['top5']):<30} "
                  + " ".join(f"{v:.3f}" for v in r["replayed"].values()))


def real_ab(args) -> dict:
    if args.heldout_file:
        train, held = args.data, args.heldout_file
        args.heldout = sum(1 for x in held.read_text().splitlines() if x.strip())
    else:
        train, held = split(args.data, args.work, args.heldout)
    n_train = sum(1 for x in train.read_text().splitlines() if x.strip())
    steps = max(1, round(args.epochs * n_train / 8))
    results = {"train_rows": n_train, "heldout_rows": args.heldout, "steps": steps,
               "epochs": args.epochs}
    trained = {t: train_one(args, t, train, held, steps) for t in ("medusa", "hydra")
               if not args.only or t == args.only}
    batches = heldout_batches(args, held)
    for head_type, heads_dir in trained.items():
        results[head_type] = score(heads_dir, batches)
        print(json.dumps(results[head_type]), flush=True)
    if args.reference:
        results["reference"] = score(args.reference, batches)
    return results


if __name__ == "__main__":
    main()
