"""Medusa training objectives and schedules (pure tensor functions).

Conventions: ``labels`` is ``LongTensor [B, T]`` aligned with ``input_ids``
(``labels[b, t] = input_ids[b, t]`` where the token is trained on, else
:data:`IGNORE_INDEX`). The backbone's logits at ``t`` predict ``labels[t + 1]``;
Medusa head ``k`` (0-based) at ``t`` predicts ``labels[t + k + 2]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "TeacherLogits",
    "full_to_draft_map",
    "head_targets",
    "head_weights",
    "kl_from_logits",
    "lambda0_at",
    "lr_factor",
    "next_token_targets",
]

IGNORE_INDEX = -100


def head_weights(num_heads: int, decay: float = 0.8) -> list[float]:
    """``lambda_k = decay ** k`` for ``k = 0 .. num_heads - 1``."""
    return [decay**k for k in range(num_heads)]


def _shift(labels: torch.Tensor, offset: int) -> torch.Tensor:
    """``out[:, t] = labels[:, t + offset]``, :data:`IGNORE_INDEX` past the end."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq_len], found shape {list(labels.shape)}")
    out = torch.full_like(labels, IGNORE_INDEX)
    if offset < labels.shape[1]:
        out[:, : labels.shape[1] - offset] = labels[:, offset:]
    return out


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets of the backbone's logits: ``labels[:, t + 1]``."""
    return _shift(labels, 1)


def head_targets(labels: torch.Tensor, head: int) -> torch.Tensor:
    """Targets of Medusa head ``head`` at every position: ``labels[:, t + head + 2]``."""
    if head < 0:
        raise ValueError(f"head must be >= 0, found {head}")
    return _shift(labels, head + 2)


def full_to_draft_map(token_map: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """Inverse of a draft ``token_map``: ``LongTensor [vocab_size]`` with the
    draft id of each full id, :data:`IGNORE_INDEX` for ids outside the draft
    vocabulary (so they are ignored by the loss). ``None`` for the full vocabulary."""
    if token_map is None:
        return None
    inv = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long, device=token_map.device)
    inv[token_map.long()] = torch.arange(token_map.numel(), device=token_map.device)
    return inv


def to_draft_targets(targets: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """Full-vocabulary targets -> draft ids (:data:`IGNORE_INDEX` stays, ids
    outside the draft vocabulary become :data:`IGNORE_INDEX`)."""
    if inverse is None:
        return targets
    valid = targets != IGNORE_INDEX
    out = torch.full_like(targets, IGNORE_INDEX)
    out[valid] = inverse[targets[valid]]
    return out


@dataclass
class TeacherLogits:
    """A teacher's next-token logits, full or top-k.

    Either ``logits`` ``[..., V]`` (full distribution) or ``values`` and
    ``ids`` ``[..., k]`` (its ``k`` largest logits and their token ids; the
    distribution is renormalised over those ``k`` tokens).
    ``draft``: full ``logits`` already restricted to a student's draft
    vocabulary (columns in ``token_map`` order), e.g. computed with only those
    rows of the lm_head.
    """

    logits: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    draft: bool = False

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int | None = None) -> "TeacherLogits":
        """Keep all logits, or only the ``top_k`` largest (``top_k < V``)."""
        logits = logits.detach()
        if top_k is None or top_k >= logits.shape[-1]:
            return cls(logits=logits)
        values, ids = torch.topk(logits, top_k, dim=-1)
        return cls(values=values, ids=ids)

    def select(self, index: tuple[torch.Tensor, ...] | torch.Tensor) -> "TeacherLogits":
        """Rows ``self[index]`` of every tensor (e.g. a boolean position mask)."""
        if self.logits is not None:
            return TeacherLogits(logits=self.logits[index], draft=self.draft)
        assert self.values is not None and self.ids is not None
        return TeacherLogits(values=self.values[index], ids=self.ids[index])

    def shifted(self, offset: int) -> "TeacherLogits":
        """Along dim 1 (sequence): ``out[:, t] = self[:, t + offset]`` (the tail is
        filled with the last row; callers mask those positions)."""
        def sh(x: torch.Tensor) -> torch.Tensor:
            if offset == 0:
                return x
            idx = torch.arange(x.shape[1], device=x.device) + offset
            return x[:, idx.clamp(max=x.shape[1] - 1)]

        if self.logits is not None:
            return TeacherLogits(logits=sh(self.logits), draft=self.draft)
        assert self.values is not None and self.ids is not None
        return TeacherLogits(values=sh(self.values), ids=sh(self.ids))


