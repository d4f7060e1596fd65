"""``medusa-vllm bench``: arguments, the interleaved schedule, outputs.

Every (configuration, variant, transport) is one engine slot; each round
starts a fresh engine for every slot, in the slot order on even rounds and in
reverse on odd ones (vanilla first, then last: A B C | C B A | A B C ...), so a
slow drift of the machine hits every configuration alike, and every ratio is
taken against vanilla of the same round (:mod:`medusa_vllm.tools.bench.report`).
Each engine serves all concurrency levels and modes of its configuration
(:mod:`.offline`, :mod:`.http`). An engine that fails is recorded as failed
with its error and not retried in later rounds; a configuration that cannot
run here is recorded as unavailable with the reason.

Outputs: ``--json`` (header, one record per (config, variant, transport,
concurrency, mode, repeat), the summary), ``--markdown`` (also printed) and
PNG plots in ``--out``; each starts with the machine header (CPU model, ISA,
threads, dtype, vLLM version, command line).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_vllm.tools.bench.configs import (
    CONFIGS,
    DEFAULT_CONFIGS,
    MODES,
    BenchConfig,
    BenchContext,
    Variant,
    config_from_json,
    cost_curve_config,
    reference_mode,
)
from medusa_vllm.tools.bench.prompts import PROMPT_SETS
from medusa_vllm.tools.bench.report import (
    annotate,
    level_record,
    markdown,
    summarize,
    unavailable_record,
)

__all__ = ["EngineSlot", "add_bench_args", "bench_main", "requests_per_level", "run_bench", "schedule"]

QUICK = {"num_prompts": 2, "max_tokens": 32, "concurrency": "1,4", "transports": "offline", "repeats": 2,
         "medusa_ks": "1", "ngram_settings": "4:5", "kv_cache_gib": 1.0, "vllm_modes": "greedy",
         "configs": "vanilla,vllm_medusa,vllm_ngram,vllm_suffix,medusa_tree", "in_process": True}
FULL = {"num_prompts": 8, "max_tokens": 128, "concurrency": "1,4,16,64", "transports": "offline,http",
        "repeats": 3, "medusa_ks": "", "ngram_settings": "2:3,2:5,4:3,4:5", "kv_cache_gib": 4.0,
        "vllm_modes": "", "configs": ",".join(DEFAULT_CONFIGS), "in_process": False}
CONCURRENCY_NOTE = ("exactly c requests in flight, a new one submitted as soon as one finishes (offline: "
                    "LLM engine steps with max_num_seqs = the largest c; HTTP: c concurrent streaming "
                    "chat requests to vllm serve); max(num_prompts, 2c) requests per level")


def requests_per_level(concurrency: int, num_prompts: int) -> int:
    """Requests measured at one concurrency level: at least two waves of ``c``."""
    return max(int(num_prompts), 2 * int(concurrency))


@dataclass
class EngineSlot:
    """One engine to start per round: a configuration's variant on one transport."""

    config: BenchConfig
    variant: Variant
    transport: str  # "offline" | "http"
    concurrency: list[int]
    modes: list[str]
    all_variants: list[Variant] = field(default_factory=list)  # deferred HTTP slots: the sweep

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.config.name, self.variant.label, f"[{self.transport}]") if x)


def schedule(slots: Sequence[EngineSlot], repeats: int) -> list[tuple[int, EngineSlot]]:
    """(round, slot) in run order: the slot order on even rounds, reversed on odd ones."""
    if repeats < 1:
        raise ValueError(f"bench: --repeats must be >= 1, found {repeats}")
    out = []
    for r in range(repeats):
        out += [(r, s) for s in (slots if r % 2 == 0 else list(reversed(slots)))]
    return out


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bench: {what} must be comma-separated integers, found {text!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"bench: {what} must be >= 1, found {text!r}")
    return vals


def _ngram_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for part in str(text).split(","):
        k, sep, mx = part.strip().partition(":")
        if not sep or not k.isdigit() or not mx.isdigit():
            raise ValueError(f"bench: --ngram-settings takes K:MAX pairs (num_speculative_tokens:"
                             f"prompt_lookup_max), e.g. 2:3,4:5; found {text!r}")
        out.append((int(k), int(mx)))
    return out


