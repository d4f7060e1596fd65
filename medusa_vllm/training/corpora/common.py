"""What every corpus reader shares: packages, errors, cache, JSONL files, passages, splits.

Nothing in :mod:`medusa_vllm.training.corpora` downloads anything: the texts come from
Debian packages installed with ``apt-get`` (see :data:`APT_PACKAGES`):

* ``python3.11-doc`` -- reStructuredText sources of the Python documentation
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``): prose paragraphs and
  code examples (:mod:`.python_docs`).
* ``fortunes`` -- quotes, jokes and poems (``/usr/share/games/fortunes``,
  :mod:`.fortunes`).
* ``sword-text-web`` (World English Bible) and ``sword-text-sparv`` (Reina-Valera
  1909), read through ``python3-sword`` -- English passages and a Spanish-English
  verse-aligned parallel corpus (both use KJV verse numbering for the canonical books;
  :mod:`.bible`).

A missing package raises :class:`MissingCorpus` naming the path, the package and the
``apt-get`` command. Every passage gets a deterministic train/held-out split from a
hash of its group key (normalised text; the chapter for Bible texts), and training
passages whose text equals a held-out passage are dropped (:func:`split_passages`), so
a held-out prompt never appears in the training set.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

#: Debian packages the corpus readers read (install with ``apt-get install -y --no-install-recommends``).
APT_PACKAGES: tuple[str, ...] = (
    "python3.11-doc",
    "fortunes",
    "python3-sword",
    "sword-text-web",
    "sword-text-sparv",
)
#: Optional: King James Version, for ``english="kjv"`` pairs.
APT_PACKAGES_OPTIONAL: tuple[str, ...] = ("sword-text-kjv",)

#: Bump when extraction or cleaning changes: cache files carry it in their name.
DATA_VERSION = 2
SPLIT_SALT = "medusa-vllm-split-v1"
DEFAULT_HELDOUT_FRACTION = 0.1


class MissingCorpus(RuntimeError):
    """A Debian package that holds a corpus is not installed."""


def _apt_fix(*packages: str) -> str:
    return "apt-get update && apt-get install -y --no-install-recommends " + " ".join(packages)


def missing_corpus(what: str, path: Path | str, *packages: str) -> MissingCorpus:
    """Error for a corpus not found, naming the path, the package(s) and the fix."""
    return MissingCorpus(
        f"{what} not found at {path} (Debian package {', '.join(packages)}). Fix: {_apt_fix(*packages)}"
    )


def data_cache_dir() -> Path:
    """``$MEDUSA_VLLM_CACHE/data`` (default ``~/.cache/medusa-vllm/data``)."""
    env = os.environ.get("MEDUSA_VLLM_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "medusa-vllm"
    return root / "data"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Write ``rows`` as JSON lines (UTF-8, atomically)."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass(frozen=True)
class Passage:
    """A piece of source text that one prompt is built from.

    Attributes:
        source: corpus name, one of :data:`~medusa_vllm.training.corpora.sources.SOURCES`.
        kind: ``prose``, ``code``, ``quote``, ``scripture`` or ``parallel``.
        text: the passage (for ``parallel``: the Spanish side).
        ref: where it comes from (file, Bible reference).
        title: context such as the documentation section, or "" if none.
        group: split key; passages with the same group share a split.
        target: reference answer if any (for ``parallel``: the English side).
    """

    source: str
    kind: str
    text: str
    ref: str
    title: str = ""
    group: str = ""
    target: str = ""

    @property
    def split_key(self) -> str:
        return self.group or normalize_text(self.text)


def normalize_text(text: str) -> str:
    """Lower-cased text with whitespace collapsed (used for de-duplication)."""
    return " ".join(text.lower().split())


def split_of(key: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, salt: str = SPLIT_SALT) -> str:
    """``"heldout"`` or ``"train"`` for ``key``, from a stable hash (same on every run)."""
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction: expected a value in [0, 1], found {heldout_fraction!r}")
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"


def split_passages(
    passages: Iterable[Passage],
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    salt: str = SPLIT_SALT,
) -> tuple[list[Passage], list[Passage]]:
    """Split into ``(train, heldout)`` by :func:`split_of` on each passage's group key.

    Within each split, passages with the same normalised text are kept once; training
    passages whose text also occurs in the held-out split are dropped, so the two
    never share a passage (and therefore never share a prompt).
    """
    train: list[Passage] = []
    heldout: list[Passage] = []
    for p in passages:
        (heldout if split_of(p.split_key, heldout_fraction, salt) == "heldout" else train).append(p)
    heldout = _dedupe(heldout)
    held_texts = {normalize_text(p.text) for p in heldout}
    train = [p for p in _dedupe(train) if normalize_text(p.text) not in held_texts]
    return train, heldout


def _dedupe(passages: Iterable[Passage]) -> list[Passage]:
    seen: set[str] = set()
    out = []
    for p in passages:
        k = normalize_text(p.text)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def truncate_text(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` at a sentence end, else at a word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind("? "), head.rfind("! "), head.rfind(".\n"))
    if cut >= max_chars // 2:
        return head[: cut + 1].rstrip()
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip() + " ..."


__all__ = [
    "APT_PACKAGES",
    "APT_PACKAGES_OPTIONAL",
    "DATA_VERSION",
    "DEFAULT_HELDOUT_FRACTION",
    "SPLIT_SALT",
    "MissingCorpus",
    "Passage",
    "data_cache_dir",
    "missing_corpus",
    "normalize_text",
    "read_jsonl",
    "split_of",
    "split_passages",
    "truncate_text",
    "write_atomic",
    "write_jsonl",
]
