"""Extraction: sequences -> batches -> model -> cache. The function the CLI and notebooks call."""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .atomic import DiskFullError, format_bytes, real_path
from .backbones import PRECISIONS, Backbone, pick_precision  # noqa: F401  (pick_precision: older import path)
from .batching import (
    LONG_POLICIES,
    Entry,
    Status,
    WorkItem,
    assign_shards,
    classify_length,
    parse_shard,
    plan_work,
    stitch,
    sub_batches,
)
from .layout import STORES, stores_pooled, stores_residues
from .sequences import RecordIndex, SpilledSequences, iter_keyed
from .store import CacheError, CacheWriter, EmbeddedEntry
from .threads import available_cores, default_threads  # noqa: F401  (available_cores: older import path)

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")


@dataclass
class ExtractConfig:
    """Everything that decides how a cache is made; saved in the cache's attributes."""

    model: str | None = None  # a name `embedcache models` lists (ESM-2, UniRep, a Hugging Face hub id)
    # A local file or Hugging Face directory, recognised by its contents (with `model`: must match).
    weights: str | None = None
    layers: tuple[int, ...] = (-1,)  # 0 is the token embedding, -1 the last layer (with its final layer norm)
    long: str = "truncate"  # sequences over max_length: truncate (keep the N-terminus) | chunk | skip
    max_length: int | None = None  # residues per model window; None: the model's own (1022 for ESM-2)
    chunk_overlap: int = 256  # residues shared by neighbouring windows under --long chunk
    toks_per_batch: int | None = None  # padded tokens per forward pass, BOS/EOS counted; None: the model's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    # Compute: fp32 | bf16 | fp16 (GPU only) | int8 (CPU only) | auto: bf16 (fp16 if unsupported) on GPU, fp32 on CPU.
    precision: str = "auto"
    dtype: str = "float16"  # storage: float16 (half the disk, ~1e-3 relative rounding) | float32
    threads: int | None = None  # torch CPU threads; None: the cores free at the start (embedcache.threads)
    trust_weights: bool = False  # allow pickled objects beyond argparse.Namespace in the checkpoint
    # What the cache keeps: "both", "pooled" (no residues: a file smaller by about the mean length) or "per-residue".
    store: str = "both"
    # "I/N" (I from 0): embed only shard I of N, a partition of the input's sequences by content
    # key that every shard computes alike, so shards run anywhere and `embedcache merge` joins them.
    shard: str | None = None


@dataclass
class ExtractSummary:
    output: str
    records: int
    unique_sequences: int
    already_present: int
    embedded: int
    residues_embedded: int
    truncated: int
    chunked: int
    skipped: int
    seconds: float
    residues_per_second: float
    written: bool = True
    oom_retries: int = 0


def _validate(config: ExtractConfig) -> None:
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {config.dtype!r}")
    if config.long not in LONG_POLICIES:
        raise ValueError(f"long-sequence policy must be one of {LONG_POLICIES}, not {config.long!r}")
    if config.store not in STORES:
        raise ValueError(f"store must be one of {STORES}, not {config.store!r}")
    if config.precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, not {config.precision!r}")
    for name in ("max_length", "toks_per_batch", "threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number, not {value}")
    if config.chunk_overlap < 0:
        raise ValueError(f"chunk_overlap must not be negative, not {config.chunk_overlap}")
    if config.shard is not None:
        parse_shard(config.shard)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch CPU threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but torch sees no CUDA GPU")
    return device


def load_backbone(config: ExtractConfig) -> Backbone:
    """The backbone ``config.model``/``config.weights`` name, through the registry."""
    from . import backbones

    return backbones.load_backbone(config.model, config.weights, trust=config.trust_weights)