def add_bench_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", help="backbone folder (default: the embedded default model)")
    ap.add_argument("--heads", help="heads folder, our layout, Medusa or Hydra (default: the "
                    "shipped heads)")
    ap.add_argument("--medusa-heads", default=None,
                    help="plain Medusa heads for vLLM's built-in Medusa and beam trees (default: "
                    "--heads if they are Medusa heads; with the shipped Hydra heads, the shipped "
                    "Medusa heads)")
    ap.add_argument("--tree", default="auto", help="our tree (medusa_tree's 'tree' option)")
    ap.add_argument("--dtype", default=None, help="default: the dtype this CPU does best "
                    "(bfloat16 with AMX or AVX-512-BF16, else float32)")
    ap.add_argument("--prompts", default="mix", help=f"{' | '.join(PROMPT_SETS)} | FILE.jsonl")
    ap.add_argument("--num-prompts", type=int, default=None, help="distinct prompts; also the requests "
                    "per level at low concurrency (full 8, quick 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="(full 128, quick 48)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--ignore-eos", action="store_true", help="every request runs to max_tokens")
    ap.add_argument("--temperature", type=float, default=0.7, help="of the sampling modes")
    ap.add_argument("--concurrency", default=None, help="requests in flight (full 1,4,16,64; quick 1,4)")
    ap.add_argument("--transports", default=None, help="offline,http (quick: offline)")
    ap.add_argument("--configs", default=None, help=f"comma-separated, from: {', '.join(CONFIGS)} "
                    f"(default {','.join(DEFAULT_CONFIGS)}; quick: vanilla, vllm_medusa, vllm_ngram, vllm_suffix, medusa_tree)")
    ap.add_argument("--add-config", action="append", default=[], metavar="NAME=JSON",
                    help="an extra configuration: NAME={speculative_config JSON}, optional "
                         "\"bench_modes\": [...] in it (repeatable)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"modes to measure, from: {', '.join(MODES)}")
    ap.add_argument("--vllm-modes", default=None, help="modes of vLLM's own speculators (default: "
                    "every mode asked for; quick: greedy)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (full 3, quick 2)")
    ap.add_argument("--medusa-ks", default=None, help="vLLM Medusa num_speculative_tokens sweep "
                    "(default 1..K heads; quick 1)")
    ap.add_argument("--ngram-settings", default=None, help="vLLM ngram sweep K:MAX pairs "
                    "(default 2:3,2:5,4:3,4:5; quick 4:5)")
    ap.add_argument("--ngram-nodes", type=int, default=4,
                    help="how deep prompt lookup goes on our tree's top-1 chain (medusa_tree_ngram)")
    ap.add_argument("--cost-curve", default="", help="tree sizes for the verification cost curve, "
                    "e.g. 1,4,16,64 (offline, concurrency 1, greedy)")
    ap.add_argument("--http-sweep", choices=("best", "all"), default="best",
                    help="HTTP runs of a swept configuration: each mode at its best offline setting "
                         "(after the offline rounds), or every setting")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="VLLM_CPU_KVCACHE_SPACE of each engine (full 4, quick 1; the environment wins)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per engine")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="offline engines run their engine core and worker in one process (vLLM's uni "
                         "executor: start-up about twice as fast, same for every configuration; full: "
                         "off, vLLM's own processes as LLM(...) runs them; quick: on)")
    ap.add_argument("--quick", action="store_true", help="a few minutes: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--out", default="runs/bench", help="folder for logs, plots, converted heads")
    ap.add_argument("--json", dest="json_path", default=None, help="default OUT/bench.json")
    ap.add_argument("--markdown", dest="markdown_path", default=None, help="default OUT/bench.md")
    return ap


