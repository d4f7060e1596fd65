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


def _ranked_tokens(ref: MedusaHeads, hidden: torch.Tensor) -> list[list[list[int]]]:
    """``[B][K][vocab]``: each head's full-vocabulary tokens from best to worst."""
    with torch.no_grad():
        ranked = torch.argsort(ref(hidden), dim=-1, descending=True)  # [K, B, draft_vocab]
    if ref.token_map is not None:
        ranked = ref.token_map[ranked]
    return ranked.movedim(0, 1).tolist()


def _expected_lookup_drafts(ref, hidden, paths, ngram) -> list[list[int]]:
    """Brute force of prompt lookup on the top-1 chain: a node whose parent is the root
    or a top-1 chain node, at a depth the request's continuation reaches (no ``-1``
    before it), takes rank ``path[-1]`` of [lookup token] + the head's ranking
    without that token; every other node rank ``path[-1]`` of the head's ranking."""
    ranked = _ranked_tokens(ref, hidden)
    out = []
    for b, row in enumerate(ngram):
        reach = 0
        while reach < len(row) and row[reach] >= 0:
            reach += 1
        drafts = []
        for path in sorted(paths, key=lambda q: (len(q), q)):
            d = len(path) - 1
            cands = ranked[b][d]
            if not any(path[:-1]) and d < reach:
                cands = [int(row[d])] + [t for t in cands if t != row[d]]
            drafts.append(cands[path[-1]])
        out.append(drafts)
    return out


def test_prompt_lookup_takes_the_top1_chain_and_shifts_the_heads_beside_it(setup):
    """With ``ngram_nodes``, the tree gains the top-1 chain to that depth; a request's
    prompt-lookup continuation fills it down to the depth it reaches and the heads'
    candidates move one rank down beside it (no token twice among siblings);
    requests without a continuation draft the heads' tree unchanged (brute force)."""
    ref, heads_dir, lm = setup
    heads_tree = MedusaTree([[0], [1], [0, 0], [0, 1], [1, 0]])
    vcfg = _vllm_config(heads_dir, heads_tree)
    vcfg.additional_config["medusa"]["ngram_nodes"] = 3
    p = MedusaTreeProposer(vcfg)
    p.load_model(lm)
    assert p.tree.to_list() == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    torch.manual_seed(3)
    hidden = torch.randn(5, H)
    ranked = _ranked_tokens(ref, hidden)
    # row 0: a 3-token continuation; row 1: one token, equal to head 0's second best;
    # row 2: not drafted; row 3: none; row 4: stops after two tokens
    ngram = np.array([[7, 8, 9], [ranked[1][0][1], -1, 5], [-1, -1, -1], [-1, -1, -1],
                      [11, 12, -1]])
    got = p.propose_tree(hidden, [True, True, False, True, True], ngram)
    want = _expected_lookup_drafts(ref, hidden, p.tree.to_list(), ngram)
    for b in (0, 1, 3, 4):
        assert got[b] == want[b]
    assert got[2] == []
    by_path = dict(zip(map(tuple, p.tree.to_list()), got[0]))
    assert [by_path[(0,) * d] for d in (1, 2, 3)] == [7, 8, 9]
    assert by_path[(1,)] == ranked[0][0][0]  # the heads' best, one rank down
    one = dict(zip(map(tuple, p.tree.to_list()), got[1]))
    assert one[(0,)] == ranked[1][0][1] and one[(1,)] == ranked[1][0][0]  # no duplicate
    assert got[3] == _expected_drafts(ref, hidden, p.tree.to_list())[3]
    # no lookup at all: a plain Medusa tree
    assert p.propose_tree(hidden, [True] * 5, None) == _expected_drafts(ref, hidden, p.tree.to_list())


