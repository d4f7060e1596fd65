#!/usr/bin/env python
"""Reproducible recipe for the Medusa heads shipped with the default model.

Builds ``medusa_vllm/assets/default_medusa_heads/`` (plain Medusa heads + calibrated
tree + accuracies; the default Hydra heads in ``assets/default_heads/`` come from
``scripts/compare_hydra.py`` and ``scripts/ship_heads.py``)
for SmolLM2-135M-Instruct with the project's own pipeline, offline; the stages
(prompts, distill, train, tree, export, cost, accept, medusa2) are described in
:mod:`medusa_vllm.training.default_heads`.

Every stage caches its output and is skipped when the output exists (delete the
file or folder, or pass ``--force STAGE``, to redo it); the training stages resume
from their last checkpoint. Run all stages::

    .venv/bin/python scripts/train_default_heads.py

or some of them::

    .venv/bin/python scripts/train_default_heads.py --stages prompts,distill
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medusa_vllm.training.default_heads import STAGES, recipe_with, run_recipe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "default_heads"), help="work folder (caches)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list from {STAGES}")
    ap.add_argument("--force", default="", help="comma list of stages to redo even if cached")
    ap.add_argument("--recipe", default=None, help="JSON file overriding Recipe fields")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override Recipe fields (JSON values), e.g. --set epochs=2 num_heads=3")
    args = ap.parse_args(argv)
    run_recipe(recipe_with(args.recipe, args.set), args.work,
               stages=[s for s in args.stages.split(",") if s],
               force={s for s in args.force.split(",") if s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
