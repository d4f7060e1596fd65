"""Medusa-1 / Medusa-2 training loop on transformers + peft.

:func:`train` runs one :class:`TrainConfig` end to end:

1. check the output folder, read and tokenize the data, hold out an eval split;
2. load the backbone and build the heads (LM layers initialised from the
   backbone's ``lm_head``, sliced to the draft vocabulary if reduced);
3. Medusa-1: freeze the backbone (hidden states under ``no_grad``, optionally
   cached once for the whole set); Medusa-2: LoRA adapters (peft) or full
   fine-tuning, AdamW parameter groups ``heads`` / ``backbone``;
4. optimise for ``max_steps`` optimizer steps with periodic checkpoints
   (heads, trainable backbone weights / LoRA adapter, optimizer, scheduler,
   RNG, step) that ``resume`` continues from;
5. write ``heads/`` (+ ``adapter/`` and the merged ``model/`` for Medusa-2),
   evaluate per-head top-k accuracy on the held-out rows and write
   ``accuracies.json`` / ``eval.json``.

Gradients of the heads loss are computed one head at a time against a detached
copy of the hidden states (peak memory: one head's ``[N, vocab]`` logits); for
Medusa-2 the accumulated gradient is then pushed through the backbone together
with its own loss in a single backward pass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medusa_vllm.core.dtypes import TORCH_DTYPES
from medusa_vllm.training.config import TrainConfig, TrainingError
from medusa_vllm.training.data import (
    Batch,
    EncodedData,
    batch_indices,
    collate,
    encode_file,
    label_token_counts,
    split_train_eval,
)
from medusa_vllm.training.evaluate import HeadAccuracy, evaluate_heads, head_logits
from medusa_vllm.training.losses import (
    IGNORE_INDEX,
    TeacherLogits,
    full_to_draft_map,
    head_targets,
    kl_from_logits,
    lambda0_at,
    lr_factor,
    next_token_targets,
    to_draft_targets,
)

__all__ = ["MedusaTrainer", "TrainResult", "train", "OUTPUT_ARTIFACTS"]

CHECKPOINT_DIR = "checkpoints"
# Everything a run writes in its output folder (what --overwrite removes, except
# the hidden-state cache: it is keyed by a fingerprint of the data, model and
# dtypes, reused on an exact match and otherwise replaced by a cache that copies
# the rows it shares with the old one).
OUTPUT_ARTIFACTS = (
    "heads", "model", "adapter", CHECKPOINT_DIR, "cache", "distill.jsonl",
    "accuracies.json", "eval.json", "train_config.json", "train_log.jsonl",
    "train_summary.json",
)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output: Path
    heads_dir: Path
    model_dir: Path | None
    adapter_dir: Path | None
    steps: int
    accuracy: HeadAccuracy | None
    last_log: dict[str, Any]
    steps_per_second: float
    tokens_per_second: float
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracies(self) -> list[list[float]] | None:
        """Cumulative top-k accuracy per head, as in ``accuracies.json``."""
        return None if self.accuracy is None else self.accuracy.cumulative.tolist()


def _say(config: TrainConfig, msg: str) -> None:
    if config.progress:
        print(msg, file=sys.stderr, flush=True)


def prepare_output(config: TrainConfig) -> Path:
    """Check the output folder against ``overwrite`` / ``resume``; create it."""
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {out} exists and is a file; pass a folder path")
    busy = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not out.is_dir():
            raise TrainingError(
                f"resume: output folder {out} does not exist, so there is nothing to resume; "
                f"drop --resume to start a new run"
            )
        return out
    if busy:
        if not config.overwrite:
            raise TrainingError(
                f"output folder {out} is not empty; refusing to overwrite it. Pass --resume "
                f"to continue its last checkpoint, --overwrite to replace the run's files, "
                f"or choose another --output"
            )
        for name in OUTPUT_ARTIFACTS:
            if name == "cache":
                continue
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def latest_checkpoint(output: str | Path) -> Path | None:
    """The highest ``checkpoints/step-*`` folder with a ``state.json``."""
    root = Path(output) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = sorted(
        (p for p in root.glob("step-*") if (p / "state.json").is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return found[-1] if found else None


class MedusaTrainer:
    """One training run. Use :func:`train` unless you need the pieces.

    Args:
        config: the run's options (validated here).
        model: an already loaded backbone (else loaded from ``config.model``).
        tokenizer: its tokenizer (else loaded from ``config.model``).
    """

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None):
        self.config = config.validate()
        self.output = prepare_output(config)
        self._model_arg, self._tokenizer_arg = model, tokenizer
        self.log: list[dict[str, Any]] = []
        self.step = 0
        self.cache = None

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Load everything; restore the last checkpoint if resuming."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self._check_resume_config()
        self._load_backbone()
        self._load_data()
        self._build_heads()
        self._prepare_backbone()
        self._build_optimizer()
        if cfg.resume:
            self._restore(self._resume_dir())
        else:
            cfg.save(self.output / "train_config.json")
        mode = cfg.resolve_cache_mode(self.train_data.num_tokens, self.hidden_size,
                                      len(self.train_data))
        if mode != "none":
            from medusa_vllm.training.cache import HiddenCache, data_fingerprint, row_keys

            _say(cfg, f"caching backbone hidden states ({mode})")
            parts = (cfg.model, cfg.dtype, cfg.cache_dtype)
            fp = data_fingerprint(self.train_data, *parts)
            self.cache = HiddenCache.build(
                self.model, self.train_data, pad_id=self.pad_id, batch_size=cfg.batch_size,
                mode=mode, path=self.output / "cache" / f"hidden-{fp}.bin",
                dtype=cfg.cache_dtype, fingerprint=fp, progress=cfg.progress,
                keys=row_keys(self.train_data, *parts) if mode == "disk" else None,
            )

    def _resume_dir(self) -> Path:
        cfg = self.config
        if isinstance(cfg.resume, str) and cfg.resume not in ("", "latest", "true", "True"):
            path = Path(cfg.resume)
            if not (path / "state.json").is_file():
                raise TrainingError(
                    f"resume: {path} is not a checkpoint folder (no state.json); pass a "
                    f"{self.output / CHECKPOINT_DIR}/step-N folder or just --resume"
                )
            return path
        path = latest_checkpoint(self.output)
        if path is None:
            raise TrainingError(
                f"resume: no checkpoint in {self.output / CHECKPOINT_DIR}; the run saved "
                f"none yet (see --save-steps); drop --resume and pass --overwrite to restart"
            )
        return path

    def _check_resume_config(self) -> None:
        cfg = self.config
        if not cfg.resume:
            return
        saved_file = self.output / "train_config.json"
        if not saved_file.is_file():
            raise TrainingError(
                f"resume: {saved_file} is missing, so {self.output} is not a training "
                f"output folder; drop --resume"
            )
        saved = json.loads(saved_file.read_text())
        bad = cfg.resume_mismatches(saved)
        if bad:
            raise TrainingError(
                f"resume: options differ from the run in {self.output}: " + "; ".join(bad)
                + "; resume with the same options or start a new --output"
            )

    def _load_backbone(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        path = Path(cfg.model)
        if self._model_arg is None and not (path / "config.json").is_file():
            raise TrainingError(
                f"model: {path} is not a HF model folder (no config.json); pass the folder "
                f"holding config.json, *.safetensors and the tokenizer"
            )
        self.tokenizer = self._tokenizer_arg or AutoTokenizer.from_pretrained(str(path))
        if self._model_arg is not None:
            self.model = self._model_arg.to(TORCH_DTYPES[cfg.dtype])
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=TORCH_DTYPES[cfg.dtype])
        lm = self.model.get_output_embeddings()
        if lm is None or not hasattr(lm, "weight"):
            raise TrainingError(f"model {path}: no output embedding (lm_head) to start heads from")
        self.vocab_size, self.hidden_size = (int(x) for x in lm.weight.shape)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.device = lm.weight.device

    def _encode(self, paths: list[str]) -> EncodedData:
        cfg = self.config
        data = EncodedData()
        for p in paths:
            part = encode_file(
                p, self.tokenizer, seq_len=cfg.seq_len, num_heads=cfg.num_heads,
                vocab_size=self.vocab_size, loss_on=cfg.loss_on, text_sample_by=cfg.text_sample_by,
            )
            for s in part.stats:
                _say(cfg, f"data: {s.summary()}")
            data.extend(part)
        return data

    def _load_data(self) -> None:
        cfg = self.config
        files = list(cfg.data)
        if cfg.self_distill:
            from medusa_vllm.training.distill import ensure_distill_data

            files = ensure_distill_data(cfg, self.output)
        data = self._encode(files)
        if cfg.eval_data:
            self.train_data, self.eval_data = data, self._encode(list(cfg.eval_data))
        else:
            self.train_data, self.eval_data = split_train_eval(
                data, cfg.eval_fraction, cfg.max_eval_rows, cfg.seed, source=", ".join(files))
        _say(cfg, f"data: {len(self.train_data)} train rows ({self.train_data.num_tokens} "
                  f"tokens), {len(self.eval_data) if self.eval_data else 0} eval rows")

    def _build_heads(self) -> None:
        from medusa_vllm.checkpoints import MedusaCheckpointError, check_compatible, load_heads
        from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig, token_map_from_counts
        from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig

        cfg = self.config
        lm_w = self.model.get_output_embeddings().weight.detach()
        if cfg.heads_init:
            try:
                heads = load_heads(cfg.heads_init, lm_head_weight=lm_w.float(), dtype=torch.float32)
                check_compatible(heads.config, self.hidden_size, self.vocab_size,
                                 source=f"heads_init {cfg.heads_init}")
            except MedusaCheckpointError as exc:
                raise TrainingError(
                    f"{exc}; pass heads trained for this backbone, or drop --heads-init"
                ) from exc
            hc = heads.config
            found_type = "hydra" if isinstance(heads, HydraHeads) else "medusa"
            if found_type != cfg.head_type:
                raise TrainingError(
                    f"heads_init {cfg.heads_init} holds {found_type} heads; the run asks for "
                    f"head_type {cfg.head_type!r}; pass --head-type {found_type}")
            if hc.num_heads != cfg.num_heads or (cfg.draft_vocab_size or None) != hc.truncated_vocab_size:
                raise TrainingError(
                    f"heads_init {cfg.heads_init} has num_heads={hc.num_heads}, "
                    f"truncated_vocab_size={hc.truncated_vocab_size}; the run asks for "
                    f"num_heads={cfg.num_heads}, draft_vocab_size={cfg.draft_vocab_size}; "
                    f"pass the same --num-heads / --draft-vocab-size"
                )
            for name in ("num_layers", "original_lm_head"):
                if getattr(hc, name) != getattr(cfg, name):
                    raise TrainingError(
                        f"heads_init {cfg.heads_init} has {name}={getattr(hc, name)}, the run "
                        f"asks for {getattr(cfg, name)}; pass the same --{name.replace('_', '-')}"
                    )
        else:
            token_map = None
            if cfg.draft_vocab_size is not None:
                if cfg.draft_vocab_size >= self.vocab_size:
                    raise TrainingError(
                        f"draft_vocab_size must be < the backbone's vocab_size "
                        f"({self.vocab_size}), found {cfg.draft_vocab_size}; drop "
                        f"--draft-vocab-size to use the full vocabulary"
                    )
                counts = label_token_counts(self.train_data, self.vocab_size)
                token_map = token_map_from_counts(counts, cfg.draft_vocab_size)
                covered = counts[token_map].sum() / counts.sum().clamp(min=1)
                _say(cfg, f"draft vocabulary: {cfg.draft_vocab_size} tokens cover "
                          f"{float(covered):.1%} of the training targets")
            mcfg = MedusaHeadsConfig(
                hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                truncated_vocab_size=cfg.draft_vocab_size,
                original_lm_head=cfg.original_lm_head,
                base_model_name_or_path=str(cfg.model),
            )
            if cfg.head_type == "hydra":  # + the backbone's input embedding rows (frozen)
                hcfg = HydraHeadsConfig(
                    hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                    num_heads=cfg.num_heads, num_layers=cfg.num_layers,
                    truncated_vocab_size=cfg.draft_vocab_size,
                    base_model_name_or_path=str(cfg.model))
                emb = self.model.get_input_embeddings().weight.detach()
                heads = HydraHeads(hcfg, token_map=token_map, lm_head_weight=lm_w.float(),
                                   embed_weight=emb.float(), dtype=torch.float32)
            else:
                heads = MedusaHeads(mcfg, token_map=token_map, lm_head_weight=lm_w.float(),
                                    dtype=torch.float32)
        self.heads = heads.to(self.device)
        self.inverse = full_to_draft_map(self.heads.token_map, self.vocab_size)
        self.weights = cfg.head_loss_weights()

    def _prepare_backbone(self) -> None:
        cfg = self.config
        if cfg.recipe == "medusa1":
            self.model.requires_grad_(False)
            self.model.eval()
            return
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            self.model.requires_grad_(False)
            lcfg = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(self.model, lcfg)
        else:
            self.model.requires_grad_(True)
        self.model.train()

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable backbone parameters (LoRA adapters, or all for full FT)."""
        if self.config.recipe == "medusa1":
            return []
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _build_optimizer(self) -> None:
        cfg = self.config
        groups = []
        hp = [p for p in self.heads.parameters() if p.requires_grad]
        if hp:
            groups.append({"name": "heads", "lr": cfg.heads_lr, "params": hp})
        bb = [p for _, p in self.backbone_parameters()]
        if bb:
            groups.append({"name": "backbone", "lr": cfg.backbone_lr, "params": bb})
        if not groups:
            raise TrainingError("nothing to train: the heads have no trainable parameter "
                                "(original_lm_head with num_layers=0) and the backbone is frozen")
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, cfg.max_steps, cfg.lr_warmup_steps, cfg.lr_scheduler),
        )

    # -------------------------------------------------------------- losses
    def lambda0(self, step: int) -> float:
        """Heads-loss weight at ``step`` (Medusa-2 joint stage; 1 otherwise)."""
        cfg = self.config
        if cfg.recipe == "medusa1" or step < cfg.heads_only_steps:
            return 1.0
        return lambda0_at(step, cfg.lambda0, cfg.effective_lambda0_warmup_steps,
                          cfg.lambda0_schedule, start=cfg.heads_only_steps)

    def joint(self, step: int) -> bool:
        """Whether ``step`` trains the backbone (Medusa-2 after the heads-only stage)."""
        return self.config.recipe == "medusa2" and step >= self.config.heads_only_steps

    def _heads_backward(self, hidden: torch.Tensor, labels: torch.Tensor,
                        teacher: TeacherLogits | None, scale: float,
                        input_ids: torch.Tensor | None = None) -> list[float]:
        """Per-head losses on ``hidden`` (a leaf), backpropagated head by head
        with weight ``scale * lambda_k``; returns the unweighted losses. Hydra heads
        read the ground-truth path tokens from ``input_ids`` (teacher forcing)."""
        from medusa_vllm.core.hydra import HydraHeads, teacher_forced_paths

        cfg = self.config
        hydra = isinstance(self.heads, HydraHeads)
        if hydra and input_ids is None:
            raise ValueError("Hydra heads train on the batch's input_ids (their path tokens)")
        use_kl = cfg.self_distill and cfg.distill_heads_loss == "kl"
        token_map = self.heads.token_map
        losses = []
        for k in range(cfg.num_heads):
            targets = head_targets(labels, k)
            if use_kl:
                sel = targets != IGNORE_INDEX
            else:
                draft = to_draft_targets(targets, self.inverse)
                sel = draft != IGNORE_INDEX
            if not sel.any():
                losses.append(0.0)
                continue
            path = teacher_forced_paths(input_ids, k)[sel] if hydra else None
            logits = head_logits(self.heads, k, hidden[sel], path)
            if use_kl:
                assert teacher is not None
                loss = kl_from_logits(logits, teacher.shifted(k + 1).select(sel), token_map,
                                      self.inverse)
            else:
                loss = F.cross_entropy(logits.float(), draft[sel])
            w = scale * self.weights[k]
            if w != 0 and loss.requires_grad:
                (loss * w).backward()
            losses.append(float(loss.detach()))
        return losses

    def _teacher(self, batch: Batch, hidden: torch.Tensor | None) -> TeacherLogits | None:
        """Teacher logits ``[B, T, V]`` for self-distillation (None if unused)."""
        cfg = self.config
        if not cfg.self_distill:
            return None
        needed = cfg.distill_heads_loss == "kl" or (cfg.recipe == "medusa2")
        if not needed:
            return None
        with torch.no_grad():
            if cfg.recipe == "medusa1":
                assert hidden is not None
                lm = self.model.get_output_embeddings()
                token_map = self.heads.token_map
                if token_map is not None and cfg.distill_top_k is None:
                    # only the draft vocabulary's rows of the lm_head: the KL
                    # renormalises over them anyway ([B, T, V_draft], not [B, T, V])
                    tm = token_map.to(lm.weight.device)
                    bias = getattr(lm, "bias", None)
                    logits = F.linear(hidden.to(self._bb_dtype()), lm.weight.index_select(0, tm),
                                      None if bias is None else bias.index_select(0, tm))
                    return TeacherLogits(logits=logits.float(), draft=True)
                logits = lm(hidden.to(self._bb_dtype()))
            else:
                with self.model.disable_adapter():
                    logits = self.model(input_ids=batch.input_ids,
                                        attention_mask=batch.attention_mask).logits
        return TeacherLogits.from_logits(logits.float(), cfg.distill_top_k)

    def _bb_dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def _hidden_for(self, batch: Batch) -> torch.Tensor:
        """Frozen-backbone hidden states of a batch (cached or under no_grad)."""
        from medusa_vllm.training.cache import backbone_hidden

        if self.cache is not None:
            return self.cache.batch(batch.index.tolist(), batch.input_ids.shape[1]).to(self.device)
        with torch.no_grad():  # (a PeftModel's decoder carries its LoRA layers)
            return backbone_hidden(self.model, batch.input_ids, batch.attention_mask)

    def micro_step(self, batch: Batch, step: int, scale: float) -> dict[str, Any]:
        """Forward + backward of one micro-batch; returns its losses."""
        cfg = self.config
        batch = batch.to(self.device)
        labels = batch.labels
        if not self.joint(step):
            hidden = self._hidden_for(batch).detach()
            teacher = self._teacher(batch, hidden) if cfg.distill_heads_loss == "kl" else None
            head_losses = self._heads_backward(hidden, labels, teacher, scale, batch.input_ids)
            return {"head_losses": head_losses, "lambda0": 1.0, "stage": "heads"}
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=True)
        hidden, logits = out.hidden_states[-1], out.logits
        targets = next_token_targets(labels)
        valid = targets != IGNORE_INDEX
        teacher = self._teacher(batch, None)
        if cfg.self_distill:
            assert teacher is not None
            lm_loss = kl_from_logits(logits[valid], teacher.select(valid))
        else:
            lm_loss = F.cross_entropy(logits[valid].float(), targets[valid]) if valid.any() \
                else logits.sum() * 0.0
        lam = self.lambda0(step)
        leaf = hidden.detach().requires_grad_(True)
        head_teacher = teacher if cfg.distill_heads_loss == "kl" else None
        head_losses = self._heads_backward(leaf, labels, head_teacher, scale * lam,
                                           batch.input_ids)
        if leaf.grad is not None:
            torch.autograd.backward([lm_loss * scale, hidden], [None, leaf.grad])
        else:
            (lm_loss * scale).backward()
        return {"head_losses": head_losses, "lm_loss": float(lm_loss.detach()), "lambda0": lam,
                "stage": "joint"}

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns a log record."""
        cfg = self.config
        scale = 1.0 / cfg.grad_accum
        records = []
        tokens = 0
        for m in range(cfg.grad_accum):
            idx = batch_indices(len(self.train_data), cfg.batch_size, cfg.seed,
                                step * cfg.grad_accum + m)
            batch = collate(self.train_data, idx, self.pad_id)
            tokens += batch.num_tokens
            records.append(self.micro_step(batch, step, scale))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        head_losses = [sum(r["head_losses"][k] for r in records) / len(records)
                       for k in range(cfg.num_heads)]
        rec: dict[str, Any] = {
            "step": step + 1,
            "heads_loss": sum(w * x for w, x in zip(self.weights, head_losses)),
            "head_losses": head_losses,
            "lambda0": records[-1]["lambda0"],
            "stage": records[-1]["stage"],
            "lr": lrs,
            "tokens": tokens,
        }
        if "lm_loss" in records[-1]:
            rec["lm_loss"] = sum(r.get("lm_loss", 0.0) for r in records) / len(records)
            rec["loss"] = rec["lm_loss"] + rec["lambda0"] * rec["heads_loss"]
        else:
            rec["loss"] = rec["heads_loss"]
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        return rec

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically; keep the newest ``save_total_limit``."""
        from safetensors.torch import save_file

        cfg = self.config
        root = self.output / CHECKPOINT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  str(tmp / "heads.safetensors"))
        bb = self.backbone_parameters()
        if bb:
            save_file({n: p.detach().cpu().contiguous() for n, p in bb},
                      str(tmp / "backbone.safetensors"))
            if cfg.lora:
                self.model.save_pretrained(str(tmp / "adapter"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": cfg.to_dict()},
                                                   indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        found = sorted((p for p in root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in found[: -cfg.save_total_limit]:
            shutil.rmtree(old)
        return final

    def _restore(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        heads_state = load_file(str(path / "heads.safetensors"))
        self.heads.load_state_dict(heads_state, strict=True)
        bb = dict(self.backbone_parameters())
        if bb:
            saved = load_file(str(path / "backbone.safetensors"))
            missing = sorted(set(bb) - set(saved))
            if missing:
                raise TrainingError(
                    f"resume: {path / 'backbone.safetensors'} lacks {len(missing)} trainable "
                    f"tensor(s), e.g. {missing[:3]}; was it written with other LoRA options?"
                )
            with torch.no_grad():
                for n, p in bb.items():
                    p.copy_(saved[n])
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
        self.step = int(state["step"])
        log_file = self.output / "train_log.jsonl"
        if log_file.is_file():
            kept = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
            self.log = [r for r in kept if r.get("step", 0) <= self.step]
            log_file.write_text("".join(json.dumps(r) + "\n" for r in self.log))
        _say(self.config, f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ run
    def evaluate(self) -> HeadAccuracy | None:
        """Top-1..10 accuracy per head on the held-out rows (None without any)."""
        if not self.eval_data:
            return None
        cfg = self.config
        bs = cfg.batch_size
        batches = (collate(self.eval_data, list(range(s, min(s + bs, len(self.eval_data)))),
                           self.pad_id).to(self.device)
                   for s in range(0, len(self.eval_data), bs))
        from medusa_vllm.training.cache import backbone_hidden

        def hidden_fn(b: Batch) -> torch.Tensor:
            return backbone_hidden(self.model, b.input_ids, b.attention_mask)

        was = self.model.training
        self.model.eval()
        try:
            acc = evaluate_heads(self.heads, batches, hidden_fn,
                                 lm_head=self.model.get_output_embeddings())
        finally:
            self.model.train(was)
        return acc

    def run(self) -> TrainResult:
        """Set up, train to ``max_steps``, save, evaluate."""
        from tqdm.auto import tqdm

        cfg = self.config
        self.setup()
        log_file = self.output / "train_log.jsonl"
        start = self.step
        t0, tokens = time.perf_counter(), 0
        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.recipe} training",
                   disable=not cfg.progress, unit="step")
        self.heads.train()
        last: dict[str, Any] = {}
        with open(log_file, "a") as logf:
            while self.step < cfg.max_steps:
                rec = self.train_step(self.step)
                self.step += 1
                tokens += rec["tokens"]
                last = rec
                if not math.isfinite(rec["loss"]):
                    raise TrainingError(
                        f"loss became {rec['loss']} at step {self.step}; lower --lr or "
                        f"use --dtype float32"
                    )
                if self.step % cfg.log_steps == 0 or self.step == cfg.max_steps:
                    self.log.append(rec)
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lam0=f"{rec['lambda0']:.2f}")
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
        bar.close()
        elapsed = max(time.perf_counter() - t0, 1e-9)
        done = self.step - start
        self.save_checkpoint()
        accuracy = self.evaluate()
        heads_dir, model_dir, adapter_dir = self._save_outputs()
        summary = {
            "steps": self.step, "trained_steps_this_run": done,
            "steps_per_second": done / elapsed, "tokens_per_second": tokens / elapsed,
            "last": last, "heads": str(heads_dir),
            "model": str(model_dir) if model_dir else None,
            "adapter": str(adapter_dir) if adapter_dir else None,
        }
        if accuracy is not None:
            accuracy.save(self.output)
            summary["accuracies"] = accuracy.cumulative.tolist()
            _say(cfg, "held-out top-k accuracy (cumulative):\n" + accuracy.table())
        (self.output / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return TrainResult(
            output=self.output, heads_dir=heads_dir, model_dir=model_dir,
            adapter_dir=adapter_dir, steps=self.step, accuracy=accuracy, last_log=last,
            steps_per_second=done / elapsed, tokens_per_second=tokens / elapsed, log=self.log,
        )

    def _save_outputs(self) -> tuple[Path, Path | None, Path | None]:
        from medusa_vllm.checkpoints import save_heads

        cfg = self.config
        heads_dir = self.output / "heads"
        model_dir = adapter_dir = None
        if cfg.recipe == "medusa2":
            orig_dtype = self._original_dtype()
            if cfg.lora:
                adapter_dir = self.output / "adapter"
                self.model.save_pretrained(str(adapter_dir))
            if cfg.merge_lora or not cfg.lora:
                model_dir = self.output / "model"
                merged = self.model.merge_and_unload() if cfg.lora else self.model
                if cfg.lora:
                    self.model = merged
                merged.to(orig_dtype).save_pretrained(str(model_dir), safe_serialization=True)
                merged.to(TORCH_DTYPES[cfg.dtype])
                self._copy_backbone_files(model_dir)
        self.heads.config.base_model_name_or_path = str(model_dir or cfg.model)
        save_heads(self.heads, heads_dir, layout=cfg.heads_layout, overwrite=True)
        return heads_dir, model_dir, adapter_dir

    _TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                        "tokenizer.model", "added_tokens.json")

    def _copy_backbone_files(self, model_dir: Path) -> None:
        """Make ``model_dir`` read like the source backbone folder: its tokenizer
        files verbatim, and the top-level ``config.json`` keys ``save_pretrained``
        dropped (e.g. a ``rope_theta`` kept for older transformers)."""
        src = Path(self.config.model)
        copied = False
        for name in self._TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, model_dir / name)
                copied = True
        if not copied:
            self.tokenizer.save_pretrained(str(model_dir))
        if (src / "config.json").is_file():
            new_file = model_dir / "config.json"
            new = json.loads(new_file.read_text())
            for key, value in json.loads((src / "config.json").read_text()).items():
                if key not in ("quantization_config", "_name_or_path", "transformers_version"):
                    new.setdefault(key, value)
            new_file.write_text(json.dumps(new, indent=2) + "\n")

    def _original_dtype(self) -> torch.dtype:
        cfg_file = Path(self.config.model) / "config.json"
        if cfg_file.is_file():
            raw = json.loads(cfg_file.read_text())
            name = raw.get("dtype") or raw.get("torch_dtype")
            if name in TORCH_DTYPES:
                return TORCH_DTYPES[name]
        return TORCH_DTYPES[self.config.dtype]


def train(config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Run ``config`` end to end (see the module docstring); return the result."""
    return MedusaTrainer(config, model=model, tokenizer=tokenizer).run()
