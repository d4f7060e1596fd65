"""Everyday topics with a word class: common English nouns from WordNet, grouped by kind.

The first everyday requests (:func:`medusa_vllm.training.everyday.template_requests`)
fill one template per request kind with any noun-like word of ``/usr/share/dict/words``:
"Write a haiku about soap", but also "I am hosting a picnic about weld". Their answers
are about odd subjects, unlike what chat users ask ("Give me a recipe for pancakes",
"Explain how a refrigerator works"). Here the topics come from WordNet (Debian
``wordnet-base``): a noun's first (most frequent) sense names its lexicographer file
(``noun.food``, ``noun.artifact``, ``noun.feeling``...), which picks the templates that
suit it (:data:`TOPIC_TEMPLATES`: recipes for food, "how does it work" for artifacts,
advice for feelings and states).

A topic is kept when it is a lowercase noun of one or two words, every word in the
packaged word list and one token of the backbone's tokenizer, mostly used as a noun
(SemCor counts in ``cntlist.rev``), and common: two-word topics are SemCor-tagged, one-word
topics are either tagged at least :data:`MIN_TAGGED` times or a token the tokenizer
merged early (its id below ``max_token_id``: BPE merges frequent words first).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medusa_vllm.training.everyday import (
    DEFAULT_HELDOUT_FRACTION,
    MODIFIERS,
    EverydayRequest,
    dedupe_key,
    topic_split,
)

__all__ = [
    "GROUPS",
    "TOPIC_TEMPLATES",
    "WORDNET_DIR",
    "MissingWordNet",
    "Topic",
    "load_wordnet_topics",
    "topic_requests",
]

WORDNET_DIR = Path("/usr/share/wordnet")
APT_PACKAGE = "wordnet-base"
MIN_TAGGED = 3
DEFAULT_MAX_TOKEN_ID = 24_000

# lexicographer file number -> topic group (files left out: too abstract for a request,
# or, like noun.event and noun.time, mostly odd as a subject: "din", "now")
GROUPS: dict[int, str] = {
    4: "idea",        # noun.act
    5: "nature",      # noun.animal
    6: "thing",       # noun.artifact
    7: "idea",        # noun.attribute
    8: "body",        # noun.body
    9: "idea",        # noun.cognition
    10: "idea",       # noun.communication
    12: "feeling",    # noun.feeling
    13: "food",       # noun.food
    14: "group",      # noun.group
    15: "place",      # noun.location
    17: "nature",     # noun.object (natural objects: moon, valley, planet)
    18: "person",     # noun.person
    19: "nature",     # noun.phenomenon
    20: "nature",     # noun.plant
    21: "money",      # noun.possession
    22: "idea",       # noun.process
    26: "feeling",    # noun.state (pain, freedom, luck)
    27: "thing",      # noun.substance
}
ALL = frozenset(GROUPS.values())
CONCRETE = frozenset({"thing", "nature", "food", "body", "place"})

# kind -> (template, groups it suits); {t} is the topic, {a} the topic after "a" or "an",
# {u} a second topic
TOPIC_TEMPLATES: dict[str, tuple[tuple[str, frozenset[str]], ...]] = {
    "question": (
        ("What is {t}?", ALL - {"person", "food"}),
        ("Why is {t} important?", ALL - {"person"}),
        ("What is the history of {t}?", ALL - {"feeling", "body"}),
        ("How does {t} work?", frozenset({"thing", "body", "nature", "money", "group"})),
        ("What does {a} do all day?", frozenset({"person"})),
        ("How do you become {a}?", frozenset({"person"})),
        ("Where does {t} come from?", frozenset({"food", "thing", "nature", "feeling"})),
        ("Is {t} healthy?", frozenset({"food"})),
        ("Why do people feel {t}?", frozenset({"feeling"})),
    ),
    "explanation": (
        ("Explain {t} in simple terms.", ALL - {"person"}),
        ("Explain how {t} works, step by step.", frozenset({"thing", "body", "nature", "money", "group",
                                                           "idea"})),
        ("Can you explain {t} to a ten-year-old?", ALL - {"person"}),
        ("Explain what {a} does.", frozenset({"person", "thing", "group"})),
        ("What is the difference between {t} and {u}?", ALL),
        ("Explain why {t} matters in everyday life.", ALL - {"person", "body"}),
    ),
    "instruction": (
        ("How do I take care of {a}?", frozenset({"thing", "nature"})),
        ("How do I make {t} at home?", frozenset({"food"})),
        ("Teach me the basics of {t}.", frozenset({"idea", "money", "thing", "nature"})),
        ("How do I choose a good {t}?", frozenset({"thing", "food", "place"})),
        ("How can I deal with {t}?", frozenset({"feeling"})),
        ("How do I keep my {t} healthy?", frozenset({"body"})),
    ),
    "list": (
        ("List five facts about {t}.", ALL),
        ("Give me ten ideas related to {t}.", ALL - {"body"}),
        ("What are the pros and cons of {t}? Use bullet points.", ALL - {"person", "body", "feeling"}),
        ("List three common mistakes people make with {t}.", ALL - {"person", "body", "feeling"}),
        ("List the main types of {t}, with one sentence about each.",
         frozenset({"thing", "food", "nature", "idea", "group", "place"})),
        ("List five things a good {t} should know.", frozenset({"person"})),
        ("List some ways to stay calm when you feel {t}.", frozenset({"feeling"})),
    ),
    "story": (
        ("Write a short story about {t}.", ALL),
        ("Tell me a bedtime story about {a}.", frozenset({"person", "nature", "thing"})),
        ("Write a story for children in which {t} plays a big part.", ALL - {"person"}),
        ("Write a funny story about {a} who loses something important.", frozenset({"person"})),
        ("Tell me a short fable with a lesson about {t}.", ALL),
    ),
    "poem": (
        ("Write a short poem about {t}.", ALL),
        ("Write a haiku about {t}.", CONCRETE | {"feeling"}),
        ("Write a funny limerick about {a}.", frozenset({"person", "nature", "thing"})),
        ("Write a four-line poem about {t} for a birthday card.", ALL - {"body"}),
        ("Write a rhyming poem about {t} and {u}.", ALL),
    ),
    "email": (
        ("Write an email to my manager about {t}.", frozenset({"idea", "money", "group",
                                                               "thing"})),
        ("Write a polite email to a friend asking for advice about {t}.", ALL - {"person"}),
        ("Write an email to customer support about a problem with my {t}.", frozenset({"thing"})),
        ("Write a thank-you email to {a} who helped me.", frozenset({"person"})),
        ("Write a short email to my neighbor about {t}.", CONCRETE),
    ),
    "recipe": (
        ("Give me a simple recipe for {t}, with the ingredients and the steps.", frozenset({"food"})),
        ("What can I cook with {t}? Give me one recipe.", frozenset({"food"})),
        ("Give me a quick dinner recipe that uses {t}.", frozenset({"food"})),
        ("Suggest a healthy breakfast with {t}.", frozenset({"food"})),
    ),
    "code": (
        ("Write a Python class that represents {a}.", frozenset({"thing", "person", "nature", "food",
                                                                   "place", "group"})),
        ("Write a Python function that counts how often the word \"{t}\" appears in a text.", ALL),
        ("Write a JavaScript function that sorts a list of {t} records by name.",
         frozenset({"thing", "person", "food", "place", "group"})),
        ("Write a SQL query that finds every {t} in a table created this year.",
         frozenset({"thing", "person", "group"})),
        ("Write a Python program that stores facts about {t} in a list and prints one at random.", ALL),
    ),
    "advice": (
        ("I'm worried about {t}. What should I do?", ALL - {"person", "food"}),
        ("Give me some advice on {t}.", ALL - {"person", "body"}),
        ("How do I talk to {a} I don't know?", frozenset({"person"})),
        ("How do I stop feeling {t}?", frozenset({"feeling"})),
        ("I want to spend less money on {t}. Any tips?", frozenset({"thing", "food"})),
        ("How do I talk to my kids about {t}?", ALL - {"food", "thing"}),
    ),
}


class MissingWordNet(RuntimeError):
    """WordNet's database files are not installed."""


