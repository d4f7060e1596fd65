"""Hydra heads inside a real vLLM engine vs vanilla vLLM (tiny random Llama).

Greedy output must be vanilla's token for token whatever the Hydra heads draft; with
heads distilled on the backbone's own continuations the tree must accept, and accept
what the heads' teacher-forced ranks say it can (replayed offline with the same tree):
a proposer fed the wrong root token or the wrong parent path stays lossless but
accepts less.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from medusa_vllm.core.tree import MedusaTree
from medusa_vllm.core.tree_stats import simulate_acceptance
from medusa_vllm.tools import engine_proc
from medusa_vllm.tools.calibrate import measure_target_ranks
from medusa_vllm.tools.engine_proc import EngineJob
from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

# a small KV cache; a long timeout: on a shared 2-core machine an engine start alone took 14 min
run_engine = functools.partial(engine_proc.run_engine, env_defaults={"VLLM_CPU_KVCACHE_SPACE": "1"},
                               timeout=1800)

VOCAB, HIDDEN = 512, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hydra_e2e")
    model = build_tiny_llama(root / "model", vocab=VOCAB, hidden=HIDDEN, layers=2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and steady on a busy CPU
    try:
        heads = distill_tiny_heads(model, root / "hydra", num_heads=3, steps=250,
                                   num_sequences=256, head_type="hydra")
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(16)]
    sampling = [{"temperature": 0.0, "max_tokens": rng.choice([5, 17, 32, 48]),
                 "ignore_eos": True} for _ in prompts]
    return model, heads, prompts, sampling


def _llm(model, spec=None):
    args = {"model": str(model), "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
            "gpu_memory_utilization": 0.3, "seed": 0, "max_num_seqs": 8}
    if spec:
        args["speculative_config"] = spec
    return args


def test_hydra_heads_greedy_identical_to_vanilla_and_accept_what_they_can(setup):
    model, heads, prompts, sampling = setup
    vanilla = run_engine(EngineJob(llm=_llm(model), prompts=prompts, sampling=sampling))
    spec = {"method": "medusa_tree", "model": str(heads), "tree": "sparse-16",
            "nodes_by_batch": "off"}
    ours = run_engine(EngineJob(llm=_llm(model, spec), prompts=prompts, sampling=sampling))
    assert len(ours.token_ids) == len(vanilla.token_ids)
    for i, (a, b) in enumerate(zip(vanilla.token_ids, ours.token_ids)):
        assert a == b, f"prompt {i}: vanilla {a} != medusa_tree with Hydra heads {b}"
    m = ours.metrics
    print("hydra heads:", m)
    assert m["num_drafts"] > 0 and m["mean_accepted_length"] > 1.3, m
    ranks = measure_target_ranks(str(model), str(heads), prompts, vanilla.token_ids)
    replay = simulate_acceptance(MedusaTree.load("sparse-16", num_heads=3), ranks)
    print("replayed offline:", replay)
    # Measured on a quiet machine: engine 2.397 vs replay 2.295 (+4.4 %; Medusa heads agree
    # within 2 %). Why Hydra's engine figure runs above its replay is not yet explained.
    assert m["mean_accepted_length"] == pytest.approx(replay.mean_accepted_length, rel=0.06), (
        m, replay)
