"""The engine-subprocess helper's fast parts: job/result serialisation, the
engine arguments and environment it gives the child, and a failing child
reported with its output (no vLLM engine is started)."""

from __future__ import annotations

import json
import time

import pytest

from medusa_vllm.tools import engine_proc
from medusa_vllm.tools.engine_proc import (
    EngineJob,
    EngineResult,
    EngineRunError,
    chat_prompt,
    engine_kwargs,
    run_engine,
)


def test_job_and_result_round_trip_through_json():
    job = EngineJob(llm=engine_kwargs("/m", speculative_config={"method": "medusa_tree", "model": "/h"}),
                    prompts=[[1, 2, 3], [4]], sampling=[{"temperature": 0.0}, {"max_tokens": 3}],
                    refuse=[{"temperature": 0.8}], warmup=1, probe="pkg.mod:fn", probe_args={"a": 1})
    assert EngineJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    res = EngineResult(token_ids=[[5, 6], [7]], texts=["a", "b"], finish_reasons=["length", "stop"],
                       logprobs=[[{"5": -0.1}]], refused=["ValueError: no"], wall_s=1.5,
                       metrics={"mean_accepted_length": 1.2}, probe={"x": 2})
    assert EngineResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    assert res.output_tokens == 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['prompt'\]"):
        EngineJob.from_dict({"llm": {}, "prompts": [], "prompt": "x"})


def test_engine_kwargs_are_the_cpu_defaults():
    kw = engine_kwargs("/m", max_model_len=512, max_num_seqs=8)
    assert kw == {"model": "/m", "dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.3,
                  "max_model_len": 512, "seed": 0, "max_num_seqs": 8}
    sc = {"method": "medusa_tree", "model": "/h"}
    assert engine_kwargs("/m", speculative_config=sc, seed=3)["speculative_config"] == sc
    assert engine_kwargs("/m", speculative_config=sc, seed=3)["seed"] == 3
    assert "speculative_config" not in engine_kwargs("/m", speculative_config=None)


def test_child_env_layers_binding_defaults_and_overrides(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    env = engine_proc._child_env({"A": "1"}, {"VLLM_CPU_KVCACHE_SPACE": "2", "B": "2"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7"  # the caller's setting wins over a default
    assert env["A"] == "1" and env["B"] == "2"
    assert engine_proc._child_env({"VLLM_CPU_KVCACHE_SPACE": "3"}, None)["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_in_process_only_for_single_rank_engines_without_a_chosen_executor(monkeypatch):
    job = EngineJob(llm=engine_kwargs("/m"), prompts=["x"])
    payload, env = engine_proc._child_job(job, {"A": "1"}, in_process=True)
    assert payload["llm"]["distributed_executor_backend"] == "uni" and payload["llm"]["model"] == "/m"
    assert env == {"A": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert "distributed_executor_backend" not in job.llm  # the caller's job is not changed
    for llm in ({**job.llm, "tensor_parallel_size": 2}, {**job.llm, "data_parallel_size": 2},
                {**job.llm, "distributed_executor_backend": "mp"}):
        payload, env = engine_proc._child_job(EngineJob(llm=llm, prompts=["x"]), {}, in_process=True)
        assert payload["llm"] == llm and env == {}
    payload, env = engine_proc._child_job(job, {}, in_process=False)
    assert payload["llm"] == job.llm and env == {}
    monkeypatch.setenv(engine_proc.IN_PROCESS_ENV, "1")
    assert engine_proc._child_job(job, {}, in_process=None)[1] == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    monkeypatch.setenv(engine_proc.IN_PROCESS_ENV, "0")
    assert engine_proc._child_job(job, {}, in_process=None)[1] == {}


def test_chat_prompt_uses_the_template_or_says_there_is_none():
    class Tok:
        chat_template = "t"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(m["content"] for m in messages) + "<assistant>"

    assert chat_prompt(Tok(), [{"role": "user", "content": "hi"}]) == "hi<assistant>"
    Tok.chat_template = None
    assert chat_prompt(Tok(), [{"role": "user", "content": "hi"}]) is None


def test_failing_child_raises_with_its_output_tail(tmp_path):
    log = tmp_path / "engine.log"
    t0 = time.perf_counter()
    with pytest.raises(EngineRunError) as err:
        run_engine(EngineJob(llm=engine_kwargs(tmp_path / "no-such-model"), prompts=["x"]),
                   timeout=120, log=log)
    msg = str(err.value)
    assert "engine run failed (exit 1" in msg
    assert "FileNotFoundError: engine job: model folder" in msg and "no-such-model does not exist" in msg
    assert "Traceback" in log.read_text()  # the child's output, also in the log file
    assert time.perf_counter() - t0 < 60  # refused before vLLM is imported


def test_output_sink_keeps_error_lines_and_a_bounded_tail():
    sink = engine_proc._OutputSink(None, echo=False)
    sink.feed(b"INFO start\nValueErr")
    sink.feed(b"or: bad\n" + b"x" * (engine_proc._TAIL_BYTES + 10))
    assert sink.error_lines == ["ValueError: bad"]
    assert len(sink.tail) == engine_proc._TAIL_BYTES
    assert "ValueError: bad" in sink.report()
