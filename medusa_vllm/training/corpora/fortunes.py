"""Passages of the fortune files (Debian ``fortunes``): quotes, jokes and poems.

Records are separated by lines holding only ``%``; ASCII drawings, tables and the
categories most likely to hold offensive jokes (:data:`FORTUNES_EXCLUDE`) are left out.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from pathlib import Path

from medusa_vllm.training.corpora.common import Passage, missing_corpus

FORTUNES_DIR = Path("/usr/share/games/fortunes")

#: Fortune files left out by default: ASCII drawings, and the categories most likely to
#: hold offensive jokes (the ``fortunes`` package ships without the ``-off`` set).
FORTUNES_EXCLUDE: frozenset[str] = frozenset({"ascii-art", "art", "ethnic", "men-women", "drugs", "politics"})


def parse_fortunes(text: str, ref: str, *, min_chars: int = 40, max_chars: int = 600) -> list[Passage]:
    """Records of one fortune file (separated by lines holding only ``%``).

    Keeps records of ``min_chars``..``max_chars`` characters that are mostly letters
    (drops ASCII drawings and tables).
    """
    out = []
    for rec in re.split(r"(?m)^%\s*$", text):
        lines = [line.rstrip().replace("\t", "  ") for line in rec.strip("\n").splitlines()]
        rec = textwrap.dedent("\n".join(lines)).strip()
        if not (min_chars <= len(rec) <= max_chars):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in rec)
        if letters < 0.8 * len(rec):
            continue
        out.append(Passage("fortunes", "quote", rec, ref))
    return out


def fortune_passages(
    root: str | Path | None = None, exclude: Iterable[str] = FORTUNES_EXCLUDE, **kwargs: int
) -> list[Passage]:
    """Passages from every fortune file in ``root`` except ``exclude`` (sorted order)."""
    base = Path(root) if root is not None else FORTUNES_DIR
    if not base.is_dir():
        raise missing_corpus("Fortune files", base, "fortunes")
    skip = set(exclude)
    out: list[Passage] = []
    for path in sorted(base.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file() or path.name in skip:
            continue
        out.extend(parse_fortunes(path.read_text(encoding="utf-8", errors="replace"), path.name, **kwargs))
    if not out:
        raise missing_corpus("Fortune records", base, "fortunes")
    return out


__all__ = ["FORTUNES_DIR", "FORTUNES_EXCLUDE", "fortune_passages", "parse_fortunes"]
