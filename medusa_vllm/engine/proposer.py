"""Medusa tree proposer: heads on the backbone's hidden state -> tree drafts.

Registered with vLLM as a ``custom_class`` proposer (the plugin translates
``method: "medusa_tree"`` into that). vLLM's custom_class call path passes no
hidden states, so :class:`medusa_vllm.engine.runner.MedusaTreeRunnerMixin` calls
:meth:`MedusaTreeProposer.propose_tree` itself with the hidden state of each
request's last accepted tree node.

Per request and step: K heads -> per-head top-k (over the draft vocabulary,
mapped to full ids) -> tree nodes in BFS order (``MedusaTree.node_tokens``).
The node list is the request's speculative tokens; the scheduler may keep
only a BFS prefix of it, which is still a valid tree. The tree also shrinks
with the batch (``nodes_by_batch``): each step drafts the first
``nodes_for_batch(table, batch size)`` BFS nodes, since verification turns
compute-bound as the batch grows.

Two per-request drafting policies ride on the same static tree:

- ``tree="beam:W[:K]"`` (:mod:`medusa_vllm.core.beam`): the tree is W disjoint
  chains of depth K; chain ``w`` holds the ``w``-th best path of a width-W beam
  search over the heads' log-probabilities instead of per-head top-k ranks.
- ``adaptive`` (:mod:`medusa_vllm.engine.adaptive`): each request drafts only
  the BFS levels its recent acceptance pays for (at most what the batch size
  allows); the runner reports each verified step (:meth:`MedusaTreeProposer.observe`)
  and each finished request (:meth:`MedusaTreeProposer.forget`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medusa_vllm.core.beam import beam_node_tokens, beam_search
from medusa_vllm.core.hydra import HydraHeads
from medusa_vllm.core.online_fit import OnlineNodeFit
from medusa_vllm.core.tree import (
    MedusaTree,
    lookup_candidates,
    nodes_for_batch,
    under_lookup_chain,
)
from medusa_vllm.engine.adaptive import (
    DEFAULT_NODE_COST,
    AdaptiveDepth,
    linear_cost,
    nodes_at_depth,
)
from medusa_vllm.engine.options import MedusaConfigError, MedusaTreeConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.plugins.medusa_vllm")


def _engine_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer.cpu_linear(x, layer.weight, layer.bias)


def use_engine_gemm(module: torch.nn.Module) -> int:
    """On CPU, run ``module``'s ``nn.Linear`` layers through the GEMM vLLM picks
    for its own CPU linear layers (oneDNN with cached primitives on x86: at
    decode sizes ~1.5x faster than ``F.linear``). Weights stay in place, so
    the module's state dict is unchanged. No-op elsewhere (GPU: plain torch).
    Returns the number of layers switched."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[0].weight.device.type != "cpu":
        return 0
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:
        return 0
    for layer in linears:
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        layer.forward = functools.partial(_engine_linear, layer)
    return len(linears)


