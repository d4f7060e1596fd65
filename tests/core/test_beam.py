"""Beam drafts (core/beam.py) against brute-force enumeration of all V**K paths."""

from __future__ import annotations

import itertools

import pytest
import torch

from medusa_vllm.core.beam import (
    beam_choices,
    beam_node_tokens,
    beam_search,
    parse_beam_spec,
)
from medusa_vllm.core.tree import MedusaTree


def _brute_force(logprobs: torch.Tensor, width: int) -> tuple[list[tuple[int, ...]], list[float]]:
    """All V**K paths of one row, scored by the sum of their log-probs, best first."""
    k, v = logprobs.shape
    scored = []
    for path in itertools.product(range(v), repeat=k):
        scored.append((sum(float(logprobs[d, t]) for d, t in enumerate(path)), path))
    scored.sort(key=lambda x: -x[0])
    top = scored[:width]
    return [p for _, p in top], [s for s, _ in top]


@pytest.mark.parametrize("k,v,width", [(1, 6, 3), (2, 5, 5), (3, 5, 2), (3, 4, 10), (4, 3, 7)])
def test_beam_is_the_w_best_joint_paths(k, v, width):
    torch.manual_seed(k * 100 + v * 10 + width)
    logprobs = torch.log_softmax(torch.randn(3, k, v, dtype=torch.float64) * 2, dim=-1)
    got = beam_search(logprobs, width)
    for b in range(3):
        paths, scores = _brute_force(logprobs[b], width)
        assert [tuple(p) for p in got.tokens[b].tolist()] == paths
        torch.testing.assert_close(got.scores[b], torch.tensor(scores, dtype=torch.float64))


def test_top_w_per_head_with_token_ids_equals_the_full_vocabulary_beam():
    """What the proposer does: each head's top-W tokens (ids + log-probs) suffice."""
    torch.manual_seed(5)
    k, v, width = 3, 50, 6
    logprobs = torch.log_softmax(torch.randn(4, k, v), dim=-1)
    full = beam_search(logprobs, width)
    top = torch.topk(logprobs, width, dim=-1)
    small = beam_search(top.values, width, token_ids=top.indices)
    assert torch.equal(small.tokens, full.tokens)
    torch.testing.assert_close(small.scores, full.scores)
    assert small.columns.max() < width  # columns index the top-W table


def test_ties_are_broken_lexicographically():
    flat = torch.zeros(1, 3, 4)  # every path scores 0
    got = beam_search(flat, 5)
    assert got.tokens[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert torch.equal(beam_search(flat, 5).tokens, got.tokens)  # and deterministic


def test_fewer_paths_than_the_width():
    got = beam_search(torch.log_softmax(torch.randn(2, 2, 2), -1), 10)
    assert got.tokens.shape == (2, 4, 2)  # only 2**2 paths exist
    assert sorted(map(tuple, got.tokens[0].tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        beam_search(torch.zeros(1, 2, 3), 0)
    with pytest.raises(ValueError, match=r"logprobs must be \[batch, depth, columns\]"):
        beam_search(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        beam_search(torch.zeros(1, 2, 3), 2, token_ids=torch.zeros(1, 2, 3))


def test_chain_layout_is_bfs_and_node_tokens_follow_the_paths():
    choices = beam_choices(3, 2)
    assert choices == [(0,), (1,), (2,), (0, 0), (1, 0), (2, 0)]
    tree = MedusaTree(choices)
    assert tree.medusa_choices == choices  # already BFS order
    assert tree.num_nodes == 6 and tree.max_depth == 2
    assert tree.retrieve_indices.tolist() == [[0, 1, 4], [0, 2, 5], [0, 3, 6]]  # 3 disjoint chains
    paths = torch.tensor([[[10, 11], [20, 21], [30, 31]]])  # [B, W, K]
    chains = torch.tensor([p[0] for p in choices])
    depths = torch.tensor([len(p) - 1 for p in choices])
    assert beam_node_tokens(paths, chains, depths).tolist() == [[10, 20, 30, 11, 21, 31]]
    with pytest.raises(ValueError, match="width must be an integer >= 1"):
        beam_choices(0, 2)


@pytest.mark.parametrize("spec,want", [("beam:2", (2, None)), (" BEAM:10:3 ", (10, 3)),
                                       ("sparse-16", None)])
def test_parse_beam_spec(spec, want):
    assert parse_beam_spec(spec) == want


@pytest.mark.parametrize("spec", ["beam", "beam:", "beam:0", "beam:2:0", "beam:x", "beam:2:3:4",
                                  "beams:2", "beam:+2"])
def test_parse_beam_spec_refuses_malformed(spec):
    with pytest.raises(ValueError, match=r'expected "beam:W" .* or "beam:W:K"'):
        parse_beam_spec(spec)
