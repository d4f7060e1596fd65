"""Speculative-decoding figures from vLLM's own metrics.

vLLM's scheduler already counts, per step and request, the drafted tokens and
the accepted ones, and ``accepted_tokens_per_pos[i]`` for ``i < accepted``.
With a Medusa tree the accepted tokens always form a root->leaf path, so
position ``i`` is tree depth ``i+1``: the per-position counts are per-depth
acceptance. ``num_draft_tokens`` counts tree *nodes*, so vLLM's "draft
acceptance rate" (accepted / drafted) is low by design for trees: the figure
that matters is the mean accepted length (tokens emitted per step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecDecodeSummary:
    num_drafts: int = 0  # verification steps that carried drafts
    num_draft_tokens: int = 0  # drafted tree nodes
    num_accepted_tokens: int = 0  # accepted draft tokens
    accepted_per_depth: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per drafted step: 1 (bonus) + accepted drafts."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Fraction of drafted steps whose accepted path reached depth d+1."""
        return [a / self.num_drafts for a in self.accepted_per_depth] if self.num_drafts else []

    @property
    def tree_size(self) -> float:
        """Mean drafted nodes per step."""
        return self.num_draft_tokens / self.num_drafts if self.num_drafts else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            mean_accepted_length=self.mean_accepted_length,
            acceptance_per_depth=self.acceptance_per_depth,
            tree_size=self.tree_size,
        )
        return d

    def __sub__(self, other: SpecDecodeSummary) -> SpecDecodeSummary:
        n = max(len(self.accepted_per_depth), len(other.accepted_per_depth))
        a = self.accepted_per_depth + [0] * (n - len(self.accepted_per_depth))
        b = other.accepted_per_depth + [0] * (n - len(other.accepted_per_depth))
        return SpecDecodeSummary(
            self.num_drafts - other.num_drafts,
            self.num_draft_tokens - other.num_draft_tokens,
            self.num_accepted_tokens - other.num_accepted_tokens,
            [x - y for x, y in zip(a, b)],
        )


def counter_total(metrics, name: str) -> int:
    """Sum of a vLLM counter over its label sets in ``LLM.get_metrics()``
    (e.g. ``"vllm:num_preemptions"``)."""
    return sum(int(m.value) for m in metrics if getattr(m, "name", "") == name)


def spec_decode_summary(metrics) -> SpecDecodeSummary:
    """Summarise ``LLM.get_metrics()`` (vLLM's metric snapshot)."""
    s = SpecDecodeSummary()
    for m in metrics:
        name = getattr(m, "name", "")
        if name == "vllm:spec_decode_num_drafts":
            s.num_drafts += int(m.value)
        elif name == "vllm:spec_decode_num_draft_tokens":
            s.num_draft_tokens += int(m.value)
        elif name == "vllm:spec_decode_num_accepted_tokens":
            s.num_accepted_tokens += int(m.value)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            if len(vals) > len(s.accepted_per_depth):
                s.accepted_per_depth += [0] * (len(vals) - len(s.accepted_per_depth))
            for i, v in enumerate(vals):
                s.accepted_per_depth[i] += v
    return s