def extract(
    input_path: str | Path,
    output: str | Path,
    config: ExtractConfig | None = None,
    *,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
    backbone: Backbone | None = None,
    progress: bool = True,
    command: str | None = None,
) -> ExtractSummary:
    """Embed every sequence of ``input_path`` into the cache at ``output``; resume what is there.

    The input is read and validated completely, and the model loaded, before anything is
    written. ``backbone`` overrides loading by ``config.model``/``config.weights``. The input is
    read as a stream: memory holds its index (IDs, headers, keys, lengths), the sequences wait
    in an unnamed temporary file in the output's directory until their work item is embedded.
    """
    config = config or ExtractConfig()
    _validate(config)
    # Beside the output, on the disk the cache needs anyway (a $TMPDIR in memory would hold them in RAM).
    where = real_path(output).parent
    with SpilledSequences(where if where.is_dir() else None) as spill:
        records, unique = index_input(input_path, spill, fmt=fmt, id_col=id_col, seq_col=seq_col)
        return _extract(input_path, output, config, spill, records, unique, backbone=backbone, progress=progress,
                        command=command, fmt=fmt, id_col=id_col, seq_col=seq_col)


@dataclass(frozen=True, slots=True)
class Planned:
    """An :class:`Entry` without its sequence, which waits in a :class:`SpilledSequences` at ``offset``.

    ``plan_work`` reads only the key, length, status and residue count, so it plans these as it plans entries.
    """

    key: str
    length: int
    status: Status
    n_residues: int
    offset: int  # in the spill


def index_input(
    input_path: str | Path,
    spill: SpilledSequences,
    *,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
) -> tuple[RecordIndex, dict[str, tuple[int, int]]]:
    """Read the input once, as a stream: every record's ID, header and key, and each unique
    sequence put in ``spill``: {key: (offset, length)} in input order."""
    records = RecordIndex()
    unique: dict[str, tuple[int, int]] = {}
    for rec, key in iter_keyed(input_path, fmt, id_col, seq_col):
        records.append(rec.id, rec.header, key)
        if key not in unique:
            unique[key] = (spill.add(rec.sequence), len(rec.sequence))
    spill.flush()
    return records, unique


def classify_spilled(unique: dict, max_length: int | None, policy: str) -> dict[str, Planned]:
    """:func:`index_input`'s sequences classified by length, as ``batching.classify`` does; in place."""
    for key, (offset, length) in unique.items():
        unique[key] = Planned(key, length, *classify_length(length, max_length, policy), offset)
    return unique


def load_item(item: WorkItem, spill: SpilledSequences) -> WorkItem:
    """A planned work item with its sequences read back: what the model and the writer take."""
    planned = cast(list[Planned], item.entries)
    entries = [Entry(p.key, spill.read(p.offset, p.length), p.status, p.n_residues) for p in planned]
    return WorkItem(entries, item.windows)


