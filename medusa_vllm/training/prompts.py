"""Chat-style prompt sets built from the offline corpora (:mod:`medusa_vllm.training.corpora`).

Prompts are user instructions ("Explain the following passage: ...", "Continue the
text: ...", "Translate ... into English: ..."), one per passage, with a template picked
by a seeded RNG (:data:`TEMPLATES`); the caller applies the model's chat template
(:func:`medusa_vllm.tools.engine_proc.chat_prompt`). Train and held-out prompts come from
disjoint passage splits (:func:`medusa_vllm.training.corpora.common.split_passages`),
so a held-out prompt never appears in the training set.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from medusa_vllm.training.corpora.common import (
    DEFAULT_HELDOUT_FRACTION,
    Passage,
    split_passages,
    write_jsonl,
)
from medusa_vllm.training.corpora.sources import SOURCES, load_source_passages

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
    a given set of installed packages. Raises
    :class:`~medusa_vllm.training.corpora.common.MissingCorpus` naming the apt command if a
    source's Debian package is missing.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', found {split!r}")
    pools: dict[str, list[Passage]] = {}
    for source in sources:
        train, held = split_passages(load_source_passages(source, max_chars=max_chars), heldout_fraction)
        pools[source] = train if split == "train" else held
    return prompts_from_passages(pools, n, seed, split, weights)


def build_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` chat-style user instructions from every source with the default options
    (see :func:`build_prompt_records`); apply the model's chat template to use them."""
    return [p.text for p in build_prompt_records(n, seed, split=split)]


#: What :func:`example_prompts` falls back to when the offline corpora are not installed.
FALLBACK_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a short Python function that returns the n-th Fibonacci number.",
    "List three tips for writing clear technical documentation.",
    "What is the difference between a process and a thread?",
    "Summarise the water cycle for a ten-year-old.",
    "Give me a recipe for a simple tomato soup.",
    "Why do computers use binary numbers?",
    "Describe how a hash table works.",
    "What are the main causes of inflation?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Write a haiku about autumn leaves.",
    "How does public-key cryptography let two strangers share a secret?",
)


def example_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` user requests for the examples: held-out corpus prompts (never trained on)
    when the Debian corpora are installed, else :data:`FALLBACK_PROMPTS` cycled."""
    try:
        return build_prompts(n, seed=seed, split="heldout")
    except Exception:  # noqa: BLE001 - a missing corpus: use the fixed prompts
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)]


def write_prompts(path: str | Path, prompts: Iterable[Prompt]) -> Path:
    """Write prompt records as JSONL (atomically) and return the path."""
    out = Path(path)
    write_jsonl(out, (p.to_dict() for p in prompts))
    return out


__all__ = [
    "TEMPLATES",
    "Prompt",
    "build_prompt_records",
    "build_prompts",
    "prompts_from_passages",
    "render_prompt",
    "write_prompts",
]
