"""The HDF5 embedding store: its layout, crash-safe writing, and the read API.

Layout of a cache file (``FORMAT_VERSION`` 1)::

    /                      attrs: provenance (model, layers, dtype, policy, versions, ...)
    /sequences/key         (n,)   sha1 of the upper-cased sequence, the content address
    /sequences/sequence    (n,)   the sequence
    /sequences/length      (n,)   residues in the sequence
    /sequences/n_residues  (n,)   residues stored (max_length when truncated)
    /sequences/status      (n,)   batching.Status: 0 full, 1 truncated, 2 chunked
    /sequences/offset      (n+1,) row of each sequence's first residue in per_residue
    /L{layer}/per_residue  (sum n_residues, D)  all residues of all sequences, concatenated
    /L{layer}/pooled       (n, D) mean over residues (specials and padding excluded)
    /ids/id, /ids/header   (m,)   every input ID and its full header
    /ids/index             (m,)   row in /sequences, or -1 when skipped (too long)
    /ids/key               (m,)   content address of the ID's sequence

One concatenated matrix per layer with an offset index reads a random protein about six
times faster than one dataset per protein, and datasets are written once, contiguous and
uncompressed (fp16 embeddings barely compress, and compression slows random reads).

Crash safety: the cache file is only ever replaced whole, by writing ``FILE.tmp`` and
renaming it. During a run each finished work item goes to its own small file in
``FILE.parts/`` (also written under a temporary name and renamed), so ``kill -9`` at any
moment loses at most the item in progress. The next run reuses the parts and, at the end,
writes a new cache file holding the old contents, the parts, and the new IDs. A lock file
keeps a second writer out.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .batching import Entry, Status, sort_key
from .sequences import Record

log = logging.getLogger(__name__)

FORMAT = "embedcache"
FORMAT_VERSION = 1
KEY_DTYPE = "S40"
STR_DTYPE = h5py.string_dtype("utf-8")

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
)


class CacheError(RuntimeError):
    """The cache file cannot be used as asked (wrong settings, locked, damaged, missing)."""


class CacheLockedError(CacheError):
    pass


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class WriterLock:
    """An exclusive ``flock`` on ``FILE.lock``; the kernel drops it if the process dies."""

    def __init__(self, path: Path):
        self.path = lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise CacheLockedError(
                        f"{self.path.with_suffix('')}: another embedcache process (pid {holder}) is writing "
                        "this cache; wait for it to finish or write to another file"
                    ) from None
                raise
            # The previous holder may have unlinked the file between our open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    """An h5py File at ``path.tmp``, fsynced and renamed to ``path`` only if the block succeeds."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class EmbeddedEntry:
    """One sequence's results: per-residue arrays and pooled vectors per layer (float32)."""

    entry: Entry
    per_residue: dict[int, np.ndarray]
    pooled: dict[int, np.ndarray]


def _settings_of(attrs) -> dict:
    return {name: _jsonable(attrs[name]) for name in CONTENT_SETTINGS if name in attrs}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _provenance_attrs(provenance: dict) -> dict:
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


