"""Tiny random models for tests: see :mod:`medusa_vllm.testing`."""

from medusa_vllm.testing import *  # noqa: F401,F403
from medusa_vllm.testing import build_tiny_llama, build_tiny_tokenizer, distill_tiny_heads, write_medusa_heads_config  # noqa: F401
