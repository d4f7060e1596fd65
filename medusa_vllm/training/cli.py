"""``medusa-vllm train`` and ``medusa-vllm distill`` command-line glue.

:func:`add_train_args` / :func:`train_main` and :func:`add_distill_args` /
:func:`distill_main` are wired into :mod:`medusa_vllm.tools.cli`; the same flags work
as ``python -m medusa_vllm.training.cli ...``. Every flag maps to one
:class:`~medusa_vllm.training.config.TrainConfig` field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medusa_vllm.training.config import (
    CACHE_MODES,
    DTYPES,
    HEAD_TYPES,
    HEADS_LAYOUTS,
    HEADS_LOSSES,
    LAMBDA0_SCHEDULES,
    LOSS_ON,
    LR_SCHEDULERS,
    RECIPES,
    TEXT_SAMPLE_BY,
    TrainConfig,
    TrainingError,
)
from medusa_vllm.training.distill import add_distill_args, distill_main

__all__ = ["add_distill_args", "add_train_args", "config_from_args", "distill_main", "main",
           "train_main"]


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``medusa-vllm train`` flags to ``parser``."""
    d = TrainConfig(model="", output="")
    g = parser.add_argument_group("run")
    g.add_argument("--model", required=True, help="HF backbone folder (config.json, weights, tokenizer)")
    g.add_argument("--data", nargs="*", default=[], metavar="FILE",
                   help="training files: .jsonl/.json rows with text | prompt+response | "
                        "conversations (ShareGPT) | messages | prompt_token_ids+response_token_ids; "
                        ".txt/.md plain text. With --self-distill: prompts (or generated data)")
    g.add_argument("--output", required=True, help="output folder (heads/, model/, accuracies.json ...)")
    g.add_argument("--recipe", choices=RECIPES, default=d.recipe,
                   help="medusa1: frozen backbone, heads only; medusa2: joint training (LoRA)")
    g.add_argument("--self-distill", action="store_true",
                   help="train on the backbone's own vLLM generations; KL to the teacher "
                        "(backbone with adapters disabled) for the backbone loss")
    g.add_argument("--overwrite", action="store_true",
                   help="replace this run's files in a non-empty --output")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --output (or the given step-N folder)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = parser.add_argument_group("heads")
    g.add_argument("--head-type", choices=HEAD_TYPES, default=d.head_type,
                   help="medusa: independent heads; hydra: each head also reads the tokens "
                        "on its tree path (sequentially dependent, arXiv 2402.05109)")
    g.add_argument("--num-heads", type=int, default=d.num_heads, help="Medusa heads (default %(default)s)")
    g.add_argument("--num-layers", type=int, default=d.num_layers, help="ResBlocks per head")
    g.add_argument("--draft-vocab-size", type=_opt_int, default=None,
                   help="reduced draft vocabulary: the N most frequent target tokens")
    g.add_argument("--original-lm-head", action="store_true",
                   help="all heads share the backbone's (frozen) lm_head")
    g.add_argument("--heads-init", default=None, metavar="DIR", help="continue from these heads")
    g.add_argument("--heads-layout", choices=HEADS_LAYOUTS, default=d.heads_layout,
                   help="layout of the saved heads (default %(default)s)")

    g = parser.add_argument_group("data")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="max tokens per row")
    g.add_argument("--eval-data", nargs="*", default=[], metavar="FILE",
                   help="held-out files (default: --eval-fraction of --data)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="share of rows held out for the final accuracy eval (0 = none)")
    g.add_argument("--max-eval-rows", type=int, default=d.max_eval_rows)
    g.add_argument("--loss-on", choices=LOSS_ON, default=d.loss_on,
                   help="auto: assistant/response tokens of chat rows, all tokens of text rows")
    g.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default=d.text_sample_by,
                   help="rows of plain-text files")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--lr", type=float, default=None,
                   help="medusa1: heads lr (default 1e-3); medusa2: backbone lr (default 1e-4), "
                        "heads get lr x --heads-lr-multiplier")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler)
    g.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--lambda-decay", type=float, default=d.lambda_decay,
                   help="head k's loss weight is decay**k (default %(default)s)")
    g.add_argument("--head-weights", type=float, nargs="+", default=None,
                   help="explicit per-head loss weights (overrides --lambda-decay)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="backbone compute dtype")
    g.add_argument("--cache-hidden", choices=CACHE_MODES, default=d.cache_hidden,
                   help="medusa1: compute backbone hidden states once, in memory or in a file "
                        "under OUTPUT/cache (auto: memory if the run sees the data more than "
                        "once and the cache fits in --cache-max-gb)")
    g.add_argument("--cache-dtype", choices=DTYPES, default=d.cache_dtype)
    g.add_argument("--cache-max-gb", type=float, default=d.cache_max_gb)

    g = parser.add_argument_group("medusa2")
    g.add_argument("--lambda0", type=float, default=d.lambda0, help="heads loss weight")
    g.add_argument("--lambda0-schedule", choices=LAMBDA0_SCHEDULES, default=d.lambda0_schedule)
    g.add_argument("--lambda0-warmup-steps", type=_opt_int, default=None,
                   help="steps for lambda0 to ramp from 0 (default 10%% of the joint steps)")
    g.add_argument("--heads-only-steps", type=int, default=d.heads_only_steps,
                   help="first stage: train only the heads for N steps")
    g.add_argument("--heads-lr-multiplier", type=float, default=d.heads_lr_multiplier)
    g.add_argument("--full-finetune", dest="lora", action="store_false",
                   help="train every backbone weight instead of LoRA adapters")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank)
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="module names for LoRA (default: all linear layers but lm_head)")
    g.add_argument("--no-merge", dest="merge_lora", action="store_false",
                   help="save only the LoRA adapter, not the merged backbone in model/")

    g = parser.add_argument_group("self-distillation")
    g.add_argument("--distill-heads-loss", choices=HEADS_LOSSES, default=d.distill_heads_loss,
                   help="heads: ce on the generated tokens (default) or kl to the teacher")
    g.add_argument("--distill-top-k", type=_opt_int, default=None,
                   help="keep only the teacher's top-k logits (memory)")
    g.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    g.add_argument("--distill-top-p", type=float, default=d.distill_top_p)
    g.add_argument("--distill-max-tokens", type=int, default=d.distill_max_tokens)
    g.add_argument("--distill-num-prompts", type=_opt_int, default=None)

    g = parser.add_argument_group("bookkeeping")
    g.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint period (0 = end only)")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit)
    g.add_argument("--log-steps", type=int, default=d.log_steps)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed :func:`add_train_args` flags."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def train_main(args: argparse.Namespace) -> int:
    """Run ``medusa-vllm train``: 0 on success, 2 on bad input (message on stderr)."""
    from medusa_vllm.training.trainer import train

    try:
        result = train(config_from_args(args))
    except TrainingError as exc:
        print(f"medusa-vllm train: error: {exc}", file=sys.stderr)
        return 2
    print(f"heads: {result.heads_dir}")
    if result.model_dir:
        print(f"backbone: {result.model_dir}")
    if result.adapter_dir:
        print(f"adapter: {result.adapter_dir}")
    if result.accuracy is not None:
        print("held-out top-k accuracy (cumulative, per head):")
        print(result.accuracy.table())
        print(f"accuracies: {result.output / 'accuracies.json'}")
    print(f"speed: {result.steps_per_second:.2f} steps/s, {result.tokens_per_second:.0f} tokens/s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medusa_vllm.training.cli {train,distill} ...``"""
    p = argparse.ArgumentParser(prog="python -m medusa_vllm.training.cli")
    sub = p.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train", help="train Medusa heads")).set_defaults(func=train_main)
    add_distill_args(sub.add_parser("distill", help="generate self-distillation data")
                     ).set_defaults(func=distill_main)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
