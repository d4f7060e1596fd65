"""Tests for medusa_vllm.training.prompts and medusa_vllm.training.corpora: splits, prompt
building, reST/fortune/OSIS parsing, alignment.

All tests run on small synthetic inputs except those marked ``corpus`` (skipped when
the Debian package is not installed) and ``slow`` (the full Bible extraction).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medusa_vllm.training import prompts as P
from medusa_vllm.training.corpora import bible, common, fortunes, python_docs

# --------------------------------------------------------------------------- splits


def test_split_of_is_deterministic_and_near_fraction():
    keys = [f"passage {i}" for i in range(5000)]
    first = [common.split_of(k, 0.1) for k in keys]
    assert first == [common.split_of(k, 0.1) for k in keys]
    share = first.count("heldout") / len(keys)
    assert 0.08 < share < 0.12
    assert all(common.split_of(k, 0.0) == "train" for k in keys[:100])
    assert all(common.split_of(k, 1.0) == "heldout" for k in keys[:100])
    # another salt gives another split
    assert first != [common.split_of(k, 0.1, salt="other") for k in keys]


def test_split_of_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        common.split_of("x", 1.5)


def _p(text, group="", source="s", kind="prose"):
    return common.Passage(source, kind, text, ref=text[:10], group=group)


def test_split_passages_groups_and_disjoint_texts():
    passages = [_p(f"chapter {g} verse {v}", group=f"g{g}") for g in range(200) for v in range(3)]
    # the same text in many groups: it must never end up in both splits
    passages += [_p("Amen.", group=f"g{g}") for g in range(200)]
    train, held = common.split_passages(passages, 0.2)
    assert train and held
    split_by_group = {}
    for split, ps in (("train", train), ("heldout", held)):
        for p in ps:
            assert split_by_group.setdefault(p.group, split) == split, p.group
    train_texts = {common.normalize_text(p.text) for p in train}
    held_texts = {common.normalize_text(p.text) for p in held}
    assert not train_texts & held_texts
    assert "amen." in held_texts  # some group holding it was held out
    assert len(train_texts) == len(train) and len(held_texts) == len(held)  # deduplicated


def test_split_passages_text_key_without_group():
    passages = [_p(f"text number {i}") for i in range(1000)] + [_p("TEXT   number 1")]
    train, held = common.split_passages(passages, 0.3)
    assert len(train) + len(held) == 1000  # the case/space variant is a duplicate


# --------------------------------------------------------------------------- prompts


def _pools():
    return {
        "docs": [common.Passage("python-docs", "prose", f"Doc paragraph {i} about lists.", f"f{i}", title="Lists") for i in range(30)],
        "jokes": [common.Passage("fortunes", "quote", f"Joke number {i}.", f"j{i}") for i in range(30)],
        "code": [common.Passage("python-docs", "code", f"x = {i}\nprint(x)\nx += 1", f"c{i}") for i in range(30)],
    }


def test_prompts_deterministic_unique_and_seed_dependent():
    a = P.prompts_from_passages(_pools(), 40, seed=3, split="train")
    b = P.prompts_from_passages(_pools(), 40, seed=3, split="train")
    c = P.prompts_from_passages(_pools(), 40, seed=4, split="train")
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in c]
    assert len({p.text for p in a}) == 40
    assert {p.source for p in a} == {"python-docs", "fortunes"}
    for p in a:
        assert p.split == "train"
        assert p.text.split("\n")[0] != p.text  # an instruction line plus the passage
    codes = [p for p in a if p.kind == "code"]
    assert codes and all("```python" in p.text for p in codes)


def test_more_prompts_extend_fewer():
    """Drawing more prompts keeps the first ones: a recipe can grow its train set
    (scripts/train_default_heads.py extra_train_prompts) without invalidating answers
    already generated for it."""
    for n in (10, 35, 60):  # 60 draws past a pool's end: still a prefix of 90
        few = P.prompts_from_passages(_pools(), n, seed=5, split="train")
        more = P.prompts_from_passages(_pools(), 90, seed=5, split="train")
        assert [p.text for p in more[:n]] == [p.text for p in few]
        assert len({p.text for p in more}) == 90


def test_prompts_weights_and_exhaustion():
    only_jokes = P.prompts_from_passages(_pools(), 20, seed=0, split="train", weights={"docs": 0, "code": 0})
    assert all(p.source == "fortunes" for p in only_jokes)
    with pytest.raises(ValueError, match="ran out"):
        P.prompts_from_passages(_pools(), 31, seed=0, split="train", weights={"docs": 0, "code": 0})
    with pytest.raises(ValueError, match="only 90 passages"):
        P.prompts_from_passages(_pools(), 91, seed=0, split="train")


def test_title_templates_skipped_without_title():
    pool = {"q": [common.Passage("python-docs", "code", f"print({i})\nprint(1)\nprint(2)", "r") for i in range(50)]}
    for p in P.prompts_from_passages(pool, 50, seed=1, split="train"):
        assert "this section" not in p.text and "{title}" not in p.text


def test_train_and_heldout_prompts_never_overlap():
    passages = [common.Passage("fortunes", "quote", f"Saying {i % 150}: be kind.", f"r{i}") for i in range(300)]
    train, held = common.split_passages(passages, 0.25)
    tr = P.prompts_from_passages({"f": train}, len(train), seed=0, split="train")
    he = P.prompts_from_passages({"f": held}, len(held), seed=0, split="heldout")
    assert len(tr) + len(he) == 150
    assert not {p.text for p in tr} & {p.text for p in he}


def test_build_prompts_rejects_bad_split():
    with pytest.raises(ValueError, match="split"):
        P.build_prompt_records(1, split="test")


def test_write_prompts_jsonl(tmp_path):
    prompts = P.prompts_from_passages(_pools(), 5, seed=0, split="heldout")
    path = P.write_prompts(tmp_path / "p.jsonl", prompts)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["text"] for r in rows] == [p.text for p in prompts]
    assert all(r["split"] == "heldout" for r in rows)


def test_truncate_text():
    text = "First sentence here is long enough. Second sentence is longer than that. Third."
    assert common.truncate_text(text, 200) == text
    assert common.truncate_text(text, 50) == "First sentence here is long enough."
    cut = common.truncate_text("word " * 50, 23)
    assert cut.endswith(" ...") and len(cut) <= 27


# --------------------------------------------------------------------------- reST

RST = """\
.. _tut-lists:

