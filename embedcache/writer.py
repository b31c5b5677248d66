"""Writing a cache crash-safely: the writer lock, parts of an unfinished run, consolidation.

The cache file is only ever replaced whole (written as ``FILE.tmp`` through
:func:`embedcache.atomic.atomic_h5`, then renamed). During a run each finished work item
goes to its own small file in ``FILE.parts/``, written the same way, so ``kill -9`` at any
moment loses at most the item in progress. The parts directory appears at once with its
``settings.json`` (made under a temporary name and renamed), and every part carries the
settings it was made with and checksums of its datasets, so that a part from another model
or a damaged part is never folded in. The next run reuses the parts and, at the end, writes
a new cache file holding the old contents, the parts, and the new IDs. A lock file keeps a
second writer out. Every path here is the cache's real path, links resolved: a link to a
cache and the cache itself share one lock, one parts directory and one temporary file.

Contents are reproducible, not independent of history: a file finished after any number of
interruptions equals one from an uninterrupted run with the same settings, token budget,
machine and thread count (an interrupted run resumes with the same work items). A sequence
embedded in another batch (a larger input, another ``--toks-per-batch``) can differ in the
last bits of its values, by float rounding: up to one fp16 step (about 2e-3 here).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import atomic_h5, fsync_dir, real_path, write_json
from .batching import Entry, Status, sort_key
from .layout import (
    CONTENT_SETTINGS,
    DEFAULT_STORE,
    FORMAT,
    KEY_DTYPE,
    STR_DTYPE,
    CacheDamagedError,
    CacheError,
    CacheLockedError,
    attrs_digest,
    checksum,
    format_version_for,
    jsonable,
    lock_path,
    parts_dir,
    provenance_attrs,
    settings_of,
    stores_pooled,
    stores_residues,
    verify_table,
    with_default_store,
    write_table,
)
from .reader import H5_ERRORS, EmbeddingCache, _decode
from .sequences import IndexedRecord, Record, RecordIndex

# The input's records as the writer needs them: IDs, headers and keys (the sequences are in the entries).
Records = Sequence[Record] | RecordIndex

log = logging.getLogger(__name__)

PART_FORMAT = "embedcache-part"


class WriterLock:
    """An exclusive ``flock`` on ``FILE.lock`` (of the real path); the kernel drops it if the process dies."""

    def __init__(self, path: Path):
        self.path = lock_path(path)
        self.fd: int | None = None

    def acquire(self) -> WriterLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            locked = False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    if err.errno in (errno.EAGAIN, errno.EACCES):
                        raise CacheLockedError(
                            f"{self.path.with_suffix('')}: another embedcache process (pid {holder}) is writing "
                            "this cache; wait for it to finish or write to another file"
                        ) from None
                    raise
                locked = True
                # The previous holder may have unlinked the file between our open and flock.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    try:
                        os.ftruncate(fd, 0)
                        os.write(fd, str(os.getpid()).encode())
                    except OSError:
                        pass  # the pid is for messages only; a full disk must not stop the lock
                    self.fd = fd
                    return self
            except BaseException:
                # Interrupted half-way (a signal) or refused: leave no lock file of ours behind.
                if locked:
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                raise
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


@dataclass
class EmbeddedEntry:
    """One sequence's results: per-residue arrays and pooled vectors per layer (float32).

    Either dict may be empty when the cache does not keep that kind (``store``).
    """

    entry: Entry
    per_residue: dict[int, np.ndarray]
    pooled: dict[int, np.ndarray]


@dataclass
class _Part:
    """A part file's contents, read whole and checked."""

    keys: list[str]
    sequences: list[str]
    status: np.ndarray
    n_residues: np.ndarray
    starts: np.ndarray
    row: dict[str, int]
    per_residue: dict[int, np.ndarray]
    pooled: dict[int, np.ndarray]


