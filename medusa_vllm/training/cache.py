"""Backbone hidden states: computed once, reused every epoch (Medusa-1).

With a frozen backbone the heads only ever see the backbone's last hidden
states, so they can be computed once per row and kept in memory or in a
memory-mapped file (``cache_hidden="memory"|"disk"``). Rows are computed in a
fixed order (so a resumed run reads the very same numbers) and stored
back-to-back in one ``[total_tokens, H]`` tensor.

A disk cache also records a key per row (its token ids, the model and the dtypes;
``hidden-*.rows.json``). When the data grows (more self-distilled answers), the
rows an older cache in the same folder already holds are copied from it, and only
the new rows run through the backbone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from medusa_vllm.core.dtypes import TORCH_DTYPES
from medusa_vllm.training.data import EncodedData, collate

__all__ = ["HiddenCache", "backbone_hidden", "data_fingerprint", "row_keys"]



def backbone_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                    ) -> torch.Tensor:
    """The backbone's last hidden states ``[B, T, H]`` (after its final norm:
    what its ``lm_head`` consumes), without computing the vocabulary logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def _parts_hash(parts: Sequence[object]) -> "hashlib._Hash":
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h


def _row_bytes(ids: Sequence[int]) -> bytes:
    """A row as hashed: its length, then its ids as int64."""
    return len(ids).to_bytes(4, "little") + torch.tensor(ids, dtype=torch.int64).numpy().tobytes()


def data_fingerprint(data: EncodedData, *parts: object) -> str:
    """SHA-256 of the rows' token ids and ``parts`` (model path, dtypes...)."""
    h = _parts_hash(parts)
    for ids in data.input_ids:
        h.update(_row_bytes(ids))
    return h.hexdigest()[:16]


def row_keys(data: EncodedData, *parts: object) -> list[str]:
    """A key per row: SHA-256 of ``parts`` (model path, dtypes...) and the row's ids."""
    head = _parts_hash(parts)
    keys = []
    for ids in data.input_ids:
        h = head.copy()
        h.update(_row_bytes(ids))
        keys.append(h.hexdigest()[:24])
    return keys


def _rows_file(file: Path) -> Path:
    return file.with_name(file.stem + ".rows.json")


def _reusable_rows(folder: Path, keep: Path, hidden_size: int, dtype: str
                   ) -> dict[str, tuple[torch.Tensor, int, int]]:
    """Rows held by the other complete caches in ``folder``: key -> (storage, offset, length)."""
    found: dict[str, tuple[torch.Tensor, int, int]] = {}
    for meta_file in sorted(folder.glob("hidden-*.json")):
        if meta_file.name.endswith(".rows.json") or meta_file.stem == keep.stem:
            continue
        bin_file, rows_file = meta_file.with_suffix(".bin"), _rows_file(meta_file.with_suffix(".bin"))
        try:
            meta = json.loads(meta_file.read_text())
            rows = json.loads(rows_file.read_text())
        except (OSError, ValueError):
            continue
        if not (meta.get("complete") and meta.get("hidden") == hidden_size
                and meta.get("dtype") == dtype and bin_file.is_file()):
            continue
        keys, lengths = rows["keys"], rows["lengths"]
        if len(keys) != len(lengths) or sum(lengths) != meta.get("total"):
            continue
        storage = torch.from_file(str(bin_file), shared=False, size=meta["total"] * hidden_size,
                                  dtype=TORCH_DTYPES[dtype]).view(meta["total"], hidden_size)
        offset = 0
        for key, n in zip(keys, lengths):
            found.setdefault(key, (storage, offset, n))
            offset += n
    return found


