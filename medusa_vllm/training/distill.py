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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medusa_vllm.tools.engine_proc import (
    EngineJob,
    EngineResult,
    EngineRunError,
    chat_prompt,
    engine_kwargs,
    run_engine,
    run_job,
)
from medusa_vllm.training.config import TrainConfig, TrainingError

__all__ = [
    "DISTILL_FILE",
    "add_distill_args",
    "builtin_prompts",
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
) -> Path:
    """Generate responses to ``prompts`` with vLLM and write them to ``output`` (JSONL).

    Prompts whose template-formatted length leaves no room for a response
    within ``max_model_len`` are skipped. Returns the output path. Refuses to
    replace an existing file unless ``overwrite``.
    """
    from transformers import AutoTokenizer

    out = Path(output)
    if out.exists() and not overwrite:
        raise TrainingError(f"distill output {out} exists; refusing to overwrite it (pass overwrite)")
    if not prompts:
        raise TrainingError("self-distillation needs at least one prompt, found none")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = encode_prompts(tokenizer, prompts)
    jobs = []
    for messages, p in zip(prompts, ids):
        room = min(max_tokens, max_model_len - len(p))
        if room >= 1:
            jobs.append({"messages": messages, "prompt_token_ids": p, "max_tokens": room})
    if not jobs:
        raise TrainingError(
            f"every prompt is at least max_model_len={max_model_len} tokens long; raise "
            f"--seq-len or use shorter prompts"
        )
    job = EngineJob(
        llm=engine_kwargs(model, dtype=dtype, max_model_len=max_model_len, seed=seed),
        prompts=[j["prompt_token_ids"] for j in jobs],
        # No per-request seed: vLLM 0.32 on CPU crashes ("CPU Generator does not use offset")
        # when a seeded request's prefill is chunked. The engine seed keeps runs reproducible.
        sampling=[dict(temperature=temperature, top_p=top_p, max_tokens=j["max_tokens"]) for j in jobs],
        metrics=False, use_tqdm=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        res = run_job(job)
    else:
        try:
            # plain generation: no Medusa plugin needed
            res = run_engine(job, timeout=None, echo=verbose,
                             env_defaults={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_PLUGINS": ""})
        except EngineRunError as exc:
            raise TrainingError(f"vLLM generation for self-distillation failed: {exc}") from exc
    _write_jsonl(out, jobs, res, temperature)
    return out


def _write_jsonl(out: Path, jobs: list[dict[str, Any]], res: EngineResult, temperature: float) -> None:
    """The generated rows (one per prompt, in order), written atomically."""
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for job, text, ids, finish in zip(jobs, res.texts, res.token_ids, res.finish_reasons):
            msgs = job["messages"]
            f.write(json.dumps({
                "prompt": msgs[-1]["content"], "messages": msgs, "response": text,
                "prompt_token_ids": job["prompt_token_ids"], "response_token_ids": ids,
                "finish_reason": finish, "temperature": temperature,
            }, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


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
