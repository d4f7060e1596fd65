"""The default-heads recipe's fast parts (medusa_vllm.training.default_heads):
settings overrides, the work folder's files, the stage table."""

from __future__ import annotations

import json

import pytest

from medusa_vllm.training.default_heads import STAGE_RUNNERS, STAGES, run_recipe
from medusa_vllm.training.default_heads.recipe import (
    Recipe,
    Work,
    extra_chunks,
    recipe_with,
    train_files,
)


def test_recipe_overrides_from_a_file_then_settings(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"epochs": 2.0, "num_heads": 3}))
    r = recipe_with(f, ["num_heads=5", 'cost_curves={"1": [2]}'])
    assert (r.epochs, r.num_heads, r.cost_curves) == (2.0, 5, {"1": [2]})
    assert recipe_with() == Recipe()
    with pytest.raises(SystemExit, match="unknown Recipe field 'nope'"):
        recipe_with(sets=["nope=1"])


def test_extra_prompt_files_come_in_whole_chunks(tmp_path):
    r = Recipe(extra_train_prompts=5000, extra_chunk=2000)
    assert extra_chunks(r) == [(0, 2000), (2000, 4000), (4000, 5000)]
    assert extra_chunks(Recipe(extra_train_prompts=0)) == []
    w = Work(tmp_path / "w")
    assert w.root.is_dir() and w / "x.json" == tmp_path / "w" / "x.json"
    assert train_files(r, w) == [w.distill_train, w.distill_sampled] + [w.distill_extra(i) for i in range(3)]
    assert train_files(Recipe(sampled_prompts=0, extra_train_prompts=0), w) == [w.distill_train]
    assert w.distill_extra(1).name == "distill-train-extra-1-greedy.jsonl"


def test_every_stage_has_a_runner_and_unknown_stages_are_refused(tmp_path):
    assert tuple(STAGE_RUNNERS) == STAGES
    with pytest.raises(SystemExit, match=r"unknown stage\(s\) \['bogus'\]"):
        run_recipe(Recipe(), tmp_path / "w", stages=["bogus"])
    assert json.loads((tmp_path / "w" / "recipe.json").read_text())["num_heads"] == Recipe().num_heads
