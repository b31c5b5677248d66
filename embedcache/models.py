"""Finding and loading ESM-2 checkpoints: by name through the torch hub cache, or from a file.

By name, a checkpoint already in ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``) is
used without touching the network; otherwise it is downloaded the way fair-esm does, into that
same directory (torch.hub writes to a temporary file and renames it, so an interrupted
download never leaves a truncated checkpoint behind). The contact-regression file is never
required: embeddings do not use it.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

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


class ModelLoadError(RuntimeError):
    """The model could not be found, downloaded, verified or understood."""


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


def sha256_of(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


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
    if weights is None and model is None:
        raise ModelLoadError("name a model (--model esm2_t33_650M_UR50D) or a weights file (--weights PATH)")
    if model is not None and model not in ESM2_MODELS:
        raise ModelLoadError(f"unknown model {model!r}; known ESM-2 models: {', '.join(ESM2_MODELS)}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{path}: weights file not found")
    else:
        path = fetch(model)
    digest = verify_checksum(path)
    data = load_checkpoint(path, trust=trust)
    net, alphabet, architecture = model_from_checkpoint(data, path)
    if model is not None and weights is not None and architecture != model:
        raise ModelLoadError(f"{path}: the file holds {architecture}, not {model}")
    name = path.stem
    log.info("loaded %s (%s) from %s", name, architecture, path)
    return LoadedModel(net, alphabet, name, architecture, str(path), digest)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(esm2_state_for_checkpoint(model), tmp)
    os.replace(tmp, path)
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
