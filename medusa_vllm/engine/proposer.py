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
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

from medusa_vllm.core.hydra import HydraHeads
from medusa_vllm.core.tree import MedusaTree, nodes_for_batch
from medusa_vllm.engine.options import MedusaTreeConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig


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
        # rank of the prompt-lookup branch's nodes (one past the heads' top-k), if any
        self.ngram_rank: int | None = (
            self.config.load_tree().topk if self.config.ngram_nodes else None
        )
        self.nodes_by_batch: dict[int, int] | None = self.config.load_nodes_by_batch(self.tree)
        self.heads = None
        self.dtype = vllm_config.model_config.dtype
        self._prefix_trees: dict[int, MedusaTree] = {}

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

    @torch.inference_mode()
    def propose_tree(
        self,
        hidden_states: torch.Tensor,
        eligible: list[bool],
        ngram_drafts: np.ndarray | None = None,
        root_tokens: list[int] | None = None,
    ) -> list[list[int]]:
        """``hidden_states [B, H]`` at each request's last accepted position ->
        one BFS list of tree tokens per eligible request: the first
        ``nodes_for_batch(nodes_by_batch, len(eligible))`` nodes.

        ``ngram_drafts [B, ngram_nodes]`` (``-1`` = none) fill the prompt-lookup
        branch; where a request has none, the branch repeats the heads' top-1.
        ``root_tokens [B]``: the token each request just sampled (the tree's root),
        which Hydra heads read (:mod:`medusa_vllm.engine.hydra_draft`).
        """
        assert self.heads is not None, "load_model() was not called"
        out: list[list[int]] = [[] for _ in eligible]
        rows = [i for i, ok in enumerate(eligible) if ok]
        n = nodes_for_batch(self.nodes_by_batch, len(eligible), self.tree.num_nodes)
        if not rows or n == 0:
            return out
        tree = self._prefix_tree(n)
        h = hidden_states[rows].to(self.dtype)
        branch = self.ngram_rank is not None and tree.topk > self.ngram_rank
        k = self.ngram_rank if branch else tree.topk
        if isinstance(self.heads, HydraHeads):  # Hydra: each depth reads its parents' paths
            from medusa_vllm.engine.hydra_draft import hydra_nodes

            nodes = hydra_nodes(self.heads, h, root_tokens, rows, tree, k,
                                self.ngram_rank if branch else None, ngram_drafts)
            for i, toks in zip(rows, nodes.tolist()):
                out[i] = toks
            return out
        # only the heads the (truncated) tree reaches: a depth-2 tree runs 2 of K heads
        topk = self.heads.topk(h, k, tree.max_depth)  # [b, depth, k] full-vocab ids
        if branch:  # the branch's rank is column k: prompt lookup, else the heads' top-1
            fill = topk[:, :, 0].clone()
            if ngram_drafts is not None:
                found = torch.from_numpy(ngram_drafts[rows, : tree.max_depth]).to(fill.device)
                d = found.shape[1]
                fill[:, :d] = torch.where(found >= 0, found.to(fill.dtype), fill[:, :d])
            topk = torch.cat([topk, fill.unsqueeze(-1)], dim=-1)
        nodes = tree.node_tokens(topk, torch.zeros(len(rows), dtype=torch.long))[:, 1:]
        for i, toks in zip(rows, nodes.tolist()):
            out[i] = toks
        return out

    def _prefix_tree(self, n: int) -> MedusaTree:
        """The tree's first ``n`` BFS nodes (cached per size)."""
        if n not in self._prefix_trees:
            self._prefix_trees[n] = self.tree if n == self.tree.num_nodes else self.tree.truncate(n)
        return self._prefix_trees[n]

    # The custom_class interface vLLM checks for; the tree runner never calls it.
    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]
