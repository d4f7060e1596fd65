"""Passages of the Python documentation (Debian ``python3.11-doc``, reStructuredText sources).

:func:`rst_passages` turns one ``.rst.txt`` file into prose paragraphs (merged within a
section, cut at sentence ends) and code examples (literal blocks and code directives);
comments, labels, index entries, tables and other non-prose directives are skipped.
:func:`python_docs_passages` reads every file of the installed documentation.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medusa_vllm.training.corpora.common import Passage, missing_corpus, truncate_text

PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"

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


__all__ = ["PYTHON_DOCS_GLOB", "clean_rst_inline", "python_docs_passages", "python_docs_root", "rst_passages"]
