"""Records, ratios, spread, best settings and the markdown table.

One record per (config, variant, transport, concurrency, mode, repeat)
(:func:`level_record`). Ratios are taken within a round (:func:`annotate`):
a record's ``speedup_vs_vanilla`` divides its tokens/s by vanilla's at the same
transport, concurrency and repeat, in the reference mode (greedy against
greedy, every sampling mode against vanilla sampling at the same temperature,
:func:`medusa_vllm.tools.bench.configs.reference_mode`). Then
:func:`summarize` groups the rounds: the spread (min / median / max) of each
ratio, the best variant of each swept configuration (highest median speedup;
every variant stays in the records), and ``speedup_vs_best_vllm``: per round,
against the best of vLLM's own speculators at that transport, concurrency and
reference mode (that speculator's best setting, chosen by median).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medusa_vllm.tools.bench.configs import reference_mode

__all__ = ["annotate", "level_record", "markdown", "percentile", "spread", "summarize"]

KEY = ("config", "variant", "transport", "concurrency", "mode")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; ``None`` if empty."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """min / median / max of the values present, ``None`` if none."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}


def _ms(values: Sequence[float | None]) -> dict[str, float | None]:
    ms = [1000.0 * x for x in values if x is not None]
    return {"median": percentile(ms, 50), "p90": percentile(ms, 90)}


def level_record(level: Mapping[str, Any], *, config: str, variant: str, family: str, transport: str,
                 repeat: int, peak_rss_mb: Mapping[str, Any] | None, temperature: float) -> dict[str, Any]:
    """One record from one measurement of a driver result (offline or HTTP)."""
    reqs = level["requests"]
    tokens = sum(int(r["tokens"]) for r in reqs)
    spec = dict(level.get("spec") or {})
    depth = list(spec.get("acceptance_per_depth") or [])
    while depth and depth[-1] == 0:  # positions past the drafts' depth never accept
        depth.pop()
    timers = level.get("timers") or None
    return {
        "config": config, "variant": variant, "family": family, "transport": transport,
        "concurrency": int(level["concurrency"]), "mode": level["mode"], "repeat": int(repeat),
        "status": "ok", "reason": None,
        "temperature": temperature if level["mode"] != "greedy" else 0.0,
        "requests": len(reqs), "output_tokens": tokens, "wall_s": float(level["wall_s"]),
        "tokens_per_s": tokens / level["wall_s"] if level["wall_s"] > 0 else None,
        "tpot_ms": _ms([r.get("tpot_s") for r in reqs]),
        "ttft_ms": _ms([r.get("ttft_s") for r in reqs]),
        "mean_accepted_length": spec.get("mean_accepted_length", 1.0) if spec.get("num_drafts") else None,
        "acceptance_per_depth": depth,
        "spec": spec,
        "proposer_share": timers.get("proposer_share") if timers else None,
        "step_ms": timers.get("step_ms") if timers else None,
        "peak_rss_mb": dict(peak_rss_mb or {}),
        "num_preemptions": int(level.get("num_preemptions") or 0),
        # greedy only, removed by annotate() once compared with vanilla's
        "_outputs": [r.get("token_ids", r.get("text")) for r in reqs] if level["mode"] == "greedy" else None,
    }


def unavailable_record(*, config: str, family: str, reason: str, status: str = "unavailable",
                       transport: str | None = None, repeat: int | None = None,
                       variant: str = "") -> dict[str, Any]:
    return {"config": config, "variant": variant, "family": family, "transport": transport,
            "concurrency": None, "mode": None, "repeat": repeat, "status": status, "reason": reason}


def _round_key(r: Mapping[str, Any], mode: str | None = None) -> tuple:
    return (r["transport"], r["concurrency"], mode or r["mode"], r["repeat"])


