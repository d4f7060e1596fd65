"""Thin glue between vLLM 0.32's CPU model runner and the pure Medusa modules.

vLLM already schedules ``len(spec_token_ids)`` extra tokens per request,
allocates KV slots for them and rolls ``num_computed_tokens`` back by the
rejected count. A Medusa tree rides on that as a flat list of N speculative
tokens in BFS order. This subclass changes exactly four things:

1. ``_prepare_inputs``: tree nodes get position ``prefix_len + depth`` (their
   KV slots stay linear) and the attention backend is told which query rows
   form a tree (:mod:`medusa_vllm.attention`).
2. ``_sample``: the chain ``RejectionSampler`` is replaced by
   :class:`medusa_vllm.verifier.MedusaTreeVerifier`.
3. after verification, the accepted nodes' KV is moved to the contiguous
   slots the next step expects (:mod:`medusa_vllm.kv_compaction`).
4. ``propose_draft_token_ids``: the heads read the hidden state of each
   request's last accepted node (:class:`medusa_vllm.proposer.MedusaTreeProposer`).

Device-agnostic except for the base class: a GPU runner would subclass
``GPUModelRunner`` with the same overrides (see ``worker.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from medusa_vllm.acceptance import (
    DEFAULT_POSTERIOR_ALPHA,
    DEFAULT_POSTERIOR_THRESHOLD,
    AcceptanceParams,
    AcceptanceRule,
)
from medusa_vllm.attention import TreeBatch, tree_batch_context
from medusa_vllm.config import request_overrides
from medusa_vllm.kv_compaction import compact_kv
from medusa_vllm.proposer import MedusaTreeProposer, medusa_options
from medusa_vllm.tree import MedusaTree
from medusa_vllm.verifier import MedusaTreeVerifier


def request_params_from(sampling_params, defaults: dict) -> tuple[str, float, float]:
    """(acceptance rule, ε, δ) for one request: per-request ``extra_args``
    overrides on top of the engine-wide Medusa options."""
    rule = defaults.get("acceptance", "rejection")
    eps = float(defaults.get("posterior_threshold", DEFAULT_POSTERIOR_THRESHOLD))
    alpha = float(defaults.get("posterior_alpha", DEFAULT_POSTERIOR_ALPHA))
    extra = getattr(sampling_params, "extra_args", None) or {}
    if extra:
        o = request_overrides(extra)
        rule = o.get("acceptance", rule)
        eps = float(o.get("posterior_threshold", eps))
        alpha = float(o.get("posterior_alpha", alpha))
    return rule, eps, alpha


def draftable(sampling_params, num_output_tokens: int) -> bool:
    """Whether a request may carry tree drafts.

    Features whose effect on the target distribution depends on the tokens
    before each tree node (penalties, bad words, min_tokens, structured
    output, per-request logits processors, logit bias, allowed ids, min_p)
    are verified by vLLM's own sampler one token at a time: such requests
    get no drafts (plain decoding), never a silently different answer.
    """
    sp = sampling_params
    if sp is None:
        return False
    if (
        getattr(sp, "presence_penalty", 0.0)
        or getattr(sp, "frequency_penalty", 0.0)
        or getattr(sp, "repetition_penalty", 1.0) != 1.0
        or getattr(sp, "min_p", 0.0)
        or getattr(sp, "logit_bias", None)
        or getattr(sp, "allowed_token_ids", None)
        or getattr(sp, "bad_words", None)
        or getattr(sp, "structured_outputs", None) is not None
        or getattr(sp, "logits_processors", None)
    ):
        return False
    return num_output_tokens >= getattr(sp, "min_tokens", 0)


class MedusaTreeCPUModelRunner(CPUModelRunner):
    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.medusa_options = medusa_options(vllm_config)
        self.medusa_tree = MedusaTree(self.medusa_options["medusa_choices"])
        if self.num_spec_tokens != self.medusa_tree.num_nodes:
            raise ValueError(
                f"medusa_tree: num_speculative_tokens={self.num_spec_tokens} but the tree has "
                f"{self.medusa_tree.num_nodes} nodes; let the plugin set it (method='medusa_tree')"
            )
        self.medusa_verifier = MedusaTreeVerifier(self.sampler, self.medusa_tree)
        self._node_depth = self.medusa_tree.position_offsets.numpy()
        self._last_node: torch.Tensor | None = None
        self._tree_batch: TreeBatch | None = None
        self._greedy_params: dict[int, AcceptanceParams] = {}

    # ------------------------------------------------------------ 1. inputs
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
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
        rows = np.concatenate([qsl[r] + np.arange(c) for r, c in zip(reqs, counts)])
        depth = np.concatenate([self._node_depth[:c] for c in counts])
        base = np.repeat(computed[reqs], counts)
        self.positions[torch.from_numpy(rows)] = torch.from_numpy(base + depth).to(
            self.positions.dtype
        )
        self._tree_batch = TreeBatch(
            query_start=torch.from_numpy(qsl[reqs]),
            num_tokens=torch.from_numpy(counts),
            prefix_lens=torch.from_numpy(computed[reqs]),
            tree_mask=self.medusa_tree.tree_mask,
            req_indices=torch.from_numpy(reqs),
        )
        return out

    def _build_attention_metadata(self, *args, **kwargs):
        # The tree batch is visible to the attention metadata builder for this
        # one build only, so no dummy/profile run can pick up a stale one.
        with tree_batch_context(self._tree_batch):
            return super()._build_attention_metadata(*args, **kwargs)

    # ----------------------------------------------------- 2+3. verification
    def _acceptance_params(self, sampling_metadata) -> AcceptanceParams:
        b = self.input_batch.num_reqs
        if sampling_metadata.all_greedy:
            # greedy requests always verify by exact greedy match, whatever
            # their extra_args say: one cached parameter set per batch size
            params = self._greedy_params.get(b)
            if params is None:
                params = self._greedy_params[b] = AcceptanceParams.make(
                    "greedy", torch.zeros(b), batch_size=b)
            return params
        rules, eps, alpha = [], [], []
        for req_id in self.input_batch.req_ids:
            r, e, a = request_params_from(self.requests[req_id].sampling_params, self.medusa_options)
            rules.append(int(AcceptanceRule.parse(r)))
            eps.append(e)
            alpha.append(a)
        temp = sampling_metadata.temperature
        if temp is None:
            temp = torch.zeros(b)
        temp = temp[:b].to(torch.float32).clamp(min=0)
        return AcceptanceParams.make(rules, temp, eps, alpha, batch_size=b)

    def _sample(self, logits, spec_decode_metadata) -> SamplerOutput:
        if spec_decode_metadata is None:
            return super()._sample(logits, spec_decode_metadata)
        sm = self.input_batch.sampling_metadata
        res = self.medusa_verifier(
            spec_decode_metadata.num_draft_tokens,
            spec_decode_metadata.draft_token_ids,
            logits,
            sm,
            self._acceptance_params(sm),
        )
        self._last_node = res.last_node
        self._compact_kv(spec_decode_metadata.num_draft_tokens, res.accepted_nodes)
        return SamplerOutput(
            sampled_token_ids=res.sampled_token_ids,
            logprobs_tensors=res.logprobs_tensors,
        )

    def _compact_kv(self, num_draft_tokens: list[int], accepted_nodes: torch.Tensor) -> None:
        """Move accepted nodes' KV from slot(root + node) to slot(root + depth)."""
        num_reqs = len(num_draft_tokens)
        qsl = torch.from_numpy(self.query_start_loc.np[: num_reqs + 1].astype(np.int64))
        nodes = accepted_nodes.cpu()
        depth = torch.arange(nodes.shape[1]).expand_as(nodes)
        move = (nodes > 0) & (nodes != depth)
        if not bool(move.any()):
            return
        req = move.nonzero()[:, 0]
        src_tok = qsl[req] + nodes[move]
        dst_tok = qsl[req] + depth[move]
        slot_mapping = self.input_batch.block_table.block_tables[0].slot_mapping.cpu
        compact_kv(self, slot_mapping[src_tok].long(), slot_mapping[dst_tok].long())

    # ------------------------------------------------------------ 4. drafts
    def propose_draft_token_ids(
        self,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        spec_decode_metadata,
        common_attn_metadata,
        slot_mappings,
    ):
        assert isinstance(self.drafter, MedusaTreeProposer)
        assert isinstance(sampled_token_ids, list)
        b = len(sampled_token_ids)
        if spec_decode_metadata is None:
            rows = torch.arange(b)
        else:
            counts = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.long) + 1
            starts = torch.cumsum(counts, 0) - counts
            last = self._last_node.cpu() if self._last_node is not None else torch.zeros(b, dtype=torch.long)
            rows = starts + last
        eligible = []
        for i, req_id in enumerate(self.input_batch.req_ids[:b]):
            state = self.requests[req_id]
            eligible.append(
                bool(sampled_token_ids[i])
                and draftable(state.sampling_params, len(state.output_token_ids))
            )
        hidden = sample_hidden_states[rows.to(sample_hidden_states.device)]
        return self.drafter.propose_tree(hidden, eligible)
