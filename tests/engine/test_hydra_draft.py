"""Hydra tree drafting (engine/hydra_draft.py) against a brute-force per-node evaluation.

The brute force walks the tree node by node: for node ``i`` at depth ``d`` it runs head
``d - 1`` on ONE request's hidden state and the explicit token list of ``i``'s path
(root, then the brute-forced tokens of its ancestors), sorts all logits, and takes the
candidate of the node's rank. No batching, no gathering, no top-k: an independent
reading of the definition.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from medusa_vllm.checkpoints import load_heads, save_heads
from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig
from medusa_vllm.core.tree import MedusaTree, with_lookup_chain
from medusa_vllm.engine.hydra_draft import depth_steps, draft_tree, lookup_overrides
from medusa_vllm.engine.proposer import MedusaTreeProposer

H, V = 16, 48


def _random_heads(reduced: bool, seed: int = 0, num_heads: int = 4) -> HydraHeads:
    g = torch.Generator().manual_seed(seed)
    dv = 20 if reduced else None
    token_map = torch.randperm(V, generator=g)[:20] if reduced else None
    heads = HydraHeads(HydraHeadsConfig(hidden_size=H, vocab_size=V, num_heads=num_heads,
                                        num_layers=2, truncated_vocab_size=dv),
                       token_map=token_map, dtype=torch.float64)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return heads.eval()


def _brute_force(heads: HydraHeads, hidden: torch.Tensor, roots: torch.Tensor,
                 tree: MedusaTree, forced: dict[tuple[int, int], int] | None = None,
                 topk: int | None = None) -> list[list[int]]:
    forced = forced or {}
    out = []
    for b in range(hidden.shape[0]):
        tok = {(): int(roots[b])}
        for i, path in enumerate(tree.paths[1:], start=1):
            if (b, i) in forced:
                tok[path] = forced[(b, i)]
                continue
            ancestors = [tok[path[:e]] for e in range(len(path))]
            with torch.no_grad():
                logits = heads.head_logits(len(path) - 1, hidden[b], torch.tensor(ancestors))
            order = torch.argsort(logits, descending=True).tolist()
            rank = path[-1] if topk is None or path[-1] < topk else 0
            tok[path] = int(heads.map_to_full(torch.tensor(order[rank])))
        out.append([tok[p] for p in tree.paths])
    return out


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "reduced-vocab"])
@pytest.mark.parametrize("tree_spec", ["chain-3", "sparse-16", "sparse-64"])
def test_draft_tree_equals_brute_force(reduced, tree_spec):
    heads = _random_heads(reduced)
    tree = MedusaTree.load(tree_spec, 4)
    hidden = torch.randn(3, H, dtype=torch.float64)
    roots = torch.randint(0, V, (3,))
    got = draft_tree(heads, hidden, roots, tree)
    assert got.shape == (3, tree.num_nodes + 1)
    assert got.tolist() == _brute_force(heads, hidden, roots, tree)


def test_children_of_different_parents_differ():
    # the point of Hydra: siblings' subtrees are drafted from their own parents
    heads = _random_heads(False)
    tree = MedusaTree([(0,), (1,), (0, 0), (1, 0)])
    hidden = torch.randn(8, H, dtype=torch.float64)
    got = draft_tree(heads, hidden, torch.randint(0, V, (8,)), tree)
    assert (got[:, 3] != got[:, 4]).any()


def test_lookup_overrides_on_the_top1_chain_equal_brute_force():
    heads = _random_heads(True)
    tree = with_lookup_chain(MedusaTree.load("sparse-16", 4), 3, 4)
    lookup = torch.tensor([[5, 7, -1], [-1, -1, -1]])
    ov = lookup_overrides(tree, lookup)
    forced = {(b, i): int(ov[b, i]) for b in range(2) for i in range(tree.num_nodes + 1)
              if ov[b, i] >= 0}
    # only the top-1 chain's nodes (0,) and (0, 0) of request 0 are forced
    assert forced == {(0, tree.paths.index((0,))): 5, (0, tree.paths.index((0, 0))): 7}
    hidden = torch.randn(2, H, dtype=torch.float64)
    roots = torch.tensor([3, 9])
    got = draft_tree(heads, hidden, roots, tree, overrides=ov)
    assert got.tolist() == _brute_force(heads, hidden, roots, tree, forced)


def test_depth_steps_cover_every_node_once():
    tree = MedusaTree.load("sparse-64", 4)
    steps = depth_steps(tree)
    nodes = torch.cat([s.nodes for s in steps]).tolist()
    assert sorted(nodes) == list(range(1, tree.num_nodes + 1))
    for s in steps:  # each child's parent is the last node of its slot's path
        assert (tree.parents[s.nodes] == s.paths[s.slot, -1]).all()


def test_bad_inputs_are_refused():
    heads = _random_heads(False, num_heads=2)
    with pytest.raises(ValueError, match="only 2 Hydra heads"):
        draft_tree(heads, torch.randn(1, H, dtype=torch.float64), torch.tensor([1]),
                   MedusaTree.chain(3))
    with pytest.raises(ValueError, match="root_tokens"):
        draft_tree(heads, torch.randn(2, H, dtype=torch.float64), torch.tensor([1]),
                   MedusaTree.chain(2))


def _proposer(heads_dir, tree: MedusaTree, **opts):
    options = {"heads": str(heads_dir), "medusa_choices": tree.to_list(), "nodes_by_batch": "off",
               **opts}
    cfg = types.SimpleNamespace(additional_config={"medusa": options},
                                model_config=types.SimpleNamespace(dtype=torch.float64))
    p = MedusaTreeProposer(cfg)
    p.load_model(torch.nn.Linear(H, V))  # a backbone stand-in: Hydra heads need nothing of it
    return p


def test_proposer_drafts_hydra_trees_with_the_sampled_root(tmp_path):
    heads = _random_heads(True)
    save_heads(heads, tmp_path / "hydra")
    tree = MedusaTree.load("sparse-16", 4)
    p = _proposer(tmp_path / "hydra", tree)
    assert isinstance(p.heads, HydraHeads)
    ref = load_heads(tmp_path / "hydra", dtype=torch.float64).eval()
    hidden = torch.randn(3, H, dtype=torch.float64)
    roots = [11, 4, 30]
    out = p.propose_tree(hidden, [True, False, True], root_tokens=roots)
    assert out[1] == []
    for i in (0, 2):
        want = _brute_force(ref, hidden[i:i + 1], torch.tensor([roots[i]]), tree)[0][1:]
        assert out[i] == want
    with pytest.raises(ValueError, match="root token"):
        p.propose_tree(hidden, [True, True, True])


def test_proposer_puts_the_lookup_on_the_top1_chain_for_hydra(tmp_path):
    heads = _random_heads(False)
    save_heads(heads, tmp_path / "hydra")
    base = MedusaTree.load("sparse-8", 4)
    p = _proposer(tmp_path / "hydra", base, ngram_nodes=2, nodes_by_batch="off")
    ngram = np.array([[6, 8], [-1, -1], [4, -1]])
    hidden = torch.randn(3, H, dtype=torch.float64)
    out = p.propose_tree(hidden, [True, True, True], ngram, root_tokens=[1, 2, 3])
    tree = p.tree
    assert tree == with_lookup_chain(base, 2, 4)
    chain = [tree.paths.index((0,)), tree.paths.index((0, 0))]
    for b in range(3):
        forced = {(0, i): int(ngram[b, d]) for d, i in enumerate(chain)
                  if ngram[b, : d + 1].min() >= 0}
        want = _brute_force(heads, hidden[b:b + 1], torch.tensor([b + 1]), tree, forced)[0][1:]
        assert out[b] == want
    assert [out[0][i - 1] for i in chain] == [6, 8]
    assert out[2][chain[0] - 1] == 4
