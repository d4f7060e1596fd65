"""The translation test split and its prompt template.

Test verses are the Reina-Valera 1909 / World English Bible pairs of the chapters
that the corpus split puts in ``"heldout"``
(:func:`medusa_vllm.training.corpora.bible.load_bible_pairs`, a salted hash of the
chapter name, 10% of chapters). Training prompts (the shipped heads'
self-distillation included) are built only from ``"train"`` chapters, for both the
translation pairs and the English Bible passages, so no test verse, Spanish or
English, appears in any training prompt. The order is fixed too: verses sorted by a
salted hash of their key (:data:`ORDER_SALT`), so the first ``n`` (``--quick``,
``--num-verses``) are spread over books and chapters and are the same on every run.

Each verse becomes one user turn, :data:`PROMPT_TEMPLATE` with the Spanish text,
under the model's chat template (applied in the engine process,
:func:`medusa_vllm.tools.engine_proc.chat_prompt`). The hypothesis is the model's
whole answer with whitespace collapsed (:func:`clean_hypothesis`): no answer
extraction, the same for every row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "ORDER_SALT",
    "PROMPT_TEMPLATE",
    "EvalVerse",
    "clean_hypothesis",
    "load_test_split",
    "order_key",
    "ordered_verses",
    "render_prompt",
]

PROMPT_TEMPLATE = "Translate this Spanish Bible verse into English:\n\n{es}"
ORDER_SALT = "medusa-vllm-eval-translation-v1"


@dataclass(frozen=True)
class EvalVerse:
    """One test pair: Sword key (``"Judges 8:6"``), chapter, Spanish source, English reference."""

    key: str
    book: str
    chapter: int
    es: str
    en: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def order_key(key: str) -> bytes:
    """Sort key of a verse in the test order (salted SHA-256 of its Sword key)."""
    return hashlib.sha256(f"{ORDER_SALT}\x00{key}".encode()).digest()


def ordered_verses(pairs: Sequence[Mapping[str, object]], n: int | None = None) -> list[EvalVerse]:
    """``pairs`` (dicts with key, book, chapter, es, en) in the fixed test order,
    the first ``n`` of them (``None``: all)."""
    if n is not None and n < 1:
        raise ValueError(f"number of test verses: expected an integer >= 1, found {n}")
    ordered = sorted(pairs, key=lambda p: order_key(str(p["key"])))
    out = [EvalVerse(str(p["key"]), str(p["book"]), int(p["chapter"]), str(p["es"]), str(p["en"]))  # type: ignore[call-overload]
           for p in ordered]
    if n is not None and n > len(out):
        raise ValueError(f"asked for {n} test verses but the held-out split holds {len(out)}")
    return out if n is None else out[:n]


def load_test_split(n: int | None = None) -> list[EvalVerse]:
    """The first ``n`` verses of the held-out chapters in the fixed test order.

    Raises :class:`medusa_vllm.training.corpora.common.MissingCorpus` (naming the
    apt-get command) when the Sword packages are not installed.
    """
    from medusa_vllm.training.corpora.bible import load_bible_pairs

    return ordered_verses(load_bible_pairs(split="heldout"), n)


def render_prompt(verse: EvalVerse, template: str = PROMPT_TEMPLATE) -> str:
    """The user turn for ``verse`` (before the chat template)."""
    return template.format(es=verse.es)


def clean_hypothesis(text: str) -> str:
    """The scored hypothesis: the answer with runs of whitespace collapsed to one space."""
    return " ".join(text.split())