def annotate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the same-round ratios against vanilla to each ``ok`` record:
    ``speedup_vs_vanilla``, ``step_cost_vs_vanilla`` (time per output token
    times accepted length, over vanilla's time per output token: one step's
    cost in vanilla decode steps), ``same_output_as_vanilla`` (greedy: the
    fraction of requests whose output equals vanilla's). In place; returns
    ``records``."""
    van = {_round_key(r): r for r in records if r["status"] == "ok" and r["config"] == "vanilla"}
    for r in records:
        if r["status"] != "ok":
            continue
        v = van.get(_round_key(r, reference_mode(r["mode"])))
        r["speedup_vs_vanilla"] = (r["tokens_per_s"] / v["tokens_per_s"]
                                   if v and r["tokens_per_s"] and v["tokens_per_s"] else None)
        tp, vtp = r["tpot_ms"]["median"], (v["tpot_ms"]["median"] if v else None)
        r["step_cost_vs_vanilla"] = (tp * (r["mean_accepted_length"] or 1.0) / vtp
                                     if tp is not None and vtp else None)
        if "_outputs" in r:  # compared once (annotate may run again after more rounds)
            mine, theirs = r["_outputs"], (v.get("_outputs") if v else None)
            r["same_output_as_vanilla"] = (sum(a == b for a, b in zip(mine, theirs)) / len(mine)
                                           if mine and theirs and len(mine) == len(theirs) else None)
        r.setdefault("same_output_as_vanilla", None)
    for r in records:
        r.pop("_outputs", None)
    return records


def _median_of(rs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    v = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(v) if v else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, variant, transport, concurrency, mode) over its
    repeats, ``best`` marking each configuration's best variant; fills each
    record's ``speedup_vs_best_vllm`` (same round) on the way."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["status"] == "ok":
            groups[tuple(r[k] for k in KEY)].append(r)
    med = {k: _median_of(rs, "speedup_vs_vanilla") for k, rs in groups.items()}
    # best variant of each configuration at each (transport, concurrency, mode)
    best: dict[tuple, tuple] = {}
    for k in groups:
        slot = (k[0], k[2], k[3], k[4])
        if slot not in best or (med[k] or 0.0) > (med[best[slot]] or 0.0):
            best[slot] = k
    family = {tuple(r[k] for k in KEY): r["family"] for rs in groups.values() for r in rs}
    # best of vLLM's own speculators at each (transport, concurrency, mode)
    best_vllm: dict[tuple, tuple] = {}
    for slot, k in best.items():
        if family[k] != "vllm":
            continue
        s = (slot[1], slot[2], slot[3])
        if s not in best_vllm or (med[k] or 0.0) > (med[best_vllm[s]] or 0.0):
            best_vllm[s] = k
    by_round = {(k, r["repeat"]): r for k, rs in groups.items() for r in rs}
    for k, rs in groups.items():
        ref = best_vllm.get((k[2], k[3], reference_mode(k[4])))
        for r in rs:
            b = by_round.get((ref, r["repeat"])) if ref else None
            r["speedup_vs_best_vllm"] = (r["tokens_per_s"] / b["tokens_per_s"]
                                         if b and r["tokens_per_s"] and b["tokens_per_s"] else None)
            r["best_vllm"] = f"{ref[0]} {ref[1]}".strip() if ref else None
    rows = []
    for k, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["repeat"])
        depth_n = max((len(r["acceptance_per_depth"]) for r in rs), default=0)
        depth = [statistics.median([r["acceptance_per_depth"][d] if d < len(r["acceptance_per_depth"])
                                    else 0.0 for r in rs]) for d in range(depth_n)]
        rss = [(r["peak_rss_mb"] or {}).get("worker") for r in rs]
        same = [r.get("same_output_as_vanilla") for r in rs if r.get("same_output_as_vanilla") is not None]
        rows.append({
            **dict(zip(KEY, k)), "family": rs[0]["family"], "repeats": len(rs),
            "best": best[(k[0], k[2], k[3], k[4])] == k,
            "tokens_per_s": spread(r["tokens_per_s"] for r in rs),
            "speedup_vs_vanilla": spread(r.get("speedup_vs_vanilla") for r in rs),
            "speedup_vs_best_vllm": spread(r.get("speedup_vs_best_vllm") for r in rs),
            "best_vllm": rs[0].get("best_vllm"),
            "tpot_ms_median": _median_of([r["tpot_ms"] for r in rs], "median"),
            "tpot_ms_p90": _median_of([r["tpot_ms"] for r in rs], "p90"),
            "ttft_ms_median": _median_of([r["ttft_ms"] for r in rs], "median"),
            "ttft_ms_p90": _median_of([r["ttft_ms"] for r in rs], "p90"),
            "mean_accepted_length": _median_of(rs, "mean_accepted_length"),
            "acceptance_per_depth": depth,
            "proposer_share": _median_of(rs, "proposer_share"),
            "step_cost_vs_vanilla": _median_of(rs, "step_cost_vs_vanilla"),
            "step_ms": _median_of(rs, "step_ms"),
            "peak_rss_mb": max((x for x in rss if x is not None), default=None),
            "same_output_as_vanilla": min(same) if same else None,
            "num_preemptions": sum(r["num_preemptions"] for r in rs),
        })
    order = {"vanilla": 0, "vllm": 1, "ours": 2, "cost": 3}
    rows.sort(key=lambda x: (x["transport"], x["concurrency"], x["mode"] != "greedy",
                             order.get(x["family"], 9), x["config"], x["variant"]))
    return rows


# ------------------------------------------------------------------ markdown
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _sp(s: Mapping[str, float] | None) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} ({s['min']:.2f}–{s['max']:.2f})"


def header_lines(header: Mapping[str, Any]) -> list[str]:
    m = header.get("machine", {})
    return [
        (f"- machine: {m.get('cpu_model')} ({m.get('isa')}), {m.get('threads')} of {m.get('cores')} cores "
        f"bound (VLLM_CPU_OMP_THREADS_BIND={header.get('threads_bind')}), load average at start "
        f"{header.get('load_average')}"),
        (f"- dtype {header.get('dtype')} ({header.get('dtype_reason')}); vLLM {header.get('vllm_version')}; "
        f"medusa-vllm commit {header.get('commit')}; offline engine processes: "
        f"{header.get('engine_processes', 'not recorded')}"),
        (f"- model {header.get('model')}; heads {header.get('heads')} ({header.get('num_heads')} heads, "
        f"tree {header.get('tree')})"),
        (f"- prompts: {header.get('prompts')}; max_tokens {header.get('max_tokens')}; sampling temperature "
        f"{header.get('temperature')}; repeats {header.get('repeats')} (interleaved, ratios within a round)"),
        f"- concurrency: {header.get('concurrency_note')}",
        f"- command: `{header.get('command')}`",
    ]


COLUMNS = ("c", "configuration", "mode", "setting", "tok/s", "× vanilla", "× best vLLM", "TPOT ms med/p90",
           "TTFT ms med/p90", "acc. len", "step cost", "acceptance per depth", "proposer share", "worker peak RSS MiB",
           "same as vanilla")


def _row(s: Mapping[str, Any]) -> str:
    depth = ", ".join(f"{a:.2f}" for a in s["acceptance_per_depth"]) or "–"
    same = "–" if s["same_output_as_vanilla"] is None else f"{100 * s['same_output_as_vanilla']:.0f}%"
    cells = [
        str(s["concurrency"]), s["config"], s["mode"], s["variant"] or "–",
        _f((s["tokens_per_s"] or {}).get("median"), ".1f"), _sp(s["speedup_vs_vanilla"]),
        _sp(s["speedup_vs_best_vllm"]),
        f"{_f(s['tpot_ms_median'], '.1f')} / {_f(s['tpot_ms_p90'], '.1f')}",
        f"{_f(s['ttft_ms_median'], '.0f')} / {_f(s['ttft_ms_p90'], '.0f')}",
        _f(s["mean_accepted_length"]), _f(s["step_cost_vs_vanilla"]), depth,
        "not measured" if s["proposer_share"] is None else f"{100 * s['proposer_share']:.1f}%",
        _f(s["peak_rss_mb"], ".0f"), same,
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(header: Mapping[str, Any], summary: Sequence[Mapping[str, Any]],
             records: Sequence[Mapping[str, Any]]) -> str:
    """The report: machine header, one table per transport (each
    configuration's best setting), the unavailable or failed configurations,
    every swept setting, the cost curve."""
    out = ["# medusa-vllm bench", "", *header_lines(header), "",
           ("Ratios: median (min–max) over the rounds, each round against vanilla of the same round "
           "(sampling modes against vanilla sampling at the same temperature); × best vLLM: against "
           "the best of vLLM's own speculators (its best setting) in the same round and mode. "
           "TPOT: time per output token per request; TTFT: time to first token. Step cost: TPOT "
           "x accepted length over vanilla's TPOT (one engine step in vanilla decode steps). "
           "Proposer share: time in the drafter over engine step time (offline only)."), ""]
    main = [s for s in summary if s["best"] and s["family"] != "cost"]
    for transport in sorted({s["transport"] for s in main}):
        out += [f"## {transport}", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        out += [_row(s) for s in main if s["transport"] == transport]
        out.append("")
    bad = [r for r in records if r["status"] != "ok"]
    if bad:
        out += ["## not measured", ""]
        seen = set()
        for r in bad:
            key = (r["config"], r["variant"], r["status"], r["reason"])
            if key not in seen:
                seen.add(key)
                label = f"{r['config']} {r['variant']}".strip()
                out.append(f"- **{label}** ({r['status']}): {r['reason']}")
        out.append("")
    swept = [s for s in summary if s["family"] != "cost" and s["variant"]]
    if swept:
        out += ["## every setting of the swept configurations (× vanilla, median (min–max))", "",
                "| transport | c | configuration | mode | setting | × vanilla | acc. len | best |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {s['transport']} | {s['concurrency']} | {s['config']} | {s['mode']} | {s['variant']} | "
                f"{_sp(s['speedup_vs_vanilla'])} | {_f(s['mean_accepted_length'])} | "
                f"{'yes' if s['best'] else ''} |" for s in swept]
        out.append("")
    cost = [s for s in summary if s["family"] == "cost"]
    if cost:
        van = [s for s in summary if s["config"] == "vanilla" and s["mode"] == "greedy"
               and s["transport"] == "offline" and s["concurrency"] == 1]
        out += ["## verification cost curve (offline, concurrency 1, greedy)", "",
                "| tree | step cost vs vanilla | acc. len | × vanilla | engine step ms |", "|---|---|---|---|---|"]
        for s in sorted(cost, key=lambda s: int(s["config"].split("-")[1])):
            out.append(f"| {s['config']} | {_f(s['step_cost_vs_vanilla'])} | {_f(s['mean_accepted_length'])} | "
                       f"{_sp(s['speedup_vs_vanilla'])} | {_f(s['step_ms'], '.1f')} |")
        if van:
            out.append(f"\nvanilla TPOT {_f(van[0]['tpot_ms_median'], '.1f')} ms")
        out.append("")
    return "\n".join(out)
