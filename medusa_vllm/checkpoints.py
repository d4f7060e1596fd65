"""Medusa heads checkpoints: every public layout in, ours and vLLM's out.

Layouts (a heads checkpoint is a directory):

``medusa_vllm`` (ours, read/write)
    ``config.json`` with ``"medusa_vllm_format": 1``, ``"architectures":
    ["MedusaHeads"]`` and the :class:`~medusa_vllm.heads.MedusaConfig` fields;
    ``model.safetensors`` with :class:`~medusa_vllm.heads.MedusaHeads` state-dict
    names (``blocks.{k}.layers.{j}.weight|bias``, ``lm_heads.{k}.weight`` or the
    shared ``lm_head.weight``, ``token_map``). With ``original_lm_head`` the
    shared ``lm_head.weight`` may be omitted; it must then be supplied from the
    backbone at load time (``lm_head_weight=``).

``vllm`` (vLLM 0.32's built-in ``method: "medusa"``, read/write)
    ``config.json`` with ``"model_type": "medusa"`` and the fields of
    ``vllm/transformers_utils/configs/medusa.py`` (``num_heads``,
    ``num_hidden_layers``, ``hidden_size``, ``vocab_size``,
    ``truncated_vocab_size``, ``original_lm_head``, plus ``medusa_fc_bias`` which
    vLLM's ``ResidualBlock`` reads); weights in ``*.safetensors`` named as in
    ``vllm/model_executor/models/medusa.py``. Read exactly as vLLM's
    ``Medusa.load_weights`` does: ``medusa_heads.`` prefixes are dropped,
    FasterDecoding keys are remapped, a shared head may be stored as
    ``lm_heads.0.weight``, full-vocabulary LM weights are sliced with
    ``token_map``. vLLM 0.32 can only load a reduced vocabulary together with
    ``original_lm_head`` (its per-head ``ParallelLMHead`` is full-vocabulary and
    its weight loader asserts the row count), so exporting per-head LM layers
    with a reduced vocabulary is refused.

``medusa`` (FasterDecoding/Medusa, read/write)
    ``config.json`` with ``medusa_num_heads``, ``medusa_num_layers``
    (optionally ``base_model_name_or_path``); weights in
    ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` with keys
    ``{k}.{j}.linear.weight|bias`` and ``{k}.{num_layers}.weight``; sizes come
    from the tensors. TensorRT-LLM's ``examples/medusa/convert_checkpoint.py
    --medusa_model_dir`` consumes this same layout.

``trtllm`` (TensorRT-LLM converted checkpoint, read only)
    The output of TensorRT-LLM's ``examples/medusa/convert_checkpoint.py``:
    ``config.json`` with ``"architecture": "MedusaForCausalLM"``,
    ``num_medusa_heads``, ``num_medusa_layers``, ``hidden_size``,
    ``vocab_size``, ``mapping.tp_size|pp_size`` and ``rank{r}.safetensors``
    holding ``medusa_heads.{k}.medusa_layers.{j}.linear.weight|bias`` and
    ``medusa_heads.{k}.lm_head.weight``, each split along dim 0 across the
    tensor-parallel ranks (pinned from ``tensorrt_llm/models/medusa/weight.py``
    ``load_medusa_hf``). Only unquantized checkpoints
    (``quantization.quant_algo`` null) are read. ModelOpt's combined
    backbone+heads checkpoints (``"medusa": {...}`` in config.json, FP8 scales)
    are not supported.

Every problem raises :class:`MedusaCheckpointError` naming the file, the tensor
or field, what was expected and what was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medusa_vllm.heads import MedusaConfig, MedusaHeads, strip_vocab_padding, token_map_problem

__all__ = [
    "FORMAT_VERSION",
    "READ_LAYOUTS",
    "WRITE_LAYOUTS",
    "MedusaCheckpointError",
    "add_convert_args",
    "check_compatible",
    "convert",
    "convert_main",
    "detect_layout",
    "expand_draft_vocab",
    "load_backbone_lm_head",
    "load_heads",
    "save_heads",
]

FORMAT_VERSION = 1
READ_LAYOUTS = ("medusa_vllm", "vllm", "medusa", "trtllm")
WRITE_LAYOUTS = ("medusa_vllm", "vllm", "medusa")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REFERENCE_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
OUR_ARCH = "MedusaHeads"
VLLM_ARCH = "MedusaModel"
TRTLLM_ARCH = "MedusaForCausalLM"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Our config.json keys that are not MedusaConfig fields.
_OUR_META_KEYS = ("architectures", "medusa_vllm_format", "torch_dtype", "dtype")


class MedusaCheckpointError(ValueError):
    """A heads checkpoint is missing, malformed, or does not fit."""


# --------------------------------------------------------------------- helpers
def _short(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names, key=_natural_key)
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


def _natural_key(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _listing(directory: Path) -> str:
    try:
        files = sorted(
            p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
        )
    except OSError:
        return "(unreadable)"
    return _short(files, limit=12) if files else "(empty directory)"


def _check_dir(path: str | os.PathLike[str], what: str = "heads checkpoint") -> Path:
    d = Path(path)
    if not d.exists():
        raise MedusaCheckpointError(f"{what} directory {d} does not exist")
    if not d.is_dir():
        raise MedusaCheckpointError(
            f"{what} {d} is a file; expected a directory holding config.json and "
            f"the weights (pass its parent directory {d.parent} if this is the "
            f"weights file)"
        )
    return d


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise MedusaCheckpointError(
            f"{file} is missing; a heads checkpoint needs a config.json "
            f"(found in {file.parent}: {_listing(file.parent)})"
        )
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedusaCheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise MedusaCheckpointError(
            f"{file}: expected a JSON object, found {type(data).__name__}"
        )
    return data


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` / ``.pt`` / ``.bin`` file, on CPU."""
    if not file.is_file():
        raise MedusaCheckpointError(f"weights file {file} is missing")
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file), device="cpu")
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise MedusaCheckpointError(f"cannot read weights file {file}: {e}") from e
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise MedusaCheckpointError(
            f"{file}: expected a flat state dict {{name: tensor}}, found "
            f"{type(data).__name__}"
        )
    return dict(data)