class CacheWriter:
    """Writes one cache file for one extraction run. Use as a context manager (it holds the lock)."""

    def __init__(self, path: Path | str, provenance: dict):
        self.path = Path(path)
        self.provenance = _provenance_attrs(provenance)
        self.settings = {name: _jsonable(self.provenance[name]) for name in CONTENT_SETTINGS}
        self.parts = parts_dir(self.path)
        self._lock = WriterLock(self.path)
        self._existing_keys: set[str] = set()
        self._existing_ids: dict[str, str] = {}
        self._part_keys: dict[str, Path] = {}

    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._read_existing()
            self._read_parts()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _check_settings(self, found: dict, where: str) -> None:
        differ = {k: (found.get(k), self.settings[k]) for k in CONTENT_SETTINGS if found.get(k) != self.settings[k]}
        if differ:
            detail = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            raise CacheError(
                f"{where} was made with other settings ({detail}). Use the same settings to extend it, "
                "or write to a new file."
            )

    def _read_existing(self) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise CacheError(f"{self.path}: exists and is not an embedcache file; refusing to touch it")
                self._check_settings(_settings_of(f.attrs), str(self.path))
                self._existing_keys = set(_decode(f["sequences/key"][:]))
                self._existing_ids = dict(zip(_strs(f["ids/id"]), _decode(f["ids/key"][:])))
        except OSError as err:
            raise CacheError(f"{self.path}: cannot be read as HDF5 ({err})") from None

    def _read_parts(self) -> None:
        if not self.parts.exists():
            return
        settings_file = self.parts / "settings.json"
        if settings_file.exists():
            self._check_settings(json.loads(settings_file.read_text()), f"{self.parts} (an interrupted run)")
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # an item whose writing was cut off: it is redone
        for part in sorted(self.parts.glob("part-*.h5")):
            try:
                with h5py.File(part, "r") as f:
                    for key in _decode(f["key"][:]):
                        self._part_keys.setdefault(key, part)
            except (OSError, KeyError):
                log.warning("%s: unreadable part file, its sequences will be embedded again", part)
                part.unlink()
        if self._part_keys:
            log.info("resuming: %d sequences embedded by an interrupted run", len(self._part_keys))

    def check_ids(self, records: Sequence[Record]) -> None:
        """Refuse an input that gives an ID already in the cache a different sequence."""
        for rec in records:
            old = self._existing_ids.get(rec.id)
            if old is not None and old != rec.key:
                raise CacheError(
                    f"{self.path}: ID {rec.id!r} is already in the cache with a different sequence; "
                    "rename it in the input or write to a new file"
                )

    def is_done(self, key: str) -> bool:
        return key in self._existing_keys or key in self._part_keys

    def write_part(self, results: Sequence[EmbeddedEntry]) -> Path:
        """Write one work item's results atomically to the parts directory."""
        if not self.parts.exists():
            self.parts.mkdir()
            tmp = self.parts / "settings.json.tmp"
            tmp.write_text(json.dumps(self.settings, sort_keys=True))
            os.replace(tmp, self.parts / "settings.json")
        name = f"part-{results[0].entry.key[:20]}-{len(results)}.h5"
        path = self.parts / name
        with _atomic_h5(path) as f:
            _write_entries(f, results, self.provenance["layers"], self.provenance["dtype"])
        for r in results:
            self._part_keys[r.entry.key] = path
        return path

    def finish(self, records: Sequence[Record], skipped_keys: set[str]) -> bool:
        """Write the complete cache file; returns False when it was already up to date."""
        wanted_keys = {rec.key for rec in records} - skipped_keys
        new_keys = sorted(k for k in wanted_keys - self._existing_keys if k in self._part_keys)
        missing = wanted_keys - self._existing_keys - self._part_keys.keys()
        if missing:
            raise CacheError(f"{len(missing)} sequences have no embeddings yet; the run did not complete")
        new_ids = [rec for rec in records if rec.id not in self._existing_ids]
        if not new_keys and not new_ids:
            self._remove_parts()
            return False
        _consolidate(self.path, self.provenance, self._part_keys, new_keys, new_ids)
        self._remove_parts()
        return True

    def _remove_parts(self) -> None:
        if self.parts.exists():
            shutil.rmtree(self.parts)


def _write_entries(f: h5py.File, results: Sequence[EmbeddedEntry], layers, dtype: str) -> None:
    f["key"] = np.array([r.entry.key for r in results], dtype=KEY_DTYPE)
    f.create_dataset("sequence", data=[r.entry.sequence for r in results], dtype=STR_DTYPE)
    f["status"] = np.array([int(r.entry.status) for r in results], dtype=np.uint8)
    f["n_residues"] = np.array([r.entry.n_residues for r in results], dtype=np.int64)
    for layer in layers:
        f[f"L{layer}/per_residue"] = np.concatenate([r.per_residue[layer] for r in results]).astype(dtype)
        f[f"L{layer}/pooled"] = np.stack([r.pooled[layer] for r in results]).astype(dtype)


