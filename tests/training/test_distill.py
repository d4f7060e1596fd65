"""Self-distillation data: prompts, vLLM generation (slow), and the train flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_vllm.tools.tiny_models import build_tiny_llama
from medusa_vllm.training import TrainConfig, TrainingError, distill
from medusa_vllm.training.data import load_prompts
from medusa_vllm.training.distill import encode_prompts, ensure_distill_data, generate_distill_data
from medusa_vllm.training.trainer import train

VOCAB, HIDDEN = 320, 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return root, build_tiny_llama(root / "model", vocab=VOCAB, hidden=HIDDEN, layers=2, seed=0)


def _tok(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    x = torch.tensor([prompt_ids])
    out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                     pad_token_id=2, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()


def test_encode_prompts_uses_the_chat_template_when_present(tiny):
    tok = _tok(tiny[1])
    msgs = [[{"role": "user", "content": "the quick brown fox"}]]
    want = tok(tok.apply_chat_template(msgs[0], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert encode_prompts(tok, msgs) == [want]
    assert tok.decode(want).endswith("<s>assistant: ")
    tok.chat_template = None
    assert encode_prompts(tok, msgs) == [tok("the quick brown fox")["input_ids"]]


def test_load_prompts_from_every_format(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "p1"}, {"prompt": ""}, {"prompt": "p2"}])
    b = _write(tmp_path / "b.jsonl", [{"conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
        {"from": "gpt", "value": "answer"}, {"from": "human", "value": "q2"}]}])
    c = tmp_path / "c.txt"
    c.write_text("first paragraph\n\nsecond paragraph\n")
    got = load_prompts([a, b, c])
    assert got == [
        [{"role": "user", "content": "p1"}], [{"role": "user", "content": "p2"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
        [{"role": "user", "content": "first paragraph"}],
        [{"role": "user", "content": "second paragraph\n"}],
    ]
    bad = _write(tmp_path / "bad.jsonl", [{"answer": "x"}])
    with pytest.raises(TrainingError, match=r"bad\.jsonl: no prompt field.*\['answer'\]"):
        load_prompts([bad])
    blank = _write(tmp_path / "blank.jsonl", [{"prompt": ""}])
    with pytest.raises(TrainingError, match=r"blank\.jsonl has no usable prompt"):
        load_prompts([blank])


def test_generate_distill_data_refuses_bad_requests(tmp_path, tiny):
    out = tmp_path / "d.jsonl"
    out.write_text("keep me\n")
    msgs = [[{"role": "user", "content": "the dog"}]]
    with pytest.raises(TrainingError, match="exists; refusing to overwrite"):
        generate_distill_data(tiny[1], msgs, out)
    assert out.read_text() == "keep me\n"
    with pytest.raises(TrainingError, match="at least one prompt"):
        generate_distill_data(tiny[1], [], tmp_path / "e.jsonl")
    with pytest.raises(TrainingError, match="max_model_len=4.*--seq-len"):
        generate_distill_data(tiny[1], msgs, tmp_path / "f.jsonl", max_model_len=4)


def _fake_vllm(monkeypatch, calls):
    """Replace vLLM generation by HF greedy decoding (same JSONL schema)."""

    def fake(model, prompts, output, **kw):
        calls.append((len(prompts), kw))
        tok = _tok(model)
        rows = []
        for msgs, ids in zip(prompts, encode_prompts(tok, prompts)):
            resp = _hf_greedy(model, ids, 12)
            rows.append({"prompt": msgs[-1]["content"], "messages": msgs, "response": tok.decode(resp),
                         "prompt_token_ids": ids, "response_token_ids": resp,
                         "finish_reason": "length", "temperature": kw["temperature"]})
        assert not Path(output).exists()
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        return _write(Path(output), rows)

    monkeypatch.setattr(distill, "generate_distill_data", fake)


def test_self_distill_run_generates_then_trains_and_resume_reuses(tmp_path, tiny, monkeypatch):
    calls: list = []
    _fake_vllm(monkeypatch, calls)
    prompts = _write(tmp_path / "prompts.jsonl",
                     [{"prompt": w} for w in "the quick brown fox jumps over lazy dog".split()])
    cfg = TrainConfig(model=str(tiny[1]), data=[str(prompts)], output=str(tmp_path / "out"),
                      recipe="medusa2", self_distill=True, num_heads=2, seq_len=64, batch_size=4,
                      max_steps=3, save_steps=0, progress=False, distill_temperature=0.0,
                      distill_num_prompts=6, eval_fraction=0.2, log_steps=1)
    res = train(cfg)
    assert len(calls) == 1 and calls[0][0] == 6 and calls[0][1]["max_model_len"] == 64
    rows = [json.loads(x) for x in (res.output / "distill.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["prompt"] == "the"
    assert res.log[0]["lm_loss"] == pytest.approx(0.0, abs=1e-6)  # KL to the teacher
    cfg.resume, cfg.max_steps = True, 5
    res2 = train(cfg)
    assert res2.steps == 5 and len(calls) == 1  # reused distill.jsonl


def test_pregenerated_files_are_used_as_they_are(tmp_path, tiny, monkeypatch):
    calls: list = []
    _fake_vllm(monkeypatch, calls)
    ready = _write(tmp_path / "gen.jsonl", [{"prompt_token_ids": [1, 5, 6],
                                            "response_token_ids": [7, 8, 9, 10, 11]}] * 4)
    cfg = TrainConfig(model=str(tiny[1]), data=[str(ready)], output=str(tmp_path / "o"),
                      self_distill=True, num_heads=2)
    assert ensure_distill_data(cfg, tmp_path / "o") == [str(ready)]
    assert calls == []


def test_builtin_prompts_without_data(monkeypatch, tmp_path, tiny):
    import medusa_vllm.training.prompts as mdata
    from medusa_vllm.training.corpora.common import MissingCorpus

    monkeypatch.setattr(mdata, "build_prompts", lambda n, seed=0: [f"prompt {i}" for i in range(n)])
    calls: list = []
    _fake_vllm(monkeypatch, calls)
    cfg = TrainConfig(model=str(tiny[1]), output=str(tmp_path / "o"), self_distill=True,
                      num_heads=2, distill_num_prompts=3, progress=False)
    files = ensure_distill_data(cfg.validate(), tmp_path / "o")
    assert files == [str(tmp_path / "o" / "distill.jsonl")] and calls[0][0] == 3

    def missing(n, seed=0):
        raise MissingCorpus("apt-get install fortunes")

    monkeypatch.setattr(mdata, "build_prompts", missing)
    with pytest.raises(TrainingError, match="apt-get install fortunes.*--data"):
        ensure_distill_data(cfg, tmp_path / "o2")


def test_distill_cli_reports_bad_input(tmp_path, tiny, capsys):
    import argparse

    from medusa_vllm.training.cli import add_distill_args, distill_main

    out = tmp_path / "x.jsonl"
    out.write_text("")
    p = _write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    args = add_distill_args(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny[1]), "--prompts", str(p), "--output", str(out)])
    assert distill_main(args) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_vllm_generation_matches_hf_greedy_and_trains(tmp_path, tiny):
    """vLLM (CPU, child process) writes the backbone's own greedy continuations."""
    tok = _tok(tiny[1])
    msgs = [[{"role": "user", "content": t}] for t in
            ("the quick brown fox", "medusa adds extra decoding heads", "speculative decoding")]
    out = generate_distill_data(tiny[1], msgs, tmp_path / "gen.jsonl", max_tokens=12,
                                max_model_len=64, verbose=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    for row, m, ids in zip(rows, msgs, encode_prompts(tok, msgs)):
        assert row["prompt"] == m[0]["content"] and row["prompt_token_ids"] == ids
        assert len(row["response_token_ids"]) >= 1
        n = len(row["response_token_ids"])
        assert row["response_token_ids"] == _hf_greedy(tiny[1], ids, n)
        assert row["finish_reason"] in ("stop", "length")
    res = train(TrainConfig(model=str(tiny[1]), data=[str(out)], output=str(tmp_path / "o"),
                            num_heads=2, seq_len=64, max_steps=3, save_steps=0,
                            eval_fraction=0.34, progress=False, self_distill=True))
    assert res.steps == 3 and len(res.accuracies) == 2
