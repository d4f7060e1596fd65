"""Scores of one row: BLEU, ROUGE-1/2/L, real-time factor, speed; the losslessness check.

* BLEU: sacrebleu's corpus BLEU (default 13a tokenisation, one reference per
  verse), on sacrebleu's 0-100 scale.
* ROUGE-1/2/L: rouge-score's F1 per verse (Porter stemming on), averaged over the
  verses (rouge-score has no corpus-level form); 0-1 scale.
* Real-time factor (RTF): the row's decoding wall time divided by vanilla greedy's
  wall time on the same verses in the same run (lower is faster; vanilla greedy is
  1.0 by definition). Wall time is the timed ``generate`` / ``beam_search`` call
  only: engine start-up and the untimed warm-up are excluded.
* Losslessness: greedy Medusa rows must emit vanilla greedy's tokens, verse for
  verse; :func:`check_lossless` raises :class:`LosslessnessError` naming the first
  verse that differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "LosslessnessError",
    "QualityScores",
    "check_lossless",
    "corpus_bleu",
    "first_mismatch",
    "quality_scores",
    "real_time_factor",
    "rouge_f1",
    "tokens_per_second",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class QualityScores:
    bleu: float  # sacrebleu corpus BLEU, 0-100
    rouge1: float  # mean per-verse F1, 0-1
    rouge2: float
    rougeL: float

    def to_dict(self) -> dict[str, float]:
        return {"bleu": self.bleu, "rouge1": self.rouge1, "rouge2": self.rouge2, "rougeL": self.rougeL}


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not references:
        raise ValueError("no verses to score")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of ``hypotheses`` against one reference each."""
    import sacrebleu

    _check_lengths(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def rouge_f1(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-verse ROUGE-1/2/L F1 (rouge-score, stemming on)."""
    from rouge_score import rouge_scorer

    _check_lengths(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for t in ROUGE_TYPES:
            sums[t] += scores[t].fmeasure
    return {t: s / len(references) for t, s in sums.items()}


def quality_scores(hypotheses: Sequence[str], references: Sequence[str]) -> QualityScores:
    """BLEU and ROUGE-1/2/L of one row."""
    r = rouge_f1(hypotheses, references)
    return QualityScores(corpus_bleu(hypotheses, references), r["rouge1"], r["rouge2"], r["rougeL"])


def real_time_factor(wall_s: float, vanilla_wall_s: float) -> float:
    """Decoding wall time of a row over vanilla greedy's on the same verses (see module doc)."""
    if not vanilla_wall_s > 0:
        raise ValueError(f"vanilla greedy wall time: expected > 0 s, found {vanilla_wall_s!r}")
    if wall_s < 0:
        raise ValueError(f"wall time: expected >= 0 s, found {wall_s!r}")
    return wall_s / vanilla_wall_s


def tokens_per_second(output_tokens: int, wall_s: float) -> float:
    """Generated tokens per second of decoding wall time."""
    if not wall_s > 0:
        raise ValueError(f"wall time: expected > 0 s, found {wall_s!r}")
    return output_tokens / wall_s


class LosslessnessError(AssertionError):
    """A greedy Medusa row's output differs from vanilla greedy's (a correctness bug)."""


def first_mismatch(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]
                   ) -> tuple[int, int] | None:
    """``(verse index, first differing token position)`` of the first verse whose
    tokens differ, or ``None`` when every verse is identical."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs to compare with {len(reference)}")
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if list(a) != list(b):
            pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return i, pos
    return None


def check_lossless(row_name: str, keys: Sequence[str], reference: Sequence[Sequence[int]],
                   candidate: Sequence[Sequence[int]], reference_texts: Sequence[str] = (),
                   candidate_texts: Sequence[str] = ()) -> None:
    """Raise :class:`LosslessnessError` naming the first verse (its key, token
    position and both texts) where ``candidate`` differs from vanilla greedy's ``reference``."""
    hit = first_mismatch(reference, candidate)
    if hit is None:
        return
    i, pos = hit
    msg = (f"{row_name}: greedy output differs from vanilla greedy at verse {i} ({keys[i]}), "
           f"token {pos}: vanilla {list(reference[i])[pos:pos + 8]} vs {list(candidate[i])[pos:pos + 8]}")
    if reference_texts and candidate_texts:
        msg += f"\n  vanilla: {reference_texts[i]!r}\n  {row_name}: {candidate_texts[i]!r}"
    raise LosslessnessError(msg)
