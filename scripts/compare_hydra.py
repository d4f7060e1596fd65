"""Medusa vs Hydra heads trained on the SAME self-distilled rows, scored on the same
held-out rows: per-head top-1/top-5 and greedy decoding replayed from the heads'
teacher-forced target ranks (:func:`medusa_vllm.core.tree_stats.simulate_acceptance`).

    .venv/bin/python scripts/compare_hydra.py --model MODEL --work runs/hydra_cmp \
        --data medusa_vllm/assets/distill/everyday-train-*.jsonl.xz \
               medusa_vllm/assets/distill/corpus-train-00*.jsonl.xz \
        --heldout-set everyday=medusa_vllm/assets/distill/everyday-heldout-*.jsonl.xz \
        --heldout-set corpus=medusa_vllm/assets/distill/corpus-heldout-*.jsonl.xz \
        --variants medusa,hydra,medusa-ft --reference medusa_vllm/assets/default_medusa_heads

``--data`` are the training files (JSON lines, optionally compressed: the committed
store's files as they are). Held-out rows come from ``--heldout-set NAME=FILE[,FILE..]``
(repeatable, each set scored on its own), or else the last ``--heldout`` rows of a single
``--data`` file. Every variant shares one hidden-state cache (Medusa-1, frozen
backbone) and the same steps per epoch: ``medusa`` and ``hydra`` from scratch,
``medusa-ft`` / ``hydra-ft`` continue ``--reference`` (the shipped heads of that type,
trained on other, larger data) for ``--ft-epochs`` at ``--ft-lr``. ``--reference`` heads are also scored on the
same held-out rows. Writes ``WORK/compare.json`` and prints a table.

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


def train_one(args, variant: str, train: list[Path], steps: int) -> Path:
    from medusa_vllm.training import TrainConfig
    from medusa_vllm.training.trainer import train as run

    out = args.work / variant.replace(":", "-v")
    if (out / "heads" / "config.json").is_file() and not args.retrain:
        return out / "heads"
    out.mkdir(parents=True, exist_ok=True)
    shared = args.work / "cache"
    shared.mkdir(exist_ok=True)
    if not (out / "cache").exists():
        os.symlink(shared.resolve(), out / "cache")
    kind, vocab = parse_variant(variant)
    fine_tune = kind.endswith("-ft")
    if fine_tune and args.reference is None:
        raise SystemExit(f"variant {kind} continues the --reference heads: pass --reference")
    cfg = TrainConfig(
        model=str(args.model), output=str(out), data=[str(p) for p in train],
        head_type="hydra" if kind.startswith("hydra") else "medusa", num_heads=4,
        num_layers=args.num_layers, draft_vocab_size=vocab,
        heads_init=str(args.reference) if fine_tune else None,
        seq_len=args.seq_len, batch_size=8, max_steps=steps,
        lr=args.ft_lr if fine_tune else args.lr, cache_hidden="disk",
        save_steps=0, log_steps=10, overwrite=True, eval_fraction=0.0, seed=0,
    )
    t0 = time.time()
    run(cfg)
    print(f"{variant}: trained {steps} steps in {time.time() - t0:.0f} s", flush=True)
    return out / "heads"


def parse_variant(variant: str) -> tuple[str, int]:
    """``hydra`` or ``hydra:8192``: the head type and its draft vocabulary (4,096 unless
    named)."""
    kind, _, vocab = variant.partition(":")
    if kind not in ("medusa", "hydra", "medusa-ft", "hydra-ft"):
        raise SystemExit(f"--variants: unknown variant {kind!r}; expected medusa, hydra, "
                         "medusa-ft or hydra-ft, optionally with :DRAFT_VOCAB (e.g. hydra:8192)")
    if vocab and not vocab.isdigit():
        raise SystemExit(f"--variants {variant!r}: the draft vocabulary after ':' must be a "
                         "number of tokens")
    return kind, int(vocab) if vocab else 4096


def heldout_batches(args, sets: dict[str, list[Path]]) -> dict[str, list]:
    """Each held-out set's batches and backbone hidden states, computed once for every
    heads set scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import collate, encode_file

    tok = AutoTokenizer.from_pretrained(str(args.model))
    lm = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[str, list] = {}
    with torch.inference_mode():
        for name, files in sets.items():
            out[name] = []
            for f in files:
                enc = encode_file(str(f), tok, seq_len=args.seq_len, num_heads=4,
                                  vocab_size=lm.config.vocab_size)
                for i in range(0, len(enc), 8):
                    b = collate(enc, range(i, min(len(enc), i + 8)), pad)
                    out[name].append((b, backbone_hidden(lm, b.input_ids, b.attention_mask)))
            print(f"held-out {name}: {sum(int(b.input_ids.numel()) for b, _ in out[name])} "
                  f"padded tokens in {len(out[name])} batches", flush=True)
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
           "top5": [round(float(c[4]), 4) for c in cum],
           "per_rank_accuracy": [[float(x) for x in r[:10]] for r in acc.per_rank.tolist()],
           "topk_cumulative": [[float(x) for x in c[:10]] for c in cum.tolist()],
           "replayed": {}}
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
    p.add_argument("--data", type=Path, nargs="+", default=None, help="training files")
    p.add_argument("--tiny", action="store_true", help="the A/B on the tests' tiny random Llama")
    p.add_argument("--tiny-steps", type=int, default=400)
    p.add_argument("--tiny-sequences", type=int, default=512)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--heldout-file", type=Path, default=None,
                   help="held-out rows in their own file (then --data is all training rows)")
    p.add_argument("--heldout-set", action="append", default=[],
                   help="NAME=FILE[,FILE...]: a held-out set scored on its own (repeatable)")
    p.add_argument("--variants", default="medusa,hydra",
                   help="comma-separated: medusa, hydra (from scratch), medusa-ft, hydra-ft "
                        "(continue --reference); ':N' sets a variant's draft vocabulary "
                        "(default 4096), e.g. hydra:8192")
    p.add_argument("--ft-epochs", type=float, default=2.0)
    p.add_argument("--bf16", action="store_true",
                   help="also score each variant saved in bfloat16 (as heads ship)")
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=768)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reference", type=Path, default=None)
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
    print_table(results)


