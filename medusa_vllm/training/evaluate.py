"""Per-head top-k accuracy of Medusa heads on held-out data.

Head ``k`` at position ``t`` is scored against the token at ``t + k + 2`` for
every position whose target is a trained-on token (``labels != IGNORE_INDEX``).
A target outside a reduced draft vocabulary counts as a miss (the head cannot
propose it). ``accuracies.json`` holds the cumulative table
``acc[k][j] = P(target in head k's top-(j+1))``; :attr:`HeadAccuracy.per_rank`
is ``P(target is head k's rank-j candidate)``, the input of
:func:`medusa_vllm.core.tree_fit.tree_from_accuracies`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medusa_vllm.core.hydra import HydraHeads, teacher_forced_paths
from medusa_vllm.training.losses import (
    IGNORE_INDEX,
    head_targets,
    next_token_targets,
    to_draft_targets,
)

__all__ = ["HeadAccuracy", "evaluate_heads", "head_logits", "target_ranks", "topk_hits"]


def head_logits(heads: nn.Module, k: int, hidden: torch.Tensor,
                path: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of head ``k`` alone on ``hidden [..., H]`` -> ``[..., draft_vocab]``
    (the same numbers as ``heads(hidden)[k]`` without computing the other heads).
    Hydra heads also read ``path [..., k + 1]``, the tokens on the head's path
    (teacher forcing: :func:`~medusa_vllm.core.hydra.teacher_forced_paths`)."""
    if isinstance(heads, HydraHeads):
        if path is None:
            raise ValueError(f"Hydra head {k} reads the {k + 1} token(s) on its path: pass path")
        return heads.head_logits(k, hidden, path)
    x = hidden.to(heads.dtype)
    return heads.lm_layers[k](heads.blocks[k](x))


