# vLLM 0.32 lacks a way to validate a plugin's per-request options at
# admission. It checks SamplingParams in the front-end
# (`InputProcessor._validate_params`, where a bad value becomes an HTTP 400 or
# a ValueError from `LLM.generate`), but it cannot know the Medusa keys a
# request may carry in `SamplingParams.extra_args` (`medusa_acceptance`,
# `medusa_posterior_threshold`, `medusa_posterior_alpha`). Without this patch
# a bad value would first be parsed inside the engine's worker, in the middle
# of a batched step, and take the engine down with every other request in
# flight. This patch wraps `_validate_params` to run
# `medusa_vllm.engine.request.request_overrides` at admission when the engine verifies
# Medusa trees; other engines and requests without `medusa_*` keys are untouched.
# In the OpenAI server that check runs only once a stream has started (vLLM
# admits a streamed request inside the response's generator), so a bad value
# would come back as an error event under HTTP 200. The patch therefore also
# wraps the OpenAI protocol's `to_sampling_params` (completions and chat), which
# the server calls before it answers, to run the same check there (HTTP 400
# for streamed and plain requests alike), once `InputProcessor.__init__` has
# seen that this process's engine verifies Medusa trees.
"""Refuse bad per-request Medusa overrides at admission, not mid-step."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["apply", "check_request", "is_applied", "medusa_engine", "request_error_class"]

_MARK = "__medusa_vllm_patch__"


def medusa_engine(vllm_config: Any) -> bool:
    """Whether this engine verifies Medusa trees (the plugin stored its options)."""
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, dict) and bool(extra.get("medusa"))


@functools.cache
def request_error_class() -> type[Exception]:
    """``MedusaRequestError``: both vLLM's ``VLLMValidationError`` (the async
    server answers it with HTTP 400; a plain ``ValueError`` there becomes a 500)
    and a ``ValueError`` (what offline ``LLM.generate`` callers catch)."""
    from vllm.exceptions import VLLMValidationError

    return type("MedusaRequestError", (VLLMValidationError, ValueError), {"__module__": __name__})


def check_request(vllm_config: Any, params: Any) -> None:
    """Raise ``MedusaRequestError`` naming the bad ``medusa_*`` key of
    ``params.extra_args``, or a feature the tree verifier does not honour
    (``logprob_token_ids``), when ``vllm_config`` runs Medusa trees."""
    if not medusa_engine(vllm_config):
        return
    if getattr(params, "logprob_token_ids", None) is not None:
        raise request_error_class()(
            "logprob_token_ids is not supported with medusa_tree: the tree verifier returns "
            "the top-k logprobs of each emitted token; ask for logprobs=N instead, or serve "
            "without speculative decoding",
            parameter="logprob_token_ids",
        )
    extra = getattr(params, "extra_args", None)
    if extra:
        from medusa_vllm.engine.options import MedusaConfigError
        from medusa_vllm.engine.request import request_overrides

        try:
            request_overrides(extra)
        except MedusaConfigError as err:
            raise request_error_class()(str(err), parameter="extra_args") from None


# Set by the wrapped InputProcessor.__init__: the engine config of this
# process's engine when it verifies Medusa trees (the OpenAI server has one).
_FRONT_END: dict[str, Any] = {}

_REQUEST_CLASSES = (
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
)


def _request_classes() -> list[type]:
    import importlib

    out = []
    for module, name in _REQUEST_CLASSES:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # a vLLM without this endpoint
            continue
    return out


def is_applied() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor

    return getattr(InputProcessor._validate_params, _MARK, False) and all(
        getattr(cls.to_sampling_params, _MARK, False) for cls in _request_classes())


def _wrap_to_sampling_params(cls: type) -> None:
    to_params = cls.to_sampling_params
    if getattr(to_params, _MARK, False):
        return

    @functools.wraps(to_params)
    def wrapped_to_sampling_params(self: Any, *args: Any, **kwargs: Any):
        params = to_params(self, *args, **kwargs)
        config = _FRONT_END.get("vllm_config")
        if config is not None:
            check_request(config, params)
        return params

    setattr(wrapped_to_sampling_params, _MARK, True)
    cls.to_sampling_params = wrapped_to_sampling_params


def apply() -> None:
    """Wrap ``InputProcessor._validate_params`` and ``__init__`` and the OpenAI
    requests' ``to_sampling_params`` (each a no-op if already wrapped)."""
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_params
    if not getattr(validate, _MARK, False):

        @functools.wraps(validate)
        def wrapped_validate_params(self: Any, params: Any, *args: Any, **kwargs: Any):
            result = validate(self, params, *args, **kwargs)
            check_request(getattr(self, "vllm_config", None), params)
            return result

        setattr(wrapped_validate_params, _MARK, True)
        InputProcessor._validate_params = wrapped_validate_params  # type: ignore[method-assign]

    init = InputProcessor.__init__
    if not getattr(init, _MARK, False):

        @functools.wraps(init)
        def wrapped_init(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
            init(self, vllm_config, *args, **kwargs)
            if medusa_engine(vllm_config):
                _FRONT_END["vllm_config"] = vllm_config

        setattr(wrapped_init, _MARK, True)
        InputProcessor.__init__ = wrapped_init  # type: ignore[method-assign]

    for cls in _request_classes():
        _wrap_to_sampling_params(cls)
