"""medusa_tree inside a real vLLM engine vs vanilla vLLM (tiny random Llama).

Greedy Medusa must reproduce vanilla greedy output token for token, whatever
the heads propose; with heads that predict well the tree path must actually
accept drafts (mean accepted length well over 1).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from medusa_vllm.checkpoints import save_heads
from medusa_vllm.core.heads import MedusaHeads, MedusaHeadsConfig
from medusa_vllm.tools import engine_proc
from medusa_vllm.tools.engine_proc import EngineJob
from medusa_vllm.tools.tiny_models import build_tiny_llama, distill_tiny_heads

pytestmark = pytest.mark.slow

# a small KV cache unless the caller set one
run_engine = functools.partial(engine_proc.run_engine, env_defaults={"VLLM_CPU_KVCACHE_SPACE": "1"})

VOCAB, HIDDEN = 512, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = build_tiny_llama(root / "model", vocab=VOCAB, hidden=HIDDEN, layers=2, seed=0)
    return root, model


def _random_heads(root, model, num_heads=3, seed=1):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model).lm_head.weight.detach()
    torch.manual_seed(seed)
    vocab, hidden = lm.shape
    heads = MedusaHeads(MedusaHeadsConfig(hidden_size=hidden, vocab_size=vocab, num_heads=num_heads),
                        lm_head_weight=lm)
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.normal_(0, 0.2)
    out = root / f"heads_random_{num_heads}_{seed}"
    save_heads(heads, out, overwrite=True)
    return out


def _distilled_heads(root, model, num_heads=3):
    """Heads trained for a few seconds on the backbone's own greedy continuations."""
    out = root / "heads_distilled"
    return out if out.exists() else distill_tiny_heads(model, out, num_heads=num_heads)


def _prompts(n=32, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 40))] for _ in range(n)]


def _llm(model, spec=None, **kw):
    args = dict(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512,
                gpu_memory_utilization=0.3, seed=0, max_num_seqs=8)
    if spec:
        args["speculative_config"] = spec
    args.update(kw)
    return args


def _greedy(n, seed=0, **kw):
    rng = random.Random(seed)
    return [dict(temperature=0.0, max_tokens=rng.choice([5, 17, 32, 48]), ignore_eos=True, **kw)
            for _ in range(n)]


def _tree(heads, tree, **options):
    """speculative_config for tree Medusa with ``heads``, the whole tree at every batch size."""
    return {"method": "medusa_tree", "model": str(heads), "tree": tree, "nodes_by_batch": "off",
            **options}


def _compare(vanilla, ours):
    assert len(vanilla.token_ids) == len(ours.token_ids)
    for i, (a, b) in enumerate(zip(vanilla.token_ids, ours.token_ids)):
        assert a == b, f"prompt {i}: vanilla {a} != medusa_tree {b}"


@pytest.fixture(scope="module")
def greedy_vanilla(tiny):
    """32 prompts, greedy, varied lengths, and vanilla vLLM's outputs for them:
    one vanilla engine run shared by the tests that compare against it."""
    _, model = tiny
    prompts = _prompts()
    sampling = _greedy(len(prompts))
    vanilla = run_engine(EngineJob(llm=_llm(model), prompts=prompts, sampling=sampling))
    return prompts, sampling, vanilla


def _sparse16_like_vanilla(model, heads, greedy_vanilla):
    """The shared greedy prompts through a 16-node tree; output checked against vanilla's."""
    prompts, sampling, vanilla = greedy_vanilla
    ours = run_engine(EngineJob(llm=_llm(model, _tree(heads, "sparse-16")),
                                prompts=prompts, sampling=sampling))
    _compare(vanilla, ours)
    return ours


def test_greedy_identical_to_vanilla_random_heads(tiny, greedy_vanilla):
    root, model = tiny
    ours = _sparse16_like_vanilla(model, _random_heads(root, model), greedy_vanilla)
    assert ours.metrics["num_drafts"] > 0, "the tree path never ran"
    assert ours.metrics["tree_size"] > 1


