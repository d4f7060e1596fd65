"""``medusa-vllm calibrate``: the paper's optimized sparse tree, sized to this machine.

1. Accuracy: per-head top-k accuracies of the heads on held-out data
   (teacher-forced; :func:`medusa_vllm.training.evaluate.evaluate_heads`), saved
   as ``per_rank_accuracy`` in ``medusa_tree.json``: the statistics with which
   every engine started with ``tree: "auto"`` fits its own tree to its own machine
   (:mod:`medusa_vllm.engine.cost_curve`).
2. Cost (``--cost engine``, the default): one engine start with ``tree: "auto"``
   and ``MEDUSA_VLLM_COST_CURVE=remeasure`` times its own steps (seconds, see
   :mod:`medusa_vllm.engine.cost_curve`) and fits the tree
   (:func:`~medusa_vllm.core.tree_fit.fit_engine_tree`); calibrate saves that tree as
   the fallback for engines that cannot fit (``cost_curve="off"``). ``--cost e2e``:
   the older, slower end-to-end measurement below.
2'. Cost (``--cost e2e``): the verification cost curve *through vLLM* on this machine — engine
   step time with a tree of n nodes relative to a vanilla decode step, at the
   batch sizes that matter (:mod:`medusa_vllm.tools.bench` runs each size in a fresh
   engine).
3. Fit (:mod:`medusa_vllm.core.tree_fit`): for every size the greedy tree of
   :func:`~medusa_vllm.core.tree_fit.tree_from_accuracies` maximises E[accepted
   length]; :func:`~medusa_vllm.core.tree_fit.best_tree_for_cost` picks the size
   maximising E[tokens per step] / cost(n) (cost linearly interpolated between
   measured sizes) at the first batch size. Top-1 chains are timed on their own
   curve and compete with it: a chain verifies through vLLM's causal kernel
   (:mod:`medusa_vllm.engine.cpu.attention`), so it costs less than a wider tree of as
   many nodes. For every calibrated batch size,
   :func:`fit_nodes_by_batch` then picks how many of that tree's BFS-first
   nodes to draft (0 = plain decoding), which the engine follows step by step
   (``nodes_by_batch`` in ``medusa_tree.json``).

Writes into the heads folder: ``medusa_tree.json`` (``per_rank_accuracy`` for
``tree: "auto"``, and the tree and table fitted here as its fallback),
``calibration.json`` (accuracies, curves, the chosen tree's expected accepted length
and speedup per batch size) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medusa_vllm.checkpoints.common import TREE_FILE
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import fit_nodes_by_batch, fit_tree

__all__ = [
    "add_calibrate_args",
    "calibrate_main",
    "measure_accuracies",
    "measure_cost_curve",
    "measure_cost_curves",
    "measure_startup_fit",
    "measure_target_ranks",
    "startup_fit_probe",
]


def measure_accuracies(model: str, heads_dir: str, data: Sequence[str], *, max_rows: int = 256,
                       seq_len: int = 512, batch_size: int = 8, topk: int = 10,
                       collect_ranks: bool = False):
    """Teacher-forced per-head top-k accuracy on ``data`` (JSONL / text files), and
    with ``collect_ranks`` the target ranks of :mod:`medusa_vllm.core.tree_stats`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.checkpoints import load_heads
    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import EncodedData, collate, encode_file
    from medusa_vllm.training.evaluate import evaluate_heads

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    heads = load_heads(heads_dir, lm_head_weight=lm.get_output_embeddings().weight)
    heads = heads.to(torch.float32).eval()
    enc = EncodedData()
    for path in data:
        enc.extend(encode_file(path, tok, seq_len=seq_len, num_heads=heads.config.num_heads,
                               vocab_size=lm.config.vocab_size))
    n = min(max_rows, len(enc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate(enc, range(i, min(n, i + batch_size)), pad) for i in range(0, n, batch_size)]
    return evaluate_heads(
        heads, batches, lambda b: backbone_hidden(lm, b.input_ids, b.attention_mask), topk=topk,
        lm_head=lm.get_output_embeddings(), collect_ranks=collect_ranks,
    )


def measure_target_ranks(model: str, heads_dir: str, prompt_ids: Sequence[Sequence[int]],
                         output_ids: Sequence[Sequence[int]], *, topk: int = 10,
                         batch_size: int = 8) -> list[torch.Tensor]:
    """The heads' target ranks (:mod:`medusa_vllm.core.tree_stats`) on given greedy outputs.

    Each row is ``prompt_ids[i] + output_ids[i]`` teacher-forced through the HF
    backbone (float32); the output tokens are scored. On an engine's own greedy
    outputs, :func:`medusa_vllm.core.tree_stats.simulate_acceptance` then replays what
    the engine should have accepted with any tree.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_vllm.checkpoints import load_heads
    from medusa_vllm.training.cache import backbone_hidden
    from medusa_vllm.training.data import EncodedData, collate
    from medusa_vllm.training.evaluate import evaluate_heads
    from medusa_vllm.training.losses import IGNORE_INDEX

    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(output_ids)} outputs: pass one output per prompt")
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    heads = load_heads(heads_dir, dtype=torch.float32).eval()
    data = EncodedData([list(p) + list(o) for p, o in zip(prompt_ids, output_ids)],
                       [[IGNORE_INDEX] * len(p) + list(o) for p, o in zip(prompt_ids, output_ids)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate(data, range(i, min(len(data), i + batch_size)), pad)
               for i in range(0, len(data), batch_size)]
    with torch.inference_mode():
        acc = evaluate_heads(heads, batches, lambda b: backbone_hidden(lm, b.input_ids, b.attention_mask),
                             topk=topk, collect_ranks=True)
    assert acc.ranks is not None
    return acc.ranks


def measure_cost_curve(model: str, heads_dir: str, sizes: Sequence[int], batch_size: int, *,
                       num_prompts: int = 8, max_tokens: int = 64, dtype: str = "float32",
                       max_model_len: int = 1024, repeats: int = 2,
                       run: Callable[[dict], dict] | None = None) -> dict[int, float]:
    """Relative engine step time with trees of each size vs vanilla decoding
    (the tree of ``n`` nodes: the BFS-first ``n`` nodes of ``sparse-64``);
    :func:`measure_cost_curves` without chains."""
    return measure_cost_curves(model, heads_dir, sizes, (), batch_size, num_prompts=num_prompts,
                               max_tokens=max_tokens, dtype=dtype, max_model_len=max_model_len,
                               repeats=repeats, run=run)[0]


def measure_cost_curves(model: str, heads_dir: str, sizes: Sequence[int],
                        chain_sizes: Sequence[int], batch_size: int, *,
                        num_prompts: int = 8, max_tokens: int = 64, dtype: str = "float32",
                        max_model_len: int = 1024, repeats: int = 2,
                        run: Callable[[dict], dict] | None = None
                        ) -> tuple[dict[int, float], dict[int, float]]:
    """(tree curve, chain curve): relative engine step time vs vanilla decoding
    with the BFS-first ``n`` nodes of ``sparse-64`` for each of ``sizes``, and
    with the top-1 chain of each depth in ``chain_sizes``, timed in the same
    rounds against the same vanilla runs.

    Machine speed drifts between engine runs (±20% seen on 2 shared cores), so
    each of ``repeats`` rounds times vanilla first and then every size, in
    alternating order, and each ratio is taken against *its own round's*
    vanilla; the curve is the per-size median over rounds. ``run`` (one
    configuration -> its measurements, default: a fresh engine subprocess) is
    injectable for tests.
    """
    from statistics import median

    from tqdm import tqdm

    from medusa_vllm.checkpoints import read_heads_info
    from medusa_vllm.tools.bench import bench_prompts, run_config

    if repeats < 1:
        raise ValueError(f"measure_cost_curve: repeats must be >= 1, found {repeats}")
    run = run or run_config
    num_heads = read_heads_info(heads_dir).num_heads
    big = MedusaTree.load("sparse-64", num_heads)

    base = dict(model=model, dtype=dtype, max_model_len=max_model_len, max_tokens=max_tokens,
                ignore_eos=True, prompts=bench_prompts(max(num_prompts, batch_size), seed=99),
                batch_size=batch_size)
    bad = [d for d in chain_sizes if not 1 <= int(d) <= num_heads]
    if bad:
        raise ValueError(f"measure_cost_curves: chain depths {bad} outside 1..{num_heads} (heads)")
    trees = {("tree", int(n)): big.truncate(min(int(n), big.num_nodes)).to_list() for n in sizes}
    trees.update({("chain", int(d)): MedusaTree.chain(int(d)).to_list() for d in chain_sizes})
    ratios: dict[tuple[str, int], list[float]] = {key: [] for key in trees}
    bar = tqdm(total=repeats * (len(ratios) + 1), desc=f"cost curve (batch {batch_size})")
    for rep in range(repeats):
        van = run({**base, "name": "vanilla", "speculative_config": None})
        bar.update()
        per_tok = van["wall_s"] / van["output_tokens"]
        order = list(ratios) if rep % 2 == 0 else list(reversed(list(ratios)))
        for shape, n in order:
            r = run({**base, "name": f"{shape}-{n}",
                     "speculative_config": {"method": "medusa_tree", "model": heads_dir,
                                            "tree": trees[shape, n], "nodes_by_batch": "off"}})
            steps = r["output_tokens"] / max(r["spec"]["mean_accepted_length"], 1.0)
            ratios[shape, n].append((r["wall_s"] / steps) / per_tok)
            bar.update()
    bar.close()
    curves: dict[str, dict[int, float]] = {"tree": {}, "chain": {}}
    for (shape, n), v in ratios.items():
        curves[shape][n] = float(median(v))
    return curves["tree"], curves["chain"]


def _read_startup_fit(worker: Any) -> Any:
    return getattr(worker.model_runner, "medusa_startup_fit", None)


def startup_fit_probe(llm: Any, args: dict) -> Any:
    """Engine-job probe: what rank 0's start-up fit measured and picked."""
    del args
    return llm.collective_rpc(_read_startup_fit)[0]


def measure_startup_fit(model: str, heads_dir: str, *, dtype: str = "float32",
                        max_model_len: int = 1024, max_num_seqs: int = 64,
                        run: Callable[..., Any] | None = None) -> dict:
    """One engine start with ``tree: "auto"`` and a fresh measurement
    (``MEDUSA_VLLM_COST_CURVE=remeasure``): the curve it timed on this machine and the
    tree it fitted from it and the heads' ``per_rank_accuracy``
    (:mod:`medusa_vllm.engine.cost_curve`). ``run`` (default: an engine subprocess,
    :func:`medusa_vllm.tools.engine_proc.run_engine`) is injectable for tests."""
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

    spec = {"method": "medusa_tree", "model": heads_dir, "tree": "auto"}
    job = EngineJob(llm=engine_kwargs(model, dtype=dtype, max_model_len=max_model_len,
                                      speculative_config=spec, max_num_seqs=max_num_seqs),
                    prompts=[], metrics=False, probe=f"{__name__}:startup_fit_probe")
    env = {"MEDUSA_VLLM_COST_CURVE": "remeasure", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    result = (run or run_engine)(job, env=env)
    fit = result.probe
    if not fit or "tree" not in fit:
        raise RuntimeError(f"the engine fitted no tree at start-up (probe returned {fit!r}); "
                           f"does {heads_dir}/{TREE_FILE} hold per_rank_accuracy?")
    return fit


def _save_per_rank(heads_dir: Path, per_rank: list[list[float]]) -> None:
    """Write ``per_rank_accuracy`` into ``medusa_tree.json`` (kept fields otherwise)."""
    path = heads_dir / TREE_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not isinstance(data, dict):
        data = {"medusa_choices": data}
    data.setdefault("medusa_choices", MedusaTree.chain(1).to_list())
    data["per_rank_accuracy"] = per_rank
    path.write_text(json.dumps(data, indent=1))


def _calibrate_engine(args: argparse.Namespace, heads_dir: Path, per_rank: list[list[float]],
                      acc_info: dict, ranks: list[torch.Tensor] | None) -> int:
    """``--cost engine``: the engine's start-up fit, saved as the fallback tree."""
    from medusa_vllm.core.cost_curve import CostCurveKey, CostCurves

    _save_per_rank(heads_dir, per_rank)  # what the engine's fit reads
    fit = measure_startup_fit(args.model, str(heads_dir), dtype=args.dtype)
    curves = CostCurves.from_dict(fit["curves"])
    key = CostCurveKey(**fit["key"])
    tree = MedusaTree(fit["tree"])
    nodes_by_batch = {str(b): int(n) for b, n in fit["nodes_by_batch"].items()}
    print(f"{key.describe()}: {curves.describe()}")
    print(f"fitted: {fit['describe']}")
    result: dict = {"accuracies": acc_info, "machine": key.to_dict(), "curves": curves.to_dict(),
                    "fit": fit["describe"], "medusa_choices": tree.to_list(),
                    "nodes_by_batch": nodes_by_batch,
                    "cost_curves": {str(b): c for b, c in curves.tree.items()},
                    "chain_cost_curves": {str(b): c for b, c in curves.chain.items()}}
    if ranks:
        from medusa_vllm.core.tree_stats import simulate_acceptance

        result["replayed_accept_length"] = simulate_acceptance(tree, ranks).mean_accepted_length
        print(f"replayed on the data: accepted length {result['replayed_accept_length']:.2f}")
    tree.save(heads_dir / TREE_FILE, source=f"medusa-vllm calibrate --cost engine on "
              f"{key.describe()}", per_rank_accuracy=per_rank, nodes_by_batch=nodes_by_batch,
              machine=key.to_dict(), cost_curves=curves.to_dict())
    (heads_dir / "calibration.json").write_text(json.dumps(result, indent=1))
    _plot(per_rank, result, heads_dir)
    print(f"wrote {heads_dir / TREE_FILE} (per_rank_accuracy; fallback tree of "
          f"{tree.num_nodes} nodes) and calibration.json")
    return 0


def add_calibrate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="backbone folder")
    p.add_argument("--heads", required=True, help="heads folder (results are written into it)")
    p.add_argument("--data", nargs="*", default=[], help="held-out data files for the accuracies "
                   "(default: reuse accuracies.json/eval.json in the heads folder)")
    p.add_argument("--cost", choices=("engine", "e2e"), default="engine",
                   help="engine: the engine's own start-up measurement and fit (seconds; what "
                   "tree='auto' does in every engine); e2e: time whole generate() runs per tree "
                   "size (minutes; --sizes, --chain-sizes, --batch-sizes, --repeats)")
    p.add_argument("--sizes", default="2,4,8,16,32,64", help="tree sizes to time through vLLM")
    p.add_argument("--chain-sizes", default="1,2,3,4", help="top-1 chain depths to time (they "
                   "verify through vLLM's causal kernel, cheaper than a tree of as many nodes); "
                   "clipped to the number of heads; empty: none")
    p.add_argument("--batch-sizes", default="1", help="batch sizes to calibrate; the tree is fitted "
                   "for the first one")
    p.add_argument("--max-nodes", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-rows", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2, help="timing rounds (vanilla + every size, "
                   "interleaved); the curve is the per-size median")
    return p


def _per_rank(heads_dir: Path, data: Sequence[str], args
              ) -> tuple[list[list[float]], dict, list[torch.Tensor] | None]:
    """Per-rank accuracies, their record, and the target ranks when measured on ``data``."""
    if data:
        acc = measure_accuracies(args.model, str(heads_dir), data, max_rows=args.max_rows,
                                 collect_ranks=True)
        acc.save(heads_dir)
        print(acc.table())
        return acc.per_rank.tolist(), acc.to_dict(), acc.ranks
    ev = heads_dir / "eval.json"
    if ev.exists():
        d = json.loads(ev.read_text())
        return d["per_rank"], d, None
    cum_path = heads_dir / "accuracies.json"
    if not cum_path.exists():
        raise FileNotFoundError(
            f"{heads_dir}: no accuracies.json / eval.json; pass --data HELD_OUT.jsonl to measure them"
        )
    cum = torch.tensor(json.loads(cum_path.read_text()), dtype=torch.float64)
    per = torch.cat([cum[:, :1], cum[:, 1:] - cum[:, :-1]], 1)
    return per.tolist(), {"topk_cumulative": cum.tolist(), "per_rank": per.tolist()}, None


def calibrate_main(args: argparse.Namespace) -> int:
    heads_dir = Path(args.heads)
    per_rank, acc_info, ranks = _per_rank(heads_dir, args.data, args)
    if getattr(args, "cost", "e2e") == "engine":
        return _calibrate_engine(args, heads_dir, per_rank, acc_info, ranks)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    chain_sizes = [int(x) for x in (args.chain_sizes or "").split(",") if x]
    chain_sizes = [d for d in chain_sizes if d <= len(per_rank)]
    result: dict = {"accuracies": acc_info, "cost_curves": {}, "chain_cost_curves": {}, "trees": {}}
    chosen = None
    for bs in [int(x) for x in args.batch_sizes.split(",") if x]:
        curve, chain_curve = measure_cost_curves(
            args.model, str(heads_dir), sizes, chain_sizes, bs, max_tokens=args.max_tokens,
            dtype=args.dtype, repeats=args.repeats)
        tree, exp_len, speed = fit_tree(per_rank, curve, args.max_nodes, chain_curve)
        result["cost_curves"][str(bs)] = curve
        result["chain_cost_curves"][str(bs)] = chain_curve
        result["trees"][str(bs)] = {"num_nodes": tree.num_nodes, "expected_accept_length": exp_len,
                                    "expected_speedup": speed, "medusa_choices": tree.to_list()}
        replayed = ""
        if ranks:
            # what the engine will measure on text like --data: greedy decoding replayed
            # from the heads' ranks (lower than the paper's per-position expectation)
            from medusa_vllm.core.tree_stats import simulate_acceptance

            sim = simulate_acceptance(tree, ranks)
            result["trees"][str(bs)]["replayed_accept_length"] = sim.mean_accepted_length
            replayed = f" (replayed on the data: {sim.mean_accepted_length:.2f})"
        print(f"batch {bs}: cost {curve} -> tree of {tree.num_nodes} nodes, "
              f"E[accepted length] {exp_len:.2f}{replayed}, expected speedup {speed:.2f}x")
        chosen = chosen or (bs, tree, exp_len, speed)
    assert chosen is not None
    bs, tree, exp_len, speed = chosen
    curves = {int(b): c for b, c in result["cost_curves"].items()}
    chain_curves = {int(b): c for b, c in result["chain_cost_curves"].items()}
    nodes_by_batch = fit_nodes_by_batch(tree, per_rank, curves, chain_curves)
    result["nodes_by_batch"] = nodes_by_batch
    print(f"tree size per batch size (BFS prefix of the {tree.num_nodes}-node tree): {nodes_by_batch}")
    tree.save(heads_dir / TREE_FILE, batch_size=bs, expected_accept_length=exp_len,
              expected_speedup=speed, source="medusa-vllm calibrate --cost e2e",
              nodes_by_batch={str(b): n for b, n in nodes_by_batch.items()},
              per_rank_accuracy=per_rank)
    (heads_dir / "calibration.json").write_text(json.dumps(result, indent=1))
    _plot(per_rank, result, heads_dir)
    print(f"wrote {heads_dir / TREE_FILE} ({tree.num_nodes} nodes) and calibration.json")
    return 0


def _plot(per_rank, result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cum = torch.tensor(per_rank).cumsum(1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in range(cum.shape[0]):
        ax.plot(range(1, cum.shape[1] + 1), cum[k].tolist(), marker="o", label=f"head {k}")
    ax.set_xlabel("top-k")
    ax.set_ylabel("accuracy (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for bs, curve in result["cost_curves"].items():
        pts = sorted((int(n), c) for n, c in curve.items())
        ax.plot([0] + [p[0] for p in pts], [1.0] + [p[1] for p in pts], marker="o", label=f"batch {bs}")
    for bs, curve in result.get("chain_cost_curves", {}).items():
        pts = sorted((int(n), c) for n, c in curve.items())
        if pts:
            ax.plot([0] + [p[0] for p in pts], [1.0] + [p[1] for p in pts], marker="s",
                    linestyle="--", label=f"batch {bs}, top-1 chains")
    ax.set_xlabel("tree nodes")
    ax.set_ylabel("step time / vanilla decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost_curve.png", dpi=110)
