"""``medusa-vllm bench`` as a script (same options; see ``medusa_vllm/tools/bench/cli.py``).

    python benchmarks/bench_e2e.py --quick                     # a few minutes
    python benchmarks/bench_e2e.py --prompts everyday --concurrency 1,4,16,64
"""

import argparse
import sys

from medusa_vllm.tools.bench import add_bench_args, bench_main

if __name__ == "__main__":
    sys.exit(bench_main(add_bench_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
