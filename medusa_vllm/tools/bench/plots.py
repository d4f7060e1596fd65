"""PNG plots of a bench summary (matplotlib, Agg backend, no display needed).

- ``speedup_<transport>.png``: speedup against vanilla vs concurrency, one
  line per (configuration, mode) at its best setting, the min–max spread over
  rounds as error bars; one panel per mode family (greedy, sampling).
- ``acceptance_per_depth.png``: per-depth acceptance (fraction of drafted
  steps whose accepted path reached depth d) of every speculative
  configuration, one panel per concurrency, offline where measured.

Each figure carries the machine header line as its subtitle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_plots"]


def _subtitle(header: Mapping[str, Any]) -> str:
    m = header.get("machine", {})
    return (f"{m.get('cpu_model')} ({m.get('isa')}, {m.get('threads')} threads), {header.get('dtype')}, "
            f"vLLM {header.get('vllm_version')}")


def write_plots(header: Mapping[str, Any], summary: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write the PNGs into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    main = [s for s in summary if s["best"] and s["family"] != "cost" and s["speedup_vs_vanilla"]]
    for transport in sorted({s["transport"] for s in main}):
        rows = [s for s in main if s["transport"] == transport]
        panels = [("greedy", [s for s in rows if s["mode"] == "greedy"]),
                  ("sampling", [s for s in rows if s["mode"] != "greedy"])]
        panels = [p for p in panels if p[1]]
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, (title, rs) in zip(axes[0], panels):
            for cfg, mode in sorted({(s["config"], s["mode"]) for s in rs}):
                pts = sorted((s["concurrency"], s["speedup_vs_vanilla"]) for s in rs
                             if s["config"] == cfg and s["mode"] == mode)
                xs = [p[0] for p in pts]
                med = [p[1]["median"] for p in pts]
                err = [[m - p[1]["min"] for m, p in zip(med, pts)], [p[1]["max"] - m for m, p in zip(med, pts)]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=f"{cfg} ({mode})")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({s["concurrency"] for s in rs}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("requests in flight")
            ax.set_ylabel("output tokens/s vs vanilla (same round)")
            ax.set_title(f"{transport}, {title}")
            ax.legend(fontsize=7)
        fig.suptitle(_subtitle(header), fontsize=8)
        fig.tight_layout()
        path = out_dir / f"speedup_{transport}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    acc = [s for s in summary if s["best"] and s["acceptance_per_depth"]]
    if acc:
        transport = "offline" if any(s["transport"] == "offline" for s in acc) else acc[0]["transport"]
        acc = [s for s in acc if s["transport"] == transport]
        levels = sorted({s["concurrency"] for s in acc})
        fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 4), squeeze=False, sharey=True)
        for ax, c in zip(axes[0], levels):
            for s in (s for s in acc if s["concurrency"] == c):
                d = s["acceptance_per_depth"]
                name = f"{s['config']} {s['variant']}".strip()
                ax.plot(range(1, len(d) + 1), d, marker="o", label=f"{name} ({s['mode']})")
            depth = max(len(s["acceptance_per_depth"]) for s in acc)
            ax.set_xticks(range(1, depth + 1))
            ax.set_xlabel("depth")
            ax.set_title(f"{transport}, {c} in flight")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel("fraction of steps accepting to this depth")
        fig.suptitle(_subtitle(header), fontsize=8)
        fig.tight_layout()
        path = out_dir / "acceptance_per_depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
