"""Per-residue protein language model embeddings in a resumable, content-addressed HDF5 cache.

The package's top-level names are imported on first use, so that ``import embedcache.sequences``
(reading and validating input) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "CacheError": "embedcache.store",
    "EmbeddingCache": "embedcache.store",
    "ExportSummary": "embedcache.export",
    "ExtractConfig": "embedcache.extract",
    "ExtractSummary": "embedcache.extract",
    "export_cache": "embedcache.export",
    "extract": "embedcache.extract",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedcache' has no attribute {name!r}")