class HiddenCache:
    """Hidden states of every row of a dataset.

    Args:
        storage: ``[total_tokens, H]`` rows back to back.
        offsets: start row in ``storage`` of each dataset row.
        lengths: tokens of each dataset row.
    """

    def __init__(self, storage: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]):
        self.storage = storage
        self.offsets = list(offsets)
        self.lengths = list(lengths)

    @property
    def hidden_size(self) -> int:
        return self.storage.shape[1]

    def batch(self, indices: Sequence[int], width: int, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        """``[len(indices), width, H]`` hidden states, zero past each row's end."""
        out = torch.zeros(len(indices), width, self.hidden_size, dtype=dtype)
        for r, i in enumerate(indices):
            n = min(self.lengths[i], width)
            o = self.offsets[i]
            out[r, :n] = self.storage[o: o + n].to(dtype)
        return out

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        data: EncodedData,
        *,
        pad_id: int,
        batch_size: int,
        mode: str = "memory",
        path: str | Path | None = None,
        dtype: str = "float32",
        fingerprint: str = "",
        keys: Sequence[str] | None = None,
        progress: bool = False,
    ) -> "HiddenCache":
        """Compute (or, for ``mode="disk"``, reuse a complete matching file at
        ``path``) the hidden states of every row of ``data``.

        ``keys`` (see :func:`row_keys`), for ``mode="disk"``: rows whose key another
        complete cache in the same folder holds are copied from it, not recomputed.
        """
        from tqdm.auto import tqdm

        if mode not in ("memory", "disk"):
            raise ValueError(f"cache mode must be 'memory' or 'disk', found {mode!r}")
        lengths = [len(x) for x in data.input_ids]
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        total = sum(lengths)
        param = next(model.parameters())
        hidden_size = int(model.config.hidden_size)
        tdtype = TORCH_DTYPES[dtype]
        meta = {"fingerprint": fingerprint, "total": total, "hidden": hidden_size, "dtype": dtype}
        if mode == "disk":
            if path is None:
                raise ValueError("cache mode 'disk' needs a path")
            file = Path(path)
            meta_file = file.with_suffix(".json")
            if file.is_file() and meta_file.is_file():
                saved = json.loads(meta_file.read_text())
                if saved == {**meta, "complete": True}:
                    storage = torch.from_file(str(file), shared=False, size=total * hidden_size,
                                              dtype=tdtype).view(total, hidden_size)
                    return cls(storage, offsets, lengths)
            file.parent.mkdir(parents=True, exist_ok=True)
            meta_file.unlink(missing_ok=True)
            if keys is not None and len(keys) != len(data):
                raise ValueError(f"keys: {len(keys)} for {len(data)} rows")
            old = _reusable_rows(file.parent, file, hidden_size, dtype) if keys is not None else {}
            nbytes = total * hidden_size * torch.empty((), dtype=tdtype).element_size()
            with open(file, "wb") as f:
                f.truncate(nbytes)
            storage = torch.from_file(str(file), shared=True, size=total * hidden_size,
                                      dtype=tdtype).view(total, hidden_size)
        else:
            storage = torch.empty(total, hidden_size, dtype=tdtype)
            old = {}
        todo = list(range(len(data)))
        if old:
            copied = []
            for i in todo:
                hit = old.get(keys[i])
                if hit is not None and hit[2] == lengths[i]:
                    src, o, n = hit
                    storage[offsets[i]: offsets[i] + n] = src[o: o + n]
                    copied.append(i)
            todo = sorted(set(todo) - set(copied))
            if progress:
                print(f"hidden-state cache: {len(copied)} of {len(data)} rows copied from an "
                      f"older cache, {len(todo)} to compute", flush=True)
        if mode == "disk":
            old.clear()
            for stale in file.parent.glob("hidden-*"):  # caches of other data/models
                if not stale.name.startswith(file.stem + "."):
                    stale.unlink()
        was_training = model.training
        model.eval()
        # Rows of similar length share a batch (less padding to run through the
        # backbone); each row still lands at its own offset, so the cache is the same.
        order = sorted(todo, key=lambda i: (lengths[i], i))
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc="caching hidden states", disable=not progress, unit="batch"):
            idx = order[s: s + batch_size]
            b = collate(data, idx, pad_id)
            hidden = backbone_hidden(model, b.input_ids.to(param.device),
                                     b.attention_mask.to(param.device))
            for r, i in enumerate(idx):
                storage[offsets[i]: offsets[i] + lengths[i]] = hidden[r, : lengths[i]].to(
                    "cpu", tdtype)
        model.train(was_training)
        if mode == "disk":
            del storage  # flush the shared mapping
            if keys is not None:
                _rows_file(file).write_text(json.dumps({"keys": list(keys), "lengths": lengths}))
            meta_file.write_text(json.dumps({**meta, "complete": True}))
            storage = torch.from_file(str(file), shared=False, size=total * hidden_size,
                                      dtype=tdtype).view(total, hidden_size)
        return cls(storage, offsets, lengths)
