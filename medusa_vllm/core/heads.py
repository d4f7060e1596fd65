"""Medusa heads: K small residual MLP heads on top of a frozen backbone.

Head ``k`` (0-based) predicts the token at offset ``k + 2`` from the backbone's
last hidden state ``h`` (the backbone's own LM head predicts offset ``+1``)::

    x = h
    for each of the head's L ResBlocks:   x = x + SiLU(W x + b)
    logits_k = U_k x                      # U_k: Linear(hidden, draft_vocab, bias=False)

Vocabulary options, with the same meaning as vLLM 0.32's built-in
``vllm/model_executor/models/medusa.py`` so that checkpoints export faithfully:

* ``truncated_vocab_size`` (``None`` = full vocabulary): the heads score only a
  reduced *draft vocabulary* of ``truncated_vocab_size`` tokens. The buffer
  ``token_map`` (``LongTensor [draft_vocab]``) maps a draft id to its id in the
  full vocabulary; vLLM calls the same tensor ``token_map`` and scatters draft
  logits into a ``-inf`` full-vocab row with it.
* ``original_lm_head``: all heads share ONE LM layer (the backbone's ``lm_head``,
  sliced by ``token_map`` if the vocabulary is reduced) instead of one each.

A fresh :class:`MedusaHeads` zero-initialises every ResBlock linear (weight and
bias), so each block is the identity and, once the LM layers are initialised
from the backbone (:meth:`MedusaHeads.init_lm_head_from`), every head reproduces
the backbone's next-token logits. (The reference FasterDecoding/Medusa code
zeroes only the weight; its bias keeps PyTorch's default init.)

Checkpoint I/O lives in :mod:`medusa_vllm.checkpoints` (``load_heads`` /
``save_heads``); this module does not import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medusa_vllm.core.dict_fields import DictFields

__all__ = [
    "MedusaHeadsConfig",
    "MedusaHeads",
    "ResidualBlock",
    "strip_vocab_padding",
    "token_map_from_counts",
    "token_map_problem",
    "truncate_lm_head",
]


@dataclass
class MedusaHeadsConfig(DictFields):
    """Shape and options of a set of Medusa heads.

    Fields:
        hidden_size: backbone hidden size ``H``.
        vocab_size: backbone (full) vocabulary size ``V`` = rows of its lm_head.
        num_heads: number of Medusa heads ``K`` (head ``k`` predicts offset ``k+2``).
        num_layers: ResBlocks per head ``L`` (``>= 0``; the paper uses 1).
        truncated_vocab_size: size of the reduced draft vocabulary, or ``None``
            for the full vocabulary. Must be ``< vocab_size``.
        original_lm_head: all heads share one LM layer (the backbone's).
        resblock_bias: whether the ResBlock linears have a bias (reference
            Medusa: yes; vLLM's ``medusa_fc_bias`` defaults to no).
        base_model_name_or_path: the backbone these heads were trained for
            (informational).

    :meth:`to_dict` / :meth:`from_dict` give and read the JSON form (unknown
    or missing keys raise ``ValueError``).
    """

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    truncated_vocab_size: int | None = None
    original_lm_head: bool = False
    resblock_bias: bool = True
    base_model_name_or_path: str | None = None

    @property
    def draft_vocab_size(self) -> int:
        """Number of logits each head produces (reduced or full vocabulary)."""
        if self.truncated_vocab_size is None:
            return self.vocab_size
        return self.truncated_vocab_size

    def validate(self) -> "MedusaHeadsConfig":
        """Raise ``ValueError`` naming the bad field; return ``self`` if valid."""

        def _int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"MedusaHeadsConfig.{name} must be an integer, found {value!r}"
                )
            if value < minimum:
                raise ValueError(
                    f"MedusaHeadsConfig.{name} must be >= {minimum}, found {value}"
                )

        _int("hidden_size", 1)
        _int("vocab_size", 1)
        _int("num_heads", 1)
        _int("num_layers", 0)
        if self.truncated_vocab_size is not None:
            _int("truncated_vocab_size", 1)
            if self.truncated_vocab_size >= self.vocab_size:
                raise ValueError(
                    f"MedusaHeadsConfig.truncated_vocab_size must be < vocab_size "
                    f"({self.vocab_size}) or None for the full vocabulary, found "
                    f"{self.truncated_vocab_size}"
                )
        for name in ("original_lm_head", "resblock_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"MedusaHeadsConfig.{name} must be true or false, found "
                    f"{getattr(self, name)!r}"
                )
        if self.base_model_name_or_path is not None and not isinstance(
            self.base_model_name_or_path, str
        ):
            raise ValueError(
                f"MedusaHeadsConfig.base_model_name_or_path must be a string or None, "
                f"found {self.base_model_name_or_path!r}"
            )
        return self

    @classmethod
    def from_known_fields(cls, data: Mapping[str, Any]) -> MedusaHeadsConfig:
        """Build and validate a config (:meth:`from_dict` has refused unknown
        keys); missing required fields raise ``ValueError``."""
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in data
        ]
        if missing:
            raise ValueError(f"MedusaHeadsConfig: missing required field(s) {missing}")
        return cls(**data).validate()


def token_map_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Draft vocabulary of the ``size`` most frequent tokens.

    Args:
        counts: ``[vocab_size]`` token frequencies (any real dtype).
        size: number of tokens to keep (``1 <= size <= vocab_size``).

    Returns:
        ``LongTensor [size]``: full-vocab ids, most frequent first; ties keep
        the lower id first. Use it as ``MedusaHeads``' ``token_map``.
    """
    if counts.dim() != 1:
        raise ValueError(
            f"token counts must be a 1-D tensor [vocab_size], found shape "
            f"{list(counts.shape)}"
        )
    if not 1 <= size <= counts.numel():
        raise ValueError(
            f"draft vocabulary size must be in [1, {counts.numel()}], found {size}"
        )
    order = torch.sort(counts.double(), descending=True, stable=True).indices
    return order[:size].to(torch.long).clone()


def token_map_problem(token_map: torch.Tensor, draft_vocab_size: int, vocab_size: int) -> str | None:
    """What is wrong with a ``token_map`` (draft id -> full id), or ``None``:
    integer dtype, shape ``[draft_vocab_size]``, ids in ``[0, vocab_size)``, no repeats."""
    if token_map.dtype.is_floating_point or token_map.dtype == torch.bool:
        return f"expected integer token ids, found dtype {token_map.dtype}"
    if tuple(token_map.shape) != (draft_vocab_size,):
        return (f"expected shape [{draft_vocab_size}] (truncated_vocab_size), found "
                f"{list(token_map.shape)}")
    tm = token_map.to(torch.long)
    lo, hi = int(tm.min()), int(tm.max())
    if lo < 0 or hi >= vocab_size:
        return f"ids must be in [0, {vocab_size}) (vocab_size), found min {lo} and max {hi}"
    if torch.unique(tm).numel() != tm.numel():
        return "a token id appears more than once"
    return None


def truncate_lm_head(weight: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Rows of a full ``[vocab_size, hidden]`` LM weight for the draft vocabulary.

    Returns a new ``[len(token_map), hidden]`` tensor (row ``i`` is the full
    weight's row ``token_map[i]``).
    """
    if weight.dim() != 2:
        raise ValueError(
            f"lm_head weight must be 2-D [vocab_size, hidden], found shape "
            f"{list(weight.shape)}"
        )
    return weight.index_select(0, token_map.to(device=weight.device, dtype=torch.long))


VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE for ParallelLMHead


def strip_vocab_padding(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop the padding rows of a vLLM ``ParallelLMHead`` weight (single rank).

    vLLM pads the LM head to a multiple of 64 rows (zeros past ``vocab_size``);
    such a weight is returned as the view ``weight[:vocab_size]`` (storage is
    shared). Any other weight is returned unchanged.
    """
    padded = -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    if weight.dim() == 2 and weight.shape[0] == padded and padded != vocab_size:
        return weight[:vocab_size]
    return weight


class ResidualBlock(nn.Module):
    """A stack of ``num_layers`` ResBlocks ``x <- x + SiLU(W x + b)``.

    Parameter names (``layers.{j}.weight|bias``) match vLLM's ``ResidualBlock``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(hidden_size, hidden_size, bias=bias, device=device, dtype=dtype)
            for _ in range(num_layers)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero every weight and bias: each ResBlock becomes the identity."""
        for layer in self.layers:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads (ResBlocks + LM layer each).

    Parameters (state-dict names, identical to vLLM's ``Medusa`` module):

    * ``blocks.{k}.layers.{j}.weight`` ``[H, H]`` and ``.bias`` ``[H]``;
    * ``lm_heads.{k}.weight`` ``[draft_vocab, H]`` — one per head; or, with
      ``original_lm_head=True``, a single shared ``lm_head.weight``;
    * buffer ``token_map`` ``LongTensor [draft_vocab]`` (only with a reduced
      draft vocabulary).

    Args:
        config: the heads' shape; validated here.
        token_map: draft id -> full vocab id; required iff
            ``config.truncated_vocab_size`` is set.
        lm_head_weight: optional backbone ``lm_head`` weight (``[V, H]``, or
            ``[draft_vocab, H]`` already reduced) to initialise the LM layer(s)
            from; see :meth:`init_lm_head_from`. Without it the LM layers keep
            ``nn.Linear``'s random init.
        device, dtype: where and in which dtype to create the parameters.
    """

    token_map: torch.Tensor | None

    def __init__(
        self,
        config: MedusaHeadsConfig,
        *,
        token_map: torch.Tensor | None = None,
        lm_head_weight: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        h, dv = config.hidden_size, config.draft_vocab_size
        self.blocks = nn.ModuleList(
            ResidualBlock(
                h, config.num_layers, config.resblock_bias, device=device, dtype=dtype
            )
            for _ in range(config.num_heads)
        )
        if config.original_lm_head:
            self.lm_head: nn.Linear | None = nn.Linear(
                h, dv, bias=False, device=device, dtype=dtype
            )
            self.lm_heads: nn.ModuleList | None = None
        else:
            self.lm_head = None
            self.lm_heads = nn.ModuleList(
                nn.Linear(h, dv, bias=False, device=device, dtype=dtype)
                for _ in range(config.num_heads)
            )

        if config.truncated_vocab_size is None:
            if token_map is not None:
                raise ValueError(
                    "token_map was given but config.truncated_vocab_size is None "
                    "(full vocabulary); set truncated_vocab_size=len(token_map)"
                )
            self.register_buffer("token_map", None)
        else:
            if token_map is None:
                raise ValueError(
                    f"config.truncated_vocab_size={config.truncated_vocab_size} "
                    f"needs a token_map (LongTensor [{dv}], draft id -> full vocab "
                    f"id); build one with token_map_from_counts(counts, {dv})"
                )
            self.register_buffer(
                "token_map", self._checked_token_map(token_map).to(device=device)
            )
        if lm_head_weight is not None:
            self.init_lm_head_from(lm_head_weight)

    # ------------------------------------------------------------------ checks
    def _checked_token_map(self, token_map: torch.Tensor) -> torch.Tensor:
        if not isinstance(token_map, torch.Tensor):
            token_map = torch.as_tensor(token_map)
        problem = token_map_problem(token_map, self.config.draft_vocab_size, self.config.vocab_size)
        if problem:
            raise ValueError(f"token_map: {problem}")
        return token_map.to(torch.long).clone()

    # -------------------------------------------------------------- LM layers
    @property
    def lm_layers(self) -> list[nn.Linear]:
        """The LM layer used by each head (the same object K times if shared)."""
        if self.lm_head is not None:
            return [self.lm_head] * self.config.num_heads
        assert self.lm_heads is not None
        return list(self.lm_heads)  # type: ignore[arg-type]

    def _reduced(self, weight: torch.Tensor, what: str) -> torch.Tensor:
        """``weight`` as ``[draft_vocab, H]`` (a full-vocab weight is sliced)."""
        cfg = self.config
        if weight.dim() != 2 or weight.shape[1] != cfg.hidden_size:
            raise ValueError(
                f"{what} must have shape [{cfg.vocab_size}, {cfg.hidden_size}] "
                f"(vocab_size, hidden_size), found {list(weight.shape)}"
            )
        weight = strip_vocab_padding(weight, cfg.vocab_size)
        rows = weight.shape[0]
        if rows == cfg.draft_vocab_size:
            return weight
        if rows == cfg.vocab_size and self.token_map is not None:
            return truncate_lm_head(weight, self.token_map)
        expected = f"[{cfg.vocab_size}, {cfg.hidden_size}]"
        if self.token_map is not None:
            expected += f" or the reduced [{cfg.draft_vocab_size}, {cfg.hidden_size}]"
        raise ValueError(
            f"{what} must have shape {expected}, found {list(weight.shape)}"
        )

    @torch.no_grad()
    def init_lm_head_from(
        self,
        weight: torch.Tensor,
        *,
        tie: bool = False,
        freeze: bool | None = None,
    ) -> None:
        """Initialise the LM layer(s) from the backbone's ``lm_head`` weight.

        Args:
            weight: ``[vocab_size, H]`` (sliced with ``token_map`` if the draft
                vocabulary is reduced) or ``[draft_vocab, H]`` (used as is).
            tie: shared LM layer only (``original_lm_head=True``): make
                ``lm_head.weight`` *the same tensor* as ``weight`` (no copy),
                e.g. the backbone's parameter. Needs a full-vocabulary weight of
                this module's dtype/device (a reduced copy cannot be tied).
            freeze: set ``requires_grad=False`` on the LM layer(s). Default:
                frozen iff ``original_lm_head`` (the shared layer *is* the
                backbone's), trainable otherwise (Medusa-1 trains each head's
                LM layer starting from the backbone's).
        """
        if freeze is None:
            freeze = self.config.original_lm_head
        weight = strip_vocab_padding(weight, self.config.vocab_size)
        if tie:
            if self.lm_head is None:
                raise ValueError(
                    "tie=True needs original_lm_head=True (one shared LM layer); "
                    "per-head LM layers are copies by design"
                )
            if self.token_map is not None or weight.shape[0] != self.config.vocab_size:
                raise ValueError(
                    f"tie=True needs the full-vocabulary weight "
                    f"[{self.config.vocab_size}, {self.config.hidden_size}] and no "
                    f"reduced draft vocabulary, found weight shape "
                    f"{list(weight.shape)} and truncated_vocab_size="
                    f"{self.config.truncated_vocab_size}"
                )
            self._reduced(weight, "lm_head weight")  # shape check
            ref = self.lm_head.weight
            if weight.dtype != ref.dtype or weight.device != ref.device:
                raise ValueError(
                    f"tie=True needs the weight in the heads' dtype/device "
                    f"({ref.dtype}, {ref.device}), found ({weight.dtype}, "
                    f"{weight.device}); convert the heads first"
                )
            param = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            self.lm_head.weight = param
            if freeze:
                param.requires_grad_(False)
            return
        reduced = self._reduced(weight, "lm_head weight")
        for layer in dict.fromkeys(self.lm_layers):  # unique, ordered
            layer.weight.copy_(reduced.to(layer.weight.device, layer.weight.dtype))
            layer.weight.requires_grad_(not freeze)

    # ----------------------------------------------------------------- forward
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_layers[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_layers[0].weight.device

    def forward(self, hidden_states: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
        """Per-head draft-vocabulary logits.

        Args:
            hidden_states: ``[..., H]`` backbone hidden states (cast to the
                heads' dtype).
            num_heads: run only the first ``num_heads`` heads (e.g. a tree
                only ``num_heads`` deep needs no deeper head); default all.

        Returns:
            ``[num_heads, ..., draft_vocab]`` logits, ``draft_vocab`` =
            ``truncated_vocab_size or vocab_size``. Map argmax/top-k ids to the
            full vocabulary with :meth:`map_to_full`.
        """
        cfg = self.config
        if hidden_states.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"hidden_states must end with hidden_size={cfg.hidden_size}, "
                f"found shape {list(hidden_states.shape)}"
            )
        k = cfg.num_heads if num_heads is None else num_heads
        if not 1 <= k <= cfg.num_heads:
            raise ValueError(f"num_heads must be in [1, {cfg.num_heads}], found {num_heads}")
        x = hidden_states.to(self.dtype)
        feats = [block(x) for block in list(self.blocks)[:k]]
        if self.lm_head is not None:
            # One matmul for all heads with the shared LM layer.
            return self.lm_head(torch.stack(feats, dim=0))
        return torch.stack(
            [lm(f) for lm, f in zip(list(self.lm_heads)[:k], feats, strict=True)],
            dim=0,  # type: ignore[arg-type]
        )

    def map_to_full(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids (any shape) -> full-vocabulary ids (same shape)."""
        if self.token_map is None:
            return ids
        return self.token_map[ids.to(device=self.token_map.device, dtype=torch.long)]

    def full_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[num_heads, ..., vocab_size]`` logits; tokens outside a reduced
        draft vocabulary get ``-inf`` (as vLLM's ``Medusa.compute_logits``)."""
        logits = self.forward(hidden_states)
        if self.token_map is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), -torch.inf)
        full[..., self.token_map] = logits
        return full

    @torch.no_grad()
    def topk(self, hidden_states: torch.Tensor, k: int, num_heads: int | None = None) -> torch.Tensor:
        """Per-head top-``k`` full-vocabulary token ids, best first.

        Args:
            hidden_states: ``[B, H]`` (or ``[..., H]``).
            k: candidates per head, ``1 <= k <= draft_vocab``.
            num_heads: only the first ``num_heads`` heads (default all).

        Returns:
            ``LongTensor [B, num_heads, k]`` (``[..., num_heads, k]``).
        """
        dv = self.config.draft_vocab_size
        if not 1 <= k <= dv:
            raise ValueError(f"k must be in [1, {dv}] (draft vocabulary), found {k}")
        logits = self.forward(hidden_states, num_heads)  # [K, ..., dv]
        ids = torch.topk(logits, k, dim=-1).indices  # [K, ..., k]
        return self.map_to_full(ids.movedim(0, -2))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_heads={c.num_heads}, num_layers={c.num_layers}, "
            f"hidden_size={c.hidden_size}, vocab_size={c.vocab_size}, "
            f"draft_vocab={c.draft_vocab_size}, original_lm_head={c.original_lm_head}"
        )
