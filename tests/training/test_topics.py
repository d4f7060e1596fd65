"""Everyday topics from WordNet: which nouns are kept, and the requests built on them
(a small fake WordNet database and tokenizer; no packages, no engine)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from medusa_vllm.training import everyday as ev
from medusa_vllm.training import topics as tp

# lemma -> (lexicographer file, SemCor noun count)
NOUNS = {
    "pancake": (13, 0), "yogurt": (13, 2), "soup": (13, 5), "bread": (13, 9), "cheese": (13, 4),
    "umbrella": (6, 1), "lamp": (6, 3), "bicycle": (6, 2), "credit_card": (6, 1),
    "peace_pipe": (6, 0),          # a compound nobody tagged: rare
    "teacher": (18, 12), "anger": (12, 6), "kidney": (8, 2), "valley": (17, 3),
    "tax": (21, 8), "honesty": (7, 3),
    "quiet": (7, 1),               # mostly an adjective (adj count 9)
    "withstand": (4, 0),           # mostly a verb
    "din": (11, 1),                # noun.event: left out
    "triangle": (25, 2),           # noun.shape: left out
    "zymurgy": (9, 5),             # not one token
    "Paris": (15, 40),             # not lowercase
    "ox": (5, 3),                  # shorter than 3 letters... 2 letters
}
OTHER_POS = {"quiet": ("adj", 9), "withstand": ("verb", 4), "lamp": ("verb", 0)}
IDS = {w: i for i, w in enumerate(["soup", "bread", "cheese", "lamp", "teacher", "anger", "tax",
                                   "credit", "card", "peace", "pipe", "quiet", "withstand", "din",
                                   "triangle", "valley", "honesty", "ox", "kidney", "umbrella",
                                   "bicycle", "yogurt"], start=100)}
IDS["pancake"] = 40_000  # merged late: rare by the tokenizer, and untagged


class FakeTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for w in text.split():
            out += [IDS[w]] if w in IDS else [1, 2]
        return out


def fake_wordnet(root):
    root.mkdir()
    data, index, cnt = ["  1 license header"], ["  1 license header"], []
    for i, (lemma, (lex, n)) in enumerate(sorted(NOUNS.items())):
        off = f"{i + 1:08d}"
        data.append(f"{off} {lex:02d} n 01 {lemma} 0 000 | a gloss")
        index.append(f"{lemma.lower()} n 1 1 @ 1 0 {off}  ")
        if n:
            cnt.append(f"{lemma.lower()}%1:{lex:02d}:00:: 1 {n}")
    verbs, adjs = [], []
    for lemma, (pos, n) in OTHER_POS.items():
        (verbs if pos == "verb" else adjs).append(f"{lemma} {pos[0]} 1 0 1 0 00000001  ")
        if n:
            cnt.append(f"{lemma}%{2 if pos == 'verb' else 3}:00:00:: 1 {n}")
    (root / "data.noun").write_text("\n".join(data) + "\n")
    (root / "index.noun").write_text("\n".join(index) + "\n")
    (root / "index.verb").write_text("\n".join(verbs) + "\n")
    (root / "index.adj").write_text("\n".join(adjs) + "\n")
    (root / "cntlist.rev").write_text("\n".join(sorted(cnt)) + "\n")
    return root


WORDS = {w for lemma in NOUNS for w in lemma.split("_")} | {"paris"}


def test_topics_are_common_lowercase_nouns_with_their_group(tmp_path):
    root = fake_wordnet(tmp_path / "wn")
    topics = tp.load_wordnet_topics(WORDS, FakeTokenizer(), root=root)
    got = {t.text: t.group for t in topics}
    assert got == {
        "bicycle": "thing", "bread": "food", "cheese": "food", "credit card": "thing",
        "kidney": "body", "lamp": "thing", "soup": "food", "tax": "money", "teacher": "person",
        "anger": "feeling", "umbrella": "thing", "valley": "nature", "yogurt": "food",
        "honesty": "idea",
    }
    # a word merged late is kept once SemCor tagged it often enough
    NOUNS["pancake"] = (13, tp.MIN_TAGGED)
    try:
        assert "pancake" in {t.text for t in tp.load_wordnet_topics(WORDS, FakeTokenizer(),
                                                                    root=fake_wordnet(tmp_path / "b"))}
    finally:
        NOUNS["pancake"] = (13, 0)
    # the word list gates every part
    assert "credit card" not in {t.text for t in tp.load_wordnet_topics(
        WORDS - {"credit"}, FakeTokenizer(), root=root)}


def test_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(tp.MissingWordNet, match="apt-get install wordnet-base"):
        tp.load_wordnet_topics(WORDS, FakeTokenizer(), root=tmp_path)


def topic_pool(n_per_group: int = 40) -> list[tp.Topic]:
    return [tp.Topic(f"{g}thing{i}", g, 0) for g in sorted(set(tp.GROUPS.values()))
            for i in range(n_per_group)]


def test_requests_suit_their_topic_and_split():
    pool = topic_pool()
    reqs = tp.topic_requests(pool, 200, seed=1, split="train")
    assert len({ev.dedupe_key(r.text) for r in reqs}) == 200
    kinds = Counter(r.kind for r in reqs)
    assert set(kinds) == set(tp.TOPIC_TEMPLATES) and max(kinds.values()) - min(kinds.values()) <= 1
    group_of = {t.text: t.group for t in pool}
    for r in reqs:
        assert ev.topic_split(r.topic) == "train" and r.topic in r.text
        template, groups = tp.TOPIC_TEMPLATES[r.kind][r.template]
        assert group_of[r.topic] in groups and r.source == f"wordnet:{group_of[r.topic]}"
        if r.kind == "recipe":
            assert group_of[r.topic] == "food"
        fixed = [x for x in re.split(r"\{[tau]\}", template) if x.strip()]
        assert all(x.strip() in r.text for x in fixed)
    held = tp.topic_requests(pool, 40, seed=1, split="heldout")
    assert not {r.topic for r in held} & {r.topic for r in reqs}
    assert tp.topic_requests(pool, 200, seed=1, split="train") == reqs
    assert tp.topic_requests(pool, 200, seed=2, split="train") != reqs


def test_articles_and_excluded_words():
    pool = [tp.Topic("apple", "food", 13), tp.Topic("umbrella", "thing", 6),
            tp.Topic("lamp", "thing", 6), tp.Topic("ink pen", "thing", 6)] + topic_pool(20)
    reqs = tp.topic_requests(pool, 300, seed=0, split="train", heldout_fraction=0.0)
    texts = " ".join(r.text for r in reqs)
    assert "a umbrella" not in texts and "a apple" not in texts and "a ink pen" not in texts
    assert "an umbrella" in texts or "an apple" in texts or "an ink pen" in texts
    # no topic sharing a word (or its plural) with the excluded words
    reqs = tp.topic_requests(pool, 100, seed=0, split="train", heldout_fraction=0.0,
                             exclude_words={"lamps", "ink", "foodthing3"})
    topics = {r.topic for r in reqs}
    assert not topics & {"lamp", "ink pen", "foodthing3"}
    skip = {ev.dedupe_key(r.text) for r in reqs[:10]}
    again = tp.topic_requests(pool, 100, seed=0, split="train", heldout_fraction=0.0, skip=skip)
    assert not skip & {ev.dedupe_key(r.text) for r in again}
    with pytest.raises(ValueError, match="no topics in the heldout split"):
        tp.topic_requests(pool, 5, split="heldout", heldout_fraction=0.0)
