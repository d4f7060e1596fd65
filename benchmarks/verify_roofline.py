"""How cheap can verifying ``n`` tree nodes be on this CPU? The backbone's GEMMs alone.

A verification step runs the backbone on ``1 + n`` query rows per request. At batch 1 a
plain decode step (one row) streams every weight once and is bandwidth-bound; each extra
row adds ``2 * params`` FLOPs. This script times the default model's linear layers
(qkv, o_proj, gate_up, down per layer, and the lm_head) through vLLM's own CPU GEMM
dispatch (:func:`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`, the
kernel the engine runs: oneDNN on x86) at ``M = 1 + n`` rows, and prints, per ``n``:

- the GEMMs' time per step (one pass through every layer, each with its own weights, so
  the weights stream from memory as in the model) and its ratio to ``M = 1``: what a
  tree step pays for the matrix work alone, before attention, the tree kernel or Python;
- the roofline floor of that ratio on this machine: ``max(bytes / bandwidth,
  flops / peak) / t(M=1)``, with the bandwidth taken from the ``M = 1`` step and the
  peak from the fastest large GEMM timed here.

With ``--step-ms`` (a plain decode step of the engine at batch 1, e.g. ``vanilla_s[1]``
of the cost curve the engine cached) it also prints the floor of the whole step:
``(step - t(M=1) + floor * t(M=1)) / step``, everything but the GEMMs held at its
vanilla cost. Issue 16's targets (a 16-node tree step <= 1.25x vanilla, 64 nodes <=
1.5x) cannot be met where that floor lies above them, whatever the tree kernel does.

    .venv/bin/python benchmarks/verify_roofline.py --out runs/roofline
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def layer_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, K, N, count per step) of every linear layer of a Llama-style backbone."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    layers = config.num_hidden_layers
    return [("qkv", h, q + 2 * kv, layers), ("o_proj", q, h, layers),
            ("gate_up", h, 2 * i, layers), ("down", i, h, layers),
            ("lm_head", h, config.vocab_size, 1)]


def engine_linear(k: int, n: int, dtype: torch.dtype) -> torch.nn.Linear:
    """A ``k -> n`` linear layer running vLLM's CPU GEMM, as the engine's layers do."""
    from medusa_vllm.engine.proposer import use_engine_gemm

    layer = torch.nn.Linear(k, n, bias=False, dtype=dtype).requires_grad_(False)
    if use_engine_gemm(layer) != 1:
        raise SystemExit("verify_roofline: vLLM's CPU GEMM dispatch is unavailable here "
                         "(vLLM's CPU build is needed: make setup)")
    return layer


def median_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_step(layers: list[tuple[str, int, object]], m: int, dtype: torch.dtype,
              repeats: int) -> dict[str, float]:
    """Median seconds per layer kind of one pass through every layer in order, ``m`` rows.
    Each layer has its own weights, as in the model: a pass streams all of them, so no
    layer finds its weights still in the CPU's caches (timing one layer over and over
    would)."""
    inputs = {k: torch.randn(m, k, dtype=dtype) for k in {k for _, k, _ in layers}}
    runs: dict[str, list[float]] = {}
    for r in range(repeats + 2):
        spent: dict[str, float] = {}
        for name, k, fn in layers:
            t0 = time.perf_counter()
            fn(inputs[k])
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        if r >= 2:  # two untimed passes first (oneDNN primitives for this m)
            for name, t in spent.items():
                runs.setdefault(name, []).append(t)
    return {name: statistics.median(ts) for name, ts in runs.items()}


def main() -> None:
    from transformers import AutoConfig

    from medusa_vllm.engine.cpu.machine import machine_info
    from medusa_vllm.tools.default_model import default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="backbone folder (default: the embedded model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--nodes", default="0,1,3,7,16,32,64", help="tree nodes per step")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--step-ms", type=float, default=None,
                   help="the engine's plain decode step at batch 1, for the whole-step floor")
    p.add_argument("--out", type=Path, default=None, help="folder for roofline.json and .png")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model = args.model or str(default_model_dir())
    config = AutoConfig.from_pretrained(model)
    shapes = layer_shapes(config)
    nodes = sorted({int(x) for x in args.nodes.split(",")} | {0})
    info = machine_info()
    print(f"{info.cpu_model} [{info.isa}], {args.dtype}, {torch.get_num_threads()} threads; "
          f"{model}", flush=True)

    # every layer of every decoder layer with its own weights, in the model's order
    per_layer = [s for s in shapes if s[3] > 1]
    layers = [(name, k, engine_linear(k, n, dtype))
              for _ in range(config.num_hidden_layers) for name, k, n, _ in per_layer]
    layers += [(name, k, engine_linear(k, n, dtype)) for name, k, n, c in shapes if c == 1]
    step = {n: time_step(layers, 1 + n, dtype, args.repeats) for n in nodes}
    # the peak: the widest layer at a compute-bound row count
    name, k, n_out, _ = max(shapes[:-1], key=lambda s: s[2])
    fn = next(f for nm, _, f in layers if nm == name)
    big = 256
    peak = 2 * big * k * n_out / median_seconds(fn, torch.randn(big, k, dtype=dtype),
                                                max(3, args.repeats // 3))
    params = sum(k * n * count for _, k, n, count in shapes)
    t1 = sum(step[0].values())
    bandwidth = params * torch.finfo(dtype).bits / 8 / t1
    rows = []
    print(f"weights {params / 1e6:.1f} M params; M=1 GEMMs {t1 * 1e3:.1f} ms "
          f"({bandwidth / 1e9:.1f} GB/s); peak GEMM {peak / 1e9:.0f} GFLOP/s "
          f"({name}, M={big})")
    step_s = args.step_ms / 1e3 if args.step_ms else None
    if step_s is not None and step_s < t1:
        raise SystemExit(f"--step-ms {args.step_ms}: less than the GEMMs alone "
                         f"({t1 * 1e3:.1f} ms); pass the engine's whole plain decode step")
    print(f"{'nodes':>5} {'rows':>4} {'GEMM ms':>8} {'x M=1':>6} {'floor':>6} "
          f"{'lm_head ms':>10}" + (f" {'step floor':>10}" if step_s else ""))
    for n in nodes:
        total = sum(step[n].values())
        floor = max(t1, 2 * params * (1 + n) / peak) / t1
        row = {"nodes": n, "rows": 1 + n, "gemm_s": total, "ratio": total / t1,
               "floor": floor, "per_layer_s": step[n]}
        if step_s is not None:
            row["step_floor"] = (step_s - t1 + floor * t1) / step_s
        rows.append(row)
        print(f"{n:>5} {1 + n:>4} {total * 1e3:>8.1f} {total / t1:>6.2f} {floor:>6.2f} "
              f"{step[n]['lm_head'] * 1e3:>10.1f}"
              + (f" {row['step_floor']:>10.2f}" if step_s else ""))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"machine": {"cpu": info.cpu_model, "isa": info.isa, "dtype": args.dtype,
                              "threads": torch.get_num_threads()},
                  "model": model, "params": params, "step_s": step_s,
                  "bandwidth_bytes_s": bandwidth, "peak_flops": peak, "rows": rows}
        (args.out / "roofline.json").write_text(json.dumps(result, indent=1) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(nodes, [r["ratio"] for r in rows], "o-", label="backbone GEMMs, measured")
        ax.plot(nodes, [r["floor"] for r in rows], "--", label="GEMMs' roofline floor")
        if step_s is not None:
            ax.plot(nodes, [r["step_floor"] for r in rows], ":",
                    label=f"whole step's floor (vanilla step {args.step_ms:.1f} ms)")
        ax.scatter([16, 64], [1.25, 1.5], marker="x", color="red", zorder=3,
                   label="issue 16 target (whole step)")
        ax.set_xlabel("tree nodes verified per step (batch 1)")
        ax.set_ylabel("time / the same at 1 row")
        ax.set_title(f"{info.cpu_model} [{info.isa}], {args.dtype}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "roofline.png", dpi=120)
        print(f"wrote {args.out / 'roofline.json'} and roofline.png")


if __name__ == "__main__":
    main()
