"""Joining caches: the shards of one input (``extract --shard I/N``), or any caches of one model.

:func:`merge_caches` writes a new cache holding every sequence of its inputs once and every ID
of them. It refuses what cannot be joined without mixing or losing something: caches made
with other content settings or weights, shards of different inputs or shard counts, an
incomplete set of shards (unless asked for), an ID with two different sequences, and an
output that already exists (also when it is one of the inputs under another name). Every
input is read through its checksums; the output is written beside its target under the
target's writer lock, verified whole with :func:`embedcache.reader.verify_cache`, and only
then renamed into place.

The merged file holds what one unsharded run holds: the same IDs, headers, sequences and
statuses, and rows in the same order (:func:`embedcache.batching.sort_key`). IDs come shard
by shard rather than in input order. Embeddings agree with an unsharded run's up to float
rounding, not bit for bit: a sequence's values can depend on the other sequences in its
batch (see :mod:`embedcache.writer`).

The merged file keeps what its inputs keep (``store``: both kinds, pooled vectors only, or
per-residue arrays only), laid out as one run with that ``--store`` lays it out; inputs that
keep different kinds are refused, since one of them lacks what the other holds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_h5, file_sha256, fsync_dir, real_path
from .batching import Entry, Status, sort_key
from .layout import (
    CONTENT_SETTINGS,
    DEFAULT_STORE,
    FORMAT,
    KEY_DTYPE,
    STR_DTYPE,
    CacheDamagedError,
    CacheError,
    attrs_digest,
    format_version_for,
    jsonable,
    parts_dir,
    settings_of,
    stores_pooled,
    stores_residues,
    write_table,
)
from .reader import EmbeddingCache, lock_holder, verify_cache
from .sequences import RecordIndex
from .writer import WriterLock

log = logging.getLogger(__name__)

# What a cache made before a setting existed holds; absent and this value are the same setting.
SETTING_DEFAULTS = {"store": DEFAULT_STORE}


@dataclass
class MergeSummary:
    output: str
    inputs: int
    ids: int  # every ID of the output, skipped ones included
    sequences: int  # unique sequences stored
    duplicates: int  # sequences found in more than one input, stored once
    residues: int  # residues stored per layer (0 when the caches keep pooled vectors only)
    shards: str | None  # "N of N", "K of N" (with --partial), or None when the inputs are not shards
    missing_shards: list[int] = field(default_factory=list)
    seconds: float = 0.0


# -- the identity of a shard's input ---------------------------------------------------------


def input_identity(
    input_path: Path | str,
    records: Sequence | RecordIndex,
    *,
    n_sequences: int,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> dict:
    """What makes two shards parts of one input: its records (IDs, headers, sequences, in order).

    ``records_sha256`` decides; the file's own sha256 (None for standard input, a FIFO or a
    device) and the reading options are recorded for people. The same records from a gzipped
    copy or through a pipe are the same input.
    """
    digest = hashlib.sha256()
    for rec in records:
        digest.update(f"{rec.id}\0{rec.header}\0{rec.key}\n".encode())
    from_stdin = str(input_path) == "-"
    # A pipe was read once, into a copy: opened again it blocks (a named FIFO) or gives nothing.
    regular = not from_stdin and Path(input_path).is_file()
    return {
        "path": "-" if from_stdin else str(real_path(input_path)),
        "sha256": file_sha256(input_path) if regular else None,
        "records_sha256": digest.hexdigest(),
        "records": len(records),
        "sequences": n_sequences,
        "format": fmt,
        "id_col": id_col,
        "seq_col": seq_col,
    }


def _json_attr(value) -> dict | None:
    if value is None or value == "none":
        return None
    if isinstance(value, dict):
        return value
    return json.loads(jsonable(value))


def _parse_shards(text: str) -> tuple[set[int], int]:
    """A cache's ``shard`` attribute, "I/N" or "I,J,.../N" (a merge of some shards), as (indices, N)."""
    head, _, tail = str(text).partition("/")
    try:
        count = int(tail)
        indices = {int(x) for x in head.split(",")}
    except ValueError:
        raise CacheDamagedError(f"unreadable shard attribute {text!r}") from None
    if count < 1 or not indices or not all(0 <= i < count for i in indices):
        raise CacheDamagedError(f"unreadable shard attribute {text!r}")
    return indices, count


def shard_identity(attrs: dict) -> tuple[str, str] | None:
    """(shard, records sha256 of its input) of a cache's attributes or a provenance; None for a whole input."""
    shard = attrs.get("shard")
    if shard in (None, "none"):
        return None
    identity = _json_attr(attrs.get("input")) or {}
    return str(jsonable(shard)), str(identity.get("records_sha256"))


