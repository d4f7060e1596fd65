"""Drafting a tree with Hydra heads: depth by depth, one head evaluation per parent node.

Medusa heads fill the whole tree from one top-k per head (every node at depth ``d``
takes a rank of head ``d - 1``'s candidates). Hydra heads
(:class:`medusa_vllm.core.hydra.HydraHeads`) condition on the path, so the children
of two different parents differ: at depth ``d`` head ``d - 1`` runs once per node of
depth ``d - 1`` that has children, on ``(hidden, tokens of that node's path from
the root)``, batched across those nodes and across requests; each child takes the
candidate of its rank among its own parent's top-k. ``D`` small head calls per step
for a tree ``D`` deep (the top-1 chain of 2: 2 rows; the 64-node tree: a few dozen).

:func:`draft_tree` is the pure function (any tree, any batch); :func:`hydra_nodes`
is what :class:`medusa_vllm.engine.proposer.MedusaTreeProposer` calls; a prompt-lookup
continuation (``ngram_nodes``) overrides the top-1 chain, whose children are then
drafted from it. Pure torch: nothing here imports vLLM.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medusa_vllm.core.hydra import HydraHeads
from medusa_vllm.core.tree import MedusaTree

__all__ = ["DepthStep", "depth_steps", "draft_tree", "hydra_nodes", "lookup_overrides"]


@dataclass(frozen=True)
class DepthStep:
    """What drafting depth ``depth`` of a tree needs (CPU tensors, BFS node indices).

    ``nodes [C]``: the nodes at ``depth``; ``paths [P, depth]``: for each distinct
    parent (in BFS order), the nodes root..parent; ``slot [C]``: each node's parent
    as an index into ``paths``; ``ranks [C]``: each node's rank among its parent's
    candidates; ``topk``: candidates the depth needs (max rank + 1).
    """

    depth: int
    nodes: torch.Tensor
    paths: torch.Tensor
    slot: torch.Tensor
    ranks: torch.Tensor
    topk: int


@functools.lru_cache(maxsize=64)
def depth_steps(tree: MedusaTree) -> tuple[DepthStep, ...]:
    """The tree's :class:`DepthStep` list, depth 1 first (cached per tree)."""
    index = {p: i for i, p in enumerate(tree.paths)}
    steps = []
    for d in range(1, tree.max_depth + 1):
        nodes = [i for i, p in enumerate(tree.paths) if len(p) == d]
        parents = sorted({index[tree.paths[i][:-1]] for i in nodes})
        where = {p: j for j, p in enumerate(parents)}
        paths = [[index[tree.paths[p][:e]] for e in range(d)] for p in parents]
        ranks = [tree.paths[i][-1] for i in nodes]
        steps.append(DepthStep(
            depth=d,
            nodes=torch.tensor(nodes, dtype=torch.long),
            paths=torch.tensor(paths, dtype=torch.long).reshape(len(parents), d),
            slot=torch.tensor([where[index[tree.paths[i][:-1]]] for i in nodes], dtype=torch.long),
            ranks=torch.tensor(ranks, dtype=torch.long),
            topk=max(ranks) + 1,
        ))
    return tuple(steps)