class MedusaTreeProposer:
    """Drafts a static Medusa tree per request from the heads' top-k.

    ``config`` (the options the plugin stored in ``additional_config``) and
    ``tree`` (built once from it) are the engine's: the tree runner reads them
    from its drafter instead of building its own.
    """

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.config: MedusaTreeConfig = MedusaTreeConfig.from_vllm_config(vllm_config)
        self.tree: MedusaTree = self.config.engine_tree()
        # prompt lookup (ngram_nodes): a request whose lookup found a continuation
        # puts it on the top-1 chain, the heads' candidates one rank down beside it
        self.lookup_depth: int = self.config.lookup_depth()
        self._under_chain = torch.tensor(under_lookup_chain(self.tree.medusa_choices),
                                         dtype=torch.bool)
        # BFS prefix that holds the top-1 chain down to depth d (index d)
        self._chain_prefix = [0] + [self.tree.medusa_choices.index((0,) * d) + 1
                                    for d in range(1, self.lookup_depth + 1)]
        # tree="auto" with ngram_nodes: the start-up fit's table for requests with a
        # lookup continuation (and online_fit's refit of it); requests without one use
        # nodes_by_batch / online_fit
        self.lookup_nodes_by_batch: dict[int, int] | None = None
        self.lookup_fit: OnlineNodeFit | None = None
        self._looked_up: dict[str, bool] = {}  # per request: did its last draft carry a lookup
        self.nodes_by_batch: dict[int, int] | None = self.config.load_nodes_by_batch(self.tree)
        self.heads = None
        self.dtype = vllm_config.model_config.dtype
        self._prefix_trees: dict[int, MedusaTree] = {}
        # beam drafts: node i holds chain path[0]'s token at depth len(path)
        self.beam_width: int | None = self.config.beam[0] if self.config.beam else None
        self._chain = torch.tensor([p[0] for p in self.tree.medusa_choices], dtype=torch.long)
        self._depth = self.tree.position_offsets[1:] - 1
        # tree="auto": the start-up fit (medusa_vllm.engine.cost_curve) attaches the
        # online refit of nodes_by_batch (medusa_vllm.core.online_fit)
        self.online_fit: OnlineNodeFit | None = None
        self.adaptive: AdaptiveDepth | None = None
        if self.config.adaptive:
            self.adaptive = AdaptiveDepth(nodes_at_depth(self.tree.position_offsets.tolist()),
                                          adaptive_step_cost(self.config, self.tree))

    def reload_config(self) -> None:
        """Rebuild everything derived from the options, keeping the loaded heads: the
        start-up tree fit (:mod:`medusa_vllm.engine.cost_curve`) replaced them in
        ``vllm_config.additional_config``. Before the first draft only."""
        heads = self.heads
        self.__init__(self.vllm_config)  # type: ignore[misc]
        self.heads = heads

    # vLLM's CPUModelRunner.load_model calls this with the loaded backbone.
    def load_model(self, target_model: torch.nn.Module) -> None:
        from medusa_vllm.checkpoints import load_heads

        lm_weight = None
        lm_head = getattr(target_model, "lm_head", None)
        if lm_head is not None and getattr(lm_head, "weight", None) is not None:
            lm_weight = lm_head.weight
        # the tree's depth was checked against the heads' config.json (load_tree)
        heads = load_heads(self.config.heads, lm_head_weight=lm_weight)
        param = next(target_model.parameters())
        self.heads = heads.to(device=param.device, dtype=self.dtype).eval()
        use_engine_gemm(self.heads)
        if self.beam_width is not None and isinstance(self.heads, HydraHeads):
            raise MedusaConfigError(
                f"tree: {self.config.tree!r} (beam drafts) needs Medusa heads, whose depths are "
                f"independent; {self.config.heads} holds Hydra heads: use a static tree"
            )

    @torch.inference_mode()
    def propose_tree(
        self,
        hidden_states: torch.Tensor,
        eligible: list[bool],
        ngram_drafts: np.ndarray | None = None,
        root_tokens: list[int] | None = None,
        req_ids: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """``hidden_states [B, H]`` at each request's last accepted position ->
        one BFS list of tree tokens per eligible request: the first
        ``nodes_for_batch(nodes_by_batch, len(eligible))`` nodes (with
        ``adaptive``, at most that many: as many as the request's policy says).

        ``ngram_drafts [B, ngram_nodes]`` (``-1`` = none) fill the prompt-lookup
        branch; where a request has none, the branch repeats the heads' top-1.
        ``root_tokens [B]``: the token each request just sampled (the tree's root),
        which Hydra heads read (:mod:`medusa_vllm.engine.hydra_draft`).
        ``req_ids [B]``: the requests' ids (the adaptive policy's state is per request).
        """
        assert self.heads is not None, "load_model() was not called"
        out: list[list[int]] = [[] for _ in eligible]
        rows = [i for i, ok in enumerate(eligible) if ok]
        if not rows:
            return out
        # per row: how deep its lookup continuation reaches (0: none)
        reach = np.zeros(len(eligible), dtype=np.int64)
        if self.lookup_depth and ngram_drafts is not None:
            found = np.asarray(ngram_drafts)[:, : self.lookup_depth] >= 0
            reach = np.cumprod(found, axis=1).sum(axis=1)
        looked = [bool(reach[i]) for i in rows]
        sizes = self._sizes(len(eligible), looked, reach[rows])
        if self.adaptive is not None and req_ids is not None:  # per request, at most n nodes
            sizes = [min(m, self.adaptive.nodes(req_ids[i])) for i, m in zip(rows, sizes)]
        if req_ids is not None and self.lookup_depth:
            self._looked_up.update((req_ids[i], lk and m > 0) for i, lk, m in zip(rows, looked, sizes))
        keep = [j for j, m in enumerate(sizes) if m]
        rows, sizes = [rows[j] for j in keep], [sizes[j] for j in keep]
        if not rows:
            return out
        n = max(sizes)
        tree = self._prefix_tree(n)
        h = hidden_states[rows].to(self.dtype)
        if isinstance(self.heads, HydraHeads):  # Hydra: each depth reads its parents' paths
            from medusa_vllm.engine.hydra_draft import hydra_nodes

            nodes = hydra_nodes(self.heads, h, root_tokens, rows, tree, tree.topk,
                                self._lookup_rows(tree, rows, reach, ngram_drafts))
        elif self.beam_width is not None:  # chains of the beam's best paths
            nodes = self._beam_nodes(h, tree)
        else:
            # only the heads the (truncated) tree reaches: a depth-2 tree runs 2 of K heads
            lookup = self.lookup_depth > 0 and bool(reach[rows].any())
            topk = self.heads.topk(h, tree.topk + int(lookup), tree.max_depth)  # [b, D, k(+1)]
            nodes = tree.node_tokens(topk[..., : tree.topk],
                                     torch.zeros(len(rows), dtype=torch.long))[:, 1:]
            if lookup:
                nodes = self._lookup_nodes(tree, topk, nodes, rows, reach, ngram_drafts)
        for i, m, toks in zip(rows, sizes, nodes.tolist()):
            out[i] = toks[:m]
        return out

    def _sizes(self, batch_size: int, looked: list[bool], reach: np.ndarray) -> list[int]:
        """BFS nodes each drafting row drafts: rows with a lookup continuation
        (``looked``) by the lookup table, the others by ``nodes_by_batch`` (with
        ``tree: auto``, their online refits and probes)."""
        plain = [j for j, lk in enumerate(looked) if not lk]
        hits = [j for j, lk in enumerate(looked) if lk]
        sizes = [0] * len(looked)
        # the heads' table: online_fit's refit of nodes_by_batch where there is one
        table = self.online_fit.table if self.online_fit is not None else self.nodes_by_batch
        n = nodes_for_batch(table, batch_size, self.tree.num_nodes)
        if self.online_fit is not None:  # the refitted table, and its probes
            for j, m in zip(plain, self.online_fit.sizes(batch_size, len(plain)) if plain else []):
                sizes[j] = m
        else:
            for j in plain:
                sizes[j] = n
        if not hits:
            return sizes
        # a fitted lookup table drafts only at batch sizes where the heads' table drafts:
        # the curve prices steps where every request drafts alike, and where the heads'
        # nodes were priced out (batch 16, 64) steps with a few lookup drafts ran slower
        # than plain decoding (session 20: c=16 0.78x, c=64 0.82x vanilla once the refit
        # had turned them on)
        heads_draft = n > 0
        if self.lookup_fit is not None:
            for j, m in zip(hits, self.lookup_fit.sizes(batch_size, len(hits))):
                sizes[j] = m if heads_draft else 0
        elif self.lookup_nodes_by_batch is not None:
            m = nodes_for_batch(self.lookup_nodes_by_batch, batch_size, self.tree.num_nodes)
            for j in hits:
                sizes[j] = m if heads_draft else 0
        else:  # as many nodes as the others, and at least the chain its continuation fills
            for j in hits:
                sizes[j] = max(n, self._chain_prefix[int(reach[j])]) if n else 0
        return sizes

    def _lookup_rows(self, tree: MedusaTree, rows: list[int], reach: np.ndarray,
                     ngram_drafts: np.ndarray | None) -> torch.Tensor | None:
        """``[len(rows), D]`` each drafted row's lookup continuation down to the depth
        it reaches (``-1`` past it, and for rows without one); ``None`` if no row has one."""
        if ngram_drafts is None or not self.lookup_depth or not reach[rows].any():
            return None
        d = tree.max_depth
        found = np.full((len(rows), d), -1, dtype=np.int64)
        width = min(d, self.lookup_depth)
        found[:, :width] = np.asarray(ngram_drafts)[rows, :width]
        found[np.arange(d)[None, :] >= reach[rows][:, None]] = -1
        return torch.from_numpy(found)

    def _lookup_nodes(self, tree: MedusaTree, topk: torch.Tensor, nodes: torch.Tensor,
                      rows: list[int], reach: np.ndarray, ngram_drafts: np.ndarray | None
                      ) -> torch.Tensor:
        """``nodes [b, n]`` with, for each row whose lookup reaches depth ``d``, the
        nodes under the top-1 chain down to depth ``d`` taken from the merged
        candidates (:func:`~medusa_vllm.core.tree.lookup_candidates`): the chain holds
        the lookup continuation, its siblings the heads' candidates one rank down."""
        lookup = self._lookup_rows(tree, rows, reach, ngram_drafts)
        assert lookup is not None
        # past a row's reach its lookup is -1 and the merged candidates are the heads'
        # own, so only the nodes under the chain need choosing
        merged = tree.node_tokens(lookup_candidates(topk, lookup.to(topk.device)),
                                  torch.zeros(len(rows), dtype=torch.long))[:, 1:]
        under = self._under_chain[: tree.num_nodes].to(topk.device)
        return torch.where(under[None, :], merged, nodes)

    def _beam_nodes(self, h: torch.Tensor, tree: MedusaTree) -> torch.Tensor:
        """``[b, n]`` node tokens of the beam tree's BFS prefix ``tree``: chain ``w`` =
        the ``w``-th best path of a width-W beam over the heads ``tree`` reaches
        (each head's top-W tokens suffice: heads are independent of the path)."""
        assert self.heads is not None and self.beam_width is not None
        width = self.beam_width
        logp = torch.log_softmax(self.heads(h, tree.max_depth).float(), dim=-1)  # [D, b, dv]
        top = torch.topk(logp, min(width, logp.shape[-1]), dim=-1)
        ids = self.heads.map_to_full(top.indices).movedim(0, 1)  # [b, D, W]
        paths = beam_search(top.values.movedim(0, 1), width, token_ids=ids).tokens  # [b, W', D]
        if paths.shape[1] < width:  # fewer distinct paths than chains: repeat the best
            pad = paths[:, :1].expand(-1, width - paths.shape[1], -1)
            paths = torch.cat([paths, pad], dim=1)
        n = tree.num_nodes
        return beam_node_tokens(paths, self._chain[:n], self._depth[:n])

    # ------------------------------------------------------------ adaptive
    def observe(self, req_ids: Sequence[str], num_draft_tokens: Sequence[int],
                num_accepted: Sequence[int]) -> None:
        """A verified step (adaptive policy): per request, the nodes it drafted and
        the draft tokens its accepted path holds."""
        if self.adaptive is None:
            return
        for req_id, n, a in zip(req_ids, num_draft_tokens, num_accepted):
            if n:
                self.adaptive.observe(req_id, self.adaptive.depth_of(int(n)), int(a))

    def observe_nodes(self, num_draft_tokens: Sequence[int], accepted_nodes: torch.Tensor,
                      req_ids: Sequence[str] | None = None) -> None:
        """A verified step (online refit of ``nodes_by_batch``): the nodes each request
        (``req_ids``) drafted and the node path it accepted (``[B, D+1]``, ``-1``
        padded). Requests whose draft carried a prompt-lookup continuation count
        toward the lookup table's refit, the others toward ``nodes_by_batch``'s."""
        fit = self.online_fit
        if fit is None:
            return
        nd = np.asarray(num_draft_tokens, dtype=np.int64)
        acc = accepted_nodes.cpu().numpy()
        looked = np.zeros(nd.size, dtype=bool)
        if self.lookup_fit is not None and req_ids is not None:
            looked = np.array([self._looked_up.get(r, False) for r in req_ids[: nd.size]],
                              dtype=bool)
        for part, mine in ((fit, ~looked), (self.lookup_fit, looked)):
            if part is None or not mine.any():
                continue
            before = part.table
            part.observe(np.where(mine, nd, 0), acc)
            if part.table != before:
                which = ("requests with a lookup continuation" if part is self.lookup_fit
                         else "requests without one" if self.lookup_fit is not None
                         else "all requests")
                logger.info("medusa_tree: nodes_by_batch (%s) refitted from the acceptance "
                            "this engine observed: %s", which, part.describe())

    def forget(self, req_id: str) -> None:
        """``req_id`` left the engine: drop its per-request state."""
        if self.adaptive is not None:
            self.adaptive.drop(req_id)
        self._looked_up.pop(req_id, None)

    def _prefix_tree(self, n: int) -> MedusaTree:
        """The tree's first ``n`` BFS nodes (cached per size)."""
        if n not in self._prefix_trees:
            self._prefix_trees[n] = self.tree if n == self.tree.num_nodes else self.tree.truncate(n)
        return self._prefix_trees[n]

    # The custom_class interface vLLM checks for; the tree runner never calls it.
    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def adaptive_step_cost(config: MedusaTreeConfig, tree: MedusaTree) -> Callable[[int], float]:
    """The adaptive policy's ``step_cost(nodes)`` (relative step time, plain step = 1):
    ``1 + adaptive_node_cost * nodes`` when set; else the batch-1 cost curve
    ``medusa-vllm calibrate`` saved beside the heads (``cost_curves_relative``,
    chains priced on ``chain_cost_curves_relative``); else
    :data:`~medusa_vllm.engine.adaptive.DEFAULT_NODE_COST` per node."""
    if config.adaptive_node_cost is not None:
        return linear_cost(config.adaptive_node_cost)
    from medusa_vllm.checkpoints import TREE_FILE
    from medusa_vllm.core.tree_fit import prefix_cost

    saved = Path(config.heads) / TREE_FILE
    try:
        data = json.loads(saved.read_text()) if saved.is_file() else {}
        curve = {int(k): float(v) for k, v in data.get("cost_curves_relative", {})["1"].items()}
        chains = {int(k): float(v)
                  for k, v in data.get("chain_cost_curves_relative", {}).get("1", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return linear_cost(DEFAULT_NODE_COST)
    if not curve:
        return linear_cost(DEFAULT_NODE_COST)
    return lambda n: prefix_cost(tree, n, curve, chains) if n else 1.0
