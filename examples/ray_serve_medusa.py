"""Medusa tree decoding behind Ray Serve LLM's OpenAI route, N replicas on this machine.

Deploys the model (default: the embedded SmolLM2-135M-Instruct and its shipped heads)
with ``speculative_config={"method": "medusa_tree", "model": HEADS}`` through
``ray.serve.llm`` (``LLMConfig`` on CPU bundles, ``build_openai_app``), HTTP on
127.0.0.1, then:

1. sends one warm-up request and a chat request, then a burst of concurrent greedy
   completions (so every replica gets traffic) with the ``openai`` client;
2. reads vLLM's request and spec-decode counters per replica from Ray's Prometheus
   endpoint (vLLM's Ray stat logger tags them with the Serve ``ReplicaId``): every
   replica that served requests must show drafted steps, i.e. the plugin ran there;
3. stops Ray, then (unless ``--no-check``) runs the same prompts through an offline
   vanilla vLLM engine and checks the greedy outputs are token-for-token equal.

Prints start-up time (``serve.run`` until every replica is healthy), burst throughput,
and per-replica acceptance.

    python examples/ray_serve_medusa.py [--replicas 2] [--model DIR --heads DIR]
        [--dtype float32] [--tp 1] [--requests 16] [--max-tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_common import (
    RayExampleSkip,
    chat_prompts,
    first_difference,
    local_ray,
    replica_env,
    require_ray,
    resolve_model,
    time_limit,
    wait_for_counters,
    write_json,
)

MODEL_ID = "medusa"  # the name clients pass as `model`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="backbone folder (default: the embedded default model)")
    ap.add_argument("--heads", help="Medusa heads folder (default: the shipped heads)")
    ap.add_argument("--tree", default=None, help='tree option of medusa_tree (default: the heads\' "auto")')
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size inside each replica")
    ap.add_argument("--dtype", default="float32", help="float32 is the fast dtype on AVX2-only CPUs")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=16, help="size of the concurrent burst")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    ap.add_argument("--metrics-port", type=int, default=8090, help="Ray's Prometheus port")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per replica")
    ap.add_argument("--startup-timeout", type=float, default=900.0,
                    help="seconds before giving up on the replicas (Serve retries a failing one forever)")
    ap.add_argument("--no-check", action="store_true", help="skip the offline vanilla comparison")
    ap.add_argument("--ray-temp-dir", help="Ray's session and log folder (default /tmp/ray)")
    ap.add_argument("--json", help="write the figures and checks to this file")
    return ap.parse_args(argv)


def llm_config(args: argparse.Namespace, model: str, heads: str, env: dict[str, str]) -> Any:
    from ray.serve.llm import LLMConfig

    spec: dict[str, Any] = {"method": "medusa_tree", "model": heads}
    if args.tree:
        spec["tree"] = args.tree
    return LLMConfig(
        model_loading_config={"model_id": MODEL_ID, "model_source": model},
        # CPU bundles (one per TP rank) and vLLM's multiprocessing executor; without it
        # Ray Serve LLM asks for GPUs and the deployment never schedules.
        accelerator_config={"kind": "cpu"},
        deployment_config={"num_replicas": args.replicas},
        engine_kwargs={
            "dtype": args.dtype,
            "enforce_eager": True,
            "max_model_len": args.max_model_len,
            "tensor_parallel_size": args.tp,
            "seed": 0,
            "speculative_config": spec,
        },
        runtime_env={"env_vars": env},
        log_engine_metrics=True,  # vLLM's metrics, tagged with the ReplicaId, on Ray's endpoint
    )


def query(base_url: str, prompts: list[str], max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    """All ``prompts`` at once (one thread each) on /v1/completions, greedy; the answers in
    prompt order and the wall time of the burst."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(prompt: str) -> dict[str, Any]:
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens,
                                      temperature=0.0, extra_body={"return_token_ids": True})
        c = r.choices[0]
        return {"text": c.text, "token_ids": (c.model_extra or {}).get("token_ids"),
                "completion_tokens": r.usage.completion_tokens}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        answers = list(pool.map(one, prompts))
    return answers, time.perf_counter() - t0