def _resolve(args: argparse.Namespace) -> None:
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return "unknown"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_header(args: argparse.Namespace, env: Mapping[str, str], num_heads: int | None) -> dict[str, Any]:
    from medusa_vllm.engine.cpu.machine import machine_info

    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM's default)")
    old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = env.get("VLLM_CPU_OMP_THREADS_BIND", old or "")
    try:
        machine = machine_info().to_dict()
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
    return {
        "machine": machine, "threads_bind": bind, "dtype": args.dtype, "dtype_reason": args.dtype_reason,
        "vllm_version": _vllm_version(), "commit": _commit(),
        "command": shlex.join(["medusa-vllm", "bench", *sys.argv[2:]] if "bench" in sys.argv[1:2]
                              else sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "model": args.model, "heads": args.heads, "num_heads": num_heads, "tree": args.tree,
        "medusa_heads": getattr(args, "medusa_heads", None),
        "prompts": f"{args.prompts} ({args.num_prompts} distinct)", "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos, "temperature": args.temperature, "repeats": args.repeats,
        "concurrency": args.concurrency, "transports": args.transports, "quick": args.quick,
        "concurrency_note": CONCURRENCY_NOTE,
        "kv_cache_gib": env.get("VLLM_CPU_KVCACHE_SPACE"),
        "engine_processes": ("in-process (uni executor, no V1 multiprocessing)" if args.in_process
                             else "vLLM's own (engine core and worker processes)"),
    }


@dataclass
class Plan:
    """Everything a run needs, resolved from the arguments."""

    header: dict[str, Any]
    slots: list[EngineSlot]
    unavailable: list[dict[str, Any]]
    prompts: list[str]
    requests: dict[int, int]
    env: dict[str, str]
    out_dir: Path
    args: argparse.Namespace
    settings: dict[str, Any] = field(default_factory=dict)
    deferred: list[EngineSlot] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve the arguments into slots (prompts first: a missing corpus fails before any work)."""
    from medusa_vllm.engine.cpu.machine import preferred_dtype
    from medusa_vllm.tools.bench.prompts import load_prompts

    _resolve(args)
    concurrency = _int_list(args.concurrency, "--concurrency")
    transports = [t for t in str(args.transports).split(",") if t]
    bad = [t for t in transports if t not in ("offline", "http")]
    if bad or not transports:
        raise ValueError(f"bench: --transports takes offline and/or http, found {args.transports!r}")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"bench: --modes takes {', '.join(MODES)}, found {args.modes!r}")
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"bench: unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)} "
                         "(or --add-config NAME=JSON)")
    configs = [CONFIGS[c] for c in names] + [config_from_json(s) for s in args.add_config]
    configs += [cost_curve_config(n) for n in _int_list(args.cost_curve, "--cost-curve")]
    if "vanilla" not in [c.name for c in configs]:  # every ratio needs it
        configs.insert(0, CONFIGS["vanilla"])
    max_tokens, num_prompts = int(args.max_tokens), int(args.num_prompts)
    prompts = load_prompts(args.prompts, max(num_prompts, 2 * max(concurrency)), cache=True)

    if args.model is None or args.heads is None:
        from medusa_vllm.tools.default_model import default_model_info

        info = default_model_info()
        args.model = args.model or info["model"]
        if args.heads is None:
            args.heads = info["heads"]
            args.medusa_heads = args.medusa_heads or info["medusa_heads"]
    if args.dtype is None:
        args.dtype, args.dtype_reason = preferred_dtype(), "this CPU's best: preferred_dtype()"
    else:
        args.dtype_reason = "--dtype"
    from medusa_vllm.checkpoints import MedusaCheckpointError, plain_medusa_heads, read_heads_info

    heads_info = read_heads_info(args.heads)
    num_heads = heads_info.num_heads
    try:
        args.medusa_heads = plain_medusa_heads(args.heads, args.medusa_heads)
    except MedusaCheckpointError as exc:
        raise SystemExit(f"--medusa-heads {exc}") from None
    medusa_num_heads = read_heads_info(args.medusa_heads).num_heads if args.medusa_heads else 0
    out_dir = Path(args.out)
    ctx = BenchContext(model=args.model, heads=args.heads, num_heads=num_heads, tree=args.tree,
                       medusa_heads=args.medusa_heads or "", medusa_num_heads=medusa_num_heads,
                       medusa_ks=_int_list(args.medusa_ks, "--medusa-ks"),
                       ngram_settings=_ngram_settings(args.ngram_settings), ngram_nodes=args.ngram_nodes)
    env = {"VLLM_CONFIGURE_LOGGING": "1"}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"
    # vLLM kills an engine whose step takes over 300 s; a starved shared machine gets there
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
                   os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600"))
    from medusa_vllm.tools.engine_proc import engine_env

    full_env = {**engine_env(), **env}
    slots: list[EngineSlot] = []
    deferred: list[EngineSlot] = []  # HTTP slots of swept configs: at their best offline setting
    unavailable: list[dict[str, Any]] = []
    for cfg in configs:
        reason = cfg.available()
        if not reason and cfg.needs_medusa_heads and not ctx.medusa_heads:
            reason = (f"the heads ({args.heads}) are {heads_info.head_type} heads; this "
                      "configuration needs plain Medusa heads: pass --medusa-heads DIR")
        if reason:
            unavailable.append(unavailable_record(config=cfg.name, family=cfg.family, reason=reason))
            continue
        # vanilla also runs the reference mode of every mode asked for (ratios need it)
        wanted = set(modes) | ({reference_mode(m) for m in modes} if cfg.family == "vanilla" else set())
        if cfg.family == "vllm" and args.vllm_modes:
            wanted &= set(args.vllm_modes.split(","))
        cmodes = [m for m in cfg.modes if m in wanted]
        if not cmodes:
            continue
        if cfg.needs_vllm_heads and not ctx.vllm_heads:
            ctx.vllm_heads = str(out_dir / "heads_vllm_layout")
        variants = cfg.variants(ctx)
        for t in (["offline"] if cfg.offline_only else transports):
            if cfg.offline_only and "offline" not in transports:
                continue
            levels = [1] if cfg.offline_only else concurrency
            if t == "http" and len(variants) > 1 and "offline" in transports and args.http_sweep == "best":
                deferred.append(EngineSlot(cfg, variants[0], t, levels, cmodes, variants))  # chosen later
                continue
            slots += [EngineSlot(cfg, v, t, levels, cmodes) for v in variants]
    header = build_header(args, full_env, num_heads)
    requests = {c: requests_per_level(c, num_prompts) for c in sorted(set(concurrency) | {1})}
    return Plan(header, slots, unavailable, prompts, requests, env, out_dir, args,
                settings={"max_tokens": max_tokens, "ctx": ctx}, deferred=deferred)


def _prepare_vllm_heads(plan: Plan) -> None:
    ctx: BenchContext = plan.settings["ctx"]
    if not ctx.vllm_heads:
        return
    from medusa_vllm.checkpoints import convert, load_backbone_lm_head

    # vLLM 0.32's Medusa needs full-vocabulary LM layers: a reduced draft vocabulary
    # is expanded (zero rows elsewhere), the same top-1 proposals as our heads
    convert(ctx.medusa_heads, ctx.vllm_heads, layout="vllm", overwrite=True,
            lm_head_weight=load_backbone_lm_head(plan.args.model), expand_vocab=True)


def default_run(plan: Plan, slot: EngineSlot, rnd: int) -> dict[str, Any]:
    """Start the slot's engine, measure, stop it; the driver result."""
    from medusa_vllm.tools.bench.http import run_http
    from medusa_vllm.tools.bench.offline import offline_job, run_offline

    a = plan.args
    modes = [{"name": m, "sampling": MODES[m].sampling_params(a.temperature, plan.settings["max_tokens"],
                                                             a.ignore_eos or slot.config.family == "cost")}
             for m in slot.modes]
    safe = slot.label.replace(" ", "_").replace("[", "").replace("]", "").replace(",", "_").replace("=", "")
    log = plan.out_dir / "logs" / f"r{rnd}_{safe}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    common = {"model": a.model, "dtype": a.dtype, "max_model_len": a.max_model_len,
                  "max_num_seqs": max(slot.concurrency), "speculative_config": slot.variant.speculative_config,
                  "prompts": plan.prompts, "concurrency": slot.concurrency,
                  "requests": {c: plan.requests[c] for c in slot.concurrency}, "modes": modes}
    if slot.transport == "offline":
        return run_offline(offline_job(**common), env=plan.env, log=log, timeout=a.timeout,
                           in_process=bool(a.in_process))
    return run_http(**common, env=plan.env, log=log)


