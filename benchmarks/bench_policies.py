"""Drafting policies on the default model: beam drafts and adaptive head selection.

Greedy, batch 1 (``max_num_seqs=1``), the embedded default model and the shipped
heads, one engine per configuration (``medusa_vllm.tools.engine_proc``). Prints,
per configuration, the mean accepted length, drafted tokens per decode step,
output tokens/s and whether the text is vanilla's; ``--json`` writes the rows.

    python benchmarks/bench_policies.py beam       # static tree vs beam:2/5/10 (6 held-out prompts)
    python benchmarks/bench_policies.py adaptive   # adaptive off/on, repetitive + hard prompts

Wall-clock figures are only indicative on a shared machine; the drafted and
accepted token counts are exact (vLLM's own spec-decode counters).
"""

from __future__ import annotations

import argparse
import json
import sys

# repetitive prompts (the heads should hit) and open-ended ones (they mostly miss)
REPETITIVE = (
    "Repeat the following line five times, one per line: the quick brown fox jumps over the lazy dog.",
    "Count from 1 to 60, separated by commas.",
    "Write the English alphabet in capital letters, separated by spaces, three times.",
)
# the shipped heads' calibrated tree (medusa_tree.json, given explicitly so that no
# start-up fit runs) and a wider preset
STATIC = (("calibrated [[0],[0,0]]", [[0], [0, 0]]), ("sparse-16", "sparse-16"))
HARD = (
    "Invent a name for a new fruit and describe its taste in surprising words.",
    "Write a limerick about a cat who loves to sleep.",
    "Give me five unusual uses for a paperclip.",
)


def _steps(r) -> int:
    return r.output_tokens - len(r.token_ids) - r.metrics.get("num_accepted_tokens", 0)


def _row(name: str, r, vanilla) -> dict:
    m = r.metrics
    return {
        "name": name,
        "mean_accepted_length": round(m.get("mean_accepted_length", 1.0), 3),
        "drafted_per_step": round(m.get("num_draft_tokens", 0) / max(1, _steps(r)), 2),
        "nodes_per_drafted_step": round(m.get("tree_size", 0.0), 2),
        "acceptance_per_depth": [round(x, 3) for x in m.get("acceptance_per_depth", [])],
        "tokens_per_s": round(r.output_tokens / r.wall_s, 2),
        "same_as_vanilla": None if vanilla is None else r.token_ids == vanilla.token_ids,
    }


def main() -> int:
    from medusa_vllm.tools.bench.prompts import bench_prompts
    from medusa_vllm.tools.default_model import default_model_info
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=("beam", "adaptive"))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    info = default_model_info()
    heads = info["medusa_heads"]  # beam paths and the recorded policy figures: Medusa heads
    if args.what == "beam":
        prompts = bench_prompts(args.num_prompts, seed=1234)
        configs = [("static " + name, {"tree": tree}) for name, tree in STATIC[:1]] + [
            (f"beam:{w}", {"tree": f"beam:{w}"}) for w in (2, 5, 10)]
    else:
        prompts = [p for pair in zip(REPETITIVE, HARD) for p in pair]
        configs = [(f"{name} adaptive={a}", {"tree": tree, "adaptive": a})
                   for name, tree in STATIC[1:] for a in (False, True)]
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    # a shared machine can stall one step for minutes: vLLM's 300 s step timeout is too short
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}

    def job(spec):
        llm = engine_kwargs(info["model"], speculative_config=spec, max_model_len=2048,
                            max_num_seqs=1)
        return EngineJob(llm=llm, prompts=list(prompts), sampling=sampling, chat_template=True,
                         warmup=1)

    vanilla = run_engine(job(None), env_defaults=env, timeout=3600)
    rows = [_row("vanilla", vanilla, None)]
    for name, options in configs:
        spec = {"method": "medusa_tree", "model": heads, "nodes_by_batch": "off", **options}
        rows.append(_row(name, run_engine(job(spec), env_defaults=env, timeout=3600), vanilla))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| configuration | accepted length | drafted / step | nodes / drafted step | "
          "tok/s | = vanilla |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['mean_accepted_length']} | {r['drafted_per_step']} | "
              f"{r['nodes_per_drafted_step']} | {r['tokens_per_s']} | {r['same_as_vanilla']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["same_as_vanilla"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
