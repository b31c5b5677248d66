"""ESM-2 from fair-esm: finding and loading its checkpoints, and a fast forward pass.

By name, a checkpoint already in ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``) is
used without touching the network; otherwise it is downloaded the way fair-esm does, into that
same directory (torch.hub writes to a temporary file and renames it, so an interrupted
download never leaves a truncated checkpoint behind). The contact-regression file is never
required: embeddings do not use it.

``ESM2Backbone`` runs fair-esm's ESM2 weights through a forward pass of its own that uses
``torch.nn.functional.scaled_dot_product_attention``: fair-esm's attention materialises the
score matrix in (T, B*H) layout with several copies, which made it the bottleneck on CPU. The
result equals fair-esm's ``ESM2.forward`` representations to float32 rounding (a test checks
this); the forward also stops at the highest layer asked for.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..atomic import atomic_path
from .base import Backbone, ModelLoadError, absolute, sha256_of

if TYPE_CHECKING:
    from esm.model.esm2 import ESM2

log = logging.getLogger(__name__)

# name -> (layers, embedding dim, attention heads)
ESM2_MODELS: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}

# sha256 of official files, checked whenever a file of that name is loaded.
KNOWN_SHA256: dict[str, str] = {
    "esm2_t6_8M_UR50D.pt": "46f002a9870c9bdecd0ea887acb1f9a38a6b561e8f8bf8a6990b679b9d31b928",
    "esm2_t6_8M_UR50D-contact-regression.pt": "8f7a4557d57713b97ba0e484303007efb7230d25299c0ac47a0a1b12a87bbb9d",
}

MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # esm.model.esm2.ESM2, in eval mode, on the CPU
    alphabet: object  # esm.data.Alphabet
    name: str  # official name for official files, else the file's stem
    architecture: str  # the official model of the same shape, or "ESM-2 LxDxH"
    source: str  # where the weights came from
    sha256: str


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def verify_checksum(path: Path) -> str:
    """sha256 of ``path``; raises if the file carries an official name but other contents."""
    actual = sha256_of(path)
    expected = KNOWN_SHA256.get(path.name)
    if expected is not None and actual != expected:
        raise ModelLoadError(
            f"{path}: sha256 is {actual}, but the official {path.name} has {expected}. "
            "The file is damaged or incomplete (an interrupted download?); delete it and fetch it again."
        )
    if expected is not None:
        log.info("%s: checksum matches the official file", path)
    return actual


def load_checkpoint(path: Path, trust: bool = False) -> dict:
    """``torch.load`` of a fair-esm checkpoint under torch >= 2.6's ``weights_only`` rules.

    ESM-2 checkpoints hold an ``argparse.Namespace`` in ``cfg['model']``; that one class is
    allow-listed so the safe loader works. Anything else pickled in the file is refused
    unless ``trust`` is set (only for files whose origin you know).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint") from None
        if not trust:
            raise ModelLoadError(
                f"{path}: the checkpoint contains a pickled {found.group(1)}, which the safe loader refuses. "
                "If you trust the file, pass --trust-weights."
            ) from None
        log.warning("%s: loading with weights_only=False because it was marked trusted", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _esm2_name_for(data: dict, path: Path) -> str:
    """Recognise an ESM-2 checkpoint from its contents, whatever the file is called."""
    try:
        cfg = data["cfg"]["model"]
        shape = (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads)
        state = data["model"]
    except (KeyError, TypeError, AttributeError):
        raise ModelLoadError(
            f"{path}: not a fair-esm ESM-2 checkpoint (expected 'model' and 'cfg'['model'] entries)"
        ) from None
    if not any("rot_emb" in key for key in state):
        raise ModelLoadError(f"{path}: checkpoint has no rotary embeddings, so it is not ESM-2")
    if path.stem in ESM2_MODELS and ESM2_MODELS[path.stem] != shape:
        raise ModelLoadError(
            f"{path}: named {path.stem}, but its shape {shape} is not the official {ESM2_MODELS[path.stem]}"
        )
    return architecture_of(shape)


def architecture_of(shape: tuple[int, int, int]) -> str:
    """The official name for a (layers, dim, heads) shape, else a description of it."""
    for name, official in ESM2_MODELS.items():
        if official == tuple(shape):
            return name
    return "ESM-2 {}x{}x{}".format(*shape)


def model_from_checkpoint(data: dict, path: Path) -> tuple[torch.nn.Module, object, str]:
    """Build the ESM2 a checkpoint describes; returns (model, alphabet, architecture)."""
    from esm.pretrained import load_model_and_alphabet_core

    architecture = _esm2_name_for(data, path)
    with warnings.catch_warnings():
        # fair-esm warns that contact prediction needs the regression file; embeddings do not.
        warnings.filterwarnings("ignore", message="Regression weights not found")
        try:
            # The name only has to tell fair-esm which loader to use.
            model, alphabet = load_model_and_alphabet_core("esm2", data, None)
        except RuntimeError as err:
            raise ModelLoadError(f"{path}: weights do not fit an ESM-2 model: {err}") from None
    return model.eval(), alphabet, architecture


def load_esm2(
    model: str | None = None, weights: Path | str | None = None, trust: bool = False
) -> LoadedModel:
    """Load ESM-2 from ``weights`` (a local fair-esm .pt) or by ``model`` name.

    With both, the file is loaded and must match the name's architecture.
    """
    if model is not None and model not in ESM2_MODELS:
        raise ModelLoadError(f"unknown model {model!r}; known ESM-2 models: {', '.join(ESM2_MODELS)}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{path}: weights file not found")
    elif model is not None:
        path = fetch(model)
    else:
        raise ModelLoadError("name a model (--model esm2_t33_650M_UR50D) or a weights file (--weights PATH)")
    digest = verify_checksum(path)
    data = load_checkpoint(path, trust=trust)
    net, alphabet, architecture = model_from_checkpoint(data, path)
    if model is not None and weights is not None and architecture != model:
        raise ModelLoadError(f"{path}: the file holds {architecture}, not {model}")
    name = path.stem
    log.info("loaded %s (%s) from %s", name, architecture, path)
    return LoadedModel(net, alphabet, name, architecture, str(absolute(path)), digest)


def fetch(model: str) -> Path:
    """Path of ``model``'s checkpoint in the torch hub cache, downloading it when absent."""
    if model not in ESM2_MODELS:
        raise ModelLoadError(f"unknown model {model!r}; known ESM-2 models: {', '.join(ESM2_MODELS)}")
    path = hub_checkpoint_dir() / f"{model}.pt"
    if not path.is_file():
        _download(model, path)
    return path


def _download(model: str, path: Path) -> None:
    url = MODEL_URL.format(name=model)
    log.info("%s not in %s; downloading %s", model, path.parent, url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as err:  # urllib, socket and SSL errors all mean the same to the user
        raise ModelLoadError(
            f"{model} is not in the torch hub cache ({path}) and could not be downloaded ({err}). "
            f"Download {url} elsewhere and either put it at {path} (or under $TORCH_HOME/hub/checkpoints) "
            "or pass --weights PATH."
        ) from None


def esm2_state_for_checkpoint(model: torch.nn.Module) -> dict:
    """A fair-esm checkpoint dict (``model`` + ``cfg``) for an in-memory ESM2."""
    state = {
        "encoder.sentence_encoder." + key: value.detach().to("cpu", copy=True)
        for key, value in model.state_dict().items()
        if not key.startswith("contact_head.regression")
    }
    cfg = argparse.Namespace(
        encoder_layers=model.num_layers,
        encoder_embed_dim=model.embed_dim,
        encoder_attention_heads=model.attention_heads,
        token_dropout=model.token_dropout,
    )
    return {"model": state, "cfg": {"model": cfg}}


def save_esm2_checkpoint(model: torch.nn.Module, path: Path | str) -> Path:
    """Save an ESM2 in fair-esm's checkpoint format, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(esm2_state_for_checkpoint(model), tmp)
    return path


def random_esm2(name_or_shape: str | tuple[int, int, int], seed: int = 0) -> torch.nn.Module:
    """An ESM2 with random weights: an official shape by name, or (layers, dim, heads).

    Speed does not depend on weight values, so these measure throughput; their outputs
    mean nothing.
    """
    from esm.model.esm2 import ESM2

    shape = ESM2_MODELS[name_or_shape] if isinstance(name_or_shape, str) else name_or_shape
    layers, dim, heads = shape
    torch.manual_seed(seed)
    model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet="ESM-1b")
    # Default init leaves the LM head tied and layer norms at identity; perturb norms so that
    # tests comparing forward passes exercise every parameter.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def build_tiny_esm2(
    path: Path | str, num_layers: int = 2, embed_dim: int = 32, attention_heads: int = 4, seed: int = 0
) -> Path:
    """Build a tiny ESM-2 with fair-esm's own class and save it as a fair-esm checkpoint.

    Loading it back goes through :func:`load_esm2`, the same path as official weights.
    """
    if embed_dim % attention_heads or (embed_dim // attention_heads) % 2:
        raise ValueError("embed_dim / attention_heads must be an even integer (rotary embeddings)")
    return save_esm2_checkpoint(random_esm2((num_layers, embed_dim, attention_heads), seed), path)


class ESM2Backbone(Backbone):
    """ESM-2 from fair-esm, with a scaled-dot-product-attention forward."""

    family = "esm2"
    extra_tokens = 2  # BOS and EOS
    supports_grad_checkpointing = True
    int8_refusal = None
    model: ESM2

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
    def known_names(cls) -> dict[str, str]:
        return {name: f"fair-esm checkpoint, {layers} layers, dim {dim}"
                for name, (layers, dim, _) in ESM2_MODELS.items()}

    @classmethod
    def claims_file(cls, path: Path, kind: str) -> bool:
        return kind == "torch"

    @classmethod
    def locate(cls, name: str) -> Path | None:
        if name not in ESM2_MODELS:
            return None
        path = hub_checkpoint_dir() / f"{name}.pt"
        return path if path.is_file() else None

    @classmethod
    def official_sha256(cls, name: str) -> str | None:
        return KNOWN_SHA256.get(f"{name}.pt")

    @classmethod
    def load(cls, model: str | None = None, weights=None, trust: bool = False) -> ESM2Backbone:
        loaded = load_esm2(model, weights, trust)
        return cls(loaded.model, loaded.alphabet, loaded.name, loaded.architecture, loaded.source, loaded.sha256)

    def to(self, device) -> ESM2Backbone:
        self.device = torch.device(device)
        self.model.to(self.device)
        self._rotary.clear()
        return self

    def trainable_layers(self) -> list[torch.nn.Module]:
        return list(self.model.layers)

    def top_extras(self) -> list[torch.nn.Module]:
        return [self.model.emb_layer_norm_after]  # ESM-2's last layer ends in this norm

    def frozen_always(self) -> list[torch.nn.Module]:
        model = self.model
        return [m for m in (getattr(model, "lm_head", None), getattr(model, "contact_head", None)) if m is not None]

    def configure_training(self, mode: str, top_layers: int = 2, lora: dict | None = None) -> None:
        super().configure_training(mode, top_layers, lora)
        if mode == "full":
            self.model.embed_tokens.requires_grad_(True)  # tied to lm_head's weight, frozen with it

    def lora_targets(self, feed_forward: bool = False) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "out_proj"] + (["fc1", "fc2"] if feed_forward else [])

    def int8_modules(self) -> list[torch.nn.Module]:
        return list(self.model.layers)  # every matrix product of the forward: attention and feed-forward

    def export(self, path: Path | str) -> Path:
        """A fair-esm checkpoint (LoRA merged), for ``embedcache extract --weights``."""
        return save_esm2_checkpoint(self.merged_module(), path)

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
        wanted = set(layers)
        padding = tokens.eq(model.padding_idx)
        x = model.embed_scale * model.embed_tokens(tokens)
        if model.token_dropout:
            # ESM-2 rescales embeddings by the masking rate seen in training, in inference too.
            masked = tokens.eq(model.mask_idx)
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        out = {0: x} if 0 in wanted else {}
        # SDPA's boolean mask marks the keys a query may attend to.
        attend = (~padding)[:, None, None, :] if padding.any() else None
        top = max(wanted)
        recompute = checkpoint and torch.is_grad_enabled()
        for index, layer in enumerate(model.layers[:top], 1):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(self._layer, layer, x, attend, use_reentrant=False)
            else:
                x = self._layer(layer, x, attend)
            if index in wanted and index != model.num_layers:
                out[index] = x
        if model.num_layers in wanted:
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
