"""Training data: local files -> tokenized rows -> padded batches.

Files are read with HF ``datasets`` packaged builders (never from a hub):

* ``.jsonl`` / ``.json``: one JSON object per row (or a JSON array), with one of
    - ``prompt_token_ids`` + ``response_token_ids`` (lists of ints; written by
      :mod:`medusa_vllm.training.distill`; used as is, no re-tokenization);
    - ``conversations``: ShareGPT ``[{"from": "human"|"gpt"|"system", "value": str}]``;
    - ``messages``: ``[{"role": "user"|"assistant"|"system", "content": str}]``;
    - ``prompt`` + ``response`` (strings);
    - ``text`` (string).
* ``.txt`` / ``.md`` / ``.rst``: plain text, one row per paragraph (or line or
  whole file, ``text_sample_by``).
* any of those compressed (``.xz``, ``.gz``, ``.bz2``): the committed distillation
  store's files (``medusa_vllm/assets/distill/*.jsonl.xz``) are training data as they are.

Chat rows are rendered with the tokenizer's chat template when it has one (else
``"role: content"`` lines / ``prompt + "\\n" + response``). With
``loss_on="auto"`` only assistant/response tokens are targets (``labels`` =
:data:`~medusa_vllm.training.losses.IGNORE_INDEX` elsewhere); plain text trains
on every token; ``loss_on="all"`` trains on every token of every row.

Rows longer than ``seq_len`` are truncated; rows shorter than ``num_heads + 2``
tokens or without a target are dropped (counted per file); a file (or the whole
set) with no usable row raises :class:`~medusa_vllm.training.config.TrainingError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medusa_vllm.training.config import TrainingError
from medusa_vllm.training.losses import IGNORE_INDEX

__all__ = [
    "Batch",
    "EncodedData",
    "FileStats",
    "batch_indices",
    "collate",
    "detect_format",
    "encode_file",
    "label_token_counts",
    "load_prompts",
    "read_file",
    "split_train_eval",
]

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
# any of those, compressed (the committed store, medusa_vllm.training.store, is .jsonl.xz)
COMPRESSED_SUFFIXES = (".xz", ".gz", ".bz2")
FORMATS = ("ids", "conversations", "messages", "prompt_response", "text")

_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "model": "assistant", "bing": "assistant",
    "system": "system",
}


# ------------------------------------------------------------------ reading
def read_file(path: str | Path, text_sample_by: str = "paragraph"):
    """Load one local file as a ``datasets.Dataset`` (split ``train``).

    Raises :class:`TrainingError` for a missing, empty or unreadable file.
    """
    import datasets

    p = Path(path)
    if not p.exists():
        raise TrainingError(f"data file {p} does not exist; check the --data path")
    if p.is_dir():
        raise TrainingError(f"data path {p} is a directory; pass the data files themselves")
    if p.stat().st_size == 0:
        raise TrainingError(f"data file {p} is empty; it has no rows to train on")
    suffix = p.suffix.lower()
    if suffix in COMPRESSED_SUFFIXES:  # datasets decompresses them itself
        suffix = Path(p.stem).suffix.lower()
    if suffix in JSON_SUFFIXES:
        builder, kwargs = "json", {}
    elif suffix in TEXT_SUFFIXES:
        builder, kwargs = "text", {"sample_by": text_sample_by}
    else:
        raise TrainingError(
            f"data file {p}: unknown extension {suffix!r}; expected one of "
            f"{list(JSON_SUFFIXES + TEXT_SUFFIXES)} (JSON lines or plain text), optionally "
            f"compressed ({', '.join(COMPRESSED_SUFFIXES)})"
        )
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(p.resolve()), split="train", **kwargs)
    except Exception as exc:  # datasets wraps parse errors in its own types
        hint = (
            "each line must be one JSON object (JSON lines) or the file one JSON array"
            if builder == "json" else "the file must be UTF-8 text"
        )
        raise TrainingError(f"data file {p} could not be read: {hint} ({exc})") from exc


def detect_format(columns: Sequence[str], source: str = "data") -> str:
    """Which row format a file's columns hold (see the module docstring)."""
    cols = set(columns)
    if {"prompt_token_ids", "response_token_ids"} <= cols:
        return "ids"
    if "conversations" in cols:
        return "conversations"
    if "messages" in cols:
        return "messages"
    if {"prompt", "response"} <= cols:
        return "prompt_response"
    if "text" in cols:
        return "text"
    raise TrainingError(
        f"{source}: no usable field; expected 'text', 'prompt' + 'response', "
        f"'conversations' (ShareGPT: [{{'from', 'value'}}]), 'messages' "
        f"([{{'role', 'content'}}]) or 'prompt_token_ids' + 'response_token_ids'; "
        f"found columns {sorted(cols)}"
    )


