"""What the training tests share: a tiny random Llama and a small text corpus of
repeated phrases (something heads can learn in a few dozen steps)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from medusa_vllm.tools.tiny_models import build_tiny_llama

VOCAB, HIDDEN = 320, 64
WORDS = ("the quick brown fox jumps over the lazy dog medusa adds extra decoding heads "
         "to predict several tokens at once speculative drafts verify").split()


def tiny_model_and_text(root: Path) -> tuple[Path, Path, Path]:
    """``(root, model, text)``: a 2-layer Llama under ``root/model`` and 48 JSONL rows
    of an 8-word phrase repeated three times under ``root/text.jsonl``."""
    model = build_tiny_llama(root / "model", vocab=VOCAB, hidden=HIDDEN, layers=2, seed=0)
    rng = random.Random(0)
    text = root / "text.jsonl"
    with open(text, "w") as f:
        for _ in range(48):
            start = rng.randrange(len(WORDS) - 8)
            f.write(json.dumps({"text": " ".join(WORDS[start:start + 8] * 3)}) + "\n")
    return root, model, text
