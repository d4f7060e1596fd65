"""fit_engine_tree: known cost curves + known accuracies -> known picks (tree=auto in the engine)."""

from __future__ import annotations

import json

import pytest
import torch

from medusa_vllm.core.cost_curve import CostCurves
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import (
    fit_engine_tree,
    read_per_rank_accuracy,
    step_cost,
)

# heads like the shipped ones: head 0 top-1 ~0.47, weak past one token
WEAK = [[0.47, 0.12, 0.06, 0.04], [0.27, 0.10, 0.06, 0.04], [0.19, 0.09, 0.06, 0.04]]
# heads that predict well: a wide tree pays where verification is cheap
STRONG = [[0.80, 0.10, 0.04, 0.02], [0.70, 0.12, 0.05, 0.02], [0.60, 0.12, 0.05, 0.03]]


def _curves(tree_slope: dict[int, float], chain: dict[int, dict[int, float]] | None = None,
            draft: float = 0.0) -> CostCurves:
    """Linear tree curves: cost(n) = 1 + slope[b] * n at n in 2..64."""
    sizes = (2, 4, 8, 16, 32, 64)
    return CostCurves(
        vanilla_s={b: 0.05 * b for b in tree_slope},
        tree={b: {n: 1.0 + s * n for n in sizes} for b, s in tree_slope.items()},
        chain=chain or {},
        draft={b: {d: draft for d in (1, 2, 3)} for b in tree_slope},
    )


def test_flat_curve_strong_heads_take_a_big_tree_steep_curve_a_small_one():
    flat = fit_engine_tree(STRONG, _curves({1: 0.002}), max_nodes=64)
    steep = fit_engine_tree(STRONG, _curves({1: 0.2}), max_nodes=64)
    assert flat.tree.num_nodes >= 16, flat.describe()
    assert steep.tree.num_nodes <= 4, steep.describe()
    assert flat.expected_speedup[1] > steep.expected_speedup[1]


def test_tree_shrinks_with_batch_and_stops_where_nothing_pays():
    # b=1 almost free, b=4 moderate, b=16 steep, b=64 every node doubles the step
    fit = fit_engine_tree(STRONG, _curves({1: 0.002, 4: 0.03, 16: 0.3, 64: 1.0}), max_nodes=64)
    t = fit.nodes_by_batch
    assert t[1] >= t[4] >= t[16] >= t[64]
    assert t[1] == fit.tree.num_nodes
    assert 0 < t[16] < t[1]
    assert t[64] == 0, fit.describe()  # 1.8 tokens cannot pay for a step costing 2x+
    assert fit.expected_speedup[64] == 1.0 and fit.expected_accept_length[64] == 1.0


def test_cheap_chain_beats_a_tree_of_as_many_nodes():
    # the shipped-heads situation: trees cost 1.35x+, a chain of 2 through vLLM's kernel 1.06x
    chain = {1: {1: 1.04, 2: 1.06, 3: 1.27}}
    fit = fit_engine_tree(WEAK, _curves({1: 0.18}, chain), max_nodes=64)
    assert fit.tree == MedusaTree.chain(2), fit.describe()
    assert fit.expected_accept_length[1] == pytest.approx(1 + 0.47 + 0.47 * 0.27)
    assert fit.expected_speedup[1] == pytest.approx((1 + 0.47 + 0.47 * 0.27) / 1.06)


def test_drafting_cost_is_paid_by_every_speculative_step():
    free = fit_engine_tree(WEAK, _curves({1: 0.01}, draft=0.0), max_nodes=64)
    dear = fit_engine_tree(WEAK, _curves({1: 0.01}, draft=1.5), max_nodes=64)
    assert free.nodes_by_batch[1] > 0
    assert dear.nodes_by_batch[1] == 0, dear.describe()  # heads cost more than they save


def test_max_nodes_caps_the_tree():
    fit = fit_engine_tree(STRONG, _curves({1: 0.0001}), max_nodes=10)
    assert fit.tree.num_nodes <= 10