# -- merging ------------------------------------------------------------------------------------


@dataclass
class _Input:
    path: Path
    cache: EmbeddingCache
    settings: dict
    shards: set[int] | None
    count: int | None
    identity: dict | None


def _settings(cache: EmbeddingCache) -> dict:
    found = settings_of(cache.attrs)
    for name in CONTENT_SETTINGS:
        found.setdefault(name, SETTING_DEFAULTS.get(name))
    return found


def _open_input(path: Path) -> _Input:
    holder = lock_holder(path)
    if holder is not None:
        raise CacheError(f"{path}: being written now by process {holder}; merge it once that run has finished")
    cache = EmbeddingCache(path)
    try:
        if parts_dir(path).exists():
            raise CacheError(f"{path}: an interrupted run left parts beside it; run its extract command again to "
                             "finish it before merging")
        shards, count, identity = None, None, None
        if shard_identity(cache.attrs) is not None:
            try:
                shards, count = _parse_shards(cache.attrs["shard"])
            except CacheDamagedError as err:
                raise CacheDamagedError(f"{path}: {err}; the file is damaged") from None
            identity = _json_attr(cache.attrs.get("input")) or {}
        return _Input(path, cache, _settings(cache), shards, count, identity)
    except BaseException:
        cache.close()
        raise


def _shard_text(indices: set[int], count: int) -> str:
    return f"{','.join(str(i) for i in sorted(indices))}/{count}"


def _check_together(inputs: list[_Input], partial: bool) -> tuple[str | None, list[int], dict | None]:
    """Same settings, and shards of one input and one count; returns (shard attribute, missing, identity)."""
    first = inputs[0]
    for other in inputs[1:]:
        differ = [k for k in CONTENT_SETTINGS if other.settings.get(k) != first.settings.get(k)]
        if differ:
            detail = "; ".join(f"{k}: {first.settings.get(k)!r} in {first.path}, {other.settings.get(k)!r} in "
                               f"{other.path}" for k in differ)
            raise CacheError(f"cannot merge caches made with different settings ({detail}); merge only caches of "
                             "the same model, weights, layers, precision, dtype, long-sequence policy and --store")
    sharded = [i for i in inputs if i.shards is not None]
    if not sharded:
        return None, [], None
    if len(sharded) != len(inputs):
        whole = next(i for i in inputs if i.shards is None)
        raise CacheError(f"cannot merge shards with a whole cache: {sharded[0].path} is shard "
                         f"{sharded[0].cache.attrs['shard']} and {whole.path} is not a shard. Merge the shards "
                         "first, then merge the result with the other cache")
    ref = sharded[0]
    assert ref.identity is not None and ref.count is not None and ref.shards is not None
    for other in sharded[1:]:
        assert other.identity is not None
        if other.identity.get("records_sha256") != ref.identity.get("records_sha256"):
            raise CacheError(
                f"cannot merge shards of different inputs: {ref.path} is a shard of {ref.identity.get('path')} "
                f"(sha256 {ref.identity.get('sha256')}, records sha256 {ref.identity.get('records_sha256')}), "
                f"{other.path} of {other.identity.get('path')} (sha256 {other.identity.get('sha256')}, records "
                f"sha256 {other.identity.get('records_sha256')})"
            )
        if other.count != ref.count:
            raise CacheError(f"cannot merge shards of different shard counts: {ref.path} is shard "
                             f"{ref.cache.attrs['shard']}, {other.path} is shard {other.cache.attrs['shard']}")
    have: set[int] = set()
    for i in sharded:
        assert i.shards is not None
        overlap = have & i.shards
        if overlap:
            log.warning("%s: shard(s) %s given more than once; each sequence is kept once", i.path,
                        ", ".join(map(str, sorted(overlap))))
        have |= i.shards
    missing = sorted(set(range(ref.count)) - have)
    if missing and not partial:
        raise CacheError(
            f"shards {', '.join(f'{m}/{ref.count}' for m in missing)} of {ref.identity.get('path')} are missing "
            f"(given: {', '.join(f'{m}/{ref.count}' for m in sorted(have))}); give every shard, or merge what is "
            "there with --partial"
        )
    return (_shard_text(have, ref.count) if missing else None), missing, ref.identity


