"""Medusa heads checkpoints: every public layout in, ours and vLLM's out.

Layouts (a heads checkpoint is a directory):

``medusa_vllm`` (ours, read/write)
    ``config.json`` with ``"medusa_vllm_format": 1``, ``"architectures":
    ["MedusaHeads"]`` and the :class:`~medusa_vllm.core.heads.MedusaHeadsConfig` fields;
    ``model.safetensors`` with :class:`~medusa_vllm.core.heads.MedusaHeads` state-dict
    names (``blocks.{k}.layers.{j}.weight|bias``, ``lm_heads.{k}.weight`` or the
    shared ``lm_head.weight``, ``token_map``). With ``original_lm_head`` the
    shared ``lm_head.weight`` may be omitted; it must then be supplied from the
    backbone at load time (``lm_head_weight=``).

``vllm`` (vLLM 0.32's built-in ``method: "medusa"``, read/write)
    ``config.json`` with ``"model_type": "medusa"`` and the fields of
    ``vllm/transformers_utils/configs/medusa.py`` (``num_heads``,
    ``num_hidden_layers``, ``hidden_size``, ``vocab_size``,
    ``truncated_vocab_size``, ``original_lm_head``, plus ``medusa_fc_bias`` which
    vLLM's ``ResidualBlock`` reads); weights in ``*.safetensors`` named as in
    ``vllm/model_executor/models/medusa.py``. Read exactly as vLLM's
    ``Medusa.load_weights`` does: ``medusa_heads.`` prefixes are dropped,
    FasterDecoding keys are remapped, a shared head may be stored as
    ``lm_heads.0.weight``, full-vocabulary LM weights are sliced with
    ``token_map``. vLLM 0.32 can only load a reduced vocabulary together with
    ``original_lm_head`` (its per-head ``ParallelLMHead`` is full-vocabulary and
    its weight loader asserts the row count), so exporting per-head LM layers
    with a reduced vocabulary is refused.

``medusa`` (FasterDecoding/Medusa, read/write)
    ``config.json`` with ``medusa_num_heads``, ``medusa_num_layers``
    (optionally ``base_model_name_or_path``); weights in
    ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` with keys
    ``{k}.{j}.linear.weight|bias`` and ``{k}.{num_layers}.weight``; sizes come
    from the tensors. TensorRT-LLM's ``examples/medusa/convert_checkpoint.py
    --medusa_model_dir`` consumes this same layout.

``trtllm`` (TensorRT-LLM converted checkpoint, read only)
    The output of TensorRT-LLM's ``examples/medusa/convert_checkpoint.py``:
    ``config.json`` with ``"architecture": "MedusaForCausalLM"``,
    ``num_medusa_heads``, ``num_medusa_layers``, ``hidden_size``,
    ``vocab_size``, ``mapping.tp_size|pp_size`` and ``rank{r}.safetensors``
    holding ``medusa_heads.{k}.medusa_layers.{j}.linear.weight|bias`` and
    ``medusa_heads.{k}.lm_head.weight``, each split along dim 0 across the
    tensor-parallel ranks (pinned from ``tensorrt_llm/models/medusa/weight.py``
    ``load_medusa_hf``). Only unquantized checkpoints
    (``quantization.quant_algo`` null) are read. ModelOpt's combined
    backbone+heads checkpoints (``"medusa": {...}`` in config.json, FP8 scales)
    are not supported.

Every problem raises :class:`MedusaCheckpointError` naming the file, the tensor
or field, what was expected and what was found.

Modules: :mod:`.errors` (the error), :mod:`.common` (shared readers and names),
one per layout (:mod:`.ours`, :mod:`.vllm_medusa`, :mod:`.faster_decoding`,
:mod:`.trtllm`), :mod:`.detect` (which layout), :mod:`.load` (load and check
heads), :mod:`.save` (write them), :mod:`.conversion` (convert, the CLI, vocabulary
expansion), :mod:`.backbone` (a backbone's LM head), :mod:`.info` (the cheap
``config.json`` read).
"""

from __future__ import annotations

from medusa_vllm.checkpoints.backbone import load_backbone_lm_head
from medusa_vllm.checkpoints.common import READ_LAYOUTS, TREE_FILE, WRITE_LAYOUTS
from medusa_vllm.checkpoints.conversion import (
    add_convert_args,
    convert,
    convert_main,
    expand_draft_vocab,
)
from medusa_vllm.checkpoints.detect import detect_layout
from medusa_vllm.checkpoints.errors import MedusaCheckpointError
from medusa_vllm.checkpoints.info import HeadsInfo, plain_medusa_heads, read_heads_info
from medusa_vllm.checkpoints.load import check_compatible, load_heads
from medusa_vllm.checkpoints.ours import FORMAT_VERSION
from medusa_vllm.checkpoints.save import save_heads

__all__ = [
    "FORMAT_VERSION",
    "READ_LAYOUTS",
    "TREE_FILE",
    "WRITE_LAYOUTS",
    "HeadsInfo",
    "MedusaCheckpointError",
    "add_convert_args",
    "check_compatible",
    "convert",
    "convert_main",
    "detect_layout",
    "expand_draft_vocab",
    "load_backbone_lm_head",
    "load_heads",
    "plain_medusa_heads",
    "read_heads_info",
    "save_heads",
]
