"""Where an engine step's time goes: cProfile over one batch of greedy requests.

One in-process engine (float32 unless ``--dtype``, eager, the embedded default model and heads) runs
``--requests`` everyday requests of ``--max-tokens`` tokens with ``--max-num-seqs``
in flight (vLLM's continuous batching refills the batch as requests finish): once
to warm up (and, for ``ours``, to let the online refit settle), then once under
cProfile. Prints the wall time, the steps, and the time per step in the backbone's
GEMMs, vLLM's attention kernel, the rest of the forward pass, the sampling or tree
verification, the drafter, the input preparation and the scheduler; and writes the
raw profile (``--out``, for ``python -m pstats``). Run two configurations one after
the other (never at once: two cores) and compare, e.g.::

    VLLM_CPU_OMP_THREADS_BIND=0,1 .venv/bin/python benchmarks/profile_steps.py vanilla
    VLLM_CPU_OMP_THREADS_BIND=0,1 .venv/bin/python benchmarks/profile_steps.py ours

``--step-times`` replaces cProfile by a wall clock around each engine step and
groups the steps by batch size, drafted tokens per request and whether they carry
a prefill: the mean step time of a drafted batch-16 step beside an undrafted one,
without the profiler's overhead. ``--bench-pattern C`` runs the bench's own offline
request pattern instead of one batch (C requests in flight, a new one submitted as
one finishes, stopping at end of sequence); ``--engine-args`` passes extra ``LLM``
arguments. This host's speed drifts by up to 20-40 % over minutes: compare
configurations in interleaved pairs, never one run each.

This is a profile, not a benchmark: one run each, not interleaved (``medusa-vllm
bench`` measures speed).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

# (label, substrings of "file:line(function)" whose cumulative time it takes): the
# GEMMs and the attention kernel are parts of the forward pass; logits and the rest
# are the step's other parts, outside it
GROUPS = (
    ("GEMMs (onednn_mm)", ("_custom_ops.py", "(onednn_mm)")),
    ("attention kernel", ("_custom_ops.py", "(cpu_attention_with_kv_cache)")),
    ("forward pass, all", ("gpu_model_runner.py", "(_model_forward)")),
    ("logits", ("", "(compute_logits)")),
    ("sampling / verification", ("", "(_sample)")),
    ("drafter (propose_draft_token_ids)", ("gpu_model_runner.py", "(propose_draft_token_ids)")),
    ("input preparation", ("gpu_model_runner.py", "(_prepare_inputs)")),
    ("attention metadata", ("gpu_model_runner.py", "(_build_attention_metadata)")),
    ("scheduler", ("scheduler.py", "(schedule)")),
    ("scheduler update", ("scheduler.py", "(update_from_output)")),
)


def speculative_config(which: str, heads: str) -> dict | None:
    return {
        "vanilla": None,
        "ours": {"method": "medusa_tree", "model": heads, "tree": "auto"},
        "ngram": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2,
                  "prompt_lookup_max": 3},
    }[which]


def breakdown(stats: pstats.Stats, steps: int) -> list[tuple[str, float]]:
    """``(label, ms per step)`` of :data:`GROUPS` (the outermost match of each)."""
    out = []
    for label, (where, func) in GROUPS:
        best = 0.0
        for (path, line, name), (_, _, _, cum, _) in stats.stats.items():
            key = f"{Path(path).name}:{line}({name})"
            if key.endswith(func) and where in key:
                best = max(best, cum)
        out.append((label, 1000.0 * best / max(steps, 1)))
    return out


# the model runner's parts of a step, timed by wall clock in --step-times
RUNNER_PARTS = ("execute_model", "_prepare_inputs", "_build_attention_metadata", "_model_forward",
                "sample_tokens", "_sample", "_compact_kv", "propose_draft_token_ids")


def time_runner_parts(llm) -> dict[str, float]:
    """Wrap the in-process model runner's :data:`RUNNER_PARTS` with wall clocks;
    the returned dict accumulates seconds per part while the wrappers stay on."""
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    runner = worker.model_runner
    totals = {name: 0.0 for name in RUNNER_PARTS}
    totals["compute_logits"] = 0.0

    def wrap(obj, name: str) -> None:
        orig = getattr(obj, name, None)
        if orig is None:
            return

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                totals[name] += time.perf_counter() - t0

        setattr(obj, name, timed)

    for name in RUNNER_PARTS:
        wrap(runner, name)
    wrap(runner.model, "compute_logits")
    return totals


def time_steps(llm, run) -> dict[tuple[int, int, bool], list[float]]:
    """Run ``run()`` with a wall clock around each engine step; ``{(requests, drafted
    tokens per request, any prefill scheduled): [ms, ...]}``."""
    core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore
    schedule, step_fn = core.scheduler.schedule, core.step_fn
    last: list = []
    times: dict[tuple[int, int, bool], list[float]] = defaultdict(list)

    def scheduled(*a, **k):
        out = schedule(*a, **k)
        last[:] = [out]
        return out

    def timed():
        last.clear()
        t0 = time.perf_counter()
        result = step_fn()
        ms = 1000 * (time.perf_counter() - t0)
        if last and last[0].num_scheduled_tokens:
            so = last[0]
            spec = {r: len(t) for r, t in so.scheduled_spec_decode_tokens.items()}
            prefill = any(n != 1 + spec.get(r, 0) for r, n in so.num_scheduled_tokens.items())
            reqs = len(so.num_scheduled_tokens)
            drafted = round(sum(spec.values()) / max(reqs, 1))
            times[(reqs, drafted, prefill)].append(ms)
        return result

    core.scheduler.schedule, core.step_fn = scheduled, timed
    try:
        run()
    finally:
        core.scheduler.schedule, core.step_fn = schedule, step_fn
    return times


def bench_pattern(llm, prompts: list[str], concurrency: int, num_requests: int, max_tokens: int):
    """The bench's own offline request pattern (``medusa-vllm bench``): exactly
    ``concurrency`` requests in flight, a new one submitted as one finishes, greedy,
    stopping at end of sequence."""
    from medusa_vllm.tools.bench.offline import _run_level

    return _run_level(llm, prompts, concurrency, num_requests,
                      {"temperature": 0.0, "max_tokens": max_tokens}, keep_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", choices=("vanilla", "ours", "ngram"))
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None,
                    help="raw profile (default runs/profile_<config>_<max-num-seqs>.pstats)")
    ap.add_argument("--spec", default=None,
                    help="ours with these extra medusa_tree options (JSON), e.g. "
                         "'{\"tree\": \"chain-1\", \"nodes_by_batch\": \"off\"}'")
    ap.add_argument("--dtype", default="float32", help="engine dtype (bfloat16 where the CPU has it)")
    ap.add_argument("--engine-args", default="{}",
                    help="extra LLM(...) arguments (JSON), e.g. '{\"async_scheduling\": false}'")
    ap.add_argument("--step-times", action="store_true",
                    help="time each engine step instead of profiling (see the module doc)")
    ap.add_argument("--bench-pattern", type=int, default=0, metavar="C",
                    help="with --step-times: the bench's request pattern instead of one batch "
                         "(C requests in flight, --requests in all, stopping at end of sequence)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams

    from medusa_vllm.tools.bench.prompts import EVERYDAY_PROMPTS
    from medusa_vllm.tools.default_model import default_heads_dir, default_model_dir
    from medusa_vllm.tools.engine_proc import chat_prompt, engine_kwargs

    spec = speculative_config(args.config, str(default_heads_dir()))
    if args.spec:
        if spec is None or spec.get("method") != "medusa_tree":
            ap.error("--spec adds medusa_tree options: use it with 'ours'")
        spec.update(json.loads(args.spec))
    llm = LLM(**engine_kwargs(default_model_dir(), dtype=args.dtype, max_model_len=2048,
                              max_num_seqs=args.max_num_seqs,
                              speculative_config=spec,
                              # the bench pattern reads vLLM's metrics, as the bench does
                              disable_log_stats=not args.bench_pattern,
                              **json.loads(args.engine_args)))
    tok = llm.get_tokenizer()
    chats = [chat_prompt(tok, [{"role": "user", "content": p}]) for p in EVERYDAY_PROMPTS]
    prompts = [chats[i % len(chats)] for i in range(args.requests)]
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts, sampling, use_tqdm=False)  # warm-up (and the online refit)
    if args.step_times:
        parts = time_runner_parts(llm)
        t0 = time.perf_counter()
        if args.bench_pattern:
            times = time_steps(llm, lambda: bench_pattern(llm, prompts, args.bench_pattern,
                                                          args.requests, args.max_tokens))
        else:
            times = time_steps(llm, lambda: llm.generate(prompts, sampling, use_tqdm=False))
        print(f"{args.config} ({args.dtype}): {args.requests} requests x {args.max_tokens} "
              f"tokens, max_num_seqs {args.max_num_seqs}"
              f"{f', {args.bench_pattern} in flight' if args.bench_pattern else ''}: "
              f"{time.perf_counter() - t0:.2f} s")
        print("  requests  drafted/req  prefill  steps  mean ms  median ms  total s")
        for (reqs, drafted, prefill), ms in sorted(times.items()):
            print(f"  {reqs:8d}  {drafted:11d}  {'yes' if prefill else 'no':>7s}  {len(ms):5d}  "
                  f"{statistics.fmean(ms):7.1f}  {statistics.median(ms):9.1f}  {sum(ms) / 1000:7.2f}")
        for prefill in (False, True):
            tot = [ms for (_, _, p), v in times.items() if p == prefill for ms in v]
            print(f"  {'prefill' if prefill else 'decode-only'} steps: {len(tot)}, "
                  f"{sum(tot) / 1000:.2f} s")
        nsteps = sum(len(ms) for ms in times.values())
        print(f"  runner parts, ms per step over all {nsteps} decode steps and any prefill:")
        for name, sec in parts.items():
            print(f"    {name:28s} {1000 * sec / max(nsteps, 1):7.2f}")
        return
    steps = 0
    step = llm.llm_engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    llm.llm_engine.step = counted
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(prompts, sampling, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - t0
    out = args.out or Path("runs") / f"profile_{args.config}_{args.max_num_seqs}.pstats"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(out)
    stats = pstats.Stats(prof)
    print(f"{args.config}: {args.requests} requests x {args.max_tokens} tokens, "
          f"max_num_seqs {args.max_num_seqs}: {wall:.2f} s (profiled), {steps} engine steps, "
          f"{1000 * wall / max(steps, 1):.1f} ms per step; profile in {out}")
    for label, ms in breakdown(stats, steps):
        print(f"  {label:36s} {ms:8.2f} ms/step")


if __name__ == "__main__":
    main()
