"""The translation table as markdown, JSON and a plot (BLEU vs real-time factor).

Rows are :func:`medusa_vllm.tools.eval.translation.score_row` dicts: ``name``,
``group``, ``available`` (and ``reason`` when not), the scores (``bleu``,
``rouge1``, ``rouge2``, ``rougeL``, ``rtf``, ``mean_accepted_length``,
``tokens_per_s``), ``lossless`` (``True``/``False`` for rows that must match
vanilla greedy, else ``None``) and ``note``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "markdown_table", "plot_quality_vs_rtf", "write_json", "write_translations"]

#: (header, row key, format) of the table's numeric columns.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("BLEU", "bleu", "{:.2f}"),
    ("ROUGE-1", "rouge1", "{:.3f}"),
    ("ROUGE-2", "rouge2", "{:.3f}"),
    ("ROUGE-L", "rougeL", "{:.3f}"),
    ("RTF", "rtf", "{:.2f}"),
    ("acc. len", "mean_accepted_length", "{:.2f}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def _note(row: Mapping[str, Any]) -> str:
    if not row.get("available", True):
        return f"not available: {row.get('reason') or 'unknown'}"
    parts = [str(row["note"])] if row.get("note") else []
    if row.get("lossless") is True:
        parts.append("= vanilla greedy output")
    return "; ".join(parts)


def markdown_table(rows: Sequence[Mapping[str, Any]], header: Mapping[str, Any] | None = None) -> str:
    """The table (one line per row, unavailable rows with their reason), after
    ``header`` lines (``key: value``) when given."""
    lines = []
    for k, v in (header or {}).items():
        lines.append(f"- {k}: {v}")
    if lines:
        lines.append("")
    lines.append("| Decoding strategy | " + " | ".join(c[0] for c in COLUMNS) + " | note |")
    lines.append("|---|" + "---:|" * len(COLUMNS) + "---|")
    for r in rows:
        cells = [_cell(r, key, fmt) for _, key, fmt in COLUMNS] if r.get("available", True) else \
            ["n/a"] * len(COLUMNS)
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {_note(r)} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, header: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """``{"header": ..., "rows": [...]}`` (indented JSON)."""
    path.write_text(json.dumps({"header": dict(header), "rows": list(rows)}, indent=1, ensure_ascii=False))
    return path


def write_translations(path: Path, verses: Sequence[Mapping[str, Any]],
                       outputs: Mapping[str, Sequence[str]]) -> Path:
    """One JSON line per verse: key, Spanish, English reference and each row's hypothesis."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, v in enumerate(verses):
            rec = dict(v)
            rec["hypotheses"] = {name: texts[i] for name, texts in outputs.items()}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


_COLORS = {"vanilla": "black", "sampling": "grey", "medusa": "tab:blue", "typical": "tab:orange",
           "beam_medusa": "tab:green", "vllm_beam": "tab:red"}


def plot_quality_vs_rtf(path: Path, rows: Sequence[Mapping[str, Any]], title: str = "") -> Path | None:
    """Scatter of BLEU against RTF, one labelled point per available row (PNG);
    ``None`` when no row has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("available", True) and r.get("bleu") is not None and r.get("rtf") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    seen: set[str] = set()
    for r in pts:
        g = str(r.get("group", ""))
        ax.scatter(r["rtf"], r["bleu"], color=_COLORS.get(g, "tab:purple"),
                   label=None if g in seen else g, zorder=3)
        seen.add(g)
        ax.annotate(str(r["name"]), (r["rtf"], r["bleu"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axvline(1.0, color="black", lw=0.6, ls=":")
    ax.set_xlabel("real-time factor (wall time / vanilla greedy's; lower is faster)")
    ax.set_ylabel("BLEU (sacrebleu, corpus)")
    ax.set_title(title or "Spanish -> English Bible verses: quality vs speed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
