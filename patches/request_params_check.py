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


def is_applied() -> bool:
    from vllm.v1.engine.input_processor import InputProcessor

    return getattr(InputProcessor._validate_params, _MARK, False)


def apply() -> None:
    """Wrap ``InputProcessor._validate_params`` (no-op if already wrapped)."""
    from vllm.v1.engine.input_processor import InputProcessor

    validate = InputProcessor._validate_params
    if getattr(validate, _MARK, False):
        return

    @functools.wraps(validate)
    def wrapped_validate_params(self: Any, params: Any, *args: Any, **kwargs: Any):
        result = validate(self, params, *args, **kwargs)
        check_request(getattr(self, "vllm_config", None), params)
        return result

    setattr(wrapped_validate_params, _MARK, True)
    InputProcessor._validate_params = wrapped_validate_params  # type: ignore[method-assign]
