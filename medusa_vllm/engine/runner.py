"""MedusaTreeRunnerMixin: the four overrides that make vLLM 0.32's model runner verify Medusa trees.

vLLM already schedules ``len(spec_token_ids)`` extra tokens per request,
allocates KV slots for them and rolls ``num_computed_tokens`` back by the
rejected count. A Medusa tree rides on that as a flat list of N speculative
tokens in BFS order. The mixin changes exactly four things:

1. ``_prepare_inputs`` (+ ``_build_attention_metadata``): tree nodes get
   position ``prefix_len + depth`` (their KV slots stay linear) and the
   attention backend is told which query rows form a tree
   (:class:`medusa_vllm.engine.tree_plan.TreeBatch`, scoped to one metadata build).
2. ``_sample``: the chain ``RejectionSampler`` is replaced by
   :class:`medusa_vllm.engine.verifier.MedusaTreeVerifier`; per-request
   acceptance options come from :mod:`medusa_vllm.engine.request`.
3. after verification, the accepted nodes' KV is moved to the contiguous
   slots the next step expects: :func:`medusa_vllm.engine.tree_plan.compaction_slots`
   picks the slots, the device hook :meth:`MedusaTreeRunnerMixin._copy_kv_slots` copies.
4. ``propose_draft_token_ids``: the heads read the hidden state of each
   request's last accepted node (:class:`medusa_vllm.engine.proposer.MedusaTreeProposer`);
   with ``ngram_nodes``, prompt lookup over the request's own tokens puts its
   continuation on the tree's top-1 chain (:mod:`medusa_vllm.engine.ngram`). With ``adaptive``, each
   verified step's accepted lengths go back to the proposer's per-request policy
   (:meth:`MedusaTreeProposer.observe`), and a request's state is dropped when vLLM
   removes the request (:meth:`MedusaTreeRunnerMixin._on_request_state_removed`).

Device-agnostic: positions and the slot mapping are read and written on the
runner's device tensors (``self.positions``, the block table's
``slot_mapping.gpu``); host-side index math uses only what vLLM itself keeps on
the host (``query_start_loc.np``, ``input_batch.num_computed_tokens_cpu``,
``SpecDecodeMetadata.num_draft_tokens``). A device runner is the mixin over
vLLM's runner plus :meth:`~MedusaTreeRunnerMixin._copy_kv_slots` and a
tree-attention backend: :class:`medusa_vllm.engine.cpu.runner.MedusaTreeCPUModelRunner`
on CPU; for a GPU see ``docs/gpu-backend.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput

from medusa_vllm.core.acceptance import AcceptanceParams, AcceptanceRule
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine.ngram import NgramLookup
from medusa_vllm.engine.options import MedusaTreeConfig
from medusa_vllm.engine.proposer import MedusaTreeProposer
from medusa_vllm.engine.request import draftable, request_overrides
from medusa_vllm.engine.tree_plan import (
    TreeBatch,
    compaction_slots,
    tree_batch_context,
    tree_rows,
)
from medusa_vllm.engine.verifier import MedusaTreeVerifier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner, PerLayerAttnMetadata

    _RunnerBase = GPUModelRunner  # the mixin's contract: vLLM's runner attributes
else:
    _RunnerBase = object

__all__ = ["MedusaTreeRunnerMixin"]


class MedusaTreeRunnerMixin(_RunnerBase):
    """The Medusa overrides over vLLM's ``GPUModelRunner`` (or a subclass of it).

    Use as the first base: ``class R(MedusaTreeRunnerMixin, CPUModelRunner)``;
    the subclass implements :meth:`_copy_kv_slots` for its KV cache.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        # vLLM builds the custom_class drafter in GPUModelRunner.__init__
        # (speculative config on the last PP rank): our proposer, which holds
        # the validated options and the one tree of this engine.
        drafter = getattr(self, "drafter", None)
        if not isinstance(drafter, MedusaTreeProposer):
            raise RuntimeError(
                f"medusa_tree: vLLM built no MedusaTreeProposer drafter (found "
                f"{type(drafter).__name__}); enable Medusa with "
                f"speculative_config={{'method': 'medusa_tree', 'model': HEADS_DIR}}"
            )
        self._adopt_drafter_tree()
        cfg = self.medusa_config
        depth = cfg.lookup_depth()
        self._ngram = (
            NgramLookup(cfg.ngram_min, cfg.ngram_max, depth, self.max_model_len,
                        self.scheduler_config.max_num_seqs)
            if depth else None
        )
        self._last_node: torch.Tensor | None = None
        self._tree_batch: TreeBatch | None = None
        self._greedy_params: dict[int, AcceptanceParams] = {}

    def _adopt_drafter_tree(self) -> None:
        """Take the drafter's options and tree, and build what depends on the tree."""
        drafter = cast(MedusaTreeProposer, self.drafter)
        self.medusa_config: MedusaTreeConfig = drafter.config
        self.medusa_tree: MedusaTree = drafter.tree
        # tree="auto": vLLM reserved num_speculative_tokens for the tree the engine fits
        # at start-up (medusa_vllm.engine.cost_curve), which may be smaller
        fit = self.medusa_config.fit_max_nodes is not None or self._fitted_at_startup
        nodes = self.medusa_tree.num_nodes
        if self.num_spec_tokens < nodes or (not fit and self.num_spec_tokens != nodes):
            raise ValueError(
                f"medusa_tree: num_speculative_tokens={self.num_spec_tokens} but the tree has "
                f"{self.medusa_tree.num_nodes} nodes; let the plugin set it (method='medusa_tree')"
            )
        self.medusa_verifier = MedusaTreeVerifier(self.sampler, self.medusa_tree)
        # node i of a request sits at batch row root + i with vLLM's linear
        # position root_pos + i; it needs root_pos + depth(i)
        depth = self.medusa_tree.position_offsets.numpy()
        self._position_shift = depth - np.arange(depth.size)

    _fitted_at_startup = False

    def reload_medusa_config(self) -> None:
        """Switch drafter and runner to the options now in ``vllm_config.additional_config``
        (the start-up tree fit, :mod:`medusa_vllm.engine.cost_curve`, wrote them): a tree
        of at most ``num_speculative_tokens`` nodes. Before the first step only."""
        cast(MedusaTreeProposer, self.drafter).reload_config()
        self._fitted_at_startup = True
        self._adopt_drafter_tree()

    # ------------------------------------------------------------ 1. inputs
    def _prepare_inputs(
        self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray
    ) -> tuple[torch.Tensor, SpecDecodeMetadata | None, int]:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        spec = out[1]
        self._last_node = None
        self._tree_batch = None
        if spec is None or not any(spec.num_draft_tokens):
            return out
        num_reqs = self.input_batch.num_reqs
        nd = np.asarray(spec.num_draft_tokens, dtype=np.int64)
        reqs = np.nonzero(nd > 0)[0]
        qsl = self.query_start_loc.np[: num_reqs + 1].astype(np.int64)
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        bad = reqs[num_scheduled_tokens[reqs] != nd[reqs] + 1]
        if bad.size:
            raise RuntimeError(
                f"medusa_tree: requests {bad.tolist()} carry drafts but are scheduled with "
                f"{num_scheduled_tokens[bad].tolist()} tokens (expected 1 + drafts)"
            )
        counts = nd[reqs] + 1
        rows, node = tree_rows(qsl[reqs], counts)
        # vLLM wrote linear positions on the device and built the slot mapping
        # from them: each node keeps its slot, its position moves to its depth
        device = self.positions.device
        self.positions.index_add_(
            0,
            torch.from_numpy(rows).to(device),
            torch.from_numpy(self._position_shift[node]).to(device, self.positions.dtype),
        )
        self._tree_batch = TreeBatch(
            query_start=torch.from_numpy(qsl[reqs]),
            num_tokens=torch.from_numpy(counts),
            prefix_lens=torch.from_numpy(computed[reqs]),
            tree_mask=self.medusa_tree.tree_mask,
            req_indices=torch.from_numpy(reqs),
        )
        return out

    def _build_attention_metadata(
        self, *args: Any, **kwargs: Any
    ) -> tuple[PerLayerAttnMetadata, CommonAttentionMetadata | None]:
        # The tree batch is visible to the attention metadata builder for this
        # one build only, so no dummy/profile run can pick up a stale one.
        with tree_batch_context(self._tree_batch):
            return super()._build_attention_metadata(*args, **kwargs)

    # ----------------------------------------------------- 2+3. verification
    def _acceptance_params(self, sampling_metadata: SamplingMetadata) -> AcceptanceParams:
        b = self.input_batch.num_reqs
        if sampling_metadata.all_greedy:
            # greedy requests always verify by exact greedy match, whatever
            # their extra_args say: one cached parameter set per batch size
            params = self._greedy_params.get(b)
            if params is None:
                params = self._greedy_params[b] = AcceptanceParams.make(
                    "greedy", torch.zeros(b, device=self.device), batch_size=b, device=self.device)
            return params
        rules, eps, alpha = [], [], []
        for req_id in self.input_batch.req_ids:
            sampling_params = self.requests[req_id].sampling_params
            options = request_overrides(getattr(sampling_params, "extra_args", None)).resolve(
                self.medusa_config
            )
            rules.append(int(AcceptanceRule.parse(options.acceptance)))
            eps.append(options.posterior_threshold)
            alpha.append(options.posterior_alpha)
        temp = sampling_metadata.temperature
        if temp is None:
            temp = torch.zeros(b, device=self.device)
        temp = temp[:b].to(torch.float32).clamp(min=0)
        return AcceptanceParams.make(rules, temp, eps, alpha, batch_size=b, device=self.device)

    def _sample(
        self, logits: torch.Tensor | None, spec_decode_metadata: SpecDecodeMetadata | None
    ) -> SamplerOutput:
        if spec_decode_metadata is None:
            return super()._sample(logits, spec_decode_metadata)
        assert logits is not None, "medusa_tree: tree verification needs the step's logits"
        sm = self.input_batch.sampling_metadata
        nd = spec_decode_metadata.num_draft_tokens
        drafted = any(nd)
        res = self.medusa_verifier(
            nd,
            spec_decode_metadata.draft_token_ids,
            logits,
            sm,
            self._acceptance_params(sm) if drafted else None,  # per request; only for trees
        )
        self._last_node = res.last_node
        if drafted:  # else no KV to move and no acceptance to observe
            self._compact_kv(nd, res.accepted_nodes)
            proposer = cast(MedusaTreeProposer, self.drafter)
            if proposer.adaptive is not None:  # per-request acceptance -> next drafting depth
                proposer.observe(self.input_batch.req_ids[: len(nd)], nd,
                                 res.num_accepted.tolist())
            if proposer.online_fit is not None:  # per-node acceptance -> nodes_by_batch
                proposer.observe_nodes(nd, res.accepted_nodes, self.input_batch.req_ids[: len(nd)])
        return SamplerOutput(
            sampled_token_ids=res.sampled_token_ids,
            logprobs_tensors=res.logprobs_tensors,
        )

    def _on_request_state_removed(self, req_id: str, req_state: Any) -> None:
        # vLLM's hook when a finished request leaves the runner: no state outlives it
        super()._on_request_state_removed(req_id, req_state)
        cast(MedusaTreeProposer, self.drafter).forget(req_id)

    def _compact_kv(self, num_draft_tokens: list[int], accepted_nodes: torch.Tensor) -> None:
        """Move accepted nodes' KV from slot(root + node) to slot(root + depth)."""
        num_reqs = len(num_draft_tokens)
        query_start = torch.from_numpy(self.query_start_loc.np[:num_reqs].astype(np.int64))
        # the step's slot of every batch row, on the device (vLLM computes it there)
        slot_mapping = self.input_batch.block_table.block_tables[0].slot_mapping.gpu
        src, dst = compaction_slots(accepted_nodes, query_start, slot_mapping)
        if src.numel():
            self._copy_kv_slots(src, dst)

    def _copy_kv_slots(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Device hook: copy the K/V of ``src_slots[i]`` to ``dst_slots[i]`` in every
        attention layer's cache (all sources read before any write)."""
        raise NotImplementedError(
            f"{type(self).__name__}: a Medusa tree runner must implement _copy_kv_slots "
            f"for its KV cache layout (see medusa_vllm.engine.cpu.runner)"
        )

    # ------------------------------------------------------------ 4. drafts
    def propose_draft_token_ids(
        self,
        scheduler_output: SchedulerOutput,
        sampled_token_ids: torch.Tensor | list[list[int]],
        sampling_metadata: SamplingMetadata,
        hidden_states: torch.Tensor,
        sample_hidden_states: torch.Tensor,
        aux_hidden_states: list[torch.Tensor] | None,
        spec_decode_metadata: SpecDecodeMetadata | None,
        common_attn_metadata: CommonAttentionMetadata,
        slot_mappings: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]] | None,
    ) -> list[list[int]]:
        assert isinstance(sampled_token_ids, list)
        b = len(sampled_token_ids)
        device = sample_hidden_states.device
        if spec_decode_metadata is None:
            rows = torch.arange(b, device=device)
        else:  # each request's logits rows start at its root; pick its last accepted node
            counts = np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64) + 1
            rows = torch.from_numpy(np.cumsum(counts) - counts).to(device)
            if self._last_node is not None:
                rows = rows + self._last_node.to(device)
        eligible = []
        for i, req_id in enumerate(self.input_batch.req_ids[:b]):
            state = self.requests[req_id]
            eligible.append(
                bool(sampled_token_ids[i])
                and draftable(state.sampling_params, len(state.output_token_ids))
            )
        proposer = cast(MedusaTreeProposer, self.drafter)
        ngram = None
        if self._ngram is not None:  # prompt lookup over each request's prompt + output
            ngram = self._ngram.drafts(
                self.input_batch.token_ids_cpu, self.input_batch.num_tokens_no_spec[:b],
                [i for i, ok in enumerate(eligible) if ok],
            )
        # the tree's root: the token each request just sampled (Hydra heads read it)
        roots = [t[-1] if t else -1 for t in sampled_token_ids]
        return proposer.propose_tree(sample_hidden_states[rows], eligible, ngram, roots,
                                     req_ids=self.input_batch.req_ids[:b])
