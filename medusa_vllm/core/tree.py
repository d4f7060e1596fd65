"""Medusa tree buffers: pure functions from ``medusa_choices`` to tensors.

A Medusa tree is a set of *paths* of top-k ranks. The path ``(0, 2)`` is the
node "head 0's top-1 token followed by head 1's top-3 token". Node 0 is the
root: the token the backbone itself just produced (the previous step's bonus
token). Nodes are numbered breadth-first, sorted by ``(len(path), path)``, so
any prefix of the node list is itself a valid (prefix-closed) tree: the engine
may truncate a request's tree to its first ``n`` nodes and the topology is
still known from ``n`` alone.

Everything here is pure: :class:`MedusaTree` holds immutable CPU tensors
derived once from the paths (no engine state); :meth:`MedusaTree.to` gives a
copy on another device. Fitting a tree to measured accuracies and costs lives in
:mod:`medusa_vllm.core.tree_fit`.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path as FsPath

import torch

Path = tuple[int, ...]

__all__ = [
    "PRESETS",
    "MedusaTree",
    "budget_nodes_by_batch",
    "greedy_paths",
    "lookup_candidates",
    "nodes_at_depth",
    "nodes_for_batch",
    "normalize_choices",
    "under_lookup_chain",
    "with_lookup_chain",
]


def normalize_choices(
    medusa_choices: Iterable[Sequence[int]], num_heads: int | None = None
) -> list[Path]:
    """Validate ``medusa_choices`` and return them as tuples in BFS order.

    Raises ``ValueError`` naming the offending path for: a non-integer or
    negative rank, an empty path, a duplicate, a path whose prefix is missing,
    or a path deeper than ``num_heads``.
    """
    if isinstance(medusa_choices, (str, bytes)):
        raise ValueError(
            f"medusa_choices must be a list of paths such as [[0], [1], [0, 0]], "
            f"found the string {medusa_choices!r}"
        )
    paths: list[Path] = []
    seen: set[Path] = set()
    for i, raw in enumerate(medusa_choices):
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ValueError(
                f"medusa_choices[{i}] = {raw!r}: expected a list of top-k ranks "
                f"such as [0, 1]"
            )
        if len(raw) == 0:
            raise ValueError(
                f"medusa_choices[{i}] = []: the root is implicit; every path "
                f"needs at least one rank"
            )
        for r in raw:
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(
                    f"medusa_choices[{i}] = {list(raw)}: ranks must be integers, "
                    f"found {r!r}"
                )
            if r < 0:
                raise ValueError(
                    f"medusa_choices[{i}] = {list(raw)}: ranks must be >= 0, "
                    f"found {r}"
                )
        path = tuple(int(r) for r in raw)
        if path in seen:
            raise ValueError(
                f"medusa_choices[{i}] = {list(path)}: duplicate path"
            )
        if num_heads is not None and len(path) > num_heads:
            raise ValueError(
                f"medusa_choices[{i}] = {list(path)}: depth {len(path)} exceeds "
                f"the number of Medusa heads ({num_heads}); head k proposes "
                f"depth k+1, so paths may be at most {num_heads} long"
            )
        seen.add(path)
        paths.append(path)
    for path in paths:
        for d in range(1, len(path)):
            if path[:d] not in seen:
                raise ValueError(
                    f"medusa_choices path {list(path)}: its prefix "
                    f"{list(path[:d])} is missing; every prefix of a path must "
                    f"also be in the tree"
                )
    return sorted(paths, key=lambda p: (len(p), p))


class MedusaTree:
    """Static Medusa tree with its verification buffers.

    Attributes (N = number of non-root nodes, D = max depth):

    - ``medusa_choices``: list of paths in BFS order (root excluded).
    - ``paths``: ``[(), *medusa_choices]``; node 0 is the root.
    - ``parents``: ``[N+1]`` parent node index (``-1`` for the root).
    - ``position_offsets``: ``[N+1]`` depth of each node (root 0).
    - ``tree_mask``: ``[N+1, N+1]`` bool; ``[i, j]`` iff j is i or an ancestor.
    - ``retrieve_indices``: ``[num_leaves, D+1]`` node indices root->leaf,
      padded with -1.
    - ``children``: ``[N+1, C]`` children in ascending rank order, -1 padded.
    - ``head_indices``: ``[N+1]`` head that proposes each node (depth-1;
      -1 for the root).
    - ``topk_ranks``: ``[N+1]`` the node's rank among its head's top-k
      (``path[-1]``; -1 for the root).
    - ``topk``: how many candidates per head the tree needs (max rank + 1).
    """

    def __init__(
        self,
        medusa_choices: Iterable[Sequence[int]],
        num_heads: int | None = None,
    ) -> None:
        self.medusa_choices: list[Path] = normalize_choices(medusa_choices, num_heads)
        self.paths: list[Path] = [(), *self.medusa_choices]
        index = {p: i for i, p in enumerate(self.paths)}
        n1 = len(self.paths)

        parents = [-1] + [index[p[:-1]] for p in self.medusa_choices]
        depth = [len(p) for p in self.paths]
        self.num_nodes: int = n1 - 1
        self.max_depth: int = max(depth)
        self.topk: int = 1 + max((p[-1] for p in self.medusa_choices), default=-1)

        mask = torch.zeros(n1, n1, dtype=torch.bool)
        for i, p in enumerate(self.paths):
            for d in range(len(p) + 1):
                mask[i, index[p[:d]]] = True

        kids: list[list[int]] = [[] for _ in range(n1)]
        for i in range(1, n1):  # BFS order == ascending rank among siblings
            kids[parents[i]].append(i)
        width = max((len(k) for k in kids), default=0)
        children = torch.full((n1, max(width, 1)), -1, dtype=torch.long)
        for i, k in enumerate(kids):
            children[i, : len(k)] = torch.tensor(k, dtype=torch.long)
        if width == 0:
            children = children[:, :0]

        leaves = [i for i in range(n1) if not kids[i]]
        retrieve = torch.full((len(leaves), self.max_depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            p = self.paths[leaf]
            retrieve[row, : len(p) + 1] = torch.tensor(
                [index[p[:d]] for d in range(len(p) + 1)], dtype=torch.long
            )

        self.parents = torch.tensor(parents, dtype=torch.long)
        self.position_offsets = torch.tensor(depth, dtype=torch.long)
        self.tree_mask = mask
        self.children = children
        self.retrieve_indices = retrieve
        self.head_indices = self.position_offsets - 1
        self.topk_ranks = torch.tensor(
            [-1] + [p[-1] for p in self.medusa_choices], dtype=torch.long
        )

    # ------------------------------------------------------------------ misc
    def __len__(self) -> int:
        return self.num_nodes

    def __repr__(self) -> str:
        return (
            f"MedusaTree(num_nodes={self.num_nodes}, max_depth={self.max_depth}, "
            f"topk={self.topk})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MedusaTree) and self.paths == other.paths

    def __hash__(self) -> int:
        return hash(tuple(self.paths))

    def to_list(self) -> list[list[int]]:
        """``medusa_choices`` as JSON-friendly lists (BFS order)."""
        return [list(p) for p in self.medusa_choices]

    def truncate(self, num_nodes: int) -> MedusaTree:
        """The subtree made of the first ``num_nodes`` nodes in BFS order."""
        if not 0 <= num_nodes <= self.num_nodes:
            raise ValueError(
                f"truncate: num_nodes must be in [0, {self.num_nodes}], found {num_nodes}"
            )
        return MedusaTree(self.medusa_choices[:num_nodes])

    def to(self, device: torch.device | str) -> MedusaTree:
        """A shallow copy whose tensors live on ``device``."""
        new = object.__new__(MedusaTree)
        new.__dict__.update(
            {
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in self.__dict__.items()
            }
        )
        return new

    @cached_property
    def ancestor_at_depth(self) -> torch.Tensor:
        """``[N+1, D+1]``: the ancestor of node i at depth d (-1 beyond depth)."""
        out = torch.full((self.num_nodes + 1, self.max_depth + 1), -1, dtype=torch.long)
        index = {p: i for i, p in enumerate(self.paths)}
        for i, p in enumerate(self.paths):
            for d in range(len(p) + 1):
                out[i, d] = index[p[:d]]
        return out.to(self.parents.device)

    # ------------------------------------------------------------- proposing
    def node_tokens(self, topk_tokens: torch.Tensor, root_tokens: torch.Tensor) -> torch.Tensor:
        """Fill the tree from per-head top-k candidates.

        ``topk_tokens``: ``[B, num_heads, k]`` with ``k >= self.topk`` and
        ``num_heads >= self.max_depth``; ``root_tokens``: ``[B]``.
        Returns ``[B, N+1]`` node tokens (column 0 = root).
        """
        if topk_tokens.dim() != 3:
            raise ValueError(
                f"topk_tokens must be [batch, num_heads, k], found shape {tuple(topk_tokens.shape)}"
            )
        b, h, k = topk_tokens.shape
        if h < self.max_depth or k < self.topk:
            raise ValueError(
                f"the tree needs {self.max_depth} heads with top-{self.topk} each; "
                f"topk_tokens has {h} heads with top-{k}"
            )
        heads = self.head_indices[1:].to(topk_tokens.device)
        ranks = self.topk_ranks[1:].to(topk_tokens.device)
        nodes = topk_tokens[:, heads, ranks]
        return torch.cat([root_tokens.reshape(b, 1).to(nodes.dtype), nodes], dim=1)

    # ------------------------------------------------------------- builders
    @classmethod
    def chain(cls, depth: int) -> MedusaTree:
        """Top-1 chain of ``depth`` nodes (what vLLM's built-in Medusa verifies)."""
        if depth < 1:
            raise ValueError(f"chain depth must be >= 1, found {depth}")
        return cls([(0,) * d for d in range(1, depth + 1)])

    @classmethod
    def load(cls, spec: str | FsPath | Sequence[Sequence[int]], num_heads: int | None = None) -> MedusaTree:
        """A tree from a preset name, a JSON file, a JSON string or a list."""
        if isinstance(spec, (list, tuple)):
            return cls(spec, num_heads)
        s = str(spec)
        if s in PRESETS:
            return cls(PRESETS[s](num_heads or len(_GENERIC_ACC)), num_heads)
        if s.lstrip().startswith("["):
            return cls(json.loads(s), num_heads)
        p = FsPath(s)
        if p.is_file():
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                if "medusa_choices" not in data:
                    raise ValueError(f"{p}: expected a 'medusa_choices' field, found keys {sorted(data)}")
                data = data["medusa_choices"]
            return cls(data, num_heads)
        raise ValueError(
            f"unknown tree {s!r}: expected a preset ({', '.join(sorted(PRESETS))}), "
            f"a JSON list of paths, or a path to a JSON file"
        )

    def save(self, path: str | FsPath, **extra: object) -> None:
        """Write ``{"medusa_choices": [...], **extra}`` as JSON."""
        FsPath(path).write_text(json.dumps({"medusa_choices": self.to_list(), **extra}, indent=1))


# ------------------------------------------------------------- presets
def with_lookup_chain(tree: MedusaTree, length: int, num_heads: int | None = None) -> MedusaTree:
    """``tree`` plus the top-1 chain ``(0,), (0, 0), ...`` down to depth ``length``
    (the paths of it that ``tree`` lacks).

    That chain is where a second source of candidates (prompt lookup) leads: for a
    request whose lookup found a continuation, the proposer puts it on the chain
    and shifts the heads' candidates one rank down beside it
    (:func:`lookup_candidates`, :func:`under_lookup_chain`); for any other request
    the chain holds the heads' top-1 path, as in a plain Medusa tree.
    """
    if length < 0:
        raise ValueError(f"lookup chain length must be >= 0, found {length}")
    have = set(tree.medusa_choices)
    extra = [(0,) * d for d in range(1, length + 1) if (0,) * d not in have]
    return MedusaTree([*tree.medusa_choices, *extra], num_heads) if extra else tree


def under_lookup_chain(paths: Sequence[Path]) -> list[bool]:
    """Per node (BFS order): is its parent the root or a node of the top-1 chain
    (every rank 0)? Those nodes take the merged candidates of
    :func:`lookup_candidates` where a request's lookup reaches their depth."""
    return [all(r == 0 for r in p[:-1]) for p in paths]


def lookup_candidates(topk_tokens: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Per depth, the lookup token first, then the heads' candidates without it.

    ``topk_tokens``: ``[B, D, k+1]`` the heads' top-(k+1) per depth;
    ``lookup``: ``[B, D]`` the lookup continuation (``-1`` where it has none).
    Returns ``[B, D, k]``: ``[lookup, heads' best other k-1]`` where ``lookup >= 0``,
    else the heads' top-k unchanged. No token appears twice in a row.
    """
    k = topk_tokens.shape[-1] - 1
    if k < 1:
        raise ValueError("topk_tokens needs at least 2 candidates per depth (k + 1)")
    lookup = lookup.to(topk_tokens.dtype)
    dup = topk_tokens == lookup.unsqueeze(-1)
    # stable: the heads' order is kept, the duplicate of the lookup token goes last
    order = torch.argsort(dup.to(torch.int8), dim=-1, stable=True)
    rest = torch.gather(topk_tokens, -1, order)[..., : k - 1]
    merged = torch.cat([lookup.unsqueeze(-1), rest], dim=-1)
    return torch.where((lookup >= 0).unsqueeze(-1), merged, topk_tokens[..., :k])


def greedy_paths(a: torch.Tensor, num_nodes: int) -> list[Path]:
    """The ``num_nodes`` paths with the largest products of ``a[depth, rank]`` along them.

    ``a`` is a ``[num_heads, topk]`` table of per-rank accuracies (float64). Paths come
    out in order of decreasing product (ties: shorter, then lexicographically smaller);
    a child's product never exceeds its parent's, so every prefix of the list is
    prefix-closed. The sparse presets are built from it;
    :func:`medusa_vllm.core.tree_fit.tree_from_accuracies` fits measured accuracies.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, found {num_nodes}")
    num_heads, topk = a.shape
    # max-heap on probability; ties prefer shorter, then lexicographically smaller paths
    heap = [(-float(a[0, r]), 1, (r,)) for r in range(topk)]
    heapq.heapify(heap)
    out: list[Path] = []
    while heap and len(out) < num_nodes:
        neg, _, path = heapq.heappop(heap)
        out.append(path)
        if len(path) < num_heads:
            for r in range(topk):
                child = (*path, r)
                heapq.heappush(heap, (neg * float(a[len(path), r]), len(child), child))
    return out


# A generic accuracy profile of Medusa heads (top-1..top-8 per head, decaying
# with depth), used only to shape the presets. Calibrate for real models:
# ``medusa-vllm calibrate`` writes a tree fitted to the heads and the machine.
_GENERIC_ACC = [
    [0.60, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01],
    [0.40, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01],
    [0.30, 0.08, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01],
    [0.25, 0.07, 0.04, 0.02, 0.02, 0.01, 0.01, 0.01],
    [0.20, 0.06, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01],
]


def _sparse(n: int) -> Callable[[int], list[Path]]:
    def build(num_heads: int) -> list[Path]:
        acc = torch.tensor(_GENERIC_ACC, dtype=torch.float64)[: max(1, num_heads)]
        return greedy_paths(acc, n)

    return build


def _chain(d: int) -> Callable[[int], list[Path]]:
    return lambda num_heads: [(0,) * k for k in range(1, d + 1)]


# name -> builder(num_heads) -> medusa_choices
PRESETS: dict[str, Callable[[int], list[Path]]] = {
    **{f"chain-{d}": _chain(d) for d in range(1, 6)},
    **{f"sparse-{n}": _sparse(n) for n in (4, 8, 16, 32, 64)},
}


# ------------------------------------------------------- tree size vs batch
def budget_nodes_by_batch(num_nodes: int, token_budget: int,
                          batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict[int, int]:
    """Tree size per batch size such that a step verifies at most about
    ``token_budget`` tokens: ``min(num_nodes, token_budget // b - 1)`` nodes
    per request at batch ``b`` (0 = no speculation)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, found {token_budget}")
    return {b: max(0, min(num_nodes, token_budget // b - 1)) for b in batch_sizes}


def nodes_for_batch(table: dict[int, int] | None, batch_size: int, num_nodes: int) -> int:
    """How many of the tree's BFS-first nodes to draft at ``batch_size``.

    ``table`` maps batch sizes to tree sizes (``None`` = always the whole
    tree). A batch size between two entries takes the entry below it, capped
    so that the step verifies no more tokens than the entry above does
    (``b * (n + 1) <= b2 * (n2 + 1)``): verification cost follows the tokens
    per step. Below the first entry: the first entry. Any BFS prefix is a
    valid tree.
    """
    if not table:
        return num_nodes
    keys = sorted(table)
    below = [k for k in keys if k <= batch_size]
    n = int(table[below[-1]] if below else table[keys[0]])
    above = [k for k in keys if k > batch_size]
    if below and below[-1] != batch_size and above:
        b2 = above[0]
        n = min(n, b2 * (int(table[b2]) + 1) // max(batch_size, 1) - 1)
    return max(0, min(num_nodes, n))


def nodes_at_depth(position_offsets: Sequence[int]) -> list[int]:
    """``[0, n1, n1+n2, ...]``: BFS nodes of depth <= d, for d = 0..max depth, from a
    tree's per-node depths (``MedusaTree.position_offsets``, root first, BFS order)."""
    depths = [int(x) for x in position_offsets][1:]
    if any(b < a for a, b in itertools.pairwise(depths)):
        raise ValueError("nodes_at_depth: node depths must be non-decreasing (BFS order)")
    top = depths[-1] if depths else 0
    return [sum(1 for x in depths if x <= d) for d in range(top + 1)]
