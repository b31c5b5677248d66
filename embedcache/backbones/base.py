"""What every backbone family provides, and the one place where files are recognised.

A backbone hides tokenisation and special tokens: what it returns is aligned to residues, so
the extraction loop, the cache, fine-tuning and the heads never see BOS/EOS, start states
or padding. A family (one module of this package) says which names and which files it
loads; a file is recognised by what it holds, never by its name or suffix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from .int8 import Int8Linears, Int8Weights, int8_kernel_problem

# int8: CPU inference only, never chosen by auto (see embedcache/backbones/int8.py).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
TRAINING_MODES = ("full", "top", "lora", "frozen")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
_INT8_TRAINING = "int8 is for extraction (inference) only; training runs in fp32 or bf16"

# The two protocol-2 opcodes and the magic number torch's legacy (pre-zip) format starts with.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded, verified or understood."""


def sha256_of(path: Path | str, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_kind(path: Path) -> str:
    """What ``path`` holds, from its contents.

    ``torch`` (a zip with a data.pkl member, or torch's legacy pickle), ``npz`` (a zip of .npy
    members), ``hf-dir`` (a directory whose config.json names a model_type; see
    :func:`hf_model_type`), ``directory``, ``safetensors``, ``text`` or ``unknown``.
    """
    if path.is_dir():
        return "hf-dir" if hf_model_type(path) is not None else "directory"
    if not path.is_file():
        return "special"  # a FIFO or device: reading it could block or never end
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head:
        return "empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "unknown"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text"


def hf_model_type(directory: Path) -> str | None:
    """The ``model_type`` in a Hugging Face model directory's config.json, else None."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def pick_precision(requested: str, device: torch.device | str, training: bool = False) -> str:
    """The compute precision for ``requested`` (``auto`` or one of PRECISIONS) on ``device``.

    auto: bf16 on GPUs that have it; otherwise fp16 for inference on GPU (autocast keeps
    fp16 training prone to overflow, so training stays fp32), fp32 on CPU, where bf16 is not
    faster on every processor. auto never picks int8: it changes the embeddings more than
    bf16 does, so it is only used when asked for.
    """
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {PRECISIONS}, not {requested!r}")
        if requested == "int8" and training:
            raise ValueError(_INT8_TRAINING)
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32" if training else "fp16"
    return "fp32"


class Backbone(ABC):
    """What extraction and fine-tuning need from a model. Subclasses set these in ``__init__``."""

    family: str = ""  # registry key: esm2 (fair-esm) | unirep | hf-esm2 (Hugging Face ESM-2)
    name: str  # the weights' name (official name, hub id, or the file's stem)
    architecture: str  # the model family and size
    source: str  # where the weights were loaded from (an absolute path for files)
    sha256: str  # of the weights file (for a Hugging Face directory: its model.safetensors)
    num_layers: int
    embed_dim: int
    max_residues: int | None  # the longest window the model was trained on; None if unbounded
    extra_tokens: int  # tokens a sequence costs beyond its residues (BOS/EOS)
    model: torch.nn.Module  # the network (``module``)
    # States ``embed`` returns before the residues that belong in the pooled mean but not in
    # the per-residue array (UniRep's start step); 0 for ESM-2, whose BOS is dropped.
    leading_states: int = 0
    # Whether overlapping windows of a long protein can be stitched into one (--long chunk):
    # only for models whose window states depend on the window alone and have no leading states.
    supports_chunking: bool = True
    pooling: str = "mean over residues"  # how the pooled vector is defined; recorded in the cache
    supports_grad_checkpointing: bool = False  # residue_states(checkpoint=True) recomputes activations
    # Why --precision int8 is refused for this family; None where it runs (see int8_weights).
    int8_refusal: str | None = "its layers are not torch.nn.Linear projections"
    budget = {"cpu": 1024, "cuda": 4096}  # default padded tokens per forward pass
    train_budget = 4096  # default padded tokens per training batch (fine-tuning)

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.training_mode = "frozen"
        self._int8: Int8Weights | None = None  # int8 copies of the weight matrices while precision is int8

    # -- loading (used by the registry) --------------------------------------------------
    @classmethod
    def known_names(cls) -> dict[str, str]:
        """Names this family loads, each with a short description."""
        return {}

    @classmethod
    def claims_name(cls, name: str) -> bool:
        return name in cls.known_names()

    @classmethod
    def claims_file(cls, path: Path, kind: str) -> bool:
        """Whether ``path`` (of :func:`file_kind` ``kind``) holds this family's weights."""
        return False

    @classmethod
    def locate(cls, name: str) -> Path | None:
        """The local weights of ``name`` when present (no download), else None."""
        return None

    @classmethod
    def weights_file(cls, path: Path) -> Path:
        """The file whose sha256 identifies the weights at ``path``."""
        return path

    @classmethod
    def digest(cls, path: Path) -> str:
        """sha256 identifying everything at ``path`` that decides the model's outputs.

        A family whose model is more than one file (weights, configuration, vocabulary)
        covers them all, so that no part can change under the same identity.
        """
        return sha256_of(cls.weights_file(path))

    @classmethod
    def official_sha256(cls, name: str) -> str | None:
        """The known sha256 of the official weights called ``name``, if known."""
        return None

    @classmethod
    @abstractmethod
    def load(cls, model: str | None = None, weights: Path | str | None = None, trust: bool = False) -> Backbone: ...

    # -- the network -----------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The trainable network."""
        return self.model

    @abstractmethod
    def embed(self, sequences: Sequence[str], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: (B, leading_states + max_len, D)}; row i, position leading_states + j is residue j.

        Positions past a sequence's own states are padding and carry no meaning.
        """

    @abstractmethod
    def residue_states(self, sequences: Sequence[str], checkpoint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer states (B, max_len, D) aligned to residues and a (B, max_len) residue mask.

        Runs with autograd (under the caller's autocast): this is the fine-tuning forward.
        """

    def to(self, device: torch.device | str) -> Backbone:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def set_precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if precision == "fp16" and self.device.type == "cpu":
            # fp16 matmuls run ~400x slower than fp32 on CPUs without native support.
            raise ValueError("fp16 compute is for GPUs; on CPU use bf16 or fp32")
        if precision == "int8":
            if self.device.type != "cpu":
                raise ValueError(f"int8 compute is for CPUs; on {self.device.type.upper()} use bf16 or fp16, "
                                 "which are faster there and change the embeddings less")
            if self.training_mode != "frozen":
                raise ValueError(_INT8_TRAINING)
            if self.int8_refusal is not None:
                raise ValueError(f"int8 is not available for {self.architecture} ({self.family}): "
                                 f"{self.int8_refusal}; use fp32 or bf16")
            problem = int8_kernel_problem()
            if problem is not None:
                raise ValueError(f"int8 is refused: {problem}; use fp32 or bf16")
            self._int8 = self.int8_weights()
        else:
            self._int8 = None
        self.precision = precision

    def int8_weights(self) -> Int8Weights:
        """int8 copies of the network's weight matrices; their ``active()`` runs ``embed`` with them.

        By default every ``torch.nn.Linear`` under :meth:`int8_modules`.
        """
        linears = Int8Linears(self.int8_modules())
        if not len(linears):
            raise ValueError(f"int8 is not available for {self.architecture}: no Linear layers found")
        return linears

    def int8_modules(self) -> list[torch.nn.Module]:
        """The modules whose ``torch.nn.Linear`` layers run in int8 (families with ``int8_refusal`` None)."""
        raise NotImplementedError

    def pick_precision(self, requested: str, device: torch.device | str, training: bool = False) -> str:
        return pick_precision(requested, device, training)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where ``embed`` runs: autocast to bf16/fp16, the int8 Linear layers swapped in, or nothing."""
        if self.precision == "int8":
            if self._int8 is None or self.device.type != "cpu":
                raise ValueError("int8 compute is for CPUs; set the precision again after moving the model")
            return self._int8.active()
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
                    f"layer {layer} out of range for {self.architecture} "
                    f"(0..{self.num_layers}, or negative from the end)"
                )
            resolved.append(absolute)
        return sorted(set(resolved))

    # -- training ----------------------------------------------------------------------------
    def trainable_layers(self) -> list[torch.nn.Module]:
        """The stacked layers, bottom to top, for mode ``top``."""
        raise NotImplementedError

    def top_extras(self) -> list[torch.nn.Module]:
        """Modules after the last layer that belong to it in mode ``top`` (a final norm)."""
        return []

    def frozen_always(self) -> list[torch.nn.Module]:
        """Parts of the network classification never uses (language-model and contact heads)."""
        return []

    def lora_targets(self, feed_forward: bool = False) -> list[str] | str | None:
        """peft ``target_modules`` for LoRA; None where the family has no linear projections."""
        return None

    def configure_training(self, mode: str, top_layers: int = 2, lora: dict | None = None) -> None:
        """Set what fine-tuning trains: ``full``, ``top`` (the top ``top_layers`` layers and the
        final norm), ``lora`` (peft adapters on :meth:`lora_targets`; base weights frozen) or
        ``frozen``.

        ``lora``: {"rank": 8, "alpha": 16, "dropout": 0.05, "feed_forward": False}. LoRA's
        adapters are drawn from torch's global generator: seed it first for reproducible fits.
        """
        if mode not in TRAINING_MODES:
            raise ValueError(f"training mode must be one of {TRAINING_MODES}, not {mode!r}")
        if self.precision == "int8" and mode != "frozen":
            raise ValueError(_INT8_TRAINING)
        module = self.module
        module.requires_grad_(mode == "full")
        if mode == "top":
            layers = self.trainable_layers()
            k = min(max(top_layers, 0), len(layers))
            for layer in layers[len(layers) - k:]:
                layer.requires_grad_(True)
            for extra in self.top_extras():
                extra.requires_grad_(True)
        elif mode == "lora":
            lora = dict(lora or {})
            targets = self.lora_targets(bool(lora.get("feed_forward", False)))
            if targets is None:
                raise ValueError(f"LoRA adapts linear projections, which {self.architecture} has none of; "
                                 "use mode full, top or frozen")
            import peft

            config = peft.LoraConfig(r=lora.get("rank", 8), lora_alpha=lora.get("alpha", 16),
                                     lora_dropout=lora.get("dropout", 0.05), target_modules=targets, bias="none")
            # Wraps the projections in place; the wrapper keeps merge_and_unload for export.
            self._peft = peft.get_peft_model(module, config)
        for unused in self.frozen_always():
            unused.requires_grad_(False)
        self.training_mode = mode

    def merged_module(self) -> torch.nn.Module:
        """The network with any LoRA adapters merged into its weights (a copy when merging)."""
        peft_model = getattr(self, "_peft", None)
        if peft_model is None:
            return self.module
        import copy

        # Merging rewrites the wrapped projections in place; the copy keeps this model intact.
        return copy.deepcopy(peft_model).merge_and_unload()

    @abstractmethod
    def export(self, path: Path | str) -> Path:
        """Write the (possibly fine-tuned, LoRA merged) weights in the family's own format."""

    # -- provenance ------------------------------------------------------------------------
    def identity(self) -> dict:
        """What decides the embeddings, independent of where the weights were found."""
        return {
            "family": self.family,
            "architecture": self.architecture,
            "weights_sha256": self.sha256,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "pooling": self.pooling,
        }

    def describe(self) -> dict:
        return {
            "model": self.name,
            "family": self.family,
            "architecture": self.architecture,
            "weights": self.source,
            "weights_sha256": self.sha256,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "max_residues": self.max_residues,
            "pooling": self.pooling,
        }


def absolute(path: Path | str) -> Path:
    """``path`` made absolute with links resolved, as provenance records it."""
    return Path(path).expanduser().resolve()
