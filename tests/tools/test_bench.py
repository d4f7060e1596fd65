"""``medusa-vllm bench`` refuses to run without its prompt corpus (no silent
switch to other prompts), and says how to install it."""

from __future__ import annotations

import argparse

import pytest

import medusa_vllm.training.prompts as prompts_mod
from medusa_vllm.tools import bench
from medusa_vllm.training.corpora.common import MissingCorpus, missing_corpus

APT = "apt-get update && apt-get install -y --no-install-recommends fortunes"


@pytest.fixture
def no_corpus(monkeypatch):
    def missing(*args, **kwargs):
        raise missing_corpus("fortune files", "/usr/share/games/fortunes", "fortunes")

    monkeypatch.setattr(prompts_mod, "build_prompts", missing)

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started without prompts")

    monkeypatch.setattr(bench, "run_config", no_engine)


def test_bench_refuses_and_names_the_install_command(no_corpus, tmp_path, capsys):
    args = bench.add_bench_args(argparse.ArgumentParser()).parse_args(
        ["--model", "m", "--heads", "h", "--out", str(tmp_path / "out")])
    assert bench.bench_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medusa-vllm bench: error: bench draws its prompts from the offline Debian corpora")
    assert "Debian package fortunes" in err and APT in err
    assert not (tmp_path / "out").exists()  # refused before any work
    with pytest.raises(MissingCorpus, match="apt-get install"):
        bench.run_bench(args)


def test_calibrate_cost_curve_refuses_too(no_corpus, tmp_path):
    from medusa_vllm.tools.calibrate import measure_cost_curve
    from medusa_vllm.tools.tiny_models import write_medusa_heads_config

    heads = write_medusa_heads_config(tmp_path / "heads", num_heads=2)
    with pytest.raises(MissingCorpus, match=APT.replace("&", r"\&")):
        measure_cost_curve("model", str(heads), [2], 1, run=lambda spec: pytest.fail("ran an engine"))


def test_bench_prompts_come_from_the_heldout_split(monkeypatch):
    calls = []
    monkeypatch.setattr(prompts_mod, "build_prompts", lambda n, seed, split: calls.append((n, seed, split))
                        or [f"p{i}" for i in range(n)])
    assert bench.bench_prompts(3, seed=1234) == ["p0", "p1", "p2"]
    assert calls == [(3, 1234, "heldout")]
