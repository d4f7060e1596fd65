"""Loading heads: read any layout, check every tensor against the config, and
assemble :class:`~medusa_vllm.core.heads.MedusaHeads`; and
:func:`check_compatible`, whether heads fit a backbone."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from medusa_vllm.checkpoints import faster_decoding, ours, trtllm, vllm_medusa
from medusa_vllm.checkpoints.common import READ_LAYOUTS, RawHeads, check_dir, short_list
from medusa_vllm.checkpoints.detect import detect_layout
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.core.heads import (
    MedusaHeads,
    MedusaHeadsConfig,
    strip_vocab_padding,
    token_map_problem,
)
from medusa_vllm.core.hydra import HydraHeads, HydraHeadsConfig

__all__ = ["check_compatible", "expected_shapes", "load_heads", "verify_heads"]

READERS: dict[str, Callable[[Path], RawHeads]] = {
    "medusa_vllm": ours.read,
    "vllm": vllm_medusa.read,
    "medusa": faster_decoding.read,
    "trtllm": trtllm.read,
}
assert tuple(READERS) == READ_LAYOUTS


def _meta_heads(config: MedusaHeadsConfig | HydraHeadsConfig,
                dtype: torch.dtype | None = None) -> MedusaHeads | HydraHeads:
    """Unallocated (meta-device) heads of ``config`` (Medusa or Hydra), with a
    placeholder ``token_map`` if the draft vocabulary is reduced."""
    placeholder = (
        torch.arange(config.draft_vocab_size)
        if config.truncated_vocab_size is not None
        else None
    )
    if isinstance(config, HydraHeadsConfig):
        return HydraHeads(config, token_map=placeholder, device="meta", dtype=dtype)
    return MedusaHeads(config, token_map=placeholder, device="meta", dtype=dtype)


def expected_shapes(config: MedusaHeadsConfig) -> dict[str, tuple[int, ...]]:
    """State-dict name -> shape of the heads ``config`` describes."""
    return {name: tuple(t.shape) for name, t in _meta_heads(config).state_dict().items()}


def _assemble(
    raw: RawHeads,
    *,
    lm_head_weight: torch.Tensor | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    strict: bool,
) -> MedusaHeads:
    """Check ``raw``'s tensors against its config and build the heads from them."""
    config = raw.config
    expected = expected_shapes(config)
    tensors = dict(raw.tensors)
    supplied_lm = config.original_lm_head and lm_head_weight is not None

    unexpected = {n: raw.origin[n] for n in tensors if n not in expected}
    unexpected.update(raw.unexpected)
    if unexpected:
        msg = (
            f"unexpected tensor(s) in the {raw.layout} checkpoint {raw.directory} "
            f"(num_heads={config.num_heads}, num_layers={config.num_layers}, "
            f"original_lm_head={config.original_lm_head}, resblock_bias="
            f"{config.resblock_bias}): {short_list(unexpected.values(), limit=5)}"
        )
        if strict:
            raise MedusaCheckpointError(msg + "; pass strict=False to ignore them")
        warnings.warn(msg + "; ignored (strict=False)", stacklevel=3)
        for n in unexpected:
            tensors.pop(n, None)

    missing = [n for n in expected if n not in tensors]
    if supplied_lm:
        missing = [n for n in missing if n != "lm_head.weight"]
    if missing:
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = (
                "; these heads share the backbone's LM layer (original_lm_head) "
                "and the checkpoint omits it: pass the backbone's lm_head weight, "
                "e.g. load_heads(path, lm_head_weight="
                "backbone.lm_head.weight) or load_backbone_lm_head(backbone_dir)"
            )
        raise MedusaCheckpointError(
            f"missing tensor(s) in the {raw.layout} checkpoint {raw.directory}: "
            f"{short_list(missing)}{hint}"
        )

    token_map = tensors.get("token_map")
    if token_map is not None:
        problem = token_map_problem(token_map, expected["token_map"][0], config.vocab_size)
        if problem:
            raise MedusaCheckpointError(f"{raw.origin['token_map']}: {problem}")
        token_map = token_map.to(torch.long)
        tensors["token_map"] = token_map

    h = config.hidden_size
    for name, shape in expected.items():
        if name == "token_map" or name not in tensors:
            continue
        t = tensors[name]
        where = raw.origin[name]
        if not t.dtype.is_floating_point:
            raise MedusaCheckpointError(
                f"{where}: expected a floating-point tensor, found dtype {t.dtype}"
            )
        if name.startswith("lm_head") and tuple(t.shape) != shape:
            if token_map is not None and tuple(t.shape) == (config.vocab_size, h):
                t = t.index_select(0, token_map)  # full-vocab weight: slice as vLLM
                tensors[name] = t
        if tuple(t.shape) != shape:
            what = {
                2: "[hidden_size, hidden_size]"
                if "blocks" in name and ".path." not in name
                else "[hidden_size, (head + 2) * hidden_size]"
                if "blocks" in name
                else "[draft_vocab + 1, hidden_size]"
                if name == "embed.weight"
                else "[draft_vocab, hidden_size]",
                1: "[hidden_size]",
            }.get(len(shape), "")
            raise MedusaCheckpointError(
                f"{where}: expected shape {list(shape)} {what} (hidden_size={h}, "
                f"vocab_size={config.vocab_size}, draft_vocab="
                f"{config.draft_vocab_size}, as head 0 / the config), found "
                f"{list(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MedusaCheckpointError(
                f"{where}: {bad} NaN/Inf value(s) of {t.numel()}; the heads "
                f"checkpoint is corrupt"
            )

    if supplied_lm:
        assert lm_head_weight is not None
        weight = strip_vocab_padding(lm_head_weight.detach(), config.vocab_size)
        dv = config.draft_vocab_size
        if (
            weight.dim() != 2
            or weight.shape[1] != h
            or weight.shape[0] not in (config.vocab_size, dv)
        ):
            raise MedusaCheckpointError(
                f"lm_head_weight: expected shape [{config.vocab_size}, {h}] "
                f"(the backbone's lm_head for vocab_size/hidden_size of "
                f"{raw.directory}), found {list(weight.shape)}"
            )
        if weight.shape[0] != dv:
            weight = weight.index_select(0, token_map.to(weight.device))  # type: ignore[union-attr]
        tensors["lm_head.weight"] = weight

    if dtype is None:  # the checkpoint's own dtype (LM weights first)
        stored = [n for n in expected if n in raw.tensors and n != "token_map"]
        stored.sort(key=lambda n: not n.startswith("lm_head"))
        dtype = tensors[stored[0] if stored else "lm_head.weight"].dtype
    target = torch.device(device) if device is not None else torch.device("cpu")

    # Build unallocated (meta) and adopt the loaded tensors without copies (a
    # supplied lm_head_weight already of this dtype/device stays shared).
    heads = _meta_heads(config, dtype)
    state = {
        name: tensors[name].to(target)
        if name == "token_map"
        else tensors[name].to(device=target, dtype=dtype)
        for name in expected
    }
    heads.load_state_dict(state, strict=True, assign=True)
    if isinstance(heads, HydraHeads):
        heads.embed.weight.requires_grad_(False)  # the backbone's embedding rows: frozen
    if config.original_lm_head:
        assert heads.lm_head is not None
        heads.lm_head.weight.requires_grad_(False)
    return heads