# ---------------------------------------------------------------- encoding
@dataclass
class FileStats:
    """What encoding one file kept and dropped."""

    path: str
    format: str
    rows: int = 0
    kept: int = 0
    bad: int = 0  # malformed row (wrong types, unknown roles)
    too_short: int = 0  # fewer than num_heads + 2 tokens
    no_target: int = 0  # no trained-on token where a head can reach it
    truncated: int = 0
    tokens: int = 0
    target_tokens: int = 0
    first_error: str | None = None

    def summary(self) -> str:
        dropped = self.bad + self.too_short + self.no_target
        out = f"{self.path} ({self.format}): {self.kept}/{self.rows} rows, {self.tokens} tokens"
        if dropped:
            out += (f"; dropped {self.bad} malformed, {self.too_short} too short, "
                    f"{self.no_target} without targets")
            if self.first_error:
                out += f" (first malformed: {self.first_error})"
        if self.truncated:
            out += f"; truncated {self.truncated}"
        return out


@dataclass
class EncodedData:
    """Tokenized rows: ``input_ids[i]`` and ``labels[i]`` (same length)."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    stats: list[FileStats] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> "EncodedData":
        return EncodedData(
            [self.input_ids[i] for i in indices], [self.labels[i] for i in indices], self.stats
        )

    def extend(self, other: "EncodedData") -> None:
        self.input_ids += other.input_ids
        self.labels += other.labels
        self.stats += other.stats

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def _chat_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "prompt_response":
        p, r = row.get("prompt"), row.get("response")
        if not isinstance(p, str) or not isinstance(r, str):
            raise ValueError(f"'prompt' and 'response' must be strings, found "
                             f"{type(p).__name__} and {type(r).__name__}")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    turns = row.get(fmt)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"'{fmt}' must be a non-empty list, found {type(turns).__name__}")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"'{fmt}[{j}]' must be an object, found {type(turn).__name__}")
        if fmt == "conversations":
            role, content = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()), turn.get("value")
            if role is None:
                raise ValueError(f"'conversations[{j}].from' must be one of "
                                 f"{sorted(_SHAREGPT_ROLES)}, found {turn.get('from')!r}")
        else:
            role, content = turn.get("role"), turn.get("content")
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"'messages[{j}].role' must be user, assistant or system, "
                                 f"found {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"'{fmt}[{j}]' content must be a string, found {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"'{fmt}' has no assistant turn to train on")
    return out


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans of the
    assistant turns (including the template's end-of-turn markup)."""
    if getattr(tokenizer, "chat_template", None):
        def render(msgs: list[dict[str, str]], gen: bool) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text = render(messages, False)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            pre, full = render(messages[:i], True), render(messages[: i + 1], False)
            if text.startswith(full) and full.startswith(pre):
                spans.append((len(pre), len(full)))
                cursor = len(full)
            else:  # template not prefix-stable: find the content itself
                start = text.find(m["content"], cursor)
                if start < 0:
                    raise ValueError("the chat template drops an assistant turn's content")
                spans.append((start, start + len(m["content"])))
                cursor = start + len(m["content"])
        return text, spans
    parts, spans, pos = [], [], 0
    plain = len(messages) == 2 and messages[0]["role"] == "user"
    for m in messages:
        if plain:  # prompt/response without a template: prompt "\n" response
            head = "" if m["role"] == "user" else "\n"
            body = m["content"]
        else:
            head, body = f"{m['role']}: ", m["content"] + "\n"
        parts.append(head + body)
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        pos += len(head) + len(body)
    return "".join(parts), spans


