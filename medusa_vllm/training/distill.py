"""Self-distillation data: the backbone answers a prompt set with vLLM.

Medusa heads should learn what *this* backbone will say, so when no chat data
matching the backbone exists the training set is its own generations (paper
§2.3.2). :func:`generate_distill_data` formats each prompt with the tokenizer's
chat template (when it has one; else the raw text), generates with vLLM
(``temperature`` 0 = greedy, what greedy Medusa decoding verifies against) and
writes JSON lines::

    {"prompt": str, "messages": [...], "response": str,
     "prompt_token_ids": [int], "response_token_ids": [int],
     "finish_reason": "stop"|"length", "temperature": float}

The token ids are the exact sequence the backbone produced, so training uses
them as they are (no re-tokenization drift).

**The committed store** (:mod:`medusa_vllm.training.store`). Given a
:class:`~medusa_vllm.training.store.DistillStore`, :func:`generate_distill_data`
takes the answers already committed for the same backbone and settings from it and
generates only the missing ones (then appends them to the store as a new file when
``store_set`` is given). :func:`distill_into_store` does the same in this process
with one engine for many chunks, each chunk committed to the store as soon as it is
done (what long generation runs use: an interrupted run keeps its finished chunks).

vLLM runs in a child process (:func:`medusa_vllm.tools.engine_proc.run_engine`)
so that its engine, threads and KV cache are gone before training starts. CPU
defaults: ``enforce_eager=True``, ``dtype="float32"``, ``VLLM_CPU_KVCACHE_SPACE=2``
(GiB) unless already set.

During training (:mod:`medusa_vllm.training.trainer`) the *teacher* is the same
backbone: for Medusa-2 with its LoRA adapters disabled (``with
model.disable_adapter():``, no second model in memory), for Medusa-1 the frozen
backbone itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_vllm.tools.engine_proc import (
    EngineJob,
    EngineResult,
    EngineRunError,
    chat_prompt,
    engine_env,
    engine_kwargs,
    run_engine,
    run_job,
)
from medusa_vllm.training.config import TrainConfig, TrainingError
from medusa_vllm.training.store import DistillStore, Generator, StoreError, prompt_key

__all__ = [
    "DISTILL_FILE",
    "ChunkedEngine",
    "StoreItem",
    "add_distill_args",
    "builtin_prompts",
    "distill_into_store",
    "distill_main",
    "encode_prompts",
    "ensure_distill_data",
    "generate_distill_data",
]

DISTILL_FILE = "distill.jsonl"


def encode_prompts(tokenizer, prompts: Sequence[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each prompt: chat template + generation prompt if the
    tokenizer has a template, else the user text with the tokenizer's specials."""
    out = []
    for messages in prompts:
        text = chat_prompt(tokenizer, messages)
        if text is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = "\n".join(m["content"] for m in messages)
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out.append(list(ids))
    return out


