"""Medusa tree verification: which drafted nodes to accept, and the bonus token.

After the verification pass the target model has scored every tree node: row
``i`` of ``target_logits`` (``[B, N+1, V]``) is the target distribution of the
token that FOLLOWS node ``i``. Column ``i`` of ``draft_tokens`` (``[B, N+1]``)
is node ``i``'s drafted token (column 0 = the root, already committed and
never judged; ``-1`` = node absent for this request, never accepted). A node
``i`` is judged by its parent's row: ``target[parents[i]]`` at ``draft[i]``.

Three rules, mixed freely within a batch (:func:`tree_accept`):

- ``greedy``: accept the longest root->leaf path whose every token equals the
  target argmax at its parent; ties go to the first path in
  ``tree.retrieve_indices`` order; the bonus token is the target argmax at the
  last accepted node.
- ``typical`` (Medusa paper, section "typical acceptance"): with
  ``p = softmax(logits / T)``, node ``i`` passes when
  ``p_parent(x_i) > min(ε, δ·exp(-H(p_parent)))``; the longest passing path
  wins, equally long paths are ranked by the sum of ``log p`` of their accepted
  tokens (as FasterDecoding/Medusa's ``evaluate_posterior`` does), remaining
  ties go to the first path. ``H`` is the exact entropy (``0·log 0 = 0``), as
  the paper defines it; the reference computes ``-Σ p·log(p + 1e-5)``, which
  under-estimates ``H`` by up to ``V·1e-5`` nats on flat distributions over
  large vocabularies (so it is slightly stricter there). The
  bonus token is SAMPLED from ``p`` at the last accepted node (the reference's
  default "fast" mode takes the argmax instead, and its slow mode samples from
  a typicality-truncated ``p``; plain sampling keeps the bonus token on the
  request's own sampling distribution, which is what vLLM users expect).
- ``rejection``: lossless multi-candidate recursive rejection sampling
  (SpecInfer) over the tree, given the request's processed target
  PROBABILITIES. Medusa drafts are deterministic (top-k), so each sibling's
  draft distribution is a point mass: at a node with residual ``r``, children
  are tried in rank order, child token ``x`` is accepted with probability
  ``r(x) / Σr``; on rejection ``r(x) := 0``. An accepted child becomes the
  current node (fresh residual = its target row); when every present child is
  rejected (or there is none) the bonus token is sampled from the residual.
  The emitted tokens are distributed exactly as autoregressive sampling from
  the target, whatever the drafts are (duplicates, zero-probability tokens).

Any request with temperature 0 is verified greedily, whatever its rule.

Everything is vectorised over requests and tree nodes; the only Python loops
run over tree depth and sibling slot (and over requests that carry their own
seeded ``torch.Generator``, as vLLM's samplers do).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "AcceptanceParams",
    "AcceptanceResult",
    "AcceptanceRule",
    "DEFAULT_POSTERIOR_ALPHA",
    "DEFAULT_POSTERIOR_THRESHOLD",
    "greedy_accept",
    "greedy_accept_argmax",
    "rejection_accept",
    "tree_accept",
    "typical_accept",
]

# FasterDecoding/Medusa medusa_generate() defaults (δ ≈ √ε, as its authors recommend).
DEFAULT_POSTERIOR_THRESHOLD = 0.09  # ε: hard threshold on p_parent(x)
DEFAULT_POSTERIOR_ALPHA = 0.3  # δ: entropy-scaled threshold factor


class TreeLike(Protocol):
    """The part of :class:`medusa_vllm.core.tree.MedusaTree` this module reads."""

    num_nodes: int
    max_depth: int
    parents: torch.Tensor  # [N+1]
    children: torch.Tensor  # [N+1, C]
    retrieve_indices: torch.Tensor  # [num_leaves, D+1]


Generators = Mapping[int, torch.Generator]


class AcceptanceRule(enum.IntEnum):
    """Per-request verification rule (stored as these integer codes)."""

    GREEDY = 0
    TYPICAL = 1
    REJECTION = 2

    @classmethod
    def parse(cls, value: str | int | AcceptanceRule) -> AcceptanceRule:
        """``"greedy"``/``"typical"``/``"rejection"`` (any case), a code, or a rule."""
        if isinstance(value, AcceptanceRule):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(
            f"acceptance rule: expected one of {[r.name.lower() for r in cls]} "
            f"(or codes {[int(r) for r in cls]}), found {value!r}"
        )


@dataclass(frozen=True)
class AcceptanceParams:
    """Per-request verification parameters, one entry per batch row.

    Build with :meth:`make` (scalars broadcast, rule names parsed); the
    constructor validates shapes and ranges.
    """

    rule: torch.Tensor  # [B] long, AcceptanceRule codes
    temperature: torch.Tensor  # [B] float, >= 0; 0 => greedy
    posterior_threshold: torch.Tensor  # [B] float, ε in (0, 1) (typical)
    posterior_alpha: torch.Tensor  # [B] float, δ >= 0 (typical)

    def __post_init__(self) -> None:
        fields = {
            "rule": self.rule,
            "temperature": self.temperature,
            "posterior_threshold": self.posterior_threshold,
            "posterior_alpha": self.posterior_alpha,
        }
        for name, t in fields.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"AcceptanceParams.{name}: expected a 1-D tensor [batch], found {found}"
                )
        b = self.rule.shape[0]
        for name, t in fields.items():
            if t.shape[0] != b:
                raise ValueError(
                    f"AcceptanceParams.{name}: expected {b} entries (one per request, "
                    f"like rule), found {t.shape[0]}"
                )
            if t.device != self.rule.device:
                raise ValueError(
                    f"AcceptanceParams.{name}: expected device {self.rule.device} "
                    f"(like rule), found {t.device}"
                )
        if self.rule.dtype.is_floating_point or self.rule.dtype == torch.bool:
            raise ValueError(
                f"AcceptanceParams.rule: expected an integer tensor of AcceptanceRule "
                f"codes, found dtype {self.rule.dtype}"
            )
        for name in ("temperature", "posterior_threshold", "posterior_alpha"):
            if not fields[name].dtype.is_floating_point:
                raise ValueError(
                    f"AcceptanceParams.{name}: expected a floating tensor, found dtype "
                    f"{fields[name].dtype}"
                )
        if b == 0:
            return
        codes = [int(r) for r in AcceptanceRule]
        bad = ~torch.isin(self.rule, torch.tensor(codes, device=self.rule.device))
        if bool(bad.any()):
            raise ValueError(
                f"AcceptanceParams.rule: expected codes {codes} "
                f"({', '.join(r.name.lower() for r in AcceptanceRule)}), found "
                f"{self.rule[bad].unique().tolist()}"
            )
        _check_range("AcceptanceParams.temperature", self.temperature, ">= 0",
                     self.temperature >= 0)
        eps = self.posterior_threshold
        _check_range("AcceptanceParams.posterior_threshold", eps, "in (0, 1)",
                     (eps > 0) & (eps < 1))
        _check_range("AcceptanceParams.posterior_alpha", self.posterior_alpha, ">= 0",
                     self.posterior_alpha >= 0)

    @property
    def batch_size(self) -> int:
        return self.rule.shape[0]

    @classmethod
    def make(
        cls,
        rule: str | int | AcceptanceRule | Sequence[str | int | AcceptanceRule] | torch.Tensor,
        temperature: float | Sequence[float] | torch.Tensor = 1.0,
        posterior_threshold: float | Sequence[float] | torch.Tensor = DEFAULT_POSTERIOR_THRESHOLD,
        posterior_alpha: float | Sequence[float] | torch.Tensor = DEFAULT_POSTERIOR_ALPHA,
        *,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> AcceptanceParams:
        """Per-request params from scalars and/or per-request sequences.

        Scalars are broadcast to ``batch_size`` (inferred from the first
        sequence argument when omitted).
        """
        if isinstance(rule, torch.Tensor):
            if rule.dtype.is_floating_point or rule.dtype == torch.bool:
                raise ValueError(
                    f"AcceptanceParams.rule: expected AcceptanceRule codes (integers), "
                    f"found dtype {rule.dtype}"
                )
            rule_v: object = rule.reshape(-1).long()
        elif isinstance(rule, (str, int)):
            rule_v = int(AcceptanceRule.parse(rule))
        else:
            rule_v = [int(AcceptanceRule.parse(r)) for r in rule]
        values: dict[str, object] = {
            "rule": rule_v,
            "temperature": temperature,
            "posterior_threshold": posterior_threshold,
            "posterior_alpha": posterior_alpha,
        }

        def is_scalar(v: object) -> bool:
            return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.dim() == 0)

        if batch_size is None:
            sizes = [len(v) for v in values.values() if not is_scalar(v)]  # type: ignore[arg-type]
            batch_size = sizes[0] if sizes else 1
        out: dict[str, torch.Tensor] = {}
        for name, v in values.items():
            t = torch.as_tensor(v, device=device)
            if name == "rule":
                t = t.long()
            elif not t.dtype.is_floating_point:
                t = t.float()
            if t.dim() == 0:
                t = t.expand(batch_size).clone()
            if t.dim() != 1 or t.shape[0] != batch_size:
                raise ValueError(
                    f"AcceptanceParams.{name}: expected a scalar or {batch_size} values "
                    f"(one per request), found shape {tuple(t.shape)}"
                )
            out[name] = t
        return cls(**out)

    def index_select(self, rows: torch.Tensor) -> AcceptanceParams:
        """The params of the given batch rows."""
        return AcceptanceParams(
            self.rule[rows], self.temperature[rows],
            self.posterior_threshold[rows], self.posterior_alpha[rows],
        )


@dataclass(frozen=True)
class AcceptanceResult:
    """What verification decided, per request (D = tree depth)."""

    accepted_nodes: torch.Tensor  # [B, D+1] long: root(0)..last accepted node, -1 padded
    num_accepted: torch.Tensor  # [B] long: accepted draft tokens (root and bonus excluded)
    output_tokens: torch.Tensor  # [B, D+1] long: accepted draft tokens then the bonus, -1 padded
    last_node: torch.Tensor  # [B] long: index of the last accepted node (0 = root)

    @property
    def bonus_tokens(self) -> torch.Tensor:
        """``[B]`` the bonus token of each request."""
        return self.output_tokens.gather(1, self.num_accepted[:, None]).squeeze(1)

    @property
    def num_emitted(self) -> torch.Tensor:
        """``[B]`` tokens emitted this step (accepted + bonus)."""
        return self.num_accepted + 1


# ----------------------------------------------------------------- validation
def _check_range(name: str, t: torch.Tensor, expected: str, ok: torch.Tensor) -> None:
    ok = ok & ~torch.isnan(t)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        raise ValueError(
            f"{name}: expected values {expected}, found {t[bad].tolist()[:8]} at rows "
            f"{bad.tolist()[:8]}"
        )


def _check_inputs(
    where: str,
    tree: TreeLike,
    draft_tokens: torch.Tensor,
    scores: Mapping[str, torch.Tensor | None],
) -> tuple[int, int]:
    """Validate shapes/dtypes; returns (batch, vocab)."""
    n1 = tree.num_nodes + 1
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2:
        found = tuple(draft_tokens.shape) if isinstance(draft_tokens, torch.Tensor) else type(draft_tokens).__name__
        raise ValueError(
            f"{where}: draft_tokens must be [batch, num_nodes+1] = [B, {n1}] for this "
            f"tree, found {found}"
        )
    if draft_tokens.dtype.is_floating_point or draft_tokens.dtype == torch.bool:
        raise ValueError(
            f"{where}: draft_tokens must be an integer tensor, found dtype {draft_tokens.dtype}"
        )
    b = draft_tokens.shape[0]
    if draft_tokens.shape[1] != n1:
        raise ValueError(
            f"{where}: draft_tokens must be [batch, num_nodes+1] = [{b}, {n1}] for this "
            f"tree ({tree.num_nodes} nodes + root), found {tuple(draft_tokens.shape)}"
        )
    vocab = -1
    for name, t in scores.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            found = (f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, torch.Tensor)
                     else type(t).__name__)
            raise ValueError(
                f"{where}: {name} must be a floating tensor [batch, num_nodes+1, vocab] = "
                f"[{b}, {n1}, V], found {found}"
            )
        if t.shape[0] != b or t.shape[1] != n1 or (vocab >= 0 and t.shape[2] != vocab):
            want = f"[{b}, {n1}, {vocab if vocab >= 0 else 'V'}]"
            raise ValueError(
                f"{where}: {name} must be [batch, num_nodes+1, vocab] = {want} (batch from "
                f"draft_tokens), found {tuple(t.shape)}"
            )
        if t.device != draft_tokens.device:
            raise ValueError(
                f"{where}: {name} must be on draft_tokens' device {draft_tokens.device}, "
                f"found {t.device}"
            )
        vocab = t.shape[2]
    if b and n1 > 1 and vocab > 0:
        nodes = draft_tokens[:, 1:]
        lo, hi = int(nodes.min()), int(nodes.max())
        if lo < -1 or hi >= vocab:
            raise ValueError(
                f"{where}: draft_tokens[:, 1:] must be token ids in [0, {vocab}) or -1 "
                f"(absent node), found values in [{lo}, {hi}]"
            )
    if vocab == 0:
        raise ValueError(f"{where}: vocab size must be >= 1, found 0")
    return b, vocab


def _per_row(name: str, where: str, value: float | torch.Tensor, b: int,
             device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32 if not isinstance(value, torch.Tensor)
                        else None, device=device)
    if not t.dtype.is_floating_point:
        t = t.float()
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"{where}: {name} must be a scalar or [batch] = [{b}], found "
                         f"{tuple(t.shape)}")
    return t


# ------------------------------------------------------------------ randomness
def _random(
    kind: str,
    b: int,
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None,
    generators: Generators | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[b, *shape]`` uniform [0,1) or Exp(1) draws.

    Rows listed in ``generators`` draw from their own generator (so a seeded
    request gets the same draws whatever batch it is in); the others share
    ``generator`` (torch's default RNG when ``None``).
    """
    out = torch.empty((b, *shape), dtype=dtype, device=device)
    fill = (lambda t, g: t.uniform_(generator=g)) if kind == "uniform" else (
        lambda t, g: t.exponential_(generator=g))
    if out.numel():
        fill(out, generator)
        for row, g in (generators or {}).items():
            if not 0 <= row < b:
                raise ValueError(f"generators: row {row} is outside the batch [0, {b})")
            fill(out[row], g)
    return out