def test_requests_with_a_lookup_draft_by_their_own_table(setup):
    _, heads_dir, lm = setup
    vcfg = _vllm_config(heads_dir, MedusaTree.chain(1), nodes_by_batch={"1": 1, "3": 1, "4": 0})
    vcfg.additional_config["medusa"]["ngram_nodes"] = 3
    p = MedusaTreeProposer(vcfg)
    p.load_model(lm)
    assert p.tree.to_list() == [[0], [0, 0], [0, 0, 0]]
    hidden = torch.randn(4, H)
    ngram = np.array([[7, 8, 9], [-1, -1, -1], [4, 5, -1], [-1, -1, -1]])
    # no table of their own: as many nodes as the others, at least their continuation
    got = p.propose_tree(hidden[:3], [True] * 3, ngram[:3])
    assert [len(g) for g in got] == [3, 1, 2]
    # at batch 4 the table says plain decoding: nobody drafts
    assert [len(g) for g in p.propose_tree(hidden, [True] * 4, ngram)] == [0, 0, 0, 0]
    # the start-up fit's table for requests with a lookup continuation
    p.lookup_nodes_by_batch = {1: 3, 4: 2}
    assert [len(g) for g in p.propose_tree(hidden[:3], [True] * 3, ngram[:3], req_ids=list("abc"))] \
        == [3, 1, 3]  # batch 3: 3 lookup nodes (capped by batch 4's tokens), the others 1
    assert p._looked_up == {"a": True, "b": False, "c": True}
    # where the heads' table drafts nothing (batch 4), neither do the lookup rows
    assert [len(g) for g in p.propose_tree(hidden, [True] * 4, ngram, req_ids=list("abcd"))] \
        == [0, 0, 0, 0]
    assert p._looked_up == {"a": False, "b": False, "c": False, "d": False}
    p.forget("a")
    assert "a" not in p._looked_up


# ------------------------------------------------------------------ policies
def _policy_proposer(heads_dir, lm, **options):
    opts = {"heads": str(heads_dir), "nodes_by_batch": "off", **options}
    vcfg = types.SimpleNamespace(additional_config={"medusa": MedusaTreeConfig.from_dict(opts)
                                                    .resolved().to_dict()},
                                 model_config=types.SimpleNamespace(dtype=torch.float32))
    p = MedusaTreeProposer(vcfg)
    p.load_model(lm)
    return p


def _brute_force_beam(ref: MedusaHeads, hidden: torch.Tensor, width: int, depth: int):
    """Per row, the ``width`` best of all draft_vocab**depth paths by summed log-prob
    (full-vocabulary ids), from the plain torch heads."""
    import itertools

    with torch.no_grad():
        logp = torch.log_softmax(ref(hidden, depth).double(), dim=-1)  # [K, B, dv]
    out = []
    for b in range(hidden.shape[0]):
        scored = sorted(((sum(float(logp[d, b, t]) for d, t in enumerate(path)), path)
                         for path in itertools.product(range(logp.shape[-1]), repeat=depth)),
                        key=lambda x: -x[0])[:width]
        paths = [list(p) for _, p in scored]
        if ref.token_map is not None:
            paths = [[int(ref.token_map[t]) for t in p] for p in paths]
        out.append(paths)
    return out


@pytest.mark.parametrize("spec,width,depth", [("beam:3", 3, 3), ("beam:5:2", 5, 2)])
def test_beam_tree_holds_the_w_best_joint_paths(setup, spec, width, depth):
    ref, heads_dir, lm = setup
    p = _policy_proposer(heads_dir, lm, tree=spec)
    assert p.tree.num_nodes == width * depth and p.beam_width == width
    torch.manual_seed(7)
    hidden = torch.randn(3, H)
    got = p.propose_tree(hidden, [True, False, True])
    assert got[1] == []
    want = _brute_force_beam(ref, hidden, width, depth)
    for b in (0, 2):
        # BFS layout: node 1 + d*W + w = path w's token at depth d+1
        chains = [[got[b][d * width + w] for d in range(depth)] for w in range(width)]
        assert chains == want[b]


def test_beam_tree_truncated_by_the_batch_uses_a_shallower_beam(setup):
    ref, heads_dir, lm = setup
    p = _policy_proposer(heads_dir, lm, tree="beam:2", nodes_by_batch={"1": 6, "2": 3})
    hidden = torch.randn(2, H)
    got = p.propose_tree(hidden, [True, True])  # 3 BFS nodes: depth 1 of both chains, 1 of depth 2
    want = _brute_force_beam(ref, hidden, 2, 2)
    for b in range(2):
        assert got[b] == [want[b][0][0], want[b][1][0], want[b][0][1]]


def test_beam_trees_refuse_prompt_lookup(setup):
    _, heads_dir, lm = setup
    with pytest.raises(MedusaConfigError, match="ngram_nodes: prompt lookup does not combine"):
        _policy_proposer(heads_dir, lm, tree="beam:2:2", ngram_nodes=2)


