"""The benchmark's prompts: held-out corpus prompts, everyday chat requests, or a file.

- ``corpus``: held-out prompts from the offline Debian corpora
  (:func:`medusa_vllm.training.prompts.build_prompts`, split ``heldout``) — the
  distribution the shipped heads were distilled on, never their training rows.
  A missing corpus is an error naming the apt-get command, never a silent
  switch to other prompts.
- ``everyday``: :data:`EVERYDAY_PROMPTS`, requests a chat user types (explain,
  list, poem, email, recipe, code, rewrite), none drawn from those corpora.
- ``mix``: the two interleaved, half each.
- ``FILE.jsonl``: one JSON object per line with a ``"prompt"`` (or ``"text"``)
  string, or one JSON string per line.

Every prompt is one user turn; the model's chat template is applied by the
engine (offline) or the server (HTTP).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["EVERYDAY_PROMPTS", "PROMPT_SETS", "bench_prompts", "load_prompts"]

PROMPT_SETS = ("corpus", "everyday", "mix")
CORPUS_SEED = 1234  # the held-out draw medusa-vllm bench has always used

EVERYDAY_PROMPTS: tuple[str, ...] = (
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "List five tips for sleeping better at night.",
    "Write a short poem about the first snow of winter.",
    "Write a polite email to my landlord asking when the broken heater will be repaired.",
    "Give me a simple recipe for pancakes, with the ingredients and the steps.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between weather and climate.",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Write a haiku about a cup of coffee in the morning.",
    "Write an email to a colleague thanking them for their help with a project.",
    "How do I make a basic tomato sauce for pasta?",
    "Write a Python script that reads a CSV file and prints the average of the second column.",
    "Explain what a credit score is and how it can be improved.",
    "List ten ideas for a rainy weekend at home with children.",
    "Write a four-line poem for a friend's birthday card.",
    "Write a short email declining a meeting invitation politely.",
    "Give me a recipe for a vegetable soup that is quick to make.",
    "Explain what a for loop is to someone who has never programmed.",
    "Explain why the sky is blue.",
    "List the steps to change a flat tire on a car.",
    "Write a limerick about a cat who loves to sleep.",
    "Write an email to a customer apologizing for a late delivery.",
    "What can I cook with rice, eggs and spinach? Give me one recipe.",
    "Write a JavaScript function that returns the largest number in an array.",
    "Explain how vaccines help the body fight disease.",
    "List some good habits for staying focused while working from home.",
    "Write a short poem about the sea at night.",
    "Write a cover letter opening paragraph for a job as a junior web developer.",
    "Give me a recipe for chocolate chip cookies.",
    "Write a SQL query that counts the orders per customer in a table named orders.",
    "Explain what inflation is and why prices go up over time.",
    "Rewrite this sentence to sound more professional: hey, can u send me the report asap?",
)


def _corpus_key(n: int, seed: int) -> str:
    """Cache key of a corpus draw: its size and seed, and the source of the code
    that builds it (prompt templates, corpus readers)."""
    import hashlib

    import medusa_vllm.training.prompts as prompts_mod
    from medusa_vllm.training import corpora

    h = hashlib.sha256(f"{n}:{seed}".encode())
    files = [Path(prompts_mod.__file__), *sorted(Path(corpora.__file__).parent.glob("*.py"))]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def bench_prompts(n: int, seed: int = CORPUS_SEED, cache: bool = False) -> list[str]:
    """``n`` held-out prompts from the offline Debian corpora. A missing corpus
    is an error naming the package(s) and the apt-get command. Parsing the
    corpora takes a while; with ``cache`` the draw is kept under
    :func:`medusa_vllm.core.paths.cache_root` ``/bench``, keyed by ``n``,
    ``seed`` and the source of the prompt and corpus code."""
    from medusa_vllm.training.corpora.common import MissingCorpus
    from medusa_vllm.training.prompts import build_prompts

    path = None
    if cache:
        from medusa_vllm.core.paths import cache_root

        path = cache_root() / "bench" / f"corpus-prompts-{_corpus_key(n, seed)}.json"
        if path.is_file():
            return json.loads(path.read_text())
    try:
        out = build_prompts(n, seed=seed, split="heldout")
    except MissingCorpus as exc:
        raise MissingCorpus(f"bench draws its prompts from the offline Debian corpora: {exc}") from exc
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
    return out


def _read_jsonl(path: Path) -> list[str]:
    out: list[str] = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--prompts {path}: line {i} is not JSON ({exc})") from None
        text = row if isinstance(row, str) else (row.get("prompt") or row.get("text")
                                                  if isinstance(row, dict) else None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"--prompts {path}: line {i} has no 'prompt' (or 'text') string; "
                             "expected {\"prompt\": \"...\"} or a JSON string per line")
        out.append(text)
    if not out:
        raise ValueError(f"--prompts {path}: no prompts in the file")
    return out


def load_prompts(which: str, n: int, cache: bool = False) -> list[str]:
    """``n`` prompts of set ``which`` (``corpus``, ``everyday``, ``mix`` or a
    ``.jsonl`` path); sets smaller than ``n`` repeat in order. ``cache``: see
    :func:`bench_prompts`."""
    if n < 1:
        raise ValueError(f"bench: need at least one prompt, asked for {n}")
    if which == "corpus":
        base = bench_prompts(n, cache=cache)
    elif which == "everyday":
        base = list(EVERYDAY_PROMPTS)
    elif which == "mix":
        corpus = bench_prompts((n + 1) // 2, cache=cache)
        every = list(EVERYDAY_PROMPTS)
        base = [p for pair in zip(corpus, every * (len(corpus) // len(every) + 1)) for p in pair]
    else:
        path = Path(which)
        if path.suffix != ".jsonl" or not path.is_file():
            raise ValueError(f"--prompts {which!r}: expected one of {', '.join(PROMPT_SETS)} or an "
                             "existing .jsonl file")
        base = _read_jsonl(path)
    return [base[i % len(base)] for i in range(n)]