def test_distilled_heads_accept_and_stay_identical(tiny, greedy_vanilla):
    root, model = tiny
    heads = _distilled_heads(root, model)
    prompts, _, vanilla = greedy_vanilla
    ours = _sparse16_like_vanilla(model, heads, greedy_vanilla)
    m = ours.metrics
    print("distilled heads:", m)
    assert m["mean_accepted_length"] > 1.5, m
    # ... and the engine accepts what the heads can on this very text: greedy decoding
    # replayed offline from the heads' teacher-forced target ranks, with the same
    # 16-node tree, accepts as much (a verifier that missed a matching branch, or a
    # proposer fed the wrong position's hidden state, stays lossless but accepts less)
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.core.tree_stats import simulate_acceptance
    from medusa_vllm.tools.calibrate import measure_target_ranks

    ranks = measure_target_ranks(str(model), str(heads), prompts, vanilla.token_ids)
    replay = simulate_acceptance(MedusaTree.load("sparse-16", num_heads=3), ranks)
    print("replayed offline:", replay)
    assert m["mean_accepted_length"] == pytest.approx(replay.mean_accepted_length, abs=0.1), (m, replay)


def test_preemption_tiny_kv_cache(tiny):
    root, model = tiny
    heads = _distilled_heads(root, model)
    prompts = _prompts(n=16, seed=2)
    sampling = _greedy(len(prompts), seed=2)
    kw = dict(num_gpu_blocks_override=5, block_size=32, max_model_len=128, max_num_seqs=16)
    vanilla = run_engine(EngineJob(llm=_llm(model, **kw), prompts=prompts, sampling=sampling))
    spec = _tree(heads, "sparse-8")
    ours = run_engine(EngineJob(llm=_llm(model, spec, **kw), prompts=prompts, sampling=sampling))
    # 16 requests in 5 blocks of 32 tokens: the scheduler must have preempted some
    assert vanilla.num_preemptions > 0 and ours.num_preemptions > 0, (
        vanilla.num_preemptions, ours.num_preemptions)
    assert ours.metrics["num_drafts"] > 0, "no tree was verified under memory pressure"
    _compare(vanilla, ours)


