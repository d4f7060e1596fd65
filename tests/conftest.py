"""Fixtures shared by the test packages: tiny random models and heads folders built
on the fly (no hub, no downloads), and a one-thread torch for tiny trainings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medusa_vllm.tools.engine_proc import IN_PROCESS_ENV
from medusa_vllm.tools.tiny_models import build_tiny_llama, write_medusa_heads_config

TINY_VOCAB, TINY_HIDDEN = 512, 64

# Offline test engines run their engine core and worker inside the engine_proc child
# (a third of the start-up time here); servers, Ray and TP=2 keep vLLM's processes.
os.environ.setdefault(IN_PROCESS_ENV, "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random Llama (vocabulary 512, hidden 64) with its tokenizer."""
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab=TINY_VOCAB,
                                hidden=TINY_HIDDEN, layers=2))


@pytest.fixture
def heads_dir(tmp_path: Path) -> Path:
    """A heads folder holding only ``config.json`` (3 heads sized for :func:`tiny`):
    enough for everything that does not load weights."""
    return write_medusa_heads_config(tmp_path / "heads", num_heads=3, hidden_size=TINY_HIDDEN,
                                     vocab_size=TINY_VOCAB)


@pytest.fixture
def heads(heads_dir: Path) -> str:
    return str(heads_dir)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest (and most reproducibly) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
