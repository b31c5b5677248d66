"""The HDF5 embedding store, in three modules: :mod:`embedcache.layout` (the format, paths,
settings and checksums), :mod:`embedcache.writer` (crash-safe writing) and
:mod:`embedcache.reader` (the read API, whole-file verification). This module keeps the
names they had when they lived here.
"""

from __future__ import annotations

from .layout import (
    CONTENT_SETTINGS,
    FORMAT,
    FORMAT_VERSION,
    KEY_DTYPE,
    STORES,
    STR_DTYPE,
    CacheDamagedError,
    CacheError,
    CacheLockedError,
    lock_path,
    parts_dir,
)
from .reader import EmbeddingCache, VerifyReport, lock_holder, verify_cache
from .writer import CacheWriter, EmbeddedEntry, WriterLock, write_arrays

__all__ = [
    "CONTENT_SETTINGS", "FORMAT", "FORMAT_VERSION", "KEY_DTYPE", "STORES", "STR_DTYPE", "CacheDamagedError",
    "CacheError", "CacheLockedError", "CacheWriter", "EmbeddedEntry", "EmbeddingCache", "VerifyReport", "WriterLock",
    "lock_holder", "lock_path", "parts_dir", "verify_cache", "write_arrays",
]