def merge_caches(
    inputs: Sequence[Path | str],
    output: Path | str,
    *,
    partial: bool = False,
    command: str | None = None,
) -> MergeSummary:
    """Write one cache holding every sequence and ID of ``inputs``; see the module docstring."""
    start = time.perf_counter()
    if not inputs:
        raise ValueError("merge needs at least one input cache")
    paths = [Path(p) for p in inputs]
    output = Path(output)
    target = real_path(output)
    seen: dict[Path, Path] = {}
    for path in paths:
        real = real_path(path)
        if real == target:
            raise CacheError(f"{output} is also an input ({path}); write the merge to a new file")
        if real in seen:
            raise ValueError(f"{path} is given twice (also as {seen[real]})")
        seen[real] = path
    target.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(target):
        if target.exists():
            raise CacheError(f"{output}: exists; merge into a new file (name an existing cache as an input to "
                             "include it)")
        staged = target.with_name(target.name + ".merging")
        staged.unlink(missing_ok=True)  # left by a merge that was killed
        opened: list[_Input] = []
        try:
            for path in paths:
                opened.append(_open_input(path))
            shard_attr, missing, identity = _check_together(opened, partial)
            summary = _write_merged(opened, staged, shard_attr, identity, command or shlex.join(sys.argv))
        finally:
            for i in opened:
                i.cache.close()
        try:
            report = verify_cache(staged)
            if not report.ok:
                raise CacheDamagedError(f"{output}: the merged file does not verify, nothing was written: "
                                        + "; ".join(report.problems[:3]))
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)
        fsync_dir(target.parent)
    summary.output = str(output)
    summary.inputs = len(paths)
    summary.missing_shards = missing
    count = opened[0].count
    if identity is not None and count is not None:
        summary.shards = f"{count - len(missing)} of {count}"
    summary.seconds = time.perf_counter() - start
    log.info("%s: merged %d caches: %d IDs, %d unique sequences (%d found in more than one input) in %.1f s",
             output, len(paths), summary.ids, summary.sequences, summary.duplicates, summary.seconds)
    return summary


def _write_merged(inputs: list[_Input], staged: Path, shard_attr: str | None, identity: dict | None,
                  command: str) -> MergeSummary:
    # Which input stores each sequence (the first that has it), and every ID's sequence.
    source: dict[str, tuple[int, int]] = {}
    entries: dict[str, tuple[str, int, int, int]] = {}  # key -> (sequence, length, n_residues, status)
    id_key: dict[str, tuple[str, str, int]] = {}  # id -> (header, key, input)
    duplicates = 0
    for n, inp in enumerate(inputs):
        cache = inp.cache
        sequences = cache.all_sequences()
        for row, key in enumerate(cache._keys):
            entry = (sequences[row], int(cache._lengths[row]), int(cache._n_stored[row]), int(cache._status[row]))
            if key in entries:
                duplicates += 1
                if entries[key] != entry:
                    other = inputs[source[key][0]].path
                    raise CacheError(f"sequence {key} is stored differently in {other} and {inp.path} (status or "
                                     "stored residues differ); these caches cannot be merged")
                continue
            entries[key] = entry
            source[key] = (n, row)
        ids, headers, keys = cache.all_ids()
        for ident, header, key in zip(ids, headers, keys):
            before = id_key.get(ident)
            if before is None:
                id_key[ident] = (header, key, n)
            elif before[1] != key:
                raise CacheError(f"ID {ident!r} has different sequences in {inputs[before[2]].path} (sequence "
                                 f"{before[1]}) and {inp.path} (sequence {key}); these caches cannot be merged")
    n_keys = len({k for _, k, _ in id_key.values()})
    # A complete set of shards must hold exactly the input it says it came from.
    if identity is not None and shard_attr is None and (
        len(id_key) != identity.get("records") or n_keys != identity.get("sequences")
    ):
        raise CacheDamagedError(
            f"the shards hold {len(id_key)} IDs of {n_keys} sequences, but their input {identity.get('path')} has "
            f"{identity.get('records')} IDs of {identity.get('sequences')} sequences; a shard file was changed "
            "after it was made"
        )

    stored = [k for k in entries if entries[k][3] != Status.SKIPPED]
    order = sorted(stored, key=lambda k: sort_key(Entry(k, entries[k][0], Status(entries[k][3]), entries[k][2])))
    row_of = {k: i for i, k in enumerate(order)}
    counts = np.array([entries[k][2] for k in order], dtype=np.int64)
    first = inputs[0].cache
    store = first.store  # the same in every input (checked with the other settings)
    residues, pooled_kept = stores_residues(store), stores_pooled(store)
    # As a single run writes it: under --store pooled every sequence's rows are the empty range 0:0,
    # while n_residues still counts the residues its pooled vector is the mean of.
    offsets = np.concatenate([[0], np.cumsum(counts if residues else np.zeros_like(counts))]).astype(np.int64)
    layers = first.layers
    dim = first.embed_dim
    with atomic_h5(staged) as out:
        write_table(out, "sequences/key", order, KEY_DTYPE)
        write_table(out, "sequences/sequence", [entries[k][0] for k in order], STR_DTYPE)
        write_table(out, "sequences/length", [entries[k][1] for k in order], np.int32)
        write_table(out, "sequences/n_residues", counts, np.int32)
        write_table(out, "sequences/status", [entries[k][3] for k in order], np.uint8)
        write_table(out, "sequences/offset", offsets, np.int64)
        for layer in layers:
            dtype = first._first_dataset(layer).dtype
            if residues:
                rows = out.create_dataset(f"L{layer}/per_residue", shape=(int(offsets[-1]), dim), dtype=dtype)
                sums = np.zeros(len(order), dtype=np.uint64)
            if pooled_kept:
                pooled = np.zeros((len(order), dim), dtype=dtype)
            for n, inp in enumerate(inputs):
                cache = inp.cache
                mine = [r for r, k in enumerate(cache._keys) if source.get(k) == (n, r)]
                if not mine:
                    continue
                if residues:
                    bounds = cache._bounds
                    # Blocks of whole sequences, each checked against its checksum as it is read.
                    for lo, hi, slab, slab_sums in cache.iter_residue_blocks(layer):
                        base = bounds[lo]
                        for r in range(lo, hi):
                            key = cache._keys[r]
                            if source.get(key) != (n, r):
                                continue
                            i = row_of[key]
                            rows[int(offsets[i]) : int(offsets[i + 1])] = slab[bounds[r] - base : bounds[r + 1] - base]
                            sums[i] = slab_sums[r - lo]
                if pooled_kept:
                    # The whole matrix is read and checked against its checksum.
                    targets = [row_of[cache._keys[r]] for r in mine]
                    pooled[targets] = cache.pooled_rows(mine, layer)
            if residues:
                write_table(out, f"L{layer}/per_residue_checksum", sums, np.uint64)
            if pooled_kept:
                write_table(out, f"L{layer}/pooled", pooled, dtype)
        id_list = list(id_key)
        write_table(out, "ids/id", id_list, STR_DTYPE)
        write_table(out, "ids/header", [id_key[i][0] for i in id_list], STR_DTYPE)
        write_table(out, "ids/key", [id_key[i][1] for i in id_list], KEY_DTYPE)
        write_table(out, "ids/index", [row_of.get(id_key[i][1], -1) for i in id_list], np.int64)
        out.attrs.update(_merged_attrs(inputs, shard_attr, identity, command))
        out.attrs["attrs_checksum"] = attrs_digest(out.attrs)
    return MergeSummary(output="", inputs=len(inputs), ids=len(id_key), sequences=len(order), duplicates=duplicates,
                        residues=int(offsets[-1]), shards=None)


