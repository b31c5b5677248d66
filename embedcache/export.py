"""Exporting a cache into formats other tools read: :func:`export_cache`.

Formats (``FORMATS``):

- ``esm-extract``: a directory with one ``.pt`` file per ID, the dict fair-esm's
  ``scripts/extract.py`` saves (``label``: the FASTA header line; ``representations`` and
  ``mean_representations``: ``{layer: float32 tensor}``, layers numbered 0..num_layers as
  extract.py numbers them; per-residue ``(residues stored, D)``, mean ``(D,)``), plus
  ``mapping.csv`` (ID, header, file, sequence key, status) and ``export.json``.
- ``bio-embeddings``: one HDF5 file, one dataset per unique sequence named by the md5 of the
  sequence, with attribute ``original_id``, as bio_embeddings writes its ``embeddings_file``
  (per-residue, ``(L, D)``) or, pooled, its ``reduced_embeddings_file`` (``(D,)``).
- ``npz``: one ``.npz`` file: ``ids``, ``headers``, ``sequence_keys``, ``pooled`` (one row per
  ID), ``metadata`` (JSON), and per-residue arrays ``residues_{i}`` aligned with ``ids``.
- ``npy``: a directory: ``pooled.npy`` (one row per line of ``ids.txt``), and per-residue
  ``per_residue.npy`` (every unique sequence's rows, concatenated) with ``bounds.npy``
  (``(n, 2)`` first and past-last row of each ID), plus ``export.json``.

Every export is written under a temporary name beside the output and renamed into place
when complete, so an interrupted export (``kill -9`` included) leaves no partial output; the
next export removes what it left. Per-residue arrays are read one protein at a time.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_h5, atomic_path, disk_full_error, fsync_dir, is_no_space, real_path
from .batching import Status
from .layout import CacheError
from .reader import EmbeddingCache

log = logging.getLogger(__name__)

FORMATS = ("esm-extract", "bio-embeddings", "npz", "npy")
DIRECTORY_FORMATS = ("esm-extract", "npy")
# The dtype each format is written in unless asked otherwise: what the consuming tool writes.
DEFAULT_DTYPE = {"esm-extract": "float32", "bio-embeddings": "float32", "npz": "stored", "npy": "stored"}
EXPORT_DTYPES = ("stored", "float16", "float32")
# Written first into a directory export and kept in it: it marks a directory as ours, so that a
# leftover staging folder, or an export being overwritten, can be removed without touching
# anything a user made.
MARKER = "export.json"
SAFE_NAME = re.compile(r"[A-Za-z0-9_.+=-]+")
MAX_NAME = 100
# Names Windows refuses whatever the extension; a share mounted from there refuses them too.
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


@dataclass
class ExportSummary:
    output: Path
    fmt: str
    layers: list[int]  # layers written, as numbered in the cache (and by fair-esm)
    ids: int  # IDs exported
    unique_sequences: int  # distinct sequences among them
    skipped: list[str] = field(default_factory=list)  # IDs without an embedding (skipped at extraction)
    per_residue: bool = True  # False: pooled vectors only
    dtype: str = "float32"
    seconds: float = 0.0


def safe_file_names(ids: list[str]) -> dict[str, str]:
    """A file name (without extension) for each ID; distinct for distinct IDs, on any file system.

    An ID made only of ``SAFE_NAME`` characters, not starting with a dot or dash, short enough, not a
    reserved device name and not equal to another ID apart from case, is used as it is. Any
    other becomes its safe characters (at most ``MAX_NAME``) and ``~`` plus 16 hex digits of its
    sha256; ``~`` never appears in an unchanged name, so a changed name cannot equal one.
    """
    folded: dict[str, int] = {}
    for ident in ids:
        key = unicodedata.normalize("NFC", ident).casefold()
        folded[key] = folded.get(key, 0) + 1
    names: dict[str, str] = {}
    for ident in ids:
        plain = (
            SAFE_NAME.fullmatch(ident) is not None
            and ident[0] not in ".-"  # hidden files, and names a shell command takes for options
            and len(ident) <= MAX_NAME
            and ident.split(".")[0].upper() not in RESERVED
            and folded[unicodedata.normalize("NFC", ident).casefold()] == 1
        )
        if plain:
            names[ident] = ident
        else:
            stem = "_".join(SAFE_NAME.findall(unicodedata.normalize("NFKD", ident)))[:MAX_NAME].lstrip(".-") or "id"
            digest = hashlib.sha256(ident.encode("utf-8", errors="surrogatepass")).hexdigest()
            names[ident] = f"{stem}~{digest[:16]}"
    seen: dict[str, str] = {}
    for ident, name in names.items():
        other = seen.setdefault(name.casefold(), ident)
        if other != ident:  # two sha256 prefixes alike: keep the whole digest
            digest = hashlib.sha256(ident.encode("utf-8", errors="surrogatepass")).hexdigest()
            names[ident] = f"{name.split('~')[0]}~{digest}"
    return names


def export_cache(
    cache_path: Path | str,
    fmt: str,
    out: Path | str,
    *,
    layer: int | None = None,
    pooled_only: bool = False,
    overwrite: bool = False,
    dtype: str | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Write the cache at ``cache_path`` to ``out`` in format ``fmt`` (one of ``FORMATS``).

    ``layer``: the layer to export (negative: counted from the model's last, -1 being the last);
    by default the highest stored, except ``esm-extract``,
    which writes every stored layer (as extract.py does for every ``--repr_layers``).
    ``pooled_only``: pooled vectors only (extract.py's ``--include mean``; bio_embeddings'
    reduced embeddings); a cache made with ``--store pooled`` is always exported so.
    ``dtype``: ``stored``, ``float16`` or ``float32``; by default float32 for esm-extract
    (extract.py saves float32; nothing else is allowed there) and bio-embeddings, the stored
    dtype for npz and npy. ``out`` must not exist unless ``overwrite``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    if fmt == "esm-extract" and dtype != "float32":
        raise ValueError("esm-extract files hold float32 tensors, as fair-esm's extract.py saves them; "
                         "--dtype cannot change that")
    start = time.perf_counter()
    cache_path, target = Path(cache_path), real_path(out)
    if target == real_path(cache_path):
        raise ValueError(f"{out}: is the cache being exported; choose another output")
    with EmbeddingCache(cache_path) as cache:
        store = getattr(cache, "store", "both")
        if store == "pooled":
            pooled_only = True
        if layer is not None:
            num_layers = cache.attrs.get("num_layers")
            if layer < 0 and isinstance(num_layers, int):  # -1: the model's last layer, as extract counts
                layer += num_layers + 1
            if layer not in cache.layers:
                raise ValueError(f"layer {layer} is not in {cache_path}; stored layers: {cache.layers}")
            layers = [layer]
        elif fmt == "esm-extract":
            layers = list(cache.layers)
        else:
            layers = [cache.layers[-1]]
        out_dtype = np.dtype(str(cache.attrs.get("dtype", "float16")) if dtype == "stored" else dtype)
        job = _Job(cache, fmt, layers, not pooled_only, out_dtype, store, progress)
        with _output_lock(target):
            _check_target(target, fmt, overwrite)
            if fmt in DIRECTORY_FORMATS:
                with _staged_dir(target, overwrite, job.metadata()) as staging:
                    if fmt == "esm-extract":
                        job.write_esm_extract(staging)
                    else:
                        job.write_npy(staging)
            elif fmt == "bio-embeddings":
                with atomic_h5(target) as h5:
                    job.write_bio_embeddings(h5)
            else:
                with atomic_path(target) as tmp:
                    job.write_npz(tmp)
        if job.skipped:
            log.warning("%d IDs have no embedding in %s and were not exported (skipped at extraction): %s",
                        len(job.skipped), cache_path, ", ".join(job.skipped[:20])
                        + (" ..." if len(job.skipped) > 20 else ""))
        return ExportSummary(
            output=Path(out), fmt=fmt, layers=layers, ids=len(cache.ids), unique_sequences=job.unique,
            skipped=list(job.skipped), per_residue=job.per_residue, dtype=str(out_dtype),
            seconds=time.perf_counter() - start,
        )


class _Job:
    """What every format needs from the cache, read in the cache's order."""

    def __init__(self, cache: EmbeddingCache, fmt: str, layers: list[int], per_residue: bool, dtype: np.dtype,
                 store: str, progress: bool):
        self.cache, self.fmt, self.layers, self.per_residue = cache, fmt, layers, per_residue
        self.dtype, self.store, self.progress = dtype, store, progress
        self.ids = list(cache.ids)
        self.skipped = list(cache.skipped_ids)
        self.rows = cache.rows(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        self.unique = len(set(self.rows.tolist()))
        # From the attributes: a pooled-only cache may have no per-residue dataset to measure.
        self.dim = int(cache.attrs.get("embed_dim") or cache.embed_dim)

    def metadata(self) -> dict:
        attrs = self.cache.attrs
        return {
            "format": self.fmt,
            "source_cache": str(real_path(self.cache.path)),
            "model": attrs.get("model"),
            "weights_sha256": attrs.get("weights_sha256"),
            "layers": self.layers,
            "pooling": attrs.get("pooling", "mean over residues"),
            "per_residue": self.per_residue,
            "dtype": str(self.dtype),
            "ids": len(self.ids),
            "skipped_ids": self.skipped,
            "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    def _bar(self, total: int, unit: str = "protein"):
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, disable=not self.progress, desc=f"export {self.fmt}")

    def pooled(self, rows: np.ndarray, layer: int) -> np.ndarray:
        """Pooled vectors of ``rows`` from the cache's pooled table, in the stored dtype.

        A cache stored per-residue only has no pooled table: there the float32 mean over the
        stored residues is taken, which is extract.py's own definition of ``mean_representations``.
        """
        if self.store == "per-residue":
            return np.stack([self.cache.per_residue_rows([r], layer)[0].astype(np.float32).mean(axis=0)
                             for r in rows.tolist()]) if len(rows) else np.zeros((0, self.dim), dtype=np.float32)
        return self.cache.pooled_rows(rows, layer)

    def residues(self, row: int, layer: int) -> np.ndarray:
        return self.cache.per_residue_rows([row], layer)[0]

    # -- esm-extract -------------------------------------------------------------------------
    def write_esm_extract(self, folder: Path) -> None:
        import torch

        cache = self.cache
        names = safe_file_names(self.ids)
        pooled = {layer: self.pooled(self.rows, layer) for layer in self.layers}
        all_ids, headers, keys = cache.all_ids()
        header_of, key_of = dict(zip(all_ids, headers)), dict(zip(all_ids, keys))
        with open(folder / "mapping.csv", "w", encoding="utf-8", newline="") as table, \
                self._bar(len(self.ids)) as bar:
            writer = csv.writer(table, lineterminator="\n")
            writer.writerow(["id", "header", "file", "sequence_key", "status", "length", "residues"])
            for i, (ident, row) in enumerate(zip(self.ids, self.rows.tolist())):
                # extract.py's label is the whole header line, as FastaBatchedDataset reads it.
                result: dict = {"label": header_of[ident] or ident}
                if self.per_residue:
                    result["representations"] = {
                        layer: torch.from_numpy(self.residues(row, layer).astype(np.float32)) for layer in self.layers
                    }
                result["mean_representations"] = {
                    layer: torch.from_numpy(np.array(pooled[layer][i], dtype=np.float32)) for layer in self.layers
                }
                name = names[ident] + ".pt"
                _save_torch(torch, result, folder / name)
                status = Status(int(cache._status[row])).name.lower()
                writer.writerow([ident, header_of[ident], name, cache.key(ident), status, cache.length(ident),
                                 int(cache._n_stored[row])])
                bar.update()
            for ident in self.skipped:
                writer.writerow([ident, header_of[ident], "", key_of[ident], "skipped", "", 0])

    # -- bio_embeddings -----------------------------------------------------------------------
    def write_bio_embeddings(self, h5) -> None:
        cache, layer = self.cache, self.layers[0]
        first_ids: dict[int, list[str]] = {}
        for ident, row in zip(self.ids, self.rows.tolist()):
            first_ids.setdefault(row, []).append(ident)
        unique_rows = np.array(sorted(first_ids), dtype=np.int64)
        pooled = None if self.per_residue else self.pooled(unique_rows, layer)
        # HDF5 writes a dataset's header when its object is released, and a failure there (a full
        # disk) is only printed, never raised. Datasets are therefore kept until a flush has
        # written them, which raises.
        held: list = []
        with self._bar(len(unique_rows)) as bar:
            for i, row in enumerate(unique_rows.tolist()):
                sequence = cache.sequences_rows([row])[0]
                # bio_embeddings names each dataset by the md5 of the sequence it embedded.
                name = hashlib.md5(sequence.encode()).hexdigest()
                data = self.residues(row, layer) if self.per_residue else pooled[i]  # type: ignore[index]
                dataset = h5.create_dataset(name, data=np.asarray(data, dtype=self.dtype))
                ids = first_ids[row]
                dataset.attrs["original_id"] = ids[0]
                if len(ids) > 1:
                    # bio_embeddings refuses duplicate sequences (MD5ClashException); its readers see
                    # the first ID, and the others are kept here rather than lost.
                    dataset.attrs["other_ids"] = json.dumps(ids[1:])
                held.append(dataset)
                if len(held) >= 256:
                    h5.flush()
                    held.clear()
                bar.update()
        h5.attrs["embedcache_export"] = json.dumps(self.metadata())
        h5.flush()

    # -- npz ------------------------------------------------------------------------------------
    def write_npz(self, path: Path) -> None:
        cache, layer = self.cache, self.layers[0]
        all_ids, headers, _ = cache.all_ids()
        header_of = dict(zip(all_ids, headers))
        pooled = self.pooled(self.rows, layer)
        # Stored without compression (as numpy.savez), member by member, so that one protein at a
        # time is in memory.
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _npz_member(zf, "ids", np.array(self.ids, dtype=str) if self.ids else np.zeros(0, dtype="<U1"))
            _npz_member(zf, "headers", np.array([header_of[i] for i in self.ids], dtype=str)
                        if self.ids else np.zeros(0, dtype="<U1"))
            _npz_member(zf, "sequence_keys", np.array([cache.key(i) for i in self.ids], dtype="<U40"))
            _npz_member(zf, "pooled", np.asarray(pooled, dtype=self.dtype).reshape(len(self.ids), self.dim))
            _npz_member(zf, "metadata", np.array(json.dumps(self.metadata())))
            if self.per_residue:
                with self._bar(len(self.ids)) as bar:
                    for i, row in enumerate(self.rows.tolist()):
                        _npz_member(zf, f"residues_{i}", np.asarray(self.residues(row, layer), dtype=self.dtype))
                        bar.update()

    # -- npy ------------------------------------------------------------------------------------
    def write_npy(self, folder: Path) -> None:
        cache, layer = self.cache, self.layers[0]
        # Every character str.splitlines breaks at (vertical tab, form feed, U+0085, U+2028, ...), not
        # only CR and LF: a reader splitting ids.txt so would see more IDs than rows, shifted.
        bad = [i for i in self.ids if i.splitlines() != [i]]
        if bad:
            raise ValueError(f"ID {bad[0]!r} holds a line break, which ids.txt (one ID per line) cannot hold; "
                             "export as npz instead")
        dim = self.dim
        pooled = np.asarray(self.pooled(self.rows, layer), dtype=self.dtype).reshape(len(self.ids), dim)
        _write_file(folder / "ids.txt", "".join(f"{i}\n" for i in self.ids).encode("utf-8"))
        with open(folder / "pooled.npy", "wb") as handle:
            np.lib.format.write_array(handle, pooled, allow_pickle=False)
        if not self.per_residue:
            return
        # Each unique sequence's rows once; IDs sharing a sequence share its rows through bounds.
        unique_rows = sorted(set(self.rows.tolist()))
        counts = cache.n_residues_rows(np.array(unique_rows, dtype=np.int64)) if unique_rows else np.zeros(0)
        first = {}
        total = 0
        for row, n in zip(unique_rows, counts.tolist()):
            first[row] = (total, total + n)
            total += n
        bounds = np.array([first[r] for r in self.rows.tolist()], dtype=np.int64).reshape(len(self.ids), 2)
        with open(folder / "bounds.npy", "wb") as handle:
            np.lib.format.write_array(handle, bounds, allow_pickle=False)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (total, dim)}
        with open(folder / "per_residue.npy", "wb") as handle, self._bar(len(unique_rows)) as bar:
            np.lib.format.write_array_header_2_0(handle, header)
            for row in unique_rows:
                handle.write(np.ascontiguousarray(self.residues(row, layer), dtype=self.dtype).tobytes())
                bar.update()


