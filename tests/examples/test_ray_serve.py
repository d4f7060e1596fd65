"""examples/ray_serve_medusa.py on a tiny model: two Ray Serve LLM replicas on CPU, the
OpenAI route answers, vLLM's spec-decode counters show tree drafts in every replica that
served requests, and the greedy outputs equal an offline vanilla engine's."""

from __future__ import annotations

import pytest

from tests.examples.conftest import free_port, require_ray, run_example

pytestmark = pytest.mark.slow

# A Serve replica that fails is restarted forever: the example gives up on start-up after
# STARTUP s, the runner kills everything after RUN s, pytest-timeout after RUN + 120 s.
STARTUP, RUN = 2000, 2700


@pytest.mark.timeout(RUN + 120)
def test_two_replicas_answer_with_medusa_active(tiny_medusa):
    require_ray()
    model, heads = tiny_medusa
    run = run_example("ray_serve_medusa.py", [
        "--model", model, "--heads", heads, "--tree", "sparse-16", "--replicas", "2",
        "--requests", "16", "--max-tokens", "24", "--max-model-len", "512",
        "--port", str(free_port()), "--metrics-port", str(free_port()),
        "--startup-timeout", str(STARTUP),
    ], timeout=RUN, ray=True)
    assert run.result is not None, run.explain()
    res = run.result
    assert isinstance(res["chat_answer"], str)  # the chat route answered (a random model may say "")
    assert len(res["texts"]) == 16 and all(t for t in res["texts"]), run.explain()
    assert res["replicas_seen"] == 2, f"vLLM metrics of {res['replicas_seen']} replicas\n{run.explain()}"
    assert res["replicas_with_traffic"] == 2, res["per_replica"]
    for rep in res["per_replica"]:
        # tree drafting ran in this replica: verified draft steps and accepted drafts from
        # the distilled heads (the tree shrinks with the batch size, so no size check)
        assert rep["num_drafts"] > 0, rep
        assert rep["num_accepted_tokens"] > 0, rep
    assert res["plugin_active_in_every_replica"] is True
    assert res["compared_on"] == "token_ids"
    assert res["same_as_vanilla"] is True, f"first difference at prompt {res['first_difference']}"
    assert run.returncode == 0, run.explain()
