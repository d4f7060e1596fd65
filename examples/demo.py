"""`make demo`: Medusa tree decoding inside vLLM on the embedded default model.

Runs the same held-out prompts greedily through vanilla vLLM, vLLM's built-in
(top-1 chain) Medusa and medusa_tree, each in a fresh engine, and prints the
text, tokens/s, speedups, mean accepted length and per-depth acceptance.
Greedy decoding: all three must print the same text.

    python examples/demo.py [--batch-sizes 1] [--max-tokens 128] [--num-prompts 8] [--dtype D]

The dtype defaults to the one this CPU does best (bfloat16 with AMX or AVX-512-BF16,
else float32); the demo says which and why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    from medusa_vllm.tools.bench.simple import add_bench_args, plot, print_table, run_bench
    from medusa_vllm.tools.default_model import default_model_info, runtime_dtype

    ap = add_bench_args(argparse.ArgumentParser(description=__doc__))
    ap.set_defaults(batch_sizes="1", num_prompts=6, max_tokens=128, out="runs/demo", dtype=None)
    args = ap.parse_args()
    args.dtype, why = runtime_dtype(args.dtype)
    print(f"[demo] dtype {args.dtype}: {why} (override with --dtype)")
    print("[demo] preparing the embedded default model (SmolLM2-135M-Instruct; converted once, then cached)")
    info = default_model_info()
    args.model = args.model or info["model"]
    if args.heads is None:
        args.heads = info["heads"]  # Hydra heads; vLLM's own Medusa gets the plain Medusa heads
        args.medusa_heads = args.medusa_heads or info["medusa_heads"]
    if not (Path(args.heads) / "config.json").exists():
        # Fallback until trained heads ship for the default model: a tiny random Llama and
        # heads self-distilled on it for a few seconds (correctness, not real speed).
        from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

        tiny = Path(args.out) / "tiny"
        print(f"[demo] NOTE: no trained heads for the default model at {args.heads} yet "
              f"(scripts/train_default_heads.py builds them); running on a TINY RANDOM model built "
              f"on the fly in {tiny} with heads self-distilled for a few seconds instead")
        args.model = str(build_tiny_llama(tiny / "model", vocab=512, hidden=64, layers=2))
        args.heads = str(tiny / "heads") if (tiny / "heads" / "config.json").exists() else \
            str(distill_tiny_heads(args.model, tiny / "heads"))
        args.medusa_heads = None  # the tiny heads are Medusa heads
        args.tree = "sparse-16" if args.tree == "auto" else args.tree
        args.max_model_len = min(args.max_model_len, 512)
    print(f"[demo] model {args.model}\n[demo] heads {args.heads} (tree: {args.tree})"
          + (f"\n[demo] vLLM's Medusa: {args.medusa_heads}" if args.medusa_heads else ""))
    rows = run_bench(args)
    print_table(rows)
    plot(rows, Path(args.out))
    ours = [r for r in rows if r["name"] == "medusa_tree"]
    if ours:
        print("\n[demo] first prompt's greedy output (medusa_tree):\n" + ours[0]["first_text"][:600])
    bad = [r["name"] for r in rows if r.get("same_output_as_vanilla") is False]
    if bad:
        print(f"[demo] ERROR: output differs from vanilla for {bad}", file=sys.stderr)
        return 1
    print(f"\n[demo] all configurations produced identical greedy text; plots in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
