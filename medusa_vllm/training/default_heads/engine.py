"""The recipe's measurements through the vLLM engine (each run a fresh engine,
:func:`medusa_vllm.tools.engine_proc.run_engine`): ``cost``, the proposer's time
(heads + top-k + tree tokens) beside a vanilla decode step, timed inside the
engine's process; ``accept``, tokens/s and mean accepted length of the shipped
heads on held-out prompts, checked against vanilla's text and against the
acceptance replayed offline from the heads' ranks on that text."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from medusa_vllm.checkpoints.common import TREE_FILE
from medusa_vllm.training.default_heads.recipe import Recipe, Work, read_jsonl, say, write_json

__all__ = ["accept_prompts", "accept_ranks", "accept_trees", "proposer_cost", "stage_accept",
           "stage_cost"]

# every engine of the recipe: vLLM's logging left alone, the engine core in the
# engine's own process (the cost probe times the proposer in its threads)
ENGINE_ENV = {"VLLM_CONFIGURE_LOGGING": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
ENGINE_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}


# ----------------------------------------------------------------------------- cost
def _decode_step_seconds(llm: Any, prompt_ids: list[int], n: int = 64) -> float:
    """Seconds per decode step at batch 1: (time for 1 + n tokens - time for 1) / n."""
    from vllm import SamplingParams

    def run(k: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt_ids}], sp, use_tqdm=False)
        return time.perf_counter() - t0

    return (run(1 + n) - run(1)) / n


def proposer_cost(llm: Any, args: dict[str, Any]) -> dict:
    """Interleaved medians: vanilla decode step vs ``MedusaTreeProposer.propose_tree``
    (heads forward + top-k + tree node tokens) at batch 1, in the engine's process
    and threads (an :class:`~medusa_vllm.tools.engine_proc.EngineJob` probe; needs
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). ``args``: ``model``, ``heads``,
    ``tree_file``, ``rounds``."""
    import types

    import torch

    from medusa_vllm.checkpoints import load_backbone_lm_head
    from medusa_vllm.core.tree import MedusaTree
    from medusa_vllm.engine.options import ADDITIONAL_CONFIG_KEY, MedusaTreeConfig
    from medusa_vllm.engine.proposer import MedusaTreeProposer

    tree = MedusaTree.load(args["tree_file"])
    lm_w = load_backbone_lm_head(args["model"]).float()
    options = MedusaTreeConfig.from_dict({"heads": args["heads"], "tree": tree.to_list(),
                                          "nodes_by_batch": "off"}).resolved()
    vcfg = types.SimpleNamespace(
        additional_config={ADDITIONAL_CONFIG_KEY: options.to_dict()},
        model_config=types.SimpleNamespace(dtype=torch.float32),
    )
    target = torch.nn.Module()
    target.lm_head = torch.nn.Linear(lm_w.shape[1], lm_w.shape[0], bias=False)
    target.lm_head.weight = torch.nn.Parameter(lm_w, requires_grad=False)
    proposer = MedusaTreeProposer(vcfg)
    proposer.load_model(target)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, lm_w.shape[1], generator=g)
    full_lm = target.lm_head

    def time_fn(fn, n: int = 200) -> float:
        for _ in range(10):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    prompt_ids = list(range(1000, 1300))
    steps, props, lms = [], [], []
    with torch.inference_mode():
        for _ in range(args.get("rounds", 5)):
            steps.append(_decode_step_seconds(llm, prompt_ids))
            props.append(time_fn(lambda: proposer.propose_tree(hidden, [True])))
            lms.append(time_fn(lambda: torch.topk(full_lm(hidden), 10)))
    step, prop, lm = (statistics.median(x) for x in (steps, props, lms))
    return {
        "vanilla_decode_step_ms": step * 1e3,
        "proposer_ms": prop * 1e3,
        "proposer_fraction_of_step": prop / step,
        "full_vocab_lm_head_plus_top10_ms": lm * 1e3,
        "tree_nodes": tree.num_nodes,
        "rounds": {"decode_step_ms": [x * 1e3 for x in steps], "proposer_ms": [x * 1e3 for x in props]},
        "torch_threads": torch.get_num_threads(),
    }


def stage_cost(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Proposer cost (heads + top-k + tree build) vs a vanilla decode step, batch 1."""
    from medusa_vllm.tools.default_model import default_medusa_heads_dir
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

    out = w / "proposer_cost.json"
    if out.is_file() and not force:
        say("cost: cached")
        return
    heads = default_medusa_heads_dir()
    job = EngineJob(llm=engine_kwargs(model, max_num_seqs=1), prompts=[],
                    probe=f"{__name__}:proposer_cost",
                    probe_args={"model": str(model), "heads": str(heads),
                                "tree_file": str(heads / TREE_FILE)})
    c = run_engine(job, timeout=None, env=ENGINE_ENV, env_defaults=ENGINE_ENV_DEFAULTS,
                   log=w / "cost.log").probe
    write_json(out, c)
    say(f"cost: vanilla decode step {c['vanilla_decode_step_ms']:.1f} ms, proposer "
        f"{c['proposer_ms']:.2f} ms = {100 * c['proposer_fraction_of_step']:.1f}% "
        f"(full-vocab lm_head + top-10 alone: {c['full_vocab_lm_head_plus_top10_ms']:.2f} ms)")