@dataclass(frozen=True)
class Topic:
    text: str   # "credit card"
    group: str  # a value of GROUPS
    lexfile: int


def _wordnet_file(root: Path, name: str) -> Path:
    p = root / name
    if not p.is_file():
        raise MissingWordNet(f"{p} is missing: the everyday topics come from WordNet; install it "
                             f"with `apt-get install {APT_PACKAGE}`")
    return p


def _sense_counts(root: Path) -> dict[str, list[int]]:
    """lemma -> SemCor-tagged counts [noun, verb, adjective or adverb]."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for line in _wordnet_file(root, "cntlist.rev").read_text().splitlines():
        p = line.split()
        if len(p) < 3 or "%" not in p[0]:
            continue
        lemma, rest = p[0].split("%", 1)
        ss = rest[:1]
        counts[lemma][0 if ss == "1" else 1 if ss == "2" else 2] += int(p[2])
    return counts


def _lemmas(root: Path, name: str) -> set[str]:
    return {line.split(" ", 1)[0] for line in _wordnet_file(root, name).read_text().splitlines()
            if line and not line.startswith(" ")}


def load_wordnet_topics(words: Iterable[str], tokenizer, root: str | Path = WORDNET_DIR,
                        max_token_id: int = DEFAULT_MAX_TOKEN_ID) -> list[Topic]:
    """Common everyday noun topics (see the module doc), sorted by text.

    ``words``: the packaged word list (every part of a topic must be in it);
    ``tokenizer``: the backbone's (every part must be one token after a space).
    """
    root = Path(root)
    listed = set(words)
    lexfile: dict[str, int] = {}
    for line in _wordnet_file(root, "data.noun").read_text().splitlines():
        if line and not line.startswith(" "):
            off, lex, _ = line.split(" ", 2)
            lexfile[off] = int(lex)
    counts = _sense_counts(root)
    other_pos = _lemmas(root, "index.verb") | _lemmas(root, "index.adj")
    out: list[Topic] = []
    for line in _wordnet_file(root, "index.noun").read_text().splitlines():
        if not line or line.startswith(" "):
            continue
        p = line.split()
        lemma, nsyn = p[0], int(p[2])
        lex = lexfile.get(p[-nsyn], -1)  # the first sense is the most frequent
        group = GROUPS.get(lex)
        parts = lemma.split("_")
        if group is None or len(parts) > 2 or not all(
                x.isascii() and x.isalpha() and x.islower() and x in listed and len(x) >= 3
                for x in parts):
            continue
        noun, verb, adj = counts.get(lemma, (0, 0, 0))
        if len(parts) == 1 and lemma in other_pos and (verb > noun or adj > noun or noun == 0):
            continue  # mostly a verb or an adjective ("withstand", "quiet")
        ids = [tokenizer.encode(" " + x, add_special_tokens=False) for x in parts]
        if any(len(i) != 1 for i in ids):
            continue
        if len(parts) == 2 and noun < 1:
            continue  # a rare compound ("peace pipe")
        if len(parts) == 1 and noun < MIN_TAGGED and ids[0][0] >= max_token_id:
            continue  # a rare word
        out.append(Topic(" ".join(parts), group, lex))
    if not out:
        raise MissingWordNet(f"{root}: no usable topics")
    return sorted(out, key=lambda t: t.text)


def topic_requests(topics: Sequence[Topic], n: int, seed: int = 0, split: str = "train",
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, skip: Iterable[str] = (),
                   exclude_words: Iterable[str] = ()) -> list[EverydayRequest]:
    """``n`` distinct requests on the topics of ``split`` (by :func:`topic_split` of the
    topic text), kinds balanced and each kind's template chosen among those that suit
    the topic's group; deterministic in its arguments.

    Requests whose :func:`dedupe_key` is in ``skip`` are not produced, nor requests on a
    topic that has a word in ``exclude_words`` (the benchmark's own prompts' words: a
    training request never shares a topic with a request it is measured on).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', found {split!r}")
    banned = {w.lower() for w in exclude_words}
    pool = [t for t in topics if topic_split(t.text, heldout_fraction) == split
            and not any(w in banned or w + "s" in banned for w in t.text.split())]
    if not pool:
        raise ValueError(f"no topics in the {split} split")
    by_group: dict[str, list[Topic]] = defaultdict(list)
    for t in pool:
        by_group[t.group].append(t)
    rng = random.Random(f"everyday-topics:{seed}:{split}")
    for group in sorted(by_group):
        rng.shuffle(by_group[group])
    # kind -> the groups it has a template for (and that have topics here)
    suits = {kind: sorted({g for _, gs in templates for g in gs} & set(by_group))
             for kind, templates in TOPIC_TEMPLATES.items()}
    cursor: dict[str, int] = defaultdict(int)
    seen = set(skip)
    out: list[EverydayRequest] = []
    kinds: list[str] = []
    for _ in range(20 * n + 100):
        if len(out) == n:
            break
        if not kinds:
            kinds = list(TOPIC_TEMPLATES)
            rng.shuffle(kinds)
        kind = kinds.pop()
        if not suits[kind]:
            continue
        # groups in turn (not in proportion to their size: "idea" nouns would be a third)
        group = rng.choice(suits[kind])
        topic = by_group[group][cursor[group] % len(by_group[group])]
        cursor[group] += 1
        choices = [i for i, (_, gs) in enumerate(TOPIC_TEMPLATES[kind]) if group in gs]
        j = rng.choice(choices)
        template = TOPIC_TEMPLATES[kind][j][0]
        other = pool[rng.randrange(len(pool))].text
        if "{u}" in template and other == topic.text:
            kinds.append(kind)  # retried with the next topic: kinds stay balanced
            continue
        article = "an" if topic.text[0] in "aeiou" else "a"
        text = template.format(t=topic.text, a=f"{article} {topic.text}", u=other) + rng.choice(
            [m for m, ks in MODIFIERS if kind in ks])
        key = dedupe_key(text)
        if key in seen:
            kinds.append(kind)
            continue
        seen.add(key)
        out.append(EverydayRequest(text, kind, topic.text, split, f"wordnet:{topic.group}", j))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} topic requests, asked for {n}")
    return out