def _config_int(cfg: dict, key: str, file: Path, *, minimum: int) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MedusaCheckpointError(
            f"{file}: field {key!r} must be an integer >= {minimum}, found {value!r}"
        )
    return value


def _config_bool(cfg: dict, key: str, file: Path, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MedusaCheckpointError(
            f"{file}: field {key!r} must be true or false, found {value!r}"
        )
    return value


# ---------------------------------------------------------------- raw reading
@dataclass
class _Raw:
    """A checkpoint read into our parameter names, not yet validated."""

    layout: str
    directory: Path
    config: MedusaConfig
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # our name -> "tensor 'orig' in /path/file" (for error messages)
    origin: dict[str, str] = field(default_factory=dict)
    # names we do not know (original key -> where)
    unexpected: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor, orig: str, file: Path) -> None:
        where = f"tensor {orig!r} in {file}"
        if name in self.tensors:
            raise MedusaCheckpointError(
                f"{where} duplicates {self.origin[name]} (both are {name!r})"
            )
        self.tensors[name] = tensor
        self.origin[name] = where


def detect_layout(path: str | os.PathLike[str]) -> str:
    """Name of the layout stored in directory ``path`` (one of ``READ_LAYOUTS``)."""
    d = _check_dir(path)
    cfg_file = d / CONFIG_NAME
    if not cfg_file.is_file():
        raise MedusaCheckpointError(
            f"unknown heads layout in {d}: no config.json (tried layouts "
            f"{list(READ_LAYOUTS)}; files seen: {_listing(d)})"
        )
    cfg = _read_json(cfg_file)
    if "medusa_vllm_format" in cfg:
        return "medusa_vllm"
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "medusa" or VLLM_ARCH in archs:
        return "vllm"
    if cfg.get("architecture") == TRTLLM_ARCH and "num_medusa_heads" in cfg:
        return "trtllm"
    if "medusa_num_heads" in cfg and any((d / f).is_file() for f in REFERENCE_WEIGHTS):
        return "medusa"
    keys = sorted(cfg)[:20]
    raise MedusaCheckpointError(
        f"unknown heads layout in {d}. Tried: medusa_vllm (config.json field "
        f"'medusa_vllm_format'), vllm ('model_type': 'medusa' or architectures "
        f"['{VLLM_ARCH}']), trtllm ('architecture': '{TRTLLM_ARCH}' with "
        f"'num_medusa_heads'), medusa ('medusa_num_heads' plus "
        f"{' or '.join(REFERENCE_WEIGHTS)}). Found config.json keys {keys} and "
        f"files {_listing(d)}"
    )


