"""The README's benchmark: ``medusa-vllm bench`` with its full settings, once on
everyday chat requests and once on the corpora's held-out split (plus the
verification cost curve), each into its own folder under ``--out``.

    python benchmarks/bench_full.py                      # both prompt sets
    python benchmarks/bench_full.py --sets everyday      # one
    python benchmarks/bench_full.py -- --repeats 2       # anything after -- goes to bench

Full settings (the bench's defaults): configurations vanilla, vLLM's chain Medusa
swept over num_speculative_tokens 1..K, vLLM's ngram (4 settings), vLLM's suffix
(recorded unavailable without arctic_inference), ours (greedy, typical,
rejection), ours with prompt lookup in the tree and ours with adaptive head selection;
concurrency 1, 4, 16, 64; offline and over HTTP (swept configurations over HTTP
at their best offline setting); 8 prompts (max(8, 2c) requests per level), 128
tokens, 3 interleaved rounds; the dtype this CPU does best.
Run it on a quiet machine. Cost, from the plan the bench prints at start: 18
engines and 34 timed passes (one mode over the four levels, ~3.5 minutes each at
~13 tok/s for vanilla at concurrency 1 on 2 cores) per round, so about 6 hours
per prompt set with 3 rounds; ``--lean`` (2 ngram settings, 96 tokens) cuts it
by about a third. ``--quick`` is the few-minute check.
"""

import argparse
import sys
from pathlib import Path

from medusa_vllm.tools.bench import add_bench_args, bench_main

SETS = {"everyday": [], "corpus": ["--cost-curve", "1,4,16,64"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="everyday,corpus", help="prompt sets, comma-separated")
    ap.add_argument("--out", default="runs/bench_full")
    ap.add_argument("--lean", action="store_true", help="2 ngram settings (2:3, 4:5) and 96 tokens")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: more medusa-vllm bench options")
    a = ap.parse_args()
    extra = [x for x in a.bench_args if x != "--"]
    if a.lean:
        extra = ["--ngram-settings", "2:3,4:5", "--max-tokens", "96", *extra]
    code = 0
    for name in [s for s in a.sets.split(",") if s]:
        if name not in SETS:
            ap.error(f"--sets: unknown prompt set {name!r}; known: {', '.join(SETS)}")
        out = Path(a.out) / name
        argv = ["--prompts", name, *SETS[name], "--out", str(out), *extra]
        print(f"[bench_full] medusa-vllm bench {' '.join(argv)}", flush=True)
        code |= bench_main(add_bench_args(argparse.ArgumentParser()).parse_args(argv))
    return code


if __name__ == "__main__":
    sys.exit(main())
