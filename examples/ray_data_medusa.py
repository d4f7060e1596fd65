"""Batch inference with Medusa tree decoding through Ray Data LLM, against the same
pipeline without Medusa.

Builds two ``ray.data.llm`` processors (``vLLMEngineProcessorConfig`` on CPU bundles,
``build_processor``) over the same dataset of prompts, one with
``speculative_config={"method": "medusa_tree", "model": HEADS}`` in its
``engine_kwargs`` and one without, runs both greedily one after the other in one local
Ray instance, and prints for each: the wall time of the whole pipeline (engine
start-up included), the generation span and throughput, and whether the greedy outputs
are token-for-token equal. The Medusa pipeline's acceptance comes from vLLM's
spec-decode counters on Ray's Prometheus endpoint.

The generation span is the longest per-row engine time Ray Data reports
(``time_taken_llm``): every prompt goes to the engine in one batch, so the rows run
concurrently and the longest one spans the batch. Start-up = wall - span.

    python examples/ray_data_medusa.py [--model DIR --heads DIR] [--prompts 16]
        [--max-tokens 64] [--dtype float32] [--tp 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_common import (
    RayExampleSkip,
    chat_prompts,
    first_difference,
    local_ray,
    replica_env,
    require_ray,
    resolve_model,
    time_limit,
    wait_for_counters,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="backbone folder (default: the embedded default model)")
    ap.add_argument("--heads", help="Medusa heads folder (default: the shipped heads)")
    ap.add_argument("--tree", default=None, help='tree option of medusa_tree (default: the heads\' "auto")')
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--metrics-port", type=int, default=8091, help="Ray's Prometheus port")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per engine")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds for both pipelines")
    ap.add_argument("--ray-temp-dir", help="Ray's session and log folder (default /tmp/ray)")
    ap.add_argument("--json", help="write the figures and checks to this file")
    return ap.parse_args(argv)


def processor(args: argparse.Namespace, model: str, env: dict[str, str], spec: dict[str, Any] | None,
              batch_size: int) -> Any:
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    engine_kwargs: dict[str, Any] = {
        "dtype": args.dtype,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "tensor_parallel_size": args.tp,
        "seed": 0,
    }
    if args.tp > 1:  # Ray's default executor for TP>1 is refused by vLLM's CPU platform
        engine_kwargs["distributed_executor_backend"] = "mp"
    if spec:
        engine_kwargs["speculative_config"] = spec
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_kwargs,
        # One CPU bundle per TP rank; without it the stage asks for GPUs and never schedules.
        placement_group_config={"bundles": [{"CPU": 1}] * args.tp},
        runtime_env={"env_vars": env},
        batch_size=batch_size,
        concurrency=1,
        # The prompts are already rendered with the chat template; the engine detokenizes.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        log_engine_metrics=True,
    )
    max_tokens = args.max_tokens
    return build_processor(
        config,
        preprocess=lambda row: {"prompt": row["prompt"], "idx": row["idx"],
                                "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens}},
        postprocess=lambda row: {"idx": row["idx"], "generated_text": row["generated_text"],
                                 "generated_tokens": [int(t) for t in row["generated_tokens"]],
                                 "time_taken_llm": row["time_taken_llm"]},
    )


def run_pipeline(args: argparse.Namespace, model: str, env: dict[str, str], prompts: list[str],
                 spec: dict[str, Any] | None) -> dict[str, Any]:
    import ray

    ds = ray.data.from_items([{"idx": i, "prompt": p} for i, p in enumerate(prompts)])
    t0 = time.perf_counter()
    rows = processor(args, model, env, spec, batch_size=len(prompts))(ds).take_all()
    wall = time.perf_counter() - t0
    rows.sort(key=lambda r: r["idx"])
    span = max(float(r["time_taken_llm"]) for r in rows)
    tokens = sum(len(r["generated_tokens"]) for r in rows)
    return {"wall_s": round(wall, 1), "generation_s": round(span, 2),
            "startup_s": round(wall - span, 1), "tokens": tokens,
            "throughput_tok_s": round(tokens / span, 2) if span > 0 else None,
            "texts": [r["generated_text"] for r in rows],
            "token_ids": [list(r["generated_tokens"]) for r in rows]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_ray()
    model, heads = resolve_model(args.model, args.heads)
    prompts = chat_prompts(model, args.prompts)
    spec: dict[str, Any] = {"method": "medusa_tree", "model": heads}
    if args.tree:
        spec["tree"] = args.tree
    env = replica_env(args.tp, args.kv_cache_gib)
    num_cpus = 8  # each Ray Data stage holds a logical CPU; 4 deadlocked on this machine
    out: dict[str, Any] = {"model": model, "heads": heads, "tp": args.tp, "dtype": args.dtype,
                           "prompts": len(prompts), "max_tokens": args.max_tokens}
    print(f"[data] model {model}\n[data] heads {heads}\n[data] {len(prompts)} prompts, TP={args.tp}, "
          f"dtype {args.dtype}", flush=True)
    with local_ray(num_cpus, args.metrics_port, env, args.ray_temp_dir), time_limit(args.timeout, "the Ray Data pipelines"):
        for name, sp in (("vanilla", None), ("medusa_tree", spec)):
            print(f"[data] running the {name} pipeline ...", flush=True)
            res = run_pipeline(args, model, env, prompts, sp)
            out[name] = res
            print(f"[data] {name}: {res['wall_s']} s end to end (start-up ~{res['startup_s']} s), "
                  f"{res['tokens']} tokens in {res['generation_s']} s = {res['throughput_tok_s']} tok/s",
                  flush=True)
        # Only the Medusa engine drafts: its counters are the spec-decode totals.
        rows = wait_for_counters(args.metrics_port, expect_requests=2 * len(prompts),
                                 group_by="WorkerId", timeout=60)
        drafts = sum(r.num_drafts for r in rows.values())
        accepted = sum(r.num_accepted_tokens for r in rows.values())
        nodes = sum(r.num_draft_tokens for r in rows.values())
        out["medusa_tree"].update(num_drafts=drafts, num_accepted_tokens=accepted, num_draft_tokens=nodes,
                                  mean_accepted_length=round(1 + accepted / drafts, 3) if drafts else None)
        if drafts:
            print(f"[data] medusa_tree: {drafts} tree steps, {nodes / drafts:.1f} nodes/step, mean "
                  f"accepted length {1 + accepted / drafts:.2f} (vLLM's spec-decode counters)", flush=True)
        else:
            print("[data] medusa_tree: no spec-decode counters on Ray's metrics endpoint", flush=True)
    van, med = out["vanilla"], out["medusa_tree"]
    diff = first_difference(med["token_ids"], van["token_ids"])
    out["same_output"] = diff is None
    out["first_difference"] = diff
    if van["throughput_tok_s"] and med["throughput_tok_s"]:
        out["speedup"] = round(med["throughput_tok_s"] / van["throughput_tok_s"], 3)
        print(f"[data] generation speedup of medusa_tree over vanilla: x{out['speedup']:.2f}")
    print(f"[data] greedy outputs token-for-token equal: {diff is None}"
          + ("" if diff is None else f" (first difference: prompt {diff})"))
    print(f"[data] first output: {med['texts'][0][:300]!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except RayExampleSkip as exc:
        print(f"[data] cannot run: {exc}", file=sys.stderr)
        return 2
    write_json(args.json, out)
    return 0 if out["same_output"] and out["medusa_tree"].get("num_drafts") else 1


if __name__ == "__main__":
    sys.exit(main())
