"""The named corpus sources and their passages: one entry point over the readers."""

from __future__ import annotations

from medusa_vllm.training.corpora.bible import (
    ENGLISH_BIBLES,
    bible_passages,
    load_bible_pairs,
    sword_verses,
    translation_passages,
)
from medusa_vllm.training.corpora.common import MissingCorpus, Passage
from medusa_vllm.training.corpora.fortunes import fortune_passages
from medusa_vllm.training.corpora.python_docs import python_docs_passages

SOURCES: tuple[str, ...] = ("python-docs", "fortunes", "bible", "bible-translation")


def load_source_passages(source: str, *, max_chars: int = 700) -> list[Passage]:
    """All passages of one named source (see :data:`SOURCES`)."""
    if source == "python-docs":
        return python_docs_passages(max_chars=max_chars)
    if source == "fortunes":
        return fortune_passages(max_chars=max_chars)
    if source == "bible":
        return [p for p in bible_passages(sword_verses(ENGLISH_BIBLES["web"])) if len(p.text) <= max_chars]
    if source == "bible-translation":
        return [p for p in translation_passages(load_bible_pairs()) if len(p.text) <= max_chars]
    raise ValueError(f"source: expected one of {SOURCES}, found {source!r}")


def corpus_stats() -> dict[str, int]:
    """Number of passages per available source (sources whose package is missing are -1)."""
    stats = {}
    for source in SOURCES:
        try:
            stats[source] = len(load_source_passages(source))
        except MissingCorpus:
            stats[source] = -1
    return stats


__all__ = ["SOURCES", "corpus_stats", "load_source_passages"]
