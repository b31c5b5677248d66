"""ESM-2 in Hugging Face format: transformers' ``EsmModel``.

The same network as fair-esm's ESM-2 under other parameter names: a directory holding
``config.json`` (``model_type`` "esm", rotary positions) and ``model.safetensors``, or a hub
id such as ``facebook/esm2_t6_8M_UR50D``. By hub id, a snapshot already in the Hugging Face
cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``) is used
without touching the network; otherwise it is downloaded there by ``huggingface_hub``. The
weights' identity is the sha256 of ``model.safetensors``; safetensors hold no pickles.

Embeddings equal those of the fair-esm path on the same weights (:func:`esm2_to_hf` converts;
a test holds them to 1e-5 in fp32): BOS/EOS are added and dropped the same way, the last
layer carries the final layer norm, and padding is masked out of attention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from safetensors import SafetensorError

from ..atomic import atomic_path, write_text
from .base import Backbone, ModelLoadError, absolute, hf_model_type, sha256_of
from .esm2 import ESM2_MODELS, architecture_of

if TYPE_CHECKING:
    from esm.model.esm2 import ESM2
    from transformers import EsmModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
# Parts of EsmModel that embeddings never use: a checkpoint without them is complete.
_OPTIONAL_MODULES = ("contact_head", "pooler")
# ESM-2's vocabulary in token-id order (fair-esm's "ESM-1b" alphabet; the hub's vocab.txt).
ESM2_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
              "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]
HUB_MODELS = {f"facebook/{name}": name for name in ESM2_MODELS}
# sha256 of official model.safetensors files, checked whenever a hub id of that name is loaded.
KNOWN_SHA256 = {
    "facebook/esm2_t6_8M_UR50D": "24c5fa474c48f3b754b86efe752d5f189d2bcd88190fa2270fc92b2ef3034189",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILES = ["config.json", WEIGHTS_FILE, "vocab.txt", "special_tokens_map.json", "tokenizer_config.json"]


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models, read from the environment at each call."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cached_snapshot(hub_id: str) -> Path | None:
    """The cached snapshot directory of ``hub_id``'s main revision, if config and weights are there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json", cache_dir=str(hub_cache_dir()))
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def _offline() -> bool:
    from huggingface_hub import constants

    # Read at each call: huggingface_hub reads the variable once, when first imported.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    if _offline():
        raise ModelLoadError(
            f"{hub_id} is not in the Hugging Face cache ({hub_cache_dir()}), and HF_HUB_OFFLINE forbids downloading "
            "it. Download it where there is network (it lands in $HF_HOME/hub), or pass --weights DIRECTORY holding "
            "config.json and model.safetensors."
        )
    log.info("%s not in the Hugging Face cache %s; downloading it", hub_id, hub_cache_dir())
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=str(hub_cache_dir()), allow_patterns=_FILES))
    except Exception as err:  # offline, unknown repository, gated, network: all mean the same here
        raise ModelLoadError(
            f"{hub_id} is not in the Hugging Face cache ({hub_cache_dir()}) and could not be downloaded "
            f"({err.__class__.__name__}: {err}). Download it where there is network (it lands in $HF_HOME/hub), "
            "or pass --weights DIRECTORY holding config.json and model.safetensors."
        ) from None
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{hub_id}: the repository has no {WEIGHTS_FILE}")
    return folder


def _hub_id_of(directory: Path) -> str | None:
    """``org/name`` for a snapshot directory of the Hugging Face cache layout."""
    parts = directory.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/", 1)
    return None


def _read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{directory / 'config.json'}: not readable JSON ({err})") from None
    if config.get("model_type") != "esm":
        raise ModelLoadError(f"{directory}: config.json has model_type {config.get('model_type')!r}, not 'esm'")
    if config.get("position_embedding_type") != "rotary" or config.get("is_folding_model"):
        raise ModelLoadError(
            f"{directory}: an ESM model, but not ESM-2 (ESM-2 has rotary positions and no folding trunk)")
    return config


