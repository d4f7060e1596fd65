"""Medusa-1 / Medusa-2 training on a tiny random Llama (CPU, seconds each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from medusa_vllm.checkpoints import load_heads, save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.training import TrainConfig, TrainingError
from medusa_vllm.training.data import (
    EncodedData,
    batch_indices,
    collate,
    encode_file,
    split_train_eval,
)
from medusa_vllm.training.evaluate import evaluate_heads, head_logits, topk_hits
from medusa_vllm.training.losses import (
    IGNORE_INDEX,
    TeacherLogits,
    full_to_draft_map,
    head_targets,
    kl_from_logits,
    lambda0_at,
    lr_factor,
    next_token_targets,
)
from medusa_vllm.training.trainer import MedusaTrainer, train
from tests.training.conftest import HIDDEN, VOCAB, tiny_model_and_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_and_text(tmp_path_factory.mktemp("training"))


def _cfg(tmp_path: Path, tiny, **kw) -> TrainConfig:
    root, model, text = tiny
    base = dict(model=str(model), data=[str(text)], output=str(tmp_path / "out"), num_heads=3,
                seq_len=48, batch_size=4, max_steps=4, save_steps=0, log_steps=1,
                eval_fraction=0.1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


# --------------------------------------------------------------- pure parts
def test_head_and_next_token_targets_shift():
    labels = torch.tensor([[10, 11, 12, 13, 14], [20, IGNORE_INDEX, 22, 23, IGNORE_INDEX]])
    assert next_token_targets(labels).tolist() == [[11, 12, 13, 14, -100], [-100, 22, 23, -100, -100]]
    # head 0 at t predicts t + 2, head 1 predicts t + 3
    assert head_targets(labels, 0).tolist() == [[12, 13, 14, -100, -100], [22, 23, -100, -100, -100]]
    assert head_targets(labels, 1).tolist() == [[13, 14, -100, -100, -100], [23, -100, -100, -100, -100]]
    assert head_targets(labels, 5).eq(IGNORE_INDEX).all()


def test_lambda0_schedules_follow_formulas():
    for step in range(0, 25):
        p = min(step / 10, 1.0)
        assert lambda0_at(step, 0.2, 10, "sine") == pytest.approx(0.2 * math.sin(math.pi / 2 * p))
        assert lambda0_at(step, 0.2, 10, "linear") == pytest.approx(0.2 * p)
        assert lambda0_at(step, 0.2, 10, "constant") == 0.2
    # start offset (after a heads-only stage)
    assert lambda0_at(5, 0.3, 10, "linear", start=5) == 0.0
    assert lambda0_at(10, 0.3, 10, "linear", start=5) == pytest.approx(0.15)
    assert lambda0_at(100, 0.3, 10, "sine", start=5) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="schedule"):
        lambda0_at(3, 0.2, 10, "cubic")


def test_lr_factor_warmup_then_decay():
    assert [lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_kl_matches_definition_full_topk_and_draft_vocab():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p = F.softmax(t, -1)
    want = (p * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert kl_from_logits(s, TeacherLogits.from_logits(t)) == pytest.approx(float(want), rel=1e-5)
    # top-k with k = V is the full distribution
    full_k = TeacherLogits(values=torch.topk(t, 7).values, ids=torch.topk(t, 7).indices)
    assert kl_from_logits(s, full_k) == pytest.approx(float(want), rel=1e-5)
    # top-2: teacher renormalised over its 2 best tokens
    top2 = TeacherLogits.from_logits(t, top_k=2)
    assert top2.logits is None and top2.ids.shape == (5, 2)
    q = F.softmax(top2.values, -1)
    want2 = (q * (q.log() - F.log_softmax(s, -1).gather(-1, top2.ids))).sum(-1).mean()
    assert kl_from_logits(s, top2) == pytest.approx(float(want2), rel=1e-5)
    # reduced draft vocabulary [3, 0, 5]: teacher restricted and renormalised
    tm = torch.tensor([3, 0, 5])
    ts = t[:, tm]
    want3 = (F.softmax(ts, -1) * (F.log_softmax(ts, -1) - F.log_softmax(s[:, :3], -1))).sum(-1).mean()
    got3 = kl_from_logits(s[:, :3], TeacherLogits.from_logits(t), tm, full_to_draft_map(tm, 7))
    assert got3 == pytest.approx(float(want3), rel=1e-5)
    # the same with a full top-k teacher
    got4 = kl_from_logits(s[:, :3], full_k, tm, full_to_draft_map(tm, 7))
    assert got4 == pytest.approx(float(want3), rel=1e-5)
    assert float(kl_from_logits(t, TeacherLogits.from_logits(t))) == pytest.approx(0.0, abs=1e-6)
    # a top-k teacher entirely outside the draft vocabulary contributes 0, with finite grads
    far = TeacherLogits(values=torch.tensor([[2.0, 1.0], [3.0, 0.0]]), ids=torch.tensor([[1, 2], [3, 4]]))
    st = s[:2, :3].clone().requires_grad_(True)
    loss = kl_from_logits(st, far, tm, full_to_draft_map(tm, 7))
    loss.backward()
    assert torch.isfinite(st.grad).all() and st.grad[0].abs().sum() == 0
    q1 = F.softmax(torch.tensor([3.0]), -1)  # row 1: only id 3 (draft 0) is in the vocabulary
    assert float(loss.detach()) == pytest.approx(float(-(q1 * F.log_softmax(s[1, :3], -1)[:1]).sum()) / 2,
                                        rel=1e-5)


def test_batch_indices_are_seeded_epochs():
    n, bs = 10, 4
    epoch0 = [batch_indices(n, bs, 3, m) for m in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(sum(epoch0, [])) == list(range(n))
    epoch1 = [batch_indices(n, bs, 3, m) for m in range(3, 6)]
    assert sorted(sum(epoch1, [])) == list(range(n)) and epoch1 != epoch0
    assert batch_indices(n, bs, 3, 4) == batch_indices(n, bs, 3, 4)
    assert batch_indices(n, bs, 4, 0) != batch_indices(n, bs, 3, 0)


def test_topk_hits_hand_checked():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.2],    # ranking 1,2,3,0
                           [0.8, 0.1, 0.3, 0.05],   # ranking 0,2,1,3
                           [0.2, 0.3, 0.1, 0.9],    # ranking 3,1,0,2
                           [0.4, 0.3, 0.2, 0.1]])   # target outside the vocabulary: miss
    targets = torch.tensor([2, 0, 1, IGNORE_INDEX])
    # row 0 hits at rank 2, row 1 at rank 1, row 2 at rank 2, row 3 never
    assert topk_hits(logits, targets, 6).tolist() == [1, 3, 3, 3, 3, 3]
    assert topk_hits(logits[:0], targets[:0], 3).tolist() == [0, 0, 0]


def test_evaluate_heads_hand_checked_with_draft_vocab(tmp_path):
    # 2 heads, no ResBlocks, hidden 4, vocab 6, draft vocabulary = full ids [5, 1, 2, 0].
    cfg = MedusaHeadsConfig(hidden_size=4, vocab_size=6, num_heads=2, num_layers=0,
                       truncated_vocab_size=4)
    heads = MedusaHeads(cfg, token_map=torch.tensor([5, 1, 2, 0]))
    with torch.no_grad():
        heads.lm_heads[0].weight.copy_(torch.eye(4))           # head 0 scores = hidden
        heads.lm_heads[1].weight.copy_(torch.eye(4).flip(0))   # head 1 scores = reversed hidden
    # One row, T = 5. Hidden at every position ranks draft ids 0 > 1 > 2 > 3,
    # i.e. full ids 5, 1, 2, 0 for head 0 and 0, 2, 1, 5 for head 1.
    hidden = torch.tensor([4.0, 3.0, 2.0, 1.0]).expand(1, 5, 4)
    labels = torch.tensor([[9 % 6, 1, 2, 3, 5]])
    labels[0, 0] = IGNORE_INDEX
    from medusa_vllm.training.data import Batch

    batch = Batch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long),
                  labels, torch.tensor([0]))
    acc = evaluate_heads(heads, [batch], lambda b: hidden, topk=4)
    # head 0 targets labels[t+2] for t=0..2: 2, 3, 5 -> ranks 3 (id 2), miss (3 not in
    # draft vocab), 1 (id 5)  => cumulative [1, 1, 2, 2] of 3
    assert acc.totals.tolist() == [3, 2]
    assert acc.hits[0].tolist() == [1, 1, 2, 2]
    # head 1 targets labels[t+3] for t=0..1: 3 (miss), 5 (rank 4)  => [0, 0, 0, 1] of 2
    assert acc.hits[1].tolist() == [0, 0, 0, 1]
    assert acc.cumulative[0].tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert acc.per_rank[1].tolist() == pytest.approx([0, 0, 0, 0.5])
    path = acc.save(tmp_path)
    saved = json.loads(path.read_text())
    assert len(saved) == 2 and len(saved[0]) == 4 and saved[1][3] == pytest.approx(0.5)
    assert json.loads((tmp_path / "eval.json").read_text())["positions"] == [3, 2]
    # the same with every row's target ranks: step starts t = 0..3 (labels[t + 1] scored);
    # head 0: id 2 at rank 2, miss, id 5 at rank 0, past the end; head 1: miss, id 5 at rank 3
    acc2 = evaluate_heads(heads, [batch], lambda b: hidden, topk=4, collect_ranks=True)
    assert torch.equal(acc2.hits, acc.hits) and torch.equal(acc2.totals, acc.totals)
    assert acc.ranks is None and len(acc2.ranks) == 1
    assert acc2.ranks[0].tolist() == [[2, -1], [-1, 3], [0, -1], [-1, -1]]


def test_head_logits_matches_full_forward():
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=8, vocab_size=11, num_heads=3, num_layers=2))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    h = torch.randn(2, 5, 8)
    full = heads(h)
    for k in range(3):
        torch.testing.assert_close(head_logits(heads, k, h), full[k])


# --------------------------------------------------------------------- data
def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_prompt_response_labels_cover_only_the_response(tmp_path, tiny):
    tok = _tok(tiny[1])
    f = _write(tmp_path / "pr.jsonl", [{"prompt": "the lazy dog", "response": "jumps over the fox"}])
    data = encode_file(f, tok, seq_len=64, num_heads=3, vocab_size=VOCAB)
    ids, labels = data.input_ids[0], data.labels[0]
    trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert "jumps over the fox" in trained and "lazy" not in trained
    assert tok.decode(ids).startswith("<s>user: the lazy dog")
    assert data.stats[0].format == "prompt_response"


def test_sharegpt_conversations_train_on_every_assistant_turn(tmp_path, tiny):
    tok = _tok(tiny[1])
    conv = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "the dog"},
            {"from": "gpt", "value": "jumps over"}, {"from": "human", "value": "the fox"},
            {"from": "gpt", "value": "brown quick"}]
    f = _write(tmp_path / "sg.jsonl", [{"conversations": conv}])
    data = encode_file(f, tok, seq_len=128, num_heads=3, vocab_size=VOCAB)
    trained = tok.decode([t for t in data.labels[0] if t != IGNORE_INDEX])
    assert "jumps over" in trained and "brown quick" in trained
    assert "the dog" not in trained and "be brief" not in trained
    # messages (OpenAI style) give the same rows
    msgs = [{"role": {"system": "system", "human": "user", "gpt": "assistant"}[c["from"]],
             "content": c["value"]} for c in conv]
    g = _write(tmp_path / "msg.jsonl", [{"messages": msgs}])
    assert encode_file(g, tok, seq_len=128, num_heads=3, vocab_size=VOCAB).labels == data.labels


def test_no_chat_template_joins_prompt_and_response(tmp_path, tiny):
    tok = _tok(tiny[1])
    tok.chat_template = None
    f = _write(tmp_path / "pr.jsonl", [{"prompt": "the lazy dog", "response": "jumps over the fox"}])
    data = encode_file(f, tok, seq_len=64, num_heads=3, vocab_size=VOCAB)
    assert "the lazy dog\njumps over the fox" in tok.decode(data.input_ids[0])
    trained = tok.decode([t for t in data.labels[0] if t != IGNORE_INDEX])
    assert "jumps over the fox" in trained and "lazy" not in trained


def test_plain_text_paragraphs_and_token_id_rows(tmp_path, tiny):
    tok = _tok(tiny[1])
    t = tmp_path / "book.txt"
    t.write_text("the quick brown fox jumps over\nthe lazy dog\n\nmedusa adds extra decoding heads\n")
    data = encode_file(t, tok, seq_len=64, num_heads=3, vocab_size=VOCAB)
    assert len(data) == 2 and data.labels[0] == data.input_ids[0]
    f = _write(tmp_path / "ids.jsonl", [{"prompt_token_ids": [1, 5, 6], "response_token_ids": [7, 8, 9, 10]}])
    d2 = encode_file(f, tok, seq_len=64, num_heads=3, vocab_size=VOCAB)
    assert d2.input_ids == [[1, 5, 6, 7, 8, 9, 10]]
    assert d2.labels == [[-100, -100, -100, 7, 8, 9, 10]]
    # truncation to seq_len
    d3 = encode_file(f, tok, seq_len=5, num_heads=3, vocab_size=VOCAB)
    assert d3.input_ids == [[1, 5, 6, 7, 8]] and d3.stats[0].truncated == 1


def test_split_and_collate():
    data = EncodedData([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[1, 2, 3], [-100, 5], [6, 7, 8, 9]])
    train_d, eval_d = split_train_eval(data, 0.34, 10, seed=0)
    assert len(train_d) == 2 and len(eval_d) == 1
    assert sorted(train_d.input_ids + eval_d.input_ids) == sorted(data.input_ids)
    b = collate(data, [1, 2], pad_id=0)
    assert b.input_ids.tolist() == [[4, 5, 0, 0], [6, 7, 8, 9]]
    assert b.labels.tolist() == [[-100, 5, -100, -100], [6, 7, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(TrainingError, match="--eval-fraction 0"):
        split_train_eval(data.subset([0]), 0.5, 10, seed=0)


# ------------------------------------------------------------- bad input
def test_bad_data_files_name_the_file_and_fix(tmp_path, tiny):
    tok = _tok(tiny[1])
    kw = dict(seq_len=64, num_heads=3, vocab_size=VOCAB)
    with pytest.raises(TrainingError, match="does not exist"):
        encode_file(tmp_path / "missing.jsonl", tok, **kw)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(TrainingError, match=r"empty\.jsonl is empty"):
        encode_file(empty, tok, **kw)
    odd = _write(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(TrainingError, match=r"odd\.jsonl: no usable field.*found columns \['foo'\]"):
        encode_file(odd, tok, **kw)
    short = _write(tmp_path / "short.jsonl", [{"text": "dog"}, {"text": "fox"}])
    with pytest.raises(TrainingError, match=r"short\.jsonl.*shorter than num_heads \+ 2 = 5"):
        encode_file(short, tok, **kw)
    noasst = _write(tmp_path / "noasst.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(TrainingError, match=r"noasst\.jsonl.*malformed.*no assistant turn"):
        encode_file(noasst, tok, **kw)
    badids = _write(tmp_path / "badids.jsonl",
                    [{"prompt_token_ids": [1, 2], "response_token_ids": [3, 4, 5, 99999]}])
    with pytest.raises(TrainingError, match=r"99999 is outside the model's vocabulary"):
        encode_file(badids, tok, **kw)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(TrainingError, match="unknown extension '.csv'"):
        encode_file(csv, tok, **kw)
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text("{not json\n")
    with pytest.raises(TrainingError, match=r"bad\.jsonl could not be read"):
        encode_file(badjson, tok, **kw)


def test_bad_config_values_name_the_field(tmp_path, tiny):
    with pytest.raises(TrainingError, match="seq_len must be >= num_heads \\+ 2 = 7"):
        _cfg(tmp_path, tiny, num_heads=5, seq_len=6).validate()
    with pytest.raises(TrainingError, match="recipe must be one of"):
        _cfg(tmp_path, tiny, recipe="medusa3").validate()
    with pytest.raises(TrainingError, match="head_weights must have num_heads=3"):
        _cfg(tmp_path, tiny, head_weights=[1.0]).validate()
    with pytest.raises(TrainingError, match="needs LoRA"):
        _cfg(tmp_path, tiny, recipe="medusa2", lora=False, self_distill=True).validate()
    with pytest.raises(TrainingError, match="cache_hidden='memory' needs recipe medusa1"):
        _cfg(tmp_path, tiny, recipe="medusa2", cache_hidden="memory").validate()
    with pytest.raises(TrainingError, match="lr must be a number"):
        _cfg(tmp_path, tiny, lr=-1.0).validate()


def test_output_folder_is_never_overwritten_silently(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not empty; refusing.*--resume.*--overwrite"):
        train(_cfg(tmp_path, tiny, max_steps=1))
    res = train(_cfg(tmp_path, tiny, max_steps=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert (res.heads_dir / "config.json").is_file()
    # a second run into the same folder is refused again
    with pytest.raises(TrainingError, match="not empty"):
        train(_cfg(tmp_path, tiny, max_steps=1))


def test_bad_model_heads_and_resume_inputs(tmp_path, tiny):
    with pytest.raises(TrainingError, match="not a HF model folder"):
        train(_cfg(tmp_path, tiny, model=str(tmp_path / "nowhere")))
    with pytest.raises(TrainingError, match="draft_vocab_size must be < the backbone's vocab_size"):
        train(_cfg(tmp_path, tiny, draft_vocab_size=VOCAB, overwrite=True))
    wrong = MedusaHeads(MedusaHeadsConfig(hidden_size=32, vocab_size=VOCAB, num_heads=3))
    save_heads(wrong, tmp_path / "wrong_heads")
    with pytest.raises(TrainingError, match="hidden_size 32 != backbone hidden_size 64"):
        train(_cfg(tmp_path, tiny, heads_init=str(tmp_path / "wrong_heads"), overwrite=True))
    other = MedusaHeads(MedusaHeadsConfig(hidden_size=HIDDEN, vocab_size=VOCAB, num_heads=2))
    save_heads(other, tmp_path / "two_heads")
    with pytest.raises(TrainingError, match="num_heads=2.*--num-heads"):
        train(_cfg(tmp_path, tiny, heads_init=str(tmp_path / "two_heads"), overwrite=True))
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(_cfg(tmp_path, tiny, output=str(tmp_path / "fresh"), resume=True))
    train(_cfg(tmp_path, tiny, max_steps=2, overwrite=True))
    with pytest.raises(TrainingError, match=r"options differ.*num_heads: saved 3, now 2"):
        train(_cfg(tmp_path, tiny, num_heads=2, max_steps=4, resume=True))


# ------------------------------------------------------------------ Medusa-1
def test_medusa1_keeps_backbone_bit_identical_and_lowers_heads_loss(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, max_steps=40, lr=3e-3)
    trainer = MedusaTrainer(cfg)
    result = trainer.run()
    base = _base_model(tiny[1]).state_dict()
    after = trainer.model.state_dict()
    assert base.keys() == after.keys()
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert not any(p.requires_grad for p in trainer.model.parameters())
    losses = [r["heads_loss"] for r in result.log]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    # outputs: heads loadable, accuracies [num_heads][10]
    heads = load_heads(result.heads_dir)
    assert heads.config.num_heads == 3 and heads.config.base_model_name_or_path == str(tiny[1])
    acc = json.loads((result.output / "accuracies.json").read_text())
    assert len(acc) == 3 and all(len(r) == 10 for r in acc)
    assert all(a <= b for r in acc for a, b in zip(r, r[1:]))
    summary = json.loads((result.output / "train_summary.json").read_text())
    assert summary["steps"] == 40 and summary["steps_per_second"] > 0


def test_medusa1_heads_start_from_backbone_lm_head_and_draft_vocab(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, draft_vocab_size=40, max_steps=1)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    lm = _base_model(tiny[1]).lm_head.weight
    tm = trainer.heads.token_map
    assert tm is not None and tm.numel() == 40
    for layer in trainer.heads.lm_layers:
        assert torch.equal(layer.weight.detach(), lm[tm])
    # the draft vocabulary holds the most frequent training targets
    from medusa_vllm.training.data import label_token_counts

    counts = label_token_counts(trainer.train_data, VOCAB)
    assert counts[tm].min() >= counts[counts.argsort(descending=True)[39]]
    # head 0 of the initial heads reproduces the backbone's logits on the draft ids
    h = torch.randn(3, HIDDEN)
    torch.testing.assert_close(head_logits(trainer.heads, 0, h), h @ lm[tm].T)
    rec = trainer.train_step(0)
    assert all(math.isfinite(x) for x in rec["head_losses"])


def test_medusa1_hidden_cache_memory_and_disk(tmp_path, tiny):
    ref = train(_cfg(tmp_path, tiny, output=str(tmp_path / "none"), max_steps=6, cache_hidden="none"))
    mem = train(_cfg(tmp_path, tiny, output=str(tmp_path / "mem"), max_steps=6, cache_hidden="memory"))
    disk_cfg = _cfg(tmp_path, tiny, output=str(tmp_path / "disk"), max_steps=6, cache_hidden="disk")
    disk = train(disk_cfg)
    a, b, c = (load_file(str(r.heads_dir / "model.safetensors")) for r in (ref, mem, disk))
    for k in a:  # same numbers up to padding-dependent float rounding
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c[k], b[k], atol=0, rtol=0)
    files = list((tmp_path / "disk" / "cache").glob("hidden-*.bin"))
    assert len(files) == 1
    meta = json.loads(files[0].with_suffix(".json").read_text())
    assert meta["complete"] and meta["hidden"] == HIDDEN
    # a resumed run reuses the cache file instead of recomputing it
    mtime = files[0].stat().st_mtime_ns
    disk_cfg.max_steps, disk_cfg.resume = 8, True
    train(disk_cfg)
    assert files[0].stat().st_mtime_ns == mtime
    # so does an overwriting run on the same data; other data replaces it
    disk_cfg.resume, disk_cfg.overwrite, disk_cfg.lr = False, True, 3e-3
    train(disk_cfg)
    assert files[0].stat().st_mtime_ns == mtime
    disk_cfg.cache_dtype = "bfloat16"
    train(disk_cfg)
    now = list((tmp_path / "disk" / "cache").glob("hidden-*"))
    assert len(now) == 3 and files[0] not in now  # the new .bin, .json and .rows.json only


def test_auto_cache_mode(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, max_steps=10, batch_size=4, cache_max_gb=1.0)
    assert cfg.resolve_cache_mode(1000, 64, train_rows=100) == "none"   # 40 rows seen < 1 epoch
    assert cfg.resolve_cache_mode(1000, 64, train_rows=20) == "memory"  # 2 epochs, 256 kB
    assert cfg.resolve_cache_mode(2**28, 64, train_rows=20) == "none"   # 64 GiB > 1 GiB
    cfg.recipe = "medusa2"
    assert cfg.resolve_cache_mode(1000, 64, train_rows=20) == "none"
    cfg.recipe, cfg.cache_hidden = "medusa1", "disk"
    assert cfg.resolve_cache_mode(1000, 64, train_rows=100) == "disk"


# ------------------------------------------------------------------ Medusa-2
def test_medusa2_param_groups_and_lrs(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, recipe="medusa2", lr=2e-4, heads_lr_multiplier=4.0,
               lr_scheduler="constant", max_steps=3)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"heads", "backbone"}
    assert groups["heads"]["lr"] == pytest.approx(8e-4)
    assert groups["backbone"]["lr"] == pytest.approx(2e-4)
    head_ids = {id(p) for p in trainer.heads.parameters() if p.requires_grad}
    assert {id(p) for p in groups["heads"]["params"]} == head_ids
    lora = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in groups["backbone"]["params"]} == lora
    rec = trainer.train_step(0)
    assert rec["lr"] == {"heads": pytest.approx(8e-4), "backbone": pytest.approx(2e-4)}
    # Medusa-1 has a single heads group with lr as given
    m1 = MedusaTrainer(_cfg(tmp_path, tiny, output=str(tmp_path / "m1"), lr=5e-3))
    m1.setup()
    assert [(g["name"], g["lr"]) for g in m1.optimizer.param_groups] == [("heads", 5e-3)]
    # full fine-tuning: every backbone weight in the backbone group
    full = MedusaTrainer(_cfg(tmp_path, tiny, output=str(tmp_path / "full"), recipe="medusa2",
                              lora=False, lr=1e-5))
    full.setup()
    g = {g["name"]: g for g in full.optimizer.param_groups}
    assert len(g["backbone"]["params"]) == len(list(full.model.parameters()))
    assert g["heads"]["lr"] == pytest.approx(4e-5)


def test_medusa2_lora_changes_only_adapters_and_heads(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, recipe="medusa2", max_steps=6, lr=1e-2, lambda0_warmup_steps=2)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    heads0 = {k: v.clone() for k, v in trainer.heads.state_dict().items()}
    for s in range(6):
        rec = trainer.train_step(s)
        assert rec["stage"] == "joint"
        assert rec["lambda0"] == pytest.approx(lambda0_at(s, 0.2, 2, "sine"))
    base = _base_model(tiny[1]).state_dict()
    changed_lora = 0
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            changed_lora += int("lora_B" in name and bool(p.detach().abs().sum() > 0))
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p.detach(), base[key]), name
    assert changed_lora > 0
    heads1 = trainer.heads.state_dict()
    assert any(not torch.equal(heads0[k], heads1[k]) for k in heads0)


def test_medusa2_teacher_with_adapters_disabled_is_the_base_model(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, recipe="medusa2", max_steps=4, lr=1e-2)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    for s in range(3):
        trainer.train_step(s)
    base = _base_model(tiny[1])
    batch = collate(trainer.train_data, [0, 1, 2], trainer.pad_id)
    trainer.model.eval()
    with torch.no_grad():
        want = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        student = trainer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with trainer.model.disable_adapter():
            teacher = trainer.model(input_ids=batch.input_ids,
                                    attention_mask=batch.attention_mask).logits
    assert torch.equal(teacher, want)
    assert not torch.allclose(student, want)  # the adapters did learn something
    trainer.config.self_distill = True
    t = trainer._teacher(batch, None)
    assert torch.equal(t.logits, want)


def test_medusa2_heads_only_stage_then_joint(tmp_path, tiny):
    cfg = _cfg(tmp_path, tiny, recipe="medusa2", max_steps=5, heads_only_steps=2,
               lambda0_schedule="linear", lambda0_warmup_steps=2, lambda0=0.5)
    trainer = MedusaTrainer(cfg)
    trainer.setup()
    lora0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    recs = [trainer.train_step(s) for s in range(2)]
    assert [r["stage"] for r in recs] == ["heads", "heads"]
    assert all(torch.equal(p, dict(trainer.model.named_parameters())[n]) for n, p in lora0.items())
    recs += [trainer.train_step(s) for s in range(2, 5)]
    assert [r["stage"] for r in recs[2:]] == ["joint"] * 3
    assert [r["lambda0"] for r in recs[2:]] == pytest.approx([0.0, 0.25, 0.5])
    assert any(not torch.equal(p, dict(trainer.model.named_parameters())[n])
               for n, p in lora0.items())


def test_medusa2_outputs_merged_backbone_adapter_and_heads(tmp_path, tiny):
    import shutil

    from transformers import AutoModelForCausalLM

    src = tmp_path / "backbone"
    shutil.copytree(tiny[1], src)
    raw = json.loads((src / "config.json").read_text())
    raw["rope_theta"] = 10000.0  # a top-level key transformers 5 does not write back
    (src / "config.json").write_text(json.dumps(raw))
    cfg = _cfg(tmp_path, tiny, model=str(src), recipe="medusa2", max_steps=4, lr=1e-2,
               lambda0_warmup_steps=1)
    trainer = MedusaTrainer(cfg)
    res = trainer.run()
    assert (res.adapter_dir / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(res.model_dir)).eval()
    base = _base_model(tiny[1])
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        got = merged(ids).logits
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(_base_model(tiny[1]), str(res.adapter_dir)).eval()(ids).logits
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base(ids).logits)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (res.model_dir / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((res.model_dir / "config.json").read_text())["rope_theta"] == 10000.0
    heads = load_heads(res.heads_dir)
    assert heads.config.base_model_name_or_path == str(res.model_dir)
    assert len(json.loads((res.output / "accuracies.json").read_text())) == 3


# -------------------------------------------------------------------- resume
@pytest.mark.parametrize("recipe", ["medusa1", "medusa2"])
def test_resume_continues_bit_exactly(tmp_path, tiny, recipe):
    extra = dict(lora_dropout=0.1, lambda0_warmup_steps=3) if recipe == "medusa2" else {}
    straight = train(_cfg(tmp_path, tiny, recipe=recipe, output=str(tmp_path / "a"), max_steps=8,
                          **extra))
    # interrupted after 4 steps (a checkpoint was saved at step 4) ...
    cfg_b = _cfg(tmp_path, tiny, recipe=recipe, output=str(tmp_path / "b"), max_steps=8,
                 save_steps=4, **extra)
    part = MedusaTrainer(cfg_b)
    part.setup()
    for s in range(4):
        part.train_step(s)
    part.step = 4
    part.save_checkpoint()
    torch.manual_seed(1234)  # whatever happened to the RNG since
    # ... and resumed
    cfg_b.resume = True
    resumed = train(cfg_b)
    assert resumed.steps == 8
    a = load_file(str(straight.output / "checkpoints" / "step-00000008" / "heads.safetensors"))
    b = load_file(str(resumed.output / "checkpoints" / "step-00000008" / "heads.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if recipe == "medusa2":
        a = load_file(str(straight.output / "checkpoints" / "step-00000008" / "backbone.safetensors"))
        b = load_file(str(resumed.output / "checkpoints" / "step-00000008" / "backbone.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in straight.log]
    lb = [json.loads(x)["loss"] for x in (resumed.output / "train_log.jsonl").read_text().splitlines()]
    assert la[4:] == lb[-4:]


def test_checkpoints_keep_the_newest(tmp_path, tiny):
    res = train(_cfg(tmp_path, tiny, max_steps=6, save_steps=2, save_total_limit=2))
    names = sorted(p.name for p in (res.output / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000006"]
    state = json.loads((res.output / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["step"] == 6


# -------------------------------------------------------- self-distillation
def _self_generated(tmp_path, tiny, n=16, new=20) -> Path:
    """The tiny backbone's own greedy continuations, as distill.py writes them."""
    model = _base_model(tiny[1])
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (1, 6), generator=g)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             do_sample=False, pad_token_id=2, eos_token_id=None)
        rows.append({"prompt_token_ids": prompt[0].tolist(),
                     "response_token_ids": out[0, 6:].tolist()})
    return _write(tmp_path / "self.jsonl", rows)