@torch.no_grad()
def draft_tree(heads: HydraHeads, hidden: torch.Tensor, root_tokens: torch.Tensor,
               tree: MedusaTree, *, topk: int | None = None,
               overrides: torch.Tensor | None = None) -> torch.Tensor:
    """Fill ``tree`` for each request with Hydra heads.

    Args:
        heads: the Hydra heads (at least ``tree.max_depth`` of them).
        hidden: ``[B, H]`` backbone hidden state at each request's last accepted token.
        root_tokens: ``[B]`` the token the backbone produced from it (the tree's root).
        tree: the tree (BFS order).
        topk: candidates per parent (default: what the tree's ranks need). A node
            whose rank is ``>= topk`` takes its parent's top-1 candidate unless
            ``overrides`` sets it.
        overrides: ``[B, N + 1]`` tokens forced at some nodes (``>= 0``), ``-1``
            elsewhere; children of a forced node read the forced token.

    Returns:
        ``LongTensor [B, N + 1]`` full-vocabulary node tokens, column 0 = the root
        (the layout of :meth:`MedusaTree.node_tokens`).
    """
    if hidden.dim() != 2 or root_tokens.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [B, H] and root_tokens [B], found "
                         f"{list(hidden.shape)} and {list(root_tokens.shape)}")
    if tree.max_depth > heads.config.num_heads:
        raise ValueError(f"the tree is {tree.max_depth} deep but there are only "
                         f"{heads.config.num_heads} Hydra heads")
    b, device = hidden.shape[0], hidden.device
    tokens = torch.zeros(b, tree.num_nodes + 1, dtype=torch.long, device=device)
    tokens[:, 0] = root_tokens.to(device=device, dtype=torch.long)
    if overrides is not None:
        if overrides.shape != tokens.shape:
            raise ValueError(f"overrides must be [B, N + 1] = {list(tokens.shape)}, found "
                             f"{list(overrides.shape)}")
        overrides = overrides.to(device=device, dtype=torch.long)
    dv = heads.config.draft_vocab_size
    for step in depth_steps(tree):
        nodes, paths = step.nodes.to(device), step.paths.to(device)
        slot, ranks = step.slot.to(device), step.ranks.to(device)
        k = min(step.topk if topk is None else min(topk, step.topk), dv)
        p = paths.shape[0]
        path_tokens = tokens[:, paths].reshape(b * p, step.depth)  # [B*P, depth]
        h = hidden.unsqueeze(1).expand(b, p, hidden.shape[1]).reshape(b * p, -1)
        logits = heads.head_logits(step.depth - 1, h, path_tokens)  # [B*P, draft_vocab]
        cand = heads.map_to_full(torch.topk(logits, k, dim=-1).indices).reshape(b, p, k)
        cand = cand.to(device)
        rank = torch.where(ranks < k, ranks, torch.zeros_like(ranks))
        tokens[:, nodes] = cand[:, slot, rank]
        if overrides is not None:
            forced = overrides[:, nodes]
            tokens[:, nodes] = torch.where(forced >= 0, forced, tokens[:, nodes])
    return tokens


def lookup_overrides(tree: MedusaTree, lookup: torch.Tensor) -> torch.Tensor:
    """``[B, N + 1]`` overrides for :func:`draft_tree` putting a prompt-lookup
    continuation on the top-1 chain: the node ``(0,) * d`` takes ``lookup[:, d - 1]``
    (``-1``, or past the end of ``lookup [B, L]``: no override, the heads' top-1
    under its parent). The chain's children are then drafted from the lookup path."""
    out = torch.full((lookup.shape[0], tree.num_nodes + 1), -1, dtype=torch.long)
    for i, path in enumerate(tree.paths):
        if path and not any(path) and len(path) <= lookup.shape[1]:
            out[:, i] = lookup[:, len(path) - 1].to(torch.long)
    return out


def hydra_nodes(heads: HydraHeads, hidden: torch.Tensor, root_tokens: Sequence[int] | None,
                rows: Sequence[int], tree: MedusaTree, topk: int,
                lookup: torch.Tensor | None = None) -> torch.Tensor:
    """The proposer's Hydra drafts: ``[len(rows), N]`` node tokens (root excluded).

    ``hidden [len(rows), H]`` are the drafted requests' hidden states, ``root_tokens``
    the token each request of the batch just sampled (indexed by ``rows``), ``lookup
    [len(rows), L]`` a prompt-lookup continuation per drafted request (``-1`` = none),
    put on the top-1 chain (:func:`lookup_overrides`).
    """
    if root_tokens is None:
        raise ValueError("Hydra heads need each request's root token (the token the backbone "
                         "just sampled): pass root_tokens to propose_tree")
    roots = torch.tensor([int(root_tokens[i]) for i in rows], dtype=torch.long)
    overrides = lookup_overrides(tree, lookup) if lookup is not None else None
    return draft_tree(heads, hidden, roots, tree, topk=topk, overrides=overrides)[:, 1:]
