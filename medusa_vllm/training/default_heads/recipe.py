"""The default-heads recipe's settings and work folder: :class:`Recipe` (every
knob, saved as ``recipe.json``), :class:`Work` (the cached files of each stage),
the stage names, and the JSON and log helpers the stages share."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STAGES", "Recipe", "Work", "extra_chunks", "read_jsonl", "recipe_with", "say",
           "train_files", "write_json"]

STAGES = ("prompts", "distill", "train", "tree", "export", "cost", "accept", "medusa2")


@dataclass
class Recipe:
    """Every knob of the recipe (saved as ``recipe.json`` in the work folder)."""

    # data
    train_prompts: int = 2000  # greedy answers
    sampled_prompts: int = 400  # extra answers at temperature 0.7 (other prompts)
    sampled_temperature: float = 0.7
    # further greedy answers, to prompts drawn after the first sets, in files of
    # extra_chunk prompts. The drawing is sequential, so growing this by whole chunks
    # keeps every earlier file, its answers and their hidden-state cache rows valid.
    extra_train_prompts: int = 2000  # 0: session 5's 2,400 rows (top-1 0.421 vs 0.456)
    extra_chunk: int = 2000
    heldout_prompts: int = 256
    prompt_seed: int = 0
    max_tokens: int = 256
    max_model_len: int = 768
    # committed answers (medusa_vllm.training.store): read them first, generate only the
    # missing ones and (store_append) commit those as new files; "" = the package's store
    use_store: bool = True
    store_append: bool = True
    store_dir: str = ""
    # heads
    num_heads: int = 4
    num_layers: int = 2  # 1 ResBlock: head-0 top-1 0.412; 2: 0.421 (docs/default-heads.md)
    draft_vocab_size: int | None = 4096
    original_lm_head: bool = False
    # Medusa-1 optimisation
    seq_len: int = 640
    batch_size: int = 8
    epochs: float = 5.0  # of 4,400 rows: 2,750 steps
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lambda_decay: float = 0.8
    seed: int = 0
    # tree
    max_tree_nodes: int = 64
    # batch size -> tree sizes whose engine step time is measured
    cost_curves: dict = field(default_factory=lambda: {"1": [2, 4, 8, 16, 32, 64], "8": [2, 4, 8, 16]})
    # batch size -> top-1 chain depths timed beside them (chains verify through vLLM's
    # causal kernel, so they cost less than a tree of as many nodes)
    chain_cost_curves: dict = field(default_factory=lambda: {"1": [1, 2, 3, 4], "8": [1, 2]})
    cost_repeats: int = 2  # timing rounds per curve (medusa_vllm.tools.calibrate.measure_cost_curve)
    # Medusa-2 comparison (smaller)
    m2_rows: int = 240
    m2_steps: int = 60
    m2_batch_size: int = 2
    m2_seq_len: int = 384
    m2_lr: float = 1e-4
    m2_lora_rank: int = 8
    m2_lambda0: float = 0.2
    m2_heads_lr_multiplier: float = 4.0
    # also train the same heads as long on the same rows with the backbone frozen
    # (Medusa-1, heads lr = m2_lr * m2_heads_lr_multiplier): what the joint training
    # adds beyond more heads training
    m2_control: bool = True
    # engine measurement
    accept_prompts: int = 32
    accept_max_tokens: int = 128
    extra: dict = field(default_factory=dict)


def recipe_with(recipe_file: str | Path | None = None, sets: Sequence[str] = ()) -> Recipe:
    """The default :class:`Recipe` with the fields of a JSON file, then
    ``KEY=VALUE`` settings (JSON values), overridden; unknown fields are an error."""
    r = Recipe()
    overrides: dict[str, Any] = json.loads(Path(recipe_file).read_text()) if recipe_file else {}
    for kv in sets:
        k, _, v = kv.partition("=")
        overrides[k] = json.loads(v)
    for k, v in overrides.items():
        if not hasattr(r, k):
            raise SystemExit(f"--set/--recipe: unknown Recipe field {k!r}; known: {sorted(asdict(r))}")
        setattr(r, k, v)
    return r


def say(msg: str) -> None:
    print(f"[train_default_heads {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class Work:
    """Paths of the work folder (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.prompts_train = self.root / "prompts-train.jsonl"
        self.prompts_sampled = self.root / "prompts-sampled.jsonl"
        self.prompts_heldout = self.root / "prompts-heldout.jsonl"
        self.distill_train = self.root / "distill-train-greedy.jsonl"
        self.distill_sampled = self.root / "distill-train-sampled.jsonl"
        self.distill_heldout = self.root / "distill-heldout-greedy.jsonl"
        self.medusa1 = self.root / "medusa1"
        self.medusa2 = self.root / "medusa2"

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def prompts_extra(self, i: int) -> Path:
        return self.root / f"prompts-train-extra-{i}.jsonl"

    def distill_extra(self, i: int) -> Path:
        return self.root / f"distill-train-extra-{i}-greedy.jsonl"


def extra_chunks(r: Recipe) -> list[tuple[int, int]]:
    """(start, stop) of each extra prompt file, counted from the first extra prompt."""
    if r.extra_train_prompts and r.extra_chunk < 1:
        raise SystemExit(f"extra_chunk: expected >= 1, found {r.extra_chunk}")
    return [(a, min(a + r.extra_chunk, r.extra_train_prompts))
            for a in range(0, r.extra_train_prompts, max(r.extra_chunk, 1))]


def train_files(r: Recipe, w: Work) -> list[Path]:
    """The self-distillation files the heads train on."""
    return ([w.distill_train] + ([w.distill_sampled] if r.sampled_prompts else [])
            + [w.distill_extra(i) for i in range(len(extra_chunks(r)))])
