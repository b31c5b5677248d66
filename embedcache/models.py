"""Finding and loading ESM-2 checkpoints (fair-esm format).

The implementation lives in :mod:`embedcache.backbones.esm2`; this module keeps the older
import path for scripts and notebooks.
"""

from __future__ import annotations

from .backbones.base import ModelLoadError, sha256_of  # noqa: F401
from .backbones.esm2 import (  # noqa: F401
    ESM2_MODELS,
    KNOWN_SHA256,
    MODEL_URL,
    LoadedModel,
    architecture_of,
    build_tiny_esm2,
    esm2_state_for_checkpoint,
    fetch,
    hub_checkpoint_dir,
    load_checkpoint,
    load_esm2,
    model_from_checkpoint,
    random_esm2,
    save_esm2_checkpoint,
    verify_checksum,
)