def _token_labels_from_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special: bool
                             ) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of ``spans``."""
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        ids = list(enc["input_ids"])
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: by prefix length
        ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        mask = [False] * len(ids)
        for s, e in spans:
            a = len(tokenizer(text[:s], add_special_tokens=add_special)["input_ids"])
            b = len(tokenizer(text[:e], add_special_tokens=add_special)["input_ids"])
            for i in range(a, min(b, len(ids))):
                mask[i] = True
        return ids, mask
    mask = []
    for s, e in offsets:
        mask.append(e > s and any(s < se and e > ss for ss, se in spans))
    return ids, mask


def encode_row(row: dict[str, Any], fmt: str, tokenizer, loss_on: str = "auto"
               ) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row (untruncated). Raises ``ValueError``
    describing a malformed row."""
    if fmt == "ids":
        p, r = row.get("prompt_token_ids"), row.get("response_token_ids")
        for name, v in (("prompt_token_ids", p), ("response_token_ids", r)):
            if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in v):
                raise ValueError(f"'{name}' must be a list of integers")
        ids = list(p) + list(r)
        train = [loss_on == "all"] * len(p) + [True] * len(r)
    elif fmt == "text":
        text = row.get("text")
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, found {type(text).__name__}")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        train = [True] * len(ids)
    else:
        messages = _chat_messages(row, fmt)
        text, spans = render_chat(tokenizer, messages)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        ids, train = _token_labels_from_spans(tokenizer, text, spans, add_special=not has_template)
        if loss_on == "all":
            train = [True] * len(ids)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, train)]
    return ids, labels


def encode_file(
    path: str | Path,
    tokenizer,
    *,
    seq_len: int,
    num_heads: int,
    vocab_size: int,
    loss_on: str = "auto",
    text_sample_by: str = "paragraph",
) -> EncodedData:
    """Read and tokenize one file; raise :class:`TrainingError` if no row is usable."""
    ds = read_file(path, text_sample_by)
    fmt = detect_format(ds.column_names, f"data file {path}")
    stats = FileStats(str(path), fmt)
    out = EncodedData(stats=[stats])
    min_len = num_heads + 2
    for i, row in enumerate(ds):
        stats.rows += 1
        try:
            ids, labels = encode_row(row, fmt, tokenizer, loss_on)
            bad_id = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad_id is not None:
                raise ValueError(
                    f"token id {bad_id} is outside the model's vocabulary [0, {vocab_size}) "
                    f"(were the ids made with another tokenizer?)"
                )
        except ValueError as exc:
            stats.bad += 1
            stats.first_error = stats.first_error or f"row {i}: {exc}"
            continue
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            stats.truncated += 1
        if len(ids) < min_len:
            stats.too_short += 1
            continue
        if all(x == IGNORE_INDEX for x in labels[2:]):
            stats.no_target += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        stats.kept += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(x != IGNORE_INDEX for x in labels)
    if not stats.kept:
        reasons = []
        if stats.bad:
            reasons.append(f"{stats.bad} malformed (first: {stats.first_error})")
        if stats.too_short:
            reasons.append(
                f"{stats.too_short} shorter than num_heads + 2 = {min_len} tokens (use "
                f"longer texts or fewer --num-heads)"
            )
        if stats.no_target:
            reasons.append(
                f"{stats.no_target} without a trained-on token after truncation to "
                f"seq_len={seq_len} (raise --seq-len, shorten the prompts, or --loss-on all)"
            )
        raise TrainingError(
            f"data file {path} ({fmt} rows) has no usable row out of {stats.rows}: "
            + "; ".join(reasons or ["no rows"])
        )
    return out


def _leading_prompt(turns: Any, fmt: str) -> list[dict[str, str]] | None:
    """The system/user turns before the first assistant turn, if they end with
    a user turn; ``None`` for a malformed conversation."""
    if not isinstance(turns, list):
        return None
    lead: list[dict[str, str]] = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        if fmt == "conversations":
            role, content = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower()), turn.get("value")
        else:
            role, content = turn.get("role"), turn.get("content")
        if role == "assistant":
            break
        if role not in ("user", "system") or not isinstance(content, str):
            return None
        lead.append({"role": role, "content": content})
    return lead if lead and lead[-1]["role"] == "user" else None


