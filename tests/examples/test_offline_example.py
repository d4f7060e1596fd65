"""examples/offline.py on a tiny model: vanilla and medusa_tree engines, equal greedy
outputs, a mean accepted length above 1 from vLLM's metrics, printed figures."""

from __future__ import annotations

import pytest

from tests.examples.conftest import run_example

pytestmark = pytest.mark.slow

RUN = 2400  # seconds for both engines; minutes each on a loaded 2-core machine


@pytest.mark.timeout(RUN + 60)
def test_offline_example_prints_speedup_and_acceptance(tiny_medusa):
    model, heads = tiny_medusa
    run = run_example("offline.py", [
        "--model", model, "--heads", heads, "--tree", "sparse-16", "--num-prompts", "3",
        "--max-tokens", "32", "--max-model-len", "512", "--timeout", str(RUN // 2 - 30),
    ], timeout=RUN)
    assert run.returncode == 0, run.explain()
    res = run.result
    assert res["same_output"] is True
    assert res["metrics"]["num_drafts"] > 0
    assert res["mean_accepted_length"] > 1.0
    assert res["speedup"] > 0
    for line in ("tok/s", "mean accepted length", "greedy outputs token-for-token equal: True"):
        assert line in run.output, run.explain()
