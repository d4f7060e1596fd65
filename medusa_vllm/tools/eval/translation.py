"""``medusa-vllm eval translation``: seed 003's translation table, run on this machine.

    medusa-vllm eval translation --quick                 # 24 verses, fewer rows, a few minutes
    medusa-vllm eval translation --out runs/eval_translation   # every held-out verse, every row
    medusa-vllm eval translation --model M --heads H --num-verses 200

Spanish (Reina-Valera 1909) -> English (World English Bible) verses of the held-out
chapters (:mod:`.data`), one chat turn each, decoded by every row of
:func:`medusa_vllm.tools.eval.rows.build_plan`: one engine per configuration in a
subprocess (:func:`medusa_vllm.tools.engine_proc.run_engine`), the rows that differ
only per request run on the same engine (:mod:`.child`). Vanilla greedy runs first;
every greedy Medusa row (chains, fitted tree, beam trees) must reproduce its tokens
verse for verse, else the command stops with exit code 1 naming the first differing
verse. Scores and the real-time factor are defined in :mod:`.metrics`. Writes
``table.md``, ``results.json``, ``translations.jsonl`` and ``bleu_vs_rtf.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medusa_vllm.tools.eval.data import PROMPT_TEMPLATE, EvalVerse, clean_hypothesis, render_prompt
from medusa_vllm.tools.eval.metrics import (
    LosslessnessError,
    check_lossless,
    quality_scores,
    real_time_factor,
    tokens_per_second,
)
from medusa_vllm.tools.eval.rows import EngineSpec, PlanOptions, RowSpec, build_plan

__all__ = [
    "QUICK_VERSES",
    "add_eval_args",
    "eval_main",
    "run_translation_eval",
    "score_row",
    "translation_main",
]

QUICK_VERSES = 24
QUICK_MAX_TOKENS = 96
QUICK_BATCH_SIZE = 8
MAX_TOKENS = 128
CHILD_PROBE = "medusa_vllm.tools.eval.child:run_rows"
RTF_DEFINITION = ("real-time factor = the row's decoding wall time / vanilla greedy's decoding wall time "
                  "on the same verses in the same run (engine start-up and warm-up excluded; lower is faster)")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None


def _pairs(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        eps, sep, delta = part.partition(":")
        try:
            out.append((float(eps), float(delta)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected EPS:DELTA pairs separated by commas (e.g. 0.09:0.3), found {text!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected EPS:DELTA, found {part!r}")
    return out


def add_translation_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--model", help="backbone (default: the embedded default model)")
    ap.add_argument("--heads", help="Medusa heads folder (default: the shipped Medusa heads)")
    ap.add_argument("--dtype", default="float32",
                    help="engine dtype (default float32: every greedy row is checked token for token "
                         "against vanilla, which holds exactly only in float32; in bfloat16 outputs may "
                         "differ where vanilla's two best tokens tie, and the check would fail on them)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_VERSES} verses, max {QUICK_MAX_TOKENS} tokens, {QUICK_BATCH_SIZE} in flight, "
                         "in-process engines; vanilla, single Medusa head, fitted tree, one typical setting, "
                         "Beam 2 x all heads; no vLLM beam search rows unless --vllm-beam-widths asks "
                         "(at RTF ~18 they alone would take longer than the rest)")
    ap.add_argument("--num-verses", type=int, help="first N verses of the test order (default: all)")
    ap.add_argument("--batch-size", type=int,
                    help="requests in flight (max_num_seqs); default 1 = one verse at a time, as a live "
                         f"translator (--quick: {QUICK_BATCH_SIZE})")
    ap.add_argument("--max-tokens", type=int, help=f"per verse (default {MAX_TOKENS}; --quick {QUICK_MAX_TOKENS})")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--medusa-heads", type=_ints, help="k of the 'Medusa greedy, k heads' rows (default 1..K)")
    ap.add_argument("--typical", type=_pairs, help="EPS:DELTA typical-acceptance settings, comma-separated")
    ap.add_argument("--temperature", type=float, help="sampling temperature of the typical rows (0.7)")
    ap.add_argument("--beam-widths", type=_ints, help="W of the 'Beam W, Medusa Heads K' rows (2,5,10)")
    ap.add_argument("--beam-heads", type=_ints, help="K of those rows (2 and all heads)")
    ap.add_argument("--vllm-beam-widths", type=_ints, help="widths of vLLM's beam search rows (2,5,10)")
    ap.add_argument("--no-sampling-rows", action="store_true",
                    help="leave out vanilla sampling and Medusa rejection sampling")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of the first verse (then +1 per verse)")
    ap.add_argument("--kv-cache-gib", default="1", help="VLLM_CPU_KVCACHE_SPACE of each engine (GiB)")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="run each engine in-process (vLLM's uni executor, no V1 multiprocessing: start-up "
                         "~10 s instead of ~45 s; every row the same way). Default: on with --quick, else off "
                         "(vLLM's own engine processes, as users run it)")
    ap.add_argument("--timeout", type=float,
                    help="seconds per engine (default: 1800 with --quick, else 12 h)")
    ap.add_argument("--out", default="runs/eval_translation")
    return ap


def add_eval_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``medusa-vllm eval TASK``: one sub-command per evaluation (``translation``)."""
    sub = ap.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    add_translation_args(sub.add_parser(
        "translation", help="Spanish -> English Bible verses: BLEU, ROUGE, RTF per decoding strategy",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return ap


def eval_main(args: argparse.Namespace) -> int:
    if args.eval_task == "translation":
        return translation_main(args)
    raise ValueError(f"eval: unknown task {args.eval_task!r}; known: translation")


# ----------------------------------------------------------------- scoring
def score_row(row: RowSpec, result: Mapping[str, Any] | None, references: Sequence[str],
              vanilla_wall_s: float | None, reason: str | None = None) -> dict[str, Any]:
    """One table row from the engine's ``result`` (``None``: not run, ``reason`` why)."""
    out: dict[str, Any] = {"name": row.name, "group": row.group, "engine": row.engine, "note": row.note,
                           "kind": row.kind, "sampling": row.sampling, "beam_width": row.beam_width}
    if result is None:
        return {**out, "available": False, "reason": reason or "not run", "lossless": None}
    hyps = [clean_hypothesis(t) for t in result["texts"]]
    tokens = sum(len(t) for t in result["token_ids"])
    spec = result.get("spec") or {}
    q = quality_scores(hyps, references)
    out.update(available=True, **q.to_dict(), wall_s=result["wall_s"], output_tokens=tokens,
               tokens_per_s=tokens_per_second(tokens, result["wall_s"]) if result["wall_s"] > 0 else None,
               rtf=real_time_factor(result["wall_s"], vanilla_wall_s) if vanilla_wall_s else None,
               mean_accepted_length=None if row.kind == "beam_search" else spec.get("mean_accepted_length", 1.0),
               acceptance_per_depth=spec.get("acceptance_per_depth", []),
               tree_size=spec.get("tree_size"),
               finished=sum(r == "stop" for r in result.get("finish_reasons", [])),
               lossless=True if row.lossless else None)
    return out


# ------------------------------------------------------------------ running
def _engine_job(engine: EngineSpec, rows: Sequence[RowSpec], prompts: Sequence[str], cfg: Mapping[str, Any]):
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs

    return EngineJob(
        llm=engine_kwargs(cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
                          max_num_seqs=engine.max_num_seqs, speculative_config=engine.speculative_config),
        prompts=[], metrics=True, probe=CHILD_PROBE,
        probe_args={"prompts": list(prompts), "chat_template": True, "max_tokens": cfg["max_tokens"],
                    "warmup": min(len(prompts), engine.max_num_seqs, 4), "seed": cfg["seed"],
                    "rows": [r.to_dict() for r in rows]},
    )


def run_translation_eval(verses: Sequence[EvalVerse], engines: Sequence[EngineSpec], rows: Sequence[RowSpec],
                         cfg: Mapping[str, Any], *, run=None, progress: bool = True,
                         log_dir: Path | None = None, on_engine=None) -> tuple[list[dict], dict[str, list[str]]]:
    """Run every engine's rows, score them and check losslessness as each engine returns.

    ``cfg``: model, dtype, max_model_len, max_tokens, seed, kv_cache_gib, timeout.
    ``run`` replaces :func:`medusa_vllm.tools.engine_proc.run_engine` (tests).
    ``on_engine(rows, outputs)`` is called with the rows scored so far after each
    engine (partial results of a long run). Returns the scored rows (plan order) and
    each row's hypotheses. Raises
    :class:`LosslessnessError` (``.rows`` holds the rows scored so far) when a greedy
    Medusa row differs from vanilla greedy.
    """
    from tqdm import tqdm

    from medusa_vllm.tools.engine_proc import EngineRunError, run_engine

    # timed (real-time factor): vLLM's own processes, as users run it, unless the
    # run asks for in-process engines (--quick); every row runs the same way
    run = run or functools.partial(run_engine, in_process=bool(cfg.get("in_process", False)))
    prompts = [render_prompt(v) for v in verses]
    refs = [v.en for v in verses]
    keys = [v.key for v in verses]
    if not engines or engines[0].key != "vanilla" or rows[0].engine != "vanilla":
        raise ValueError("the plan must start with the vanilla engine and its greedy row (the RTF reference)")
    scored: dict[str, dict] = {}
    outputs: dict[str, list[str]] = {}
    vanilla: dict[str, Any] | None = None
    bar = tqdm(total=len(rows), desc="translation eval", unit="row", disable=not progress)
    try:
        for engine in engines:
            mine = [r for r in rows if r.engine == engine.key]
            if not mine:
                continue
            bar.set_postfix_str(engine.key)
            results: list[dict] | None = None
            reason = engine.unavailable
            if reason is None:
                try:
                    res = run(_engine_job(engine, mine, prompts, cfg), timeout=cfg.get("timeout"),
                              env={"VLLM_CONFIGURE_LOGGING": "0"},
                              env_defaults={"VLLM_CPU_KVCACHE_SPACE": str(cfg.get("kv_cache_gib", "1")),
                                            # one starved step on a shared machine must not kill the
                                            # engine (vLLM's 300 s); the eval has its own timeout
                                            "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"},
                              log=(log_dir / f"engine-{engine.key}.log") if log_dir else None)
                    results = list(res.probe)
                except EngineRunError as exc:
                    if any(r.group != "beam_medusa" for r in mine):
                        raise
                    # beam trees are optional until the engine supports them: say why, keep going
                    lines = [ln for ln in str(exc).splitlines() if "Error" in ln]
                    reason = f"engine failed ({(lines or [str(exc).splitlines()[0]])[0].strip()[:200]})"
            for i, row in enumerate(mine):
                result = results[i] if results is not None else None
                if row.name == rows[0].name:
                    vanilla = result
                van_wall = vanilla["wall_s"] if vanilla else None
                scored[row.name] = score_row(row, result, refs, van_wall, reason)
                if result is not None:
                    outputs[row.name] = [clean_hypothesis(t) for t in result["texts"]]
                    if row.lossless:
                        if vanilla is None:
                            raise ValueError(f"{row.name}: vanilla greedy has not run; cannot check losslessness")
                        try:
                            check_lossless(row.name, keys, vanilla["token_ids"], result["token_ids"],
                                           vanilla["texts"], result["texts"])
                        except LosslessnessError as exc:
                            scored[row.name]["lossless"] = False
                            exc.rows = [scored[r.name] for r in rows if r.name in scored]  # type: ignore[attr-defined]
                            exc.outputs = outputs  # type: ignore[attr-defined]
                            raise
                bar.update(1)
            if on_engine is not None:
                on_engine([scored[r.name] for r in rows if r.name in scored], outputs)
    finally:
        bar.close()
    return [scored[r.name] for r in rows], outputs


def _plan_options(args: argparse.Namespace, heads: str, num_heads: int) -> PlanOptions:
    from medusa_vllm.tools.eval import rows as R

    quick = bool(args.quick)
    return PlanOptions(
        heads=heads, num_heads=num_heads, batch_size=args.batch_size,
        medusa_heads=args.medusa_heads or ((1,) if quick else None),
        typical_settings=args.typical or ((R.TYPICAL_SETTINGS[1],) if quick else R.TYPICAL_SETTINGS),
        temperature=R.SAMPLING_TEMPERATURE if args.temperature is None else args.temperature,
        beam_widths=args.beam_widths or ((2,) if quick else R.BEAM_WIDTHS),
        beam_heads=args.beam_heads or ((None,) if quick else R.BEAM_HEADS),
        vllm_beam_widths=args.vllm_beam_widths or (() if quick else R.VLLM_BEAM_WIDTHS),
        sampling_rows=not (args.no_sampling_rows or quick),
    )


def translation_main(args: argparse.Namespace) -> int:
    """Entry point of ``medusa-vllm eval translation``; 1 when a greedy row is not lossless."""
    from medusa_vllm.checkpoints import read_heads_info
    from medusa_vllm.engine.cpu.machine import machine_info
    from medusa_vllm.tools.engine_proc import engine_env
    from medusa_vllm.tools.eval.data import load_test_split
    from medusa_vllm.tools.eval.report import (
        markdown_table,
        plot_quality_vs_rtf,
        write_json,
        write_translations,
    )
    from medusa_vllm.training.corpora.common import MissingCorpus

    # SIGTERM unwinds like Ctrl-C, so the engine subprocesses are killed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for name in ("batch_size", "max_tokens", "num_verses"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, found {value}")
    n = args.num_verses or (QUICK_VERSES if args.quick else None)
    if args.batch_size is None:
        args.batch_size = QUICK_BATCH_SIZE if args.quick else 1
    max_tokens = args.max_tokens or (QUICK_MAX_TOKENS if args.quick else MAX_TOKENS)
    try:
        verses = load_test_split(n)
    except MissingCorpus as exc:
        print(f"medusa-vllm eval translation: error: {exc}", file=sys.stderr)
        return 2
    if args.model is None or args.heads is None:
        from medusa_vllm.tools.default_model import default_model_info

        info = default_model_info()
        args.model = args.model or info["model"]
        # seed 003's rows are Medusa rows (k heads, beam paths over independent heads):
        # the shipped plain Medusa heads, not the default Hydra heads
        args.heads = args.heads or info["medusa_heads"]
    num_heads = read_heads_info(args.heads).num_heads
    engines, rows = build_plan(_plan_options(args, args.heads, num_heads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
           "max_tokens": max_tokens, "seed": args.seed, "kv_cache_gib": args.kv_cache_gib,
           "timeout": args.timeout or (1800.0 if args.quick else 12 * 3600.0),
           "in_process": bool(args.quick if args.in_process is None else args.in_process)}
    bind = engine_env().get("VLLM_CPU_OMP_THREADS_BIND", "auto (vLLM's default)")
    header: dict[str, Any] = {
        "command": "medusa-vllm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info().describe(), "threads_bind": bind, "dtype": cfg["dtype"],
        "model": args.model, "heads": f"{args.heads} ({num_heads} heads)",
        "verses": f"{len(verses)} (RV1909 -> WEB, held-out chapters, fixed order)",
        "batch_size": args.batch_size, "max_tokens": max_tokens,
        "engine_processes": ("in-process (uni executor, no V1 multiprocessing)" if cfg["in_process"]
                             else "vLLM's own engine processes"),
        "prompt": PROMPT_TEMPLATE.replace("\n", "\\n") + " (one user turn, the model's chat template)",
        "rtf": RTF_DEFINITION,
    }
    print(f"[eval translation] {header['verses']}; {len(rows)} rows on {len(engines)} engines; "
          f"{header['machine']}, {cfg['dtype']}, threads {bind}", flush=True)
    t0 = time.perf_counter()
    status = 0

    def write(scored: list[dict], outputs: Mapping[str, Sequence[str]], final: bool) -> str:
        head = {**header, "total_wall_s": round(time.perf_counter() - t0, 1)}
        if not final:
            head["partial"] = f"{len(scored)} of {len(rows)} rows so far"
        table = markdown_table(scored, head)
        (out / "table.md").write_text(table)
        write_json(out / "results.json", head, scored)
        write_translations(out / "translations.jsonl", [v.to_dict() for v in verses], outputs)
        return table

    try:
        scored, outputs = run_translation_eval(verses, engines, rows, cfg, log_dir=out,
                                               on_engine=lambda s, o: write(s, o, final=False))
    except LosslessnessError as exc:
        print(f"medusa-vllm eval translation: LOSSLESSNESS FAILURE: {exc}", file=sys.stderr)
        scored, outputs, status = getattr(exc, "rows", []), getattr(exc, "outputs", {}), 1
        header["failure"] = str(exc).splitlines()[0]
    table = write(scored, outputs, final=True)
    png = plot_quality_vs_rtf(out / "bleu_vs_rtf.png", scored)
    print("\n" + table)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'translations.jsonl'}"
          + (f", {png}" if png else ""))
    return status


if __name__ == "__main__":
    parser = add_translation_args(argparse.ArgumentParser(description=__doc__))
    sys.exit(translation_main(parser.parse_args()))