def _consolidate(
    path: Path,
    provenance: dict,
    part_of: dict[str, Path],
    new_keys: list[str],
    new_ids: list[Record],
) -> None:
    """Write old contents + new entries + new IDs into a fresh file and swap it in.

    New entries follow the old ones in :func:`batching.sort_key` order, so the file's
    contents do not depend on how many runs it took to embed them.
    """
    located = _locate_in_parts(part_of, new_keys)
    new_entries = sorted((located[k][0] for k in new_keys), key=sort_key)
    layers = [int(x) for x in provenance["layers"]]
    dim, dtype = int(provenance["embed_dim"]), provenance["dtype"]
    old = h5py.File(path, "r") if path.exists() else None
    try:
        old_columns = {name: list(old[f"sequences/{name}"][:]) for name in _COLUMNS} if old else {}
        old_offsets = old["sequences/offset"][:] if old else np.zeros(1, dtype=np.int64)
        n_old = len(old_offsets) - 1
        counts = np.array([e.n_residues for e in new_entries], dtype=np.int64)
        offsets = np.concatenate([old_offsets, old_offsets[-1] + np.cumsum(counts)])
        new_columns = {
            "key": [e.key.encode() for e in new_entries],
            "sequence": [e.sequence for e in new_entries],
            "length": [e.length for e in new_entries],
            "n_residues": [e.n_residues for e in new_entries],
            "status": [int(e.status) for e in new_entries],
        }
        with _atomic_h5(path) as out:
            attrs = dict(old.attrs) if old else {}
            attrs.update(provenance)
            attrs["created"] = old.attrs["created"] if old else provenance["updated"]
            attrs["commands"] = json.dumps((json.loads(old.attrs["commands"]) if old else []) + [attrs.pop("command")])
            attrs.update(format=FORMAT, format_version=FORMAT_VERSION)
            out.attrs.update(attrs)

            for name, dtype_ in _COLUMNS.items():
                values = old_columns.get(name, []) + new_columns[name]
                if dtype_ is STR_DTYPE:
                    out.create_dataset(f"sequences/{name}", data=values, dtype=STR_DTYPE, shape=(len(values),))
                else:
                    out[f"sequences/{name}"] = np.array(values, dtype=dtype_)
            out["sequences/offset"] = offsets

            rows = {l: out.create_dataset(f"L{l}/per_residue", shape=(int(offsets[-1]), dim), dtype=dtype) for l in layers}
            pooled = {l: out.create_dataset(f"L{l}/pooled", shape=(len(offsets) - 1, dim), dtype=dtype) for l in layers}
            if old:
                for l in layers:
                    _copy_rows(old[f"L{l}/per_residue"], rows[l], int(old_offsets[-1]))
                    pooled[l][:n_old] = old[f"L{l}/pooled"][:]
            part_file, part_path = None, None
            try:
                for i, entry in enumerate(new_entries, n_old):
                    _, part, row, start, stop = located[entry.key]
                    if part != part_path:
                        if part_file is not None:
                            part_file.close()
                        part_file, part_path = h5py.File(part, "r"), part
                    for l in layers:
                        rows[l][offsets[i] : offsets[i + 1]] = part_file[f"L{l}/per_residue"][start:stop]
                        pooled[l][i] = part_file[f"L{l}/pooled"][row]
            finally:
                if part_file is not None:
                    part_file.close()

            keys = [k.decode() for k in old_columns.get("key", []) + new_columns["key"]]
            _write_ids(out, old, new_ids, {k: i for i, k in enumerate(keys)})
    finally:
        if old is not None:
            old.close()


_COLUMNS = {"key": KEY_DTYPE, "sequence": STR_DTYPE, "length": np.int32, "n_residues": np.int32, "status": np.uint8}


