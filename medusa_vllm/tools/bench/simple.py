"""The simple side-by-side run behind ``make demo`` (and the one-engine helper
:func:`run_config` that ``calibrate`` and the default-heads recipe time with):
vanilla vLLM vs vLLM's built-in (chain) Medusa vs medusa_tree, one after the
other, greedy, at a few batch sizes, plus the verification-cost curve.

``medusa-vllm bench`` itself (interleaved repeats, concurrency levels, HTTP,
vLLM's other speculators, sampling modes) is :mod:`medusa_vllm.tools.bench.cli`.

    python examples/demo.py --batch-sizes 1,8      # uses add_bench_args / run_bench below

Greedy decoding throughout (temperature 0), so every configuration must emit
the same text; the run checks that and reports any mismatch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medusa_vllm.tools.bench.prompts import bench_prompts
from medusa_vllm.tools.engine_proc import (
    EngineJob,
    EngineRunError,
    engine_env,
    engine_kwargs,
    run_engine,
)


def bench_job(config: Mapping[str, Any]) -> EngineJob:
    """The engine run of one configuration: the prompts as one chat turn each,
    an untimed warm-up over one batch, then one timed greedy run."""
    return EngineJob(
        llm=engine_kwargs(config["model"], dtype=config["dtype"], max_model_len=config["max_model_len"],
                          max_num_seqs=config["batch_size"],
                          speculative_config=config.get("speculative_config")),
        prompts=list(config["prompts"]), chat_template=True, warmup=config["batch_size"],
        sampling={"temperature": 0.0, "max_tokens": config["max_tokens"], "ignore_eos": config["ignore_eos"]},
    )


def run_config(config: Mapping[str, Any], **options: Any) -> dict:
    """Run one configuration (``name``, ``batch_size``, ``model``, ``dtype``,
    ``max_model_len``, ``max_tokens``, ``ignore_eos``, ``prompts``,
    ``speculative_config``) in a fresh engine and return its measurements.
    ``options`` go to :func:`medusa_vllm.tools.engine_proc.run_engine` (``env``
    is added to vLLM's logging being left unconfigured)."""
    options.setdefault("timeout", None)
    options.setdefault("in_process", False)  # timed: vLLM's own processes, as users run it
    options["env"] = {"VLLM_CONFIGURE_LOGGING": "0", **(options.get("env") or {})}
    try:
        res = run_engine(bench_job(config), **options)
    except EngineRunError as exc:
        raise EngineRunError(f"{config['name']} (batch {config['batch_size']}): {exc}") from exc
    return {
        "name": config["name"],
        "batch_size": config["batch_size"],
        "wall_s": res.wall_s,
        "output_tokens": res.output_tokens,
        "tokens_per_s": res.output_tokens / res.wall_s,
        "spec": res.metrics,
        "token_ids": res.token_ids,
        "texts": res.texts,
    }


def add_bench_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model")
    ap.add_argument("--heads", help="heads folder (our layout, Medusa or Hydra); default: the "
                    "shipped default heads")
    ap.add_argument("--medusa-heads", default=None,
                    help="plain Medusa heads for vLLM's built-in Medusa (default: --heads if they "
                    "are Medusa heads; with the shipped Hydra heads, the shipped Medusa heads)")
    ap.add_argument("--tree", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--configs", default="vanilla,medusa,medusa_tree",
                    help="comma-separated: vanilla, medusa (vLLM's chain), medusa_tree, "
                         "medusa_tree_ngram (ours + prompt lookup in the tree), ngram (vLLM's)")
    ap.add_argument("--ngram-nodes", type=int, default=3,
                    help="prompt-lookup tokens: our branch's nodes and vLLM's ngram k")
    ap.add_argument("--cost-curve", default="", help="tree sizes for the verification-cost curve, e.g. 1,4,16,32,64")
    ap.add_argument("--out", default="runs/bench_e2e")
    return ap


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Run every configuration and return one row per (configuration, batch size)."""
    from tqdm import tqdm

    prompts = bench_prompts(args.num_prompts, seed=1234)  # before any work: the corpus may be missing
    if args.model is None or args.heads is None:
        from medusa_vllm.tools.default_model import default_model_info

        info = default_model_info()
        args.model = args.model or info["model"]
        if args.heads is None:
            args.heads = info["heads"]
            args.medusa_heads = args.medusa_heads or info["medusa_heads"]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    vllm_heads = out_dir / "heads_vllm_layout"
    configs = args.configs.split(",")
    num_heads = None
    if "medusa" in configs:
        from medusa_vllm.checkpoints import (
            MedusaCheckpointError,
            convert,
            load_backbone_lm_head,
            plain_medusa_heads,
            read_heads_info,
        )

        try:
            medusa_heads = plain_medusa_heads(args.heads, args.medusa_heads)
        except MedusaCheckpointError as exc:
            raise SystemExit(f"bench: --medusa-heads {exc}") from None
        if medusa_heads is None:
            raise SystemExit(f"bench: configuration 'medusa' (vLLM's built-in Medusa) needs plain "
                             f"Medusa heads; {args.heads} holds {read_heads_info(args.heads).head_type}"
                             " heads: pass --medusa-heads DIR")
        num_heads = read_heads_info(medusa_heads).num_heads
        # vLLM 0.32's Medusa needs full-vocabulary LM layers: a reduced draft
        # vocabulary is expanded (zero rows elsewhere), the same top-1 proposals
        convert(medusa_heads, vllm_heads, layout="vllm", overwrite=True,
                lm_head_weight=load_backbone_lm_head(args.model), expand_vocab=True)

    base = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
                "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "prompts": prompts}
    specs = []
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        for name in configs:
            sc = None
            if name == "medusa":
                sc = {"method": "medusa", "model": str(vllm_heads), "num_speculative_tokens": num_heads}
            elif name == "medusa_tree":
                sc = {"method": "medusa_tree", "model": args.heads, "tree": args.tree}
            elif name == "medusa_tree_ngram":  # ours with prompt lookup in the tree
                # the whole tree: a calibrated nodes_by_batch table was fitted without the
                # branch and would cut the combined tree to its first BFS nodes
                sc = {"method": "medusa_tree", "model": args.heads, "tree": args.tree,
                      "ngram_nodes": args.ngram_nodes, "nodes_by_batch": "off"}
            elif name == "ngram":  # vLLM's own prompt lookup, as many tokens as our branch
                sc = {"method": "ngram", "num_speculative_tokens": args.ngram_nodes,
                      "prompt_lookup_min": 2, "prompt_lookup_max": 5}
            elif name != "vanilla":
                raise ValueError(f"bench: unknown configuration {name!r}; known: vanilla, medusa, "
                                 "medusa_tree, medusa_tree_ngram, ngram")
            specs.append({**base, "name": name, "batch_size": bs, "speculative_config": sc})
        for n in [int(x) for x in args.cost_curve.split(",") if x]:
            tree = "chain-1" if n == 1 else f"sparse-{n}"
            specs.append({**base, "name": f"tree-{n}", "batch_size": bs, "ignore_eos": True,
                          "speculative_config": {"method": "medusa_tree", "model": args.heads, "tree": tree,
                                                 "nodes_by_batch": "off"}})
        if args.cost_curve and "vanilla" not in configs:
            specs.append({**base, "name": "vanilla", "batch_size": bs, "ignore_eos": True, "speculative_config": None})

    bind = engine_env().get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM's default)")
    print(f"[bench] engine worker threads: VLLM_CPU_OMP_THREADS_BIND={bind}", flush=True)
    results = [run_config(s) for s in tqdm(specs, desc="configurations")]
    rows = []
    for bs in sorted({r["batch_size"] for r in results}):
        group = {r["name"]: r for r in results if r["batch_size"] == bs}
        van = group.get("vanilla")
        for name, r in group.items():
            row = {k: v for k, v in r.items() if k not in ("token_ids", "texts")}
            row["first_text"] = r["texts"][0] if r["texts"] else ""
            row["threads_bind"] = bind
            if van:
                row["speedup_vs_vanilla"] = r["tokens_per_s"] / van["tokens_per_s"]
                row["same_output_as_vanilla"] = r["token_ids"] == van["token_ids"]
                # relative cost of one engine step (verification pass) vs a vanilla decode step
                steps = r["output_tokens"] / max(r["spec"]["mean_accepted_length"], 1.0)
                row["step_time_vs_vanilla"] = (r["wall_s"] / steps) / (van["wall_s"] / van["output_tokens"])
            if "medusa" in group:
                row["speedup_vs_builtin_medusa"] = r["tokens_per_s"] / group["medusa"]["tokens_per_s"]
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'config':<14}{'batch':>6}{'tok/s':>9}{'x vanilla':>11}{'x medusa':>10}{'acc.len':>9}{'step cost':>11}  same")
    for r in rows:
        print(f"{r['name']:<14}{r['batch_size']:>6}{r['tokens_per_s']:>9.1f}"
              f"{r.get('speedup_vs_vanilla', float('nan')):>11.2f}{r.get('speedup_vs_builtin_medusa', float('nan')):>10.2f}"
              f"{r['spec']['mean_accepted_length']:>9.2f}{r.get('step_time_vs_vanilla', float('nan')):>11.2f}"
              f"  {r.get('same_output_as_vanilla', '')}")
        depth = list(r["spec"]["acceptance_per_depth"])
        # vLLM counts one position per speculative token; a tree's positions past
        # its depth never accept, so trailing zeros are dropped from the display
        while depth and depth[-1] == 0:
            depth.pop()
        if depth:
            print(f"{'':<14}per-depth acceptance: " + ", ".join(f"{a:.2f}" for a in depth))


def plot(rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for bs in sorted({r["batch_size"] for r in rows}):
        rs = [r for r in rows if r["batch_size"] == bs and not r["name"].startswith("tree-")]
        ax.bar([f"{r['name']}\nbs={bs}" for r in rs], [r["tokens_per_s"] for r in rs])
    ax.set_ylabel("output tokens / s")
    ax.set_title("Greedy decoding throughput")
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=120)
    curve = [r for r in rows if r["name"].startswith("tree-") and "step_time_vs_vanilla" in r]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        for bs in sorted({r["batch_size"] for r in curve}):
            pts = sorted((int(r["name"][5:]), r["step_time_vs_vanilla"]) for r in curve if r["batch_size"] == bs)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {bs}")
        ax.set_xlabel("tree nodes")
        ax.set_ylabel("verification step time / vanilla decode step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "verify_cost.png", dpi=120)

