"""Training Medusa heads: Medusa-1, Medusa-2 and self-distillation.

Python API::

    from medusa_vllm.training import TrainConfig, train

    result = train(TrainConfig(model="path/to/backbone", data=["chat.jsonl"],
                               output="runs/m1", recipe="medusa1", num_heads=4,
                               max_steps=500))
    result.heads_dir          # heads folder for vLLM / medusa-vllm serve
    result.accuracies         # [num_heads][10] cumulative top-k accuracy (held out)

Modules: :mod:`.config` (options), :mod:`.data` (files -> batches),
:mod:`.losses` (objectives, schedules), :mod:`.trainer` (the loop, checkpoints),
:mod:`.cache` (frozen-backbone hidden states), :mod:`.distill` (vLLM
generations for self-distillation), :mod:`.evaluate` (per-head top-k accuracy),
:mod:`.cli` (``medusa-vllm train`` / ``distill``), :mod:`.prompts` (prompt sets from
:mod:`.corpora`, the readers of the offline Debian text corpora).
"""

from medusa_vllm.training.config import RECIPES, TrainConfig, TrainingError

__all__ = [
    "RECIPES",
    "HeadAccuracy",
    "MedusaTrainer",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "evaluate_heads",
    "generate_distill_data",
    "train",
]


def __getattr__(name: str):
    # Heavy modules (transformers, datasets, vllm) load on first use.
    if name in ("MedusaTrainer", "TrainResult", "train"):
        from medusa_vllm.training import trainer

        return getattr(trainer, name)
    if name in ("HeadAccuracy", "evaluate_heads"):
        from medusa_vllm.training import evaluate

        return getattr(evaluate, name)
    if name == "generate_distill_data":
        from medusa_vllm.training.distill import generate_distill_data

        return generate_distill_data
    raise AttributeError(f"module 'medusa_vllm.training' has no attribute {name!r}")