def _extract(input_path, output, config: ExtractConfig, spill: SpilledSequences, records: RecordIndex,
             spans: dict[str, tuple[int, int]], *, backbone, progress, command, fmt=None, id_col=None,
             seq_col=None) -> ExtractSummary:
    output = Path(output)
    if backbone is None:
        backbone = load_backbone(config)
    # int8 runs on CPUs only: auto means the CPU for it even where a GPU is present.
    device = pick_device("cpu" if config.precision == "int8" and config.device == "auto" else config.device)
    backbone.to(device)
    if config.long == "chunk" and not backbone.supports_chunking:
        raise ValueError(f"--long chunk is not possible with {backbone.architecture}: its states carry everything "
                         "before them, so windows embedded apart are not the protein's states. Use --long truncate "
                         "or skip with --max-length, or leave --max-length unset to embed whole proteins")
    if config.store == "per-residue" and backbone.leading_states:
        raise ValueError(
            f"--store per-residue is not possible with {backbone.architecture}: its pooled vector is the mean over "
            f"{backbone.leading_states} state(s) before the first residue as well as the residues, and those are not "
            "stored, so a pooled read of the residues would differ from the model's. Use --store both or pooled"
        )
    backbone.set_precision(backbone.pick_precision(config.precision, device))
    threads = config.threads or default_threads()
    with torch_threads(threads):
        layers = backbone.resolve_layers(config.layers)
        max_length = config.max_length or backbone.max_residues
        if config.long == "chunk" and max_length is not None and config.chunk_overlap >= max_length:
            raise ValueError(f"chunk overlap ({config.chunk_overlap}) must be smaller than the window ({max_length})")
        if backbone.max_residues and max_length is not None and max_length > backbone.max_residues:
            log.warning("max_length %d exceeds the %d residues %s was trained on", max_length,
                        backbone.max_residues, backbone.architecture)
        budget = config.toks_per_batch or backbone.budget.get(device.type, 1024)
        provenance = _provenance(backbone, config, layers, max_length, command)

        unique = classify_spilled(spans, max_length, config.long)
        counts = {s: sum(1 for e in unique.values() if e.status == s) for s in Status}
        limit = "max_length (none set)" if max_length is None else f"{max_length} residues"
        log.info(
            "%s: %d records, %d unique sequences; longer than %s: %d truncated, %d chunked, %d skipped",
            input_path, len(records), len(unique), limit,
            counts[Status.TRUNCATED], counts[Status.CHUNKED], counts[Status.SKIPPED],
        )
        if config.shard is not None:
            records, unique = _select_shard(config.shard, records, unique, input_path, provenance,
                                            fmt=fmt, id_col=id_col, seq_col=seq_col)
            counts = {s: sum(1 for e in unique.values() if e.status == s) for s in Status}
        skipped = {k for k, e in unique.items() if e.status == Status.SKIPPED}

        with CacheWriter(output, provenance) as writer:
            _check_shard_target(output, writer.existing_attrs, provenance)
            writer.check_ids(records)
            pending = [e for e in unique.values() if e.status != Status.SKIPPED and not writer.is_done(e.key)]
            # A Planned has every attribute plan_work reads; load_item turns its items into Entries.
            items = plan_work(cast(list[Entry], pending), budget, backbone.extra_tokens, max_length,
                              config.chunk_overlap)
            _check_disk_space(output, pending, len(items), len(layers), backbone.embed_dim, config.dtype,
                              config.store)
            runner = _Runner(backbone, layers, budget, config.store)
            total = sum(item.n_residues for item in items)
            log.info(
                "%d sequences already in %s; embedding %d (%d residues) in %d work items, %d threads, %s %s",
                len(unique) - len(skipped) - len(pending), output, len(pending), total, len(items),
                threads, device, backbone.precision,
            )
            start = time.perf_counter()
            # In a log file rather than a terminal, a line every 30 s instead of a redrawn bar.
            interval = 0.1 if sys.stderr.isatty() else 30.0
            with tqdm(total=total, unit="res", unit_scale=True, desc="embedding", disable=not progress,
                      smoothing=0.1, mininterval=interval) as bar:
                for item in items:
                    writer.write_part(runner.run(load_item(item, spill)))
                    bar.update(item.n_residues)
            seconds = time.perf_counter() - start
            written = writer.finish(records, skipped)

        summary = ExtractSummary(
            output=str(output),
            records=len(records),
            unique_sequences=len(unique),
            already_present=len(unique) - len(skipped) - len(pending),
            embedded=len(pending),
            residues_embedded=total,
            truncated=counts[Status.TRUNCATED],
            chunked=counts[Status.CHUNKED],
            skipped=counts[Status.SKIPPED],
            seconds=seconds,
            residues_per_second=total / seconds if seconds > 0 else 0.0,
            written=written,
            oom_retries=runner.oom_retries,
        )
        log.info(
            "%s: embedded %d sequences (%d residues) in %.1f s, %.0f residues/s",
            output, summary.embedded, total, seconds, summary.residues_per_second,
        )
        return summary


