"""The recipe stages that build the heads: disjoint prompt sets from the offline
Debian texts (``prompts``), the backbone's own answers through vLLM
(``distill``) and Medusa-1 training on them (``train``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from medusa_vllm.training.default_heads.recipe import (
    Recipe,
    Work,
    extra_chunks,
    read_jsonl,
    say,
    train_files,
    write_json,
)

__all__ = ["stage_distill", "stage_prompts", "stage_train"]


def stage_prompts(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Train (greedy + sampled + extra) and held-out prompt sets, disjoint by
    construction; cached sets are checked against what the recipe draws now
    (``model`` is not used)."""
    from medusa_vllm.training.prompts import build_prompt_records, write_prompts

    t0 = time.perf_counter()
    first = r.train_prompts + r.sampled_prompts
    train = build_prompt_records(first + r.extra_train_prompts, seed=r.prompt_seed, split="train")
    held = build_prompt_records(r.heldout_prompts, seed=r.prompt_seed, split="heldout")
    overlap = {p.text for p in train} & {p.text for p in held}
    if overlap:
        raise RuntimeError(f"{len(overlap)} held-out prompts also appear in the train prompts")
    sets = [(w.prompts_train, train[: r.train_prompts]), (w.prompts_sampled, train[r.train_prompts: first]),
            (w.prompts_heldout, held)]
    for i, (a, b) in enumerate(extra_chunks(r)):
        sets.append((w.prompts_extra(i), train[first + a: first + b]))
    written = 0
    for path, records in sets:
        if path.is_file() and not force:
            # a cached set must be what the recipe draws now (its answers are cached too)
            if [x["text"] for x in read_jsonl(path)] != [p.text for p in records]:
                raise RuntimeError(f"{path} differs from the prompts the recipe draws now; "
                                   f"pass --force prompts,distill to rebuild both")
            continue
        write_prompts(path, records)
        written += 1
    say(f"prompts: {len(train)} train, {len(held)} held-out ({written} of {len(sets)} sets written, "
        f"the others cached and checked) in {time.perf_counter() - t0:.0f} s")


def _generate(r: Recipe, w: Work, model: Path, prompts: Path, out: Path, temperature: float,
              seed: int, force: bool, timings: dict) -> None:
    from medusa_vllm.training.distill import generate_distill_data
    from medusa_vllm.training.store import STORE_DIR, DistillStore

    if out.is_file() and not force:
        say(f"distill: {out.name} cached")
        return
    rows = read_jsonl(prompts)
    messages = [[{"role": "user", "content": row["text"]}] for row in rows]
    metas = [{k: v for k, v in row.items() if k != "text"} for row in rows]
    say(f"distill: {len(messages)} prompts -> {out.name} (temperature {temperature})")
    t0 = time.perf_counter()
    # committed answers first (medusa_vllm/assets/distill, docs/default-heads.md 'Committed
    # data'); only the missing ones are generated, and appended there as a new file
    store = DistillStore(r.store_dir or STORE_DIR) if r.use_store else None
    set_name = ("corpus-heldout" if out == w.distill_heldout
                else "corpus-sampled" if temperature > 0 else "corpus-train")
    generate_distill_data(
        model, messages, out, temperature=temperature, max_tokens=r.max_tokens,
        max_model_len=r.max_model_len, seed=seed, dtype="float32", overwrite=True,
        store=store, store_set=set_name if r.store_append else None, metas=metas,
        prompt_source="corpus prompts: Debian texts (scripts/train_default_heads.py)",
        recipe={"builder": "medusa_vllm.training.default_heads stage 'distill'",
                "prompts_file": prompts.name, "prompt_seed": r.prompt_seed},
    )
    dt = time.perf_counter() - t0
    gen = read_jsonl(out)
    ntok = sum(len(g["response_token_ids"]) for g in gen)
    timings[out.name] = {
        "prompts": len(gen), "response_tokens": ntok, "seconds": round(dt, 1),
        "tokens_per_s": round(ntok / dt, 1),
        "finished_by_eos": sum(g["finish_reason"] == "stop" for g in gen),
    }
    say(f"distill: {out.name}: {ntok} tokens in {dt:.0f} s ({ntok / dt:.0f} tok/s incl. start-up)")


def stage_distill(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Self-distillation: the backbone's own answers (vLLM, float32, eager)."""
    tfile = w / "distill_timings.json"
    timings = json.loads(tfile.read_text()) if tfile.is_file() else {}
    runs = [(w.prompts_heldout, w.distill_heldout, 0.0, r.seed),
            (w.prompts_train, w.distill_train, 0.0, r.seed)]
    if r.sampled_prompts:
        runs.append((w.prompts_sampled, w.distill_sampled, r.sampled_temperature, r.seed + 1))
    runs += [(w.prompts_extra(i), w.distill_extra(i), 0.0, r.seed) for i in range(len(extra_chunks(r)))]
    for prompts, out, temperature, seed in runs:
        _generate(r, w, model, prompts, out, temperature, seed, force, timings)
        write_json(tfile, timings)


def stage_train(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Medusa-1: frozen backbone, hidden states cached on disk, held-out eval."""
    from medusa_vllm.training import TrainConfig, train
    from medusa_vllm.training.trainer import latest_checkpoint

    out = w.medusa1
    if (out / "train_summary.json").is_file() and not force:
        say("train: cached (medusa1/train_summary.json)")
        return
    files = train_files(r, w)
    steps = max(1, round(r.epochs * sum(len(read_jsonl(p)) for p in files) / r.batch_size))
    resume = not force and latest_checkpoint(out) is not None
    cfg = TrainConfig(
        model=str(model), output=str(out), data=[str(f) for f in files],
        eval_data=[str(w.distill_heldout)], max_eval_rows=r.heldout_prompts,
        recipe="medusa1", num_heads=r.num_heads, num_layers=r.num_layers,
        draft_vocab_size=r.draft_vocab_size, original_lm_head=r.original_lm_head,
        seq_len=r.seq_len, max_steps=steps, batch_size=r.batch_size, lr=r.lr,
        lr_warmup_steps=r.lr_warmup_steps, lambda_decay=r.lambda_decay, seed=r.seed,
        dtype="float32", cache_hidden="disk", cache_dtype="float32",
        save_steps=100, save_total_limit=1, log_steps=10,
        resume=resume, overwrite=not resume,
    )
    say(f"train: medusa1, {steps} steps of {r.batch_size} rows ({r.epochs} epochs)"
        + (" (resuming)" if resume else ""))
    res = train(cfg)
    say(f"train: {res.steps_per_second:.2f} steps/s\n{res.accuracy.table() if res.accuracy else ''}")
