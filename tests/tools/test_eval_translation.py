"""`medusa-vllm eval translation`: scores, RTF, the test split, the plan, the losslessness check
(fake engine), and one smoke run on the tiny model (slow)."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest

from medusa_vllm.tools.eval import translation
from medusa_vllm.tools.eval.data import EvalVerse, clean_hypothesis, ordered_verses
from medusa_vllm.tools.eval.metrics import (
    LosslessnessError,
    check_lossless,
    corpus_bleu,
    first_mismatch,
    quality_scores,
    real_time_factor,
    rouge_f1,
    tokens_per_second,
)
from medusa_vllm.tools.eval.report import markdown_table
from medusa_vllm.tools.eval.rows import EngineSpec, PlanOptions, RowSpec, build_plan

REF = "the cat sat on a mat"
HYP = "the cat sat on the mat"


# ------------------------------------------------------------------ BLEU / ROUGE
def test_identical_strings_score_perfectly():
    refs = ["In the beginning, God created the heavens and the earth.", "God said, let there be light."]
    q = quality_scores(refs, refs)
    assert q.bleu == pytest.approx(100.0)
    assert (q.rouge1, q.rouge2, q.rougeL) == (pytest.approx(1.0),) * 3


def test_bleu_hand_computed():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths: brevity penalty 1
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu([HYP], [REF]) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(53.728, abs=1e-3)


def test_bleu_is_corpus_level_not_a_mean():
    # corpus BLEU pools n-gram counts: not the mean of the two sentence scores
    pooled = corpus_bleu([HYP, REF], [REF, REF])
    mean = (corpus_bleu([HYP], [REF]) + 100.0) / 2
    assert pooled != pytest.approx(mean, abs=0.1)
    assert corpus_bleu([HYP], [REF]) < pooled < 100


def test_rouge_hand_computed_and_averaged_over_verses():
    r = rouge_f1([HYP], [REF])
    assert r["rouge1"] == pytest.approx(5 / 6)  # 5 of 6 unigrams (the "the" counted once)
    assert r["rouge2"] == pytest.approx(3 / 5)  # the cat, cat sat, sat on
    assert r["rougeL"] == pytest.approx(5 / 6)  # LCS: the cat sat on mat
    two = rouge_f1([HYP, REF], [REF, REF])
    assert two["rouge2"] == pytest.approx((3 / 5 + 1) / 2)


def test_scores_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_bleu([HYP, HYP], [REF])
    with pytest.raises(ValueError, match="no verses"):
        rouge_f1([], [])


def test_clean_hypothesis_collapses_whitespace_only():
    assert clean_hypothesis("  In the\n\nbeginning,\tGod. ") == "In the beginning, God."


# ------------------------------------------------------------------------ RTF
def test_real_time_factor_arithmetic():
    assert real_time_factor(3.0, 6.0) == pytest.approx(0.5)
    assert real_time_factor(9.0, 6.0) == pytest.approx(1.5)
    assert tokens_per_second(120, 4.0) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="vanilla greedy wall time"):
        real_time_factor(1.0, 0.0)
    with pytest.raises(ValueError, match="wall time"):
        tokens_per_second(10, 0.0)


def test_score_row_uses_vanilla_wall_time_and_tokens():
    row = RowSpec("Medusa greedy, 2 heads", "medusa", "chain-2", lossless=True)
    result = {"texts": [REF, HYP], "token_ids": [[1, 2, 3], [4, 5]], "wall_s": 2.5,
              "finish_reasons": ["stop", "length"], "spec": {"mean_accepted_length": 1.8}}
    s = translation.score_row(row, result, [REF, REF], vanilla_wall_s=5.0)
    assert s["rtf"] == pytest.approx(0.5)
    assert s["tokens_per_s"] == pytest.approx(5 / 2.5)
    assert s["output_tokens"] == 5 and s["finished"] == 1
    assert s["mean_accepted_length"] == pytest.approx(1.8)
    assert s["bleu"] == pytest.approx(corpus_bleu([REF, HYP], [REF, REF]))
    missing = translation.score_row(row, None, [REF], None, "the engine does not accept tree 'beam:2:2'")
    assert missing["available"] is False and "beam:2:2" in missing["reason"]


# ------------------------------------------------------------------ the split
def _pairs(n=40):
    return [{"key": f"Book {c}:{v}", "book": "Book", "chapter": c, "verse": v, "es": f"es {c} {v}",
             "en": f"en {c} {v}"} for c in range(1, 5) for v in range(1, n // 4 + 1)]


def test_order_is_a_pure_function_of_the_keys():
    pairs = _pairs()
    shuffled = list(pairs)
    random.Random(3).shuffle(shuffled)
    a, b = ordered_verses(pairs), ordered_verses(shuffled)
    assert [v.key for v in a] == [v.key for v in b]
    assert [v.key for v in a] != [p["key"] for p in pairs]  # not the book order
    assert [v.key for v in ordered_verses(pairs, 5)] == [v.key for v in a[:5]]
    with pytest.raises(ValueError, match="holds 40"):
        ordered_verses(pairs, 41)


def _corpus_or_skip():
    from medusa_vllm.tools.eval.data import load_test_split
    from medusa_vllm.training.corpora.common import MissingCorpus

    try:
        return load_test_split()
    except MissingCorpus as exc:
        pytest.skip(f"Sword corpora not installed: {exc}")


def test_split_is_deterministic_heldout_and_disjoint_from_training_prompts():
    from medusa_vllm.training.corpora.bible import chapter_group
    from medusa_vllm.training.corpora.common import normalize_text, split_of, split_passages
    from medusa_vllm.training.corpora.sources import load_source_passages

    verses = _corpus_or_skip()
    assert len(verses) > 1000
    from medusa_vllm.tools.eval.data import load_test_split

    assert [v.key for v in load_test_split(50)] == [v.key for v in verses[:50]]
    assert all(split_of(chapter_group(v.book, v.chapter)) == "heldout" for v in verses)
    test_groups = {chapter_group(v.book, v.chapter) for v in verses}
    test_es = {normalize_text(v.es) for v in verses}
    # the passages training prompts are built from (training.prompts.build_prompt_records)
    for source in ("bible-translation", "bible"):
        train, _ = split_passages(load_source_passages(source))
        assert train, source
        assert not test_groups & {p.group for p in train}, source
        assert not test_es & {normalize_text(p.text) for p in train}, source
    english_train = [p.text for p in split_passages(load_source_passages("bible"))[0]]
    sample = verses[:40]
    assert not any(v.en in text for v in sample for text in english_train)


# ------------------------------------------------------------------- the plan
def test_plan_rows_and_engines(heads):
    engines, rows = build_plan(PlanOptions(heads=heads, num_heads=3))
    assert engines[0].key == "vanilla" and rows[0].name == "Vanilla greedy"
    keys = [e.key for e in engines]
    assert keys[:4] == ["vanilla", "chain-1", "chain-2", "chain-3"] and "auto" in keys
    medusa = [r for r in rows if r.group == "medusa"]
    assert [r.engine for r in medusa] == ["chain-1", "chain-2", "chain-3", "auto"]
    assert all(r.lossless for r in medusa + [r for r in rows if r.group == "beam_medusa"])
    typical = [r for r in rows if r.group == "typical"]
    assert len(typical) == 3 and not any(r.lossless for r in typical)
    assert all(r.engine == "auto" and r.sampling["extra_args"]["medusa_acceptance"] == "typical"
               and r.sampling["temperature"] == pytest.approx(0.7) for r in typical)
    beams = [r.name for r in rows if r.group == "beam_medusa"]
    assert beams == [f"Beam {w}, Medusa Heads {k}" for w in (2, 5, 10) for k in (2, 3)]
    vb = [r for r in rows if r.group == "vllm_beam"]
    assert [r.beam_width for r in vb] == [2, 5, 10] and all(r.kind == "beam_search" for r in vb)
    assert next(e for e in engines if e.key == "vllm-beam").max_num_seqs >= 256
    with pytest.raises(ValueError, match="Medusa heads 4"):
        build_plan(PlanOptions(heads=heads, num_heads=3, medusa_heads=[4]))


def test_unavailable_rows_say_why():
    rows = [{"name": "Beam 2, Medusa Heads 2", "available": False, "reason": "tree 'beam:2:2' refused"},
            {"name": "Vanilla greedy", "available": True, "bleu": 12.345, "rouge1": 0.5, "rouge2": 0.25,
             "rougeL": 0.4, "rtf": 1.0, "mean_accepted_length": 1.0, "tokens_per_s": 10.0}]
    md = markdown_table(rows, {"verses": 3})
    assert "| Beam 2, Medusa Heads 2 | n/a |" in md and "not available: tree 'beam:2:2' refused" in md
    assert "| Vanilla greedy | 12.35 | 0.500 | 0.250 | 0.400 | 1.00 |" in md
    assert md.startswith("- verses: 3")


# ---------------------------------------------------------- losslessness check
def test_first_mismatch_and_check_lossless():
    ref = [[1, 2, 3], [4, 5, 6], [7]]
    assert first_mismatch(ref, [list(x) for x in ref]) is None
    assert first_mismatch(ref, [[1, 2, 3], [4, 9, 6], [8]]) == (1, 1)
    assert first_mismatch(ref, [[1, 2, 3], [4, 5], [7]]) == (1, 2)  # a shorter output differs too
    check_lossless("Medusa", ["a", "b", "c"], ref, ref)
    with pytest.raises(LosslessnessError, match=r"verse 1 \(Judges 8:6\), token 1"):
        check_lossless("Medusa", ["Gen 1:1", "Judges 8:6", "x"], ref, [[1, 2, 3], [4, 9, 6], [7]])


def _verses(n=3):
    return [EvalVerse(f"Ruth 1:{i + 1}", "Ruth", 1, f"es {i}", REF) for i in range(n)]


def _fake_run(tamper: set[str] = frozenset(), walls: dict[str, float] | None = None):
    """A run_engine stand-in: every row answers HYP with tokens [1, 2, 3]; rows named in
    ``tamper`` change the last verse's last token."""
    jobs = []

    def run(job, **_):
        jobs.append(job)
        out = []
        for row in job.probe_args["rows"]:
            ids = [[1, 2, 3] for _ in job.probe_args["prompts"]]
            if row["name"] in tamper:
                ids[-1] = [1, 2, 4]
            out.append({"name": row["name"], "texts": [HYP] * len(ids), "token_ids": ids,
                        "finish_reasons": ["stop"] * len(ids),
                        "wall_s": (walls or {}).get(row["name"], 2.0), "spec": {"mean_accepted_length": 1.5}})
        return SimpleNamespace(probe=out)

    run.jobs = jobs
    return run


