"""``medusa-vllm`` command line: one subcommand per job.

Each subcommand's module is imported only when that subcommand runs, so
``medusa-vllm --help`` stays fast. Each module owns its arguments
(``add_*_args``) and its entry point (``*_main(args) -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, add-arguments function, main function, help)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "convert": (
        "medusa_vllm.checkpoints", "add_convert_args", "convert_main",
        "convert Medusa heads between checkpoint layouts (ours, vLLM, FasterDecoding, TensorRT-LLM)",
    ),
    "train": (
        "medusa_vllm.training.cli", "add_train_args", "train_main",
        "train Medusa heads (Medusa-1, Medusa-2, self-distillation)",
    ),
    "calibrate": (
        "medusa_vllm.tools.calibrate", "add_calibrate_args", "calibrate_main",
        "measure head accuracies and this machine's verification cost; write the best tree beside the heads",
    ),
    "bench": (
        "medusa_vllm.tools.bench", "add_bench_args", "bench_main",
        "vanilla vLLM vs vLLM's speculators vs medusa_tree: concurrency 1-64, offline and HTTP, spread",
    ),
    "eval": (
        "medusa_vllm.tools.eval.translation", "add_eval_args", "eval_main",
        "evaluate decoding strategies on a task: `eval translation` (BLEU, ROUGE, real-time factor)",
    ),
    "default-model": (
        "medusa_vllm.tools.default_model", "add_default_model_args", "default_model_main",
        'print {"model": DIR, "heads": DIR} of the embedded default model (builds it if missing)',
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-vllm",
        description="Medusa speculative decoding for vLLM.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add_args, _, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:  # import only the module that runs
            mod = importlib.import_module(module)
            adder = getattr(mod, add_args, None)
            if adder is not None:
                adder(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=command if command in SUBCOMMANDS else None).parse_args(argv)
    module, _, main_fn, _ = SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), main_fn)(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"medusa-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
