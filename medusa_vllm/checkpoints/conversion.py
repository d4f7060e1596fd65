"""Converting heads between layouts: :func:`convert`, the ``medusa-vllm
convert`` command (:func:`add_convert_args`, :func:`convert_main`) and
:func:`expand_draft_vocab` (a reduced draft vocabulary made full-size, for
vLLM's built-in Medusa)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from medusa_vllm.checkpoints.backbone import load_backbone_lm_head
from medusa_vllm.checkpoints.common import DTYPES, READ_LAYOUTS, WRITE_LAYOUTS
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.checkpoints.load import load_heads
from medusa_vllm.checkpoints.save import check_write_layout, save_heads
from medusa_vllm.core.heads import MedusaHeads

__all__ = ["add_convert_args", "convert", "convert_main", "expand_draft_vocab"]


def expand_draft_vocab(heads: MedusaHeads) -> MedusaHeads:
    """The same heads with per-head LM layers over the *full* vocabulary.

    Each head's draft-vocabulary rows go to their token ids (``token_map``);
    every other row is zero (logit 0), so a head's full-vocabulary top-1 is
    its draft-vocabulary top-1 whenever that logit is positive. This is how
    heads with a reduced draft vocabulary run in vLLM 0.32's built-in Medusa
    (layout ``vllm``), which cannot load per-head LM layers smaller than the
    vocabulary; it then pays for the full-vocabulary LM layers.
    """
    cfg = heads.config
    if not isinstance(heads, MedusaHeads):
        raise MedusaCheckpointError(
            f"expand_draft_vocab: only Medusa heads run in vLLM's built-in Medusa; found "
            f"{type(heads).__name__}")
    if cfg.truncated_vocab_size is None or cfg.original_lm_head:
        raise MedusaCheckpointError(
            "expand_draft_vocab: these heads have no per-head reduced draft vocabulary "
            f"(truncated_vocab_size={cfg.truncated_vocab_size}, original_lm_head="
            f"{cfg.original_lm_head}); nothing to expand"
        )
    full_cfg = dataclasses.replace(cfg, truncated_vocab_size=None)
    ref = next(heads.parameters())
    out = MedusaHeads(full_cfg, device=ref.device, dtype=ref.dtype)
    state = {k: v for k, v in heads.state_dict().items() if k != "token_map"}
    token_map = heads.token_map.to(ref.device)
    for k in range(cfg.num_heads):
        name = f"lm_heads.{k}.weight"
        w = torch.zeros(cfg.vocab_size, cfg.hidden_size, device=ref.device, dtype=ref.dtype)
        w[token_map] = state[name]
        state[name] = w
    out.load_state_dict(state)
    return out


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    layout: str = "medusa_vllm",
    *,
    src_layout: str | None = None,
    overwrite: bool = False,
    lm_head_weight: torch.Tensor | None = None,
    include_lm_head: bool = True,
    dtype: torch.dtype | None = None,
    expand_vocab: bool = False,
) -> Path:
    """Read heads from ``src`` (any readable layout) and write ``dst`` in ``layout``.

    Returns the destination directory. See :func:`load_heads` and
    :func:`save_heads` for the arguments; ``expand_vocab`` first applies
    :func:`expand_draft_vocab` to heads with a reduced per-head draft vocabulary
    (needed for layout ``vllm``).
    """
    s, t = Path(src), Path(dst)
    if s.exists() and t.exists() and s.resolve() == t.resolve():
        raise MedusaCheckpointError(
            f"source and destination are the same directory ({s}); write elsewhere"
        )
    check_write_layout(layout)
    heads = load_heads(s, lm_head_weight=lm_head_weight, layout=src_layout)
    cfg = heads.config
    if expand_vocab and cfg.truncated_vocab_size is not None and not cfg.original_lm_head:
        heads = expand_draft_vocab(heads)
    return save_heads(
        heads,
        t,
        layout=layout,
        overwrite=overwrite,
        include_lm_head=include_lm_head,
        dtype=dtype,
    )


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``medusa-vllm convert`` arguments to ``parser``."""
    parser.add_argument("src", help="heads checkpoint directory (any layout)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument(
        "--layout",
        choices=WRITE_LAYOUTS,
        default="medusa_vllm",
        help="output layout (default: medusa_vllm; 'vllm' loads in vLLM's "
        "built-in method 'medusa'; 'medusa' is FasterDecoding's, also read by "
        "TensorRT-LLM)",
    )
    parser.add_argument(
        "--from-layout",
        choices=READ_LAYOUTS,
        default=None,
        help="input layout (default: auto-detect)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="output dtype (default: keep the checkpoint's)",
    )
    parser.add_argument(
        "--lm-head-from",
        metavar="BACKBONE_DIR",
        default=None,
        help="HF backbone directory to take the shared lm_head weight from "
        "(heads with original_lm_head whose checkpoint omits it)",
    )
    parser.add_argument(
        "--no-lm-head",
        action="store_true",
        help="omit the shared lm_head weight from the output (medusa_vllm only)",
    )
    parser.add_argument(
        "--expand-vocab",
        action="store_true",
        help="per-head LM layers over a reduced draft vocabulary -> full-vocabulary rows "
        "(zero outside the draft vocabulary); needed for --layout vllm",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty DST"
    )
    return parser


def convert_main(args: argparse.Namespace) -> int:
    """Run ``medusa-vllm convert`` from parsed ``args``; 0 on success, 2 on a
    checkpoint error (printed to stderr)."""
    try:
        weight = load_backbone_lm_head(args.lm_head_from) if args.lm_head_from else None
        dst = convert(
            args.src,
            args.dst,
            args.layout,
            src_layout=args.from_layout,
            overwrite=args.overwrite,
            lm_head_weight=weight,
            include_lm_head=not args.no_lm_head,
            dtype=None if args.dtype == "auto" else DTYPES[args.dtype],
            expand_vocab=args.expand_vocab,
        )
    except MedusaCheckpointError as e:
        print(f"medusa-vllm convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.layout} heads to {dst}")
    return 0
