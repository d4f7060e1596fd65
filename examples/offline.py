"""Offline generation with Medusa tree decoding: ``vllm.LLM`` with a ``speculative_config``.

What it runs, in a fresh process per engine (``medusa_vllm.tools.engine_proc``), is::

    from vllm import LLM, SamplingParams

    llm = LLM(model=MODEL, dtype="float32", enforce_eager=True, max_model_len=1024,
              speculative_config={"method": "medusa_tree", "model": HEADS})
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=128))
    llm.get_metrics()  # vLLM's spec-decode counters -> mean accepted length

first without ``speculative_config`` (vanilla vLLM), then with it, on the embedded default
model (SmolLM2-135M-Instruct) and its shipped heads unless ``--model`` / ``--heads`` say
otherwise. Prints the generated text, tokens/s of both, the speedup, the mean accepted
length (tokens emitted per verification step) and whether the greedy outputs are equal.
One engine at a time: each runs in its own subprocess, so the two never share the
machine's cores or memory.

    python examples/offline.py [--model DIR --heads DIR] [--num-prompts 4] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="backbone folder (default: the embedded default model)")
    ap.add_argument("--heads", help="Medusa heads folder (default: the shipped heads)")
    ap.add_argument("--tree", default="auto", help='"auto" (the heads\' calibrated tree), a preset, or a tree file')
    ap.add_argument("--dtype", default="float32", help="float32 is the fast dtype on AVX2-only CPUs")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per engine run")
    ap.add_argument("--json", help="write the figures and outputs to this file")
    return ap.parse_args(argv)


def prompts(n: int) -> list[str]:
    """Held-out prompts from the offline corpora, else a fixed list."""
    from medusa_vllm.training.prompts import example_prompts

    return example_prompts(n)


def resolve(model: str | None, heads: str | None) -> tuple[str, str]:
    if model is None or heads is None:
        from medusa_vllm.tools.default_model import default_model_info

        if model is None:
            print("[offline] preparing the embedded default model (converted once, then cached)",
                  flush=True)
        info = default_model_info(build=model is None)
        model, heads = model or info["model"], heads or info["heads"]
    if not (Path(heads) / "config.json").is_file():
        raise SystemExit(f"[offline] no Medusa heads at {heads} (no config.json): pass --heads DIR, "
                         "or rebuild the shipped heads with scripts/train_default_heads.py")
    return str(model), str(heads)


def main(argv: list[str] | None = None) -> int:
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

    args = parse_args(argv)
    model, heads = resolve(args.model, args.heads)
    texts = prompts(args.num_prompts)
    spec = {"method": "medusa_tree", "model": heads, "tree": args.tree}
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens}
    results: dict[str, Any] = {}
    for name, sp in (("vanilla", None), ("medusa_tree", spec)):
        print(f"[offline] {name}: starting an engine ...", flush=True)
        job = EngineJob(llm=engine_kwargs(model, dtype=args.dtype, max_model_len=args.max_model_len,
                                          speculative_config=sp),
                        prompts=texts, sampling=sampling, chat_template=True, warmup=1)
        results[name] = run_engine(job, timeout=args.timeout,
                                   env_defaults={"VLLM_CPU_KVCACHE_SPACE": "2"})
    van, med = results["vanilla"], results["medusa_tree"]
    van_tps, med_tps = van.output_tokens / van.wall_s, med.output_tokens / med.wall_s
    accepted = med.metrics.get("mean_accepted_length", 1.0)
    same = med.token_ids == van.token_ids
    for i, (p, t) in enumerate(zip(texts, med.texts)):
        print(f"\n--- prompt {i}: {p[:120]!r}\n{t}")
    print(f"\n[offline] model {model}\n[offline] heads {heads} (tree: {args.tree})")
    print(f"[offline] vanilla     {van.output_tokens} tokens in {van.wall_s:.2f} s = {van_tps:.1f} tok/s")
    print(f"[offline] medusa_tree {med.output_tokens} tokens in {med.wall_s:.2f} s = {med_tps:.1f} tok/s"
          f"  (x{med_tps / van_tps:.2f})")
    print(f"[offline] mean accepted length {accepted:.2f} tokens/step over "
          f"{med.metrics.get('num_drafts', 0)} steps, {med.metrics.get('tree_size', 0):.1f} tree "
          f"nodes/step (vLLM's spec-decode counters)")
    print(f"[offline] greedy outputs token-for-token equal: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model, "heads": heads, "tree": args.tree, "prompts": texts,
            "vanilla_tok_s": van_tps, "medusa_tok_s": med_tps, "speedup": med_tps / van_tps,
            "mean_accepted_length": accepted, "metrics": med.metrics, "same_output": same,
            "texts": med.texts, "vanilla_texts": van.texts,
        }, indent=1) + "\n")
    return 0 if same and med.metrics.get("num_drafts", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