def _select_shard(
    shard: str, records: RecordIndex, unique: dict[str, Planned], input_path, provenance: dict, **options
) -> tuple[RecordIndex, dict[str, Planned]]:
    """The records and sequences of one shard; records the shard and the input's identity in ``provenance``."""
    from .merge import input_identity

    index, count = parse_shard(shard)
    if count > len(unique):
        raise ValueError(
            f"shard {shard}: {input_path} holds {len(unique)} unique sequences, so {count} shards would leave "
            f"some empty; use at most {len(unique)} shards"
        )
    owner = assign_shards({k: e.n_residues for k, e in unique.items()}, count)
    provenance["shard"] = f"{index}/{count}"
    provenance["input"] = input_identity(input_path, records, n_sequences=len(unique), **options)
    mine = {k: e for k, e in unique.items() if owner[k] == index}
    selected = RecordIndex()
    for rec in records:
        if rec.key in mine:
            selected.append(rec.id, rec.header, rec.key)
    log.info("shard %d/%d: %d of %d unique sequences (%d of %d residues), %d of %d IDs", index, count, len(mine),
             len(unique), sum(e.n_residues for e in mine.values()), sum(e.n_residues for e in unique.values()),
             len(selected), len(records))
    return selected, mine


def _check_shard_target(output: Path, existing: dict, provenance: dict) -> None:
    """A shard extends only its own file: one holding the same shard of the same input, or nothing yet."""
    if not existing:
        return
    from .merge import shard_identity

    before, now = shard_identity(existing), shard_identity(provenance)
    if before != now:
        def describe(identity) -> str:
            if identity is None:
                return "a whole input (not a shard)"
            return f"shard {identity[0]} of an input with records sha256 {identity[1][:12]}"

        raise CacheError(
            f"{output}: holds {describe(before)}, but this run makes {describe(now)}. Write each shard to a file "
            "of its own and join them with `embedcache merge`"
        )


