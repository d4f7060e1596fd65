"""Offline text corpora (Debian packages) turned into chat-style prompt sets.

Nothing here downloads anything: the texts come from Debian packages installed with
``apt-get`` (see :data:`APT_PACKAGES`):

* ``python3.11-doc`` -- reStructuredText sources of the Python documentation
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``): prose paragraphs and
  code examples.
* ``fortunes`` -- quotes, jokes and poems (``/usr/share/games/fortunes``).
* ``sword-text-web`` (World English Bible) and ``sword-text-sparv`` (Reina-Valera
  1909), read through ``python3-sword`` -- English passages and a Spanish-English
  verse-aligned parallel corpus (both use KJV verse numbering for the canonical books).

Prompts are user instructions ("Explain the following passage: ...", "Continue the
text: ...", "Translate ... into English: ..."); the caller applies the model's chat
template. Every passage gets a deterministic train/held-out split from a hash of its
group key (normalised text; the chapter for Bible texts), and training passages whose
text equals a held-out passage are dropped, so a held-out prompt never appears in the
training set. Bible chapters are split the same way for the English passages and the
translation pairs, so held-out translation verses are unseen in training prompts too.

The Sword library is read in a subprocess with Debian's ``/usr/bin/python3``: the
``Sword`` SWIG module belongs to Debian's Python (importing it from another Python
build can segfault).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import random
import re
import subprocess
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------
# Packages, paths, errors
# --------------------------------------------------------------------------------------

#: Debian packages this module reads (install with ``apt-get install -y --no-install-recommends``).
APT_PACKAGES: tuple[str, ...] = (
    "python3.11-doc",
    "fortunes",
    "python3-sword",
    "sword-text-web",
    "sword-text-sparv",
)
#: Optional: King James Version, for ``english="kjv"`` pairs.
APT_PACKAGES_OPTIONAL: tuple[str, ...] = ("sword-text-kjv",)

PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
DEBIAN_PYTHON = Path("/usr/bin/python3")

#: Sword module name -> (Debian package, language).
SWORD_MODULES: dict[str, tuple[str, str]] = {
    "spaRV1909eb": ("sword-text-sparv", "es"),
    "engWEB2015eb": ("sword-text-web", "en"),
    "engKJV2006eb": ("sword-text-kjv", "en"),
}
ENGLISH_BIBLES = {"web": "engWEB2015eb", "kjv": "engKJV2006eb"}
SPANISH_BIBLE = "spaRV1909eb"

#: Fortune files left out by default: ASCII drawings, and the categories most likely to
#: hold offensive jokes (the ``fortunes`` package ships without the ``-off`` set).
FORTUNES_EXCLUDE: frozenset[str] = frozenset({"ascii-art", "art", "ethnic", "men-women", "drugs", "politics"})

#: Bump when extraction or cleaning changes: cache files carry it in their name.
DATA_VERSION = 2
SPLIT_SALT = "medusa-vllm-split-v1"
DEFAULT_HELDOUT_FRACTION = 0.1
MAX_PAIR_LENGTH_RATIO = 2.5

SOURCES: tuple[str, ...] = ("python-docs", "fortunes", "bible", "bible-translation")


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


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------
# Passages and splits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    """A piece of source text that one prompt is built from.

    Attributes:
        source: corpus name, one of :data:`SOURCES`.
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


# --------------------------------------------------------------------------------------
# Python documentation (reStructuredText)
# --------------------------------------------------------------------------------------

