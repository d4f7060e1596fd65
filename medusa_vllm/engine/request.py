"""Per-request Medusa policy: acceptance overrides and which requests may carry drafts.

Per request, ``SamplingParams(extra_args={...})`` may override the engine-wide
acceptance options of :class:`medusa_vllm.engine.options.MedusaTreeConfig`
(:func:`request_overrides`, keys :data:`REQUEST_KEYS`); the request is refused
at admission when a value is bad (:mod:`medusa_vllm_patches.request_params_check`).
:func:`draftable` says whether a request's sampling features allow tree drafts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from medusa_vllm.engine.options import (
    Acceptance,
    MedusaConfigError,
    MedusaTreeConfig,
    PosteriorAlpha,
    PosteriorThreshold,
    validation_message,
)

__all__ = ["REQUEST_KEYS", "RequestOverrides", "draftable", "request_overrides"]

REQUEST_KEY_PREFIX = "medusa_"
# SamplingParams.extra_args key -> MedusaTreeConfig field
REQUEST_KEYS = {
    "medusa_acceptance": "acceptance",
    "medusa_posterior_threshold": "posterior_threshold",
    "medusa_posterior_alpha": "posterior_alpha",
}


class _Overrides(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    acceptance: Acceptance | None = None
    posterior_threshold: PosteriorThreshold | None = None
    posterior_alpha: PosteriorAlpha | None = None


@dataclass(frozen=True)
class RequestOverrides:
    """Per-request acceptance options from ``SamplingParams.extra_args``
    (``None`` = use the engine-wide :class:`MedusaTreeConfig` value)."""

    acceptance: str | None = None
    posterior_threshold: float | None = None
    posterior_alpha: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Only the overridden options, by :class:`MedusaTreeConfig` field name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def get(self, field: str, default: Any = None) -> Any:
        """``field``'s override, or ``default`` when the request did not set it."""
        return self.as_dict().get(field, default)

    def resolve(self, config: MedusaTreeConfig) -> RequestOverrides:
        """All three options, falling back to ``config``."""
        return RequestOverrides(
            acceptance=self.acceptance or config.acceptance,
            posterior_threshold=(
                config.posterior_threshold
                if self.posterior_threshold is None
                else self.posterior_threshold
            ),
            posterior_alpha=(
                config.posterior_alpha if self.posterior_alpha is None else self.posterior_alpha
            ),
        )


def request_overrides(extra_args: Mapping[str, Any] | None) -> RequestOverrides:
    """Validate the ``medusa_*`` keys of ``SamplingParams.extra_args``.

    Keys (:data:`REQUEST_KEYS`): ``medusa_acceptance``,
    ``medusa_posterior_threshold``, ``medusa_posterior_alpha``; same rules as
    :class:`MedusaTreeConfig`. Other keys are left to their owners, but an
    unknown ``medusa_*`` key is an error (a typo would otherwise be ignored).
    """
    if not extra_args:
        return RequestOverrides()
    if not isinstance(extra_args, Mapping):
        raise MedusaConfigError(
            f"SamplingParams.extra_args: expected a dict, found {type(extra_args).__name__}"
        )
    data: dict[str, Any] = {}
    for key, value in extra_args.items():
        if not isinstance(key, str) or not key.startswith(REQUEST_KEY_PREFIX):
            continue
        if key not in REQUEST_KEYS:
            raise MedusaConfigError(
                f"SamplingParams.extra_args: unknown Medusa key {key!r}; expected one of "
                f"{sorted(REQUEST_KEYS)}"
            )
        data[REQUEST_KEYS[key]] = value
    try:
        parsed = _Overrides(**data)
    except ValidationError as exc:
        labels = {v: k for k, v in REQUEST_KEYS.items()}
        raise MedusaConfigError(
            validation_message(exc, "SamplingParams.extra_args", labels)
        ) from None
    return RequestOverrides(**parsed.model_dump())


def draftable(sampling_params, num_output_tokens: int) -> bool:
    """Whether a request may carry tree drafts.

    Features whose effect on the target distribution depends on the tokens
    before each tree node (penalties, bad words, min_tokens, structured
    output, per-request logits processors, logit bias, allowed ids, min_p)
    are verified by vLLM's own sampler one token at a time: such requests
    get no drafts (plain decoding), never a silently different answer.
    """
    sp = sampling_params
    if sp is None:
        return False
    if (
        getattr(sp, "presence_penalty", 0.0)
        or getattr(sp, "frequency_penalty", 0.0)
        or getattr(sp, "repetition_penalty", 1.0) != 1.0
        or getattr(sp, "min_p", 0.0)
        or getattr(sp, "logit_bias", None)
        or getattr(sp, "allowed_token_ids", None)
        or getattr(sp, "bad_words", None)
        or getattr(sp, "structured_outputs", None) is not None
        or getattr(sp, "logits_processors", None)
    ):
        return False
    return num_output_tokens >= getattr(sp, "min_tokens", 0)