def _merged_attrs(inputs: list[_Input], shard_attr: str | None, identity: dict | None, command: str) -> dict:
    """The first input's provenance (the settings are the same in all), and where every input came from."""
    attrs = {k: v for k, v in inputs[0].cache._file.attrs.items() if k != "attrs_checksum"}
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    created = [str(jsonable(i.cache.attrs.get("created", ""))) for i in inputs]
    attrs["created"] = min((c for c in created if c), default=now)
    attrs["updated"] = now
    attrs["commands"] = json.dumps([command])
    attrs["merged_from"] = json.dumps([
        {
            "path": str(real_path(i.path)),
            "sha256": file_sha256(i.path),
            "shard": i.cache.attrs.get("shard"),
            "format_version": i.cache.format_version,
            "commands": json.loads(jsonable(i.cache.attrs.get("commands", "[]"))),
        }
        for i in inputs
    ])
    if identity is None:
        attrs.pop("shard", None)
        # The first input's record of its input would claim the merge holds that input alone.
        recorded = {json.dumps(_json_attr(i.cache.attrs.get("input")), sort_keys=True) for i in inputs}
        if len(recorded) > 1:
            attrs.pop("input", None)
    else:
        # A complete set is the whole input: no shard; its input stays recorded.
        attrs["input"] = json.dumps(identity, sort_keys=True)
        if shard_attr is None:
            attrs.pop("shard", None)
        else:
            attrs["shard"] = shard_attr
    if "config" in attrs:
        try:
            config = json.loads(jsonable(attrs["config"]))
            config["shard"] = shard_attr
            attrs["config"] = json.dumps(config, sort_keys=True)
        except (ValueError, TypeError, AttributeError):
            pass
    # The version a single run with this store writes: files of both kinds stay readable by version-2 readers.
    attrs.update(format=FORMAT, format_version=format_version_for(inputs[0].cache.store))
    return attrs