def load_prompts(paths: Sequence[str | Path], text_sample_by: str = "paragraph"
                 ) -> list[list[dict[str, str]]]:
    """Prompts for self-distillation: each row's conversation up to its first
    assistant turn (``prompt``, ``text``, or the leading system/user turns of
    ``conversations``/``messages``). Returns message lists."""
    prompts: list[list[dict[str, str]]] = []
    for path in paths:
        ds = read_file(path, text_sample_by)
        cols = set(ds.column_names)
        if "prompt" in cols:
            fmt = "prompt"
        elif "conversations" in cols or "messages" in cols:
            fmt = "conversations" if "conversations" in cols else "messages"
        elif "text" in cols:
            fmt = "text"
        else:
            raise TrainingError(
                f"prompt file {path}: no prompt field; expected 'prompt', 'text', "
                f"'conversations' or 'messages', found columns {sorted(cols)}"
            )
        before = len(prompts)
        for row in ds:
            if fmt in ("prompt", "text"):
                value = row.get(fmt)
                if isinstance(value, str) and value.strip():
                    prompts.append([{"role": "user", "content": value}])
                continue
            lead = _leading_prompt(row.get(fmt), fmt)
            if lead:
                prompts.append(lead)
        if len(prompts) == before:
            raise TrainingError(
                f"prompt file {path} has no usable prompt (field {fmt!r} empty or "
                f"malformed in every row)"
            )
    return prompts


# ----------------------------------------------------------------- batching
def split_train_eval(data: EncodedData, eval_fraction: float, max_eval_rows: int, seed: int,
                     source: str = "data") -> tuple[EncodedData, EncodedData | None]:
    """Hold out ``eval_fraction`` of the rows (at least 1, at most
    ``max_eval_rows``) with a seeded shuffle; ``eval_fraction == 0`` holds out none."""
    n = len(data)
    if eval_fraction <= 0:
        return data, None
    n_eval = min(max_eval_rows, max(1, math.floor(n * eval_fraction + 0.5)))
    if n - n_eval < 1:
        raise TrainingError(
            f"{source}: {n} usable row(s) cannot be split into train and held-out eval "
            f"rows; add rows, pass --eval-data FILE, or --eval-fraction 0 (no eval)"
        )
    g = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(n, generator=g).tolist()
    return data.subset(sorted(perm[n_eval:])), data.subset(sorted(perm[:n_eval]))


def label_token_counts(data: EncodedData, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` counts of the target tokens (labels != IGNORE_INDEX)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for labels in data.labels:
        t = torch.tensor([x for x in labels if x != IGNORE_INDEX], dtype=torch.long)
        if t.numel():
            counts += torch.bincount(t, minlength=vocab_size)[:vocab_size]
    return counts


@dataclass
class Batch:
    """A right-padded batch (all ``[B, T]``) and the rows' dataset indices ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                self.labels, self.index)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(data: EncodedData, indices: Sequence[int], pad_id: int) -> Batch:
    """Right-pad rows ``indices`` of ``data`` to their longest length."""
    if not indices:
        raise ValueError("collate needs at least one row index")
    width = max(len(data.input_ids[i]) for i in indices)
    b = len(indices)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for r, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        labels[r, :n] = torch.tensor(data.labels[i])
        mask[r, :n] = 1
    return Batch(ids, mask, labels, torch.tensor(list(indices), dtype=torch.long))


def batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Row indices of micro-batch number ``micro_step`` (0-based, counted over
    the whole run): epochs are seeded permutations of ``range(n)`` cut into
    ``ceil(n / batch_size)`` batches (the last one may be smaller). A pure
    function of its arguments, so a resumed run sees the same batches."""
    per_epoch = math.ceil(n / batch_size)
    epoch, j = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size: (j + 1) * batch_size].tolist()


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSON lines (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