_CODE_DIRECTIVES = frozenset({"code-block", "sourcecode", "code", "doctest", "testcode", "highlight-code"})
_PROSE_DIRECTIVES = frozenset(
    {
        "function", "method", "class", "attribute", "data", "exception", "decorator",
        "decoratormethod", "classmethod", "staticmethod", "describe", "opcode", "cmdoption",
        "option", "envvar", "note", "warning", "seealso", "tip", "important", "attention",
        "caution", "hint", "impl-detail", "versionadded", "versionchanged", "deprecated",
        "deprecated-removed", "abstractmethod", "coroutinefunction", "coroutinemethod",
        "pdbcommand", "index-entry", "glossary", "availability",
    }
)
_API_DIRECTIVES = frozenset(
    {
        "function", "method", "class", "attribute", "data", "exception", "decorator",
        "decoratormethod", "classmethod", "staticmethod", "describe", "abstractmethod",
        "coroutinefunction", "coroutinemethod", "opcode", "cmdoption", "option", "envvar",
    }
)
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+\.|#\.|\(\w\))\s+")


def clean_rst_inline(text: str) -> str:
    """Remove reST inline markup: roles, hyperlinks, footnote refs, escapes.

    ``:func:`~os.path.join``` becomes ```join```, ``:ref:`title <target>``` becomes
    ``title``, double-backquoted literals become single-backquoted, and
    ```text <url>`_`` becomes ``text``.
    """

    def role(m: re.Match[str]) -> str:
        body = m.group(2)
        title = re.match(r"^(.*?)\s*<[^<>]+>$", body, flags=re.DOTALL)
        if title and title.group(1):
            return title.group(1)
        body = body.lstrip("!")
        if body.startswith("~"):
            body = body[1:].split(".")[-1]
        name = m.group(1)
        code_like = name.split(":")[-1] in {
            "func", "meth", "class", "mod", "attr", "data", "exc", "const", "obj",
            "keyword", "option", "envvar", "file", "program", "samp", "makevar", "opcode",
            "c:func", "c:type", "c:data", "c:macro", "c:member", "type", "macro", "member",
        }
        return f"`{body}`" if code_like else body

    text = re.sub(r":([\w:+-]+):`([^`]+)`", role, text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.DOTALL)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`__?(?=\W|$)", r"\1", text)
    text = re.sub(r"\s*\[(?:#\w*|\*|\d+)\]_", "", text)
    text = re.sub(r"\|(\w[\w-]*)\|", r"\1", text)
    text = text.replace("\\ ", "").replace("\\*", "*").replace("\\`", "`")
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text, flags=re.DOTALL)
    return text


def _blocks(lines: Sequence[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_table(block: Sequence[str]) -> bool:
    first = block[0].strip()
    return first.startswith(("+-", "+=")) or bool(re.match(r"^=+( +=+)+$", first))


def _prose_text(block: Sequence[str]) -> str:
    parts: list[str] = []
    for line in block:
        s = line.strip()
        if parts and _BULLET.match(line):
            parts.append("\n" + s)
        else:
            parts.append(s)
    text = " ".join(parts).replace(" \n", "\n")
    return clean_rst_inline(text)


@dataclass
class _RstState:
    section: str = ""
    api: str = ""
    mode: str = ""  # "", "code" or "skip"
    mode_indent: int = 0
    code: list[str] = field(default_factory=list)
    code_intro: str = ""


def rst_passages(
    text: str,
    ref: str,
    *,
    min_prose_chars: int = 200,
    target_prose_chars: int = 400,
    max_chars: int = 700,
    min_code_lines: int = 3,
    max_code_lines: int = 30,
) -> list[Passage]:
    """Prose paragraphs and code examples from one reST document.

    Consecutive paragraphs of a section are merged until ``target_prose_chars``; prose
    shorter than ``min_prose_chars`` is dropped and longer than ``max_chars`` is cut
    at a sentence end. Code comes from literal blocks (``::``) and code directives,
    kept if it has ``min_code_lines``..``max_code_lines`` lines and fits ``max_chars``.
    Comments, labels, index entries, tables and other non-prose directives are skipped.
    """
    out: list[Passage] = []
    st = _RstState()
    prose_buf: list[str] = []

    def title() -> str:
        return st.api or st.section

    def flush_prose() -> None:
        if prose_buf:
            joined = "\n\n".join(prose_buf)
            prose_buf.clear()
            if len(joined) >= min_prose_chars and sum(c.isalpha() for c in joined) > 0.6 * len(joined):
                out.append(Passage("python-docs", "prose", truncate_text(joined, max_chars), ref, title()))

    def flush_code() -> None:
        if st.code:
            code = textwrap.dedent("\n".join(st.code)).strip("\n")
            n_lines = code.count("\n") + 1
            if min_code_lines <= n_lines <= max_code_lines and len(code) <= max_chars and re.search(r"[A-Za-z]{2}", code):
                out.append(Passage("python-docs", "code", code, ref, title() or st.code_intro))
        st.code = []

    for block in _blocks(text.splitlines()):
        ind = _indent(block[0])
        if st.mode and ind > st.mode_indent:
            if st.mode == "code":
                if st.code:
                    st.code.append("")
                st.code.extend(block)
            continue
        if st.mode == "code":
            flush_code()
        st.mode = ""

        first = block[0].strip()
        if first.startswith(".."):
            flush_prose()
            m = _DIRECTIVE.match(first)
            name = m.group(1) if m else ""
            if name in _CODE_DIRECTIVES:
                st.mode, st.mode_indent = "code", ind
            elif name in _PROSE_DIRECTIVES:
                if name in _API_DIRECTIVES and m is not None:
                    st.api = clean_rst_inline(m.group(2).strip())
                rest = [ln for ln in block[1:] if not ln.strip().startswith(":")]
                if rest:
                    prose_buf.append(_prose_text(rest))
            else:  # comment, label, index, toctree, table, image, module, ...
                st.mode, st.mode_indent = "skip", ind
            continue
        if len(block) >= 2 and _UNDERLINE.match(block[1]) and len(block[1].strip()) >= len(first):
            flush_prose()
            st.section, st.api = clean_rst_inline(first), ""
            rest = block[2:]
            if not rest:
                continue
            block = rest
        elif len(block) >= 3 and _UNDERLINE.match(block[0]) and _UNDERLINE.match(block[2]):
            flush_prose()
            st.section, st.api = clean_rst_inline(block[1].strip()), ""
            continue
        if _is_table(block):
            flush_prose()
            st.mode, st.mode_indent = "skip", ind - 1
            continue
        if ind == 0 and st.api:
            st.api = ""  # left the directive body
        para = _prose_text(block)
        if block[-1].rstrip().endswith("::"):
            st.mode, st.mode_indent = "code", ind
            para = re.sub(r"\s*::$", "", para) if para.rstrip().endswith(" ::") else para[:-1]
            st.code_intro = para
        if para.strip() and para.strip() != ":":
            prose_buf.append(para)
            if sum(len(p) for p in prose_buf) >= target_prose_chars or st.mode == "code":
                flush_prose()
    flush_prose()
    if st.mode == "code":
        flush_code()
    return out


def python_docs_root(root: str | Path | None = None) -> Path:
    """Folder of the Python documentation's reST sources, or :class:`MissingCorpus`."""
    if root is not None:
        path = Path(root)
        if not path.is_dir():
            raise missing_corpus("Python documentation sources", path, "python3.11-doc")
        return path
    candidates = sorted(Path("/").glob(PYTHON_DOCS_GLOB.lstrip("/")))
    if not candidates:
        raise missing_corpus("Python documentation sources", PYTHON_DOCS_GLOB, "python3.11-doc")
    return candidates[-1]


def python_docs_passages(root: str | Path | None = None, **kwargs: int) -> list[Passage]:
    """All passages of the Python documentation (files in sorted order)."""
    base = python_docs_root(root)
    out: list[Passage] = []
    for path in sorted(base.rglob("*.rst.txt")):
        rel = str(path.relative_to(base))
        if rel.startswith(("whatsnew/changelog", "license", "copyright")):
            continue
        out.extend(rst_passages(path.read_text(encoding="utf-8", errors="replace"), rel, **kwargs))
    return out


# --------------------------------------------------------------------------------------
# Fortunes
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Bible (Sword modules)
# --------------------------------------------------------------------------------------

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
        return _read_jsonl(path)
    rows = []
    for rec in _run_sword_dump([module])[module]:
        text = clean_osis(rec["raw"])
        if not text:
            continue
        book, chapter, verse = parse_verse_key(rec["key"])
        rows.append({"key": rec["key"], "book": book, "chapter": chapter, "verse": verse, "text": text})
    _write_jsonl(path, rows)
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
    _write_jsonl(path, pairs)
    tsv = "".join(f"{p['key']}\t{_tsv(p['es'])}\t{_tsv(p['en'])}\n" for p in pairs)
    _write_atomic(path.with_suffix(".tsv"), "key\tes\ten\n" + tsv)
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
    """Spanish-English pairs, all or one split (chapter-level, as in :func:`build_prompts`)."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split: expected None, 'train' or 'heldout', found {split!r}")
    rows = _read_jsonl(extract_bible_pairs(english))
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


# --------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------

TEMPLATES: dict[str, tuple[str, ...]] = {
    "prose": (
        "Explain the following passage from the Python documentation in simple terms:\n\n{text}",
        "Summarize the following text in two or three sentences:\n\n{text}",
        "Continue the text:\n\n{text}",
        "Read this excerpt from the Python docs section \"{title}\" and list its key points:\n\n{text}",
        "Write three questions a student might ask about this passage, with short answers:\n\n{text}",
        "Rewrite the following documentation passage for a beginner programmer:\n\n{text}",
        "What is the main idea of this passage? Give an example in Python.\n\n{text}",
    ),
    "code": (
        "Explain what this Python code does:\n\n```python\n{text}\n```",
        "Add comments to the following Python code:\n\n```python\n{text}\n```",
        "What is the output of this Python snippet, and why?\n\n```python\n{text}\n```",
        "Suggest an improvement to this code and explain it:\n\n```python\n{text}\n```",
        "This example comes from the Python docs section \"{title}\". Explain the concept it illustrates:\n\n```python\n{text}\n```",
    ),
    "quote": (
        "What does this quote mean?\n\n{text}",
        "Explain the joke or saying below:\n\n{text}",
        "Write a short story inspired by this text:\n\n{text}",
        "Continue the text:\n\n{text}",
        "Do you agree with the following? Answer in a short paragraph.\n\n{text}",
        "Rewrite this in plain, modern English:\n\n{text}",
    ),
    "scripture": (
        "Summarize the following passage ({ref}):\n\n{text}",
        "Explain the following passage in simple words:\n\n{text}",
        "Continue the text:\n\n{text}",
        "Rewrite this passage in modern, everyday English:\n\n{text}",
        "What are the main themes of this passage?\n\n{text}",
    ),
    "parallel": (
        "Translate the following Spanish text into English:\n\n{text}",
        "Translate to English:\n\n{text}",
    ),
}


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and where it came from."""

    text: str
    source: str
    kind: str
    ref: str
    template: int
    split: str
    target: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def render_prompt(passage: Passage, template: str) -> str:
    """Fill ``template`` with the passage's text, title and reference."""
    return template.format(text=passage.text, title=passage.title or "this section", ref=passage.ref)


def _templates_for(passage: Passage) -> tuple[str, ...]:
    templates = TEMPLATES[passage.kind]
    if not passage.title:
        templates = tuple(t for t in templates if "{title}" not in t)
    return templates


def prompts_from_passages(
    pools: Mapping[str, Sequence[Passage]],
    n: int,
    seed: int,
    split: str,
    weights: Mapping[str, float] | None = None,
) -> list[Prompt]:
    """``n`` prompts drawn without replacement from per-source passage pools.

    Sources are interleaved according to ``weights`` (equal by default); each passage
    is used at most once, with a template picked by a seeded RNG, so the result is a
    pure function of the inputs. Raises ValueError if the pools hold fewer than ``n``
    passages.
    """
    if n < 0:
        raise ValueError(f"n: expected >= 0, found {n}")
    total = sum(len(p) for p in pools.values())
    if total < n:
        sizes = {k: len(v) for k, v in pools.items()}
        raise ValueError(f"asked for {n} {split} prompts but the sources hold only {total} passages: {sizes}")
    order = {name: list(range(len(pool))) for name, pool in pools.items()}
    for name, idx in order.items():
        random.Random(f"{seed}:{name}:order").shuffle(idx)
    w = {name: float((weights or {}).get(name, 1.0)) for name in pools}
    for name, value in w.items():
        if value < 0:
            raise ValueError(f"weights[{name!r}]: expected >= 0, found {value}")
    rng = random.Random(f"{seed}:pick")
    used = {name: 0 for name in pools}
    out: list[Prompt] = []
    while len(out) < n:
        live = [k for k in pools if used[k] < len(order[k]) and w[k] > 0]
        if not live:
            raise ValueError(f"asked for {n} {split} prompts; sources with positive weight ran out after {len(out)}")
        name = rng.choices(live, weights=[w[k] for k in live])[0]
        passage = pools[name][order[name][used[name]]]
        used[name] += 1
        templates = _templates_for(passage)
        t = rng.randrange(len(templates))
        out.append(
            Prompt(render_prompt(passage, templates[t]), passage.source, passage.kind, passage.ref, t, split, passage.target)
        )
    return out


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


def build_prompt_records(
    n: int,
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    weights: Mapping[str, float] | None = None,
    max_chars: int = 700,
) -> list[Prompt]:
    """``n`` :class:`Prompt` records from ``split`` (``"train"`` or ``"heldout"``).

    Deterministic in (n, seed, sources, split, heldout_fraction, weights, max_chars) for
    a given set of installed packages. Raises :class:`MissingCorpus` naming the apt
    command if a source's Debian package is missing.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', found {split!r}")
    pools: dict[str, list[Passage]] = {}
    for source in sources:
        train, held = split_passages(load_source_passages(source, max_chars=max_chars), heldout_fraction)
        pools[source] = train if split == "train" else held
    return prompts_from_passages(pools, n, seed, split, weights)


def build_prompts(
    n: int,
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    split: str = "train",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    weights: Mapping[str, float] | None = None,
    max_chars: int = 700,
) -> list[str]:
    """``n`` chat-style user instructions built from the offline corpora (see
    :func:`build_prompt_records`); apply the model's chat template to use them."""
    return [p.text for p in build_prompt_records(n, seed, sources, split, heldout_fraction, weights, max_chars)]


def write_prompts(path: str | Path, prompts: Iterable[Prompt]) -> Path:
    """Write prompt records as JSONL (atomically) and return the path."""
    out = Path(path)
    _write_jsonl(out, (p.to_dict() for p in prompts))
    return out


def corpus_stats() -> dict[str, int]:
    """Number of passages per available source (sources whose package is missing are -1)."""
    stats = {}
    for source in SOURCES:
        try:
            stats[source] = len(load_source_passages(source))
        except MissingCorpus:
            stats[source] = -1
    return stats


__all__ = [
    "APT_PACKAGES",
    "SOURCES",
    "MissingCorpus",
    "Passage",
    "Prompt",
    "align_pairs",
    "bible_passages",
    "build_prompt_records",
    "build_prompts",
    "clean_osis",
    "clean_rst_inline",
    "corpus_stats",
    "data_cache_dir",
    "extract_bible_pairs",
    "load_bible_pairs",
    "parse_fortunes",
    "prompts_from_passages",
    "rst_passages",
    "split_of",
    "split_passages",
    "sword_verses",
    "translation_passages",
    "write_prompts",
]
