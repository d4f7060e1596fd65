"""Reproducible recipe for the Medusa heads shipped with the default model.

Builds ``medusa_vllm/assets/default_medusa_heads/`` (plain Medusa heads + calibrated
tree + accuracies; the default Hydra heads in ``assets/default_heads/`` come from
``scripts/compare_hydra.py`` and ``scripts/ship_heads.py``)
for SmolLM2-135M-Instruct with the project's own pipeline, offline
(``scripts/train_default_heads.py`` is its command line):

======== =====================================================================
stage    what it does (output in the work folder, default ``runs/default_heads``)
======== =====================================================================
prompts  train / held-out prompt sets from the offline Debian texts
         (:func:`medusa_vllm.training.prompts.build_prompt_records`, disjoint splits)
distill  self-distillation data: the backbone answers the prompts with vLLM
         (greedy, a sampled set at temperature 0.7, and further greedy answers
         to the extra train prompts), float32, eager
train    Medusa-1 heads on the frozen backbone (hidden states cached on disk),
         evaluated on the held-out distilled answers
tree     optimized sparse tree from the heads' per-rank accuracies and a
         verification cost curve (:func:`medusa_vllm.core.tree_fit.fit_tree`)
export   copy heads (bf16), ``medusa_tree.json``, ``accuracies.json`` and a
         README into the assets folder
cost     proposer cost (heads + top-k + tree build, the code path of
         ``MedusaTreeProposer.propose_tree``) vs a vanilla vLLM decode step
accept   mean accepted length through the vLLM engine on held-out prompts
medusa2  Medusa-2 (joint LoRA) comparison run from the Medusa-1 heads (this
         folder's, else the shipped ones), beside a Medusa-1 control trained as
         long on the same rows: held-out head accuracy, replayed accepted
         length, and the backbone's held-out perplexity before/after
======== =====================================================================

Every stage caches its output and is skipped when the output exists (delete the
file or folder, or force the stage, to redo it); the training stages resume
from their last checkpoint.

Modules: :mod:`.recipe` (settings, work folder), :mod:`.build` (prompts, distill,
train), :mod:`.tree`, :mod:`.export`, :mod:`.engine` (cost, accept),
:mod:`.medusa2`, and :mod:`.evaluation` (held-out measurements they share).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from pathlib import Path

from medusa_vllm.training.default_heads.build import stage_distill, stage_prompts, stage_train
from medusa_vllm.training.default_heads.engine import stage_accept, stage_cost
from medusa_vllm.training.default_heads.export import stage_export
from medusa_vllm.training.default_heads.medusa2 import stage_medusa2
from medusa_vllm.training.default_heads.recipe import (
    STAGES,
    Recipe,
    Work,
    recipe_with,
    say,
    write_json,
)
from medusa_vllm.training.default_heads.tree import stage_tree

__all__ = ["STAGES", "STAGE_RUNNERS", "Recipe", "Work", "recipe_with", "run_recipe"]

Stage = Callable[[Recipe, Work, Path, bool], None]

# stage name -> stage(recipe, work, backbone folder, force)
STAGE_RUNNERS: dict[str, Stage] = {
    "prompts": stage_prompts, "distill": stage_distill, "train": stage_train, "tree": stage_tree,
    "export": stage_export, "cost": stage_cost, "accept": stage_accept, "medusa2": stage_medusa2,
}


def run_recipe(r: Recipe, work: str | Path, stages: Sequence[str] = STAGES,
               force: Collection[str] = ()) -> None:
    """Save ``r`` as ``recipe.json`` in ``work`` and run ``stages`` in recipe order
    (those in ``force`` even if cached) on the embedded default model."""
    w = Work(Path(work))
    write_json(w / "recipe.json", asdict(r))
    bad = [s for s in list(stages) + sorted(force) if s not in STAGES]
    if bad:
        raise SystemExit(f"--stages/--force: unknown stage(s) {bad}; expected some of {STAGES}")

    from medusa_vllm.tools.default_model import default_model_dir

    model = default_model_dir()
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.perf_counter()
        STAGE_RUNNERS[stage](r, w, model, stage in force)
        say(f"{stage}: done in {time.perf_counter() - t0:.0f} s")