def test_stop_conditions_inside_accepted_path(tiny):
    root, model = tiny
    heads = _distilled_heads(root, model)
    prompts = _prompts(n=24, seed=3)
    vanilla_free = run_engine(EngineJob(llm=_llm(model), prompts=prompts,
                               sampling=dict(temperature=0.0, max_tokens=40, ignore_eos=True)))
    # stop on a token each continuation really produces mid-way, and odd max_tokens
    sampling = []
    for i, out in enumerate(vanilla_free.token_ids):
        if i % 3 == 0:
            sampling.append(dict(temperature=0.0, max_tokens=40, stop_token_ids=[out[len(out) // 2]]))
        elif i % 3 == 1:
            sampling.append(dict(temperature=0.0, max_tokens=3 + i, ignore_eos=True))
        else:
            sampling.append(dict(temperature=0.0, max_tokens=40, ignore_eos=False))
    # the tree shrinks as the batch grows: no drafts while 8 requests run, then 3, 8 or 16
    # nodes as requests finish (steps with and without speculation alternate)
    spec = _tree(heads, "sparse-16", nodes_by_batch={"1": 16, "4": 8, "6": 3, "8": 0})
    vanilla = run_engine(EngineJob(llm=_llm(model), prompts=prompts, sampling=sampling))
    ours = run_engine(EngineJob(llm=_llm(model, spec), prompts=prompts, sampling=sampling))
    _compare(vanilla, ours)
    assert vanilla.finish_reasons == ours.finish_reasons
    m = ours.metrics
    assert m["mean_accepted_length"] > 1.2, m
    assert 3 < m["tree_size"] < 16, m  # mean drafted nodes per step: several sizes were used


def test_tensor_parallel_2(tiny, greedy_vanilla):
    root, model = tiny
    heads = _distilled_heads(root, model)
    prompts, sampling, vanilla = greedy_vanilla  # vanilla ran without TP
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    ours = run_engine(EngineJob(llm=_llm(model, _tree(heads, "sparse-8"),
                                   tensor_parallel_size=2, distributed_executor_backend="mp"),
                       prompts=prompts, sampling=sampling), env=env)
    _compare(vanilla, ours)
    assert ours.metrics["mean_accepted_length"] > 1.2


def _exact_three_token_probs(model_dir, prompt, temperature):
    """p(t1, t2, t3 | prompt) of the backbone, by brute force with transformers."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    v = lm.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(lm(torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # [V]
        t1 = torch.arange(v)
        seq2 = torch.cat([torch.tensor(prompt).expand(v, -1), t1[:, None]], 1)
        p2 = torch.softmax(lm(seq2).logits[:, -1] / temperature, -1)  # [V(t1), V]
        t12 = torch.cartesian_prod(t1, t1)
        seq3 = torch.cat([torch.tensor(prompt).expand(v * v, -1), t12], 1)
        p3 = torch.softmax(lm(seq3).logits[:, -1] / temperature, -1).reshape(v, v, v)
    return p1[:, None, None] * p2[:, :, None] * p3  # [V, V, V]


@pytest.mark.parametrize("acceptance", ["rejection", "typical"])
def test_rejection_sampling_reproduces_target_distribution(tmp_path, acceptance):
    """Sampled 3-token continuations through the engine follow the backbone's
    exact autoregressive distribution (chi-square over >= 20k samples) with
    lossless rejection sampling. Negative control: the same test detects that
    typical acceptance (not lossless by design) changes the distribution."""
    from scipy.stats import chisquare

    vocab = 12
    model = build_tiny_llama(tmp_path / "m", vocab=vocab, hidden=64, layers=2, seed=3)
    heads = _random_heads(tmp_path, model, num_heads=2, seed=5)
    prompt = [3, 4, 5, 6]
    temperature = 1.0
    n = 24000
    # 8 of the 12 tokens drafted at depth 1 (so drafts are often accepted and the
    # residual path is exercised too), a few depth-2 nodes below the top ones
    tree = [[r] for r in range(8)] + [[0, 0], [0, 1], [1, 0], [2, 0]]
    spec = _tree(heads, tree, acceptance=acceptance)
    res = run_engine(EngineJob(
        llm=_llm(model, spec, max_num_seqs=256, max_model_len=64),
        prompts=[prompt] * n,
        sampling=dict(temperature=temperature, max_tokens=3, ignore_eos=True),
    ), timeout=1500)
    m = res.metrics
    assert m["num_drafts"] > 0 and m["mean_accepted_length"] > 1.3, m  # the tree path ran and accepted
    exact = _exact_three_token_probs(model, prompt, temperature).reshape(-1).double()
    counts = torch.zeros(vocab**3, dtype=torch.float64)
    for t in res.token_ids:
        assert len(t) == 3
        counts[(t[0] * vocab + t[1]) * vocab + t[2]] += 1
    expected = exact * n
    big = expected >= 5  # merge rare outcomes into one cell
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    exp = exp * obs.sum() / exp.sum()
    stat, p = chisquare(obs.numpy(), exp.numpy())
    print(f"{acceptance} through engine: chi2={stat:.1f} over {int(big.sum()) + 1} cells, p={p:.3g}, metrics={m}")
    if acceptance == "rejection":
        assert p > 1e-3, (stat, p)
    else:
        assert p < 1e-6, (stat, p)


def test_mixed_batch_chunked_prefill_prefix_cache_logprobs_n(tiny):
    """One batch mixing greedy rows (with logprobs), sampled rows and n=2, long
    prompts split by chunked prefill, and prompts sharing a cached prefix: the
    greedy rows (tokens and logprobs) equal vanilla's."""
    root, model = tiny
    heads = _distilled_heads(root, model)
    rng = random.Random(7)
    shared = [rng.randrange(3, VOCAB) for _ in range(150)]
    prompts, sampling = [], []
    for i in range(20):
        if i % 4 == 0:
            p = [rng.randrange(3, VOCAB) for _ in range(rng.randint(200, 300))]  # chunked prefill
        elif i % 4 == 1:
            p = shared + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 8))]  # prefix cache
        else:
            p = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))]
        prompts.append(p)
        if i % 5 == 3:
            # (no per-request seed: vLLM 0.32 CPU crashes on seeded requests whose prefill is
            # chunked — gen.set_offset on a CPU generator — with or without speculation)
            sampling.append(dict(temperature=0.8, top_p=0.9, max_tokens=24, n=2 if i % 2 else 1))
        else:
            sampling.append(dict(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2))
    kw = dict(max_num_batched_tokens=96, enable_chunked_prefill=True, enable_prefix_caching=True,
              max_model_len=512)
    spec = _tree(heads, "sparse-16")
    # bad per-request overrides are refused at admission; the engine keeps serving
    refuse = [dict(temperature=0.8, extra_args={"medusa_acceptance": "fast"}),
              dict(temperature=0.8, extra_args={"medusa_posterior_threshold": 2.0})]
    vanilla = run_engine(EngineJob(llm=_llm(model, **kw), prompts=prompts, sampling=sampling))
    ours = run_engine(EngineJob(llm=_llm(model, spec, **kw), prompts=prompts, sampling=sampling,
                       refuse=refuse))
    assert ours.refused[0] and "medusa_acceptance: expected 'greedy'" in ours.refused[0]
    assert ours.refused[1] and "medusa_posterior_threshold" in ours.refused[1]
    assert len(vanilla.token_ids) == len(ours.token_ids)
    # map flat outputs back to requests (n=2 rows produce two outputs)
    k = 0
    greedy_lp = 0
    for s in sampling:
        for _ in range(s.get("n", 1)):
            a, b = vanilla.token_ids[k], ours.token_ids[k]
            if s["temperature"] == 0.0:
                assert a == b, f"output {k}: vanilla {a} != medusa_tree {b}"
            else:
                assert 1 <= len(b) <= s["max_tokens"]
            k += 1
    for la, lb in zip(vanilla.logprobs, ours.logprobs):
        assert len(la) == len(lb)
        for da, db in zip(la, lb):
            assert da.keys() == db.keys()
            for tok in da:
                assert abs(da[tok] - db[tok]) < 1e-3, (tok, da[tok], db[tok])
            greedy_lp += 1
    assert greedy_lp > 100
    assert ours.metrics["mean_accepted_length"] > 1.2


