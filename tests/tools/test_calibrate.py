"""Calibration fit: the tree chosen from accuracies + a cost curve."""

import itertools

import pytest
import torch

from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import (
    expected_accept_length,
    fit_tree,
    interpolate_cost,
    tree_from_accuracies,
)

ACC = [[0.55, 0.12, 0.05, 0.03], [0.35, 0.1, 0.04, 0.02], [0.25, 0.07, 0.03, 0.02]]


def test_interpolate_cost_is_piecewise_linear():
    cost = interpolate_cost({4: 1.2, 16: 2.0})
    assert cost(0) == 1.0 and cost(4) == pytest.approx(1.2) and cost(16) == pytest.approx(2.0)
    assert cost(2) == pytest.approx(1.1)
    assert cost(10) == pytest.approx(1.6)
    assert cost(28) == pytest.approx(2.8)  # last slope extrapolated
    with pytest.raises(ValueError):
        interpolate_cost({})


def _brute_best(acc, cost, max_nodes):
    """Best prefix-closed tree over ALL shapes of every size (tiny space), by brute force."""
    universe = [p for d in range(1, 3) for p in itertools.product(range(2), repeat=d)]
    best = (None, -1.0)
    for size in range(1, max_nodes + 1):
        for combo in itertools.combinations(universe, size):
            s = set(combo)
            if all(len(p) == 1 or p[:-1] in s for p in combo):
                sp = expected_accept_length(acc, combo) / cost(size)
                if sp > best[1] + 1e-12:
                    best = (combo, sp)
    return best


@pytest.mark.parametrize("slope", [0.01, 0.1, 0.3])
def test_fit_matches_brute_force(slope):
    acc = [[0.6, 0.2], [0.4, 0.15]]
    curve = {n: 1.0 + slope * n for n in (1, 2, 4, 6)}
    tree, exp_len, speed = fit_tree(acc, curve, max_nodes=6)
    paths, best_speed = _brute_best(acc, interpolate_cost(curve), 6)
    assert speed == pytest.approx(best_speed)
    assert exp_len == pytest.approx(expected_accept_length(acc, paths))
    assert tree.num_nodes == len(paths)


def test_steeper_cost_prefers_smaller_trees():
    flat = fit_tree(ACC, {1: 1.01, 64: 1.2}, 64)[0]
    steep = fit_tree(ACC, {1: 1.05, 64: 5.0}, 64)[0]
    assert isinstance(flat, MedusaTree) and steep.num_nodes < flat.num_nodes
    assert torch.equal(steep.tree_mask, tree_from_accuracies(ACC, steep.num_nodes).tree_mask)


def test_fit_nodes_by_batch_shrinks_with_steeper_curves_and_matches_brute_force():
    from medusa_vllm.core.tree_fit import fit_nodes_by_batch

    tree = tree_from_accuracies(ACC, 16)
    curves = {1: {1: 1.02, 16: 1.3}, 8: {1: 1.3, 16: 4.0}, 64: {1: 2.5, 16: 20.0}}
    table = fit_nodes_by_batch(tree, ACC, curves)
    assert set(table) == {1, 8, 64}
    assert table[1] >= table[8] >= table[64]
    assert table[64] == 0  # each drafted node costs more than it can return: no speculation
    assert table[1] > 0
    for bs, curve in curves.items():  # brute force over every BFS prefix (and 0)
        cost = interpolate_cost(curve)
        speeds = [1.0] + [expected_accept_length(ACC, tree.truncate(n).medusa_choices) / cost(n)
                          for n in range(1, 17)]
        assert speeds[table[bs]] == pytest.approx(max(speeds))


