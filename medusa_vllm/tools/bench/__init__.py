"""``medusa-vllm bench``: a benchmark a skeptic can trust.

Vanilla vLLM, vLLM's own speculators (chain Medusa with our heads swept over
``num_speculative_tokens``, prompt lookup, suffix decoding) and ours (greedy,
typical, rejection sampling, with prompt lookup in the tree), on the same backbone,
heads and prompts, at several concurrency levels, offline and through the
OpenAI server, repeated in interleaved rounds with the spread reported.

Modules: :mod:`.configs` (the table of configurations), :mod:`.prompts`,
:mod:`.offline` and :mod:`.http` (the measurements), :mod:`.report` (records,
ratios, markdown), :mod:`.plots`, :mod:`.cli` (arguments, schedule, outputs);
:mod:`.simple` is the plain side-by-side run of ``make demo`` and the
single-engine timing helper :func:`run_config` of ``calibrate``.
"""

from medusa_vllm.tools.bench.cli import add_bench_args, bench_main
from medusa_vllm.tools.bench.prompts import bench_prompts
from medusa_vllm.tools.bench.simple import run_config

__all__ = ["add_bench_args", "bench_main", "bench_prompts", "run_config"]
