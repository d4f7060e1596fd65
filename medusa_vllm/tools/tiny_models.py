"""Tiny random models built on the fly (no hub, no downloads): for tests and
for the demo's fallback when the default model's heads are not available.

``build_tiny_llama`` writes a random ``LlamaForCausalLM`` plus a byte-level BPE
tokenizer trained on a few built-in sentences into a directory that vLLM and
transformers load fully offline. ``write_medusa_heads_config`` writes just the
``config.json`` of a Medusa heads folder (enough for config validation tests;
weights are built by :mod:`medusa_vllm.core.heads` in other tests).

Everything is deterministic for a given ``seed`` and takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_tiny_llama", "build_tiny_tokenizer", "distill_tiny_heads", "write_medusa_heads_config"]

_SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Medusa adds extra decoding heads to predict several tokens at once.",
    "Speculative decoding drafts tokens and verifies them in one forward pass.",
    "The capital of France is Paris, and the capital of Spain is Madrid.",
    "Once upon a time, there was a little girl who loved to read stories.",
    "A tree of candidate continuations is verified with a tree attention mask.",
    "def hello(name):\n    return f'Hello, {name}!'\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "In the beginning God created the heavens and the earth.",
    "Typical acceptance keeps candidates whose probability exceeds a threshold.",
]


def build_tiny_tokenizer(directory: str | Path, vocab: int = 512):
    """Save a ``PreTrainedTokenizerFast`` of at most ``vocab`` tokens in ``directory``.

    ``vocab >= 260``: byte-level BPE (lossless for any text) trained on a small
    built-in corpus. Smaller ``vocab``: a word-level tokenizer over the corpus
    words with ``<unk>`` for the rest. Special tokens: ``<unk>``=0, ``<s>``=1
    (BOS), ``</s>``=2 (EOS). Returns the tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab < len(_SPECIALS) + 1:
        raise ValueError(f"vocab must be >= {len(_SPECIALS) + 1}, found {vocab}")
    corpus = _CORPUS * 4
    if vocab >= 260:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab,
            min_frequency=1,
            special_tokens=_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab, min_frequency=1, special_tokens=_SPECIALS,
            show_progress=False,
        )
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        model_max_length=4096,
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    hf_tok.save_pretrained(str(directory))
    return hf_tok


def build_tiny_llama(
    directory: str | Path,
    vocab: int = 512,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_position_embeddings: int = 1024,
    dtype: str = "float32",
) -> Path:
    """Write a random tiny Llama (weights + tokenizer) to ``directory``; return its path.

    Defaults: vocab 512, hidden 64, 2 layers, head_dim 32 (``heads = hidden // 32``,
    ``kv_heads = heads`` so TP=2 works with hidden 64), float32 weights in
    ``model.safetensors``. The tokenizer has ``len <= vocab`` tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n_heads = heads if heads is not None else max(1, hidden // 32)
    if hidden % n_heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({n_heads})")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=kv_heads if kv_heads is not None else n_heads,
        head_dim=hidden // n_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    # transformers 5 calls the saved dtype ``dtype``; 4.x calls it ``torch_dtype``.
    setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", dtype)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
        # Random init in transformers is N(0, 0.02): make logits less flat so
        # greedy decoding is not dominated by ties.
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tiny_tokenizer(out, vocab=vocab)
    return out


def write_medusa_heads_config(
    directory: str | Path,
    num_heads: int = 3,
    hidden_size: int = 64,
    vocab_size: int = 512,
    **extra: object,
) -> Path:
    """Write a Medusa heads ``config.json`` (no weights) in ``directory``; return the path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"num_heads": num_heads, "hidden_size": hidden_size, "vocab_size": vocab_size,
           "num_layers": 1, **extra}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def distill_tiny_heads(model_dir: str | Path, out: str | Path, num_heads: int = 3, steps: int = 400,
                       num_sequences: int = 512, seed: int = 0, head_type: str = "medusa") -> Path:
    """Medusa-1 heads self-distilled for a few seconds on the backbone's own greedy
    continuations of random prompts (head k at position t learns token t+k+2).
    ``head_type="hydra"``: Hydra heads, teacher-forced on the continuation's tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from medusa_vllm.checkpoints import save_heads
    from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
    from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig

    out = Path(out)
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    vocab, hidden_size = lm.lm_head.weight.shape
    prompts = torch.randint(3, vocab, (num_sequences, 4))
    with torch.no_grad():
        seqs = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=60,
                           do_sample=False, pad_token_id=2, eos_token_id=None)
        hidden = lm.model(seqs).last_hidden_state  # [B, T, H]
    if head_type == "hydra":
        heads = HydraHeads(HydraHeadsConfig(hidden_size=hidden_size, vocab_size=vocab,
                                            num_heads=num_heads),
                           lm_head_weight=lm.lm_head.weight.detach(),
                           embed_weight=lm.get_input_embeddings().weight.detach())
    else:
        heads = MedusaHeads(MedusaHeadsConfig(hidden_size=hidden_size, vocab_size=vocab,
                                              num_heads=num_heads),
                            lm_head_weight=lm.lm_head.weight.detach())
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)
    t = seqs.shape[1]
    for step in range(steps):
        rows = torch.randint(0, seqs.shape[0], (64,), generator=torch.Generator().manual_seed(step))
        logits = heads(hidden[rows], seqs[rows]) if head_type == "hydra" else heads(hidden[rows])
        loss = 0.0
        for k in range(num_heads):
            shift = k + 2
            pred = logits[k, :, : t - shift].reshape(-1, vocab)
            loss = loss + 0.8**k * torch.nn.functional.cross_entropy(pred, seqs[rows, shift:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_heads(heads, out, overwrite=True)
    return out
