"""Run one vLLM engine in a fresh process and print its outputs as JSON.

Tests start engines through :func:`run_engine` rather than in the pytest
process: each run gets a clean vLLM (plugins, env, engine-core process) and
nothing is left running if a test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_engine(spec: dict, timeout: float = 900, env: dict | None = None) -> dict:
    """``spec``: {"llm": LLM kwargs, "prompts": [str] or [[ids]], "sampling": SamplingParams kwargs
    or a list of them (one per prompt), "repeat": int, "refuse": [SamplingParams kwargs] submitted
    first, one request each, expecting an error}. Returns {"outputs": [[token ids]],
    "texts": [str], "logprobs": ..., "refused": [error message or None per "refuse" entry],
    "metrics": SpecDecodeSummary dict}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                **(env or {})}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.engine_runner", f.name],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env,
        )
    finally:
        os.unlink(f.name)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{\"outputs\""):
            return json.loads(line)
    # vLLM logs to stdout: worker tracebacks are there
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln][:40]
    raise RuntimeError(
        f"engine run failed (exit {proc.returncode}):\n--- error lines ---\n" + "\n".join(errors)
        + f"\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"
    )


def _main(path: str) -> None:
    from vllm import LLM, SamplingParams

    from medusa_vllm.metrics import spec_decode_summary

    spec = json.loads(Path(path).read_text())
    llm = LLM(**{"disable_log_stats": False, **spec["llm"]})
    prompts = spec["prompts"]
    if prompts and isinstance(prompts[0], list):
        prompts = [{"prompt_token_ids": p} for p in prompts]
    sampling = spec.get("sampling", {})
    if isinstance(sampling, list):
        sp = [SamplingParams(**s) for s in sampling]
    else:
        sp = SamplingParams(**sampling)
    result = {"outputs": [], "texts": [], "finish": [], "logprobs": [], "refused": []}
    for bad in spec.get("refuse", []):
        try:
            llm.generate(prompts[:1], SamplingParams(**bad), use_tqdm=False)
            result["refused"].append(None)
        except Exception as err:  # noqa: BLE001 - the test checks the message
            result["refused"].append(f"{type(err).__name__}: {err}")
    for _ in range(int(spec.get("repeat", 1))):
        outs = llm.generate(prompts, sp, use_tqdm=False)
        for o in outs:
            for c in o.outputs:
                result["outputs"].append(list(c.token_ids))
                result["texts"].append(c.text)
                result["finish"].append(c.finish_reason)
                if c.logprobs is not None:
                    result["logprobs"].append(
                        [{str(k): v.logprob for k, v in d.items()} for d in c.logprobs]
                    )
    result["metrics"] = spec_decode_summary(llm.get_metrics()).to_dict()
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1])
