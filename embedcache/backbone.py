"""Backbones turn a batch of sequences into per-residue representations.

A backbone hides tokenisation and special tokens: what it returns is aligned to residues,
so the extraction loop, the cache and the heads never see BOS/EOS or padding.

``ESM2Backbone`` runs fair-esm's ESM2 weights through a forward pass of its own that uses
``torch.nn.functional.scaled_dot_product_attention``: fair-esm's attention materialises the
score matrix in (T, B*H) layout with several copies, which made it the bottleneck on CPU. The
result equals fair-esm's ``ESM2.forward`` representations to float32 rounding (a test checks
this); the forward also stops at the highest layer asked for.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backbone(ABC):
    """What extraction needs from a model. Subclasses set these in ``__init__``."""

    name: str  # the weights' name (file stem for local files)
    architecture: str  # the model family and size
    source: str  # where the weights were loaded from
    sha256: str
    num_layers: int
    embed_dim: int
    max_residues: int | None  # the longest window the model was trained on; None if unbounded
    extra_tokens: int  # tokens a sequence costs beyond its residues (BOS/EOS)
    # States ``embed`` returns before the residues that belong in the pooled mean but not in
    # the per-residue array (UniRep's start step); 0 for ESM-2, whose BOS is dropped.
    leading_states: int = 0
    budget = {"cpu": 1024, "cuda": 4096}  # default padded tokens per forward pass
    train_budget = 4096  # default padded tokens per training batch (fine-tuning)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.precision = "fp32"

    @abstractmethod
    def embed(self, sequences: Sequence[str], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: (B, leading_states + max_len, D)}; row i, position leading_states + j is residue j.

        Positions past a sequence's own states are padding and carry no meaning.
        """

    @abstractmethod
    def to(self, device: torch.device | str) -> Backbone: ...

    def set_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if precision == "fp16" and self.device.type == "cpu":
            # fp16 matmuls run ~400x slower than fp32 on CPUs without native support.
            raise ValueError("fp16 compute is for GPUs; on CPU use bf16 or fp32")
        self.precision = precision

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        """Layer numbers as stored: 0 is the embedding, ``num_layers`` the last; -1 means last."""
        if not layers:
            return [self.num_layers]
        resolved = []
        for layer in layers:
            absolute = layer + self.num_layers + 1 if layer < 0 else layer
            if not 0 <= absolute <= self.num_layers:
                raise ValueError(
                    f"layer {layer} out of range for {self.architecture} (0..{self.num_layers}, or negative from the end)"
                )
            resolved.append(absolute)
        return sorted(set(resolved))

    def describe(self) -> dict:
        return {
            "model": self.name,
            "architecture": self.architecture,
            "weights": self.source,
            "weights_sha256": self.sha256,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "max_residues": self.max_residues,
        }