_CFG = {"model": "m", "dtype": "float32", "max_model_len": 512, "max_tokens": 16, "seed": 0}


def _plan(heads):
    return build_plan(PlanOptions(heads=heads, num_heads=3, medusa_heads=[1, 3], typical_settings=[(0.09, 0.3)],
                                  beam_widths=[2], beam_heads=[2], vllm_beam_widths=[2], sampling_rows=False))


def test_eval_runs_each_engine_once_and_scores_rtf(heads):
    engines, rows = _plan(heads)
    run = _fake_run(walls={"Vanilla greedy": 4.0, "Single Medusa head": 3.0})
    partial = []
    scored, outputs = translation.run_translation_eval(_verses(), engines, rows, _CFG, run=run, progress=False,
                                                       on_engine=lambda s, o: partial.append(len(s)))
    assert partial == sorted(partial) and partial[-1] == len(rows) and len(partial) == len(engines)
    assert [j.probe_args["rows"][0]["name"] for j in run.jobs][:2] == ["Vanilla greedy", "Single Medusa head"]
    runnable = [e for e in engines if e.unavailable is None]
    assert len(run.jobs) == len(runnable)
    auto = next(j for j in run.jobs if j.llm.get("speculative_config", {}).get("tree") == "auto")
    assert [r["group"] for r in auto.probe_args["rows"]] == ["medusa", "typical"]  # one engine, two rows
    by = {r["name"]: r for r in scored}
    assert by["Vanilla greedy"]["rtf"] == pytest.approx(1.0)
    assert by["Single Medusa head"]["rtf"] == pytest.approx(0.75)
    assert by["Medusa greedy, 3 heads"]["lossless"] is True
    assert math.isclose(by["Vanilla greedy"]["bleu"], corpus_bleu([HYP] * 3, [REF] * 3))
    assert outputs["Vanilla greedy"] == [HYP] * 3