class _Runner:
    """Runs work items through the backbone; on GPU out-of-memory halves the budget, then falls back to CPU."""

    def __init__(self, backbone: Backbone, layers: list[int], budget: int, store: str = "both"):
        self.backbone = backbone
        self.layers = layers
        self.budget = budget
        self.keep_residues, self.keep_pooled = stores_residues(store), stores_pooled(store)
        self.oom_retries = 0
        self._cpu: Backbone | None = None

    def run(self, item: WorkItem) -> list[EmbeddedEntry]:
        windows = [item.entries[e].sequence[s:t] for e, s, t in item.windows]
        outputs = self._embed(windows)
        results = []
        lead = self.backbone.leading_states
        for index, entry in enumerate(item.entries):
            mine = [(s, t, out) for (e, s, t), out in zip(item.windows, outputs) if e == index]
            per_residue, pooled = {}, {}
            for layer in self.layers:
                if len(mine) == 1:
                    states = mine[0][2][layer]
                    per_residue[layer] = states[lead:]
                else:
                    # Chunking exists for windowed models, which have no leading states.
                    states = per_residue[layer] = stitch([(s, t, out[layer]) for s, t, out in mine], entry.length)
                # Mean over residues, plus the leading states where the model defines it so.
                pooled[layer] = states.mean(axis=0, dtype=np.float64).astype(np.float32)
            # What the cache does not keep is dropped here, so a work item holds no more than it writes.
            results.append(EmbeddedEntry(entry, per_residue if self.keep_residues else {},
                                         pooled if self.keep_pooled else {}))
        return results

    def _embed(self, windows: list[str]) -> list[dict[int, np.ndarray]]:
        """Per-window {layer: (len, D) float32}, in the windows' order."""
        outputs: list[dict[int, np.ndarray]] = []
        lengths = [len(w) for w in windows]
        done = 0
        while done < len(windows):
            batch = sub_batches(lengths[done:], self.budget, self.backbone.extra_tokens)[0]
            chunk = windows[done : done + batch.stop]
            try:
                reps = self._forward(self.backbone, chunk)
            except torch.OutOfMemoryError as err:
                retried = self._after_oom(chunk, err)
                if retried is None:
                    continue
                reps = retried
            outputs.extend(reps)
            done += len(chunk)
        return outputs

    def _forward(self, backbone: Backbone, chunk: list[str]) -> list[dict[int, np.ndarray]]:
        """Per window {layer: (leading_states + len, D)}: leading states first, then residues."""
        with torch.inference_mode():
            reps = backbone.embed(chunk, self.layers)
            host = {layer: rep.float().cpu().numpy() for layer, rep in reps.items()}
        keep = backbone.leading_states
        return [{layer: host[layer][row, : keep + len(seq)] for layer in self.layers} for row, seq in enumerate(chunk)]

    def _after_oom(self, chunk: list[str], err: Exception) -> list[dict[int, np.ndarray]] | None:
        """Shrink the budget and ask for a retry (None), or embed a lone sequence on the CPU."""
        self.oom_retries += 1
        if self.backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(chunk) > 1:
            self.budget = max(1, self.budget // 2)
            log.warning("out of memory on %d sequences; token budget halved to %d", len(chunk), self.budget)
            return None
        if self.backbone.device.type == "cpu":
            raise err
        if self._cpu is None:
            log.warning("out of memory on a single sequence of %d residues; using the CPU for such sequences",
                        len(chunk[0]))
            self._cpu = copy.deepcopy(self.backbone).to("cpu")
            self._cpu.set_precision("fp32")
        return self._forward(self._cpu, chunk)


def _provenance(
    backbone: Backbone, config: ExtractConfig, layers: list[int], max_length: int | None, command: str | None
) -> dict:
    return {
        **backbone.describe(),
        "layers": np.array(layers, dtype=np.int64),
        "dtype": config.dtype,
        "precision": backbone.precision,
        "long_policy": config.long,
        "max_length": max_length,
        "chunk_overlap": config.chunk_overlap if config.long == "chunk" else 0,
        "store": config.store,
        "config": asdict(config),
        "embedcache_version": __version__,
        "fair_esm_version": _version("fair-esm"),
        "torch_version": str(torch.__version__),
        "h5py_version": _version("h5py"),
        "git_sha": _git_sha(),
        "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),
    }


# HDF5's own bytes in a part file (superblock, object headers, attributes), measured: about
# 9 kB plus 1.6 kB per layer; a cache file has about twice that.
PART_OVERHEAD = 10_000
PART_OVERHEAD_PER_LAYER = 2_000


def _check_disk_space(output: Path, pending: Sequence[Entry | Planned], n_parts: int, n_layers: int, dim: int,
                      dtype: str, store: str = "both") -> None:
    """Parts and the final file coexist at the end of a run: ask for twice the new data plus the old file."""
    bytes_per = np.dtype(dtype).itemsize * dim * n_layers
    residues, pooled = stores_residues(store), stores_pooled(store)
    # Per sequence: what is kept of residues and pooled vector, its tables (key, sequence,
    # lengths) and the residues' checksums.
    new = sum((e.n_residues * residues + pooled) * bytes_per + 100 + 2 * e.length + 8 * n_layers * residues
              for e in pending)
    overhead = (n_parts + 2) * (PART_OVERHEAD + PART_OVERHEAD_PER_LAYER * n_layers)
    target = real_path(output)  # through a link, the space that counts is the target's
    needed = 2 * new + overhead + (target.stat().st_size if target.exists() else 0)
    free = shutil.disk_usage(target.parent if target.parent.exists() else Path.cwd()).free
    if needed > free:
        raise DiskFullError(
            errno.ENOSPC,
            f"{output}: this run needs about {format_bytes(needed)} of disk ({format_bytes(new)} of new embeddings, "
            f"written once as {n_parts} parts and once into the cache) but {format_bytes(free)} are free",
        )
    log.info("estimated new embeddings: %s in %d parts", format_bytes(new + overhead), n_parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _git_sha() -> str:
    """The package's own git commit when it runs from a checkout, else 'unknown'."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split()
    # Only this project's own checkout counts, not some repository that happens to contain it.
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]) != here.parent:
        return "unknown"
    return lines[1]
