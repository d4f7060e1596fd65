"""Bible texts from Sword modules: English passages and Spanish-English verse pairs.

``sword-text-web`` (World English Bible) and ``sword-text-sparv`` (Reina-Valera 1909)
are read through ``python3-sword`` (:func:`sword_verses`, OSIS markup cleaned by
:func:`clean_osis`); :func:`align_pairs` pairs verses with the same key and drops those
that look misaligned (different versification, :func:`alignment_mask`). Bible chapters
are the split key (:func:`chapter_group`) for both the English passages and the
translation pairs, so held-out translation verses are unseen in training prompts too.

The Sword library is read in a subprocess with Debian's ``/usr/bin/python3``: the
``Sword`` SWIG module belongs to Debian's Python (importing it from another Python
build can segfault).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from medusa_vllm.training.corpora.common import (
    DATA_VERSION,
    DEFAULT_HELDOUT_FRACTION,
    Passage,
    data_cache_dir,
    missing_corpus,
    read_jsonl,
    split_of,
    write_atomic,
    write_jsonl,
)

DEBIAN_PYTHON = Path("/usr/bin/python3")

#: Sword module name -> (Debian package, language).
SWORD_MODULES: dict[str, tuple[str, str]] = {
    "spaRV1909eb": ("sword-text-sparv", "es"),
    "engWEB2015eb": ("sword-text-web", "en"),
    "engKJV2006eb": ("sword-text-kjv", "en"),
}
ENGLISH_BIBLES = {"web": "engWEB2015eb", "kjv": "engKJV2006eb"}
SPANISH_BIBLE = "spaRV1909eb"
MAX_PAIR_LENGTH_RATIO = 2.5


_SWORD_DUMP = r"""
import json, sys
try:
    import Sword
except ImportError as exc:
    print(json.dumps({"fatal": "import Sword failed: %s" % exc})); sys.exit(0)
mgr = Sword.SWMgr()
for name in sys.argv[1:]:
    mod = mgr.getModule(name)
    if mod is None:
        print(json.dumps({"module": name, "error": "module not installed"})); continue
    mod.setKeyText("Gen 1:1")
    mod.popError()
    seen = set()
    while True:
        key = mod.getKeyText()
        if key in seen:
            break
        seen.add(key)
        print(json.dumps({"module": name, "key": key, "raw": mod.getRawEntry()}, ensure_ascii=False))
        mod.increment()
        if mod.popError() not in ("", "\x00", 0):
            break