def _npz_member(zf: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with zf.open(name + ".npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _save_torch(torch, obj, path: Path) -> None:
    # Through a Python file: torch's own writer reports a full disk as "iostream error", no errno.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _write_file(path, buffer.getvalue())


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


# -- where the output goes ----------------------------------------------------------------------


def _is_our_export(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        return json.loads((path / MARKER).read_text()).get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def _is_empty_dir(path: Path) -> bool:
    # A staging folder made just before a kill, before its marker was written.
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _check_target(target: Path, fmt: str, overwrite: bool) -> None:
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise FileExistsError(errno.EEXIST, f"{target}: already exists; pass --overwrite to replace it")
    if fmt in DIRECTORY_FORMATS:
        if not target.is_dir():
            # Never an earlier export of this format: a user's file (or a device) that --overwrite would delete.
            raise FileExistsError(errno.EEXIST, f"{target}: is a file, not a directory of an earlier export; the "
                                                f"{fmt} export is a directory. Not replacing it: choose another "
                                                "output, or remove the file yourself if it can go")
        if not _is_our_export(target):
            raise FileExistsError(errno.EEXIST, f"{target}: a directory not written by embedcache export (no "
                                                f"{MARKER}); not replacing it, remove it yourself if it can go")
    elif target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{target}: is a directory; the {fmt} export is one file")
    elif not target.is_file():
        # Renaming over a FIFO or device node would replace the node itself.
        raise FileExistsError(errno.EEXIST, f"{target}: not a regular file (a FIFO or device); not replacing it")


@contextlib.contextmanager
def _output_lock(target: Path) -> Iterator[None]:
    """One export to ``target`` at a time: a second one would remove the first one's staging."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".export-lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CacheError(f"{target}: another export is writing it now") from None
        # The lock file is removed by the export that held it: one locked after its removal
        # holds a file nobody else will find, so it tries again.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _staged_dir(target: Path, overwrite: bool, metadata: dict) -> Iterator[Path]:
    """A directory filled under a temporary name, renamed to ``target`` once complete."""
    staging = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    for leftover in (staging, old):
        if os.path.lexists(leftover):
            if not (_is_our_export(leftover) or _is_empty_dir(leftover)):
                raise FileExistsError(errno.EEXIST, f"{leftover}: in the way of the export and not written by "
                                                    "embedcache export; move it away")
            log.info("removing %s, left by an interrupted export", leftover)
            shutil.rmtree(leftover)
    try:
        staging.mkdir()
        _write_file(staging / MARKER, (json.dumps(metadata, indent=2) + "\n").encode("utf-8"))
        yield staging
        for name in os.listdir(staging):
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(staging)
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(errno.EEXIST, f"{target}: already exists; pass --overwrite to replace it")
            # Out of the way first, then the new one in: at every moment the name holds a whole
            # export or nothing.
            os.replace(target, old)
            os.replace(staging, target)
            _remove(old)
        else:
            os.replace(staging, target)
        with contextlib.suppress(OSError):
            fsync_dir(target.parent)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_no_space(err):
            raise disk_full_error(target, err) from None
        raise