def test_cost_curve_rounds_interleave_and_take_the_median(tmp_path):
    """Each round times vanilla first, then every size (order alternating), and
    divides by its own round's vanilla: a machine that slows down 2x between
    rounds leaves the ratios intact; an outlier round is voted out by the median."""
    from medusa_vllm.tools.calibrate import measure_cost_curve
    from medusa_vllm.tools.tiny_models import write_medusa_heads_config

    heads = write_medusa_heads_config(tmp_path / "heads", num_heads=4)
    true_cost = {1: 1.2, 4: 1.5, 16: 2.5}
    calls = []

    def fake_run(spec):
        rnd = sum(c == "vanilla" for c in calls) - (spec["name"] != "vanilla")
        calls.append(spec["name"])
        slow = [1.0, 2.0, 1.0][rnd]  # the machine runs at half speed in round 2
        tokens, acc = 100, 1.6
        if spec["name"] == "vanilla":
            return {"wall_s": 0.01 * tokens * slow, "output_tokens": tokens,
                    "spec": {"mean_accepted_length": 1.0}}
        n = int(spec["name"].split("-")[1])
        assert spec["speculative_config"]["nodes_by_batch"] == "off"
        assert len(spec["speculative_config"]["tree"]) == n  # the BFS-first n nodes
        cost = true_cost[n] * (3.0 if (rnd == 2 and n == 4) else 1.0)  # one outlier timing
        return {"wall_s": 0.01 * cost * (tokens / acc) * slow, "output_tokens": tokens,
                "spec": {"mean_accepted_length": acc}}

    curve = measure_cost_curve("model", str(heads), [1, 4, 16], 1, repeats=3, run=fake_run)
    assert calls == ["vanilla", "tree-1", "tree-4", "tree-16", "vanilla", "tree-16", "tree-4",
                     "tree-1", "vanilla", "tree-1", "tree-4", "tree-16"]
    assert curve.keys() == true_cost.keys()
    for n, c in true_cost.items():
        assert abs(curve[n] - c) < 1e-9, (n, curve[n], c)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_cost_curve("model", str(heads), [1], 1, repeats=0, run=fake_run)


def test_cheaper_chains_compete_with_trees():
    """Chains verify through the causal kernel: with their own (cheaper) curve a
    chain wins when it gives more expected tokens per unit cost, and every
    candidate's speed matches a direct computation."""
    from medusa_vllm.core.tree_fit import fit_nodes_by_batch, is_chain, prefix_cost

    acc = [[0.5, 0.1, 0.05], [0.45, 0.1, 0.05], [0.4, 0.1, 0.05]]
    curve = {1: 1.4, 2: 1.5, 4: 1.55, 8: 1.65}
    tree, _, speed = fit_tree(acc, curve, 8)
    assert not is_chain(tree)
    chain_curve = {1: 1.05, 2: 1.1, 3: 1.15}
    best, exp_len, best_speed = fit_tree(acc, curve, 8, chain_curve)
    speeds = {d: expected_accept_length(acc, MedusaTree.chain(d).medusa_choices) / c
              for d, c in chain_curve.items()}
    d = max(speeds, key=speeds.get)
    assert is_chain(best) and best.num_nodes == d
    assert best_speed == pytest.approx(speeds[d]) and best_speed > speed
    assert exp_len == pytest.approx(expected_accept_length(acc, MedusaTree.chain(d).medusa_choices))
    # expensive chains: the tree stays
    assert not is_chain(fit_tree(acc, curve, 8, {1: 3.0, 2: 3.0, 3: 3.0})[0])
    # prefixes: chain-shaped ones take the chain curve's price, others the tree curve
    wide = MedusaTree([[0], [1], [0, 0]])
    assert prefix_cost(wide, 1, curve, chain_curve) == pytest.approx(1.05)
    assert prefix_cost(wide, 2, curve, chain_curve) == pytest.approx(1.5)
    assert prefix_cost(wide, 1, curve) == pytest.approx(1.4)
    chain = MedusaTree.chain(3)
    table = fit_nodes_by_batch(chain, acc, {1: curve}, {1: chain_curve})
    assert table[1] == d


