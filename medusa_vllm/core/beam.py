"""Beam drafts: the W best paths of a width-W beam search over K heads' log-probabilities.

Seed 003's "Beam W, Medusa Heads K": each step the candidate continuations
are the ``W`` highest-scoring token paths of depth ``K``, a path's score being
the sum of the heads' log-probabilities along it (head ``d`` scores the token
at depth ``d+1``). Medusa heads all read the same hidden state and do not see
the path, so the scores are independent per depth and a width-``W`` beam is
exactly the top-``W`` of the sums over all ``V**K`` paths (a top-``W`` path's
prefix is always among the top-``W`` prefixes); :func:`beam_search` is the
general beam all the same, over any ``[B, K, C]`` score table.

Ties are broken deterministically: at every depth candidates are ordered by
score, then by their parent beam's rank, then by column (a stable sort), so
equal scores give the lexicographically smallest column paths first.

The engine verifies the W paths as W disjoint chains of depth K in one static
tree (:func:`beam_choices`), so one tree mask serves every request whatever
its paths; duplicated prefixes across chains are allowed (verification takes
the longest accepted path, the first chain on ties). Pure torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BeamPaths", "beam_choices", "beam_node_tokens", "beam_search", "parse_beam_spec"]

BEAM_PREFIX = "beam"


@dataclass(frozen=True)
class BeamPaths:
    """The best paths of a beam search, best first.

    - ``tokens``: ``[B, W, K]`` token of each path at each depth (token ids when
      :func:`beam_search` got ``token_ids``, else column indices).
    - ``columns``: ``[B, W, K]`` column of the score table picked at each depth.
    - ``scores``: ``[B, W]`` sum of the scores along each path (descending).
    """

    tokens: torch.Tensor
    columns: torch.Tensor
    scores: torch.Tensor


def beam_search(
    logprobs: torch.Tensor, width: int, token_ids: torch.Tensor | None = None
) -> BeamPaths:
    """Width-``width`` beam search over a per-depth score table.

    ``logprobs``: ``[B, K, C]``, the score of column ``c`` at depth ``d``
    (e.g. head ``d``'s log-probabilities over the vocabulary, ``C = V``, or over
    its own top-``C`` tokens with their ids in ``token_ids``). ``token_ids``:
    optional ``[B, K, C]`` integer ids of the columns. Returns the
    ``min(width, C**K)`` best paths of depth ``K`` (see :class:`BeamPaths`;
    ties as in the module docstring).
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 3:
        shape = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs)
        raise ValueError(f"beam_search: logprobs must be [batch, depth, columns], found {shape}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"beam_search: width must be an integer >= 1, found {width!r}")
    b, k, c = logprobs.shape
    if k < 1 or c < 1:
        raise ValueError(f"beam_search: need depth >= 1 and columns >= 1, found shape {(b, k, c)}")
    if token_ids is not None and (token_ids.shape != logprobs.shape
                                  or token_ids.dtype.is_floating_point):
        raise ValueError(
            f"beam_search: token_ids must be an integer tensor shaped like logprobs "
            f"{(b, k, c)}, found {tuple(token_ids.shape)} {token_ids.dtype}"
        )
    scores = logprobs.to(torch.float64 if logprobs.dtype == torch.float64 else torch.float32)
    dev = logprobs.device
    rows = torch.arange(b, device=dev)[:, None]
    # depth 0: the beams are the best columns of the first table
    order = torch.sort(scores[:, 0], dim=-1, descending=True, stable=True).indices[:, :width]
    beam_scores = scores[:, 0].gather(1, order)  # [B, W0]
    columns = order.unsqueeze(-1)  # [B, W0, 1]
    for d in range(1, k):
        w = beam_scores.shape[1]
        cand = (beam_scores[:, :, None] + scores[:, d, None, :]).reshape(b, w * c)
        # stable: ties keep (parent rank, column) order
        best = torch.sort(cand, dim=-1, descending=True, stable=True).indices[:, :width]
        parent, col = best // c, best % c
        beam_scores = cand.gather(1, best)
        columns = torch.cat([columns[rows, parent], col.unsqueeze(-1)], dim=-1)
    tokens = columns
    if token_ids is not None:
        depth = torch.arange(k, device=dev)[None, None, :]
        tokens = token_ids[rows[:, :, None], depth, columns]
    return BeamPaths(tokens=tokens, columns=columns, scores=beam_scores)


def beam_choices(width: int, depth: int) -> list[tuple[int, ...]]:
    """The static tree of ``width`` disjoint chains of ``depth`` nodes, BFS order.

    Chain ``w`` is the paths ``(w,), (w, 0), (w, 0, 0), ...``: node ``1 + d*width + w``
    holds beam path ``w``'s token at depth ``d+1`` (all depth-1 nodes, then all
    depth-2 nodes, ...). Any BFS prefix keeps the first paths' shallow tokens.
    """
    for name, v in (("width", width), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"beam tree: {name} must be an integer >= 1, found {v!r}")
    return [(w,) + (0,) * d for d in range(depth) for w in range(width)]


def beam_node_tokens(paths: torch.Tensor, chains: torch.Tensor,
                     depths: torch.Tensor) -> torch.Tensor:
    """Node tokens of a chain-layout tree from per-chain paths.

    ``paths``: ``[B, C, K]`` token of chain ``c`` at depth ``d+1``; ``chains`` /
    ``depths``: ``[N]`` chain index (a node path's first rank) and depth - 1 of
    each non-root node. Returns ``[B, N]``.
    """
    return paths[:, chains.to(paths.device), depths.to(paths.device)]


def parse_beam_spec(spec: str) -> tuple[int, int | None] | None:
    """``"beam:W"`` -> ``(W, None)``, ``"beam:W:K"`` -> ``(W, K)``; ``None`` for a
    string that does not start with ``beam``. Raises ``ValueError`` naming the
    accepted forms for a malformed beam spec (``W``, ``K`` integers >= 1)."""
    text = spec.strip().lower()
    if not text.startswith(BEAM_PREFIX):
        return None
    parts = text.split(":")
    forms = '"beam:W" (W beam paths over all heads) or "beam:W:K" (over the first K heads)'
    if parts[0] != BEAM_PREFIX or len(parts) not in (2, 3):
        raise ValueError(f"expected {forms}, with integers W, K >= 1, found {spec!r}")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"expected {forms}, with integers W, K >= 1, found {spec!r}") from None
    if any(n < 1 for n in nums) or any(p.strip() != str(int(p)) for p in parts[1:]):
        raise ValueError(f"expected {forms}, with integers W, K >= 1, found {spec!r}")
    return nums[0], (nums[1] if len(nums) == 2 else None)