def print_table(results: dict) -> None:
    names = [k for k in results if isinstance(results[k], dict) and k not in
             ("steps", "heldout_files")]
    for name in names:
        r = results[name]
        per_set = r if "top1" not in r else {"heldout": r}
        for set_name, x in per_set.items():
            print(f"{name:<10} {set_name:<9} top-1 {' '.join(f'{v:.3f}' for v in x['top1'])}"
                  f"  top-5 {' '.join(f'{v:.3f}' for v in x['top5'])}  replayed "
                  + " ".join(f"{k} {v:.3f}" for k, v in x["replayed"].items()))


def count_rows(path: Path) -> int:
    from medusa_vllm.training.data import read_file

    return len(read_file(path))


def real_ab(args) -> dict:
    if args.heldout_set:
        train = args.data
        sets = {}
        for spec in args.heldout_set:
            name, _, files = spec.partition("=")
            if not name or not files:
                raise SystemExit(f"--heldout-set {spec!r}: expected NAME=FILE[,FILE...]")
            sets[name] = [Path(f) for f in files.split(",")]
    elif args.heldout_file:
        train, sets = args.data, {"heldout": [args.heldout_file]}
    else:
        if len(args.data) != 1:
            raise SystemExit("with several --data files, name the held-out rows: --heldout-set")
        t, h = split(args.data[0], args.work, args.heldout)
        train, sets = [t], {"heldout": [h]}
    held_files = {p.resolve() for files in sets.values() for p in files}
    overlap = [str(p) for p in train if p.resolve() in held_files]
    if overlap:
        raise SystemExit(f"files both trained on and held out: {overlap}")
    kinds = {v: parse_variant(v)[0] for v in args.variants.split(",")}  # checked up front
    variants = list(kinds)
    n_train = sum(count_rows(p) for p in train)
    steps_per_epoch = n_train / 8
    steps = {v: max(1, round((args.ft_epochs if kind.endswith("-ft") else args.epochs)
                             * steps_per_epoch)) for v, kind in kinds.items()}
    results = {"train_rows": n_train, "train_files": [str(p) for p in train],
               "heldout_files": {k: [str(p) for p in v] for k, v in sets.items()},
               "steps": steps, "epochs": args.epochs, "ft_epochs": args.ft_epochs,
               "lr": args.lr, "ft_lr": args.ft_lr}
    trained = {v: train_one(args, v, train, steps[v]) for v in variants}
    batches = heldout_batches(args, sets)
    named = dict(trained)
    if args.reference:
        named["reference"] = args.reference
    if args.bf16:
        for v in variants:
            named[f"{v}-bf16"] = export_bf16(trained[v])
    for name, heads_dir in named.items():
        results[name] = {k: score(heads_dir, b) for k, b in batches.items()}
        print(name, json.dumps(results[name]), flush=True)
    return results


def export_bf16(heads_dir: Path) -> Path:
    """The heads as they would ship: saved in bfloat16 beside the float32 ones."""
    import torch

    from medusa_vllm.checkpoints import load_heads, save_heads

    out = heads_dir.parent / "heads-bf16"
    save_heads(load_heads(heads_dir, dtype=torch.float32), out, dtype=torch.bfloat16,
               overwrite=True)
    return out


if __name__ == "__main__":
    main()