def load_heads(
    path: str | os.PathLike[str],
    *,
    lm_head_weight: torch.Tensor | None = None,
    layout: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> MedusaHeads | HydraHeads:
    """Load Medusa heads from a directory in any of ``READ_LAYOUTS`` (Hydra heads,
    ``config.json`` ``"head_type": "hydra"``, from our layout only).

    Args:
        path: the heads directory.
        lm_head_weight: the backbone's ``lm_head`` weight ``[vocab_size, H]``.
            A vLLM ``ParallelLMHead`` weight padded to a multiple of 64 rows
            is accepted (the padding is dropped). Used only for heads that
            share the backbone's LM layer
            (``original_lm_head``): required if the checkpoint omits
            ``lm_head.weight``, and preferred over the stored copy if both exist
            (no copy is made when dtype/device already match, so the heads stay
            tied to the backbone). Ignored for per-head LM layers.
        layout: force a layout instead of auto-detection (:func:`detect_layout`).
        device, dtype: where/in which dtype to put the parameters (default: CPU,
            the checkpoint's LM weight dtype).
        strict: unexpected tensors raise (default) or are ignored with a warning.

    Raises:
        MedusaCheckpointError: naming the file/tensor/field at fault.
    """
    d = check_dir(path)
    if layout is None:
        layout = detect_layout(d)
    elif layout not in READERS:
        raise MedusaCheckpointError(
            f"unknown layout {layout!r}; readable layouts: {list(READ_LAYOUTS)}"
        )
    raw = READERS[layout](d)
    return _assemble(
        raw, lm_head_weight=lm_head_weight, device=device, dtype=dtype, strict=strict
    )


def verify_heads(path: str | os.PathLike[str], *, layout: str | None = None,
                 strict: bool = True) -> MedusaHeadsConfig | HydraHeadsConfig:
    """Every check :func:`load_heads` makes (files readable and complete, tensor
    names and shapes, finite values), without building the heads: for a
    front-end that must refuse bad heads before an engine process loads them.

    The tensors are read once and dropped; a shared ``lm_head`` the checkpoint
    omits (``original_lm_head``) is taken as present (the backbone supplies it).
    Returns the heads' config; raises :class:`MedusaCheckpointError` like
    :func:`load_heads`.
    """
    d = check_dir(path)
    raw = READERS[detect_layout(d) if layout is None else layout](d)
    config = raw.config
    lm = None
    if config.original_lm_head:  # stand-in for the backbone's weight: shape only
        lm = torch.empty(config.vocab_size, config.hidden_size, device="meta")
    _assemble(raw, lm_head_weight=lm, device="meta", dtype=None, strict=strict)
    return config


def check_compatible(
    config: MedusaHeadsConfig,
    backbone_hidden_size: int,
    backbone_vocab_size: int,
    *,
    source: str = "heads",
) -> None:
    """Raise :class:`MedusaCheckpointError` unless the heads fit the backbone.

    ``backbone_vocab_size`` is the number of rows of the backbone's lm_head
    (its ``config.vocab_size``), not the tokenizer's length.
    """
    problems = []
    if config.hidden_size != backbone_hidden_size:
        problems.append(
            f"hidden_size {config.hidden_size} != backbone hidden_size "
            f"{backbone_hidden_size}"
        )
    if config.vocab_size != backbone_vocab_size:
        problems.append(
            f"vocab_size {config.vocab_size} != backbone vocab_size "
            f"{backbone_vocab_size}"
        )
    if problems:
        base = config.base_model_name_or_path
        trained = f" (trained for {base!r})" if base else ""
        raise MedusaCheckpointError(
            f"{source}{trained} do not fit this backbone: " + "; ".join(problems)
        )