def test_self_distill_medusa2_kl_starts_at_zero(tmp_path, tiny):
    data = _self_generated(tmp_path, tiny)
    cfg = _cfg(tmp_path, tiny, data=[str(data)], recipe="medusa2", self_distill=True,
               max_steps=6, lr=1e-2, lambda0_warmup_steps=1)
    res = train(cfg)
    # LoRA starts as the identity: the student is the teacher, KL = 0.
    assert res.log[0]["lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["lm_loss"] >= -1e-6 for r in res.log)
    assert any(r["lm_loss"] > 1e-8 for r in res.log[1:])


def test_self_distill_medusa1_kl_heads_and_topk(tmp_path, tiny):
    data = _self_generated(tmp_path, tiny)
    for i, top_k in enumerate([None, 5]):
        cfg = _cfg(tmp_path, tiny, data=[str(data)], self_distill=True, distill_heads_loss="kl",
                   distill_top_k=top_k, output=str(tmp_path / f"o{i}"), max_steps=25, lr=3e-3)
        res = train(cfg)
        losses = [r["heads_loss"] for r in res.log]
        assert all(x >= -1e-6 for x in losses)
        assert sum(losses[-5:]) < sum(losses[:5])


def test_medusa1_draft_vocab_teacher_equals_full_teacher(tmp_path, tiny):
    """With a reduced draft vocabulary the Medusa-1 teacher multiplies by only
    those lm_head rows; every head's KL equals the full-logits teacher's."""
    data = _self_generated(tmp_path, tiny, n=8)
    trainer = MedusaTrainer(_cfg(tmp_path, tiny, data=[str(data)], self_distill=True,
                                 distill_heads_loss="kl", draft_vocab_size=16))
    trainer.setup()
    tm = trainer.heads.token_map
    assert tm is not None and tm.numel() == 16
    batch = collate(trainer.train_data, [0, 1, 2], trainer.pad_id)
    hidden = trainer._hidden_for(batch)
    draft = trainer._teacher(batch, hidden)
    assert draft.draft and draft.logits.shape[-1] == 16
    full = TeacherLogits.from_logits(trainer.model.get_output_embeddings()(hidden).float())
    torch.testing.assert_close(draft.logits, full.logits[..., tm], rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    student = torch.randn(hidden.shape[0] * hidden.shape[1], 16, generator=g)
    for k in range(3):
        a = kl_from_logits(student, TeacherLogits(
            logits=draft.shifted(k + 1).logits.reshape(-1, 16), draft=True), tm, trainer.inverse)
        b = kl_from_logits(student, TeacherLogits(
            logits=full.shifted(k + 1).logits.reshape(-1, full.logits.shape[-1])), tm,
            trainer.inverse)
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_self_distill_ce_needs_no_teacher(tmp_path, tiny):
    data = _self_generated(tmp_path, tiny, n=8)
    trainer = MedusaTrainer(_cfg(tmp_path, tiny, data=[str(data)], self_distill=True))
    trainer.setup()
    batch = collate(trainer.train_data, [0, 1], trainer.pad_id)
    assert trainer._teacher(batch, torch.zeros(2, 3, HIDDEN)) is None
    assert trainer.train_step(0)["heads_loss"] > 0


# ----------------------------------------------------------------------- CLI
def test_cli_flags_map_to_config_and_run(tmp_path, tiny, capsys):
    import argparse

    from medusa_vllm.training.cli import add_train_args, config_from_args, train_main

    p = add_train_args(argparse.ArgumentParser())
    root, model, text = tiny
    args = p.parse_args([
        "--model", str(model), "--data", str(text), "--output", str(tmp_path / "cli"),
        "--recipe", "medusa2", "--num-heads", "2", "--max-steps", "2", "--lr", "3e-4",
        "--heads-lr-multiplier", "5", "--lambda0", "0.3", "--lambda0-schedule", "linear",
        "--lora-rank", "4", "--seq-len", "32", "--draft-vocab-size", "64", "--no-progress",
        "--save-steps", "0",
    ])
    cfg = config_from_args(args)
    assert (cfg.recipe, cfg.num_heads, cfg.lr, cfg.heads_lr, cfg.lambda0) == \
        ("medusa2", 2, 3e-4, pytest.approx(1.5e-3), 0.3)
    assert (cfg.lora, cfg.lora_rank, cfg.draft_vocab_size, cfg.resume) == (True, 4, 64, False)
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "held-out top-k accuracy" in out and "heads:" in out
    # the same folder again: refused with exit code 2 and a message naming the fix
    assert train_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert p.parse_args(["--model", "m", "--output", "o", "--resume"]).resume is True
    assert p.parse_args(["--model", "m", "--output", "o", "--resume", "ck"]).resume == "ck"


def test_grad_accum_uses_consecutive_micro_batches(tmp_path, tiny):
    trainer = MedusaTrainer(_cfg(tmp_path, tiny, batch_size=2, grad_accum=3, max_steps=2))
    trainer.setup()
    n = len(trainer.train_data)
    want = sum(collate(trainer.train_data, batch_indices(n, 2, 0, m), trainer.pad_id).num_tokens
               for m in range(3, 6))
    trainer.train_step(0)
    assert trainer.train_step(1)["tokens"] == want


@pytest.mark.slow
def test_medusa2_merged_backbone_runs_in_vllm(tmp_path, tiny):
    """The merged Medusa-2 backbone is a plain HF folder vLLM loads and decodes like HF."""
    from medusa_vllm.training.distill import encode_prompts, generate_distill_data

    res = train(_cfg(tmp_path, tiny, recipe="medusa2", max_steps=4, lr=1e-2,
                     lambda0_warmup_steps=1))
    msgs = [[{"role": "user", "content": "the quick brown fox"}]]
    out = generate_distill_data(res.model_dir, msgs, tmp_path / "gen.jsonl", max_tokens=10,
                                max_model_len=64, verbose=False)
    row = json.loads(out.read_text().splitlines()[0])
    ids = encode_prompts(_tok(res.model_dir), msgs)[0]
    assert row["prompt_token_ids"] == ids
    merged = _base_model(res.model_dir)
    x = torch.tensor([ids])
    want = merged.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=2,
                           eos_token_id=None, max_new_tokens=len(row["response_token_ids"]))
    assert row["response_token_ids"] == want[0, len(ids):].tolist()


def test_hidden_cache_rows_equal_single_row_forward(tiny):
    """The cache batches rows by length; every row still holds its own hidden states."""
    from medusa_vllm.training.cache import HiddenCache, backbone_hidden

    _, model_dir, _ = tiny
    lm = _base_model(model_dir)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 30, 2, 19, 30, 11, 5)]
    data = EncodedData(ids, [list(x) for x in ids])
    cache = HiddenCache.build(lm, data, pad_id=0, batch_size=3)
    assert cache.lengths == [len(x) for x in ids]
    for i, row in enumerate(ids):
        want = backbone_hidden(lm, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
        got = cache.storage[cache.offsets[i]: cache.offsets[i] + len(row)]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.batch([i], 32)[0, :len(row)], want, atol=1e-5, rtol=1e-5)


