"""MedusaTreeVerifier on a step in which no request drafted (``tree: auto`` drafts
nothing at large batch sizes): the output must be what vanilla vLLM's sampler
produces for the same logits, seeds and logprob request, one column wide, as
vLLM's own rejection sampler returns when nothing was drafted."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.sampler import Sampler

from medusa_vllm.core.acceptance import AcceptanceParams
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine.verifier import MedusaTreeVerifier

B, V = 5, 97


def _metadata(temperature: list[float], seed: int | None, logprobs: int | None) -> SamplingMetadata:
    t = torch.tensor(temperature)
    greedy = all(x == 0.0 for x in temperature)
    gens = {}
    if seed is not None:
        for i in range(len(temperature)):
            gens[i] = torch.Generator().manual_seed(seed + i)
    return SamplingMetadata(
        temperature=None if greedy else t, all_greedy=greedy,
        all_random=all(x > 0 for x in temperature), top_p=None, top_k=None,
        generators=gens, max_num_logprobs=logprobs, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(len(t)),
        presence_penalties=torch.zeros(len(t)), repetition_penalties=torch.ones(len(t)),
        output_token_ids=[[] for _ in temperature], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors(), spec_token_ids=[[] for _ in t])


@pytest.mark.parametrize("temperature", [[0.0] * B, [0.8, 1.0, 0.5, 1.3, 0.9], [0.0, 0.7, 0.0, 1.0, 0.6]],
                         ids=["greedy", "random", "mixed"])
@pytest.mark.parametrize("logprobs", [None, 0, 3])
def test_a_step_without_drafts_is_vllms_own_sampling(temperature, logprobs):
    torch.manual_seed(1)
    logits = torch.randn(B, V) * 3
    tree = MedusaTree([(0,), (1,), (0, 0)])
    verifier = MedusaTreeVerifier(Sampler(), tree)
    # the runner builds no per-request acceptance rules for a step without drafts
    got = verifier([0] * B, torch.empty(0, dtype=torch.long), logits.clone(),
                   _metadata(temperature, 7, logprobs), None)
    # vanilla: vLLM's sampler on the same rows with the same seeds
    want = Sampler()(logits.clone(), _metadata(temperature, 7, logprobs))
    assert got.sampled_token_ids.shape == (B, 1)
    assert torch.equal(got.sampled_token_ids, want.sampled_token_ids.to(torch.int32))
    assert got.num_accepted.tolist() == [0] * B and got.last_node.tolist() == [0] * B
    if logprobs is None:
        assert got.logprobs_tensors is None
    else:
        for a, b in zip(got.logprobs_tensors, want.logprobs_tensors):
            torch.testing.assert_close(a, b)


def test_a_step_with_one_draft_takes_the_tree_path():
    # one request drafted: the output is the tree's width (the general path), and the
    # drafting request accepts its node where the target's argmax agrees
    torch.manual_seed(2)
    tree = MedusaTree([(0,), (1,), (0, 0)])
    logits = torch.randn(B + 1, V)  # request 0: root + 1 node; the others: one row each
    draft = int(logits[0].argmax())
    verifier = MedusaTreeVerifier(Sampler(), tree)
    params = AcceptanceParams.make("greedy", torch.zeros(B), batch_size=B)
    got = verifier([1] + [0] * (B - 1), torch.tensor([draft]), logits.clone(),
                   _metadata([0.0] * B, None, None), params)
    assert got.sampled_token_ids.shape == (B, tree.max_depth + 1)
    assert got.num_accepted.tolist() == [1] + [0] * (B - 1)
    assert got.sampled_token_ids[0, :2].tolist() == [draft, int(logits[1].argmax())]
    assert got.sampled_token_ids[1:, 0].tolist() == logits[2:].argmax(-1).tolist()


def test_a_step_with_drafts_needs_the_acceptance_rules():
    verifier = MedusaTreeVerifier(Sampler(), MedusaTree([(0,), (1,), (0, 0)]))
    with pytest.raises(ValueError, match="AcceptanceParams"):
        verifier([1] + [0] * (B - 1), torch.tensor([3]), torch.randn(B + 1, V),
                 _metadata([0.0] * B, None, None), None)