class ESM2Backbone(Backbone):
    """ESM-2 from fair-esm, with a scaled-dot-product-attention forward."""

    extra_tokens = 2  # BOS and EOS

    def __init__(self, model, alphabet, name: str, architecture: str, source: str = "", sha256: str = ""):
        super().__init__()
        self.model = model.eval()
        self.alphabet = alphabet
        self.name = name
        self.architecture = architecture
        self.source = source
        self.sha256 = sha256
        self.num_layers = model.num_layers
        self.embed_dim = model.embed_dim
        self.max_residues = 1022  # 1024 positions in training, less BOS and EOS
        lut = np.full(256, alphabet.unk_idx, dtype=np.int64)
        for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            lut[ord(letter)] = alphabet.get_idx(letter)  # J is not in the vocabulary -> <unk>
        self._lut = lut
        self._rotary: dict = {}

    @classmethod
    def load(cls, model: str | None = None, weights=None, trust: bool = False) -> ESM2Backbone:
        from .models import load_esm2

        loaded = load_esm2(model, weights, trust)
        return cls(loaded.model, loaded.alphabet, loaded.name, loaded.architecture, loaded.source, loaded.sha256)

    def to(self, device) -> ESM2Backbone:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._rotary.clear()
        return self

    def tokenize(self, sequences: Sequence[str]) -> torch.Tensor:
        """(B, max_len + 2) tokens: BOS, residues, EOS, then padding, as fair-esm builds them."""
        longest = max(len(s) for s in sequences)
        tokens = np.full((len(sequences), longest + 2), self.alphabet.padding_idx, dtype=np.int64)
        tokens[:, 0] = self.alphabet.cls_idx
        for row, seq in enumerate(sequences):
            tokens[row, 1 : len(seq) + 1] = self._lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
            tokens[row, len(seq) + 1] = self.alphabet.eos_idx
        return torch.from_numpy(tokens)

    def embed(self, sequences, layers):
        tokens = self.tokenize(sequences).to(self.device, non_blocking=True)
        with self.autocast():
            reps = self.forward(tokens, layers)
        return {layer: rep[:, 1:-1] for layer, rep in reps.items()}

    def forward(self, tokens: torch.Tensor, layers: Sequence[int], checkpoint: bool = False) -> dict[int, torch.Tensor]:
        """Representations {layer: (B, T, D)} over all tokens, as ``ESM2.forward`` returns them.

        With ``checkpoint`` and gradients on, each layer's activations are recomputed in the
        backward pass instead of kept (fine-tuning long proteins in less memory).
        """
        model = self.model
        layers = set(layers)
        padding = tokens.eq(model.padding_idx)
        x = model.embed_scale * model.embed_tokens(tokens)
        if model.token_dropout:
            # ESM-2 rescales embeddings by the masking rate seen in training, in inference too.
            masked = tokens.eq(model.mask_idx)
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        out = {0: x} if 0 in layers else {}
        # SDPA's boolean mask marks the keys a query may attend to.
        attend = (~padding)[:, None, None, :] if padding.any() else None
        top = max(layers)
        recompute = checkpoint and torch.is_grad_enabled()
        for index, layer in enumerate(model.layers[:top], 1):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(self._layer, layer, x, attend, use_reentrant=False)
            else:
                x = self._layer(layer, x, attend)
            if index in layers and index != model.num_layers:
                out[index] = x
        if model.num_layers in layers:
            out[model.num_layers] = model.emb_layer_norm_after(x)
        return out

    def residue_states(self, sequences: Sequence[str], checkpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer states (B, max_len, D) aligned to residues and a (B, max_len) residue mask.

        Runs with autograd (under the caller's autocast): this is the fine-tuning forward.
        """
        tokens = self.tokenize(sequences).to(self.device, non_blocking=True)
        states = self.forward(tokens, [self.num_layers], checkpoint)[self.num_layers][:, 1:-1]
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        mask = torch.arange(states.shape[1], device=self.device)[None, :] < lengths[:, None]
        return states, mask

    def _rotary_tables(self, length: int, attn, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (length, dtype, id(attn.rot_emb))
        if key not in self._rotary:
            inv_freq = attn.rot_emb.inv_freq
            t = torch.arange(length, device=inv_freq.device, dtype=inv_freq.dtype)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rotary[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rotary[key]

    def _layer(self, layer, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        attn = layer.self_attn
        batch, length, dim = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        h = layer.self_attn_layer_norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, heads, head_dim).transpose(1, 2)

        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        cos, sin = self._rotary_tables(length, attn, q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled():
            # In training, CPU's bf16 flash-attention backward is ~1.6x slower than the fp32 one
            # (autocast would cast the inputs back to bf16, hence off).
            with torch.autocast("cpu", enabled=False):
                o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attend,
                                                   scale=1 / math.sqrt(head_dim)).to(q.dtype)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=1 / math.sqrt(head_dim))
        x = x + attn.out_proj(o.transpose(1, 2).reshape(batch, length, dim))
        return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