def test_cost_curves_time_chains_against_the_same_vanilla(tmp_path):
    from medusa_vllm.tools.calibrate import measure_cost_curves
    from medusa_vllm.tools.tiny_models import write_medusa_heads_config

    heads = write_medusa_heads_config(tmp_path / "heads", num_heads=3)
    true_cost = {"tree-2": 1.6, "tree-4": 1.9, "chain-1": 1.1, "chain-3": 1.3}
    calls = []

    def fake_run(spec):
        calls.append(spec["name"])
        if spec["name"] == "vanilla":
            return {"wall_s": 1.0, "output_tokens": 100, "spec": {"mean_accepted_length": 1.0}}
        tree = spec["speculative_config"]["tree"]
        if spec["name"].startswith("chain"):
            assert tree == MedusaTree.chain(int(spec["name"].split("-")[1])).to_list()
        return {"wall_s": true_cost[spec["name"]] / 2.0, "output_tokens": 100,
                "spec": {"mean_accepted_length": 2.0}}

    trees, chains = measure_cost_curves("model", str(heads), [2, 4], [1, 3], 1, repeats=1,
                                        run=fake_run)
    assert calls == ["vanilla", "tree-2", "tree-4", "chain-1", "chain-3"]
    assert trees == pytest.approx({2: 1.6, 4: 1.9}) and chains == pytest.approx({1: 1.1, 3: 1.3})
    with pytest.raises(ValueError, match="chain depths"):
        measure_cost_curves("model", str(heads), [2], [4], 1, run=fake_run)


def test_noisy_cost_points_never_make_a_bigger_draft_cheaper():
    """A measured point below a smaller draft's (or below vanilla's 1.0) is timing
    noise: it is priced at the running maximum, so it cannot win the fit."""
    from medusa_vllm.core.tree_fit import fit_nodes_by_batch, monotone_curve, prefix_cost

    assert monotone_curve({1: 1.16, 2: 1.06, 3: 1.27, 4: 1.36}) == {1: 1.16, 2: 1.16, 3: 1.27, 4: 1.36}
    assert monotone_curve({2: 0.97, 4: 1.2}) == {2: 1.0, 4: 1.2}
    cost = interpolate_cost({4: 1.5, 8: 1.3, 16: 2.0})
    assert cost(8) == pytest.approx(1.5) and cost(6) == pytest.approx(1.5)
    # the session-5 shape: chain-2 measured below chain-1; equal accuracy at depth 2
    # only just pays for it once priced honestly
    acc = [[0.42, 0.1], [0.2, 0.05]]
    noisy = {1: 1.16, 2: 1.06}
    chain2 = MedusaTree.chain(2)
    assert prefix_cost(chain2, 2, {2: 1.4}, noisy) == pytest.approx(1.16)
    best, _, speed = fit_tree(acc, {2: 1.4, 4: 1.6}, 4, noisy)
    e1, e2 = (expected_accept_length(acc, MedusaTree.chain(d).medusa_choices) for d in (1, 2))
    assert speed == pytest.approx(max(e1, e2) / 1.16)
    assert best.num_nodes == (2 if e2 > e1 else 1)
    # with depth 2 useless, chain-1 wins though chain-2's raw point was cheaper
    weak = [[0.42, 0.1], [0.0, 0.0]]
    assert fit_tree(weak, {2: 1.4, 4: 1.6}, 4, noisy)[0].num_nodes == 1
    assert fit_nodes_by_batch(chain2, weak, {1: {2: 1.4}}, {1: noisy})[1] == 1