def test_prompt_lookup_is_exact_and_accepts_on_repetitive_text(tiny):
    """Prompt lookup on the tree's top-1 chain, verified in the same tree pass as the
    heads' nodes: greedy output stays vanilla's, and on text that repeats itself it
    accepts far more than heads that predict nothing (random heads, same tree
    otherwise)."""
    root, model = tiny
    heads = _random_heads(root, model)
    rng = random.Random(5)
    prompts = []
    for _ in range(12):
        segment = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 9))]
        prompts.append(segment * 3 + segment[: rng.randint(1, 3)])
    sampling = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    vanilla = run_engine(EngineJob(llm=_llm(model), prompts=prompts, sampling=sampling))
    with_lookup = run_engine(EngineJob(llm=_llm(model, _tree(heads, "sparse-4", ngram_nodes=3)),
                                       prompts=prompts, sampling=sampling))
    heads_only = run_engine(EngineJob(llm=_llm(model, _tree(heads, "sparse-4")),
                                      prompts=prompts, sampling=sampling))
    _compare(vanilla, with_lookup)
    _compare(vanilla, heads_only)
    gained = with_lookup.metrics["mean_accepted_length"] - heads_only.metrics["mean_accepted_length"]
    print("prompt lookup:", with_lookup.metrics, "heads only:", heads_only.metrics)
    from medusa_vllm.core.tree import MedusaTree, with_lookup_chain

    assert with_lookup.metrics["tree_size"] == with_lookup_chain(
        MedusaTree.load("sparse-4", num_heads=3), 3).num_nodes
    assert gained > 0.3, (with_lookup.metrics, heads_only.metrics)