def test_hidden_cache_grown_data_copies_old_rows(tmp_path, tiny, monkeypatch):
    """Adding rows to a disk cache's data runs only the new rows through the backbone."""
    from medusa_vllm.training import cache as cache_mod
    from medusa_vllm.training.cache import HiddenCache, row_keys

    _, model_dir, _ = tiny
    lm = _base_model(model_dir)
    computed = []
    real = cache_mod.backbone_hidden

    def counting(model, input_ids, attention_mask):
        computed.append(int(input_ids.shape[0]))
        return real(model, input_ids, attention_mask)

    monkeypatch.setattr(cache_mod, "backbone_hidden", counting)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 30, 2, 19, 30, 11, 5, 9)]
    old_data = EncodedData(ids[:5], [list(x) for x in ids[:5]])
    new_data = EncodedData(ids[2:] + ids[:2], [list(x) for x in ids[2:] + ids[:2]])
    folder = tmp_path / "cache"

    def build(data, name, parts=("m", "float32")):
        return HiddenCache.build(lm, data, pad_id=0, batch_size=2, mode="disk",
                                 path=folder / f"hidden-{name}.bin", fingerprint=name,
                                 keys=row_keys(data, *parts))

    old = build(old_data, "a")
    assert sum(computed) == 5
    old_rows = [old.storage[o: o + n].clone() for o, n in zip(old.offsets, old.lengths)]
    computed.clear()
    new = build(new_data, "b")
    assert sum(computed) == 3  # ids[5:], the rows the old cache lacked
    for j, i in enumerate([2, 3, 4, 0, 1]):  # copied rows are the old numbers, bit for bit
        slot = j if j < 3 else j + 3
        got = new.storage[new.offsets[slot]: new.offsets[slot] + new.lengths[slot]]
        assert torch.equal(got, old_rows[i])
    fresh = HiddenCache.build(lm, new_data, pad_id=0, batch_size=2)
    torch.testing.assert_close(new.storage, fresh.storage, atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in folder.iterdir()) == [
        "hidden-b.bin", "hidden-b.json", "hidden-b.rows.json"]  # the old cache is gone
    # rows keyed for another model (or dtype) are never reused
    computed.clear()
    build(old_data, "c", parts=("other-model", "float32"))
    assert sum(computed) == 5
    with pytest.raises(ValueError, match="keys: 2 for 5 rows"):
        HiddenCache.build(lm, old_data, pad_id=0, batch_size=2, mode="disk",
                          path=folder / "hidden-d.bin", keys=["x", "y"])
