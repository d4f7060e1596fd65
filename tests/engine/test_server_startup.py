"""`vllm serve --speculative-model medusa:HEADS` with bad heads: the server exits
non-zero before serving, with one message naming the problem and no wall of
tracebacks (the heads are checked in the front-end, before engine processes start)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from medusa_vllm.checkpoints import save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.tools.tiny_models import build_tiny_llama
from tests.engine.servers import START_TIMEOUT, failed_serve

pytestmark = pytest.mark.slow

VOCAB, HIDDEN = 512, 64


def _heads(out, hidden=HIDDEN, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=hidden, vocab_size=vocab, num_heads=3))
    return save_heads(heads, out, overwrite=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    model = build_tiny_llama(root / "model", vocab=VOCAB, hidden=HIDDEN, layers=2, seed=0)
    return root, model, _heads(root / "good")


def _variant(root, good, name):
    out = root / name
    shutil.copytree(good, out)
    return out


def _missing(root, good):
    return root / "no_such_heads"


def _other_backbone(root, good):
    return _heads(root / "other_backbone", hidden=32, vocab=256)


def _corrupt(root, good):
    out = _variant(root, good, "corrupt")
    (out / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    return out


def _truncated(root, good):
    out = _variant(root, good, "truncated")
    data = (good / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


def _nan(root, good):
    from safetensors.torch import load_file, save_file

    out = _variant(root, good, "nan")
    tensors = load_file(str(out / "model.safetensors"))
    name = min(n for n in tensors if n.startswith("blocks"))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _bad_tree(root, good):
    out = _variant(root, good, "bad_tree")
    (out / "medusa_tree.json").write_text('{"medusa_choices": [[0], [0, 0')
    return out


CASES = {
    # name: (heads builder, phrases the error message must contain)
    "missing_heads": (_missing, ["no_such_heads", "found nothing"]),
    "other_backbone": (_other_backbone, ["hidden_size=32", "hidden_size=64", "another model"]),
    "corrupt_safetensors": (_corrupt, ["corrupt/model.safetensors", "cannot be loaded"]),
    "truncated_safetensors": (_truncated, ["truncated/model.safetensors", "cannot be loaded"]),
    "nan_weights": (_nan, ["NaN/Inf", "blocks."]),
    "malformed_tree_file": (_bad_tree, ["medusa_tree.json"]),
}


@pytest.fixture(scope="module")
def outcomes(setup):
    """case -> the failed `vllm serve` run, all cases started at once (each run is
    mostly vLLM's import: on a shared machine, one after the other takes long)."""
    root, model, good = setup
    heads = {case: build(root, good) for case, (build, _) in CASES.items()}
    with ThreadPoolExecutor(len(CASES)) as pool:
        runs = {case: pool.submit(failed_serve, model, "--speculative-model", f"medusa:{h}",
                                  timeout=START_TIMEOUT) for case, h in heads.items()}
        return {case: run.result() for case, run in runs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_heads_fail_before_serving_with_one_clear_message(outcomes, case):
    run = outcomes[case]
    out = run.output
    assert run.returncode != 0, out[-3000:]
    assert "Application startup complete" not in out, "the server started serving"
    assert "EngineCore" not in out and "Engine core" not in out, (
        "the error surfaced only once engine processes ran:\n" + out[-3000:])
    for phrase in CASES[case][1]:
        assert phrase in out, f"{phrase!r} not in the output:\n{out[-3000:]}"
    # one error line, no traceback
    assert out.count("MedusaConfigError") == 1, out[-6000:]
    assert "Traceback (most recent call last)" not in out, out[-6000:]
    print(f"{case}: exit {run.returncode} after {run.seconds:.0f} s; last line:\n"
          + out.strip().splitlines()[-1])


def test_good_heads_pass_the_front_end_checks(setup):
    """The same checks accept the good heads (so the failures above are the cases')."""
    from medusa_vllm.engine.options import MedusaTreeConfig

    _, _, good = setup
    cfg = MedusaTreeConfig.from_dict({"heads": str(good)}).resolved()
    assert json.loads(json.dumps(cfg.to_dict()))["heads"] == str(good)
