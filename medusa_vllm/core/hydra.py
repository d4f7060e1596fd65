"""Hydra heads: sequentially dependent draft heads (Ankner et al. 2024, arXiv 2402.05109).

A Medusa head ``k`` predicts the token at offset ``k + 2`` from the backbone's last
hidden state ``h`` alone. A Hydra head ``k`` also reads the tokens on its tree path
from the root: the token the backbone just produced (offset ``+1``, the tree's root)
and the ``k`` drafts above the node (offsets ``+2 .. +k+1``). So each child in the
tree is predicted from its own parent instead of from ``h`` alone::

    e_j = E[path_j]                                  # j = 0 .. k (root first)
    x   = h + SiLU(W_k [n(h); n(e_0); ...; n(e_k)] + b_k)   # W_k: [H, (k+2) H]
    for each of the head's num_layers - 1 ResBlocks:  x = x + SiLU(W x + b)
    logits_k = U_k x                                 # U_k: Linear(H, draft_vocab)

``n`` is a parameter-free RMS normalisation (the backbone's embeddings and its last
hidden state live on very different scales). ``E`` is the backbone's input
embedding restricted to the draft vocabulary, plus one zero row for tokens outside
it (only the root can be: drafts are always draft-vocabulary tokens); it is kept
frozen. A fresh :class:`HydraHeads` zero-initialises every ``W``/``b``, so with the
LM layers initialised from the backbone each head starts as the backbone's
next-token predictor (as a fresh :class:`~medusa_vllm.core.heads.MedusaHeads` does).

Size for SmolLM2-135M (H 576, vocabulary 49,152, 4 heads, 4,096-token draft
vocabulary, one block per head): path layers 14 H^2, LM layers 4 x 4,096 x H,
embedding 4,097 x H: 16.4 M parameters, 33 MB in bfloat16.

Training (teacher forcing): head ``k`` at position ``t`` reads ``input_ids[t+1 ..
t+k+1]`` (:func:`teacher_forced_paths`) and predicts ``labels[t+k+2]``.
Drafting a tree runs one head evaluation per node of the previous depth
(:func:`medusa_vllm.engine.hydra_draft.draft_tree`). Checkpoint I/O lives in
:mod:`medusa_vllm.checkpoints` (``config.json`` ``"head_type": "hydra"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medusa_vllm.core.dict_fields import DictFields
from medusa_vllm.core.heads import (
    ResidualBlock,
    strip_vocab_padding,
    token_map_problem,
    truncate_lm_head,
)

__all__ = ["HEAD_TYPE", "HydraBlock", "HydraHeads", "HydraHeadsConfig", "teacher_forced_paths"]

HEAD_TYPE = "hydra"


@dataclass
class HydraHeadsConfig(DictFields):
    """Shape and options of a set of Hydra heads.

    Fields:
        hidden_size: backbone hidden size ``H`` (also the embedding width).
        vocab_size: backbone (full) vocabulary size ``V``.
        num_heads: number of heads ``K`` (head ``k`` predicts offset ``k + 2``).
        num_layers: blocks per head (``>= 1``): the path block, then
            ``num_layers - 1`` ResBlocks.
        truncated_vocab_size: reduced draft vocabulary size, or ``None`` (full).
        resblock_bias: whether the blocks' linears have a bias.
        base_model_name_or_path: the backbone these heads were trained for.

    Hydra heads always have one LM layer per head (:attr:`original_lm_head` is
    ``False``). :meth:`to_dict` / :meth:`from_dict` give and read the JSON form.
    """

    head_type: ClassVar[str] = HEAD_TYPE

    hidden_size: int
    vocab_size: int
    num_heads: int
    num_layers: int = 1
    truncated_vocab_size: int | None = None
    resblock_bias: bool = True
    base_model_name_or_path: str | None = None

    @property
    def original_lm_head(self) -> bool:
        """Always ``False``: every Hydra head has its own LM layer."""
        return False

    @property
    def draft_vocab_size(self) -> int:
        """Number of logits each head produces (reduced or full vocabulary)."""
        return self.vocab_size if self.truncated_vocab_size is None else self.truncated_vocab_size

    def validate(self) -> HydraHeadsConfig:
        """Raise ``ValueError`` naming the bad field; return ``self`` if valid."""
        for name, minimum in (("hidden_size", 1), ("vocab_size", 1), ("num_heads", 1),
                              ("num_layers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"HydraHeadsConfig.{name} must be an integer >= {minimum}, found {value!r}")
        tv = self.truncated_vocab_size
        if tv is not None and (isinstance(tv, bool) or not isinstance(tv, int)
                               or not 1 <= tv < self.vocab_size):
            raise ValueError(
                f"HydraHeadsConfig.truncated_vocab_size must be an integer in [1, vocab_size="
                f"{self.vocab_size}) or None for the full vocabulary, found {tv!r}")
        if not isinstance(self.resblock_bias, bool):
            raise ValueError(  # noqa: TRY004 - validate() raises ValueError for every field
                f"HydraHeadsConfig.resblock_bias must be true or false, found {self.resblock_bias!r}")
        base = self.base_model_name_or_path
        if base is not None and not isinstance(base, str):
            raise ValueError(
                f"HydraHeadsConfig.base_model_name_or_path must be a string or None, found {base!r}")
        return self

    @classmethod
    def from_known_fields(cls, data: Mapping[str, Any]) -> HydraHeadsConfig:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"HydraHeadsConfig: missing required field(s) {missing}")
        return cls(**data).validate()


def teacher_forced_paths(input_ids: torch.Tensor, head: int, pad: int = 0) -> torch.Tensor:
    """Ground-truth path tokens of head ``head`` at every position.

    ``input_ids [..., T]`` -> ``[..., T, head + 1]`` with ``out[..., t, j] =
    input_ids[..., t + 1 + j]`` (the root at offset ``+1``, then the drafts above the
    node), ``pad`` past the end of the row (those positions have no target).
    """
    if head < 0:
        raise ValueError(f"head must be >= 0, found {head}")
    t = input_ids.shape[-1]
    padded = torch.cat([input_ids, input_ids.new_full((*input_ids.shape[:-1], head + 1), pad)], -1)
    return torch.stack([padded[..., 1 + j: 1 + j + t] for j in range(head + 1)], dim=-1)


class HydraBlock(nn.Module):
    """One Hydra head's body: the path block ``x = h + SiLU(W [n(h); n(e_0..e_k)] + b)``
    (``path``: Linear((k+2) H -> H)) and ``num_layers - 1`` ResBlocks (``res``)."""

    def __init__(self, hidden_size: int, path_len: int, num_layers: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.path_len = path_len
        self.path = nn.Linear((path_len + 1) * hidden_size, hidden_size, bias=bias,
                              device=device, dtype=dtype)
        self.res = ResidualBlock(hidden_size, num_layers - 1, bias, device=device, dtype=dtype)
        with torch.no_grad():
            self.path.weight.zero_()
            if self.path.bias is not None:
                self.path.bias.zero_()

    def forward(self, hidden: torch.Tensor, path_embeds: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H]``, ``path_embeds [..., path_len, H]`` -> ``[..., H]``."""
        h = hidden.shape[-1]
        feats = torch.cat([hidden.unsqueeze(-2), path_embeds], dim=-2)
        feats = F.rms_norm(feats, (h,), eps=1e-6).flatten(-2)
        return self.res(hidden + F.silu(self.path(feats)))


