"""The OpenAI server refuses bad ``medusa_*`` overrides while building the
request's SamplingParams (before a stream starts: HTTP 400, not an error event),
once this process's engine verifies Medusa trees; other engines leave them be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import medusa_vllm_patches.request_params_check as check


@pytest.fixture
def front_end(monkeypatch):
    check.apply()
    monkeypatch.setattr(check, "_FRONT_END", {})
    return check._FRONT_END


def _requests():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    xargs = {"medusa_acceptance": "fast"}
    return [CompletionRequest(model="m", prompt="x", stream=True, vllm_xargs=xargs),
            ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                  vllm_xargs=xargs)]


def test_medusa_engine_refuses_bad_overrides_when_params_are_built(front_end):
    from vllm.exceptions import VLLMValidationError

    assert check.is_applied()
    front_end["vllm_config"] = SimpleNamespace(additional_config={"medusa": {"tree": "t"}})
    for req in _requests():
        with pytest.raises(VLLMValidationError, match="medusa_acceptance: expected 'greedy'"):
            req.to_sampling_params(8, {})


def test_other_engines_leave_medusa_keys_alone(front_end):
    for req in _requests():
        assert req.to_sampling_params(8, {}).extra_args == {"medusa_acceptance": "fast"}


def test_input_processor_records_a_medusa_engine(front_end):
    from vllm.v1.engine.input_processor import InputProcessor

    assert getattr(InputProcessor.__init__, "__medusa_vllm_patch__", False)
