#!/usr/bin/env python
"""Replayed accepted length of Medusa heads on committed store sets (offline).

For each set of the committed self-distillation store (default: ``everyday-heldout``
and ``corpus-heldout``), every row (prompt + the backbone's greedy answer) goes
through the HF backbone in float32; the heads' target ranks at every answer
position (``evaluate_heads(collect_ranks=True)``) then replay greedy Medusa decoding
step by step (:func:`medusa_vllm.core.tree_stats.simulate_acceptance`), which is what
the engine measures on the same text (docs/default-heads.md, 'Replay'). Trees: the
heads' shipped tree (``medusa_tree.json``), the paper's construction at 16 and 64
nodes from the shipped per-rank accuracies, and the top-1 chain of every head.
Prints and writes JSON: per set, per-head top-1/top-5, replayed accepted length per
tree, and for everyday sets the same per request kind::

    nice -n 19 .venv/bin/python scripts/replay_store_sets.py --out runs/replay.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=["everyday-heldout", "corpus-heldout"])
    ap.add_argument("--heads", default=str(REPO / "medusa_vllm" / "assets" / "default_heads"))
    ap.add_argument("--store", default=None, help="store folder (default: the package's)")
    ap.add_argument("--seq-len", type=int, default=640, help="prompt + answer tokens kept per row")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.checkpoints import load_heads
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_fit import tree_from_accuracies
    from medusa_vllm.core.tree_stats import simulate_acceptance
    from medusa_vllm.tools.default_model import default_model_dir
    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import EncodedData, collate
    from medusa_vllm.training.evaluate import evaluate_heads
    from medusa_vllm.training.losses import IGNORE_INDEX
    from medusa_vllm.training.store import STORE_DIR, DistillStore, Generator, file_sha256

    torch.set_num_threads(2)
    model = default_model_dir()
    store = DistillStore(args.store or STORE_DIR)
    store.check_backbone(Generator.for_backbone(model))
    heads_dir = Path(args.heads)
    info = json.loads((heads_dir / "medusa_tree.json").read_text())
    per_rank = info["per_rank_accuracy"]
    tok = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    heads = load_heads(str(heads_dir), dtype=torch.float32).eval()
    nh = heads.config.num_heads
    trees = {"shipped": MedusaTree(info["medusa_choices"]),
             "paper-16": tree_from_accuracies(per_rank, 16),
             "paper-64": tree_from_accuracies(per_rank, 64),
             f"chain-{nh}": MedusaTree.chain(nh)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    result = {"heads": str(heads_dir.relative_to(REPO) if heads_dir.is_relative_to(REPO) else heads_dir),
              "heads_sha256": file_sha256(heads_dir / "model.safetensors"),
              "trees": {k: t.num_nodes for k, t in trees.items()}, "sets": {}}
    for name in args.sets:
        t0 = time.perf_counter()
        rows = list(store.rows(name))
        if not rows:
            print(f"{name}: no committed rows, skipped", file=sys.stderr)
            continue
        ids, labels = [], []
        for r in rows:
            p, o = r["prompt_token_ids"], r["response_token_ids"]
            seq = (p + o)[: args.seq_len]
            ids.append(seq)
            labels.append(([IGNORE_INDEX] * len(p) + o)[: args.seq_len])
        data = EncodedData(ids, labels)
        batches = [collate(data, range(i, min(len(data), i + 8)), pad) for i in range(0, len(data), 8)]
        with torch.inference_mode():
            acc = evaluate_heads(heads, batches, lambda b: backbone_hidden(lm, b.input_ids, b.attention_mask),
                                 topk=10, collect_ranks=True)
        cum = acc.cumulative.tolist()

        def replay(ranks):
            return {k: round(simulate_acceptance(t, ranks).mean_accepted_length, 4) for k, t in trees.items()}

        entry = {"rows": len(rows), "answer_tokens": sum(len(r["response_token_ids"]) for r in rows),
                 "top1": [round(c[0], 4) for c in cum], "top5": [round(c[4], 4) for c in cum],
                 "replayed_accept_length": replay(acc.ranks), "seconds": round(time.perf_counter() - t0, 1)}
        kinds = sorted({r["meta"].get("kind") for r in rows if name.startswith("everyday")} - {None})
        if kinds:
            entry["by_kind"] = {k: {"rows": sum(r["meta"].get("kind") == k for r in rows),
                                    **replay([x for x, r in zip(acc.ranks, rows) if r["meta"].get("kind") == k])}
                                for k in kinds}
        result["sets"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