def test_calibrate_cli_fits_a_tree_and_replays_it_on_the_data(tmp_path, monkeypatch):
    """``medusa-vllm calibrate --data``: accuracies measured on the data, the tree fitted
    to a (here synthetic) cost curve, and its accepted length replayed on the data."""
    import argparse
    import json

    import medusa_vllm.tools.calibrate as C
    from medusa_vllm.core.tree_stats import simulate_acceptance
    from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

    model = build_tiny_llama(tmp_path / "model", vocab=128, hidden=32, layers=1, seed=0)
    heads = distill_tiny_heads(model, tmp_path / "heads", num_heads=3, steps=60, num_sequences=64)
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(f"w{int(i)}" for i in torch.randint(0, 40, (30,), generator=g))}
            for _ in range(6)]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    timed = []

    def fake_curves(model_, heads_, sizes, chains, bs, **kw):
        timed.append(bs)
        return ({n: 1.0 + 0.05 * n for n in sizes}, {d: 1.0 + 0.04 * d for d in chains})

    monkeypatch.setattr(C, "measure_cost_curves", fake_curves)
    p = C.add_calibrate_args(argparse.ArgumentParser())
    args = p.parse_args(["--model", str(model), "--heads", str(heads), "--data", str(data),
                         "--sizes", "2,4,8", "--max-nodes", "8", "--cost", "e2e"])
    assert C.calibrate_main(args) == 0 and timed == [1]
    tree = MedusaTree.load(heads / "medusa_tree.json")
    saved = json.loads((heads / "medusa_tree.json").read_text())
    acc_rows = json.loads((heads / "eval.json").read_text())["per_rank"]
    assert saved["per_rank_accuracy"] == acc_rows  # what tree="auto" fits from in engines

    # --cost engine: the engine's own start-up fit (faked here), saved as the fallback
    seen = {}

    def fake_startup(model_, heads_, **kw):
        seen["stats"] = json.loads((heads / "medusa_tree.json").read_text())["per_rank_accuracy"]
        return {"key": {"cpu_model": "cpu", "isa": "avx2", "dtype": "float32", "threads": 2,
                        "tensor_parallel": 1, "model": model_, "heads": "3x1", "vllm": "0.32.0",
                        "kernel": "fused"},
                "curves": {"vanilla_s": {"1": 0.01}, "tree": {"1": {"2": 1.1}},
                           "chain": {"1": {"1": 1.02}}, "draft": {}, "context": 256, "seconds": 2.0},
                "tree": [[0], [1]], "nodes_by_batch": {"1": 2, "4": 0}, "describe": "tree of 2",
                "origin": "measured now", "source": "medusa_tree.json"}

    monkeypatch.setattr(C, "measure_startup_fit", fake_startup)
    args = p.parse_args(["--model", str(model), "--heads", str(heads)])
    assert C.calibrate_main(args) == 0
    assert seen["stats"] == acc_rows  # written before the engine started
    saved = json.loads((heads / "medusa_tree.json").read_text())
    assert saved["medusa_choices"] == [[0], [1]] and saved["nodes_by_batch"] == {"1": 2, "4": 0}
    assert saved["per_rank_accuracy"] == acc_rows and saved["machine"]["isa"] == "avx2"
    # back to the e2e tree for the checks below
    args = p.parse_args(["--model", str(model), "--heads", str(heads), "--data", str(data),
                         "--sizes", "2,4,8", "--max-nodes", "8", "--cost", "e2e"])
    assert C.calibrate_main(args) == 0
    tree = MedusaTree.load(heads / "medusa_tree.json")
    res = json.loads((heads / "calibration.json").read_text())
    fitted = res["trees"]["1"]
    assert fitted["medusa_choices"] == tree.to_list() and 1 <= tree.num_nodes <= 8
    acc = C.measure_accuracies(str(model), str(heads), [str(data)], collect_ranks=True)
    replay = simulate_acceptance(tree, acc.ranks)
    assert fitted["replayed_accept_length"] == pytest.approx(replay.mean_accepted_length)
    assert 1.0 <= replay.mean_accepted_length <= 1.0 + tree.max_depth
    assert (heads / "accuracy.png").is_file() and (heads / "cost_curve.png").is_file()
