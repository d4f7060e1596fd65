"""examples/ray_data_medusa.py on a tiny model: Ray Data LLM batch inference with and
without Medusa, greedy outputs token-for-token equal, the Medusa engine drafted."""

from __future__ import annotations

import pytest

from tests.examples.conftest import free_port, require_ray, run_example

pytestmark = pytest.mark.slow

RUN = 2700  # seconds for both pipelines; pytest-timeout a little later


@pytest.mark.timeout(RUN + 120)
def test_batch_inference_with_medusa_equals_without(tiny_medusa):
    require_ray()
    model, heads = tiny_medusa
    run = run_example("ray_data_medusa.py", [
        "--model", model, "--heads", heads, "--tree", "sparse-16", "--prompts", "12",
        "--max-tokens", "24", "--max-model-len", "512",
        "--metrics-port", str(free_port()), "--timeout", str(RUN - 60),
    ], timeout=RUN, ray=True)
    assert run.result is not None, run.explain()
    van, med = run.result["vanilla"], run.result["medusa_tree"]
    assert len(van["token_ids"]) == len(med["token_ids"]) == 12
    assert all(len(t) > 0 for t in med["token_ids"])
    assert run.result["same_output"] is True, f"first difference: {run.result['first_difference']}"
    assert med["num_drafts"] > 0 and med["mean_accepted_length"] > 1.0, med
    assert run.returncode == 0, run.explain()
