"""``medusa-vllm`` command line: one subcommand per job.

Each subcommand's module is imported only when that subcommand runs, so
``medusa-vllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _convert(args: argparse.Namespace) -> int:
    from medusa_vllm.checkpoints import convert

    convert(args.src, args.dst, layout=args.layout, overwrite=args.overwrite)
    print(f"wrote {args.layout} layout to {args.dst}")
    return 0


def _default_model(args: argparse.Namespace) -> int:
    from medusa_vllm.default_model import default_model_info

    print(json.dumps(default_model_info()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medusa-vllm",
        description="Medusa speculative decoding for vLLM: convert, train, calibrate, bench, eval.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "convert",
        help="convert Medusa heads between checkpoint layouts",
        description=(
            "Load Medusa heads from SRC (layout auto-detected: medusa_vllm, FasterDecoding/Medusa, "
            "vLLM built-in, TensorRT-LLM) and write them to DST in the chosen layout."
        ),
    )
    c.add_argument("src", help="heads folder (or file) to read")
    c.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    c.add_argument(
        "--layout",
        default="medusa_vllm",
        choices=["medusa_vllm", "vllm"],
        help="output layout: ours, or vLLM's built-in medusa (for method='medusa')",
    )
    c.add_argument("--overwrite", action="store_true", help="replace files in a non-empty DST")
    c.set_defaults(func=_convert)

    d = sub.add_parser(
        "default-model",
        help='print {"model": DIR, "heads": DIR} of the embedded default model (builds it if missing)',
    )
    d.set_defaults(func=_default_model)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"medusa-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