def _read_ours(d: Path) -> _Raw:
    cfg_file = d / CONFIG_NAME
    cfg = _read_json(cfg_file)
    version = cfg.get("medusa_vllm_format")
    if version != FORMAT_VERSION:
        raise MedusaCheckpointError(
            f"{cfg_file}: field 'medusa_vllm_format' is {version!r}; this "
            f"medusa-vllm reads format {FORMAT_VERSION}"
        )
    fields = {k: v for k, v in cfg.items() if k not in _OUR_META_KEYS}
    try:
        config = MedusaConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise MedusaCheckpointError(f"{cfg_file}: {e}") from e
    raw = _Raw("medusa_vllm", d, config)
    wfile = d / WEIGHTS_NAME
    if not wfile.is_file():
        raise MedusaCheckpointError(
            f"weights file {wfile} is missing (files seen: {_listing(d)})"
        )
    for key, t in _load_tensors(wfile).items():
        raw.add(key, t, key, wfile)
    return raw


def _vllm_weight_files(d: Path) -> list[Path]:
    """The files vLLM's default loader would read (safetensors first)."""
    files = sorted(d.glob("*.safetensors"))
    if files:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            wanted = set(_read_json(index).get("weight_map", {}).values())
            files = [f for f in files if f.name in wanted]
        return files
    return sorted(d.glob("*.bin")) or sorted(d.glob("*.pt"))


_OLD_KEY = re.compile(r"^(\d+)\.(\d+)\.(.+)$")


def _vllm_name(name: str) -> str:
    """vLLM 0.32 ``Medusa.load_weights`` key normalisation."""
    name = name.replace("medusa_heads.", "")
    m = _OLD_KEY.match(name)
    if m:
        head, layer, rest = m.groups()
        parts = rest.split(".")
        if "linear" in parts:
            param = ".".join(parts[parts.index("linear") + 1 :])
            return f"blocks.{head}.layers.{layer}.{param}"
        return f"lm_heads.{head}.{rest}"
    return name