def test_lookup_chain_is_priced_and_sized_per_kind_of_request():
    curves = _curves({1: 0.01, 4: 0.05, 16: 0.4})
    fit = fit_engine_tree(WEAK, curves, max_nodes=12, ngram_nodes=3)
    chain = [(0,) * d for d in (1, 2, 3)]
    assert all(p in fit.tree.medusa_choices for p in chain)
    assert set(fit.heads_tree.medusa_choices) <= set(fit.tree.medusa_choices)
    assert fit.tree.num_nodes <= fit.heads_tree.num_nodes + 3 <= 12
    a = torch.tensor(WEAK, dtype=torch.float64)
    paths = fit.tree.medusa_choices
    heads_prob = [float(torch.prod(a[torch.arange(len(p)), list(p)])) for p in paths]
    lookup_prob = [0.6 ** len(p) if p in chain else q for p, q in zip(paths, heads_prob)]

    def best_prefix(b, probs):  # brute force over every BFS prefix, 0 = plain decoding
        speeds = [1.0] + [(1 + sum(probs[:k])) / step_cost(curves, b, paths[:k])
                          for k in range(1, len(paths) + 1)]
        best = max(range(len(speeds)), key=lambda k: (speeds[k], -k))
        return best if speeds[best] > 1.0 + 1e-9 else 0

    assert fit.node_prior == pytest.approx(heads_prob)
    assert fit.lookup_prior == pytest.approx(lookup_prob)
    assert fit.nodes_by_batch == {b: best_prefix(b, heads_prob) for b in (1, 4, 16)}
    assert fit.lookup_nodes_by_batch == {b: best_prefix(b, lookup_prob) for b in (1, 4, 16)}
    # a continuation is worth more than the weak heads' guesses: it drafts at least as much
    assert all(fit.lookup_nodes_by_batch[b] >= fit.nodes_by_batch[b] for b in (1, 4, 16))
    assert fit.expected_accept_length[1] == pytest.approx(1 + sum(heads_prob[:fit.nodes_by_batch[1]]))
    # the chain's nodes count in the budget: max_nodes - 3 heads nodes at most
    with pytest.raises(ValueError, match="leaves no heads node"):
        fit_engine_tree(WEAK, curves, max_nodes=3, ngram_nodes=3)
    assert fit_engine_tree(WEAK, curves, max_nodes=12).lookup_nodes_by_batch is None


def test_step_cost_chain_point_tree_interpolation_and_draft():
    c = CostCurves(vanilla_s={1: 0.05}, tree={1: {2: 1.2, 4: 1.4}}, chain={1: {1: 1.05, 2: 1.1}},
                   draft={1: {1: 0.02, 2: 0.04}})
    assert step_cost(c, 1, [(0,), (0, 0)]) == pytest.approx(1.1 + 0.04)  # a measured chain
    assert step_cost(c, 1, [(0,), (1,)]) == pytest.approx(1.2 + 0.02)  # a tree of 2
    assert step_cost(c, 1, [(0,), (1,), (2,)]) == pytest.approx(1.3 + 0.02)  # interpolated
    assert step_cost(c, 1, [(0,)] + [(r,) for r in range(1, 6)]) == pytest.approx(1.6 + 0.02)
    assert step_cost(c, 1, []) == 1.0
    with pytest.raises(ValueError, match="batch size 8"):
        step_cost(c, 8, [(0,)])


def _flat(table):
    return [x for row in table for x in row]


def test_read_per_rank_accuracy_sources(tmp_path):
    assert read_per_rank_accuracy(tmp_path) is None
    (tmp_path / "accuracies.json").write_text(json.dumps([[0.5, 0.7], [0.3, 0.4]]))
    table, source = read_per_rank_accuracy(tmp_path)
    assert _flat(table) == pytest.approx([0.5, 0.2, 0.3, 0.1]) and "cumulative" in source
    (tmp_path / "medusa_tree.json").write_text(json.dumps(
        {"medusa_choices": [[0]], "per_rank_accuracy": [[0.4, 0.1]]}))
    table, source = read_per_rank_accuracy(tmp_path)
    assert _flat(table) == pytest.approx([0.4, 0.1]) and "per_rank_accuracy" in source
    (tmp_path / "medusa_tree.json").write_text(json.dumps({"per_rank_accuracy": [[1.5]]}))
    with pytest.raises(ValueError, match="medusa_tree.json"):
        read_per_rank_accuracy(tmp_path)


@pytest.mark.parametrize("which", ["default", "medusa"])
def test_shipped_curves_reproduce_the_shipped_pick(which):
    """The shipped tree was fitted elsewhere from its own curves; fed those same curves,
    the engine's fit picks it again (same model, same decision)."""
    from medusa_vllm.tools.default_model import default_heads_dir, default_medusa_heads_dir

    heads = default_heads_dir() if which == "default" else default_medusa_heads_dir()
    saved = json.loads((heads / "medusa_tree.json").read_text())
    per_rank, _ = read_per_rank_accuracy(heads)
    vanilla = {int(b): 0.05 for b in saved["cost_curves_relative"]}
    curves = CostCurves(vanilla_s=vanilla, tree=saved["cost_curves_relative"],
                        chain=saved["chain_cost_curves_relative"])
    fit = fit_engine_tree(per_rank, curves, max_nodes=64)
    assert fit.tree.to_list() == saved["medusa_choices"]
    assert fit.nodes_by_batch == {int(b): n for b, n in saved["nodes_by_batch"].items()}
