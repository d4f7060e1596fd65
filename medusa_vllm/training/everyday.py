"""Everyday chat requests from topic seeds: what users ask, not what corpora hold.

The corpus prompts (:mod:`medusa_vllm.training.prompts`) wrap Debian texts in
instructions; chat users ask for explanations, lists, poems, emails, recipes, code
and advice on every subject. This module makes such requests from **topic seeds**,
common English words from the packaged word list ``/usr/share/dict/words``
(Debian ``wamerican``; "common" = one token of the backbone's tokenizer), crossed
with request :data:`KINDS`, in two ways:

* **template** requests: a kind's phrasing (:data:`TEMPLATES`) filled with one or two
  topics and sometimes a style modifier ("Keep it short.");
* **written** requests: the backbone itself writes a request from three example
  requests of the kind and a topic (:func:`writer_messages`); its output is cleaned
  and filtered (:func:`clean_request`: length, one paragraph, no answer in place of a
  request, no garbled text, a simple English check against the word list).

Every request is deduplicated (case, punctuation and spacing ignored), and the
train / held-out split is by topic (:func:`topic_split`, a hash of the word), so a
held-out request never shares a topic with a train request. Everything is a pure
function of its arguments and the word list, except the written requests, which are
what the backbone wrote (they are committed with their answers in
:mod:`medusa_vllm.training.store`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "DICT_PATH",
    "EXAMPLES",
    "KINDS",
    "MODIFIERS",
    "REQUEST_OPENERS",
    "TEMPLATES",
    "EverydayRequest",
    "MissingWordList",
    "build_requests",
    "clean_request",
    "dedupe_key",
    "load_topic_words",
    "looks_english",
    "read_requests",
    "template_requests",
    "topic_split",
    "vocabulary",
    "write_requests",
    "writer_messages",
    "written_requests",
]

DICT_PATH = Path("/usr/share/dict/words")
APT_PACKAGE = "wamerican"
DEFAULT_HELDOUT_FRACTION = 0.1

KINDS = ("question", "explanation", "instruction", "list", "story", "poem", "email", "recipe",
         "code", "advice")

# {t}: the topic, {u}: a second topic
TEMPLATES: dict[str, tuple[str, ...]] = {
    "question": (
        "What is {t}?",
        "Why do people care about {t}?",
        "What is the history of {t}?",
        "Is {t} good or bad? Why?",
        "How does {t} affect everyday life?",
        "What should I know about {t} before I start?",
        "Can you tell me something interesting about {t}?",
        "What do {t} and {u} have in common?",
    ),
    "explanation": (
        "Explain {t} in simple terms.",
        "Can you explain {t} to a ten-year-old?",
        "Explain how {t} works, step by step.",
        "What does the word \"{t}\" mean? Give an example sentence.",
        "Explain the difference between {t} and {u}.",
        "I never understood {t}. Can you explain it to me?",
    ),
    "instruction": (
        "How do I get started with {t}?",
        "Give me step-by-step instructions for learning about {t}.",
        "Teach me the basics of {t}.",
        "Write a short guide to {t} for beginners.",
        "How can I get better at {t}?",
        "Tell me how to plan a weekend project about {t}.",
    ),
    "list": (
        "List five facts about {t}.",
        "Give me a list of ten ideas related to {t}.",
        "What are the pros and cons of {t}? Use bullet points.",
        "List three common mistakes people make with {t}.",
        "Name five words that are related to {t}.",
        "Give me a list of questions to ask an expert on {t}.",
    ),
    "story": (
        "Write a short story about {t}.",
        "Tell me a bedtime story about {t} and {u}.",
        "Write a story for children in which {t} plays a big part.",
        "Write the opening paragraph of a mystery novel about {t}.",
        "Write a funny story about a person who loves {t}.",
        "Tell me a short fable with a lesson about {t}.",
    ),
    "poem": (
        "Write a short poem about {t}.",
        "Write a haiku about {t}.",
        "Write a funny limerick about {t}.",
        "Write a rhyming poem about {t} and {u}.",
        "Write a poem about {t} for my grandmother's birthday card.",
        "Compose a four-line poem about {t}.",
    ),
    "email": (
        "Write an email to my manager about {t}.",
        "Write a polite email to a friend asking for advice on {t}.",
        "Draft a short email inviting my team to a talk on {t}.",
        "Write an email to customer support about a problem with {t}.",
        "Help me write an email to my teacher about {t}.",
        "Write a thank-you email to a colleague who helped me with {t}.",
    ),
    "recipe": (
        "Give me an easy recipe I could serve at a {t}-themed party.",
        "Suggest a simple dinner recipe and give it a name inspired by {t}.",
        "I am hosting a picnic about {t}. What food should I make? Give me one recipe.",
        "Write a recipe for a cake decorated with a {t} theme.",
        "What is a healthy breakfast I can make in ten minutes? Name it after {t}.",
    ),
    "code": (
        "Write a Python function that counts how many times the word \"{t}\" appears in a text.",
        "Write a Python class that represents a {t}.",
        "Write a Python program that stores facts about {t} in a list and prints one at random.",
        "Write a JavaScript function that checks whether a string contains \"{t}\".",
        "Write a SQL query that finds all rows of a table named {t} created this year.",
        "Write a Python script that sorts a list of {t} records by name.",
    ),
    "advice": (
        "I'm worried about {t}. What should I do?",
        "Give me some advice on {t}.",
        "My friend is interested in {t}. How can I support them?",
        "What's the best way to deal with {t} at work?",
        "I want to spend less money on {t}. Any tips?",
        "How do I talk to my kids about {t}?",
    ),
}

# style modifiers appended to some template requests, with the kinds they suit ("" = none)
MODIFIERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("", frozenset(KINDS)), ("", frozenset(KINDS)), ("", frozenset(KINDS)),
    (" Keep it short.", frozenset(KINDS)),
    (" Use simple words.", frozenset(KINDS) - {"code"}),
    (" Answer in three sentences.", frozenset({"question", "explanation", "advice"})),
    (" Please be detailed.", frozenset({"question", "explanation", "instruction", "list", "code",
                                        "recipe", "advice"})),
    (" Make it fun.", frozenset({"story", "poem", "email", "recipe", "list"})),
)

# example requests the backbone sees before writing one of its own
EXAMPLES: dict[str, tuple[str, ...]] = {
    "question": ("Why do cats purr when they are happy?", "How long should I boil an egg for a soft yolk?",
                 "What causes the seasons on Earth?"),
    "explanation": ("Explain how a rainbow forms, in simple words.",
                    "Can you explain what inflation is to a teenager?",
                    "Explain the difference between weather and climate."),
    "instruction": ("How do I change a flat tire on my bike?", "Teach me how to tie a tie, step by step.",
                    "How can I make my houseplants grow faster?"),
    "list": ("List five easy ways to save money on groceries.", "Give me ten books to read on a long flight.",
             "What are some good exercises I can do at home?"),
    "story": ("Write a short story about a dragon who is afraid of the dark.",
              "Tell me a bedtime story about a brave little mouse.",
              "Write a story about two friends lost in a big city."),
    "poem": ("Write a short poem about the sea at night.", "Can you write a funny poem about my lazy dog?",
             "Write a haiku about autumn leaves."),
    "email": ("Write an email to my landlord asking him to fix the heating.",
              "Help me write a polite email to decline a job offer.",
              "Draft a short email inviting my team to lunch on Friday."),
    "recipe": ("Give me a simple recipe for banana bread.", "How do I make a quick tomato soup?",
               "What can I cook with rice, eggs and spinach?"),
    "code": ("Write a Python function that checks if a number is prime.",
             "How do I read a CSV file in Python?",
             "Write a JavaScript function that reverses a string."),
    "advice": ("How can I sleep better at night?", "I have a job interview tomorrow. Any tips?",
               "My roommate is messy. How do I talk to him about it?"),
}


class MissingWordList(RuntimeError):
    """The packaged word list is not installed."""


@dataclass(frozen=True)
class EverydayRequest:
    """One user request and where it came from."""

    text: str
    kind: str
    topic: str
    split: str
    source: str  # "template" or "written" (by the backbone)
    template: int = -1  # index into TEMPLATES[kind] for template requests

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


# ------------------------------------------------------------------ topic seeds
def load_word_list(path: str | Path = DICT_PATH) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MissingWordList(f"{p} is missing: the everyday topic seeds come from the packaged word "
                              f"list; install it with `apt-get install {APT_PACKAGE}`")
    return p.read_text(encoding="utf-8", errors="replace").split()


_NOT_NOUN_ENDINGS = ("ing", "ed", "ly", "ous", "ful", "less", "ive", "ible", "able")


def _has_plural(word: str, listed: set[str]) -> bool:
    """Whether the list also holds a plural (or third-person) form of ``word``: true
    of countable nouns (and of verbs), false of adjectives, adverbs and plurals."""
    return (word + "s" in listed or word + "es" in listed
            or (word.endswith("y") and word[:-1] + "ies" in listed))


def load_topic_words(path: str | Path = DICT_PATH, tokenizer=None, min_len: int = 4,
                     max_len: int = 12) -> list[str]:
    """Sorted topic words: lowercase ASCII letters only, ``min_len``..``max_len`` long,
    noun-like (the list holds their plural; no -ing/-ed/-ly/-ous... endings) and, with a
    ``tokenizer``, a single token after a space (a proxy for common words)."""
    listed = set(load_word_list(path))
    words = sorted(w for w in listed
                   if w.isascii() and w.isalpha() and w.islower() and min_len <= len(w) <= max_len
                   and _has_plural(w, listed) and not w.endswith(_NOT_NOUN_ENDINGS)
                   and (not w.endswith("s") or w.endswith("ss")))
    if tokenizer is not None:
        words = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]
    if not words:
        raise MissingWordList(f"{path}: no usable topic words")
    return words


def topic_split(word: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """``"heldout"`` or ``"train"`` by a hash of the word (stable across runs and machines)."""
    h = int(hashlib.sha256(f"everyday:{word}".encode()).hexdigest()[:8], 16)
    return "heldout" if h % 10_000 < heldout_fraction * 10_000 else "train"


def _split_words(words: Sequence[str], split: str, heldout_fraction: float) -> list[str]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', found {split!r}")
    return [w for w in words if topic_split(w, heldout_fraction) == split]


# --------------------------------------------------------------------- filters
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_PREFIX = re.compile(r"^\s*(?:(?:new\s+)?(?:message|request|question|user|prompt|example)\s*\d*\s*:\s*"
                     r"|[-*•>]\s+|\d+[.)]\s+)", re.IGNORECASE)
# openings of an answer or of a refusal, not of a user's request
_NOT_A_REQUEST = re.compile(
    r"^(?:sure|certainly|of course|here(?:'s| is| are)|i'm (?:ready|here|sorry|happy)|i am |as an ai"
    r"|i'd be happy|i would be happy|hello|hi\b|dear\b|subject:|thank you|okay|ok\b|great|absolutely"
    r"|a helpful|to (?:create|write|request))", re.IGNORECASE)
_ASSISTANT_WORDS = re.compile(r"\b(?:ai assistant|assistant|assist|smollm|chatbot|message like these"
                              r"|one-sentence|hugging face|your (?:request|question|query|message)"
                              r"|ask your|new message)\b", re.IGNORECASE)
# first words of a request (else it must end with a question mark)
REQUEST_OPENERS = frozenset(
    ["write", "give", "list", "explain", "tell", "describe", "help", "draft", "compose", "create", "make", "suggest", "recommend", "teach", "show", "name", "share", "summarize", "plan", "compare", "translate", "find", "can", "could", "would", "will", "how", "what", "why", "when", "where", "which", "who", "is", "are", "do", "does", "should"])


def dedupe_key(text: str) -> str:
    """Lowercase words only: two requests with the same key are the same request."""
    return " ".join(w.lower() for w in _WORD.findall(text))


def looks_english(text: str, vocabulary: set[str], min_known: float = 0.8) -> bool:
    """Whether ``text`` reads as English: mostly ASCII letters, and at least
    ``min_known`` of its words (lowercased, 's and plural s dropped) in ``vocabulary``."""
    if not text or sum(not c.isascii() for c in text) > 0.02 * len(text):
        return False
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 3:
        return False

    def known(w: str) -> bool:
        w = w.split("'")[0]
        return w in vocabulary or (w.endswith("s") and w[:-1] in vocabulary) or len(w) == 1
    return sum(known(w) for w in words) >= min_known * len(words)


def clean_request(text: str, vocabulary: set[str], topic: str | None = None, min_words: int = 4,
                  max_words: int = 60, max_chars: int = 400) -> str | None:
    """The request in the backbone's output, or ``None`` when it is not a usable one.

    Keeps the first paragraph, strips list markers, "Request:"-style labels and
    surrounding quotes; refuses text that opens like an answer or a refusal, talks
    about the assistant instead of asking it, is not phrased as a request (a
    :data:`REQUEST_OPENERS` first word or a final question mark), does not mention
    ``topic`` (its first five letters), is too short or long, repeats itself, or
    fails :func:`looks_english`.
    """
    t = text.strip().split("\n\n")[0].strip()
    if "\n" in t:
        return None  # a list or a poem, not a request
    for _ in range(2):
        t = _PREFIX.sub("", t).strip().strip("*").strip()
        if len(t) >= 2 and t[0] in "\"'“" and t[-1] in "\"'”":
            t = t[1:-1].strip()
    if not t or _NOT_A_REQUEST.match(t) or _ASSISTANT_WORDS.search(t):
        return None
    if '"' in t and t.count('"') % 2:
        return None  # unbalanced quote: a label left in or a cut-off text
    words = _WORD.findall(t)
    if not (min_words <= len(words) <= max_words) or len(t) > max_chars:
        return None
    if len({w.lower() for w in words}) < 0.6 * len(words):
        return None  # repetitive
    if t[-1] not in ".?!":
        return None  # cut off (max_tokens) or not a sentence
    if t[-1] != "?" and words[0].lower() not in REQUEST_OPENERS:
        return None  # a statement, not a request
    if topic is not None and topic[:5].lower() not in t.lower():
        return None  # off topic
    if not looks_english(t, vocabulary):
        return None
    return t[0].upper() + t[1:]


# -------------------------------------------------------------------- builders
def _seeded(seed: int, split: str, what: str) -> random.Random:
    return random.Random(f"everyday:{seed}:{split}:{what}")


def _topic_kind_pairs(words: Sequence[str], n: int, seed: int, split: str, what: str
                      ) -> Iterable[tuple[str, str, random.Random]]:
    """(topic, kind, rng) pairs: topics cycle through a seeded shuffle of ``words``,
    kinds through seeded shuffles of :data:`KINDS` (balanced kinds)."""
    if not words:
        raise ValueError(f"no topic words in the {split} split")
    rng = _seeded(seed, split, what)
    order = list(words)
    rng.shuffle(order)
    kinds: list[str] = []
    for i in range(n):
        if not kinds:
            kinds = list(KINDS)
            rng.shuffle(kinds)
        yield order[i % len(order)], kinds.pop(), rng


def template_requests(words: Sequence[str], n: int, seed: int = 0, split: str = "train",
                      heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                      skip: Iterable[str] = ()) -> list[EverydayRequest]:
    """``n`` distinct template requests on topics of ``split`` (deterministic);
    requests whose :func:`dedupe_key` is in ``skip`` are not produced."""
    pool = _split_words(words, split, heldout_fraction)
    seen = set(skip)
    out: list[EverydayRequest] = []
    for topic, kind, rng in _topic_kind_pairs(pool, 20 * n + 100, seed, split, "template"):
        if len(out) == n:
            break
        i = rng.randrange(len(TEMPLATES[kind]))
        other = pool[rng.randrange(len(pool))]
        text = TEMPLATES[kind][i].format(t=topic, u=other) + rng.choice(
            [m for m, kinds in MODIFIERS if kind in kinds])
        key = dedupe_key(text)
        if key in seen or (other == topic and "{u}" in TEMPLATES[kind][i]):
            continue
        seen.add(key)
        out.append(EverydayRequest(text, kind, topic, split, "template", i))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct {split} template requests, asked for {n}")
    return out


def writer_messages(topic: str, kind: str) -> list[dict[str, str]]:
    """The chat turn asking the backbone to write one request of ``kind`` about ``topic``."""
    examples = "\n".join(EXAMPLES[kind])
    return [{"role": "user", "content":
             "Here are examples of messages that people send to an AI assistant:\n\n"
             f"{examples}\n\nWrite one new message like these about \"{topic}\". "
             "Reply with the message only."}]


Generate = Callable[[list[list[dict[str, str]]]], list[str]]


def written_requests(words: Sequence[str], n: int, generate: Generate, seed: int = 0,
                     split: str = "train", heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                     skip: Iterable[str] = (), vocabulary: set[str] | None = None,
                     attempts: int = 3) -> tuple[list[EverydayRequest], dict[str, int]]:
    """Up to ``n`` requests written by ``generate`` (the backbone), cleaned, filtered and
    deduplicated; ``generate`` gets a batch of chat prompts and returns one text each.

    Asks for ``n`` at a time, for at most ``attempts`` rounds of fresh topics. Returns
    the requests (in topic order) and counts of what was kept and refused.
    """
    pool = _split_words(words, split, heldout_fraction)
    vocab = set(words) if vocabulary is None else vocabulary
    seen = set(skip)
    out: list[EverydayRequest] = []
    stats = {"asked": 0, "kept": 0, "refused": 0, "duplicate": 0}
    pairs = iter(_topic_kind_pairs(pool, attempts * n, seed, split, "written"))
    for _ in range(attempts):
        need = n - len(out)
        if need <= 0:
            break
        batch = [next(pairs, None) for _ in range(need)]
        batch = [b for b in batch if b is not None]
        if not batch:
            break
        texts = generate([writer_messages(t, k) for t, k, _ in batch])
        if len(texts) != len(batch):
            raise ValueError(f"generate returned {len(texts)} texts for {len(batch)} prompts")
        stats["asked"] += len(batch)
        for (topic, kind, _), raw in zip(batch, texts):
            text = clean_request(raw, vocab, topic)
            if text is None:
                stats["refused"] += 1
                continue
            key = dedupe_key(text)
            if key in seen:
                stats["duplicate"] += 1
                continue
            seen.add(key)
            out.append(EverydayRequest(text, kind, topic, split, "written"))
    stats["kept"] = len(out)
    return out, stats


def build_requests(words: Sequence[str], n: int, seed: int = 0, split: str = "train",
                   generate: Generate | None = None, written_fraction: float = 0.5,
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
                   vocabulary: set[str] | None = None) -> tuple[list[EverydayRequest], dict[str, int]]:
    """``n`` distinct everyday requests of ``split``: about ``written_fraction`` of them
    written by ``generate`` (none without it), the rest, and any the writer fell short
    of, from templates. Written and template requests alternate in a seeded order."""
    written: list[EverydayRequest] = []
    stats: dict[str, int] = {}
    if generate is not None and written_fraction > 0:
        written, stats = written_requests(words, round(n * written_fraction), generate, seed, split,
                                          heldout_fraction, vocabulary=vocabulary)
    templ = template_requests(words, n - len(written), seed, split, heldout_fraction,
                              skip={dedupe_key(r.text) for r in written})
    out = written + templ
    _seeded(seed, split, "mix").shuffle(out)
    stats["template"] = len(templ)
    stats["written"] = len(written)
    return out, stats


# ------------------------------------------------------------------- I/O helpers
def write_requests(path: str | Path, requests: Sequence[EverydayRequest]) -> Path:
    """Requests as JSON lines (atomically)."""
    import json
    import os

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in requests))
    os.replace(tmp, out)
    return out


def read_requests(path: str | Path) -> list[EverydayRequest]:
    import json

    return [EverydayRequest(**json.loads(x)) for x in Path(path).read_text().splitlines() if x.strip()]


def vocabulary(path: str | Path = DICT_PATH) -> set[str]:
    """Every word of the word list, lowercased (the :func:`looks_english` check)."""
    return {w.lower() for w in load_word_list(path)}