def _locate_in_parts(part_of: dict[str, Path], keys: list[str]) -> dict[str, tuple[Entry, Path, int, int, int]]:
    """key -> (entry, part file, row in the part, first and past-last residue row)."""
    located = {}
    for part in sorted({part_of[k] for k in keys}):
        with h5py.File(part, "r") as f:
            counts = f["n_residues"][:]
            starts = np.concatenate([[0], np.cumsum(counts)])
            for i, (key, seq, status) in enumerate(zip(_decode(f["key"][:]), _strs(f["sequence"]), f["status"][:])):
                if part_of.get(key) == part:
                    entry = Entry(key, seq, Status(int(status)), int(counts[i]))
                    located[key] = (entry, part, i, int(starts[i]), int(starts[i + 1]))
    return located


def _write_ids(out: h5py.File, old: h5py.File | None, new_ids: list[Record], key_index: dict[str, int]) -> None:
    ids = _strs(old["ids/id"]) if old else []
    headers = _strs(old["ids/header"]) if old else []
    keys = _decode(old["ids/key"][:]) if old else []
    ids += [r.id for r in new_ids]
    headers += [r.header for r in new_ids]
    keys += [r.key for r in new_ids]
    out.create_dataset("ids/id", data=ids, dtype=STR_DTYPE)
    out.create_dataset("ids/header", data=headers, dtype=STR_DTYPE)
    out["ids/key"] = np.array(keys, dtype=KEY_DTYPE)
    out["ids/index"] = np.array([key_index.get(k, -1) for k in keys], dtype=np.int64)
    without = sum(1 for k in keys if k not in key_index)
    if without:
        log.info("%d IDs have no embedding (longer than max_length under --long skip)", without)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int, block: int = 1 << 16) -> None:
    for start in range(0, n, block):
        stop = min(n, start + block)
        dst[start:stop] = src[start:stop]


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _strs(dataset: h5py.Dataset) -> list[str]:
    return list(dataset.asstr()[:])