class CacheWriter:
    """Writes one cache file for one extraction run. Use as a context manager (it holds the lock)."""

    def __init__(self, path: Path | str, provenance: dict):
        self.path = real_path(path)
        self.provenance = provenance_attrs(with_default_store(provenance))
        self.settings = {name: jsonable(self.provenance[name]) for name in CONTENT_SETTINGS}
        self.store = self.settings["store"]
        self.parts = parts_dir(self.path)
        self._lock = WriterLock(self.path)
        self._existing_keys: set[str] = set()
        self._existing_ids: dict[str, str] = {}
        self.existing_attrs: dict = {}  # the existing file's root attributes; empty when there is none yet
        self._part_keys: dict[str, Path] = {}

    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._remove_stale_temporaries()
            self._read_existing()
            self._read_parts()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _remove_stale_temporaries(self) -> None:
        """What a killed run can leave besides parts: a parts directory being made, a cache.tmp."""
        for stale in self.path.parent.glob(f"{glob.escape(self.parts.name)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path.with_name(self.path.name + ".tmp").unlink(missing_ok=True)

    def _check_settings(self, found: dict, where: str) -> None:
        found = with_default_store(found)
        differ = {k: (found.get(k), self.settings[k]) for k in CONTENT_SETTINGS if found.get(k) != self.settings[k]}
        if differ:
            detail = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            hint = ""
            if "store" in differ:
                # One file holds one kind of contents: a pooled-only file cannot gain residues for some proteins.
                kept = str(differ["store"][0])
                hint = f" It keeps {_STORE_WORDS.get(kept, kept)}: extend it with --store {kept}."
            raise CacheError(
                f"{where} was made with other settings ({detail}).{hint} Use the same settings to extend it, "
                "or write to a new file."
            )

    def _read_existing(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise CacheError(f"{self.path}: exists and is not a regular file (a directory, FIFO or device); "
                             "refusing to touch it")
        try:
            with h5py.File(self.path, "r") as f:
                is_cache = f.attrs.get("format") == FORMAT
        except H5_ERRORS as err:
            raise CacheError(f"{self.path}: cannot be read as HDF5 ({err})") from None
        if not is_cache:
            raise CacheError(f"{self.path}: exists and is not an embedcache file; refusing to touch it")
        # The reader checks the format version, checksums and the ID index.
        with EmbeddingCache(self.path) as cache:
            self._check_settings(settings_of(cache.attrs), str(self.path))
            self.existing_attrs = dict(cache.attrs)
            self._existing_keys = set(cache._keys)
            ids, _, keys = cache.all_ids()
            self._existing_ids = dict(zip(ids, keys))

    def _read_parts(self) -> None:
        if not self.parts.exists():
            return
        settings_file = self.parts / "settings.json"
        have_settings = False
        if settings_file.exists():
            try:
                found = json.loads(settings_file.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable; each part's own settings are checked instead", settings_file)
            else:
                self._check_settings(found, f"{self.parts} (an interrupted run)")
                have_settings = True
        for tmp in self.parts.glob("*.tmp"):
            tmp.unlink()  # an item whose writing was cut off: it is redone
        for part in sorted(self.parts.glob("part-*.h5")):
            try:
                with h5py.File(part, "r") as f:
                    own = f.attrs.get("settings")
                    if own is not None:
                        self._check_settings(json.loads(own), f"{part} (a part of an interrupted run)")
                    elif not have_settings:
                        log.warning("%s: a part of unknown settings; its sequences will be embedded again", part)
                        part.unlink()
                        continue
                    keys = f["key"][:]
                    verify_table(f["key"], keys, part, required=own is not None)
                    for key in _decode(keys):
                        self._part_keys.setdefault(key, part)
            except (CacheDamagedError, *H5_ERRORS) as err:
                if isinstance(err, CacheError) and not isinstance(err, CacheDamagedError):
                    raise
                log.warning("%s: unreadable part file, its sequences will be embedded again (%s)", part, err)
                part.unlink()
        if self._part_keys:
            log.info("resuming: %d sequences embedded by an interrupted run", len(self._part_keys))

    def check_ids(self, records: Records) -> None:
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

    def _make_parts_dir(self) -> None:
        """The parts directory appears complete, settings.json inside, or not at all."""
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{self.parts.name}.tmp-", dir=self.parts.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would differ from a plain mkdir's permissions
            write_json(tmp / "settings.json", self.settings, sort_keys=True)
            os.rename(tmp, self.parts)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.parts.parent)

    def write_part(self, results: Sequence[EmbeddedEntry]) -> Path:
        """Write one work item's results atomically to the parts directory."""
        if not self.parts.exists():
            self._make_parts_dir()
        name = f"part-{results[0].entry.key[:20]}-{len(results)}.h5"
        path = self.parts / name
        with atomic_h5(path) as f:
            _write_entries(f, results, self.provenance["layers"], self.provenance["dtype"], self.settings)
        for r in results:
            self._part_keys[r.entry.key] = path
        return path

    def finish(self, records: Records, skipped_keys: set[str]) -> bool:
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


_STORE_WORDS = {
    "both": "per-residue arrays and pooled vectors",
    "pooled": "pooled vectors only",
    "per-residue": "per-residue arrays only",
}


def _write_entries(f: h5py.File, results: Sequence[EmbeddedEntry], layers, dtype: str, settings: dict) -> None:
    store = settings["store"]
    f.attrs.update(format=PART_FORMAT, format_version=format_version_for(store),
                   settings=json.dumps(settings, sort_keys=True))
    write_table(f, "key", [r.entry.key for r in results], KEY_DTYPE)
    write_table(f, "sequence", [r.entry.sequence for r in results], STR_DTYPE)
    write_table(f, "status", [int(r.entry.status) for r in results], np.uint8)
    write_table(f, "n_residues", [r.entry.n_residues for r in results], np.int64)
    for layer in layers:
        if stores_residues(store):
            write_table(f, f"L{layer}/per_residue", np.concatenate([r.per_residue[layer] for r in results]), dtype)
        if stores_pooled(store):
            write_table(f, f"L{layer}/pooled", np.stack([r.pooled[layer] for r in results]), dtype)


def _load_part(path: Path, layers: list[int], store: str = DEFAULT_STORE) -> _Part:
    """A part's datasets, each checked against its checksum (parts of format 1 have none)."""
    try:
        with h5py.File(path, "r") as f:
            checked = f.attrs.get("settings") is not None

            def table(name):
                values = f[name][:]
                verify_table(f[name], values, path, required=checked)
                return values

            counts = table("n_residues").astype(np.int64)
            part = _Part(
                keys=_decode(table("key")),
                sequences=_decode(table("sequence")),
                status=table("status"),
                n_residues=counts,
                starts=np.concatenate([[0], np.cumsum(counts)]),
                row={},
                per_residue={l: table(f"L{l}/per_residue") for l in layers} if stores_residues(store) else {},
                pooled={l: table(f"L{l}/pooled") for l in layers} if stores_pooled(store) else {},
            )
    except (CacheDamagedError, *H5_ERRORS) as err:
        path.unlink(missing_ok=True)
        raise CacheDamagedError(
            f"{path}: a part of this run is damaged and has been removed ({err}); "
            "run the same command again to embed its sequences again"
        ) from None
    if not (len(part.keys) == len(part.sequences) == len(part.status) == len(counts)) or any(
        a.shape[0] != part.starts[-1] for a in part.per_residue.values()
    ) or any(a.shape[0] != len(counts) for a in part.pooled.values()):
        path.unlink(missing_ok=True)
        raise CacheDamagedError(f"{path}: a part with inconsistent tables has been removed; run the same command again")
    part.row = {k: i for i, k in enumerate(part.keys)}
    return part


class _Parts:
    """Loaded parts, a few at a time: consecutive entries mostly come from the same part."""

    def __init__(self, layers: list[int], store: str = DEFAULT_STORE, keep: int = 4):
        self.layers, self.store, self.keep = layers, store, keep
        self.loaded: dict[Path, _Part] = {}

    def get(self, path: Path) -> _Part:
        if path not in self.loaded:
            if len(self.loaded) >= self.keep:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[path] = _load_part(path, self.layers, self.store)
        return self.loaded[path]


def _consolidate(
    path: Path,
    provenance: dict,
    part_of: dict[str, Path],
    new_keys: list[str],
    new_ids: list[Record | IndexedRecord],
) -> None:
    """Write old contents + new entries + new IDs into a fresh file and swap it in.

    New entries follow the old ones in :func:`batching.sort_key` order, so the order of rows
    does not depend on how many runs it took to embed them.
    """
    layers = [int(x) for x in provenance["layers"]]
    store = provenance.get("store", DEFAULT_STORE)
    residues, pooled_kept = stores_residues(store), stores_pooled(store)
    parts = _Parts(layers, store)
    new_entries = []
    for key in new_keys:
        part = parts.get(part_of[key])
        i = part.row[key]
        new_entries.append(Entry(key, part.sequences[i], Status(int(part.status[i])), int(part.n_residues[i])))
    new_entries.sort(key=sort_key)
    dim, dtype = int(provenance["embed_dim"]), provenance["dtype"]
    old = EmbeddingCache(path) if path.exists() else None
    try:
        if old is not None:
            old_columns = {
                "key": list(old._keys),
                "sequence": old.all_sequences(),
                "length": old._lengths.tolist(),
                "n_residues": old._n_stored.tolist(),
                "status": old._status.tolist(),
            }
            old_offsets = old._offsets
            old_attrs = dict(old._file.attrs)
        else:
            old_columns, old_offsets, old_attrs = {name: [] for name in _COLUMNS}, np.zeros(1, dtype=np.int64), {}
        n_old = len(old_offsets) - 1
        # Under --store pooled no residue is stored: every sequence's rows are the empty range 0:0.
        counts = np.array([e.n_residues if residues else 0 for e in new_entries], dtype=np.int64)
        offsets = np.concatenate([old_offsets, old_offsets[-1] + np.cumsum(counts)]).astype(np.int64)
        new_columns = {
            "key": [e.key for e in new_entries],
            "sequence": [e.sequence for e in new_entries],
            "length": [e.length for e in new_entries],
            "n_residues": [e.n_residues for e in new_entries],
            "status": [int(e.status) for e in new_entries],
        }
        with atomic_h5(path) as out:
            for name, dtype_ in _COLUMNS.items():
                write_table(out, f"sequences/{name}", old_columns[name] + new_columns[name], dtype_)
            write_table(out, "sequences/offset", offsets, np.int64)

            n = len(offsets) - 1
            for l in layers:
                if residues:
                    rows = out.create_dataset(f"L{l}/per_residue", shape=(int(offsets[-1]), dim), dtype=dtype)
                    sums = np.zeros(n, dtype=np.uint64)
                    if old is not None:
                        for start, stop, slab, slab_sums in old.iter_residue_blocks(l):
                            rows[int(old_offsets[start]) : int(old_offsets[stop])] = slab
                            sums[start:stop] = slab_sums
                if pooled_kept:
                    pooled = np.zeros((n, dim), dtype=dtype)
                    if old is not None:
                        pooled[:n_old] = old.pooled_rows(np.arange(n_old), l)
                for i, entry in enumerate(new_entries, n_old):
                    part = parts.get(part_of[entry.key])
                    j = part.row[entry.key]
                    if residues:
                        data = part.per_residue[l][part.starts[j] : part.starts[j + 1]]
                        rows[offsets[i] : offsets[i + 1]] = data
                        sums[i] = checksum(data)
                    if pooled_kept:
                        pooled[i] = part.pooled[l][j]
                if residues:
                    write_table(out, f"L{l}/per_residue_checksum", sums, np.uint64)
                if pooled_kept:
                    write_table(out, f"L{l}/pooled", pooled, dtype)

            keys = old_columns["key"] + new_columns["key"]
            _write_ids(out, old, new_ids, {k: i for i, k in enumerate(keys)})

            attrs = dict(old_attrs)
            attrs.update(provenance)
            attrs["created"] = old_attrs["created"] if old is not None else provenance["updated"]
            attrs["commands"] = json.dumps(
                (json.loads(old_attrs["commands"]) if old is not None else []) + [attrs.pop("command")]
            )
            attrs.update(format=FORMAT, format_version=format_version_for(store))
            attrs.pop("attrs_checksum", None)
            out.attrs.update(attrs)
            out.attrs["attrs_checksum"] = attrs_digest(out.attrs)
    finally:
        if old is not None:
            old.close()


_COLUMNS = {"key": KEY_DTYPE, "sequence": STR_DTYPE, "length": np.int32, "n_residues": np.int32, "status": np.uint8}


def _write_ids(out: h5py.File, old: EmbeddingCache | None, new_ids: list[Record | IndexedRecord],
               key_index: dict[str, int]) -> None:
    if old is not None:
        ids, headers, keys = old.all_ids()
    else:
        ids, headers, keys = [], [], []
    ids += [r.id for r in new_ids]
    headers += [r.header for r in new_ids]
    keys += [r.key for r in new_ids]
    write_table(out, "ids/id", ids, STR_DTYPE)
    write_table(out, "ids/header", headers, STR_DTYPE)
    write_table(out, "ids/key", keys, KEY_DTYPE)
    write_table(out, "ids/index", [key_index.get(k, -1) for k in keys], np.int64)
    without = sum(1 for k in keys if k not in key_index)
    if without:
        log.info("%d IDs have no embedding (longer than max_length under --long skip)", without)


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
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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
