"""Training options: one :class:`TrainConfig` for Medusa-1, Medusa-2 and self-distillation.

Recipes (Cai et al. 2024, "Medusa"):

``medusa1``
    Frozen backbone; only the heads train. Loss ``sum_k lambda_k * CE_k`` where
    head ``k`` (0-based) at position ``t`` predicts the token at ``t + k + 2``
    and ``lambda_k = lambda_decay ** k`` (0.8 by default).
``medusa2``
    Joint training: ``L = L_lm + lambda0(step) * sum_k lambda_k * CE_k``; the
    backbone trains through LoRA (default) or fully; the heads' learning rate is
    ``heads_lr_multiplier`` times the backbone's; ``lambda0`` warms up from 0
    (``lambda0_schedule`` over ``lambda0_warmup_steps``); an optional heads-only
    first stage (``heads_only_steps``) trains the heads on the frozen backbone.

Self-distillation (``self_distill``): the training texts are the backbone's own
generations (see :mod:`medusa_vllm.training.distill`). The backbone's next-token
loss becomes ``KL(teacher || student)`` with the teacher = the same model with
its LoRA adapters disabled (Medusa-2 only). The heads use ``distill_heads_loss``:
``"ce"`` against the generated tokens (the teacher's own samples; the default,
what the paper does for Medusa-1) or ``"kl"`` against the teacher's distribution
at the head's target position (for Medusa-1 the frozen backbone is the teacher).

Head types (``head_type``): ``"medusa"`` (independent heads on the last hidden
state) or ``"hydra"`` (:mod:`medusa_vllm.core.hydra`: head ``k`` also reads the
tokens on its path, teacher-forced with the ground-truth tokens ``t+1 .. t+k+1``);
every recipe above trains either.

Every problem raises :class:`TrainingError` naming the field (or file), what
was expected and what was found, and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_vllm.checkpoints.common import WRITE_LAYOUTS
from medusa_vllm.core.dict_fields import DictFields
from medusa_vllm.core.dtypes import TORCH_DTYPES

__all__ = [
    "RECIPES",
    "TrainConfig",
    "TrainingError",
]

RECIPES = ("medusa1", "medusa2")
HEAD_TYPES = ("medusa", "hydra")
LAMBDA0_SCHEDULES = ("sine", "linear", "constant")
LR_SCHEDULERS = ("cosine", "linear", "constant")
CACHE_MODES = ("auto", "none", "memory", "disk")
DTYPES = tuple(TORCH_DTYPES)
LOSS_ON = ("auto", "all")
HEADS_LOSSES = ("ce", "kl")
HEADS_LAYOUTS = WRITE_LAYOUTS
TEXT_SAMPLE_BY = ("paragraph", "line", "document")

# Learning rate when ``lr`` is None: heads' lr for medusa1, backbone's for medusa2.
DEFAULT_LR = {"medusa1": 1e-3, "medusa2": 1e-4}


class TrainingError(ValueError):
    """Bad training input: the message names the file/field, what was expected,
    what was found and how to fix it."""


@dataclass
class TrainConfig(DictFields):
    """All options of a training run (CLI flags map 1:1, ``_`` -> ``-``).

    Paths:
        model: HF backbone folder (``config.json`` + safetensors + tokenizer).
        output: output folder; must not exist or be empty unless ``overwrite``
            or ``resume``.
        data: training files (``.jsonl``/``.json``: rows with ``text``,
            ``prompt`` + ``response``, ShareGPT ``conversations``, ``messages``,
            or ``prompt_token_ids`` + ``response_token_ids``; ``.txt``/``.md``:
            plain text). With ``self_distill`` rows without responses are
            prompts to generate from.
        eval_data: held-out files; default: ``eval_fraction`` of ``data``.
        heads_init: existing heads folder to continue training from.
    """

    model: str
    output: str
    data: list[str] = field(default_factory=list)
    recipe: str = "medusa1"

    # heads
    head_type: str = "medusa"
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab_size: int | None = None
    original_lm_head: bool = False
    heads_init: str | None = None
    heads_layout: str = "medusa_vllm"

    # data
    seq_len: int = 512
    eval_data: list[str] = field(default_factory=list)
    eval_fraction: float = 0.05
    max_eval_rows: int = 256
    loss_on: str = "auto"
    text_sample_by: str = "paragraph"

    # optimisation
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    lambda_decay: float = 0.8
    head_weights: list[float] | None = None
    seed: int = 0
    dtype: str = "float32"

    # medusa1
    cache_hidden: str = "auto"
    cache_dtype: str = "float32"
    cache_max_gb: float = 4.0

    # medusa2
    lambda0: float = 0.2
    lambda0_schedule: str = "sine"
    lambda0_warmup_steps: int | None = None
    heads_only_steps: int = 0
    heads_lr_multiplier: float = 4.0
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    merge_lora: bool = True

    # self-distillation
    self_distill: bool = False
    distill_heads_loss: str = "ce"
    distill_top_k: int | None = None
    distill_temperature: float = 0.0
    distill_top_p: float = 1.0
    distill_max_tokens: int = 256
    distill_num_prompts: int | None = None

    # bookkeeping
    save_steps: int = 200
    save_total_limit: int = 2
    log_steps: int = 10
    resume: bool | str = False
    overwrite: bool = False
    progress: bool = True

    # ------------------------------------------------------------- derived
    @property
    def base_lr(self) -> float:
        """``lr`` or the recipe's default (heads' lr for medusa1, backbone's for medusa2)."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.recipe, 1e-3)

    @property
    def heads_lr(self) -> float:
        """Learning rate of the heads' parameter group."""
        if self.recipe == "medusa1":
            return self.base_lr
        return self.base_lr * self.heads_lr_multiplier

    @property
    def backbone_lr(self) -> float | None:
        """Learning rate of the backbone's parameter group (None for medusa1)."""
        return None if self.recipe == "medusa1" else self.base_lr

    @property
    def effective_lambda0_warmup_steps(self) -> int:
        """``lambda0_warmup_steps``, default 10% of the joint-training steps."""
        if self.lambda0_warmup_steps is not None:
            return self.lambda0_warmup_steps
        return max(1, (self.max_steps - self.heads_only_steps) // 10)

    def resolve_cache_mode(self, train_tokens: int, hidden_size: int, train_rows: int) -> str:
        """``cache_hidden`` with ``"auto"`` resolved: ``"memory"`` for Medusa-1 runs
        that see the data more than once if the cache fits in ``cache_max_gb``,
        else ``"none"``."""
        if self.cache_hidden != "auto":
            return self.cache_hidden
        if self.recipe != "medusa1":
            return "none"
        epochs = self.max_steps * self.grad_accum * self.batch_size / max(1, train_rows)
        item = 2 if self.cache_dtype in ("bfloat16", "float16") else 4
        fits = train_tokens * hidden_size * item <= self.cache_max_gb * 2**30
        return "memory" if epochs > 1 and fits else "none"

    def head_loss_weights(self) -> list[float]:
        """``lambda_k`` per head: ``head_weights`` or ``lambda_decay ** k``."""
        if self.head_weights is not None:
            return [float(w) for w in self.head_weights]
        return [self.lambda_decay**k for k in range(self.num_heads)]

    # ------------------------------------------------------------ checking
    def validate(self) -> "TrainConfig":
        """Raise :class:`TrainingError` naming the bad field; return ``self``."""

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise TrainingError(
                    f"{name} must be one of {list(options)}, found {value!r}"
                )

        def integer(name: str, minimum: int, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise TrainingError(
                    f"{name} must be an integer >= {minimum}, found {value!r}"
                )

        def number(name: str, lo: float, hi: float = math.inf, *, open_lo: bool = False,
                   allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if open_lo else value >= lo) and value <= hi
            if not ok:
                bracket = "(" if open_lo else "["
                raise TrainingError(
                    f"{name} must be a number in {bracket}{lo}, {hi}], found {value!r}"
                )

        if not self.model:
            raise TrainingError("model: expected the path of a HF backbone folder, found nothing")
        if not self.output:
            raise TrainingError("output: expected an output folder path, found nothing")
        choice("recipe", RECIPES)
        choice("head_type", HEAD_TYPES)
        choice("heads_layout", HEADS_LAYOUTS)
        choice("loss_on", LOSS_ON)
        choice("text_sample_by", TEXT_SAMPLE_BY)
        choice("lr_scheduler", LR_SCHEDULERS)
        choice("dtype", DTYPES)
        choice("cache_hidden", CACHE_MODES)
        choice("cache_dtype", DTYPES)
        choice("lambda0_schedule", LAMBDA0_SCHEDULES)
        choice("distill_heads_loss", HEADS_LOSSES)
        integer("num_heads", 1)
        integer("num_layers", 0)
        integer("draft_vocab_size", 1, allow_none=True)
        integer("seq_len", 1)
        integer("max_eval_rows", 1)
        integer("max_steps", 1)
        integer("batch_size", 1)
        integer("grad_accum", 1)
        integer("lr_warmup_steps", 0)
        integer("seed", 0)
        integer("lambda0_warmup_steps", 0, allow_none=True)
        integer("heads_only_steps", 0)
        integer("lora_rank", 1)
        integer("distill_top_k", 1, allow_none=True)
        integer("distill_max_tokens", 1)
        integer("distill_num_prompts", 1, allow_none=True)
        integer("save_steps", 0)
        integer("save_total_limit", 1)
        integer("log_steps", 1)
        number("eval_fraction", 0.0, 0.9)
        number("cache_max_gb", 0.0)
        number("lr", 0.0, open_lo=True, allow_none=True)
        number("weight_decay", 0.0)
        number("max_grad_norm", 0.0, open_lo=True, allow_none=True)
        number("lambda_decay", 0.0, open_lo=True)
        number("lambda0", 0.0)
        number("heads_lr_multiplier", 0.0, open_lo=True)
        number("lora_alpha", 0.0, open_lo=True)
        number("lora_dropout", 0.0, 1.0)
        number("distill_temperature", 0.0)
        number("distill_top_p", 0.0, 1.0, open_lo=True)

        min_len = self.num_heads + 2
        if self.seq_len < min_len:
            raise TrainingError(
                f"seq_len must be >= num_heads + 2 = {min_len} (the last head needs a "
                f"target {self.num_heads + 1} tokens ahead), found {self.seq_len}; "
                f"raise --seq-len or lower --num-heads"
            )
        if self.head_weights is not None:
            if len(self.head_weights) != self.num_heads:
                raise TrainingError(
                    f"head_weights must have num_heads={self.num_heads} entries, found "
                    f"{len(self.head_weights)}: {self.head_weights}"
                )
            if any(not isinstance(w, (int, float)) or w < 0 for w in self.head_weights):
                raise TrainingError(f"head_weights must be numbers >= 0, found {self.head_weights}")
        if self.heads_only_steps >= self.max_steps and self.recipe == "medusa2":
            raise TrainingError(
                f"heads_only_steps ({self.heads_only_steps}) must be < max_steps "
                f"({self.max_steps}) for medusa2, or there is no joint stage; use "
                f"--recipe medusa1 for heads-only training"
            )
        if self.recipe == "medusa1" and self.original_lm_head and self.num_layers == 0:
            raise TrainingError(
                "original_lm_head with num_layers=0 leaves nothing to train (the shared "
                "LM layer is the frozen backbone's); use --num-layers >= 1"
            )
        if self.head_type == "hydra":
            if self.heads_layout != "medusa_vllm":
                raise TrainingError(
                    f"head_type 'hydra' can only be saved in layout 'medusa_vllm', found "
                    f"heads_layout {self.heads_layout!r}; drop --heads-layout")
            if self.original_lm_head:
                raise TrainingError("head_type 'hydra' has one LM layer per head; drop "
                                    "--original-lm-head")
            if self.num_layers < 1:
                raise TrainingError(
                    f"head_type 'hydra' needs num_layers >= 1 (the block that reads the path), "
                    f"found {self.num_layers}")
        if self.cache_hidden in ("memory", "disk") and self.recipe != "medusa1":
            raise TrainingError(
                f"cache_hidden={self.cache_hidden!r} needs recipe medusa1 (a frozen "
                f"backbone); found recipe {self.recipe!r}; use --cache-hidden none"
            )
        if self.self_distill and self.recipe == "medusa2" and not self.lora:
            raise TrainingError(
                "self_distill with medusa2 needs LoRA (the teacher is the backbone with "
                "its adapters disabled; full fine-tuning would need a second model in "
                "memory); drop --full-finetune or --self-distill"
            )
        if self.distill_top_k is not None and not self.self_distill:
            raise TrainingError("distill_top_k is only used with self_distill; add --self-distill")
        if (
            self.heads_layout == "vllm"
            and self.draft_vocab_size is not None
            and not self.original_lm_head
        ):
            raise TrainingError(
                "heads_layout 'vllm' cannot hold per-head LM layers with a reduced draft "
                "vocabulary (vLLM 0.32 limitation); use --original-lm-head, drop "
                "--draft-vocab-size, or keep --heads-layout medusa_vllm"
            )
        if self.heads_layout == "medusa" and self.draft_vocab_size is not None:
            raise TrainingError(
                "heads_layout 'medusa' (FasterDecoding) has no reduced draft vocabulary; "
                "drop --draft-vocab-size or use --heads-layout medusa_vllm"
            )
        if not self.data and not self.self_distill:
            raise TrainingError(
                "data: expected at least one training file (--data FILE), found none; "
                "or pass --self-distill to generate data from built-in prompts"
            )
        return self

    # ---------------------------------------------------------- (de)serialise
    @classmethod
    def unknown_fields_error(cls, unknown: list[str], names: list[str]) -> Exception:
        """:meth:`from_dict` refuses unknown keys with a :class:`TrainingError`."""
        return TrainingError(f"unknown training option(s) {unknown}; expected a subset of {names}")

    def save(self, path: str | Path) -> None:
        """Write the config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # Fields that must not change between a run and its resumption.
    RESUME_KEYS = (
        "model", "data", "recipe", "head_type", "num_heads", "num_layers", "draft_vocab_size",
        "original_lm_head", "seq_len", "batch_size", "grad_accum", "seed", "lora",
        "lora_rank", "lora_target_modules", "self_distill", "dtype", "eval_data",
        "eval_fraction", "loss_on", "text_sample_by", "heads_init",
    )

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """Fields of :data:`RESUME_KEYS` that differ from a saved config dict."""
        mine = self.to_dict()
        return [
            f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}"
            for k in self.RESUME_KEYS
            if k in saved and saved.get(k) != mine[k]
        ]