*****
Lists
*****

.. index::
   single: list; secret index entry

Python knows a number of :term:`compound` data types, used to group together other
values.  The most versatile is the :class:`list`, which can be written as a list of
comma-separated values (items) between square brackets, see :func:`~os.path.join` and
:ref:`the tutorial <tut-intro>`. Lists might contain items of different types, but
usually the items all have the same type, as ``squares`` below shows::

   >>> squares = [1, 4, 9, 16, 25]
   >>> squares
   [1, 4, 9, 16, 25]

.. This is a comment that must never appear in any passage even though it is long
   enough to look like a real paragraph of text in the documentation source file.

Slicing
=======

.. function:: slice_it(seq, start, stop)

   Return a new list holding the items of *seq* from *start* up to but not including
   *stop*.  All slice operations return a new list containing the requested elements.
   This means that the following slice returns a shallow copy of the list, as the
   `reference manual <https://docs.python.org/3/reference/>`_ explains in detail.

.. code-block:: python

   def double(xs):
       return [2 * x for x in xs]
   print(double([1, 2]))

+-------+-------+
| table | cells |
+-------+-------+
"""


def test_rst_passages_prose_code_and_skips():
    out = python_docs.rst_passages(RST, "tutorial/lists.rst.txt", min_prose_chars=100)
    prose = [p for p in out if p.kind == "prose"]
    code = [p for p in out if p.kind == "code"]
    joined = "\n".join(p.text for p in out)
    assert "secret index entry" not in joined and "comment that must never" not in joined
    assert "table" not in joined.replace("tables", "")
    assert len(prose) == 2 and len(code) == 2
    first = prose[0]
    assert first.title == "Lists"
    assert "`list`" in first.text and "`join`" in first.text and "the tutorial" in first.text
    assert "`squares` below shows:" in first.text and "::" not in first.text and ":class:" not in first.text
    assert prose[1].title.startswith("slice_it(seq")
    assert "reference manual explains" in prose[1].text and "https" not in prose[1].text
    assert code[0].text.startswith(">>> squares = [1, 4, 9, 16, 25]")
    assert code[1].text.splitlines()[0] == "def double(xs):"
    assert all(p.source == "python-docs" and p.ref == "tutorial/lists.rst.txt" for p in out)


def test_clean_rst_inline():
    assert python_docs.clean_rst_inline(":func:`len`") == "`len`"
    assert python_docs.clean_rst_inline(":meth:`!str.join`") == "`str.join`"
    assert python_docs.clean_rst_inline(":ref:`Title here <label>`") == "Title here"
    assert python_docs.clean_rst_inline("``x + 1``") == "`x + 1`"
    assert python_docs.clean_rst_inline("`Python <https://python.org>`_ rocks") == "Python rocks"
    assert python_docs.clean_rst_inline("see note [#]_ here") == "see note here"
    assert python_docs.clean_rst_inline("**bold** text") == "bold text"


def test_rst_length_limits():
    long_para = ("This sentence is fine. " * 60).strip()
    out = python_docs.rst_passages(long_para, "r", min_prose_chars=50, max_chars=300)
    assert len(out) == 1 and len(out[0].text) <= 300 and out[0].text.endswith(".")
    assert python_docs.rst_passages("Too short.", "r") == []


# --------------------------------------------------------------------------- fortunes

FORTUNES = """\
A journey of a thousand miles begins with a single step.
\t\t-- Lao Tzu
%
Short.
%
  ####   ####   ####   ####   ####
  #  #   #  #   #  #   #  #   #  #
  ####   ####   ####   ####   ####