def builtin_prompts(n: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` prompts from :func:`medusa_vllm.training.prompts.build_prompts` (offline texts)."""
    try:
        from medusa_vllm.training.prompts import build_prompts
    except ImportError as exc:
        raise TrainingError(
            "self-distillation without --data needs medusa_vllm.training.prompts.build_prompts, which "
            f"is not available ({exc}); pass --data PROMPTS.jsonl"
        ) from exc
    try:
        prompts = build_prompts(n, seed=seed)
    except (RuntimeError, ValueError) as exc:  # MissingCorpus names the apt-get fix
        raise TrainingError(f"built-in prompts for self-distillation: {exc}; or pass "
                            f"--data PROMPTS.jsonl") from exc
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append([{"role": "user", "content": p}])
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            out.append([{"role": "user", "content": p["prompt"]}])
        elif isinstance(p, list):
            out.append(p)
        else:
            raise TrainingError(f"medusa_vllm.training.prompts.build_prompts returned an unusable prompt {p!r}")
    return out


def generate_distill_data(
    model: str | Path,
    prompts: Sequence[list[dict[str, str]]],
    output: str | Path,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    max_model_len: int = 2048,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    in_process: bool = False,
    verbose: bool = True,
    store: DistillStore | None = None,
    store_set: str | None = None,
    prompt_source: str = "",
    recipe: dict[str, Any] | None = None,
    metas: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Generate responses to ``prompts`` with vLLM and write them to ``output`` (JSONL).

    Prompts whose template-formatted length leaves no room for a response
    within ``max_model_len`` are skipped. Returns the output path. Refuses to
    replace an existing file unless ``overwrite``.

    With a ``store``, answers committed there by the same backbone with the same
    settings are reused (a store made by another backbone is refused) and only the
    other prompts are generated; with ``store_set`` too, those new answers are
    appended to the store as a new file (``prompt_source``, ``recipe`` and the
    per-prompt ``metas`` go into its manifest entry and rows).
    """
    from transformers import AutoTokenizer

    out = Path(output)
    if out.exists() and not overwrite:
        raise TrainingError(f"distill output {out} exists; refusing to overwrite it (pass overwrite)")
    if not prompts:
        raise TrainingError("self-distillation needs at least one prompt, found none")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = encode_prompts(tokenizer, prompts)
    metas = list(metas) if metas is not None else [{} for _ in prompts]
    jobs = []
    for messages, p, meta in zip(prompts, ids, metas):
        room = min(max_tokens, max_model_len - len(p))
        if room >= 1:
            jobs.append({"messages": messages, "prompt_token_ids": p, "max_tokens": room, "meta": meta})
    if not jobs:
        raise TrainingError(
            f"every prompt is at least max_model_len={max_model_len} tokens long; raise "
            f"--seq-len or use shorter prompts"
        )
    found: dict[str, dict[str, Any]] = {}
    generator = None
    if store is not None:
        generator = Generator.for_backbone(model, dtype=dtype, temperature=temperature, top_p=top_p,
                                           max_tokens=max_tokens, max_model_len=max_model_len, seed=seed)
        try:
            found = store.lookup(generator, [prompt_key(j["messages"]) for j in jobs], store_set)
        except StoreError as exc:
            raise TrainingError(f"committed distillation data: {exc}") from exc
        _check_prompt_ids(found, jobs)
        if verbose:
            print(f"self-distillation: {len(found)} of {len(jobs)} answers taken from the committed "
                  f"store {store.root}", file=sys.stderr, flush=True)
    todo = [j for j in jobs if prompt_key(j["messages"]) not in found]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not todo:
        _write_rows(out, [found[prompt_key(j["messages"])] for j in jobs], tokenizer, temperature)
        return out
    t0 = time.perf_counter()
    res = _run_generation(model, todo, temperature=temperature, top_p=top_p, dtype=dtype,
                          max_model_len=max_model_len, seed=seed, in_process=in_process,
                          verbose=verbose)
    new = {prompt_key(j["messages"]): _row(j, ids, finish)
           for j, ids, finish in zip(todo, res.token_ids, res.finish_reasons)}
    if store is not None and store_set and generator is not None:
        rows = [r for r in new.values() if r["response_token_ids"]]
        if rows:
            store.append(store_set, rows, generator, prompt_source, recipe,
                         seconds=time.perf_counter() - t0)
    _write_rows(out, [found.get(k) or new[k] for k in (prompt_key(j["messages"]) for j in jobs)],
                tokenizer, temperature)
    return out


def _check_prompt_ids(found: dict[str, dict[str, Any]], jobs: Sequence[dict[str, Any]]) -> None:
    """Committed rows must have the prompt ids the tokenizer gives now (a changed chat
    template would make them answers to another prompt)."""
    for j in jobs:
        row = found.get(prompt_key(j["messages"]))
        if row is not None and row["prompt_token_ids"] != j["prompt_token_ids"]:
            raise TrainingError(
                f"committed row {row['key']} was generated from other prompt token ids than the "
                f"tokenizer's chat template gives now; the template changed, so the committed "
                f"answers do not apply: distill into another store folder")


def _row(job: dict[str, Any], ids: Sequence[int], finish: str | None) -> dict[str, Any]:
    """A store row (:data:`medusa_vllm.training.store.ROW_FIELDS`) of one generated answer."""
    return {"key": prompt_key(job["messages"]), "messages": job["messages"],
            "prompt_token_ids": list(job["prompt_token_ids"]), "response_token_ids": list(ids),
            "finish_reason": finish, "meta": job.get("meta") or {}}


def _run_generation(model: str | Path, jobs: Sequence[dict[str, Any]], *, temperature: float,
                    top_p: float, dtype: str, max_model_len: int, seed: int, in_process: bool,
                    verbose: bool) -> EngineResult:
    job = EngineJob(
        llm=engine_kwargs(model, dtype=dtype, max_model_len=max_model_len, seed=seed),
        prompts=[j["prompt_token_ids"] for j in jobs],
        # No per-request seed: vLLM 0.32 on CPU crashes ("CPU Generator does not use offset")
        # when a seeded request's prefill is chunked. The engine seed keeps runs reproducible.
        sampling=[{"temperature": temperature, "top_p": top_p, "max_tokens": j["max_tokens"]} for j in jobs],
        metrics=False, use_tqdm=True,
    )
    if in_process:
        return run_job(job)
    try:
        # plain generation: no Medusa plugin needed
        return run_engine(job, timeout=None, echo=verbose,
                          env_defaults={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_PLUGINS": ""})
    except EngineRunError as exc:
        raise TrainingError(f"vLLM generation for self-distillation failed: {exc}") from exc


def _write_rows(out: Path, rows: Sequence[dict[str, Any]], tokenizer, temperature: float) -> None:
    """Rows (one per prompt, in order) in the distill file format, written atomically."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            msgs = row["messages"]
            f.write(json.dumps({
                "prompt": msgs[-1]["content"], "messages": msgs,
                "response": tokenizer.decode(row["response_token_ids"], skip_special_tokens=True),
                "prompt_token_ids": row["prompt_token_ids"],
                "response_token_ids": row["response_token_ids"],
                "finish_reason": row["finish_reason"], "temperature": temperature,
            }, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


# ------------------------------------------------- chunked, in-process generation
@dataclass
class StoreItem:
    """One prompt to answer into the store, with where it came from (row ``meta``)."""

    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)


def prepare_engine_env() -> None:
    """Environment of an in-process engine (before vLLM is imported): threads bound to
    every core on small machines, a 2 GiB KV cache, no plugins and a one-hour limit per
    model step (vLLM's default 300 s kills a niced run on a busy CPU: session 9's
    engine died so at load 80), unless set already."""
    if "vllm" in sys.modules:
        return
    for k, v in engine_env().items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_PLUGINS", "")
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")


class ChunkedEngine:
    """One vLLM engine in this process (started on first use), for many generate calls."""

    def __init__(self, model: str | Path, *, dtype: str = "float32", max_model_len: int = 768,
                 seed: int = 0) -> None:
        self.model, self.dtype, self.max_model_len, self.seed = str(model), dtype, max_model_len, seed
        self._llm = None

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: Sequence[dict[str, Any]]
                 ) -> list[tuple[list[int], str, str | None]]:
        """(token ids, text, finish reason) of one completion per prompt."""
        if self._llm is None:
            prepare_engine_env()
            from vllm import LLM

            self._llm = LLM(**engine_kwargs(self.model, dtype=self.dtype,
                                            max_model_len=self.max_model_len, seed=self.seed))
        from vllm import SamplingParams

        outs = self._llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                  [SamplingParams(**s) for s in sampling], use_tqdm=False)
        return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason)
                for o in outs]


def distill_into_store(
    engine: ChunkedEngine,
    tokenizer,
    store: DistillStore,
    set_name: str,
    items: Sequence[StoreItem],
    *,
    prompt_source: str,
    recipe: dict[str, Any] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    chunk: int = 64,
    deadline: float | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> int:
    """Answer the ``items`` that ``store`` has no row for yet, ``chunk`` prompts at a
    time, appending each chunk to ``set_name`` as one new file when it is done.

    With a ``deadline`` (``time.time()`` seconds), chunks shrink so that, at the
    slowest pace seen so far, they end before it; none starts after it.
    Returns how many rows were added. The generator settings recorded are the
    engine's and these; committed rows of another backbone are refused.
    """
    generator = Generator.for_backbone(engine.model, dtype=engine.dtype, temperature=temperature,
                                       top_p=top_p, max_tokens=max_tokens,
                                       max_model_len=engine.max_model_len, seed=engine.seed)
    ids = encode_prompts(tokenizer, [it.messages for it in items])
    jobs = []
    for it, p in zip(items, ids):
        room = min(max_tokens, engine.max_model_len - len(p))
        if room >= 1:
            jobs.append({"messages": it.messages, "prompt_token_ids": p, "max_tokens": room,
                         "meta": it.meta})
    found = store.lookup(generator, [prompt_key(j["messages"]) for j in jobs], set_name)
    _check_prompt_ids(found, jobs)
    todo = [j for j in jobs if prompt_key(j["messages"]) not in found]
    log(f"{set_name}: {len(jobs)} prompts, {len(found)} committed, {len(todo)} to generate "
        f"in chunks of {chunk}")
    added, a, per_prompt = 0, 0, None
    while a < len(todo):
        size = chunk
        if deadline is not None and per_prompt is not None:
            # a chunk must end by the deadline: shrink it by the time past chunks took
            size = min(chunk, int((deadline - time.time()) / per_prompt))
        if deadline is not None and (time.time() > deadline or size < min(8, chunk)):
            log(f"{set_name}: deadline reached, {len(todo) - a} prompts left for a later run")
            break
        part = todo[a: a + size]
        a += len(part)
        t0 = time.perf_counter()
        res = engine.generate([j["prompt_token_ids"] for j in part],
                              [{"temperature": temperature, "top_p": top_p, "max_tokens": j["max_tokens"],
                                    "seed": None} for j in part])
        dt = time.perf_counter() - t0
        per_prompt = max(per_prompt or 0.0, dt / len(part))
        rows = [_row(j, tok, fin) for j, (tok, _, fin) in zip(part, res) if tok]
        ntok = sum(len(r["response_token_ids"]) for r in rows)
        entry = store.append(set_name, rows, generator, prompt_source, recipe, seconds=dt,
                             extra={"tokens_per_s": round(ntok / max(dt, 1e-9), 1),
                                    "finished_by_eos": sum(r["finish_reason"] == "stop" for r in rows)})
        added += len(rows)
        log(f"{set_name}: {entry.name}: {len(rows)} rows, {ntok} tokens in {dt:.0f} s "
            f"({ntok / max(dt, 1e-9):.1f} tok/s), {entry.bytes} bytes")
    return added


def _has_responses(path: str | Path) -> bool:
    """Whether a data file already holds generated token ids (every row)."""
    from medusa_vllm.training.data import read_file

    ds = read_file(path)
    return {"prompt_token_ids", "response_token_ids"} <= set(ds.column_names)


def ensure_distill_data(config: TrainConfig, output: str | Path) -> list[str]:
    """The training files of a self-distillation run.

    Files that already hold ``prompt_token_ids`` + ``response_token_ids`` are
    used as they are; the others (or :func:`builtin_prompts` without any
    ``data``) are prompts that vLLM answers into ``<output>/distill.jsonl``,
    which a resumed run reuses.
    """
    from medusa_vllm.training.data import load_prompts

    out = Path(output) / DISTILL_FILE
    ready, prompt_files = [], []
    for p in config.data:
        (ready if _has_responses(p) else prompt_files).append(str(p))
    if config.data and not prompt_files:
        return ready
    if out.is_file() and config.resume:
        return ready + [str(out)]
    if prompt_files:
        prompts = load_prompts(prompt_files, config.text_sample_by)
        if config.distill_num_prompts is not None:
            prompts = prompts[: config.distill_num_prompts]
    else:
        prompts = builtin_prompts(config.distill_num_prompts or 512, config.seed)
    if config.progress:
        print(f"self-distillation: generating {len(prompts)} responses with vLLM into {out}",
              file=sys.stderr, flush=True)
    generate_distill_data(
        config.model, prompts, out, temperature=config.distill_temperature,
        top_p=config.distill_top_p, max_tokens=config.distill_max_tokens,
        max_model_len=config.seq_len, seed=config.seed, overwrite=False,
        verbose=config.progress,
    )
    return ready + [str(out)]


# ----------------------------------------------------------------------- CLI
def add_distill_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``medusa-vllm distill`` (generate self-distillation data only)."""
    parser.add_argument("--model", required=True, help="HF backbone folder (the teacher)")
    parser.add_argument("--prompts", nargs="*", default=[], metavar="FILE",
                        help="prompt files (.jsonl with prompt/text/conversations/messages, or "
                             ".txt); default: built-in prompts from medusa_vllm.training.prompts")
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--num-prompts", type=int, default=None, help="use at most N prompts")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=256, help="response length cap")
    parser.add_argument("--max-model-len", type=int, default=1024,
                        help="prompt + response token cap (use the training --seq-len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def distill_main(args: argparse.Namespace) -> int:
    """Run ``medusa-vllm distill``; 0 on success, 2 on bad input (printed)."""
    from medusa_vllm.training.data import load_prompts

    try:
        if args.prompts:
            prompts = load_prompts(args.prompts)
        else:
            prompts = builtin_prompts(args.num_prompts or 512, args.seed)
        if args.num_prompts is not None:
            prompts = prompts[: args.num_prompts]
        out = generate_distill_data(
            args.model, prompts, args.output, temperature=args.temperature, top_p=args.top_p,
            max_tokens=args.max_tokens, max_model_len=args.max_model_len, seed=args.seed,
            dtype=args.dtype, overwrite=args.overwrite,
        )
    except TrainingError as exc:
        print(f"medusa-vllm distill: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    p = add_distill_args(argparse.ArgumentParser(prog="python -m medusa_vllm.training.distill"))
    sys.exit(distill_main(p.parse_args()))