def test_eval_fails_loudly_on_a_greedy_mismatch(heads):
    engines, rows = _plan(heads)
    run = _fake_run(tamper={"Medusa greedy, 3 heads"})
    with pytest.raises(LosslessnessError, match=r"Medusa greedy, 3 heads.*verse 2 \(Ruth 1:3\), token 2") as info:
        translation.run_translation_eval(_verses(), engines, rows, _CFG, run=run, progress=False)
    scored = {r["name"]: r for r in info.value.rows}
    assert scored["Medusa greedy, 3 heads"]["lossless"] is False
    assert scored["Single Medusa head"]["lossless"] is True


def test_sampled_rows_may_differ(heads):
    engines, rows = _plan(heads)
    typical = next(r.name for r in rows if r.group == "typical")
    scored, _ = translation.run_translation_eval(_verses(), engines, rows, _CFG, run=_fake_run({typical}),
                                                 progress=False)
    assert next(r for r in scored if r["name"] == typical)["lossless"] is None


def test_plan_without_vanilla_first_is_refused(heads):
    engines, rows = _plan(heads)
    with pytest.raises(ValueError, match="vanilla"):
        translation.run_translation_eval(_verses(), engines[1:], rows[1:], _CFG, run=_fake_run(), progress=False)


def test_unavailable_engine_is_not_started(heads):
    engines, rows = _plan(heads)
    engines = [EngineSpec(e.key, None, e.max_num_seqs, "refused by the engine") if e.key.startswith("beam") else e
               for e in engines]
    run = _fake_run()
    scored, _ = translation.run_translation_eval(_verses(), engines, rows, _CFG, run=run, progress=False)
    beam = next(r for r in scored if r["group"] == "beam_medusa")
    assert beam["available"] is False and beam["reason"] == "refused by the engine"
    assert not any(j.probe_args["rows"][0]["group"] == "beam_medusa" for j in run.jobs)


