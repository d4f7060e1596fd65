"""MedusaTreeProposer: heads -> per-head top-k -> BFS tree tokens, sized to the batch.

Expected drafts are computed by brute force from the heads' logits (a plain
torch copy of the heads, not the proposer's engine-GEMM one): per head an
argsort of the logits, then for each tree path in BFS order the token of rank
``path[-1]`` of head ``len(path) - 1``.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_vllm.checkpoints import save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.engine.options import MedusaConfigError, MedusaTreeConfig
from medusa_vllm.engine.proposer import MedusaTreeProposer

H, V = 32, 64


def _make_heads(tmp_path, reduced: bool = False) -> tuple[MedusaHeads, Path, torch.nn.Module]:
    """(plain torch reference heads, their saved folder, a backbone stand-in with an lm_head)."""
    torch.manual_seed(0)
    cfg = MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=3,
                            truncated_vocab_size=24 if reduced else None)
    token_map = torch.randperm(V)[:24] if reduced else None
    heads = MedusaHeads(cfg, token_map=token_map).eval()
    save_heads(heads, tmp_path / "heads")
    lm = torch.nn.Module()
    lm.lm_head = torch.nn.Linear(H, V, bias=False)
    return heads, tmp_path / "heads", lm


@pytest.fixture(params=[False, True], ids=["full-vocab", "reduced-vocab"])
def setup(tmp_path, request):
    return _make_heads(tmp_path, request.param)


def _vllm_config(heads_dir, tree: MedusaTree, nodes_by_batch="off"):
    opts = {"heads": str(heads_dir), "medusa_choices": tree.to_list(), "nodes_by_batch": nodes_by_batch}
    return types.SimpleNamespace(additional_config={"medusa": opts},
                                 model_config=types.SimpleNamespace(dtype=torch.float32))


def _proposer(heads_dir, lm, tree, nodes_by_batch="off"):
    p = MedusaTreeProposer(_vllm_config(heads_dir, tree, nodes_by_batch))
    p.load_model(lm)
    return p


def _expected_drafts(ref: MedusaHeads, hidden: torch.Tensor, paths: list[list[int]]) -> list[list[int]]:
    """Brute force: each BFS path's token is rank path[-1] of head len(path)-1."""
    bfs = sorted(paths, key=lambda p: (len(p), p))
    with torch.no_grad():
        logits = ref(hidden)  # [K, B, draft_vocab]
    ranked = torch.argsort(logits, dim=-1, descending=True)  # [K, B, draft_vocab]
    out = []
    for b in range(hidden.shape[0]):
        row = []
        for path in bfs:
            draft_id = int(ranked[len(path) - 1, b, path[-1]])
            row.append(int(ref.token_map[draft_id]) if ref.token_map is not None else draft_id)
        out.append(row)
    return out


def test_proposer_holds_the_one_config_and_tree(setup):
    _, heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    vcfg = _vllm_config(heads_dir, tree, {"1": 16, "4": 3})
    p = MedusaTreeProposer(vcfg)
    assert isinstance(p.config, MedusaTreeConfig)
    assert p.config == MedusaTreeConfig.from_dict(vcfg.additional_config["medusa"])
    assert p.tree == tree and p.nodes_by_batch == {1: 16, 4: 3}
    with pytest.raises(MedusaConfigError, match=r"additional_config\['medusa'\]: expected the Medusa options"):
        MedusaTreeProposer(types.SimpleNamespace(additional_config={},
                                                 model_config=types.SimpleNamespace(dtype=torch.float32)))


def test_tree_tokens_come_from_the_heads_ranking(setup):
    ref, heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _proposer(heads_dir, lm, tree)
    hidden = torch.randn(3, H)
    out = p.propose_tree(hidden, [True, False, True])
    want = _expected_drafts(ref, hidden, tree.to_list())
    assert out == [want[0], [], want[2]]
    assert len(out[0]) == 16 and out[0] != out[2]
    if ref.token_map is not None:  # full-vocabulary ids of the draft vocabulary
        assert set(out[0]) <= set(ref.token_map.tolist())


