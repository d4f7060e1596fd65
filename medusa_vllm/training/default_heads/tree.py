"""The recipe's ``tree`` stage: the optimized sparse tree from the heads'
held-out per-rank accuracies and this machine's measured verification cost
curves, its size per batch size, and a table of candidate trees (the paper's,
the joint-frequency one and top-1 chains) for the record."""

from __future__ import annotations

import json
from pathlib import Path

from medusa_vllm.checkpoints.common import TREE_FILE
from medusa_vllm.training.default_heads.evaluation import heldout_ranks, tree_measures
from medusa_vllm.training.default_heads.recipe import Recipe, Work, say, write_json

__all__ = ["stage_tree"]


def _curves_to_json(curves: dict[int, dict[int, float]]) -> dict[str, dict[str, float]]:
    """``{batch: {nodes: cost}}`` with string keys, as JSON stores them."""
    return {str(b): {str(n): c for n, c in cv.items()} for b, cv in curves.items()}


def _curves_from_json(saved: dict[str, dict[str, float]]) -> dict[int, dict[int, float]]:
    return {int(b): {int(n): c for n, c in cv.items()} for b, cv in saved.items()}


def _measure_curves(r: Recipe, w: Work, model: Path, d: Path, force: bool
                    ) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
    """Tree and chain cost curves per batch size, measured through vLLM (cached per
    batch size in ``tree/cost_curves.json``)."""
    from medusa_vllm.tools.calibrate import measure_cost_curves

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
        depths = [x for x in r.chain_cost_curves.get(str(bs), []) if x <= r.num_heads]
        say(f"tree: cost curve at batch {bs}, tree sizes {sizes}, chain depths {depths}")
        curves[bs], chain_curves[bs] = measure_cost_curves(
            str(model), str(w.medusa1 / "heads"), sizes, depths, bs, num_prompts=max(8, bs),
            max_tokens=64, repeats=r.cost_repeats)
        write_json(curve_file, {
            "what": "engine step time with an n-node tree (or a top-1 chain of depth n) / vanilla "
                    "decode step time (vLLM, float32, eager, this machine; "
                    "medusa_vllm.tools.calibrate.measure_cost_curves)",
            "relative_step_time": _curves_to_json(curves),
            "chain_relative_step_time": _curves_to_json(chain_curves),
        })
        say(f"tree: batch {bs}: " + ", ".join(f"{n}: {c:.2f}" for n, c in sorted(curves[bs].items()))
            + "; chains " + ", ".join(f"{n}: {c:.2f}" for n, c in sorted(chain_curves[bs].items())))
    return curves, chain_curves


def stage_tree(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Optimized sparse tree: per-rank accuracies + measured cost curves -> the
    tree (:func:`~medusa_vllm.core.tree_fit.fit_tree` at batch 1) and its size per batch size."""
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_fit import (
        expected_accept_length,
        fit_nodes_by_batch,
        fit_tree,
        monotone_curve,
        prefix_cost,
        tree_from_accuracies,
    )
    from medusa_vllm.core.tree_stats import tree_from_ranks

    d = w / "tree"
    d.mkdir(exist_ok=True)
    if (d / TREE_FILE).is_file() and not force:
        say("tree: cached")
        return
    ev = json.loads((w.medusa1 / "eval.json").read_text())
    per_rank = ev["per_rank"]
    curves, chain_curves = _measure_curves(r, w, model, d, force)
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
        t = tree_from_accuracies(per_rank, n)
        rows.append(row("paper", t, prefix_cost(t, n, curves[1], chain_curves.get(1))))
        # the same size built from the joint (measured) path frequencies
        tj = tree_from_ranks(ranks, n, max_rank=len(per_rank[0]))
        rows.append(row("joint", tj, prefix_cost(tj, tj.num_nodes, curves[1], chain_curves.get(1))))
    for depth in sorted(chain_curves.get(1, {})):
        t = MedusaTree.chain(depth)
        rows.append(row("chain", t, monotone_curve(chain_curves[1])[depth]))
    chain = MedusaTree.chain(r.num_heads)
    info = {
        "source": "scripts/train_default_heads.py stage 'tree': medusa_vllm.core.tree_fit.fit_tree / "
                  "fit_nodes_by_batch (per-rank held-out accuracies, measured cost curves)",
        "expected_accept_length": exp_len,
        "expected_speedup_vs_vanilla_forward": speed,
        f"chain_{r.num_heads}_expected_accept_length": expected_accept_length(per_rank, chain.to_list()),
        "num_nodes": tree.num_nodes,
        "max_depth": tree.max_depth,
        "topk": tree.topk,
        "nodes_by_batch": {str(b): n for b, n in nodes_by_batch.items()},
        "per_rank_accuracy": per_rank,
        "cost_curves_relative": _curves_to_json(curves),
        "chain_cost_curves_relative": _curves_to_json(chain_curves),
        "candidates_batch_1": rows,
    }
    tree.save(d / TREE_FILE, **info)
    say(f"tree: {tree} expected accept length {exp_len:.3f}, expected speedup {speed:.2f}; "
        f"nodes by batch {nodes_by_batch}")
    say("  tree   nodes  E[len] paper / joint / replayed   cost  E[speedup] paper / replayed")
    for x in rows:
        say(f"  {x['kind']:6s} {x['nodes']:5d}  {x['expected_accept_length']:.3f} / "
            f"{x['joint_accept_length']:.3f} / {x['replayed_accept_length']:.3f}   "
            f"{x['relative_cost']:.2f}  {x['expected_speedup']:.2f} / {x['replayed_speedup']:.2f}")