def best_offline_slots(deferred: Sequence[EngineSlot], summary: Sequence[Mapping[str, Any]]) -> list[EngineSlot]:
    """HTTP slots of the swept configurations: for each mode, the variant with the
    highest geometric-mean offline speedup (medians over rounds) across the
    concurrency levels; modes sharing a variant share its engine. A config with
    no offline result keeps its first variant."""
    import math

    out: list[EngineSlot] = []
    for slot in deferred:
        by_variant: dict[str, list[str]] = {}
        for mode in slot.modes:
            score: dict[str, list[float]] = {}
            for s in summary:
                if (s["config"] == slot.config.name and s["transport"] == "offline" and s["mode"] == mode
                        and s["speedup_vs_vanilla"]):
                    score.setdefault(s["variant"], []).append(math.log(max(s["speedup_vs_vanilla"]["median"],
                                                                           1e-9)))
            best = max(score, key=lambda v: sum(score[v]) / len(score[v])) if score else slot.variant.label
            by_variant.setdefault(best, []).append(mode)
        for label, modes in by_variant.items():
            variant = next((v for v in slot.all_variants if v.label == label), slot.variant)
            out.append(EngineSlot(slot.config, variant, "http", slot.concurrency, modes, slot.all_variants))
    return out


def _run_slot(plan: Plan, run: Callable[[Plan, EngineSlot, int], dict[str, Any]], slot: EngineSlot, rnd: int,
              records: list[dict[str, Any]], failed: dict[str, str], say: Callable[[str], None], pos: str,
              t_start: float) -> None:
    from medusa_vllm.tools.engine_proc import EngineRunError

    key = slot.label
    fam, cfg, var = slot.config.family, slot.config.name, slot.variant.label
    if key in failed:
        records.append(unavailable_record(config=cfg, family=fam, variant=var, status="failed",
                                          transport=slot.transport, repeat=rnd,
                                          reason=f"not retried: {failed[key]}"))
        return
    t0 = time.monotonic()
    say(f"[bench] {pos} round {rnd}: {key} ({', '.join(slot.modes)}) ...")
    try:
        res = run(plan, slot, rnd)
    except EngineRunError as exc:
        msg = str(exc).strip().splitlines()
        reason = " | ".join(msg[:1] + [m for m in msg[1:] if "Error" in m][:3])[:1500]
        failed[key] = reason
        records.append(unavailable_record(config=cfg, family=fam, variant=var, status="failed",
                                          transport=slot.transport, repeat=rnd, reason=reason))
        say(f"[bench]   FAILED: {reason[:300]}")
        return
    if not res.get("timers_installed") and slot.transport == "offline":
        say("[bench]   note: step timers not installed (proposer share not measured)")
    for lv in res["levels"]:
        records.append(level_record(lv, config=cfg, variant=var, family=fam, transport=slot.transport,
                                    repeat=rnd, peak_rss_mb=res.get("peak_rss_mb"),
                                    temperature=plan.args.temperature))
    say(f"[bench]   done in {time.monotonic() - t0:.0f} s (total {time.monotonic() - t_start:.0f} s)")