def test_tree_shrinks_with_the_batch(setup):
    ref, heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _proposer(heads_dir, lm, tree, nodes_by_batch={"1": 16, "2": 5, "4": 0})
    one = torch.randn(1, H)
    assert p.propose_tree(one, [True]) == _expected_drafts(ref, one, tree.to_list())
    hidden = torch.randn(3, H)
    two = p.propose_tree(hidden[:2], [True, True])
    # the BFS-first 5 nodes of the same tree
    assert two == _expected_drafts(ref, hidden[:2], tree.to_list()[:5])
    assert p.propose_tree(torch.randn(4, H), [True] * 4) == [[]] * 4  # plain decoding
    # the batch size counts every request in the step, eligible or not
    assert [len(x) for x in p.propose_tree(hidden[:2], [False, True])] == [0, 5]
    # batch 3, between the entries 2 (5 nodes) and 4 (none): 4 * 1 // 3 - 1 = 0 nodes
    assert p.propose_tree(hidden, [True, False, True]) == [[]] * 3


def test_too_few_heads_for_the_tree(setup):
    _, heads_dir, lm = setup
    with pytest.raises(MedusaConfigError, match=r"not a valid tree for 3 Medusa heads .*depth 4 exceeds"):
        _proposer(heads_dir, lm, MedusaTree.chain(4))


def test_only_the_heads_the_tree_reaches_run(setup):
    ref, heads_dir, lm = setup
    tree = MedusaTree([[0], [1], [0, 0]])  # depth 2 of 3 heads
    p = _proposer(heads_dir, lm, tree, nodes_by_batch={"1": 3, "2": 2})
    used = []
    for k, block in enumerate(p.heads.blocks):
        block.register_forward_hook(lambda *a, k=k: used.append(k))
    hidden = torch.randn(2, H)
    full = p.propose_tree(hidden[:1], [True])
    assert sorted(set(used)) == [0, 1]
    assert full == _expected_drafts(ref, hidden[:1], tree.to_list())
    used.clear()
    two = p.propose_tree(hidden, [True, True])  # batch 2: [[0], [1]], depth 1
    assert sorted(set(used)) == [0]
    assert two == _expected_drafts(ref, hidden, [[0], [1]])


@pytest.mark.parametrize("reduced", [False, True])
def test_engine_gemm_heads_match_torch_heads(reduced):
    """On CPU the proposer's heads run through vLLM's CPU GEMM: same logits as
    torch's, same state dict, and the switch really happened."""
    from medusa_vllm.engine.proposer import use_engine_gemm

    torch.manual_seed(1)
    cfg = MedusaHeadsConfig(hidden_size=H, vocab_size=V, num_heads=3, num_layers=2,
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


def test_ngram_branch_carries_prompt_lookup_tokens_else_the_heads_top1(setup):
    """With ``ngram_nodes``, the tree gains a chain at rank ``topk`` of the heads'
    tree; its nodes hold the prompt-lookup continuation where one was found and,
    per depth where none was, the heads' top-1 token (brute force)."""
    ref, heads_dir, lm = setup
    heads_tree = MedusaTree([[0], [1], [0, 0], [0, 1]])
    vcfg = _vllm_config(heads_dir, heads_tree)
    vcfg.additional_config["medusa"]["ngram_nodes"] = 3
    p = MedusaTreeProposer(vcfg)
    p.load_model(lm)
    r = heads_tree.topk  # 2
    assert p.ngram_rank == r
    assert p.tree.to_list() == sorted(heads_tree.to_list() + [[r], [r, r], [r, r, r]],
                                      key=lambda q: (len(q), q))
    torch.manual_seed(3)
    hidden = torch.randn(4, H)
    ngram = np.array([[7, 8, 9], [5, -1, -1], [-1, -1, -1], [11, 12, -1]])
    got = p.propose_tree(hidden, [True, True, False, True], ngram)
    heads_only = _expected_drafts(ref, hidden, heads_tree.to_list())
    top1 = _expected_drafts(ref, hidden, [[0], [0, 0], [0, 0, 0]])  # heads' top-1 per depth
    for b in (0, 1, 3):
        by_path = dict(zip(map(tuple, p.tree.to_list()), got[b]))
        assert [by_path[tuple(q)] for q in sorted(heads_tree.to_list(), key=lambda q: (len(q), q))] \
            == heads_only[b]
        branch = [by_path[(r,) * d] for d in (1, 2, 3)]
        assert branch == [int(t) if t >= 0 else top1[b][d] for d, t in enumerate(ngram[b])]
    assert got[2] == []
    # no lookup at all: the branch is the heads' top-1 chain
    plain = p.propose_tree(hidden, [True] * 4, None)
    for b in range(4):
        by_path = dict(zip(map(tuple, p.tree.to_list()), plain[b]))
        assert [by_path[(r,) * d] for d in (1, 2, 3)] == top1[b]
