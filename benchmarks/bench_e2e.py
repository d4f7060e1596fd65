"""Vanilla vLLM vs vLLM's built-in chain Medusa vs medusa_tree, side by side.

Same as ``medusa-vllm bench`` (see ``medusa_vllm/tools/bench.py`` for the options):

    python benchmarks/bench_e2e.py --batch-sizes 1,8 --cost-curve 1,4,16,32,64
"""

import argparse
import sys

from medusa_vllm.tools.bench import add_bench_args, bench_main

if __name__ == "__main__":
    sys.exit(bench_main(add_bench_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