def run_bench(plan: Plan, run: Callable[[Plan, EngineSlot, int], dict[str, Any]] | None = None,
              say: Callable[[str], None] = print,
              progress: Callable[[list[dict[str, Any]]], None] | None = None,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the schedule; (records, summary). ``run`` (default :func:`default_run`)
    is injectable for tests. Offline slots run first when swept configurations
    wait for their best offline setting to be measured over HTTP."""
    run = run or default_run
    records: list[dict[str, Any]] = list(plan.unavailable)
    failed: dict[str, str] = {}
    offline = [s for s in plan.slots if s.transport == "offline"]
    http = [s for s in plan.slots if s.transport == "http"]
    t_start = time.monotonic()
    phases = [offline, http] if plan.deferred else [offline + http]
    for p, slots in enumerate(phases):
        if p == 1:  # the swept configs over HTTP: each mode at its best offline setting
            annotate(records)
            rank = {n: i for i, n in enumerate(dict.fromkeys(s.config.name for s in plan.slots + plan.deferred))}
            slots = sorted(slots + best_offline_slots(plan.deferred, summarize(records)),
                           key=lambda s: rank[s.config.name])
        order = schedule(slots, plan.args.repeats) if slots else []
        for i, (rnd, slot) in enumerate(order, 1):
            _run_slot(plan, run, slot, rnd, records, failed, say, f"{i}/{len(order)}", t_start)
            if progress is not None:
                progress(records)
    annotate(records)
    return records, summarize(records)


def write_outputs(plan: Plan, records: list[dict[str, Any]], summary: list[dict[str, Any]],
                  plots: bool = True) -> tuple[Path, Path, list[Path]]:
    from medusa_vllm.tools.bench.plots import write_plots

    a = plan.args
    json_path = Path(a.json_path or plan.out_dir / "bench.json")
    md_path = Path(a.markdown_path or plan.out_dir / "bench.md")
    for p in (json_path, md_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"header": plan.header, "records": records, "summary": summary}, indent=1))
    md = markdown(plan.header, summary, records)
    md_path.write_text(md + "\n")
    pngs = write_plots(plan.header, summary, plan.out_dir) if plots else []
    return json_path, md_path, pngs


def bench_main(args: argparse.Namespace, run: Callable[[Plan, EngineSlot, int], dict[str, Any]] | None = None) -> int:
    from medusa_vllm.training.corpora.common import MissingCorpus

    try:
        plan = make_plan(args)
    except MissingCorpus as exc:
        print(f"medusa-vllm bench: error: {exc}", file=sys.stderr)
        return 2
    h = plan.header
    print(f"[bench] {h['machine']['cpu_model']} ({h['machine']['isa']}), dtype {h['dtype']} "
          f"({h['dtype_reason']}), VLLM_CPU_OMP_THREADS_BIND={h['threads_bind']}, vLLM {h['vllm_version']}",
          flush=True)
    for r in plan.unavailable:
        print(f"[bench] {r['config']}: unavailable: {r['reason']}", flush=True)
    slots = plan.slots + plan.deferred
    passes = sum(len(s.modes) for s in slots)
    tokens = sum(len(s.modes) * plan.requests[c] for s in slots for c in s.concurrency) * args.max_tokens
    print(f"[bench] {len(slots)} engines x {args.repeats} rounds ({len(slots) * args.repeats} engine starts"
          f"{', HTTP sweeps at their best offline setting' if plan.deferred else ''}); {passes} timed "
          f"passes per round over concurrency {args.concurrency}, up to {tokens * args.repeats} output "
          f"tokens in all; transports {args.transports}", flush=True)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if run is None:
        _prepare_vllm_heads(plan)
    def partial(records: list[dict[str, Any]]) -> None:
        """After every engine: what is measured so far, in OUT/partial/ (a run cut short keeps it)."""
        import copy

        recs = annotate(copy.deepcopy(records))
        summ = summarize(recs)
        part = plan.out_dir / "partial"
        part.mkdir(parents=True, exist_ok=True)
        (part / "bench.json").write_text(json.dumps({"header": plan.header, "records": recs,
                                                     "summary": summ}, indent=1))
        (part / "bench.md").write_text(markdown(plan.header, summ, recs) + "\n")

    records, summary = run_bench(plan, run, say=lambda s: print(s, flush=True), progress=partial)
    json_path, md_path, pngs = write_outputs(plan, records, summary)
    print("\n" + md_path.read_text())
    print(f"[bench] wrote {json_path}, {md_path}" + (f", {', '.join(str(p) for p in pngs)}" if pngs else ""))
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in ok if r["mode"] == "greedy" and r.get("same_output_as_vanilla") not in (None, 1.0)
           and plan.args.dtype == "float32"]
    if bad:
        print("[bench] WARNING: float32 greedy output differs from vanilla for "
              + ", ".join(sorted({f"{r['config']} {r['variant']} [{r['transport']} c={r['concurrency']}]"
                                  for r in bad})), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(add_bench_args(argparse.ArgumentParser(description=__doc__)).parse_args()))