%
Why did the chicken cross the road? To get to the other side, of course.
%
"""


def test_parse_fortunes_filters():
    out = fortunes.parse_fortunes(FORTUNES, "misc")
    texts = [p.text for p in out]
    assert len(texts) == 2
    assert texts[0].startswith("A journey") and "\t" not in texts[0] and "-- Lao Tzu" in texts[0]
    assert texts[1].startswith("Why did the chicken")
    assert all(p.source == "fortunes" and p.kind == "quote" and p.ref == "misc" for p in out)


def test_fortune_passages_skips_index_files_and_excluded(tmp_path):
    (tmp_path / "misc").write_text(FORTUNES)
    (tmp_path / "misc.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "rude").write_text(FORTUNES)
    (tmp_path / "misc.u8").symlink_to(tmp_path / "misc")
    out = fortunes.fortune_passages(tmp_path, exclude={"rude"})
    assert {p.ref for p in out} == {"misc"} and len(out) == 2


def test_missing_corpora_name_package_and_command(tmp_path):
    with pytest.raises(common.MissingCorpus, match=r"fortunes.*apt-get install -y --no-install-recommends fortunes"):
        fortunes.fortune_passages(tmp_path / "nope")
    with pytest.raises(common.MissingCorpus, match=r"python3\.11-doc.*apt-get"):
        python_docs.python_docs_root(tmp_path / "nope")


def test_missing_debian_python(monkeypatch, tmp_path):
    monkeypatch.setattr(bible, "DEBIAN_PYTHON", tmp_path / "no-python3")
    with pytest.raises(common.MissingCorpus, match="python3-sword"):
        bible._run_sword_dump(["spaRV1909eb"])


def test_sword_verses_rejects_unknown_module():
    with pytest.raises(ValueError, match="Sword module"):
        bible.sword_verses("klingonBible")


# --------------------------------------------------------------------------- OSIS / Bible


def test_clean_osis_footnote_does_not_glue_words():
    raw = (
        '<w lemma="strong:H7225">beginning</w>, <w lemma="strong:H0430">God</w><note placement="foot">'
        '<reference type="annotateRef">1:1 </reference>The Hebrew word.</note><w lemma="strong:H1254">created</w> '
        "<w>the</w> <w>heavens</w>."
    )
    assert bible.clean_osis(raw) == "beginning, God created the heavens."


def test_clean_osis_titles_markers_and_glossary():
    raw = (
        '<div type="x-milestone" subType="x-preverse" sID="pv1"/><title canonical="true" type="psalm">'
        "A Psalm by David.</title> <lg sID=\"a\"/><l level=\"1\" sID=\"b\"/>"
        '<title type="section">Section heading</title>'
        "¶ Yahweh, how <w>my</w> foes<note n=\"a\">note</note>!<l eID=\"b\" level=\"1\"/><l sID=\"c\"/>Many"
        " &amp; more <G1234>. Amen. <div sID=\"g\" type=\"glossary\"/> Glossary text that must go."
    )
    assert bible.clean_osis(raw) == "A Psalm by David. Yahweh, how my foes! Many & more. Amen."


def test_clean_osis_adjacent_words_and_punctuation():
    assert bible.clean_osis("<w>Jesus</w><w>wept</w>.") == "Jesus wept."
    assert bible.clean_osis("<w>Yahweh</w><w>’s</w> word") == "Yahweh’s word"


def test_parse_verse_key():
    assert bible.parse_verse_key("Revelation of John 22:21") == ("Revelation of John", 22, 21)
    assert bible.parse_verse_key("I Samuel 3:10") == ("I Samuel", 3, 10)
    with pytest.raises(ValueError, match="Book C:V"):
        bible.parse_verse_key("Genesis")


def test_length_ratio_ok():
    assert bible.length_ratio_ok("a" * 10, "b" * 25)
    assert not bible.length_ratio_ok("a" * 10, "b" * 26)
    assert not bible.length_ratio_ok("", "b")


def _lengths(n, seed=0):
    import random

    rng = random.Random(seed)
    return [rng.randint(20, 300) for _ in range(n)]


def test_alignment_mask_keeps_aligned_and_flags_shift():
    en = _lengths(40)
    es = [int(x * 1.05) for x in en]
    assert all(bible.alignment_mask(es, en, log_ratio_center=0.05))
    # last quarter of the Spanish chapter shifted by one verse (different numbering)
    shifted = es[:30] + es[29:39]
    mask = bible.alignment_mask(shifted, en, log_ratio_center=0.05)
    assert all(mask[:27])
    assert sum(mask[32:]) <= 1
    # the whole chapter shifted: every verse dropped
    assert not any(bible.alignment_mask(es[1:] + es[:1], en, log_ratio_center=0.05))
    # one odd verse (e.g. an empty one) does not take its neighbours with it
    odd = list(es)
    odd[10] = 1
    assert sum(bible.alignment_mask(odd, en, log_ratio_center=0.05)) >= 38
    with pytest.raises(ValueError, match="es_lengths has 3"):
        bible.alignment_mask([1, 2, 3], [1, 2])


def _verse(book, ch, v, text):
    return {"key": f"{book} {ch}:{v}", "book": book, "chapter": ch, "verse": v, "text": text}


def test_align_pairs_matches_keys_and_filters():
    import random

    rng = random.Random(1)
    words = [" ".join("palabra" for _ in range(rng.randint(3, 40))) for _ in range(30)]
    es = [_verse("Genesis", 1, i + 1, w) for i, w in enumerate(words)]
    en = [_verse("Genesis", 1, i + 1, w.replace("palabra", "wordy")) for i, w in enumerate(words)]
    en[5]["text"] = "x"  # ratio filter
    del en[7]  # missing key
    es.append(_verse("Tobit", 1, 1, "solo en español"))
    pairs = bible.align_pairs(es, en)
    keys = {p["key"] for p in pairs}
    assert "Genesis 1:6" not in keys and "Genesis 1:8" not in keys and "Tobit 1:1" not in keys
    assert len(pairs) >= 25
    for p in pairs:
        assert p["en"].count("wordy") == p["es"].count("palabra")


def test_bible_passages_stay_within_chapters():
    verses = [_verse("Ruth", 1, v, f"r1 v{v}.") for v in range(1, 6)] + [_verse("Ruth", 2, v, f"r2 v{v}.") for v in range(1, 3)]
    ps = bible.bible_passages(verses, verses_per_passage=3)
    assert [p.ref for p in ps] == ["Ruth 1:1-3", "Ruth 1:4-5", "Ruth 2:1-2"]
    assert ps[0].text == "r1 v1. r1 v2. r1 v3."
    assert ps[0].group == ps[1].group != ps[2].group


def test_translation_passages_keep_target():
    pairs = [{"key": "John 11:35", "book": "John", "chapter": 11, "verse": 35, "es": "Y lloró Jesús.", "en": "Jesus wept."}]
    (p,) = bible.translation_passages(pairs)
    assert p.text == "Y lloró Jesús." and p.target == "Jesus wept." and p.group == bible.chapter_group("John", 11)
    (prompt,) = P.prompts_from_passages({"t": [p]}, 1, seed=0, split="heldout")
    assert "Spanish" in prompt.text or "English" in prompt.text
    assert prompt.target == "Jesus wept."


# --------------------------------------------------------------------------- real corpora (optional)

corpus = pytest.mark.skipif


@corpus(not fortunes.FORTUNES_DIR.is_dir(), reason="Debian package 'fortunes' not installed")
def test_real_fortunes():
    out = fortunes.fortune_passages()
    assert len(out) > 5000
    assert all(40 <= len(p.text) <= 600 for p in out)


@corpus(not list(Path("/").glob(python_docs.PYTHON_DOCS_GLOB.lstrip("/"))), reason="Debian package 'python3.11-doc' not installed")
def test_real_python_docs_tutorial():
    root = python_docs.python_docs_root()
    text = (root / "tutorial" / "controlflow.rst.txt").read_text()
    out = python_docs.rst_passages(text, "tutorial/controlflow.rst.txt")
    kinds = {p.kind for p in out}
    assert kinds == {"prose", "code"} and len(out) > 20
    assert not any(":keyword:" in p.text or ".. index::" in p.text for p in out)


@pytest.mark.slow
@corpus(
    not (Path("/usr/share/sword/modules/texts/ztext/spaRV1909eb").is_dir() and Path("/usr/share/sword/modules/texts/ztext/engWEB2015eb").is_dir()),
    reason="Debian packages sword-text-sparv / sword-text-web not installed",
)
def test_real_bible_pairs(tmp_path, monkeypatch):
    if shutil.which("/usr/bin/python3") is None:
        pytest.skip("Debian's /usr/bin/python3 not present")
    monkeypatch.setenv("MEDUSA_VLLM_CACHE", str(tmp_path))
    path = bible.extract_bible_pairs()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert 29000 < len(rows) < 31102
    by_key = {r["key"]: r for r in rows}
    assert by_key["John 11:35"]["en"] == "Jesus wept."
    assert "God created" in by_key["Genesis 1:1"]["en"]
    assert "Numbers 13:5" not in by_key  # RV1909 numbers this chapter differently
    assert not any("<" in r["es"] or "¶" in r["en"] for r in rows)
    held = bible.load_bible_pairs("heldout")
    train = bible.load_bible_pairs("train")
    assert len(held) + len(train) == len(rows)
    assert not {(r["book"], r["chapter"]) for r in held} & {(r["book"], r["chapter"]) for r in train}