class HydraHeads(nn.Module):
    """``num_heads`` Hydra heads.

    Parameters (state-dict names): ``blocks.{k}.path.weight`` ``[H, (k+2) H]`` (and
    ``.bias``), ``blocks.{k}.res.layers.{j}.weight|bias`` ``[H, H]``,
    ``lm_heads.{k}.weight`` ``[draft_vocab, H]``, ``embed.weight`` ``[draft_vocab + 1,
    H]`` (row ``draft_vocab``: tokens outside the draft vocabulary), buffer
    ``token_map`` ``LongTensor [draft_vocab]`` (reduced vocabulary only).

    Args:
        config: the heads' shape; validated here.
        token_map: draft id -> full vocab id; required iff ``truncated_vocab_size``.
        lm_head_weight: backbone ``lm_head`` weight to initialise the LM layers from.
        embed_weight: backbone input embedding ``[V, H]`` to initialise ``embed`` from.
        device, dtype: where and in which dtype to create the parameters.
    """

    token_map: torch.Tensor | None

    def __init__(self, config: HydraHeadsConfig, *, token_map: torch.Tensor | None = None,
                 lm_head_weight: torch.Tensor | None = None,
                 embed_weight: torch.Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        config.validate()
        self.config = config
        h, dv = config.hidden_size, config.draft_vocab_size
        self.blocks = nn.ModuleList(
            HydraBlock(h, k + 1, config.num_layers, config.resblock_bias, device=device,
                       dtype=dtype)
            for k in range(config.num_heads))
        self.lm_heads = nn.ModuleList(
            nn.Linear(h, dv, bias=False, device=device, dtype=dtype)
            for _ in range(config.num_heads))
        self.embed = nn.Embedding(dv + 1, h, device=device, dtype=dtype)
        with torch.no_grad():
            self.embed.weight.zero_()
        self.embed.weight.requires_grad_(False)
        if config.truncated_vocab_size is None:
            if token_map is not None:
                raise ValueError(
                    "token_map was given but config.truncated_vocab_size is None (full "
                    "vocabulary); set truncated_vocab_size=len(token_map)")
            self.register_buffer("token_map", None)
        else:
            if token_map is None:
                raise ValueError(
                    f"config.truncated_vocab_size={dv} needs a token_map (LongTensor [{dv}], "
                    f"draft id -> full vocab id); build one with token_map_from_counts")
            token_map = torch.as_tensor(token_map)
            problem = token_map_problem(token_map, dv, config.vocab_size)
            if problem:
                raise ValueError(f"token_map: {problem}")
            self.register_buffer("token_map", token_map.to(device=device, dtype=torch.long).clone())
        self._inverse: torch.Tensor | None = None
        if lm_head_weight is not None:
            self.init_lm_head_from(lm_head_weight)
        if embed_weight is not None:
            self.init_embed_from(embed_weight)

    # ----------------------------------------------------------- initialising
    def _reduced(self, weight: torch.Tensor, what: str) -> torch.Tensor:
        cfg = self.config
        weight = strip_vocab_padding(weight.detach(), cfg.vocab_size)
        if weight.dim() == 2 and weight.shape[1] == cfg.hidden_size:
            if weight.shape[0] == cfg.draft_vocab_size:
                return weight
            if weight.shape[0] == cfg.vocab_size and self.token_map is not None:
                return truncate_lm_head(weight, self.token_map)
        raise ValueError(
            f"{what} must have shape [{cfg.vocab_size}, {cfg.hidden_size}] (vocab_size, "
            f"hidden_size), found {list(weight.shape)}")

    @torch.no_grad()
    def init_lm_head_from(self, weight: torch.Tensor) -> None:
        """Copy the backbone's ``lm_head`` weight (sliced to the draft vocabulary)
        into every head's LM layer (trainable)."""
        reduced = self._reduced(weight, "lm_head weight")
        for layer in self.lm_heads:
            layer.weight.copy_(reduced.to(layer.weight.device, layer.weight.dtype))

    @torch.no_grad()
    def init_embed_from(self, weight: torch.Tensor) -> None:
        """Copy the backbone's input embedding (sliced to the draft vocabulary) into
        ``embed``; the out-of-vocabulary row stays zero."""
        reduced = self._reduced(weight, "embedding weight")
        w = self.embed.weight
        w[:-1].copy_(reduced.to(w.device, w.dtype))
        w[-1].zero_()

    # ----------------------------------------------------------------- running
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_heads[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_heads[0].weight.device

    @property
    def lm_layers(self) -> list[nn.Linear]:
        """Each head's LM layer."""
        return list(self.lm_heads)  # type: ignore[arg-type]

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids -> rows of ``embed`` (``draft_vocab`` for ids outside
        the draft vocabulary)."""
        ids = ids.to(device=self.embed.weight.device, dtype=torch.long)
        if self.token_map is None:
            return ids
        inv = self._inverse
        if inv is None or inv.device != self.token_map.device:
            dv = self.config.draft_vocab_size
            inv = torch.full((self.config.vocab_size,), dv, dtype=torch.long,
                             device=self.token_map.device)
            inv[self.token_map] = torch.arange(dv, device=inv.device)
            self._inverse = inv
        return inv[ids]

    def head_logits(self, head: int, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Logits of head ``head`` alone.

        Args:
            hidden: ``[..., H]`` backbone hidden states (cast to the heads' dtype).
            path: ``[..., head + 1]`` full-vocabulary path tokens, root first.

        Returns:
            ``[..., draft_vocab]`` logits (map ids with :meth:`map_to_full`).
        """
        cfg = self.config
        if not 0 <= head < cfg.num_heads:
            raise ValueError(f"head must be in [0, {cfg.num_heads}), found {head}")
        if hidden.shape[-1] != cfg.hidden_size:
            raise ValueError(f"hidden must end with hidden_size={cfg.hidden_size}, found shape "
                             f"{list(hidden.shape)}")
        if path.shape[-1] != head + 1 or path.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(
                f"head {head} reads {head + 1} path token(s) (root + {head} draft(s)) per "
                f"hidden state: path must be [{', '.join(map(str, hidden.shape[:-1]))}, "
                f"{head + 1}], found {list(path.shape)}")
        x = hidden.to(self.dtype)
        feats = self.blocks[head](x, self.embed(self.embed_rows(path)))
        return self.lm_heads[head](feats)

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor,
                num_heads: int | None = None) -> torch.Tensor:
        """Teacher-forced logits of every head: ``hidden_states [..., T, H]`` and the
        row's ``input_ids [..., T]`` -> ``[num_heads, ..., T, draft_vocab]`` (head ``k``
        at ``t`` reads ``input_ids[t+1 .. t+k+1]``; rows past the end read padding)."""
        k = self.config.num_heads if num_heads is None else num_heads
        if not 1 <= k <= self.config.num_heads:
            raise ValueError(f"num_heads must be in [1, {self.config.num_heads}], found {num_heads}")
        return torch.stack([self.head_logits(j, hidden_states, teacher_forced_paths(input_ids, j))
                            for j in range(k)], dim=0)

    def map_to_full(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary ids (any shape) -> full-vocabulary ids (same shape)."""
        if self.token_map is None:
            return ids
        return self.token_map[ids.to(device=self.token_map.device, dtype=torch.long)]

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): the inverse map is rebuilt
        self._inverse = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (f"head_type=hydra, num_heads={c.num_heads}, num_layers={c.num_layers}, "
                f"hidden_size={c.hidden_size}, vocab_size={c.vocab_size}, "
                f"draft_vocab={c.draft_vocab_size}")
