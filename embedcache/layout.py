"""What a cache file is: its format, paths beside it, settings, and the checksums it carries.

Layout of a cache file (format version 2, or 3 when ``store`` is not "both")::

    /                      attrs: provenance (model, layers, dtype, policy, versions, ...),
                                  format, format_version, attrs_checksum
    /sequences/key         (n,)   sha1 of the upper-cased sequence, the content address
    /sequences/sequence    (n,)   the sequence
    /sequences/length      (n,)   residues in the sequence
    /sequences/n_residues  (n,)   residues stored (max_length when truncated)
    /sequences/status      (n,)   batching.Status: 0 full, 1 truncated, 2 chunked
    /sequences/offset      (n+1,) row of each sequence's first residue in per_residue (all 0: none stored)
    /L{layer}/per_residue  (sum n_residues, D)  all residues of all sequences, concatenated
    /L{layer}/per_residue_checksum  (n,)  checksum of each sequence's rows of per_residue
    /L{layer}/pooled       (n, D) mean over residues (specials and padding excluded)
    /ids/id, /ids/header   (m,)   every input ID and its full header
    /ids/index             (m,)   row in /sequences, or -1 when skipped (too long)
    /ids/key               (m,)   content address of the ID's sequence

Every dataset but ``per_residue`` carries a ``checksum`` attribute over its whole contents;
``per_residue`` is checked per sequence, against ``per_residue_checksum``, so that reading
one protein never reads more than that protein. The root attributes are covered by
``attrs_checksum``. Version 1 (embedcache < 0.2) is the same layout without checksums.

The root attribute ``store`` says what was kept (a file without it keeps both):

- ``both``: the layout above (format version 2, readable by embedcache 0.2 on).
- ``pooled``: no ``per_residue`` nor ``per_residue_checksum`` datasets, and every offset 0;
  ``n_residues`` still counts the residues the pooled vector is the mean of.
- ``per-residue``: no ``pooled`` datasets; a pooled read is the mean of the stored residues,
  computed when read (allowed only for models whose pooled vector is exactly that).

Files that keep one kind only say format version 3, so that an embedcache that knows only
version 2 calls them newer ("upgrade") instead of damaged.

The checksum (``wsum64``, :func:`checksum`) is a position-weighted sum of the data's 64-bit
words modulo 2**64 with odd weights: any change of a single word changes it, and random
damage goes unnoticed with a probability of about 2**-64. numpy computes it at nearly memory
speed, measured for a protein of 400 residues x 320 dims in fp16 (256 kB): about 20 us,
against 120 us for zlib.adler32, 145-250 us for zlib.crc32 and 340 us for sha1 on this
machine. HDF5's fletcher32 filter was not used: it needs chunked datasets, and a protein's
read would then read and check whole chunks, its neighbours' rows included. It guards
against damage, not against forgery.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from .atomic import real_path

FORMAT = "embedcache"
FORMAT_VERSION = 3
# What a file that keeps both kinds of embeddings says: readers of version 2 read it unchanged.
BOTH_FORMAT_VERSION = 2
# Files of this version or older are read; version 1 has no checksums.
OLDEST_READABLE = 1
KEY_DTYPE = "S40"
STR_DTYPE = h5py.string_dtype("utf-8")
CHECKSUM = "wsum64"

# Settings that decide what an embedding is: a file (and its pending parts) holds one value of each.
CONTENT_SETTINGS = (
    "architecture",
    "weights_sha256",
    "layers",
    "dtype",
    "precision",
    "long_policy",
    "max_length",
    "chunk_overlap",
    "embed_dim",
    "store",
)

# What a cache keeps: per-residue arrays and pooled vectors, or one of the two.
STORES = ("both", "pooled", "per-residue")
# What a file without the ``store`` attribute (written before it existed) keeps.
DEFAULT_STORE = "both"


def format_version_for(store: str) -> int:
    return BOTH_FORMAT_VERSION if store == DEFAULT_STORE else FORMAT_VERSION


def stores_residues(store: str) -> bool:
    return store in ("both", "per-residue")


def stores_pooled(store: str) -> bool:
    return store in ("both", "pooled")


class CacheError(RuntimeError):
    """The cache file cannot be used as asked (wrong settings, locked, damaged, missing)."""


class CacheLockedError(CacheError):
    pass


class CacheDamagedError(CacheError):
    """Stored data does not match its checksum, or the file's structure is inconsistent."""


def parts_dir(path: Path | str) -> Path:
    path = real_path(path)
    return path.with_name(path.name + ".parts")


def lock_path(path: Path | str) -> Path:
    path = real_path(path)
    return path.with_name(path.name + ".lock")


def check_format(attrs, path: Path) -> int:
    """The file's format version; refuses files that are not caches or are newer than this code."""
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not an embedcache file")
    try:
        version = int(attrs.get("format_version", 1))
    except (TypeError, ValueError):
        raise CacheDamagedError(f"{path}: unreadable format_version attribute; the file is damaged") from None
    if version > FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {version} was written by a newer embedcache (this one reads versions "
            f"{OLDEST_READABLE} to {FORMAT_VERSION}); upgrade embedcache to read it"
        )
    if version < OLDEST_READABLE:
        raise CacheDamagedError(f"{path}: format_version {version} is not a valid version; the file is damaged")
    if version < 2 and "attrs_checksum" in attrs:
        # Version 1 never wrote checksums: a file that has them lost its version, and reading it
        # as version 1 would switch every check off.
        raise CacheDamagedError(f"{path}: carries checksums but says format version {version}; the file's "
                                "attributes are damaged")
    return version


