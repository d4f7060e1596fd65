"""MedusaTreeProposer: heads -> per-head top-k -> BFS tree tokens, sized to the batch."""

from __future__ import annotations

import types

import pytest
import torch

from medusa_vllm.heads import MedusaConfig, MedusaHeads
from medusa_vllm.proposer import MedusaTreeProposer
from medusa_vllm.tree import MedusaTree

H, V = 32, 64


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(hidden_size=H, vocab_size=V, num_heads=3))
    heads.save_pretrained(tmp_path / "heads")
    lm = torch.nn.Module()
    lm.lm_head = torch.nn.Linear(H, V, bias=False)
    return tmp_path / "heads", lm


def _proposer(heads_dir, lm, tree, nodes_by_batch=None):
    opts = {"heads": str(heads_dir), "medusa_choices": tree.to_list()}
    if nodes_by_batch is not None:
        opts["nodes_by_batch"] = nodes_by_batch
    vcfg = types.SimpleNamespace(additional_config={"medusa": opts},
                                 model_config=types.SimpleNamespace(dtype=torch.float32))
    p = MedusaTreeProposer(vcfg)
    p.load_model(lm)
    return p


def test_tree_tokens_come_from_the_heads_topk(setup):
    heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _proposer(heads_dir, lm, tree)
    hidden = torch.randn(3, H)
    out = p.propose_tree(hidden, [True, False, True])
    assert out[1] == []
    topk = p.heads.topk(hidden, tree.topk)
    want = tree.node_tokens(topk, torch.zeros(3, dtype=torch.long))[:, 1:]
    assert out[0] == want[0].tolist() and out[2] == want[2].tolist()
    assert len(out[0]) == 16
    # node i's token is head (depth-1)'s top-(rank+1) candidate
    for i, path in enumerate(tree.medusa_choices):
        assert out[0][i] == int(topk[0, len(path) - 1, path[-1]])


def test_tree_shrinks_with_the_batch(setup):
    heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _proposer(heads_dir, lm, tree, nodes_by_batch={"1": 16, "2": 5, "4": 0})
    full = p.propose_tree(torch.randn(1, H), [True])
    assert len(full[0]) == 16
    hidden = torch.randn(3, H)
    two = p.propose_tree(hidden[:2], [True, True])
    assert [len(x) for x in two] == [5, 5]
    ref = _proposer(heads_dir, lm, tree).propose_tree(hidden[:2], [True, True])
    assert two == [r[:5] for r in ref]  # the BFS-first nodes of the same tree
    assert p.propose_tree(torch.randn(4, H), [True] * 4) == [[]] * 4  # plain decoding
    # the batch size counts every request in the step, eligible or not
    assert [len(x) for x in p.propose_tree(hidden[:2], [False, True])] == [0, 5]
    # batch 3, between the entries 2 (5 nodes) and 4 (none): 4 * 1 // 3 - 1 = 0 nodes
    assert p.propose_tree(hidden, [True, False, True]) == [[]] * 3


def test_too_few_heads_for_the_tree(setup):
    heads_dir, lm = setup
    with pytest.raises(ValueError, match="the tree is 4 deep but the heads in .* have only 3 heads"):
        _proposer(heads_dir, lm, MedusaTree.chain(4))


def test_only_the_heads_the_tree_reaches_run(setup, monkeypatch):
    heads_dir, lm = setup
    tree = MedusaTree([[0], [1], [0, 0]])  # depth 2 of 3 heads
    p = _proposer(heads_dir, lm, tree, nodes_by_batch={"1": 3, "2": 2})
    used = []
    for k, block in enumerate(p.heads.blocks):
        block.register_forward_hook(lambda *a, k=k: used.append(k))
    hidden = torch.randn(2, H)
    full = p.propose_tree(hidden[:1], [True])
    assert sorted(set(used)) == [0, 1]
    topk = p.heads.topk(hidden[:1], 2)  # all heads, for reference
    assert full[0] == tree.node_tokens(topk, torch.zeros(1, dtype=torch.long))[0, 1:].tolist()
    used.clear()
    two = p.propose_tree(hidden, [True, True])  # batch 2: [[0], [1]], depth 1
    assert sorted(set(used)) == [0] and [len(x) for x in two] == [2, 2]
    with pytest.raises(ValueError, match=r"num_heads must be in \[1, 3\]"):
        p.heads.topk(hidden, 2, num_heads=4)


@pytest.mark.parametrize("reduced", [False, True])
def test_engine_gemm_heads_match_torch_heads(reduced):
    """On CPU the proposer's heads run through vLLM's CPU GEMM: same logits as
    torch's, same state dict, and the switch really happened."""
    from medusa_vllm.proposer import use_engine_gemm

    torch.manual_seed(1)
    cfg = MedusaConfig(hidden_size=H, vocab_size=V, num_heads=3, num_layers=2,
                       truncated_vocab_size=16 if reduced else None)
    heads = MedusaHeads(cfg, token_map=torch.randperm(V)[:16] if reduced else None).eval()
    ref = MedusaHeads(cfg, token_map=heads.token_map).eval()
    ref.load_state_dict(heads.state_dict())
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    n = use_engine_gemm(heads)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in heads.modules()) == 3 * 2 + 3
    x = torch.randn(5, H)
    with torch.no_grad():
        torch.testing.assert_close(heads(x), ref(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(heads.topk(x, 3), ref.topk(x, 3))
    after = heads.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(hasattr(m, "cpu_linear") for m in heads.modules() if isinstance(m, torch.nn.Linear))