def _sample(weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised ``weights`` [B, V] (exponential race).

    ``argmax(w / E)`` with ``E ~ Exp(1)`` i.i.d. picks ``v`` with probability
    ``w_v / Σw``; zero-weight tokens are never chosen.
    """
    return (weights / exp_noise.clamp_min(torch.finfo(exp_noise.dtype).tiny)).argmax(-1)


# -------------------------------------------------------------- path picking
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _select_path(
    tree: TreeLike, node_ok: torch.Tensor, node_score: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest accepted root->leaf prefix, ties by score then retrieve order.

    ``node_ok`` [B, N+1] bool (column 0 must be True); ``node_score``
    [B, N+1] (finite where ``node_ok``) or ``None``. Returns
    ``accepted_nodes`` [B, D+1] (-1 padded) and ``num_accepted`` [B].
    """
    ri = tree.retrieve_indices.to(node_ok.device)  # [L, D+1]
    present = ri >= 0
    idx = ri.clamp(min=0)
    ok = node_ok[:, idx] & present  # [B, L, D+1]
    prefix = ok.long().cumprod(-1).bool()  # accepted prefix of every path
    length = prefix.sum(-1) - 1  # [B, L] accepted draft tokens (root excluded)
    best_len = length.max(-1, keepdim=True).values
    if node_score is None:
        best = (length == best_len).long().argmax(-1)  # first longest path
    else:
        zero = torch.zeros((), dtype=node_score.dtype, device=node_score.device)
        score = torch.where(prefix, node_score[:, idx], zero).sum(-1)
        score = torch.where(length == best_len, score, torch.full_like(score, -torch.inf))
        best = score.argmax(-1)  # first among the best-scoring longest paths
    rows = torch.arange(node_ok.shape[0], device=node_ok.device)
    num_accepted = length[rows, best]
    cols = torch.arange(ri.shape[1], device=ri.device)
    accepted = torch.where(cols <= num_accepted[:, None], ri[best], -1)
    return accepted, num_accepted


def _result(
    draft_tokens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    bonus: torch.Tensor,
) -> AcceptanceResult:
    b, width = accepted_nodes.shape
    rows = torch.arange(b, device=accepted_nodes.device)
    tokens = draft_tokens.gather(1, accepted_nodes.clamp(min=0))  # [B, D+1]
    # shift left by one: output position t holds the token of accepted node t+1
    out = torch.full_like(accepted_nodes, -1)
    out[:, :-1] = torch.where(accepted_nodes[:, 1:] >= 0, tokens[:, 1:], -1)
    out[rows, num_accepted] = bonus.to(out.dtype)
    last = accepted_nodes[rows, num_accepted]
    return AcceptanceResult(accepted_nodes, num_accepted, out, last)


# ---------------------------------------------------------------------- rules
def greedy_accept(
    tree: TreeLike, draft_tokens: torch.Tensor, target_logits: torch.Tensor
) -> AcceptanceResult:
    """Greedy verification (exact match with the target argmax)."""
    b, vocab = _check_inputs("greedy_accept", tree, draft_tokens,
                             {"target_logits": target_logits})
    draft_tokens = draft_tokens.long()
    dev = draft_tokens.device
    internal, parent_row = _internal_rows(tree, dev)
    if internal.numel():  # only nodes with children judge anyone
        argmax = target_logits.index_select(1, internal).argmax(-1)  # [B, I]
        node_ok = (draft_tokens == argmax[:, parent_row]) & (draft_tokens >= 0)
    else:  # root-only tree
        node_ok = torch.ones_like(draft_tokens, dtype=torch.bool)
    node_ok[:, 0] = True
    accepted, n = _select_path(tree, node_ok, None)
    rows = torch.arange(b, device=dev)
    last = accepted[rows, n]
    return _result(draft_tokens, accepted, n, target_logits[rows, last].argmax(-1))


def greedy_accept_argmax(
    tree: TreeLike, draft_tokens: torch.Tensor, target_argmax: torch.Tensor
) -> AcceptanceResult:
    """:func:`greedy_accept` from the target's argmax token per node
    (``target_argmax`` ``[B, N+1]``) instead of its logits: the engine takes
    the argmax of its flat logits rows once and never builds ``[B, N+1, V]``."""
    where = "greedy_accept_argmax"
    b, _ = _check_inputs(where, tree, draft_tokens, {})
    if (not isinstance(target_argmax, torch.Tensor) or target_argmax.shape != draft_tokens.shape
            or target_argmax.dtype.is_floating_point):
        found = (f"shape {tuple(target_argmax.shape)} dtype {target_argmax.dtype}"
                 if isinstance(target_argmax, torch.Tensor) else type(target_argmax).__name__)
        raise ValueError(
            f"{where}: target_argmax must be an integer tensor shaped like draft_tokens "
            f"{tuple(draft_tokens.shape)}, found {found}"
        )
    draft_tokens = draft_tokens.long()
    target_argmax = target_argmax.long()
    dev = draft_tokens.device
    parents = tree.parents.to(dev).clamp(min=0)
    node_ok = (draft_tokens == target_argmax[:, parents]) & (draft_tokens >= 0)
    node_ok[:, 0] = True
    accepted, n = _select_path(tree, node_ok, None)
    rows = torch.arange(b, device=dev)
    return _result(draft_tokens, accepted, n, target_argmax[rows, accepted[rows, n]])


def typical_accept(
    tree: TreeLike,
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float | torch.Tensor,
    posterior_threshold: float | torch.Tensor = DEFAULT_POSTERIOR_THRESHOLD,
    posterior_alpha: float | torch.Tensor = DEFAULT_POSTERIOR_ALPHA,
    *,
    generator: torch.Generator | None = None,
    generators: Generators | None = None,
) -> AcceptanceResult:
    """Medusa typical acceptance; rows with ``temperature == 0`` are greedy.

    ``temperature``, ``posterior_threshold`` (ε) and ``posterior_alpha`` (δ)
    are scalars or ``[B]`` tensors. The bonus token is sampled from
    ``softmax(logits / T)`` at the last accepted node (argmax when T = 0).
    """
    where = "typical_accept"
    b, vocab = _check_inputs(where, tree, draft_tokens, {"target_logits": target_logits})
    dev = draft_tokens.device
    draft_tokens = draft_tokens.long()
    temp = _per_row("temperature", where, temperature, b, dev)
    eps = _per_row("posterior_threshold", where, posterior_threshold, b, dev)
    alpha = _per_row("posterior_alpha", where, posterior_alpha, b, dev)
    _check_range(f"{where}: temperature", temp, ">= 0", temp >= 0)
    _check_range(f"{where}: posterior_threshold", eps, "in (0, 1)", (eps > 0) & (eps < 1))
    _check_range(f"{where}: posterior_alpha", alpha, ">= 0", alpha >= 0)

    dtype = _compute_dtype(target_logits)
    greedy_row = temp == 0
    safe_t = torch.where(greedy_row, torch.ones_like(temp), temp).to(dtype)
    # Only nodes with children judge anyone: score those rows, not all N+1.
    internal, parent_row = _internal_rows(tree, dev)  # [I], [N+1]
    z = target_logits.index_select(1, internal).to(dtype)  # [B, I, V] (a copy)
    z.div_(safe_t[:, None, None]).clamp_(min=-1e30)  # -inf (masked) -> finite, p stays 0
    logp = torch.log_softmax(z, dim=-1)
    entropy = -torch.linalg.vecdot(logp.exp(), logp)  # [B, I], exact: 0·log 0 -> 0·(-1e30)
    threshold = torch.minimum(eps.to(dtype)[:, None],
                              alpha.to(dtype)[:, None] * torch.exp(-entropy))  # [B, I]
    tok = draft_tokens.clamp(min=0)
    any_greedy = bool(greedy_row.any())
    if internal.numel():
        flat = parent_row[None, :] * vocab + tok
        logp_tok = logp.reshape(b, -1).gather(1, flat)  # [B, N+1] log p_parent(x_i)
        typical_ok = logp_tok.exp() > threshold[:, parent_row]
        # z == logits on greedy rows (T := 1 there), so argmax(z) is the target argmax
        greedy_ok = tok == z.argmax(-1)[:, parent_row] if any_greedy else typical_ok
    else:  # root-only tree: nothing to judge
        logp_tok = torch.zeros(b, 1, dtype=dtype, device=dev)
        typical_ok = greedy_ok = torch.ones(b, 1, dtype=torch.bool, device=dev)
    node_ok = torch.where(greedy_row[:, None], greedy_ok, typical_ok) & (draft_tokens >= 0)
    node_ok[:, 0] = True
    # greedy rows rank equally long paths by retrieve order only (score 0)
    score = torch.where(greedy_row[:, None] | ~node_ok, torch.zeros_like(logp_tok), logp_tok)
    score[:, 0] = 0
    accepted, n = _select_path(tree, node_ok, score)

    rows = torch.arange(b, device=dev)
    last = accepted[rows, n]
    z_last = target_logits[rows, last].to(dtype) / safe_t[:, None]  # [B, V]
    noise = _random("exponential", b, (vocab,), dev, generator, generators, dtype)
    sampled = _sample(torch.softmax(z_last, dim=-1), noise)
    bonus = torch.where(greedy_row, z_last.argmax(-1), sampled)
    return _result(draft_tokens, accepted, n, bonus)


def _internal_rows(tree: TreeLike, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes that have children ``[I]``, and each node's parent's position among them."""
    children = tree.children.cpu()
    if children.shape[1] == 0:
        internal = torch.zeros(0, dtype=torch.long)
    else:
        internal = (children[:, 0] >= 0).nonzero().flatten()
    position = torch.zeros(children.shape[0], dtype=torch.long)
    position[internal] = torch.arange(internal.numel())
    parent_row = position[tree.parents.cpu().clamp(min=0)]
    return internal.to(device), parent_row.to(device)


def rejection_accept(
    tree: TreeLike,
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    generators: Generators | None = None,
) -> AcceptanceResult:
    """Lossless tree rejection sampling with point-mass (top-k) drafts.

    ``target_probs`` [B, N+1, V]: the request's processed sampling
    distribution (temperature / top-k / top-p already applied; rows need not
    be normalised but must be non-negative with a positive sum). Random
    draws per request: ``[D, C]`` uniforms (C = ``tree.children`` width) then
    ``[V]`` exponentials, from ``generators[row]`` if given, else from
    ``generator``.
    """
    b, vocab = _check_inputs("rejection_accept", tree, draft_tokens,
                             {"target_probs": target_probs})
    dev = draft_tokens.device
    draft_tokens = draft_tokens.long()
    depth = tree.max_depth
    children = tree.children.to(dev)  # [N+1, C]
    width = children.shape[1]
    dtype = _compute_dtype(target_probs)
    rows = torch.arange(b, device=dev)

    uniform = _random("uniform", b, (depth, width), dev, generator, generators, dtype)
    noise = _random("exponential", b, (vocab,), dev, generator, generators, dtype)

    cur = torch.zeros(b, dtype=torch.long, device=dev)
    active = torch.ones(b, dtype=torch.bool, device=dev)
    accepted = torch.full((b, depth + 1), -1, dtype=torch.long, device=dev)
    accepted[:, 0] = 0
    residual = target_probs[:, 0].to(dtype).clone()  # unnormalised residual at cur
    for d in range(depth if width else 0):
        total = residual.sum(-1)
        moved = torch.zeros(b, dtype=torch.bool, device=dev)
        nxt = cur
        for k in range(width):
            child = children[cur, k]  # [B], -1 = no such sibling slot
            token = draft_tokens.gather(1, child.clamp(min=0)[:, None]).squeeze(1)
            tried = active & ~moved & (child >= 0) & (token >= 0)
            tok = token.clamp(min=0)
            p_tok = residual.gather(1, tok[:, None]).squeeze(1)
            accept = tried & (uniform[:, d, k] * total < p_tok)
            reject = tried & ~accept
            # a rejected point-mass draft leaves the residual max(r - δ_x, 0) -> r(x) = 0
            residual.scatter_(1, tok[:, None], torch.where(reject, 0.0, p_tok)[:, None].to(dtype))
            total = torch.where(reject, total - p_tok, total)
            moved = moved | accept
            nxt = torch.where(accept, child, nxt)
        active = moved
        cur = nxt
        accepted[:, d + 1] = torch.where(moved, cur, -1)
        residual = torch.where(moved[:, None], target_probs[rows, cur].to(dtype), residual)
        if not bool(moved.any()):
            break
    num_accepted = (accepted >= 0).sum(-1) - 1
    # guard against a residual emptied by rounding: fall back to the node's row
    empty = residual.sum(-1) <= 0
    residual = torch.where(empty[:, None], target_probs[rows, cur].to(dtype), residual)
    bonus = _sample(residual, noise)
    return _result(draft_tokens, accepted, num_accepted, bonus)


# ---------------------------------------------------------------- entry point
def tree_accept(
    tree: TreeLike,
    draft_tokens: torch.Tensor,
    target_logits: torch.Tensor,
    params: AcceptanceParams,
    *,
    target_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    generators: Generators | None = None,
) -> AcceptanceResult:
    """Verify a batch whose requests may use different rules.

    - ``draft_tokens`` [B, N+1]: node tokens (column 0 = root, -1 = absent).
    - ``target_logits`` [B, N+1, V]: raw target logits per node (greedy and
      typical rows; typical applies ``params.temperature`` itself).
    - ``target_probs`` [B, N+1, V]: processed sampling probabilities; required
      when some row uses ``rejection`` with temperature > 0 (other rows may
      hold anything).
    - ``generator`` / ``generators`` (``{row: torch.Generator}``): randomness
      for sampling rows; a row with its own generator is reproducible
      whatever else is in the batch.

    Rows with temperature 0 are verified greedily whatever their rule.
    """
    where = "tree_accept"
    b, _ = _check_inputs(where, tree, draft_tokens,
                         {"target_logits": target_logits, "target_probs": target_probs})
    if not isinstance(params, AcceptanceParams):
        raise ValueError(f"{where}: params must be AcceptanceParams, found {type(params).__name__}")
    if params.batch_size != b:
        raise ValueError(
            f"{where}: params must have one entry per request ({b} rows in draft_tokens), "
            f"found {params.batch_size}"
        )
    dev = draft_tokens.device
    params = AcceptanceParams(*(t.to(dev) for t in (
        params.rule, params.temperature, params.posterior_threshold, params.posterior_alpha)))
    sampling = params.temperature > 0
    groups = {
        AcceptanceRule.GREEDY: (params.rule == AcceptanceRule.GREEDY) | ~sampling,
        AcceptanceRule.TYPICAL: (params.rule == AcceptanceRule.TYPICAL) & sampling,
        AcceptanceRule.REJECTION: (params.rule == AcceptanceRule.REJECTION) & sampling,
    }
    if target_probs is None and bool(groups[AcceptanceRule.REJECTION].any()):
        rows = groups[AcceptanceRule.REJECTION].nonzero().flatten().tolist()
        raise ValueError(
            f"{where}: target_probs [batch, num_nodes+1, vocab] is required for rows using "
            f"rule 'rejection' with temperature > 0 (rows {rows[:8]}), found None"
        )
    width = tree.max_depth + 1
    accepted = torch.full((b, width), -1, dtype=torch.long, device=dev)
    outputs = torch.full((b, width), -1, dtype=torch.long, device=dev)
    num = torch.zeros(b, dtype=torch.long, device=dev)
    last = torch.zeros(b, dtype=torch.long, device=dev)
    for rule, mask in groups.items():
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            continue
        whole = rows.numel() == b
        sub = (lambda t: t) if whole else (lambda t: t.index_select(0, rows))
        row_list = rows.tolist()
        sub_gens = None
        if generators:
            sub_gens = {i: generators[r] for i, r in enumerate(row_list) if r in generators}
        if rule is AcceptanceRule.GREEDY:
            res = greedy_accept(tree, sub(draft_tokens), sub(target_logits))
        elif rule is AcceptanceRule.TYPICAL:
            p = params if whole else params.index_select(rows)
            res = typical_accept(tree, sub(draft_tokens), sub(target_logits), p.temperature,
                                 p.posterior_threshold, p.posterior_alpha,
                                 generator=generator, generators=sub_gens)
        else:
            assert target_probs is not None
            res = rejection_accept(tree, sub(draft_tokens), sub(target_probs),
                                   generator=generator, generators=sub_gens)
        if whole:
            return res
        accepted[rows] = res.accepted_nodes
        outputs[rows] = res.output_tokens
        num[rows] = res.num_accepted
        last[rows] = res.last_node
    return AcceptanceResult(accepted, num, outputs, last)
