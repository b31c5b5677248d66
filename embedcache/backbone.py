"""Backbones turn a batch of sequences into per-residue representations.

The implementations live in :mod:`embedcache.backbones` (one module per model family, and
the registry that picks one); this module keeps the older import path.
"""

from __future__ import annotations

from .backbones.base import _DTYPES, PRECISIONS, Backbone, pick_precision  # noqa: F401
from .backbones.esm2 import ESM2Backbone, _rotate_half  # noqa: F401
