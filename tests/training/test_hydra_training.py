"""Training Hydra heads (``head_type="hydra"``) on a tiny random Llama (CPU, seconds each)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medusa_vllm.checkpoints import load_heads
from medusa_vllm.core.hydra import HydraHeads, teacher_forced_paths
from medusa_vllm.training import TrainConfig, TrainingError
from medusa_vllm.training.data import batch_indices, collate
from medusa_vllm.training.evaluate import evaluate_heads, head_logits
from medusa_vllm.training.losses import IGNORE_INDEX, head_targets, to_draft_targets
from medusa_vllm.training.trainer import MedusaTrainer, train
from tests.training.conftest import tiny_model_and_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_and_text(tmp_path_factory.mktemp("hydra_training"))


def _cfg(tmp_path, tiny, **kw) -> TrainConfig:
    _, model, text = tiny
    base = {"model": str(model), "data": [str(text)], "output": str(tmp_path / "out"),
            "num_heads": 3, "head_type": "hydra", "seq_len": 48, "batch_size": 4, "max_steps": 4,
            "save_steps": 0, "log_steps": 1, "eval_fraction": 0.1, "progress": False}
    base.update(kw)
    return TrainConfig(**base)


def test_hydra_medusa1_lowers_loss_and_saves_hydra_heads(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    trainer = MedusaTrainer(_cfg(tmp_path, tiny, max_steps=40, lr=3e-3, draft_vocab_size=60))
    result = trainer.run()
    losses = [r["heads_loss"] for r in result.log]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    heads = load_heads(result.heads_dir)
    assert isinstance(heads, HydraHeads) and heads.config.num_heads == 3
    # the embedding is the backbone's (frozen) input embedding on the draft vocabulary
    base = AutoModelForCausalLM.from_pretrained(str(tiny[1]))
    emb = base.get_input_embeddings().weight.detach()
    torch.testing.assert_close(heads.embed.weight[:-1], emb[heads.token_map])
    assert torch.count_nonzero(heads.embed.weight[-1]) == 0
    acc = json.loads((result.output / "accuracies.json").read_text())
    assert len(acc) == 3 and all(len(r) == 10 for r in acc)


def test_first_step_losses_are_teacher_forced_cross_entropy(tmp_path, tiny):
    """The trainer's per-head loss equals CE of HydraHeads.forward (head k reads
    input_ids[t+1 .. t+k+1]) against labels[t+k+2], computed here independently."""
    cfg = _cfg(tmp_path, tiny, max_steps=2, draft_vocab_size=60)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    idx = batch_indices(len(trainer.train_data), cfg.batch_size, cfg.seed, 0)
    batch = collate(trainer.train_data, idx, trainer.pad_id)
    with torch.no_grad():
        hidden = trainer.model.model(input_ids=batch.input_ids,
                                     attention_mask=batch.attention_mask).last_hidden_state
        logits = trainer.heads(hidden, batch.input_ids)  # [K, B, T, dv]
    want = []
    for k in range(3):
        draft = to_draft_targets(head_targets(batch.labels, k), trainer.inverse)
        sel = draft != IGNORE_INDEX
        want.append(float(F.cross_entropy(logits[k][sel], draft[sel])))
    rec = trainer.train_step(0)
    assert rec["head_losses"] == pytest.approx(want, rel=1e-4)


def test_evaluate_scores_hydra_with_its_ground_truth_path(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, max_steps=1)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    batch = collate(trainer.eval_data, list(range(len(trainer.eval_data))), trainer.pad_id)
    with torch.no_grad():
        hidden = trainer.model.model(input_ids=batch.input_ids,
                                     attention_mask=batch.attention_mask).last_hidden_state
    acc = evaluate_heads(trainer.heads, [batch], lambda b: hidden, topk=3)
    for k in range(3):
        targets = head_targets(batch.labels, k)
        sel = targets != IGNORE_INDEX
        paths = teacher_forced_paths(batch.input_ids, k)[sel]
        top1 = head_logits(trainer.heads, k, hidden[sel], paths).argmax(-1)
        assert int(acc.hits[k, 0]) == int((top1 == targets[sel]).sum())
        assert int(acc.totals[k]) == int(sel.sum())
    with pytest.raises(ValueError, match="pass path"):
        head_logits(trainer.heads, 0, hidden[0])


def test_hydra_medusa2_joint_steps_run(tmp_path, tiny):
    res = train(_cfg(tmp_path, tiny, recipe="medusa2", max_steps=3, lr=1e-3,
                     lambda0_warmup_steps=1, merge_lora=False))
    assert all(math.isfinite(r["heads_loss"]) and math.isfinite(r["lm_loss"]) for r in res.log)
    assert isinstance(load_heads(res.heads_dir), HydraHeads)


def test_hydra_options_are_checked(tmp_path, tiny):
    with pytest.raises(TrainingError, match="layout 'medusa_vllm'"):
        _cfg(tmp_path, tiny, heads_layout="vllm").validate()
    with pytest.raises(TrainingError, match="original-lm-head"):
        _cfg(tmp_path, tiny, original_lm_head=True).validate()
    with pytest.raises(TrainingError, match="head_type must be one of"):
        _cfg(tmp_path, tiny, head_type="eagle").validate()
    medusa = train(_cfg(tmp_path, tiny, head_type="medusa", output=str(tmp_path / "m"),
                        max_steps=1, eval_fraction=0.0))
    with pytest.raises(TrainingError, match="holds medusa heads"):
        MedusaTrainer(_cfg(tmp_path, tiny, heads_init=str(medusa.heads_dir))).setup()