"""

_KEY = re.compile(r"^(.+) (\d+):(\d+)$")
_BLOCK_TAGS = re.compile(r"<(?:/?(?:l|lg|lb|div|p|item|list|chapter|verse|milestone|title|br))\b[^>]*>")


def clean_osis(raw: str) -> str:
    """Plain text of one OSIS verse entry as stored in a Sword module.

    Drops footnotes (``<note>``), non-canonical section titles, speaker labels and
    anything after a glossary division; keeps canonical titles (Psalm headings, which
    the Spanish text carries inline); inserts a space where removing markup would glue
    two words (WEB's "God<note/>created" -> "God created"); removes pilcrows and
    textual Strong's tags such as ``<G1234>``; collapses whitespace.
    """
    text = re.split(r'<div\b[^>]*type="glossary"', raw, maxsplit=1)[0]
    text = re.sub(r"<note\b[^>]*/>", "", text)
    text = re.sub(r"<note\b.*?</note>", "\x00", text, flags=re.DOTALL)
    text = re.sub(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', " ", text, flags=re.DOTALL)
    text = re.sub(r"<speaker\b.*?</speaker>", " ", text, flags=re.DOTALL)
    text = re.sub(r"</w>(?=<w\b[^>]*>\w)", "</w> ", text)
    text = _BLOCK_TAGS.sub(" ", text)
    text = re.sub(r"<[^>]*>", "", text)
    text = re.sub(r"(\w)\x00+(\w)", r"\1 \2", text).replace("\x00", "")
    text = html.unescape(text)
    text = re.sub(r"<G\d+>|¶", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ([,;:.!?])(?=\s|$)", r"\1", text)
    return text


def parse_verse_key(key: str) -> tuple[str, int, int]:
    """``"Revelation of John 22:21"`` -> ``("Revelation of John", 22, 21)``."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"Sword key: expected 'Book C:V', found {key!r}")
    return m.group(1), int(m.group(2)), int(m.group(3))


def _run_sword_dump(modules: Sequence[str]) -> dict[str, list[dict]]:
    if not DEBIAN_PYTHON.exists():
        raise missing_corpus("Debian's Python", DEBIAN_PYTHON, "python3", "python3-sword")
    proc = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", _SWORD_DUMP, *modules],
        capture_output=True, text=True, encoding="utf-8", check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"Sword dump with {DEBIAN_PYTHON} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    rows: dict[str, list[dict]] = {m: [] for m in modules}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if "fatal" in rec:
            raise missing_corpus(f"Python module Sword for {DEBIAN_PYTHON} ({rec['fatal']})", DEBIAN_PYTHON, "python3-sword")
        if "error" in rec:
            pkg = SWORD_MODULES.get(rec["module"], ("<unknown package>", ""))[0]
            raise missing_corpus(f"Sword module {rec['module']}", "/usr/share/sword/modules", pkg)
        rows[rec["module"]].append(rec)
    return rows


def sword_verses(module: str, *, refresh: bool = False) -> list[dict]:
    """Cleaned verses of a Sword module: dicts with key, book, chapter, verse, text.

    Cached as JSONL in :func:`data_cache_dir`; empty verses are left out.
    """
    if module not in SWORD_MODULES:
        raise ValueError(f"Sword module: expected one of {sorted(SWORD_MODULES)}, found {module!r}")
    path = data_cache_dir() / f"sword-v{DATA_VERSION}" / f"{module}.jsonl"
    if path.is_file() and not refresh:
        return read_jsonl(path)
    rows = []
    for rec in _run_sword_dump([module])[module]:
        text = clean_osis(rec["raw"])
        if not text:
            continue
        book, chapter, verse = parse_verse_key(rec["key"])
        rows.append({"key": rec["key"], "book": book, "chapter": chapter, "verse": verse, "text": text})
    write_jsonl(path, rows)
    return rows


def length_ratio_ok(a: str, b: str, max_ratio: float = MAX_PAIR_LENGTH_RATIO) -> bool:
    """True if both strings are non-empty and neither is over ``max_ratio`` times the other."""
    if not a or not b:
        return False
    return max(len(a), len(b)) / min(len(a), len(b)) <= max_ratio


def alignment_mask(
    es_lengths: Sequence[int],
    en_lengths: Sequence[int],
    *,
    log_ratio_center: float = 0.0,
    window: int = 2,
    margin: float = 0.05,
    max_cost: float = 0.35,
    clip: float = 1.0,
) -> list[bool]:
    """Which verses of one chapter look aligned, judged from verse lengths alone.

    The Sword modules number some chapters differently (RV1909 follows the Spanish
    tradition, e.g. its Numbers 13:1 is the English Numbers 12:16; WEB uses NRSVA
    versification), so equal keys are not always the same verse. Verse lengths track
    each other closely in aligned text, so for each verse the mean
    ``|log(len_es / len_en) - log_ratio_center|`` over a window of ``2*window+1``
    verses is compared with the same cost after shifting the English side by one
    verse either way (each verse's cost clipped at ``clip``, so one odd verse does
    not condemn its neighbours). A verse is kept unless a shift fits better by more
    than ``margin`` or the unshifted cost exceeds ``max_cost``; the whole chapter is
    dropped if, over all its verses, a shift fits better by more than ``margin``.
    """
    if len(es_lengths) != len(en_lengths):
        raise ValueError(f"alignment_mask: es_lengths has {len(es_lengths)} verses, en_lengths {len(en_lengths)}")
    n = len(es_lengths)

    def window_cost(i: int, shift: int, w: int = window) -> float:
        costs = [
            min(abs(math.log(max(es_lengths[k], 1) / max(en_lengths[k + shift], 1)) - log_ratio_center), clip)
            for k in range(max(0, i - w), min(n, i + w + 1))
            if 0 <= k + shift < n
        ]
        return sum(costs) / len(costs) if costs else math.inf

    whole = n + 1  # a window covering the whole chapter
    if n >= 4 and min(window_cost(0, -1, whole), window_cost(0, 1, whole)) < window_cost(0, 0, whole) - margin:
        return [False] * n  # the whole chapter fits better shifted: numbered differently
    keep = []
    for i in range(n):
        c0 = window_cost(i, 0)
        shifted = min(window_cost(i, -1), window_cost(i, 1))
        keep.append(c0 <= max_cost and not shifted < c0 - margin)
    return keep


def align_pairs(
    spanish: Iterable[Mapping[str, object]],
    english: Iterable[Mapping[str, object]],
    max_ratio: float = MAX_PAIR_LENGTH_RATIO,
) -> list[dict]:
    """Verse pairs with the same key on both sides that pass the noise filters.

    Drops pairs failing :func:`length_ratio_ok` and verses that
    :func:`alignment_mask` flags as shifted (different versification).
    """
    eng = {str(r["key"]): r for r in english}
    chapters: dict[tuple[str, int], list[dict]] = {}
    for r in spanish:
        e = eng.get(str(r["key"]))
        if e is None or not r["text"] or not e["text"]:
            continue
        pair = {"key": r["key"], "book": r["book"], "chapter": r["chapter"], "verse": r["verse"], "es": str(r["text"]), "en": str(e["text"])}
        chapters.setdefault((str(r["book"]), int(r["chapter"])), []).append(pair)
    ratios = sorted(math.log(len(p["es"]) / len(p["en"])) for ps in chapters.values() for p in ps)
    center = ratios[len(ratios) // 2] if ratios else 0.0
    out = []
    for pairs in chapters.values():
        mask = alignment_mask([len(p["es"]) for p in pairs], [len(p["en"]) for p in pairs], log_ratio_center=center)
        out.extend(p for p, ok in zip(pairs, mask) if ok and length_ratio_ok(p["es"], p["en"], max_ratio))
    return out


def bible_pairs_path(english: str = "web") -> Path:
    """Cache path of the Spanish-English pairs file (JSONL)."""
    return data_cache_dir() / f"bible-es-en-{english}-v{DATA_VERSION}.jsonl"


def extract_bible_pairs(english: str = "web", *, refresh: bool = False) -> Path:
    """Write the Reina-Valera 1909 / English verse pairs to the cache and return the path.

    Each JSONL line: ``{"key", "book", "chapter", "verse", "es", "en"}``. A ``.tsv``
    twin (key, es, en) is written next to it. ``english`` is ``"web"`` (World English
    Bible, package sword-text-web) or ``"kjv"`` (sword-text-kjv).
    """
    if english not in ENGLISH_BIBLES:
        raise ValueError(f"english: expected one of {sorted(ENGLISH_BIBLES)}, found {english!r}")
    path = bible_pairs_path(english)
    if path.is_file() and not refresh:
        return path
    pairs = align_pairs(sword_verses(SPANISH_BIBLE, refresh=refresh), sword_verses(ENGLISH_BIBLES[english], refresh=refresh))
    write_jsonl(path, pairs)
    tsv = "".join(f"{p['key']}\t{_tsv(p['es'])}\t{_tsv(p['en'])}\n" for p in pairs)
    write_atomic(path.with_suffix(".tsv"), "key\tes\ten\n" + tsv)
    return path


def _tsv(s: object) -> str:
    return str(s).replace("\t", " ").replace("\n", " ")


def chapter_group(book: object, chapter: object) -> str:
    """Split key shared by every verse of one Bible chapter."""
    return f"bible:{book} {chapter}"


def load_bible_pairs(
    split: str | None = None,
    english: str = "web",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[dict]:
    """Spanish-English pairs, all or one split (chapter-level, as in
    :func:`medusa_vllm.training.prompts.build_prompt_records`)."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split: expected None, 'train' or 'heldout', found {split!r}")
    rows = read_jsonl(extract_bible_pairs(english))
    if split is None:
        return rows
    return [r for r in rows if split_of(chapter_group(r["book"], r["chapter"]), heldout_fraction) == split]


def bible_passages(verses: Sequence[Mapping[str, object]], verses_per_passage: int = 3) -> list[Passage]:
    """Non-overlapping runs of ``verses_per_passage`` verses within each chapter."""
    out = []
    i = 0
    while i < len(verses):
        first = verses[i]
        chunk = [first]
        while (
            len(chunk) < verses_per_passage
            and i + len(chunk) < len(verses)
            and verses[i + len(chunk)]["book"] == first["book"]
            and verses[i + len(chunk)]["chapter"] == first["chapter"]
        ):
            chunk.append(verses[i + len(chunk)])
        i += len(chunk)
        text = " ".join(str(v["text"]) for v in chunk)
        ref = f"{first['book']} {first['chapter']}:{first['verse']}"
        if len(chunk) > 1:
            ref += f"-{chunk[-1]['verse']}"
        out.append(Passage("bible", "scripture", text, ref, group=chapter_group(first["book"], first["chapter"])))
    return out


def translation_passages(pairs: Iterable[Mapping[str, object]]) -> list[Passage]:
    """One ``parallel`` passage per verse pair: Spanish text, English target."""
    return [
        Passage("bible-translation", "parallel", str(p["es"]), str(p["key"]), group=chapter_group(p["book"], p["chapter"]), target=str(p["en"]))
        for p in pairs
    ]


__all__ = [
    "ENGLISH_BIBLES",
    "SPANISH_BIBLE",
    "SWORD_MODULES",
    "align_pairs",
    "alignment_mask",
    "bible_pairs_path",
    "bible_passages",
    "chapter_group",
    "clean_osis",
    "extract_bible_pairs",
    "length_ratio_ok",
    "load_bible_pairs",
    "parse_verse_key",
    "sword_verses",
    "translation_passages",
]