def vanilla_outputs(args: argparse.Namespace, model: str, prompts: list[str]) -> dict[str, Any]:
    """The same prompts through an offline vanilla engine (a fresh subprocess)."""
    from medusa_vllm.tools.engine_proc import EngineJob, engine_kwargs, run_engine

    job = EngineJob(llm=engine_kwargs(model, dtype=args.dtype, max_model_len=args.max_model_len),
                    prompts=prompts, sampling={"temperature": 0.0, "max_tokens": args.max_tokens},
                    metrics=False)
    res = run_engine(job, timeout=900, env_defaults={"VLLM_CPU_KVCACHE_SPACE": "1"})
    return {"texts": res.texts, "token_ids": res.token_ids}


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_ray()
    model, heads = resolve_model(args.model, args.heads)
    prompts = chat_prompts(model, args.requests)
    from ray import serve
    from ray.serve.llm import build_openai_app

    env = replica_env(args.tp, args.kv_cache_gib)
    # Logical CPUs: each replica reserves 1 + TP, the ingress and Serve's proxy/controller more.
    num_cpus = args.replicas * (1 + args.tp) + 2
    out: dict[str, Any] = {"model": model, "heads": heads, "replicas": args.replicas, "tp": args.tp,
                           "dtype": args.dtype, "requests": args.requests,
                           "max_tokens": args.max_tokens}
    print(f"[serve] model {model}\n[serve] heads {heads}\n[serve] {args.replicas} replica(s), "
          f"TP={args.tp}, dtype {args.dtype}, {num_cpus} logical CPUs", flush=True)
    with local_ray(num_cpus, args.metrics_port, env, args.ray_temp_dir):
        # serve.start waits a hard-coded 60 s for the HTTP proxy actor and kills it after
        # that; on a machine loaded beyond its cores the proxy took longer to start.
        import ray.serve._private.api as serve_api

        serve_api.HTTP_PROXY_TIMEOUT = max(serve_api.HTTP_PROXY_TIMEOUT, args.startup_timeout)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_openai_app({"llm_configs": [llm_config(args, model, heads, env)]})
        t0 = time.perf_counter()
        with time_limit(args.startup_timeout, f"Ray Serve start-up of {args.replicas} replica(s)"):
            serve.run(app, name="medusa", route_prefix="/")
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        print(f"[serve] replicas ready in {out['startup_s']} s", flush=True)

        base_url = f"http://127.0.0.1:{args.port}/v1"
        from openai import OpenAI

        client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        chat = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Say hello in one sentence."}],
            max_tokens=24, temperature=0.0)
        out["chat_answer"] = chat.choices[0].message.content
        print(f"[serve] /v1/chat/completions answered: {out['chat_answer']!r}", flush=True)

        answers, wall = query(base_url, prompts, args.max_tokens)
        tokens = sum(a["completion_tokens"] for a in answers)
        out.update(burst_wall_s=round(wall, 2), completion_tokens=tokens,
                   throughput_tok_s=round(tokens / wall, 2),
                   texts=[a["text"] for a in answers], token_ids=[a["token_ids"] for a in answers])
        print(f"[serve] burst of {len(prompts)} concurrent requests: {tokens} tokens in {wall:.1f} s "
              f"= {tokens / wall:.1f} tok/s", flush=True)
        print(f"[serve] first answer: {answers[0]['text'][:300]!r}", flush=True)

        rows = wait_for_counters(args.metrics_port, expect_requests=len(prompts) + 1)
        replicas = {k: v for k, v in rows.items() if k}
        out["per_replica"] = [r.to_dict() for r in replicas.values()]
        for r in replicas.values():
            state = "ACTIVE" if r.num_drafts > 0 else "NO DRAFTS"
            print(f"[serve] replica {r.replica}: {r.requests} requests, {r.num_drafts} tree steps, "
                  f"{r.tree_size:.1f} nodes/step, mean accepted length "
                  f"{r.mean_accepted_length:.2f}  medusa_tree {state}", flush=True)
        served = [r for r in replicas.values() if r.requests > 0]
        out["replicas_seen"] = len(replicas)
        out["replicas_with_traffic"] = len(served)
        out["plugin_active_in_every_replica"] = bool(served) and all(r.num_drafts > 0 for r in served)
    print("[serve] Ray stopped", flush=True)

    if not args.no_check:
        print("[serve] running the same prompts through an offline vanilla engine ...", flush=True)
        ref = vanilla_outputs(args, model, prompts)
        have_ids = all(t is not None for t in out["token_ids"])
        ours = out["token_ids"] if have_ids else out["texts"]
        theirs = ref["token_ids"] if have_ids else ref["texts"]
        diff = first_difference(ours, theirs)
        out["compared_on"] = "token_ids" if have_ids else "texts"
        out["same_as_vanilla"] = diff is None
        out["first_difference"] = diff
        print(f"[serve] greedy outputs equal to vanilla's ({out['compared_on']}): "
              f"{diff is None}" + ("" if diff is None else f" (first difference: prompt {diff})"),
              flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except RayExampleSkip as exc:
        print(f"[serve] cannot run: {exc}", file=sys.stderr)
        return 2
    write_json(args.json, out)
    ok = out["plugin_active_in_every_replica"] and out.get("same_as_vanilla", True)
    if out["replicas_with_traffic"] < args.replicas:
        print(f"[serve] note: only {out['replicas_with_traffic']} of {args.replicas} replicas got "
              "requests (Serve's router chose); raise --requests", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
