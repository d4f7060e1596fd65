#!/usr/bin/env python
"""Ship a heads variant trained by ``scripts/compare_hydra.py`` as the default model's heads.

    .venv/bin/python scripts/ship_heads.py --compare runs/hydra_cmp/s14/compare.json \
        --variant medusa-ft --stats everyday --curve ~/.cache/medusa-vllm/cost_curves/KEY.json

Writes ``medusa_vllm/assets/default_heads/``:

* ``config.json`` + ``model.safetensors``: the variant's bfloat16 export
  (``WORK/VARIANT/heads-bf16``, scored by compare_hydra ``--bf16``);
* ``accuracies.json``: the bf16 heads' cumulative top-1..10 accuracy per head on the
  held-out set ``--stats``;
* ``medusa_tree.json``: ``per_rank_accuracy`` from the same set (what ``tree: "auto"``
  fits the tree from, with the cost curve the engine measures where it runs), the
  held-out acceptance of each set, and the fallback tree for ``cost_curve: "off"``,
  fitted on ``--curve`` (a cost curve the engine cached, ``medusa_vllm.core.cost_curve``);
* ``README.md``: what was shipped, from where, with the held-out figures.

The bf16 export must score within 0.005 top-1 of the float32 heads on every set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medusa_vllm.core.cost_curve import CostCurves


def _curves(path: Path) -> tuple[CostCurves, dict]:
    """A cost curve the engine cached (``medusa_vllm.core.cost_curve``) and its key."""
    data = json.loads(path.read_text())
    return CostCurves.from_dict(data["curves"]), data["key"]


def main(argv: list[str] | None = None) -> int:
    from medusa_vllm.checkpoints import TREE_FILE, load_heads
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_fit import expected_accept_length, fit_nodes_by_batch, fit_tree
    from medusa_vllm.tools.default_model import default_heads_dir

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", type=Path, required=True, help="compare_hydra's compare.json")
    ap.add_argument("--variant", required=True, help="e.g. medusa-ft, hydra, medusa")
    ap.add_argument("--stats", default="everyday", help="held-out set the shipped statistics "
                    "come from")
    ap.add_argument("--curve", type=Path, required=True,
                    help="a cached cost curve (for the cost_curve: off fallback tree)")
    ap.add_argument("--max-nodes", type=int, default=64)
    ap.add_argument("--dest", type=Path, default=None, help="default: the package's heads")
    args = ap.parse_args(argv)

    results = json.loads(args.compare.read_text())
    f32, b16 = results[args.variant], results[f"{args.variant}-bf16"]
    for name in f32:
        diff = max(abs(a - b) for a, b in zip(f32[name]["top1"], b16[name]["top1"]))
        if diff > 0.005:
            raise SystemExit(f"{args.variant}: bf16 top-1 differs by {diff:.4f} on {name}")
    stats = b16[args.stats]
    per_rank = stats["per_rank_accuracy"]
    src = args.compare.parent / args.variant / "heads-bf16"
    heads = load_heads(src)
    num_heads = heads.config.num_heads

    curves, key = _curves(args.curve)
    tree_curves = {b: row for b, row in curves.tree.items() if row}
    chain_curves = {b: row for b, row in curves.chain.items() if row}
    tree, exp_len, speed = fit_tree(per_rank, tree_curves[1], args.max_nodes, chain_curves.get(1))
    nodes_by_batch = fit_nodes_by_batch(tree, per_rank, tree_curves, chain_curves)
    nodes_by_batch[1] = tree.num_nodes
    dst = args.dest or default_heads_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src / name, dst / name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct (medusa_vllm.default_model)"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (dst / "accuracies.json").write_text(json.dumps(stats["topk_cumulative"], indent=1) + "\n")
    chain = MedusaTree.chain(num_heads)
    info = {
        "source": f"scripts/ship_heads.py: variant {args.variant!r} of {args.compare} "
                  f"(scripts/compare_hydra.py); per-rank accuracies of the bf16 heads on the "
                  f"held-out set {args.stats!r}; fallback tree fitted on the cost curve of "
                  f"{key['cpu_model']} ({key['isa']}, {key['dtype']}, {key['threads']} threads)",
        "expected_accept_length": exp_len,
        "expected_speedup_vs_vanilla_forward": speed,
        f"chain_{num_heads}_expected_accept_length":
            expected_accept_length(per_rank, chain.medusa_choices),
        "num_nodes": tree.num_nodes,
        "max_depth": tree.max_depth,
        "topk": tree.topk,
        "nodes_by_batch": {str(b): n for b, n in sorted(nodes_by_batch.items())},
        "per_rank_accuracy": per_rank,
        "heldout": {name: {k: v for k, v in x.items() if k in ("top1", "top5", "replayed",
                                                                 "positions")}
                    for name, x in b16.items()},
        "train_rows": results.get("train_rows"),
        "train_files": results.get("train_files"),
        "cost_curves_relative": CostCurves(tree=tree_curves).to_dict()["tree"],
        "chain_cost_curves_relative": CostCurves(chain=chain_curves).to_dict()["chain"],
        "cost_curve_key": key,
    }
    tree.save(dst / TREE_FILE, **info)
    MedusaTree.load(dst / TREE_FILE, num_heads)  # validates
    readme = [
        "# Default heads for SmolLM2-135M-Instruct",
        "",
        "Shipped with medusa-vllm so that the default model runs Medusa tree decoding offline",
        "(`tree=\"auto\"` fits the tree at engine start from `per_rank_accuracy` in",
        "`medusa_tree.json` and the cost curve the engine measures where it runs).",
        f"Built by `scripts/compare_hydra.py` (variant `{args.variant}`) and",
        "`scripts/ship_heads.py`; training rows: the committed self-distilled answers in",
        "`medusa_vllm/assets/distill/`. Results and discussion: `docs/default-heads.md`.",
        "",
        "## Files",
        "",
        (f"- `config.json`, `model.safetensors`: medusa_vllm layout, bfloat16, "
         f"{type(heads).__name__} ({num_heads} heads, {heads.config.num_layers} blocks each, "
         f"draft vocabulary {heads.config.truncated_vocab_size})."),
        "- `medusa_tree.json`: per-rank held-out accuracies, held-out figures per set, and",
        "  the fallback tree (`cost_curve: \"off\"`) with the curve it was fitted on.",
        f"- `accuracies.json`: cumulative top-1..10 accuracy per head on the `{args.stats}`",
        "  held-out set (`acc[k][j]` = P(token at offset k+2 is in head k's top-(j+1))).",
        "",
        "## Held-out figures (bf16 heads; replayed greedy accepted length per tree)",
        "",
        "| set | top-1 per head | top-5 per head | " + " | ".join(stats["replayed"]) + " |",
        "|---|---|---|" + "---|" * len(stats["replayed"]),
    ]
    for name, x in b16.items():
        readme.append(f"| {name} | {' / '.join(f'{v:.3f}' for v in x['top1'])} | "
                      f"{' / '.join(f'{v:.3f}' for v in x['top5'])} | "
                      + " | ".join(f"{v:.3f}" for v in x["replayed"].values()) + " |")
    readme += ["", (f"Fallback tree: {tree.medusa_choices} ({tree.num_nodes} nodes), "
                    f"nodes by batch {dict(sorted(nodes_by_batch.items()))}."), ""]
    (dst / "README.md").write_text("\n".join(readme))
    size = sum(p.stat().st_size for p in dst.iterdir())
    print(f"shipped {args.variant} to {dst} ({size / 1e6:.1f} MB); fallback tree "
          f"{tree.num_nodes} nodes, E[len] {exp_len:.3f}; nodes by batch {nodes_by_batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
