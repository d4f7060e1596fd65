"""scripts/ship_heads.py: a compare_hydra result becomes a heads folder the engine reads
as it reads the shipped one (tree "auto" statistics, fallback tree, accuracies)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medusa_vllm.checkpoints import load_heads, save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_fit import expected_accept_length, read_per_rank_accuracy
from medusa_vllm.engine.options import MedusaTreeConfig

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ship_heads.py"
PER_RANK = [[0.50, 0.12, 0.06], [0.30, 0.10, 0.05], [0.20, 0.08, 0.04]]


def _load_script():
    spec = importlib.util.spec_from_file_location("ship_heads", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scores(per_rank, shift=0.0):
    cum = [[sum(r[: j + 1]) for j in range(len(r))] for r in per_rank]
    return {"top1": [c[0] + shift for c in cum], "top5": [c[-1] for c in cum],
            "per_rank_accuracy": per_rank, "topk_cumulative": cum, "positions": [100] * 3,
            "replayed": {"chain-2": 1.4, "sparse-64": 1.9}}


@pytest.fixture
def work(tmp_path):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=16, vocab_size=64, num_heads=3))
    save_heads(heads, tmp_path / "cmp" / "medusa-ft" / "heads-bf16", dtype=torch.bfloat16)
    curve = {"key": {"cpu_model": "Test CPU", "isa": "avx2", "dtype": "float32", "threads": 2},
             "curves": {"vanilla_s": {"1": 0.03, "8": 0.05},
                        "tree": {"1": {"2": 1.1, "4": 1.2, "8": 1.4, "16": 1.8},
                                 "8": {"2": 1.6, "4": 2.2}},
                        "chain": {"1": {"1": 1.02, "2": 1.05, "3": 1.1}, "8": {"1": 1.3}}}}
    (tmp_path / "curve.json").write_text(json.dumps(curve))
    return tmp_path


def _compare(work, bf16_shift=0.0):
    every = [[x * 0.8 for x in r] for r in PER_RANK]
    results = {"train_rows": 10, "medusa-ft": {"everyday": _scores(every), "corpus": _scores(PER_RANK)},
               "medusa-ft-bf16": {"everyday": _scores(every, bf16_shift),
                                  "corpus": _scores(PER_RANK)}}
    path = work / "cmp" / "compare.json"
    path.write_text(json.dumps(results))
    return path, every


def test_shipped_folder_is_what_tree_auto_and_the_fallback_read(work):
    compare, every = _compare(work)
    dest = work / "shipped"
    assert _load_script().main(["--compare", str(compare), "--variant", "medusa-ft",
                                "--stats", "everyday", "--curve", str(work / "curve.json"),
                                "--dest", str(dest)]) == 0
    assert load_heads(dest).config.num_heads == 3
    per_rank, source = read_per_rank_accuracy(dest)
    assert torch.tensor(per_rank).tolist() == torch.tensor(every).tolist()
    assert "medusa_tree.json" in source
    info = json.loads((dest / "medusa_tree.json").read_text())
    tree = MedusaTree.load(dest / "medusa_tree.json", 3)
    assert info["expected_accept_length"] == pytest.approx(
        expected_accept_length(every, tree.medusa_choices))
    cfg = MedusaTreeConfig.from_dict({"heads": str(dest), "cost_curve": "off"})
    assert cfg.load_tree() == tree
    table = cfg.load_nodes_by_batch(tree)
    assert table[1] == tree.num_nodes and table[8] <= table[1]
    acc = json.loads((dest / "accuracies.json").read_text())
    assert acc[0][0] == pytest.approx(every[0][0])
    assert set(info["heldout"]) == {"everyday", "corpus"}
    assert "| everyday |" in (dest / "README.md").read_text()


def test_a_bf16_export_that_predicts_differently_is_refused(work):
    compare, _ = _compare(work, bf16_shift=0.02)
    with pytest.raises(SystemExit, match="bf16 top-1 differs"):
        _load_script().main(["--compare", str(compare), "--variant", "medusa-ft",
                             "--curve", str(work / "curve.json"), "--dest", str(work / "x")])
    assert not (work / "x").exists()