def _read_vllm(d: Path) -> _Raw:
    cfg_file = d / CONFIG_NAME
    cfg = dict(_read_json(cfg_file))
    # vLLM's MedusaConfig.from_pretrained renames any key containing "num" and
    # "heads" / "layers" (e.g. medusa_num_heads).
    for key in list(cfg):
        if "num" in key and "heads" in key:
            cfg["num_heads"] = cfg.pop(key)
        elif "num" in key and "layers" in key:
            cfg["num_hidden_layers"] = cfg.pop(key)
    files = _vllm_weight_files(d)
    if not files:
        raise MedusaCheckpointError(
            f"no weights in {d}: vLLM's loader reads *.safetensors (or *.bin/*.pt); "
            f"files seen: {_listing(d)}"
        )
    tensors: dict[str, tuple[torch.Tensor, str, Path]] = {}
    for f in files:
        for key, t in _load_tensors(f).items():
            tensors[key] = (t, key, f)
    original_lm_head = _config_bool(cfg, "original_lm_head", cfg_file, False)

    renamed: dict[str, tuple[torch.Tensor, str, Path]] = {}
    for key, (t, orig, f) in tensors.items():
        name = _vllm_name(key)
        if original_lm_head and name == "lm_heads.0.weight":
            name = "lm_head.weight"
        if name in renamed:
            raise MedusaCheckpointError(
                f"tensor {orig!r} in {f} and tensor {renamed[name][1]!r} in "
                f"{renamed[name][2]} both load into {name!r}"
            )
        renamed[name] = (t, orig, f)

    num_heads = _config_int(cfg, "num_heads", cfg_file, minimum=1)
    num_layers = _config_int(cfg, "num_hidden_layers", cfg_file, minimum=0)
    hidden = cfg.get("hidden_size")
    vocab = cfg.get("vocab_size")
    if hidden is None or vocab is None:
        lm = renamed.get("lm_head.weight") or renamed.get("lm_heads.0.weight")
        if lm is None:
            raise MedusaCheckpointError(
                f"{cfg_file}: fields 'hidden_size'/'vocab_size' are missing and no "
                f"LM weight to infer them from"
            )
        vocab = vocab if vocab is not None else lm[0].shape[0]
        hidden = hidden if hidden is not None else lm[0].shape[1]
    for key, val in (("hidden_size", hidden), ("vocab_size", vocab)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise MedusaCheckpointError(
                f"{cfg_file}: field {key!r} must be a positive integer, found {val!r}"
            )
    truncated = cfg.get("truncated_vocab_size")
    if truncated is not None and truncated == vocab:
        truncated = None  # vLLM: truncated_vocab_size == vocab_size means "full"
    has_bias = any(n.startswith("blocks.") and n.endswith(".bias") for n in renamed)
    fc_bias = _config_bool(cfg, "medusa_fc_bias", cfg_file, False)
    if has_bias and not fc_bias:
        warnings.warn(
            f"{cfg_file}: ResBlock bias tensors are present but 'medusa_fc_bias' is "
            f"not true; vLLM 0.32's Medusa would silently ignore them. Loading them "
            f"(re-export with layout='vllm' to set medusa_fc_bias).",
            stacklevel=3,
        )
    try:
        config = MedusaConfig(
            hidden_size=hidden,
            vocab_size=vocab,
            num_heads=num_heads,
            num_layers=num_layers,
            truncated_vocab_size=truncated,
            original_lm_head=original_lm_head,
            resblock_bias=fc_bias or has_bias,
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        ).validate()
    except ValueError as e:
        raise MedusaCheckpointError(f"{cfg_file}: {e}") from e
    raw = _Raw("vllm", d, config)
    for name, (t, orig, f) in renamed.items():
        raw.add(name, t, orig, f)
    return raw


def _read_reference(d: Path) -> _Raw:
    cfg_file = d / CONFIG_NAME
    cfg = _read_json(cfg_file)
    num_heads = _config_int(cfg, "medusa_num_heads", cfg_file, minimum=1)
    num_layers = _config_int(cfg, "medusa_num_layers", cfg_file, minimum=0)
    wfile = next((d / f for f in REFERENCE_WEIGHTS if (d / f).is_file()), None)
    if wfile is None:
        raise MedusaCheckpointError(
            f"no Medusa weights in {d}: expected {' or '.join(REFERENCE_WEIGHTS)} "
            f"(files seen: {_listing(d)})"
        )
    tensors = _load_tensors(wfile)
    lm_key = f"0.{num_layers}.weight"
    if lm_key not in tensors:
        raise MedusaCheckpointError(
            f"tensor {lm_key!r} (head 0's LM layer, medusa_num_layers="
            f"{num_layers} in {cfg_file}) is missing from {wfile}; found keys "
            f"{_short(tensors)}"
        )
    lm = tensors[lm_key]
    if lm.dim() != 2:
        raise MedusaCheckpointError(
            f"tensor {lm_key!r} in {wfile} must be 2-D [vocab_size, hidden_size], "
            f"found shape {list(lm.shape)}"
        )
    has_bias = any(k.endswith(".linear.bias") for k in tensors)
    config = MedusaConfig(
        hidden_size=int(lm.shape[1]),
        vocab_size=int(lm.shape[0]),
        num_heads=num_heads,
        num_layers=num_layers,
        resblock_bias=has_bias or num_layers == 0,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
    raw = _Raw("medusa", d, config)
    pattern = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            raw.unexpected[key] = f"tensor {key!r} in {wfile}"
            continue
        head, layer, param = int(m[1]), int(m[2]), m[3]
        if param == "weight" and layer == num_layers:
            raw.add(f"lm_heads.{head}.weight", t, key, wfile)
        elif param.startswith("linear.") and layer < num_layers:
            raw.add(f"blocks.{head}.layers.{layer}.{param[7:]}", t, key, wfile)
        else:
            raw.unexpected[key] = f"tensor {key!r} in {wfile}"
    return raw


def _read_trtllm(d: Path) -> _Raw:
    cfg_file = d / CONFIG_NAME
    cfg = _read_json(cfg_file)
    num_heads = _config_int(cfg, "num_medusa_heads", cfg_file, minimum=1)
    num_layers = _config_int(cfg, "num_medusa_layers", cfg_file, minimum=0)
    hidden = _config_int(cfg, "hidden_size", cfg_file, minimum=1)
    vocab = _config_int(cfg, "vocab_size", cfg_file, minimum=1)
    quant = cfg.get("quantization") or {}
    if quant.get("quant_algo") is not None:
        raise MedusaCheckpointError(
            f"{cfg_file}: field 'quantization.quant_algo' is "
            f"{quant.get('quant_algo')!r}; only unquantized TensorRT-LLM "
            f"checkpoints (null) can be read"
        )
    mapping = cfg.get("mapping") or {}
    tp = mapping.get("tp_size", 1)
    pp = mapping.get("pp_size", 1)
    if not all(isinstance(x, int) and x >= 1 for x in (tp, pp)):
        raise MedusaCheckpointError(
            f"{cfg_file}: 'mapping.tp_size'/'mapping.pp_size' must be positive "
            f"integers, found {tp!r}/{pp!r}"
        )
    # Medusa heads live with the last pipeline stage: ranks (pp-1)*tp + t.
    files = [d / f"rank{(pp - 1) * tp + t}.safetensors" for t in range(tp)]
    shards = [_load_tensors(f) for f in files]
    config = MedusaConfig(
        hidden_size=hidden,
        vocab_size=vocab,
        num_heads=num_heads,
        num_layers=num_layers,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
    raw = _Raw("trtllm", d, config)
    pattern = re.compile(
        r"^medusa_heads\.(\d+)\.(?:medusa_layers\.(\d+)\.linear\.(weight|bias)"
        r"|lm_head\.(weight))$"
    )
    where = f"{files[0].name}..{files[-1].name}" if tp > 1 else files[0].name
    for key in shards[0]:
        if not key.startswith("medusa_heads."):
            continue  # backbone weights share these files
        m = pattern.match(key)
        if m is None:
            raw.unexpected[key] = f"tensor {key!r} in {files[0]}"
            continue
        for f, shard in zip(files, shards, strict=True):
            if key not in shard:
                raise MedusaCheckpointError(
                    f"tensor {key!r} is in {files[0]} but missing from {f}"
                )
        full = torch.cat([shard[key] for shard in shards], dim=0)
        head = m[1]
        if m[4]:
            if full.dim() == 2 and full.shape[0] > vocab:
                full = full[:vocab]  # tensor-parallel vocab padding
            raw.add(f"lm_heads.{head}.weight", full, key, d / where)
        else:
            raw.add(f"blocks.{head}.layers.{m[2]}.{m[3]}", full, key, d / where)
    if not any(k.endswith(".bias") for k in raw.tensors) and num_layers > 0:
        config.resblock_bias = False
    return raw


_READERS = {
    "medusa_vllm": _read_ours,
    "vllm": _read_vllm,
    "medusa": _read_reference,
    "trtllm": _read_trtllm,
}


# ------------------------------------------------------------------ building
def _expected_shapes(config: MedusaConfig) -> dict[str, tuple[int, ...]]:
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(config.num_heads):
        for j in range(config.num_layers):
            shapes[f"blocks.{k}.layers.{j}.weight"] = (h, h)
            if config.resblock_bias:
                shapes[f"blocks.{k}.layers.{j}.bias"] = (h,)
    if config.original_lm_head:
        shapes["lm_head.weight"] = (config.draft_vocab_size, h)
    else:
        for k in range(config.num_heads):
            shapes[f"lm_heads.{k}.weight"] = (config.draft_vocab_size, h)
    if config.truncated_vocab_size is not None:
        shapes["token_map"] = (config.truncated_vocab_size,)
    return shapes


def _build(
    raw: _Raw,
    *,
    lm_head_weight: torch.Tensor | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    strict: bool,
) -> MedusaHeads:
    config = raw.config
    expected = _expected_shapes(config)
    tensors = dict(raw.tensors)
    supplied_lm = config.original_lm_head and lm_head_weight is not None

    unexpected = {n: raw.origin[n] for n in tensors if n not in expected}
    unexpected.update(raw.unexpected)
    if unexpected:
        msg = (
            f"unexpected tensor(s) in the {raw.layout} checkpoint {raw.directory} "
            f"(num_heads={config.num_heads}, num_layers={config.num_layers}, "
            f"original_lm_head={config.original_lm_head}, resblock_bias="
            f"{config.resblock_bias}): {_short(unexpected.values(), limit=5)}"
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
                "e.g. MedusaHeads.from_pretrained(path, lm_head_weight="
                "backbone.lm_head.weight) or load_backbone_lm_head(backbone_dir)"
            )
        raise MedusaCheckpointError(
            f"missing tensor(s) in the {raw.layout} checkpoint {raw.directory}: "
            f"{_short(missing)}{hint}"
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
                if "blocks" in name
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
            or weight.shape[0]
            not in (
                config.vocab_size,
                dv,
            )
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
    placeholder = (
        torch.arange(config.draft_vocab_size)
        if config.truncated_vocab_size is not None
        else None
    )
    heads = MedusaHeads(config, token_map=placeholder, device="meta", dtype=dtype)
    state = {
        name: tensors[name].to(target)
        if name == "token_map"
        else tensors[name].to(device=target, dtype=dtype)
        for name in expected
    }
    heads.load_state_dict(state, strict=True, assign=True)
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
) -> MedusaHeads:
    """Load Medusa heads from a directory in any of ``READ_LAYOUTS``.

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
    d = _check_dir(path)
    if layout is None:
        layout = detect_layout(d)
    elif layout not in _READERS:
        raise MedusaCheckpointError(
            f"unknown layout {layout!r}; readable layouts: {list(READ_LAYOUTS)}"
        )
    raw = _READERS[layout](d)
    return _build(
        raw, lm_head_weight=lm_head_weight, device=device, dtype=dtype, strict=strict
    )


# -------------------------------------------------------------------- saving
_WEIGHT_GLOBS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.pt",
    "*.bin",
    CONFIG_NAME,
)


def _prepare_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise MedusaCheckpointError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise MedusaCheckpointError(
                f"destination {dst} is not empty (found {_listing(dst)}); refusing "
                f"to overwrite it; pass overwrite=True (CLI: --overwrite)"
            )
        # Remove files a loader would pick up, so no stale weights survive.
        for pattern in _WEIGHT_GLOBS:
            for f in dst.glob(pattern):
                if f.is_file():
                    f.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _cpu_state(
    heads: MedusaHeads, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in heads.state_dict().items():
        if t.device.type == "meta":
            raise MedusaCheckpointError(
                f"cannot save {name!r}: it is on the meta device"
            )
        t = t.detach().to("cpu")
        if t.dtype.is_floating_point and dtype is not None:
            t = t.to(dtype)
        out[name] = t.contiguous().clone()
    return out


def save_heads(
    heads: MedusaHeads,
    path: str | os.PathLike[str],
    *,
    layout: str = "medusa_vllm",
    overwrite: bool = False,
    include_lm_head: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``heads`` to directory ``path`` in one of ``WRITE_LAYOUTS``.

    Args:
        layout: ``"medusa_vllm"`` (ours), ``"vllm"`` (vLLM 0.32 ``method:
            "medusa"``) or ``"medusa"`` (FasterDecoding/Medusa; also what
            TensorRT-LLM's converter reads).
        overwrite: allow a non-empty destination; config/weight files in it
            (``config.json``, ``*.safetensors``, ``*.pt``, ``*.bin``) are removed
            first so no stale weights survive.
        include_lm_head: ``False`` omits the shared ``lm_head.weight`` of
            ``original_lm_head`` heads (ours only); it must then be passed as
            ``lm_head_weight`` at load time.
        dtype: cast floating-point tensors (default: keep).

    Returns:
        The destination directory.
    """
    if layout not in WRITE_LAYOUTS:
        raise MedusaCheckpointError(
            f"unknown output layout {layout!r}; writable layouts: {list(WRITE_LAYOUTS)}"
        )
    cfg = heads.config
    if not include_lm_head:
        if layout != "medusa_vllm":
            raise MedusaCheckpointError(
                f"include_lm_head=False is only possible for layout 'medusa_vllm'; "
                f"the {layout!r} layout must contain the LM weights"
            )
        if not cfg.original_lm_head:
            raise MedusaCheckpointError(
                "include_lm_head=False needs original_lm_head=True: per-head LM "
                "layers are trained weights and cannot be taken from the backbone"
            )
    if (
        layout == "vllm"
        and cfg.truncated_vocab_size is not None
        and not cfg.original_lm_head
    ):
        raise MedusaCheckpointError(
            "vLLM 0.32's built-in Medusa cannot load per-head LM layers with a "
            "reduced draft vocabulary (truncated_vocab_size="
            f"{cfg.truncated_vocab_size}): its per-head ParallelLMHead has "
            f"vocab_size={cfg.vocab_size} rows. Use original_lm_head=True or the "
            "full vocabulary, keep layout 'medusa_vllm', or expand the LM layers to the "
            "full vocabulary (convert --expand-vocab / expand_draft_vocab)"
        )
    if layout == "medusa" and cfg.truncated_vocab_size is not None:
        raise MedusaCheckpointError(
            "the FasterDecoding/Medusa layout has no reduced draft vocabulary "
            f"(truncated_vocab_size={cfg.truncated_vocab_size}); use layout "
            "'medusa_vllm' or 'vllm'"
        )
    state = _cpu_state(heads, dtype)
    out_dtype = next(t.dtype for t in state.values() if t.dtype.is_floating_point)
    dst = Path(path)
    _prepare_dst(dst, overwrite)

    if layout == "medusa_vllm":
        if not include_lm_head:
            state.pop("lm_head.weight")
        config = {
            "architectures": [OUR_ARCH],
            "medusa_vllm_format": FORMAT_VERSION,
            **cfg.to_dict(),
            "torch_dtype": _dtype_name(out_dtype),
        }
        save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    elif layout == "vllm":
        config = {
            "model_type": "medusa",
            "architectures": [VLLM_ARCH],
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers,
            "truncated_vocab_size": cfg.draft_vocab_size,
            "original_lm_head": cfg.original_lm_head,
            "medusa_fc_bias": cfg.resblock_bias,
            "max_paths": 64,
            "topk": 10,
            "torch_dtype": _dtype_name(out_dtype),
        }
        if cfg.base_model_name_or_path is not None:
            config["base_model_name_or_path"] = cfg.base_model_name_or_path
        save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    else:  # medusa (FasterDecoding)
        ref: dict[str, torch.Tensor] = {}
        h, L = cfg.hidden_size, cfg.num_layers
        for k in range(cfg.num_heads):
            for j in range(L):
                ref[f"{k}.{j}.linear.weight"] = state[f"blocks.{k}.layers.{j}.weight"]
                # The reference ResBlock always has a bias; zeros are equivalent.
                ref[f"{k}.{j}.linear.bias"] = state.get(
                    f"blocks.{k}.layers.{j}.bias", torch.zeros(h, dtype=out_dtype)
                )
            lm = (
                state["lm_head.weight"]
                if cfg.original_lm_head
                else state[f"lm_heads.{k}.weight"]
            )
            ref[f"{k}.{L}.weight"] = lm.clone()
        config = {
            "medusa_num_heads": cfg.num_heads,
            "medusa_num_layers": L,
            "base_model_name_or_path": cfg.base_model_name_or_path,
            # Not read by FasterDecoding; lets vLLM's method "medusa" size the
            # heads and keep the ResBlock bias.
            "hidden_size": h,
            "vocab_size": cfg.vocab_size,
            "medusa_fc_bias": True,
            "torch_dtype": _dtype_name(out_dtype),
        }
        save_file(ref, str(dst / REFERENCE_WEIGHTS[0]), metadata={"format": "pt"})
    _write_json(dst / CONFIG_NAME, config)
    return dst


# ---------------------------------------------------------------- utilities
def check_compatible(
    config: MedusaConfig,
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


_LM_HEAD_NAMES = ("lm_head.weight",)
_EMBED_NAMES = (
    "model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
)


def load_backbone_lm_head(path: str | os.PathLike[str]) -> torch.Tensor:
    """The ``lm_head`` weight ``[vocab_size, hidden]`` of a HF backbone directory.

    Reads only that tensor from ``*.safetensors`` (``lm_head.weight``; for tied
    embeddings — no ``lm_head.weight`` — the input embedding matrix).
    """
    d = _check_dir(path, "backbone")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = _read_json(index).get("weight_map", {})
    else:
        weight_map = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    weight_map[key] = f.name
    if not weight_map:
        raise MedusaCheckpointError(
            f"no *.safetensors weights in backbone directory {d} (files seen: "
            f"{_listing(d)})"
        )
    for name in _LM_HEAD_NAMES + _EMBED_NAMES:
        if name in weight_map:
            file = d / weight_map[name]
            with safe_open(str(file), framework="pt") as sf:
                return sf.get_tensor(name)
    raise MedusaCheckpointError(
        f"backbone {d}: no LM head tensor; tried {list(_LM_HEAD_NAMES + _EMBED_NAMES)}"
    )


def expand_draft_vocab(heads: MedusaHeads) -> MedusaHeads:
    """The same heads with per-head LM layers over the *full* vocabulary.

    Each head's draft-vocabulary rows go to their token ids (``token_map``);
    every other row is zero (logit 0), so a head's full-vocabulary top-1 is
    its draft-vocabulary top-1 whenever that logit is positive. This is how
    heads with a reduced draft vocabulary run in vLLM 0.32's built-in Medusa
    (layout ``vllm``), which cannot load per-head LM layers smaller than the
    vocabulary; it then pays for the full-vocabulary LM layers.
    """
    cfg = heads.config
    if cfg.truncated_vocab_size is None or cfg.original_lm_head:
        raise MedusaCheckpointError(
            "expand_draft_vocab: these heads have no per-head reduced draft vocabulary "
            f"(truncated_vocab_size={cfg.truncated_vocab_size}, original_lm_head="
            f"{cfg.original_lm_head}); nothing to expand"
        )
    full_cfg = dataclasses.replace(cfg, truncated_vocab_size=None)
    ref = next(heads.parameters())
    out = MedusaHeads(full_cfg, device=ref.device, dtype=ref.dtype)
    state = {k: v for k, v in heads.state_dict().items() if k != "token_map"}
    token_map = heads.token_map.to(ref.device)
    for k in range(cfg.num_heads):
        name = f"lm_heads.{k}.weight"
        w = torch.zeros(cfg.vocab_size, cfg.hidden_size, device=ref.device, dtype=ref.dtype)
        w[token_map] = state[name]
        state[name] = w
    out.load_state_dict(state)
    return out


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    layout: str = "medusa_vllm",
    *,
    src_layout: str | None = None,
    overwrite: bool = False,
    lm_head_weight: torch.Tensor | None = None,
    include_lm_head: bool = True,
    dtype: torch.dtype | None = None,
    expand_vocab: bool = False,
) -> Path:
    """Read heads from ``src`` (any readable layout) and write ``dst`` in ``layout``.

    Returns the destination directory. See :func:`load_heads` and
    :func:`save_heads` for the arguments; ``expand_vocab`` first applies
    :func:`expand_draft_vocab` to heads with a reduced per-head draft vocabulary
    (needed for layout ``vllm``).
    """
    s, t = Path(src), Path(dst)
    if s.exists() and t.exists() and s.resolve() == t.resolve():
        raise MedusaCheckpointError(
            f"source and destination are the same directory ({s}); write elsewhere"
        )
    if layout not in WRITE_LAYOUTS:
        raise MedusaCheckpointError(
            f"unknown output layout {layout!r}; writable layouts: {list(WRITE_LAYOUTS)}"
        )
    heads = load_heads(s, lm_head_weight=lm_head_weight, layout=src_layout)
    cfg = heads.config
    if expand_vocab and cfg.truncated_vocab_size is not None and not cfg.original_lm_head:
        heads = expand_draft_vocab(heads)
    return save_heads(
        heads,
        t,
        layout=layout,
        overwrite=overwrite,
        include_lm_head=include_lm_head,
        dtype=dtype,
    )


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``medusa-vllm convert`` arguments to ``parser``."""
    parser.add_argument("src", help="heads checkpoint directory (any layout)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument(
        "--layout",
        choices=WRITE_LAYOUTS,
        default="medusa_vllm",
        help="output layout (default: medusa_vllm; 'vllm' loads in vLLM's "
        "built-in method 'medusa'; 'medusa' is FasterDecoding's, also read by "
        "TensorRT-LLM)",
    )
    parser.add_argument(
        "--from-layout",
        choices=READ_LAYOUTS,
        default=None,
        help="input layout (default: auto-detect)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *_DTYPES),
        default="auto",
        help="output dtype (default: keep the checkpoint's)",
    )
    parser.add_argument(
        "--lm-head-from",
        metavar="BACKBONE_DIR",
        default=None,
        help="HF backbone directory to take the shared lm_head weight from "
        "(heads with original_lm_head whose checkpoint omits it)",
    )
    parser.add_argument(
        "--no-lm-head",
        action="store_true",
        help="omit the shared lm_head weight from the output (medusa_vllm only)",
    )
    parser.add_argument(
        "--expand-vocab",
        action="store_true",
        help="per-head LM layers over a reduced draft vocabulary -> full-vocabulary rows "
        "(zero outside the draft vocabulary); needed for --layout vllm",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty DST"
    )
    return parser


def convert_main(args: argparse.Namespace) -> int:
    """Run ``medusa-vllm convert`` from parsed ``args``; 0 on success, 2 on a
    checkpoint error (printed to stderr)."""
    try:
        weight = load_backbone_lm_head(args.lm_head_from) if args.lm_head_from else None
        dst = convert(
            args.src,
            args.dst,
            args.layout,
            src_layout=args.from_layout,
            overwrite=args.overwrite,
            lm_head_weight=weight,
            include_lm_head=not args.no_lm_head,
            dtype=None if args.dtype == "auto" else _DTYPES[args.dtype],
            expand_vocab=args.expand_vocab,
        )
    except MedusaCheckpointError as e:
        print(f"medusa-vllm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.layout} heads to {dst}")
    return 0