# ----------------------------------------------------------------------------- accept
def accept_prompts(r: Recipe, w: Work) -> list[str]:
    """Held-out prompts for the engine measurement (seed 1234 as ``medusa-vllm bench``),
    minus any used for the accuracy evaluation."""
    from medusa_vllm.training.prompts import build_prompts

    seen = {row["text"] for row in read_jsonl(w.prompts_heldout)}
    cand = build_prompts(r.accept_prompts * 2, seed=1234, split="heldout")
    return [p for p in cand if p not in seen][: r.accept_prompts]


def stage_accept(r: Recipe, w: Work, model: Path, force: bool) -> None:
    """Mean accepted length through vLLM (greedy) on held-out prompts; same text as vanilla?"""
    from medusa_vllm.core.tree_fit import tree_from_accuracies
    from medusa_vllm.core.tree_stats import simulate_acceptance
    from medusa_vllm.tools.bench import run_config
    from medusa_vllm.tools.default_model import default_medusa_heads_dir

    out = w / "accept.json"
    results = json.loads(out.read_text()) if out.is_file() and not force else {}
    prompts = accept_prompts(r, w)
    heads = str(default_medusa_heads_dir())
    base = {"model": str(model), "prompts": prompts, "max_tokens": r.accept_max_tokens,
            "max_model_len": 1024, "batch_size": 1, "dtype": "float32", "ignore_eos": False}
    per_rank = json.loads((w.medusa1 / "eval.json").read_text())["per_rank"]
    big = tree_from_accuracies(per_rank, r.max_tree_nodes).to_list()
    configs = {
        "vanilla": None,
        # the calibrated tree: fastest on this machine
        "medusa_tree": {"method": "medusa_tree", "model": heads, "tree": "auto"},
        f"chain-{r.num_heads}": {"method": "medusa_tree", "model": heads, "tree": f"chain-{r.num_heads}"},
        # the heads' reach: the optimized sparse tree of max_tree_nodes nodes, whatever it costs
        f"tree-{r.max_tree_nodes}": {"method": "medusa_tree", "model": heads, "tree": big,
                                     "nodes_by_batch": "off"},
    }
    for name, sc in configs.items():
        if name in results:
            say(f"accept: {name} cached")
            continue
        say(f"accept: {name} on {len(prompts)} held-out prompts")
        results[name] = run_config({**base, "name": name, "speculative_config": sc}, env=ENGINE_ENV,
                                   env_defaults=ENGINE_ENV_DEFAULTS, log=w / f"accept-{name}.log")
        write_json(out, results)
    van = results["vanilla"]
    summary = {}
    for name, res in results.items():
        s = res.get("spec", {})
        summary[name] = {
            "tokens_per_s": res["tokens_per_s"],
            "speedup_vs_vanilla": res["tokens_per_s"] / van["tokens_per_s"],
            "mean_accepted_length": s.get("mean_accepted_length"),
            "acceptance_per_depth": s.get("acceptance_per_depth"),
            "tree_size": s.get("tree_size"),
            "same_output_as_vanilla": res["token_ids"] == van["token_ids"],
            "output_tokens": res["output_tokens"],
        }
        say(f"accept: {name}: {res['tokens_per_s']:.1f} tok/s, x{summary[name]['speedup_vs_vanilla']:.2f}, "
            f"accepted length {s.get('mean_accepted_length', 1.0):.3f}, same output "
            f"{summary[name]['same_output_as_vanilla']}")
    # the same greedy text replayed offline: do the engine's accepted lengths match
    # what the heads' teacher-forced ranks on exactly this text predict?
    ranks = accept_ranks(model, prompts, van["token_ids"])
    for name, tree in accept_trees(r, big).items():
        if name in summary:
            sim = simulate_acceptance(tree, ranks)
            summary[name]["replayed_accepted_length"] = sim.mean_accepted_length
            summary[name]["replayed_acceptance_per_depth"] = sim.acceptance_per_depth
            say(f"accept: {name}: replayed offline {sim.mean_accepted_length:.3f} "
                f"(engine {summary[name]['mean_accepted_length']:.3f})")
    write_json(w / "accept_summary.json", summary)


def accept_trees(r: Recipe, big: list) -> dict:
    """The trees the accept stage's configurations verify at batch 1."""
    from medusa_vllm.core.tree import MedusaTree, nodes_for_batch
    from medusa_vllm.tools.default_model import default_medusa_heads_dir

    spec = json.loads((default_medusa_heads_dir() / TREE_FILE).read_text())
    shipped = MedusaTree(spec["medusa_choices"])
    table = {int(b): n for b, n in spec.get("nodes_by_batch", {}).items()} or None
    shipped = shipped.truncate(nodes_for_batch(table, 1, shipped.num_nodes))
    return {"medusa_tree": shipped, f"chain-{r.num_heads}": MedusaTree.chain(r.num_heads),
            f"tree-{r.max_tree_nodes}": MedusaTree(big)}


def accept_ranks(model: Path, prompts: list[str], outputs: list[list[int]]) -> list:
    """Target ranks of the shipped heads on the engine's own greedy outputs (the
    chat-templated prompts as vLLM tokenizes them, then the outputs)."""
    from transformers import AutoTokenizer

    from medusa_vllm.tools.calibrate import measure_target_ranks
    from medusa_vllm.tools.default_model import default_medusa_heads_dir
    from medusa_vllm.tools.engine_proc import chat_prompt

    tok = AutoTokenizer.from_pretrained(str(model))
    ids = [tok(chat_prompt(tok, [{"role": "user", "content": p}]) or p).input_ids for p in prompts]
    return measure_target_ranks(str(model), str(default_medusa_heads_dir()), ids, outputs)
