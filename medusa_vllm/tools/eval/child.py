"""The engine side of the translation eval: every row of one engine, timed, in one process.

:func:`run_rows` is an :class:`~medusa_vllm.tools.engine_proc.EngineJob` probe
(``probe="medusa_vllm.tools.eval.child:run_rows"``): the job itself generates
nothing, and the probe, given the engine ``llm``, applies the chat template, runs
an untimed greedy warm-up, then each row one after the other: ``LLM.generate``
(per-request sampling options, a seed per verse when sampling) or
``LLM.beam_search``, timing only that call and taking the spec-decode counters
(:func:`medusa_vllm.engine.metrics.spec_decode_summary`) before and after it.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["WARMUP_TOKENS", "run_rows"]

WARMUP_TOKENS = 8


def _prompts(llm: Any, texts: list[str], chat_template: bool) -> list[str]:
    from medusa_vllm.tools.engine_proc import chat_prompt

    if not chat_template:
        return list(texts)
    tok = llm.get_tokenizer()
    return [chat_prompt(tok, [{"role": "user", "content": t}]) or t for t in texts]


def _generate(llm: Any, prompts: list[str], row: dict[str, Any], max_tokens: int, seed: int) -> dict[str, Any]:
    from vllm import SamplingParams

    sampling = dict(row.get("sampling") or {})
    sampled = float(sampling.get("temperature", 1.0)) > 0.0
    params = [SamplingParams(max_tokens=max_tokens, **sampling, **({"seed": seed + i} if sampled else {}))
              for i in range(len(prompts))]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    comps = [o.outputs[0] for o in outs]
    return {"wall_s": wall, "token_ids": [list(c.token_ids) for c in comps], "texts": [c.text for c in comps],
            "finish_reasons": [c.finish_reason for c in comps]}


def _beam_search(llm: Any, prompts: list[str], row: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    from vllm.sampling_params import BeamSearchParams

    tok = llm.get_tokenizer()
    params = BeamSearchParams(beam_width=int(row["beam_width"]), max_tokens=max_tokens)
    t0 = time.perf_counter()
    outs = llm.beam_search([{"prompt": p} for p in prompts], params)
    wall = time.perf_counter() - t0
    eos = tok.eos_token_id
    token_ids, texts, reasons = [], [], []
    for out in outs:
        best = out.sequences[0]
        n_prompt = len(best.orig_prompt["prompt_token_ids"])
        ids = list(best.tokens[n_prompt:])
        finished = bool(ids) and ids[-1] == eos
        if finished:
            ids = ids[:-1]
        token_ids.append(ids)
        texts.append(tok.decode(ids, skip_special_tokens=True))
        reasons.append("stop" if finished else "length")
    return {"wall_s": wall, "token_ids": token_ids, "texts": texts, "finish_reasons": reasons}


def run_rows(llm: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``args["rows"]`` (``RowSpec.to_dict()`` each) on ``args["prompts"]``.

    ``args``: ``prompts`` (user turns), ``chat_template`` (bool), ``max_tokens``,
    ``warmup`` (prompts in the untimed warm-up), ``seed`` (first verse's sampling
    seed). Returns one dict per row: wall_s, token_ids, texts, finish_reasons and
    ``spec`` (the row's spec-decode counters, ``SpecDecodeSummary.to_dict()``).
    """
    from vllm import SamplingParams

    from medusa_vllm.engine.metrics import spec_decode_summary

    prompts = _prompts(llm, list(args["prompts"]), bool(args.get("chat_template", True)))
    max_tokens = int(args["max_tokens"])
    if args.get("warmup"):
        llm.generate(prompts[: int(args["warmup"])], SamplingParams(temperature=0.0, max_tokens=WARMUP_TOKENS),
                     use_tqdm=False)
    results = []
    for row in args["rows"]:
        before = spec_decode_summary(llm.get_metrics())
        if row.get("kind", "generate") == "beam_search":
            res = _beam_search(llm, prompts, row, max_tokens)
        else:
            res = _generate(llm, prompts, row, max_tokens, int(args.get("seed", 0)))
        res["spec"] = (spec_decode_summary(llm.get_metrics()) - before).to_dict()
        res["name"] = row["name"]
        results.append(res)
        print(f"[eval child] {row['name']}: {res['wall_s']:.1f} s, "  # the engine log's progress line
              f"{sum(len(t) for t in res['token_ids'])} tokens", flush=True)
    return results