def _vocabulary(directory: Path, config: dict) -> list[str]:
    vocab_file = directory / "vocab.txt"
    vocab = vocab_file.read_text().split() if vocab_file.is_file() else list(ESM2_VOCAB)
    if config.get("vocab_size") != len(vocab):
        raise ModelLoadError(f"{directory}: vocab_size {config.get('vocab_size')} does not fit the "
                             f"{len(vocab)}-token vocabulary ({'vocab.txt' if vocab_file.is_file() else 'ESM-2'})")
    for token in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>"):
        if token not in vocab:
            raise ModelLoadError(f"{directory}: the vocabulary has no {token}")
    return vocab


class HFESM2Backbone(Backbone):
    """ESM-2 as transformers' ``EsmModel`` (a directory or a hub id)."""

    family = "hf-esm2"
    extra_tokens = 2  # BOS and EOS
    int8_refusal = None
    model: EsmModel

    def __init__(self, model, vocab: list[str], name: str, source: str = "", sha256: str = ""):
        super().__init__()
        self.model = model.eval()
        config = model.config
        self.vocab = vocab
        self.name = name
        self.architecture = architecture_of((config.num_hidden_layers, config.hidden_size, config.num_attention_heads))
        self.source = source
        self.sha256 = sha256
        self.num_layers = config.num_hidden_layers
        self.embed_dim = config.hidden_size
        self.max_residues = 1022  # 1024 positions in training, less BOS and EOS
        index = {token: i for i, token in enumerate(vocab)}
        self.pad_idx, self.cls_idx, self.eos_idx = index["<pad>"], index["<cls>"], index["<eos>"]
        lut = np.full(256, index["<unk>"], dtype=np.int64)
        for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            lut[ord(letter)] = index.get(letter, index["<unk>"])  # J is not in the vocabulary -> <unk>
        self._lut = lut
        if config.pad_token_id != self.pad_idx:
            raise ModelLoadError(f"{source}: pad_token_id {config.pad_token_id} is not the vocabulary's <pad>")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def known_names(cls) -> dict[str, str]:
        return {hub: f"Hugging Face EsmModel, {ESM2_MODELS[name][0]} layers, dim {ESM2_MODELS[name][1]}"
                for hub, name in HUB_MODELS.items()}

    @classmethod
    def claims_name(cls, name: str) -> bool:
        return bool(_HUB_ID.match(name))

    @classmethod
    def claims_file(cls, path: Path, kind: str) -> bool:
        return kind == "hf-dir" and hf_model_type(path) == "esm"

    @classmethod
    def locate(cls, name: str) -> Path | None:
        return cached_snapshot(name) if _HUB_ID.match(name) else None

    @classmethod
    def weights_file(cls, path: Path) -> Path:
        return path / WEIGHTS_FILE if path.is_dir() else path

    @classmethod
    def digest(cls, path: Path) -> str:
        """sha256 over the safetensors' sha256, config.json and vocab.txt: a directory is one model.

        The weights file alone would let an edited vocabulary (letters mapped to other tokens)
        or configuration (token dropout, layer norm epsilon) pass under the same identity.
        """
        directory = path if path.is_dir() else path.parent
        combined = hashlib.sha256(b"hf-esm2 directory\0")
        combined.update(sha256_of(directory / WEIGHTS_FILE).encode())
        for name in ("config.json", "vocab.txt"):
            member = directory / name
            combined.update(f"\0{name}\0".encode())
            combined.update(member.read_bytes() if member.is_file() else b"<absent>")
        return combined.hexdigest()

    @classmethod
    def official_sha256(cls, name: str) -> str | None:
        return KNOWN_SHA256.get(name)

    @classmethod
    def load(cls, model: str | None = None, weights: Path | str | None = None, trust: bool = False) -> HFESM2Backbone:
        """From a directory (``weights``) or a hub id (``model``: the cache, else a download)."""
        if weights is not None:
            directory = Path(weights).expanduser()
            if not directory.is_dir():
                raise ModelLoadError(f"{directory}: not a directory (a Hugging Face model is a directory "
                                     "holding config.json and model.safetensors)")
        elif model is not None and _HUB_ID.match(model):
            directory = cached_snapshot(model) or _download(model)
        else:
            raise ModelLoadError(f"{model!r} is not a Hugging Face hub id (organisation/name)")
        config = _read_config(directory)
        vocab = _vocabulary(directory, config)
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise ModelLoadError(f"{directory}: no {WEIGHTS_FILE} (only safetensors weights are loaded: they "
                                 "cannot run code; convert pytorch_model.bin with save_pretrained)")
        file_digest = sha256_of(weights_path)
        hub_id = model if model is not None and _HUB_ID.match(model) else _hub_id_of(directory)
        expected = KNOWN_SHA256.get(hub_id or "")
        if expected is not None and file_digest != expected:
            raise ModelLoadError(
                f"{weights_path}: sha256 is {file_digest}, but the official {hub_id} has {expected}. The file is "
                "damaged or incomplete; delete the snapshot from the Hugging Face cache and fetch it again."
            )
        digest = cls.digest(directory)
        from transformers import EsmModel

        try:
            loaded = EsmModel.from_pretrained(str(directory), add_pooling_layer=False, dtype=torch.float32,
                                              attn_implementation="sdpa", local_files_only=True,
                                              output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise ModelLoadError(f"{directory}: weights do not load into transformers' EsmModel: {err}") from None
        # With output_loading_info, from_pretrained returns (model, {missing_keys: ..., ...}).
        net, info = cast(tuple[Any, dict], loaded)
        # transformers fills tensors missing from the file with random values and only warns.
        incomplete = [key for kind in ("missing_keys", "mismatched_keys") for key in info.get(kind, [])
                      if str(key).split(".")[0] not in _OPTIONAL_MODULES]
        if incomplete:
            raise ModelLoadError(f"{weights_path}: incomplete for its config.json: {len(incomplete)} tensors are "
                                 f"missing or of another shape (first: {', '.join(map(str, incomplete[:4]))}); "
                                 "they would be filled with random values")
        name = hub_id or directory.name
        log.info("loaded %s (Hugging Face ESM-2) from %s", name, directory)
        return cls(net, vocab, name, str(absolute(directory)), digest)

    # -- the network -----------------------------------------------------------------------
    def tokenize(self, sequences: Sequence[str]) -> torch.Tensor:
        """(B, max_len + 2) tokens: BOS, residues, EOS, then padding."""
        longest = max(len(s) for s in sequences)
        tokens = np.full((len(sequences), longest + 2), self.pad_idx, dtype=np.int64)
        tokens[:, 0] = self.cls_idx
        for row, seq in enumerate(sequences):
            tokens[row, 1 : len(seq) + 1] = self._lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
            tokens[row, len(seq) + 1] = self.eos_idx
        return torch.from_numpy(tokens)

    def forward(self, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Representations {layer: (B, T, D)} over all tokens; the last layer with the final norm."""
        wanted = set(layers)
        inner = [layer for layer in wanted if layer < self.num_layers]
        out = self.model(input_ids=tokens, attention_mask=tokens.ne(self.pad_idx).long(),
                         output_hidden_states=bool(inner))
        reps = {layer: out.hidden_states[layer] for layer in inner}
        if self.num_layers in wanted:
            reps[self.num_layers] = out.last_hidden_state
        return reps

    def embed(self, sequences, layers):
        tokens = self.tokenize(sequences).to(self.device, non_blocking=True)
        with self.autocast():
            reps = self.forward(tokens, layers)
        return {layer: rep[:, 1:-1] for layer, rep in reps.items()}

    def residue_states(self, sequences, checkpoint=False):
        if checkpoint:
            raise ValueError("gradient checkpointing is implemented for fair-esm ESM-2 weights, not the Hugging Face "
                             "format; convert them or train without it")
        tokens = self.tokenize(sequences).to(self.device, non_blocking=True)
        states = self.forward(tokens, [self.num_layers])[self.num_layers][:, 1:-1]
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        mask = torch.arange(states.shape[1], device=self.device)[None, :] < lengths[:, None]
        return states, mask

    # -- training ----------------------------------------------------------------------------
    def trainable_layers(self) -> list[torch.nn.Module]:
        return list(self.model.encoder.layer)

    def int8_modules(self) -> list[torch.nn.Module]:
        return list(self.model.encoder.layer)  # every matrix product of the forward: attention and feed-forward

    def top_extras(self) -> list[torch.nn.Module]:
        return [self.model.encoder.emb_layer_norm_after]

    def frozen_always(self) -> list[torch.nn.Module]:
        return [m for m in (self.model.contact_head, self.model.pooler) if m is not None]

    def lora_targets(self, feed_forward: bool = False) -> str:
        # fair-esm's q/k/v/out (and fc1/fc2) under EsmModel's names; peft matches the whole name.
        attention = r"attention\.(self\.(query|key|value)|output\.dense)"
        return rf".*\.({attention}|intermediate\.dense|output\.dense)" if feed_forward else rf".*\.{attention}"

    def export(self, path: Path | str) -> Path:
        """A Hugging Face directory (config.json, model.safetensors, vocab.txt; LoRA merged)."""
        return save_hf_directory(self.merged_module(), path, self.vocab)

    def describe(self) -> dict:
        from importlib.metadata import version

        return {**super().describe(), "transformers_version": version("transformers")}


def save_hf_directory(model, path: Path | str, vocab: Sequence[str] = ESM2_VOCAB) -> Path:
    """Write an ``EsmModel`` as a directory, whole or not at all.

    The files are written into a temporary directory beside ``path``, which then replaces it.
    """
    path = absolute(path)
    if path.exists() and not (path.is_dir() and hf_model_type(path) is not None):
        raise ValueError(f"{path}: exists and is not a Hugging Face model directory; refusing to replace it")
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with atomic_path(tmp / WEIGHTS_FILE) as weights:
            from safetensors.torch import save_file

            state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(weights), metadata={"format": "pt"})
        write_text(tmp / "config.json", model.config.to_json_string())
        write_text(tmp / "vocab.txt", "\n".join(vocab) + "\n")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def esm2_to_hf(model: ESM2):
    """transformers' ``EsmModel`` holding the weights of a fair-esm ``ESM2`` (exactly, not a copy of the output).

    fair-esm and transformers name the same tensors differently; the embeddings' token
    dropout rescaling, the rotary frequencies and the final layer norm carry over unchanged.
    The language-model head is not part of ``EsmModel``.
    """
    from transformers import EsmConfig, EsmModel

    vocab = list(model.alphabet.all_toks) if hasattr(model, "alphabet") else list(ESM2_VOCAB)
    if vocab != ESM2_VOCAB:
        raise ValueError("the model's alphabet is not ESM-2's")
    first = model.layers[0]
    config = EsmConfig(
        vocab_size=len(vocab), mask_token_id=model.mask_idx, pad_token_id=model.padding_idx,
        hidden_size=model.embed_dim, num_hidden_layers=model.num_layers, num_attention_heads=model.attention_heads,
        intermediate_size=first.fc1.out_features, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, max_position_embeddings=1026, position_embedding_type="rotary",
        layer_norm_eps=model.emb_layer_norm_after.eps, emb_layer_norm_before=False,
        token_dropout=bool(model.token_dropout), rope_theta=10000.0,
    )
    # EsmModel's activation is fixed; recorded for readers of config.json that look for it.
    config.hidden_act = "gelu"
    config.architectures = ["EsmModel"]
    src = model.state_dict()
    state = {
        "embeddings.word_embeddings.weight": src["embed_tokens.weight"],
        "encoder.emb_layer_norm_after.weight": src["emb_layer_norm_after.weight"],
        "encoder.emb_layer_norm_after.bias": src["emb_layer_norm_after.bias"],
        "rotary_embeddings.inv_freq": src["layers.0.self_attn.rot_emb.inv_freq"],
    }
    renames = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
               "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
               "self_attn_layer_norm": "attention.LayerNorm", "final_layer_norm": "LayerNorm",
               "fc1": "intermediate.dense", "fc2": "output.dense"}
    for i in range(model.num_layers):
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                state[f"encoder.layer.{i}.{new}.{kind}"] = src[f"layers.{i}.{old}.{kind}"]
    for kind in ("weight", "bias"):
        state[f"contact_head.regression.{kind}"] = src[f"contact_head.regression.{kind}"]
    hf = EsmModel(config, add_pooling_layer=False)
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return hf.eval()