def kl_from_logits(
    student_logits: torch.Tensor,
    teacher: TeacherLogits,
    token_map: torch.Tensor | None = None,
    inverse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over rows of ``KL(teacher || student)``.

    Args:
        student_logits: ``[N, V_s]`` (``V_s`` = draft vocabulary if ``token_map``).
        teacher: ``N`` rows of full-vocabulary teacher logits (full or top-k).
        token_map: ``[V_s]`` draft id -> full id when the student scores a reduced
            vocabulary: the teacher is restricted to those tokens and renormalised.
        inverse: :func:`full_to_draft_map` of ``token_map`` (needed for top-k
            teachers with a reduced vocabulary).

    Returns:
        A scalar (0 for ``N == 0``). Rows whose teacher support lies entirely
        outside the draft vocabulary contribute 0.
    """
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    logp_s = F.log_softmax(student_logits.float(), dim=-1)
    if teacher.logits is not None:
        t = teacher.logits.float()
        if token_map is not None and not teacher.draft:
            t = t.index_select(-1, token_map.to(t.device))
        if t.shape != logp_s.shape:
            raise ValueError(
                f"teacher logits {list(t.shape)} do not match student logits "
                f"{list(logp_s.shape)}"
            )
        logp_t = F.log_softmax(t, dim=-1)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()
    assert teacher.values is not None and teacher.ids is not None
    ids = teacher.ids
    values = teacher.values.float()
    if token_map is not None:
        if inverse is None:
            raise ValueError("a top-k teacher with a reduced vocabulary needs `inverse`")
        ids = inverse[ids]
        values = values.masked_fill(ids < 0, -math.inf)
    keep = torch.isfinite(values).any(-1)  # rows with some teacher mass
    values = torch.where(keep.unsqueeze(-1), values, torch.zeros_like(values))  # no NaN grads
    logp_t = F.log_softmax(values, dim=-1)
    p_t = logp_t.exp()
    logp_s_at = logp_s.gather(-1, ids.clamp(min=0))
    terms = torch.where(p_t > 0, p_t * (logp_t - logp_s_at), torch.zeros_like(p_t))
    per_row = terms.sum(-1) * keep
    return per_row.sum() / n


def lambda0_at(step: int, lambda0: float, warmup_steps: int, schedule: str, start: int = 0) -> float:
    """Weight of the heads loss in Medusa-2 at optimizer step ``step``.

    Ramps from 0 (at ``start``) to ``lambda0`` over ``warmup_steps`` steps with
    ``schedule`` ``"sine"`` (``lambda0 * sin(pi/2 * p)``), ``"linear"``
    (``lambda0 * p``) or ``"constant"`` (``lambda0`` throughout), ``p`` =
    ``(step - start) / warmup_steps`` clipped to [0, 1].
    """
    if schedule == "constant" or warmup_steps <= 0:
        return float(lambda0)
    p = min(max((step - start) / warmup_steps, 0.0), 1.0)
    if schedule == "sine":
        return float(lambda0 * math.sin(math.pi / 2 * p))
    if schedule == "linear":
        return float(lambda0 * p)
    raise ValueError(f"lambda0 schedule must be 'sine', 'linear' or 'constant', found {schedule!r}")


def lr_factor(step: int, max_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the base learning rates at ``step``: linear warmup over
    ``warmup_steps``, then ``"cosine"`` or ``"linear"`` decay to 0 at
    ``max_steps``, or ``"constant"``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    p = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if scheduler == "linear":
        return 1.0 - p
    raise ValueError(f"lr scheduler must be 'cosine', 'linear' or 'constant', found {scheduler!r}")