# -- settings and attributes -------------------------------------------------------------


def jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def settings_of(attrs) -> dict:
    return with_default_store({name: jsonable(attrs[name]) for name in CONTENT_SETTINGS if name in attrs})


def with_default_store(settings: dict) -> dict:
    """Settings written before ``store`` existed describe files that keep both kinds."""
    return {**settings, "store": settings.get("store", DEFAULT_STORE)}


def provenance_attrs(provenance: dict) -> dict:
    """h5py cannot store None; store it as the string 'none' (and JSON for nested values)."""
    out = {}
    for name, value in provenance.items():
        if value is None:
            value = "none"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, (list, tuple)) and name != "layers":
            value = json.dumps(list(value))
        out[name] = value
    return out


def attrs_digest(attrs) -> str:
    """Checksum of every attribute but the checksum itself, in a canonical JSON form."""
    canonical = {k: jsonable(v) for k, v in attrs.items() if k != "attrs_checksum"}
    return checksum_text(json.dumps(canonical, sort_keys=True, default=str).encode())


# -- checksums ---------------------------------------------------------------------------

_MULT = np.uint64(0x9E3779B97F4A7C15)
_ADD = np.uint64(0x632BE59BD9B4E019)
_weights_cache = np.zeros(0, dtype=np.uint64)


def _weights(n: int) -> np.ndarray:
    """The first ``n`` odd weights of a fixed Weyl sequence (grown and kept as needed)."""
    global _weights_cache
    if len(_weights_cache) < n:
        size = max(n, 2 * len(_weights_cache), 1 << 16)
        with np.errstate(over="ignore"):
            _weights_cache = (np.arange(size, dtype=np.uint64) * _MULT + _ADD) | np.uint64(1)
    return _weights_cache[:n]


def checksum(data) -> int:
    """``wsum64`` of an array's (or bytes') raw contents; the length is included.

    A 2-D array whose rows are whole 64-bit words is summed down its columns first, and
    the column sums weighted: numpy adds rows at memory speed, and every single word still
    changes the result. (Rows trading places do not; damage does not move rows.) Anything
    else is weighted word by word, the tail bytes as one more word.
    """
    if isinstance(data, (bytes, bytearray)):
        raw = np.frombuffer(data, dtype=np.uint8)
    else:
        data = np.ascontiguousarray(data)
        if data.ndim == 2 and data.shape[0] and (data.shape[1] * data.itemsize) % 8 == 0:
            words = data.view(np.uint8).reshape(data.shape[0], -1).view(np.uint64)
            with np.errstate(over="ignore"):
                total = int(np.dot(words.sum(axis=0), _weights(words.shape[1])))
            return (total + data.nbytes * 0xD6E8FEB86659FD93) % (1 << 64)
        raw = data.reshape(-1).view(np.uint8)
    whole = len(raw) // 8
    words = raw[: whole * 8].view(np.uint64)
    with np.errstate(over="ignore"):
        total = int(np.dot(words, _weights(whole + 1)[:whole])) if whole else 0
        tail = raw[whole * 8 :]
        if len(tail):
            last = int.from_bytes(tail.tobytes() + bytes(8 - len(tail)), "little")
            total += last * int(_weights(whole + 1)[whole])
    return (total + len(raw) * 0xD6E8FEB86659FD93) % (1 << 64)


def checksum_text(data) -> str:
    return f"{CHECKSUM}:{checksum(data):016x}"


def table_bytes(values) -> bytes | np.ndarray:
    """What the checksum of a dataset covers: its raw array, or its strings length-prefixed."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUT":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts.append(len(b).to_bytes(8, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr)


def row_checksums(data: np.ndarray, bounds) -> np.ndarray:
    """One checksum per sequence, over rows ``bounds[i]:bounds[i+1]`` of ``data``."""
    return np.array([checksum(data[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)], dtype=np.uint64)


def set_checksum(dataset: h5py.Dataset, values) -> None:
    dataset.attrs["checksum"] = checksum_text(table_bytes(values))


def write_table(group, name: str, values, dtype) -> h5py.Dataset:
    """A whole dataset with its checksum attribute."""
    if dtype is STR_DTYPE:
        values = list(values)
        ds = group.create_dataset(name, data=values, dtype=STR_DTYPE, shape=(len(values),))
    else:
        values = np.asarray(values, dtype=dtype)
        ds = group.create_dataset(name, data=values)
    set_checksum(ds, values)
    # HDF5 writes small datasets late, when their object is released; a write failing
    # there is only reported as an ignored exception. Flushing now, while the dataset is
    # referenced, makes a full disk an exception here.
    group.file.flush()
    return ds


def verify_table(dataset: h5py.Dataset, values, path: Path | str, required: bool = True) -> None:
    """Compare a dataset's values, as read, with its ``checksum`` attribute."""
    stored = dataset.attrs.get("checksum")
    if stored is None:
        if required:
            raise CacheDamagedError(
                f"{path}: dataset {dataset.name} has lost its checksum attribute; the file is damaged"
            )
        return
    if isinstance(stored, bytes):
        stored = stored.decode(errors="replace")
    if checksum_text(table_bytes(values)) != stored:
        raise CacheDamagedError(f"{path}: dataset {dataset.name} does not match its checksum; the file is damaged")


def fsync_tree(path: Path) -> None:
    for name in os.listdir(path):
        with open(path / name, "rb") as handle:
            os.fsync(handle.fileno())