# ----------------------------------------------------------- smoke (real engine)
@pytest.mark.slow
def test_smoke_tiny_model(tiny, tmp_path, monkeypatch):
    """Three verses through every kind of row on the tiny random model: exit 0, the
    greedy Medusa rows lossless, vanilla's RTF 1, the table and JSON written."""
    import torch
    from transformers import AutoModelForCausalLM

    from medusa_vllm.checkpoints import save_heads
    from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig

    _corpus_or_skip()
    lm = AutoModelForCausalLM.from_pretrained(tiny).lm_head.weight.detach()
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=lm.shape[1], vocab_size=lm.shape[0], num_heads=2),
                        lm_head_weight=lm)
    save_heads(heads, tmp_path / "heads", overwrite=True)
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["medusa-vllm", "eval", "translation"])
    args = translation.add_translation_args(__import__("argparse").ArgumentParser()).parse_args([
        "--model", tiny, "--heads", str(tmp_path / "heads"), "--num-verses", "3", "--max-tokens", "12",
        "--medusa-heads", "1", "--typical", "0.09:0.3", "--beam-widths", "2", "--beam-heads", "2",
        "--vllm-beam-widths", "2", "--no-sampling-rows", "--kv-cache-gib", "1", "--timeout", "600",
        "--out", str(out)])
    assert translation.translation_main(args) == 0
    data = json.loads((out / "results.json").read_text())
    by = {r["name"]: r for r in data["rows"]}
    assert by["Vanilla greedy"]["rtf"] == pytest.approx(1.0)
    for name in ("Single Medusa head", "Medusa greedy, fitted tree"):
        assert by[name]["available"] and by[name]["lossless"] is True
    beam = by["Beam 2, Medusa Heads 2"]
    assert beam["lossless"] is True or not beam["available"]
    assert by["vLLM beam search W=2"]["available"] and by["vLLM beam search W=2"]["bleu"] >= 0
    assert "| Vanilla greedy |" in (out / "table.md").read_text()
    assert (out / "bleu_vs_rtf.png").stat().st_size > 0
    assert len((out / "translations.jsonl").read_text().splitlines()) == 3
