"""Reading a cache: :class:`EmbeddingCache`, and :func:`verify_cache` for a whole-file check.

Everything read is checked before it is returned: the small tables (sequences, IDs) and the
root attributes against their checksums when the file is opened, a pooled matrix when it is
first read, and each protein's per-residue rows on every read. Damage, and any error h5py
raises on a damaged file, becomes a :class:`CacheDamagedError` naming the file, the dataset
and, for residue rows, the protein; never a wrong array.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .batching import Status
from .layout import (
    DEFAULT_STORE,
    STORES,
    CacheDamagedError,
    CacheError,
    attrs_digest,
    check_format,
    checksum,
    jsonable,
    parts_dir,
    stores_pooled,
    stores_residues,
    verify_table,
)

# What h5py and numpy raise when a file's structure or contents are damaged.
H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, IndexError, TypeError, UnicodeError, AttributeError)

NO_CHECKSUMS = "no checksums: written by embedcache < 0.2 (format version 1); damage cannot be detected"


def lock_holder(path: Path | str) -> str | None:
    """The pid (as written in the lock file) of a process writing ``path`` now, else None.

    A shared, non-blocking ``flock`` attempt: it fails only while a writer holds the lock.
    """
    import fcntl
    import os

    from .layout import lock_path

    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def count_parts(path: Path | str) -> int:
    pending = parts_dir(path)
    return len(list(pending.glob("part-*.h5"))) if pending.is_dir() else 0


def _sequence_key(sequence: str) -> str:
    return hashlib.sha1(sequence.upper().encode("utf-8", errors="replace")).hexdigest()


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class EmbeddingCache:
    """Read access to a cache file; cheap to open, reads one protein in tens of microseconds.

    >>> cache = EmbeddingCache("proteins.h5")
    >>> X = cache.pooled(cache.ids)            # (n, D) matrix, one row per ID
    >>> R = cache.per_residue(cache.ids[0])    # (L, D) residues of one protein

    Arrays come back in the stored dtype (float16 unless the cache was written as float32);
    ``layer`` defaults to the highest stored layer. ``verify=False`` skips the per-protein
    checksum on residue reads (the tables are checked regardless).

    A cache made with ``--store pooled`` has no per-residue arrays: reading them raises a
    :class:`CacheError`. One made with ``--store per-residue`` has no pooled matrix: a pooled
    read is the mean of the stored residues, computed when first asked for.
    """

    def __init__(self, path: Path | str, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        if not self.path.exists():
            parts = count_parts(self.path)
            holder = lock_holder(self.path)
            if holder is not None:
                raise CacheError(
                    f"{self.path}: being written now by process {holder} ({parts} parts so far); "
                    "it can be read once that run finishes"
                )
            if parts_dir(self.path).exists():
                raise CacheError(
                    f"{self.path}: not finished yet; an interrupted run left {parts} parts. "
                    "Run the same extract command again to complete it."
                )
            raise CacheError(f"{self.path}: no such cache file")
        if not self.path.is_file():
            # h5py would block forever on a FIFO, and call a directory damaged.
            raise CacheError(f"{self.path}: not a regular file (a directory, FIFO or device), so not a cache")
        try:
            self._file = h5py.File(self.path, "r")
        except H5_ERRORS as err:
            raise CacheDamagedError(f"{self.path}: cannot be read as HDF5 ({err})") from None
        try:
            self._open()
        except CacheError:
            self._file.close()
            raise
        except H5_ERRORS as err:
            self._file.close()
            raise CacheDamagedError(f"{self.path}: damaged, cannot be read ({err.__class__.__name__}: {err})") from None

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn h5py's errors on a damaged file into a CacheDamagedError naming ``what``."""
        try:
            yield
        except CacheError:
            raise
        except H5_ERRORS as err:
            raise CacheDamagedError(
                f"{self.path}: {what} cannot be read; the file is damaged ({err.__class__.__name__}: {err})"
            ) from None

    def _table(self, name: str) -> np.ndarray:
        dataset = self._file[name]
        values = dataset[:]
        if self.has_checksums:
            verify_table(dataset, values, self.path)
        return values

    def _open(self) -> None:
        f = self._file
        self.format_version = check_format(f.attrs, self.path)
        self.has_checksums = self.format_version >= 2
        if self.has_checksums:
            stored = jsonable(f.attrs.get("attrs_checksum"))
            if stored != attrs_digest(f.attrs):
                raise CacheDamagedError(
                    f"{self.path}: the file's attributes do not match their checksum; the file is damaged"
                )
        self.attrs = {name: jsonable(value) for name, value in f.attrs.items()}
        self._store = str(self.attrs.get("store", DEFAULT_STORE))
        if self._store not in STORES:
            raise CacheDamagedError(f"{self.path}: store attribute {self._store!r} is none of {STORES}; the file is "
                                    "damaged, or written by a newer embedcache")
        self.layers = [int(x) for x in np.atleast_1d(f.attrs["layers"])]
        self._offsets = self._table("sequences/offset").astype(np.int64)
        self._status = self._table("sequences/status")
        self._lengths = self._table("sequences/length")
        self._n_stored = self._table("sequences/n_residues")
        self._keys = _decode(self._table("sequences/key"))
        all_ids = _decode(self._table("ids/id"))
        index = self._table("ids/index").astype(np.int64)
        id_keys = _decode(self._table("ids/key"))
        headers = _decode(self._table("ids/header"))
        self._check_structure(all_ids, index, id_keys, headers)
        # Python ints slice h5py datasets faster than numpy ones, and looking a dataset up by
        # path costs about as much as reading a small protein: keep both at hand.
        self._bounds = self._offsets.tolist()
        self._residue_sets: dict[int, h5py.Dataset] = {}
        self._row_sums: dict[int, list[int]] = {}
        self._row = {i: int(r) for i, r in zip(all_ids, index) if r >= 0}
        self.ids = [i for i, r in zip(all_ids, index) if r >= 0]
        self.skipped_ids = [i for i, r in zip(all_ids, index) if r < 0]
        self._headers = dict(zip(all_ids, headers))
        self._all_ids, self._header_list, self._id_keys = all_ids, headers, id_keys
        self._pooled: dict[int, np.ndarray] = {}
        # Under --store per-residue: which rows of _pooled have been computed from their residues.
        self._pooled_done: dict[int, np.ndarray] = {}
        self._id_of_row: dict[int, str] | None = None

    def _check_structure(self, all_ids, index, id_keys, headers) -> None:
        """Consistency of the tables with each other; catches damage in files without checksums too."""
        n = len(self._keys)

        def bad(what: str) -> CacheDamagedError:
            return CacheDamagedError(f"{self.path}: {what}; the file is damaged")

        if len(self._offsets) != n + 1 or (n + 1 and self._offsets[0] != 0) or (np.diff(self._offsets) < 0).any():
            raise bad("sequences/offset is not an index of the stored sequences")
        if not len(self._status) == len(self._lengths) == len(self._n_stored) == n:
            raise bad("the sequences/ tables have different lengths")
        if self.stores_residues:
            if not np.array_equal(np.diff(self._offsets), self._n_stored):
                raise bad("sequences/offset and sequences/n_residues disagree")
        elif self._offsets[-1] != 0:
            raise bad("sequences/offset points at residues, but the file keeps pooled vectors only")
        if not len(all_ids) == len(index) == len(id_keys) == len(headers):
            raise bad("the ids/ tables have different lengths")
        if len(set(all_ids)) != len(all_ids):
            raise bad("ids/id holds an ID twice")
        row_of_key = {k: r for r, k in enumerate(self._keys)}
        if len(row_of_key) != n:
            raise bad("sequences/key holds a sequence twice")
        for ident, row, key in zip(all_ids, index.tolist(), id_keys):
            if row_of_key.get(key, -1) != row:
                raise bad(f"ids/index and ids/key disagree for ID {ident!r}")
        for layer in self.layers:
            group = self._file[f"L{layer}"]
            shapes = []
            if self.stores_residues:
                rows = group["per_residue"]
                if rows.shape[0] != self._offsets[-1]:
                    raise bad(f"the shape of L{layer}/per_residue does not match the index")
                shapes.append(rows.shape[1:])
            if self.stores_pooled:
                pooled = group["pooled"]
                if pooled.shape[0] != n:
                    raise bad(f"the shape of L{layer}/pooled does not match the index")
                shapes.append(pooled.shape[1:])
            if len(shapes[0]) != 1 or len(set(shapes)) != 1:
                raise bad(f"L{layer}/per_residue and L{layer}/pooled do not have the same width")
        self._key_row = row_of_key

    # -- what the file keeps -------------------------------------------------------------
    @property
    def store(self) -> str:
        """"both", "pooled" (no per-residue arrays) or "per-residue" (pooled vectors computed on read)."""
        return self._store

    @property
    def stores_residues(self) -> bool:
        return stores_residues(self._store)

    @property
    def stores_pooled(self) -> bool:
        return stores_pooled(self._store)

    def _no_residues(self) -> CacheError:
        return CacheError(
            f"{self.path}: was made with --store pooled and holds pooled vectors only, no per-residue arrays; "
            "extract the proteins again with --store both (or per-residue) into another file to read residues"
        )

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

    def _name_of_row(self, row: int) -> str:
        if self._id_of_row is None:
            self._id_of_row = {}
            for ident, r in self._row.items():
                self._id_of_row.setdefault(r, ident)
        return self._id_of_row.get(row, f"sequence {self._keys[row]}")

    def header(self, ident: str) -> str:
        return self._headers[ident]

    def _sequence_row(self, row: int) -> str:
        with self._reading("sequences/sequence"):
            seq = self._file["sequences/sequence"].asstr()[row]
        if _sequence_key(seq) != self._keys[row] or len(seq) != self._lengths[row]:
            raise CacheDamagedError(
                f"{self.path}: sequences/sequence of {self._name_of_row(row)!r} does not match its key; "
                "the file is damaged"
            )
        return seq

    def sequence(self, ident: str) -> str:
        return self._sequence_row(self._row_of(ident))

    def _valid_rows(self, rows) -> np.ndarray:
        """Row numbers as an int64 array; a negative or too large one is an IndexError, never numpy's
        count-from-the-end (which would silently read another protein)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = len(self._offsets) - 1
        bad = rows[(rows < 0) | (rows >= n)]
        if len(bad):
            raise IndexError(f"{self.path}: rows {bad[:5].tolist()} out of range; the cache has rows 0..{n - 1}")
        return rows

    def sequences_rows(self, rows: Sequence[int]) -> list[str]:
        return [self._sequence_row(int(r)) for r in self._valid_rows(rows)]

    def key(self, ident: str) -> str:
        return self._keys[self._row_of(ident)]

    def status(self, ident: str) -> Status:
        return Status(int(self._status[self._row_of(ident)]))

    def length(self, ident: str) -> int:
        """Residues in the sequence (more than are stored when it was truncated)."""
        return int(self._lengths[self._row_of(ident)])

    def n_residues(self, ids: Sequence[str]) -> np.ndarray:
        """Rows stored for each ID: what ``per_residue`` returns (under --store pooled: what the
        pooled vector is the mean of)."""
        return self.n_residues_rows(self.rows(ids))

    # -- by content ----------------------------------------------------------------------
    def rows(self, ids: Sequence[str] | None = None, keys: Sequence[str] | None = None) -> np.ndarray:
        """Storage rows of IDs, or of content keys (``embedcache.sequences.sequence_key``).

        The cache is content-addressed: a labelled file whose IDs differ from the ones the
        cache was built with still finds its sequences through their keys.
        """
        if ids is not None and keys is None:
            return np.array([self._row_of(i) for i in ids], dtype=np.int64)
        if ids is not None or keys is None:
            raise TypeError("give ids or keys")
        missing = [k for k in keys if k not in self._key_row]
        if missing:
            raise KeyError(f"{len(missing)} of {len(keys)} sequences have no embedding in {self.path}")
        return np.array([self._key_row[k] for k in keys], dtype=np.int64)

    def has_keys(self, keys: Sequence[str]) -> np.ndarray:
        return np.array([k in self._key_row for k in keys], dtype=bool)

    def n_residues_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = self._valid_rows(rows)
        # Equal to the offsets' differences wherever residues are stored (checked on opening).
        return self._n_stored[rows].astype(np.int64)

    def pooled_rows(self, rows: np.ndarray | Sequence[int], layer: int | None = None) -> np.ndarray:
        layer = self._layer(layer)
        rows = self._valid_rows(rows)
        if not self.stores_pooled:
            return self._pooled_from_residues(rows, layer)
        if layer not in self._pooled:
            with self._reading(f"L{layer}/pooled"):
                self._pooled[layer] = self._table(f"L{layer}/pooled")
        return self._pooled[layer][rows]

    def _pooled_from_residues(self, rows: np.ndarray, layer: int, block: int = 256) -> np.ndarray:
        """Means of the stored residues (--store per-residue), each row computed once and kept.

        The extraction refuses this store for models whose pooled vector is not the mean of
        the residues alone. The mean is of the stored (rounded) values, so it differs from a
        ``both`` cache's pooled vector by the storage rounding, about 1e-3 relative in float16.
        """
        data = self._residues(layer)
        if layer not in self._pooled:
            self._pooled[layer] = np.zeros((len(self._keys), data.shape[1]), dtype=data.dtype)
            self._pooled_done[layer] = np.zeros(len(self._keys), dtype=bool)
        pooled, done = self._pooled[layer], self._pooled_done[layer]
        todo = np.unique(rows[~done[rows]])
        for start in range(0, len(todo), block):
            chunk = todo[start : start + block]
            for row, residues in zip(chunk.tolist(), self.per_residue_rows(chunk, layer)):
                pooled[row] = residues.mean(axis=0, dtype=np.float64)
            done[chunk] = True
        return pooled[rows]

    def _checked(self, layer: int, row: int, rows: np.ndarray) -> np.ndarray:
        if self.verify and self.has_checksums:
            sums = self._row_sums.get(layer)
            if sums is None:
                with self._reading(f"L{layer}/per_residue_checksum"):
                    sums = self._row_sums[layer] = self._table(f"L{layer}/per_residue_checksum").tolist()
                    if len(sums) != len(self._keys):
                        raise CacheDamagedError(f"{self.path}: L{layer}/per_residue_checksum has the wrong length")
            if checksum(rows) != sums[row]:
                raise CacheDamagedError(
                    f"{self.path}: L{layer}/per_residue rows of {self._name_of_row(row)!r} do not match their "
                    "checksum; the file is damaged"
                )
        return rows

    def per_residue_rows(self, rows: np.ndarray | Sequence[int], layer: int | None = None) -> list[np.ndarray]:
        """Per-residue arrays of several rows, one slab read when they lie close together."""
        rows = self._valid_rows(rows).tolist()
        if not rows:
            return []
        layer = self._layer(layer)
        data, bounds = self._residues(layer), self._bounds
        lo, hi = min(rows), max(rows)
        with self._reading(f"L{layer}/per_residue"):
            if bounds[hi + 1] - bounds[lo] <= 2 * sum(bounds[r + 1] - bounds[r] for r in rows):
                base = bounds[lo]
                slab = data[base : bounds[hi + 1]]
                out = [slab[bounds[r] - base : bounds[r + 1] - base] for r in rows]
            else:
                out = [data[bounds[r] : bounds[r + 1]] for r in rows]
        return [self._checked(layer, r, a) for r, a in zip(rows, out)]

    # -- arrays --------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self._first_dataset(self.layers[-1]).shape[1])

    def _first_dataset(self, layer: int) -> h5py.Dataset:
        """A stored dataset of the layer (residues or pooled, whichever there is): its width and dtype."""
        if self.stores_residues:
            return self._residues(layer)
        with self._reading(f"L{layer}/pooled"):
            return self._file[f"L{layer}/pooled"]

    def _residues(self, layer: int | None) -> h5py.Dataset:
        if not self.stores_residues:
            raise self._no_residues()
        layer = self._layer(layer)
        if layer not in self._residue_sets:
            with self._reading(f"L{layer}/per_residue"):
                self._residue_sets[layer] = self._file[f"L{layer}/per_residue"]
        return self._residue_sets[layer]

    def per_residue(self, ident: str, layer: int | None = None) -> np.ndarray:
        row = self._row_of(ident)
        layer = self._layer(layer)
        data = self._residues(layer)
        with self._reading(f"L{layer}/per_residue"):
            rows = data[self._bounds[row] : self._bounds[row + 1]]
        return self._checked(layer, row, rows)

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

    # -- whole-file access for the writer and verify ---------------------------------------
    def all_ids(self) -> tuple[list[str], list[str], list[str]]:
        """Every ID (skipped ones too), its header and its sequence's key, in stored order."""
        return list(self._all_ids), list(self._header_list), list(self._id_keys)

    def all_sequences(self) -> list[str]:
        """Every stored sequence, in row order, each checked against its content key."""
        with self._reading("sequences/sequence"):
            seqs = list(self._file["sequences/sequence"].asstr()[:])
        if len(seqs) != len(self._keys):
            raise CacheDamagedError(f"{self.path}: sequences/sequence has the wrong length; the file is damaged")
        for row, seq in enumerate(seqs):
            if _sequence_key(seq) != self._keys[row] or len(seq) != self._lengths[row]:
                raise CacheDamagedError(
                    f"{self.path}: sequences/sequence of {self._name_of_row(row)!r} does not match its key; "
                    "the file is damaged"
                )
        return seqs

    def iter_residue_blocks(
        self, layer: int, block_rows: int = 1 << 16
    ) -> Iterator[tuple[int, int, np.ndarray, list[int]]]:
        """(first row, past-last row, their residues, their checksums) in blocks of whole sequences.

        Stored checksums are checked when the file has them; a file without them gets them computed.
        """
        n, bounds = len(self._keys), self._bounds
        data = self._residues(layer)
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and bounds[stop + 1] - bounds[start] <= block_rows:
                stop += 1
            with self._reading(f"L{layer}/per_residue"):
                slab = data[bounds[start] : bounds[stop]]
            base = bounds[start]
            sums = []
            for row in range(start, stop):
                rows = slab[bounds[row] - base : bounds[row + 1] - base]
                if self.has_checksums and self.verify:
                    self._checked(layer, row, rows)
                    sums.append(self._row_sums[layer][row])
                else:
                    sums.append(checksum(rows))
            yield start, stop, slab, sums
            start = stop

    # -- description ---------------------------------------------------------------------
    def info(self) -> dict:
        counts = {s.name.lower(): int((self._status == s).sum()) for s in (Status.TRUNCATED, Status.CHUNKED)}
        first = self._first_dataset(self.layers[0])
        return {
            "path": str(self.path),
            "file_size_bytes": self.path.stat().st_size,
            "ids": len(self.ids) + len(self.skipped_ids),
            "ids_embedded": len(self.ids),
            "ids_skipped": len(self.skipped_ids),
            "unique_sequences": int(len(self._offsets) - 1),
            "store": self.store,
            "residues_stored": int(self._offsets[-1]),
            "residues_embedded": int(self._n_stored.sum()),
            "truncated": counts["truncated"],
            "chunked": counts["chunked"],
            "embed_dim": int(first.shape[1]),
            "stored_dtype": str(first.dtype),
            "layers": self.layers,
            "format_version": self.format_version,
            "checksums": self.has_checksums,
            "pending_parts": parts_dir(self.path).exists(),
            "parts": count_parts(self.path),
            "writer_pid": lock_holder(self.path),
            "provenance": dict(sorted(self.attrs.items())),
        }

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.path)!r}: {len(self.ids)} IDs, layers {self.layers})"


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)  # damage found; empty when the file is sound
    notes: list[str] = field(default_factory=list)  # what could not be checked, pending writers

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path: Path | str, max_problems: int = 20) -> VerifyReport:
    """Check everything in a cache: attributes, tables, every protein's rows, pooled matrices, sequences."""
    report = VerifyReport(str(path))
    holder = lock_holder(path)
    if holder is not None:
        report.notes.append(f"being written now by process {holder} ({count_parts(path)} parts so far)")
    try:
        cache = EmbeddingCache(path)
    except CacheError as err:
        report.problems.append(str(err))
        return report
    with cache:
        if not cache.has_checksums:
            report.notes.append(NO_CHECKSUMS)
        checks: list[Callable[[], object]] = [cache.all_sequences]
        for layer in cache.layers:
            # Under --store per-residue pooled vectors are computed from the rows checked next.
            if cache.stores_pooled:
                checks.append(functools.partial(cache.pooled_rows, [], layer))
            if cache.stores_residues:
                checks.append(functools.partial(_verify_rows, cache, layer, report, max_problems))
        for check in checks:
            try:
                check()
            except CacheError as err:
                report.problems.append(str(err))
    if parts_dir(path).exists() and holder is None:
        report.notes.append(f"an interrupted run left {count_parts(path)} parts beside the file")
    return report


def _verify_rows(cache: EmbeddingCache, layer: int, report: VerifyReport, max_problems: int) -> None:
    bounds = cache._bounds
    for row in range(len(bounds) - 1):
        if len(report.problems) >= max_problems:
            report.problems.append("... (more problems not listed)")
            return
        try:
            cache.per_residue_rows([row], layer)
        except CacheError as err:
            report.problems.append(str(err))
