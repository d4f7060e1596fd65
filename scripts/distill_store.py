#!/usr/bin/env python
"""Grow the committed self-distillation store (``medusa_vllm/assets/distill/``).

One vLLM engine (in this process, float32, eager) answers, in this order, the sets
asked for, each in chunks that are appended to the store as soon as they are done
(an interrupted run keeps every finished chunk; a rerun generates only what is
missing):

* ``everyday-heldout`` / ``everyday-train``: everyday chat requests
  (:mod:`medusa_vllm.training.everyday`), part of them written by the backbone
  itself from topic seeds (the requests are kept in ``--work`` so a rerun answers
  the same ones), the rest from templates;
* ``topics-heldout`` / ``topics-train``: everyday requests on common WordNet nouns,
  templates chosen by the noun's kind (:mod:`medusa_vllm.training.topics`); no topic
  shares a word with the benchmark's everyday prompts;
* ``bench-everyday`` (only with ``--store`` elsewhere: never training data): the
  benchmark's own everyday prompts (``medusa-vllm bench --prompts everyday``), answered
  the same way, to score heads on exactly what the bench measures;
* ``corpus-heldout`` / ``corpus-train``: the default-heads recipe's corpus prompts,
  drawn exactly as ``scripts/train_default_heads.py`` draws them (held-out split; the
  greedy train prompts ``train_prompts`` + the extra chunks, not the sampled set), so
  the recipe finds their answers in the store.

Answers are greedy with the recipe's ``max_tokens`` and ``max_model_len``. Example
(what session 9 ran, niced on a shared CPU)::

    nice -n 19 .venv/bin/python scripts/distill_store.py --everyday-heldout 200 \\
        --corpus-heldout 256 --everyday-train 1500 --corpus-train 6000 --until 04:00
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medusa_vllm.training.distill import (
    ChunkedEngine,
    StoreItem,
    distill_into_store,
    prepare_engine_env,
)
from medusa_vllm.training.store import STORE_DIR, DistillStore


def log(msg: str) -> None:
    print(f"[distill_store {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def deadline_of(until: str | None) -> float | None:
    """``HH:MM`` (UTC, today or, if past, tomorrow) as ``time.time()`` seconds."""
    if not until:
        return None
    h, m = (int(x) for x in until.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    t = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if t < now:
        t += dt.timedelta(days=1)
    return t.timestamp()


def everyday_items(args, engine: ChunkedEngine, tok, split: str, n: int) -> list[StoreItem]:
    from medusa_vllm.training import everyday as ev

    path = Path(args.work) / f"everyday-requests-{split}-{n}.jsonl"
    if path.is_file():
        reqs = ev.read_requests(path)
        log(f"everyday {split}: {len(reqs)} requests from {path}")
    else:
        words = ev.load_topic_words(tokenizer=tok)
        vocab = ev.vocabulary()

        def write(batch: list[list[dict[str, str]]]) -> list[str]:
            from medusa_vllm.training.distill import encode_prompts

            t0 = time.perf_counter()
            out = engine.generate(encode_prompts(tok, batch),
                                  [{"temperature": args.writer_temperature, "top_p": 0.95,
                                    "max_tokens": 48} for _ in batch])
            ntok = sum(len(o[0]) for o in out)
            log(f"everyday {split}: the backbone wrote {len(batch)} requests, {ntok} tokens in "
                f"{time.perf_counter() - t0:.0f} s")
            return [o[1] for o in out]

        reqs, stats = ev.build_requests(words, n, seed=args.seed, split=split,
                                        generate=write if args.written_fraction > 0 else None,
                                        written_fraction=args.written_fraction, vocabulary=vocab)
        ev.write_requests(path, reqs)
        log(f"everyday {split}: {len(reqs)} requests ({stats}) -> {path}")
    return [StoreItem(r.messages(), {k: v for k, v in r.to_dict().items() if k != "text"})
            for r in reqs]


def topic_items(tok, split: str, n: int, seed: int) -> list[StoreItem]:
    import re

    from medusa_vllm.tools.bench.prompts import EVERYDAY_PROMPTS
    from medusa_vllm.training import everyday as ev
    from medusa_vllm.training import topics as tp

    topics = tp.load_wordnet_topics(ev.load_word_list(), tok)
    bench_words = {w for p in EVERYDAY_PROMPTS for w in re.findall(r"[a-z]+", p.lower())}
    reqs = tp.topic_requests(topics, n, seed=seed, split=split, exclude_words=bench_words,
                             skip={ev.dedupe_key(p) for p in EVERYDAY_PROMPTS})
    return [StoreItem(r.messages(), {k: v for k, v in r.to_dict().items() if k != "text"})
            for r in reqs]


def bench_items() -> list[StoreItem]:
    from medusa_vllm.tools.bench.prompts import EVERYDAY_PROMPTS

    return [StoreItem([{"role": "user", "content": p}], {"bench_index": i})
            for i, p in enumerate(EVERYDAY_PROMPTS)]


def corpus_items(split: str, recipe, n: int) -> list[StoreItem]:
    from medusa_vllm.training.prompts import build_prompt_records

    if split == "heldout":
        records = build_prompt_records(n, seed=recipe.prompt_seed, split="heldout")
        idx = list(range(len(records)))
    else:
        first = recipe.train_prompts + recipe.sampled_prompts
        # the greedy train prompts of the recipe: train_prompts, then the extra chunks
        # (the sampled prompts between them are answered at temperature 0.7: not here)
        total = first + max(0, n - recipe.train_prompts)
        records = build_prompt_records(total, seed=recipe.prompt_seed, split="train")
        idx = list(range(min(n, recipe.train_prompts))) + list(range(first, total))
    return [StoreItem([{"role": "user", "content": records[i].text}],
                      {**{k: v for k, v in records[i].to_dict().items() if k != "text"}, "draw": i})
            for i in idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(STORE_DIR), help="store folder (default: the package's)")
    ap.add_argument("--work", default=str(REPO / "runs" / "distill_store"),
                    help="where the everyday requests are kept between runs")
    ap.add_argument("--everyday-heldout", type=int, default=0, metavar="N")
    ap.add_argument("--corpus-heldout", type=int, default=0, metavar="N")
    ap.add_argument("--everyday-train", type=int, default=0, metavar="N")
    ap.add_argument("--corpus-train", type=int, default=0, metavar="N",
                    help="the first N greedy train prompts of the recipe")
    ap.add_argument("--topics-heldout", type=int, default=0, metavar="N")
    ap.add_argument("--topics-train", type=int, default=0, metavar="N")
    ap.add_argument("--bench-everyday", action="store_true",
                    help="answer the bench's everyday prompts (an evaluation set: refused "
                         "for the package's store, which is training data)")
    ap.add_argument("--written-fraction", type=float, default=0.5,
                    help="share of everyday requests the backbone writes (the rest: templates)")
    ap.add_argument("--writer-temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0, help="everyday request seed")
    ap.add_argument("--chunk", type=int, default=50, help="prompts per committed file")
    ap.add_argument("--until", default=None, metavar="HH:MM",
                    help="UTC time after which no new chunk starts")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from medusa_vllm.tools.default_model import default_model_dir
    from medusa_vllm.training.default_heads.recipe import Recipe

    if args.bench_everyday and Path(args.store).resolve() == STORE_DIR.resolve():
        ap.error("--bench-everyday writes the benchmark's own prompts: give another --store "
                 "(the package's store is training data)")
    prepare_engine_env()
    recipe = Recipe()
    model = default_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model))
    store = DistillStore(args.store)
    engine = ChunkedEngine(model, dtype="float32", max_model_len=recipe.max_model_len, seed=recipe.seed)
    deadline = deadline_of(args.until)
    common = {"max_tokens": recipe.max_tokens, "chunk": args.chunk, "deadline": deadline, "log": log}
    plan = [("everyday", "heldout", args.everyday_heldout), ("corpus", "heldout", args.corpus_heldout),
            ("everyday", "train", args.everyday_train), ("corpus", "train", args.corpus_train),
            ("topics", "heldout", args.topics_heldout), ("topics", "train", args.topics_train),
            ("bench", "everyday", 1 if args.bench_everyday else 0)]
    for source, split, n in plan:
        if n <= 0:
            continue
        if deadline is not None and time.time() > deadline:
            log("deadline reached")
            break
        name = f"{source}-{split}"
        if source == "everyday":
            items = everyday_items(args, engine, tok, split, n)
            rec = {"builder": "medusa_vllm.training.everyday.build_requests", "split": split,
                   "n": n, "seed": args.seed, "written_fraction": args.written_fraction}
            if args.written_fraction > 0:
                rec["writer"] = {"temperature": args.writer_temperature, "top_p": 0.95,
                                 "max_tokens": 48}
            src = "everyday requests: /usr/share/dict/words topics x request kinds"
        elif source == "topics":
            items = topic_items(tok, split, n, args.seed)
            rec = {"builder": "medusa_vllm.training.topics.topic_requests", "split": split, "n": n,
                   "seed": args.seed, "exclude": "words of medusa_vllm.tools.bench.prompts."
                   "EVERYDAY_PROMPTS"}
            src = ("everyday requests: WordNet nouns (wordnet-base) x request kinds, templates "
                   "by the noun's lexicographer file")
        elif source == "bench":
            items, name = bench_items(), "bench-everyday"
            rec = {"builder": "medusa_vllm.tools.bench.prompts.EVERYDAY_PROMPTS"}
            src = "the bench's own everyday prompts (evaluation only)"
        else:
            items = corpus_items(split, recipe, n)
            rec = {"builder": "medusa_vllm.training.prompts.build_prompt_records", "split": split,
                   "seed": recipe.prompt_seed, "n": n,
                   "train_prompts": recipe.train_prompts, "sampled_prompts": recipe.sampled_prompts}
            src = "corpus prompts: Debian texts (python3.11-doc, fortunes, sword WEB/RV1909)"
        distill_into_store(engine, tok, store, name, items, prompt_source=src, recipe=rec, **common)
    log(f"store: {store.verify()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
