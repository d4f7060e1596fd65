"""The recipe's ``export`` stage: the trained heads in bfloat16 (checked to
predict as the float32 ones do), the calibrated ``medusa_tree.json``,
``accuracies.json`` and a README written from the recipe's results, into the
shipped assets folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medusa_vllm.checkpoints.common import TREE_FILE
from medusa_vllm.training.default_heads.evaluation import heldout_hidden_eval
from medusa_vllm.training.default_heads.recipe import Recipe, Work, say, write_json

__all__ = ["readme", "stage_export"]


def stage_export(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Heads (bf16) + medusa_tree.json + accuracies.json + README into the assets."""
    import torch

    from medusa_vllm.checkpoints import load_heads, save_heads
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.tools.default_model import default_medusa_heads_dir

    dst = default_medusa_heads_dir()
    src = w.medusa1 / "heads"
    fp32 = load_heads(src, dtype=torch.float32)
    fp32.config.base_model_name_or_path = "SmolLM2-135M-Instruct (medusa_vllm.tools.default_model)"
    tmp = w / "export_tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_heads(fp32, tmp, dtype=torch.bfloat16)
    bf16 = load_heads(tmp, dtype=torch.float32)
    # Same predictions? Compare on held-out hidden states (accuracy) and top-k agreement.
    acc_file = w / "export_check.json"
    if acc_file.is_file() and not force:
        check = json.loads(acc_file.read_text())
    else:
        say("export: checking the bf16 heads against the float32 ones on the held-out set")
        a32, a16 = heldout_hidden_eval(model, [fp32, bf16], w.distill_heldout, r.seq_len,
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
    tree_info = json.loads((w / "tree" / TREE_FILE).read_text())
    MedusaTree.load(w / "tree" / TREE_FILE, r.num_heads)  # validates
    shutil.copyfile(w / "tree" / TREE_FILE, dst / TREE_FILE)
    (dst / "README.md").write_text(readme(r, w, ev, tree_info, check))
    size = sum(f.stat().st_size for f in dst.iterdir())
    say(f"export: {dst} ({size / 1e6:.1f} MB)")


def _fmt_row(xs: list[float]) -> str:
    return " | ".join(f"{x:.3f}" for x in xs)


def readme(r: Recipe, w: Work, ev: dict, tree: dict, check: dict) -> str:
    """The shipped heads' README: files, recipe, held-out accuracy and the tree."""
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
        f"1. Prompts from offline Debian texts (`medusa_vllm.training.prompts`, train split): {r.train_prompts} "
        f"answered greedily + {r.sampled_prompts} at temperature {r.sampled_temperature}"
        + (f" + {r.extra_train_prompts} more answered greedily" if r.extra_train_prompts else "")
        + "; "
        f"{r.heldout_prompts} held-out prompts (disjoint split) for evaluation.",
        f"2. Self-distillation with vLLM (float32, eager, max {r.max_tokens} new tokens): "
        f"{ntok} training response tokens.",
        f"3. Medusa-1 (frozen backbone, hidden states cached): {summ['steps']} steps x "
        f"{r.batch_size} rows ({r.epochs} epochs), AdamW lr {r.lr}, cosine, "
        f"head loss weights {r.lambda_decay}^k.",
        "4. Tree: `medusa_vllm.core.tree_fit.fit_tree` (per-rank held-out accuracy, the engine's "
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