class EmbeddingCache:
    """Read access to a cache file; cheap to open, reads one protein in tens of microseconds.

    >>> cache = EmbeddingCache("proteins.h5")
    >>> X = cache.pooled(cache.ids)            # (n, D) matrix, one row per ID
    >>> R = cache.per_residue(cache.ids[0])    # (L, D) residues of one protein

    Arrays come back in the stored dtype (float16 unless the cache was written as float32);
    ``layer`` defaults to the highest stored layer.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            pending = parts_dir(self.path)
            if pending.exists():
                raise CacheError(
                    f"{self.path}: not finished yet; an interrupted run left {len(list(pending.glob('part-*.h5')))} "
                    "parts. Run the same extract command again to complete it."
                )
            raise CacheError(f"{self.path}: no such cache file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise CacheError(f"{self.path}: cannot be read as HDF5 ({err})") from None
        if self._file.attrs.get("format") != FORMAT:
            self._file.close()
            raise CacheError(f"{self.path}: not an embedcache file")
        f = self._file
        self.attrs = {name: _jsonable(value) for name, value in f.attrs.items()}
        self.layers = [int(x) for x in np.atleast_1d(f.attrs["layers"])]
        self._offsets = f["sequences/offset"][:]
        # Python ints slice h5py datasets faster than numpy ones, and looking a dataset up by
        # path costs about as much as reading a small protein: keep both at hand.
        self._bounds = self._offsets.tolist()
        self._residue_sets: dict[int, h5py.Dataset] = {}
        self._status = f["sequences/status"][:]
        self._lengths = f["sequences/length"][:]
        all_ids = _strs(f["ids/id"])
        index = f["ids/index"][:]
        self._row = {i: int(r) for i, r in zip(all_ids, index) if r >= 0}
        self.ids = [i for i, r in zip(all_ids, index) if r >= 0]
        self.skipped_ids = [i for i, r in zip(all_ids, index) if r < 0]
        self._headers = dict(zip(all_ids, _strs(f["ids/header"])))
        self._pooled: dict[int, np.ndarray] = {}
        self._key_row: dict[str, int] | None = None

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, ident: str) -> bool:
        return ident in self._row

    def _row_of(self, ident: str) -> int:
        try:
            return self._row[ident]
        except KeyError:
            reason = " (skipped: longer than max_length)" if ident in self._headers else ""
            raise KeyError(f"{ident!r} has no embedding in {self.path}{reason}") from None

    def _layer(self, layer: int | None) -> int:
        if layer is None:
            return self.layers[-1]
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in {self.path}; stored layers: {self.layers}")
        return layer

    def header(self, ident: str) -> str:
        return self._headers[ident]

    def sequence(self, ident: str) -> str:
        return self._file["sequences/sequence"].asstr()[self._row_of(ident)]

    def sequences_rows(self, rows: Sequence[int]) -> list[str]:
        data = self._file["sequences/sequence"].asstr()
        return [data[int(r)] for r in rows]

    def key(self, ident: str) -> str:
        return self._file["sequences/key"][self._row_of(ident)].decode()

    def status(self, ident: str) -> Status:
        return Status(int(self._status[self._row_of(ident)]))

    def length(self, ident: str) -> int:
        """Residues in the sequence (more than are stored when it was truncated)."""
        return int(self._lengths[self._row_of(ident)])

    def n_residues(self, ids: Sequence[str]) -> np.ndarray:
        """Rows stored for each ID: what ``per_residue`` returns."""
        return self.n_residues_rows(self.rows(ids))

    # -- by content ----------------------------------------------------------------------
    def rows(self, ids: Sequence[str] | None = None, keys: Sequence[str] | None = None) -> np.ndarray:
        """Storage rows of IDs, or of content keys (``embedcache.sequences.sequence_key``).

        The cache is content-addressed: a labelled file whose IDs differ from the ones the
        cache was built with still finds its sequences through their keys.
        """
        if (ids is None) == (keys is None):
            raise TypeError("give ids or keys")
        if ids is not None:
            return np.array([self._row_of(i) for i in ids], dtype=np.int64)
        if self._key_row is None:
            self._key_row = {k: r for r, k in enumerate(_decode(self._file["sequences/key"][:]))}
        missing = [k for k in keys if k not in self._key_row]
        if missing:
            raise KeyError(f"{len(missing)} of {len(keys)} sequences have no embedding in {self.path}")
        return np.array([self._key_row[k] for k in keys], dtype=np.int64)

    def has_keys(self, keys: Sequence[str]) -> np.ndarray:
        if self._key_row is None:
            self.rows(keys=[])
        return np.array([k in self._key_row for k in keys], dtype=bool)

    def n_residues_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return (self._offsets[rows + 1] - self._offsets[rows]).astype(np.int64)

    def pooled_rows(self, rows: np.ndarray, layer: int | None = None) -> np.ndarray:
        layer = self._layer(layer)
        if layer not in self._pooled:
            self._pooled[layer] = self._file[f"L{layer}/pooled"][:]
        return self._pooled[layer][np.asarray(rows, dtype=np.int64)]

    def per_residue_rows(self, rows: Sequence[int], layer: int | None = None) -> list[np.ndarray]:
        """Per-residue arrays of several rows, one slab read when they lie close together."""
        rows = [int(r) for r in rows]
        if not rows:
            return []
        data, bounds = self._residues(layer), self._bounds
        lo, hi = min(rows), max(rows)
        if bounds[hi + 1] - bounds[lo] <= 2 * sum(bounds[r + 1] - bounds[r] for r in rows):
            base = bounds[lo]
            slab = data[base : bounds[hi + 1]]
            return [slab[bounds[r] - base : bounds[r + 1] - base] for r in rows]
        return [data[bounds[r] : bounds[r + 1]] for r in rows]

    # -- arrays --------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self._residues(None).shape[1])

    def _residues(self, layer: int | None) -> h5py.Dataset:
        layer = self._layer(layer)
        if layer not in self._residue_sets:
            self._residue_sets[layer] = self._file[f"L{layer}/per_residue"]
        return self._residue_sets[layer]

    def per_residue(self, ident: str, layer: int | None = None) -> np.ndarray:
        row = self._row_of(ident)
        return self._residues(layer)[self._bounds[row] : self._bounds[row + 1]]

    def pooled(self, ids: Sequence[str] | None = None, layer: int | None = None) -> np.ndarray:
        if isinstance(ids, str):
            raise TypeError("pooled() takes a list of IDs; use pooled([ident]) for one")
        return self.pooled_rows(self.rows(self.ids if ids is None else ids), layer)

    def iter_chunks(
        self, ids: Sequence[str] | None = None, size: int = 256, layer: int | None = None, per_residue: bool = False
    ) -> Iterator[tuple[list[str], np.ndarray | list[np.ndarray]]]:
        """Yield (ids, arrays) ``size`` IDs at a time: a pooled matrix, or per-residue arrays."""
        ids = list(self.ids if ids is None else ids)
        layer = self._layer(layer)
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            if per_residue:
                yield chunk, self.per_residue_many(chunk, layer)
            else:
                yield chunk, self.pooled(chunk, layer)

    def per_residue_many(self, ids: Sequence[str], layer: int | None = None) -> list[np.ndarray]:
        """Per-residue arrays for several IDs."""
        return self.per_residue_rows(self.rows(ids), layer)

    # -- description ---------------------------------------------------------------------
    def info(self) -> dict:
        counts = {s.name.lower(): int((self._status == s).sum()) for s in (Status.TRUNCATED, Status.CHUNKED)}
        f = self._file
        first = f[f"L{self.layers[0]}/per_residue"]
        return {
            "path": str(self.path),
            "file_size_bytes": self.path.stat().st_size,
            "ids": len(self.ids) + len(self.skipped_ids),
            "ids_embedded": len(self.ids),
            "ids_skipped": len(self.skipped_ids),
            "unique_sequences": int(len(self._offsets) - 1),
            "residues_stored": int(self._offsets[-1]),
            "truncated": counts["truncated"],
            "chunked": counts["chunked"],
            "embed_dim": int(first.shape[1]),
            "stored_dtype": str(first.dtype),
            "layers": self.layers,
            "pending_parts": parts_dir(self.path).exists(),
            "provenance": {k: v for k, v in sorted(self.attrs.items())},
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}: {len(self.ids)} IDs, layers {self.layers})"


def write_arrays(
    path: Path | str,
    records: Sequence[Record],
    arrays: Iterator[np.ndarray] | Sequence[np.ndarray],
    model: str,
    dtype: str = "float16",
    layer: int = 0,
    batch: int = 256,
) -> Path:
    """A cache from per-residue arrays made elsewhere (another embedder, synthetic data).

    ``arrays`` yields one (len(sequence), D) array per record, in order; identical sequences
    must come with identical arrays (the first is kept). Written through the same crash-safe
    path as extraction.
    """
    path = Path(path)
    arrays = iter(arrays)
    first = next(arrays)
    provenance = {
        "model": model, "architecture": model, "weights": "none", "weights_sha256": "none",
        "num_layers": layer, "embed_dim": int(first.shape[1]), "max_residues": "none",
        "layers": np.array([layer], dtype=np.int64), "dtype": dtype, "precision": "external",
        "long_policy": "none", "max_length": "none", "chunk_overlap": 0,
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"embedcache.store.write_arrays({model!r})",
    }
    seen: set[str] = set()
    with CacheWriter(path, provenance) as writer:
        pending: list[EmbeddedEntry] = []
        for rec, rows in zip(records, _chain(first, arrays)):
            if len(rows) != len(rec.sequence):
                raise ValueError(f"{rec.id}: {len(rows)} rows for {len(rec.sequence)} residues")
            if rec.key in seen or writer.is_done(rec.key):
                continue
            seen.add(rec.key)
            entry = Entry(rec.key, rec.sequence, Status.FULL, len(rec.sequence))
            pending.append(EmbeddedEntry(entry, {layer: rows}, {layer: rows.astype(np.float32).mean(0)}))
            if len(pending) == batch:
                writer.write_part(pending)
                pending = []
        if pending:
            writer.write_part(pending)
        writer.finish(records, set())
    return path


def _chain(first, rest):
    yield first
    yield from rest