def test_adaptive_drafts_per_request_and_forgets_finished_requests(setup):
    ref, heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _policy_proposer(heads_dir, lm, tree="sparse-16", adaptive=True, adaptive_node_cost=0.05)
    assert p.adaptive is not None and p.adaptive.nodes_at_depth == [0, 6, 12, 16]
    hidden = torch.randn(2, H)
    full = p.propose_tree(hidden, [True, True])  # no request ids: the whole tree
    assert full == _expected_drafts(ref, hidden, tree.to_list())
    sizes = []
    for _ in range(24):  # "miss" never accepts; "hit" accepts whatever it drafts
        out = p.propose_tree(hidden, [True, True], req_ids=["miss", "hit"])
        n = [len(x) for x in out]
        sizes.append(n)
        assert out[0] == full[0][: n[0]] and out[1] == full[1]  # BFS prefixes, same tokens
        p.observe(["miss", "hit"], n, [0, p.adaptive.depth_of(n[1])])
    misses = [n[0] for n in sizes[8:]]
    assert misses.count(0) >= 12 and set(misses) <= {0, 6}, misses  # nothing, but probes
    p.forget("miss")
    assert p.propose_tree(hidden, [True, True], req_ids=["miss", "hit"])[0] == full[0]


def test_adaptive_cost_defaults(setup, tmp_path):
    from medusa_vllm.engine.adaptive import DEFAULT_NODE_COST
    from medusa_vllm.engine.proposer import adaptive_step_cost

    _, heads_dir, _ = setup
    tree = MedusaTree.chain(3)
    cfg = MedusaTreeConfig.from_dict({"heads": str(heads_dir), "tree": "chain-3"})
    assert adaptive_step_cost(cfg, tree)(4) == pytest.approx(1 + 4 * DEFAULT_NODE_COST)
    cfg2 = cfg.model_copy(update={"adaptive_node_cost": 0.5})
    assert adaptive_step_cost(cfg2, tree)(2) == pytest.approx(2.0)
    # a calibrated cost curve beside the heads: chains priced on the chain curve
    (heads_dir / "medusa_tree.json").write_text(
        '{"medusa_choices": [[0]], "cost_curves_relative": {"1": {"4": 1.4}},'
        ' "chain_cost_curves_relative": {"1": {"1": 1.1, "2": 1.2, "3": 1.3}}}')
    cost = adaptive_step_cost(cfg, tree)
    assert [cost(n) for n in (0, 1, 3)] == pytest.approx([1.0, 1.1, 1.3])
    assert adaptive_step_cost(cfg, MedusaTree.load("sparse-4", 3))(4) == pytest.approx(1.4)


def test_online_fit_sets_the_drafted_prefix_and_its_probes(setup):
    import numpy as np

    from medusa_vllm.core.cost_curve import CostCurves
    from medusa_vllm.core.online_fit import OnlineNodeFit

    ref, heads_dir, lm = setup
    tree = MedusaTree.load("sparse-16", 3)
    p = _policy_proposer(heads_dir, lm, tree="sparse-16")
    curves = CostCurves(vanilla_s={1: 0.05}, tree={1: {2: 1.1, 16: 1.8}}, chain={}, draft={})
    p.online_fit = OnlineNodeFit(paths=tree.medusa_choices, prior=np.zeros(16), curves=curves,
                                 table={1: 0}, probe_every=2, probe_rows=2, refit_every=1000)
    hidden = torch.randn(3, H)
    full = _expected_drafts(ref, hidden, tree.to_list())
    # table 0: plain decoding; every 2nd step two requests probe depth 1 (6 nodes),
    # the next two in turn at each probe
    assert p.propose_tree(hidden, [True, True, True]) == [[], [], []]
    assert p.propose_tree(hidden, [True, True, True]) == [[], full[1][:6], full[2][:6]]
    assert p.propose_tree(hidden, [True, True, True]) == [[], [], []]
    assert p.propose_tree(hidden, [True, True, True]) == [full[0][:6], [], full[2][:6]]
    p.online_fit.table = {1: 4}
    assert p.propose_tree(hidden, [True, True, True]) == [x[:4] for x in full]
    # a verified step feeds the counters: request 0 accepted node 1, request 1 nothing
    p.observe_nodes([4, 4, 0], torch.tensor([[0, 1], [0, -1], [0, -1]]))
    assert p.online_fit.drafted[:5].tolist() == [2, 2, 2, 2, 0]
    assert p.online_fit.hits[:2].tolist() == [1, 0]
