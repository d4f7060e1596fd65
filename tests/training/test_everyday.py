"""Everyday requests: topic seeds, filtering, dedupe and a deterministic split
(fake generators; no engine)."""

from __future__ import annotations

import pytest

from medusa_vllm.training import everyday as ev

WORDS = sorted({"garden", "bicycle", "volcano", "castle", "river", "teacher", "kitten", "rocket",
                "bakery", "island", "winter", "market", "guitar", "planet", "forest", "ocean",
                "doctor", "lantern", "pencil", "tomato", "window", "bridge", "desert", "robot"}
               | {f"topic{c}{d}" for c in "abcdefghij" for d in "abcdefghij"})
VOCAB = set(WORDS) | set(
    "a an the what why how is are do does can could you me my i to of in on for and with about "  # noqa: SIM905
    "write give list explain tell short poem story email five facts simple words that it this "
    "please old new tips at home help make some good keep alive night".split())


def test_topic_words_from_a_word_list(tmp_path):
    f = tmp_path / "words"
    words = ["garden", "gardens", "Paris", "quickly", "running", "runs", "cat", "cats",
             "bus", "buses", "castle", "castles", "happy", "naïve", "naïves", "o'clock"]
    f.write_text("\n".join(words))
    # nouns with a plural in the list; no proper nouns, -ly/-ing words, short words, plurals
    assert ev.load_topic_words(f) == ["castle", "garden"]
    with pytest.raises(ev.MissingWordList, match="apt-get install wamerican"):
        ev.load_word_list(tmp_path / "missing")


def test_split_is_by_topic_and_deterministic():
    held = [w for w in WORDS if ev.topic_split(w) == "heldout"]
    assert held == [w for w in WORDS if ev.topic_split(w, 0.1) == "heldout"]  # default 0.1
    assert 0 < len(held) < len(WORDS) / 2
    a = ev.template_requests(WORDS, 30, seed=3, split="train")
    b = ev.template_requests(WORDS, 30, seed=3, split="train")
    assert a == b and a != ev.template_requests(WORDS, 30, seed=4, split="train")
    h = ev.template_requests(WORDS, 10, seed=3, split="heldout")
    assert {r.topic for r in h} <= set(held) and not {r.topic for r in a} & set(held)
    assert len({ev.dedupe_key(r.text) for r in a}) == 30
    assert {r.kind for r in a} == set(ev.KINDS)  # kinds are balanced: 30 = 3 rounds of 10


@pytest.mark.parametrize("raw, expected", [
    ('Request: "Write a short poem about a garden at night."', "Write a short poem about a garden at night."),
    ("1. how do i keep a garden alive in winter?", "How do i keep a garden alive in winter?"),
    ("Sure! Here is a poem about gardens:", None),  # an answer, not a request
    ("I'm ready to help. What would you like to ask about the garden?", None),
    ("Please provide your request about the garden and I will assist.", None),
    ("The old garden was quiet.", None),  # a statement
    ("Write a poem about the ocean.", None),  # off topic
    ("Write a garden", None),  # too short / no sentence end
    ("Write a poem about the garden garden garden garden garden garden garden.", None),  # repetitive
    ("Write a garden poem\nwith lines\nlike these.", None),  # several lines: not one request
    ("Écris un poème sur le jardin, s'il te plaît, garden?", None),  # not English
    ("Write about the garden and zzqx vvbn kkrt plmm wqer?", None),  # garbled
])
def test_clean_request(raw, expected):
    assert ev.clean_request(raw, VOCAB, topic="garden") == expected


def test_written_requests_filter_and_dedupe():
    calls = []

    def fake(batch):
        calls.append(len(batch))
        out = []
        for msgs in batch:
            topic = msgs[0]["content"].split('about "')[1].split('"')[0]
            if topic.startswith("topica"):
                out.append("Sure, here is an answer.")  # refused
            elif topic.startswith("topicb"):
                out.append("What is a good tip about my garden?")  # off topic or duplicate
            else:
                out.append(f"Can you tell me five facts about {topic}?")
        return out

    reqs, stats = ev.written_requests(WORDS, 40, fake, seed=1, split="train", vocabulary=VOCAB)
    assert stats["refused"] > 0 and stats["kept"] == len(reqs) <= 40
    assert stats["asked"] == sum(calls) and len(calls) <= 3
    assert all(r.source == "written" and r.topic in r.text for r in reqs)
    assert len({ev.dedupe_key(r.text) for r in reqs}) == len(reqs)
    again, _ = ev.written_requests(WORDS, 40, fake, seed=1, split="train", vocabulary=VOCAB)
    assert again == reqs  # same writer output -> same requests
    mixed, mstats = ev.build_requests(WORDS, 50, seed=1, split="train", generate=fake,
                                      written_fraction=0.5, vocabulary=VOCAB)
    assert len(mixed) == 50 and mstats["written"] + mstats["template"] == 50
    assert len({ev.dedupe_key(r.text) for r in mixed}) == 50
    assert {r.source for r in mixed} == {"written", "template"}
    only_templates, _ = ev.build_requests(WORDS, 20, seed=1, split="heldout")
    assert all(r.source == "template" and r.split == "heldout" for r in only_templates)


def test_writer_messages_name_topic_and_kind():
    (m,) = ev.writer_messages("volcano", "poem")
    assert m["role"] == "user" and '"volcano"' in m["content"]
    assert ev.EXAMPLES["poem"][0] in m["content"]


def test_requests_round_trip(tmp_path):
    reqs = ev.template_requests(WORDS, 5, seed=0)
    assert ev.read_requests(ev.write_requests(tmp_path / "r.jsonl", reqs)) == reqs