def target_ranks(logits: torch.Tensor, targets: torch.Tensor, topk: int = 10) -> torch.Tensor:
    """Rank of each target among its row's ``topk`` highest logits.

    Args:
        logits: ``[N, V]`` scores.
        targets: ``[N]`` correct ids in ``[0, V)``; any other value (e.g. a
            token outside the draft vocabulary) is never found.
        topk: number of ranks.

    Returns:
        ``LongTensor [N]``: 0 for the best candidate, ..., ``-1`` when the
        target is not among the ``topk`` best.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, V] and targets [N], found {list(logits.shape)} and "
            f"{list(targets.shape)}"
        )
    n, v = logits.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    ranked = torch.topk(logits, min(topk, v), dim=-1).indices  # [N, k]
    match = ranked == targets.to(ranked.device).unsqueeze(-1)
    found = match.any(-1)
    return torch.where(found, match.long().argmax(-1), torch.full_like(found, -1, dtype=torch.long)).cpu()


def _hits(ranks: torch.Tensor, topk: int) -> torch.Tensor:
    """Cumulative hit counts ``[topk]`` of :func:`target_ranks` output."""
    found = ranks[ranks >= 0]
    return torch.bincount(found, minlength=topk)[:topk].cumsum(0)


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, topk: int = 10) -> torch.Tensor:
    """Cumulative top-k hit counts.

    Args:
        logits: ``[N, V]`` scores.
        targets: ``[N]`` correct ids in ``[0, V)``; any other value (e.g. a
            token outside the draft vocabulary) is a miss.
        topk: number of ranks.

    Returns:
        ``LongTensor [topk]``: entry ``j`` = rows whose target is among the
        ``j + 1`` highest logits (ranks beyond ``V`` repeat the last count).
    """
    return _hits(target_ranks(logits, targets, topk), topk)


@dataclass
class HeadAccuracy:
    """Accumulated hits of every head (and, optionally, the backbone).

    Fields:
        hits: ``LongTensor [num_heads, topk]`` cumulative hit counts.
        totals: ``LongTensor [num_heads]`` scored positions per head.
        lm_hits, lm_total: the same for the backbone's next-token prediction.
        ranks: with ``collect_ranks``, one ``LongTensor [n, num_heads]`` per row:
            at each of the row's ``n`` step-start positions (those whose next
            token is scored), in order, the rank of each head's correct token
            among its ``topk`` candidates, ``-1`` if absent (the input of
            :mod:`medusa_vllm.core.tree_stats`).
    """

    hits: torch.Tensor
    totals: torch.Tensor
    lm_hits: torch.Tensor | None = None
    lm_total: int = 0
    ranks: list[torch.Tensor] | None = None

    @property
    def cumulative(self) -> torch.Tensor:
        """``[num_heads, topk]`` float: P(target within top-(j+1))."""
        return self.hits.double() / self.totals.clamp(min=1).double().unsqueeze(-1)

    @property
    def per_rank(self) -> torch.Tensor:
        """``[num_heads, topk]`` float: P(target is the rank-j candidate)."""
        c = self.cumulative
        return torch.cat([c[:, :1], c[:, 1:] - c[:, :-1]], dim=1)

    def to_dict(self) -> dict:
        out = {
            "topk_cumulative": self.cumulative.tolist(),
            "per_rank": self.per_rank.tolist(),
            "positions": self.totals.tolist(),
        }
        if self.lm_hits is not None:
            out["backbone_topk_cumulative"] = (self.lm_hits.double() / max(1, self.lm_total)).tolist()
            out["backbone_positions"] = self.lm_total
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``accuracies.json`` (the cumulative ``[num_heads][topk]`` list)
        and ``eval.json`` (all fields) in ``directory``; return the former."""
        d = Path(directory)
        (d / "eval.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        path = d / "accuracies.json"
        path.write_text(json.dumps(self.cumulative.tolist()) + "\n")
        return path

    def table(self) -> str:
        """A printable table: one row per head, top-1..top-k columns."""
        c = self.cumulative
        k = c.shape[1]
        lines = ["head  positions  " + " ".join(f"top{j + 1:<3d}" for j in range(k))]
        for h in range(c.shape[0]):
            row = " ".join(f"{float(x):6.3f}" for x in c[h])
            lines.append(f"{h:>4d}  {int(self.totals[h]):>9d}  {row}")
        if self.lm_hits is not None:
            row = " ".join(f"{float(x) / max(1, self.lm_total):6.3f}" for x in self.lm_hits)
            lines.append(f"  lm  {self.lm_total:>9d}  {row}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_heads(
    heads: nn.Module,
    batches: Iterable,
    hidden_fn: Callable[[object], torch.Tensor],
    *,
    topk: int = 10,
    lm_head: nn.Module | None = None,
    collect_ranks: bool = False,
) -> HeadAccuracy:
    """Top-1..top-``topk`` accuracy of every head over ``batches``.

    Args:
        heads: a :class:`~medusa_vllm.core.heads.MedusaHeads` or
            :class:`~medusa_vllm.core.hydra.HydraHeads` (teacher-forced on the
            batch's ``input_ids``).
        batches: :class:`~medusa_vllm.training.data.Batch` objects (``labels``
            ``[B, T]`` with :data:`IGNORE_INDEX` on positions not scored).
        hidden_fn: batch -> backbone last hidden states ``[B, T, H]``.
        lm_head: also score the backbone's next-token prediction with it.
        collect_ranks: also return every row's target ranks (:attr:`HeadAccuracy.ranks`).
    """
    num_heads = heads.config.num_heads
    token_map = getattr(heads, "token_map", None)
    inverse = None
    if token_map is not None:
        from medusa_vllm.training.losses import full_to_draft_map

        inverse = full_to_draft_map(token_map, heads.config.vocab_size)
    hits = torch.zeros(num_heads, topk, dtype=torch.long)
    totals = torch.zeros(num_heads, dtype=torch.long)
    lm_hits = torch.zeros(topk, dtype=torch.long) if lm_head is not None else None
    lm_total = 0
    rows: list[torch.Tensor] | None = [] if collect_ranks else None
    was_training = heads.training
    heads.eval()
    try:
        for batch in batches:
            hidden = hidden_fn(batch)
            labels = batch.labels.to(hidden.device)
            start = next_token_targets(labels) != IGNORE_INDEX  # step-start positions
            ranks = torch.full((*labels.shape, num_heads), -1, dtype=torch.long) if collect_ranks else None
            for k in range(num_heads):
                targets = head_targets(labels, k)
                valid = targets != IGNORE_INDEX
                pos = valid | start if collect_ranks else valid
                if not pos.any():
                    continue
                draft = to_draft_targets(targets, inverse)[pos]
                path = (teacher_forced_paths(batch.input_ids.to(hidden.device), k)[pos]
                        if isinstance(heads, HydraHeads) else None)
                r = target_ranks(head_logits(heads, k, hidden[pos], path), draft, topk)
                hits[k] += _hits(r[valid[pos].cpu()], topk)
                totals[k] += int(valid.sum())
                if ranks is not None:
                    ranks[..., k][pos.cpu()] = r
            if rows is not None and ranks is not None:
                st = start.cpu()
                rows.extend(ranks[b][st[b]] for b in range(labels.shape[0]))
            if lm_head is not None:
                targets = next_token_targets(labels)
                valid = targets != IGNORE_INDEX
                if valid.any():
                    logits = lm_head(hidden[valid].to(lm_head.weight.dtype))
                    lm_hits += topk_hits(logits, targets[valid], topk)
                    lm_total += int(valid.sum())
    finally:
        heads.train(was_training)
    return HeadAccuracy(hits, totals, lm_hits, lm_total, rows)
