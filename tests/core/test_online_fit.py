"""The online refit of nodes_by_batch from observed per-node acceptance."""

from __future__ import annotations

import numpy as np
import pytest

from medusa_vllm.core.cost_curve import CostCurves
from medusa_vllm.core.online_fit import OnlineNodeFit
from medusa_vllm.core.tree import MedusaTree

TREE = MedusaTree([[0], [1], [0, 0], [0, 1], [0, 0, 0]])  # BFS: (0,) (1,) (0,0) (0,1) (0,0,0)


def _curves(slope: dict[int, float]) -> CostCurves:
    """Tree cost 1 + slope[b] * n (n = 2..8); chains priced the same (a 1-node chain too)."""
    return CostCurves(
        vanilla_s={b: 0.05 for b in slope},
        tree={b: {n: 1.0 + s * n for n in (2, 4, 8)} for b, s in slope.items()},
        chain={b: {1: 1.0 + s} for b, s in slope.items()},
        draft={},
    )


def _fit(prior, slope=None, **kw) -> OnlineNodeFit:
    return OnlineNodeFit(paths=TREE.medusa_choices, prior=np.asarray(prior, dtype=float),
                         curves=_curves(slope or {1: 0.05, 16: 0.5}), table={1: 5, 16: 5}, **kw)


def test_observe_counts_drafted_and_accepted_nodes():
    fit = _fit([0.5] * 5, refit_every=1000)
    # request 0 drafted 5 nodes and accepted nodes 1 -> 3 -> 5; request 1 drafted 2 nodes
    # and accepted node 2; request 2 drafted nothing (its root only)
    fit.observe([5, 2, 0], np.array([[0, 1, 3, 5], [0, 2, -1, -1], [0, -1, -1, -1]]))
    assert fit.drafted.tolist() == [2, 2, 1, 1, 1]
    assert fit.hits.tolist() == [1, 1, 1, 0, 1]
    assert fit.steps == 1
    # the estimate: hits shrunk toward the prior by prior_weight pseudo-steps
    w = fit.prior_weight
    assert fit.probabilities()[3] == pytest.approx((0 + w * 0.5) / (1 + w))
    # a step where nobody drafted is not a step of the tree
    fit.observe([0, 0], np.array([[0, -1], [0, -1]]))
    assert fit.steps == 1


def test_heads_that_keep_missing_stop_being_drafted():
    # the shipped prior is hopeful: the whole tree pays at batch 1 and at batch 16
    fit = _fit([0.9, 0.5, 0.8, 0.4, 0.7], slope={1: 0.05, 16: 0.1}, refit_every=10)
    assert fit.refit() == {1: 5, 16: 5}
    # served requests never accept anything
    for _ in range(200):
        fit.observe([5, 5], np.array([[0, -1], [0, -1]]))
    assert fit.table == {1: 0, 16: 0}, fit.describe()
    assert fit.refits > 1


def test_heads_that_hit_grow_the_table_where_it_pays():
    # a pessimistic prior: nothing pays anywhere
    fit = _fit([0.05] * 5, slope={1: 0.05, 16: 1.0}, refit_every=5, probe_every=2, probe_rows=1)
    assert fit.refit() == {1: 0, 16: 0}
    # the engine drafts what the table says, and the probe one level more; every
    # drafted node on the top-1 chain (1 -> 3 -> 5) is accepted, rank 1 never
    for _ in range(300):
        n, probe_nodes, probe_rows = fit.nodes(1)
        drafted = probe_nodes if probe_rows else n
        path = [0] + [i for i in (1, 3, 5) if i <= drafted]
        fit.observe([drafted], np.array([path + [-1] * (4 - len(path))]))
    # batch 1 (cheap nodes) drafts the whole chain; batch 16 (a node costs a step) cannot pay
    assert fit.table[1] == 5, fit.describe()
    assert fit.table[16] == 0, fit.describe()
    p = fit.probabilities()
    assert p[[0, 2, 4]].min() > 0.9 and p[1] < 0.1, fit.describe()


def test_probes_one_level_past_the_table_for_a_few_rows():
    fit = _fit([0.0] * 5, probe_every=4, probe_rows=2)
    fit.refit()
    got = [fit.nodes(16) for _ in range(8)]
    # from plain decoding, a probe drafts depth 1 (nodes 1 and 2) for two requests
    assert got == [(0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 2, 2)] * 2
    fit.table = {1: 1, 16: 3}  # depth 1 (one node of it) -> probe all of depth 2: 4 nodes
    assert [fit.nodes(1) for _ in range(4)][-1] == (1, 4, 1)  # batch of one: one probe row
    assert [fit.nodes(16) for _ in range(4)][-1] == (3, 5, 2)  # depth 2 -> depth 3
    full = _fit([1.0] * 5, probe_every=1)
    full.refit()
    assert full.nodes(1) == (5, 5, 0)  # the whole tree already: nothing to probe


def test_prior_shape_is_checked():
    with pytest.raises(ValueError, match="expected 5 node probabilities"):
        _fit([0.5] * 4)


def test_a_batch_size_the_curve_never_timed_keeps_its_no_drafts_bound():
    # the start-up fit puts 0 at the first batch size it could not time (64 here): a
    # refit, which only knows costs at 1 and 16, must not drop that bound
    fit = OnlineNodeFit(paths=TREE.medusa_choices, prior=np.full(5, 0.9),
                        curves=_curves({1: 0.05, 16: 0.1}), table={1: 5, 16: 5, 64: 0},
                        refit_every=1)
    fit.observe([5], np.array([[0, 1, 3, 5]]))
    assert fit.refits == 1 and fit.table[1] > 0 and fit.table[16] > 0
    assert fit.table[64] == 0


@pytest.mark.parametrize(("batch", "first_refit_step"), [(1, 32), (4, 32), (16, 8), (64, 2)])
def test_large_batches_refit_after_enough_drafting_requests_not_32_steps(batch, first_refit_step):
    # the start-up table drafts everywhere; nothing drafted is ever accepted. A batch of
    # 16 has seen 128 drafting requests after 8 steps: that is the first refit there
    fit = _fit([0.9] * 5, slope={1: 0.05, 16: 0.1})
    assert (fit.refit_every, fit.refit_observations) == (32, 128)
    refits_before = fit.refits
    for step in range(1, 40):
        fit.observe([5] * batch, np.array([[0, -1]] * batch))
        if fit.refits > refits_before:
            break
    assert step == first_refit_step, fit.describe()
    # and the next refit is counted from there
    for _ in range(first_refit_step - 1):
        fit.observe([5] * batch, np.array([[0, -1]] * batch))
    assert fit.refits == refits_before + 1
    fit.observe([5] * batch, np.array([[0, -1]] * batch))
    assert fit.refits == refits_before + 2
