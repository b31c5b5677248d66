"""Extraction on a Ray cluster: the shards of ``extract --shard I/N`` as Ray tasks, merged into one cache.

Each shard is a Ray task that runs :func:`embedcache.extract.extract` on its share of the
input (one task per ``threads`` CPUs, or one per GPU) and writes its own resumable cache in
a work folder beside the output (``OUT.shards/``). When a worker dies (a killed process, a
lost node), Ray runs the task again, up to ``max_retries`` times; the shard's parts make the
new attempt resume where the dead one stopped. When every shard has finished, they are
merged into ``OUT`` with :func:`embedcache.merge.merge_caches` and the work folder is
removed. Started again after the driver itself was stopped, the same command reuses the
finished shards and the parts of unfinished ones.

Every node reads the input and writes its shard at the same paths as the driver, so they
must be on a filesystem that all nodes share. Ray is imported only here, and only when
asked for: it is an optional dependency (``pip install 'embedcache[cluster]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from .atomic import real_path
from .extract import ExtractConfig, ExtractSummary, _validate
from .layout import CacheError
from .merge import merge_caches
from .writer import WriterLock

log = logging.getLogger(__name__)

EXECUTORS = ("ray",)
# Tests only: "SHARD_PATH|MARKER": the task writing that shard dies after its first part unless MARKER exists,
# which it then creates; so the first attempt dies as a killed worker would, and the rerun lives.
KILL_AFTER_FIRST_PART = "EMBEDCACHE_TEST_KILL_AFTER_FIRST_PART"


def extract_distributed(
    input_path: str | Path,
    output: str | Path,
    config: ExtractConfig | None = None,
    *,
    shards: int | None = None,
    executor: str = "ray",
    address: str | None = None,
    fmt: str | None = None,
    id_col: str | None = None,
    seq_col: str | None = None,
    command: str | None = None,
    max_retries: int = 3,
) -> ExtractSummary:
    """Embed ``input_path`` into ``output`` as ``shards`` Ray tasks, then merge them; see the module docstring.

    ``shards`` defaults to one per GPU of the cluster when the device is CUDA (or auto and the
    cluster has GPUs), else one per ``config.threads`` CPUs (1 thread unless set). ``address``
    is a running cluster's (``ray start --head`` prints it; ``auto`` finds a local one);
    without it a Ray instance is started on this machine for the run.
    """
    from .sequences import read_sequences

    start = time.perf_counter()
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, not {executor!r}")
    config = config or ExtractConfig()
    _validate(config)
    if config.shard is not None:
        raise ValueError("the ray executor makes the shards itself; give their number (shards), not one shard")
    if shards is not None and shards < 1:
        raise ValueError(f"the number of shards must be positive, not {shards}")
    if config.model is None and config.weights is None:
        raise ValueError("give a model name or weights")
    if str(input_path) == "-":
        raise ValueError("the ray executor has every worker read INPUT: give a file on a filesystem the nodes "
                         "share, not standard input")
    if Path(input_path).exists() and not Path(input_path).is_file():
        # Each worker opens INPUT again: a FIFO or device gives its data once, to one reader.
        raise ValueError(f"{input_path}: not a regular file (a FIFO, device or directory); the ray executor has every "
                         "worker read INPUT, so give a file on a filesystem the nodes share")
    # Read (and validate) the input here first, so that a bad record stops the run before any cluster work.
    records = read_sequences(input_path, fmt, id_col, seq_col)
    n_unique = len({rec.key for rec in records})
    input_path = real_path(input_path)
    if config.weights is not None:
        config = dataclasses.replace(config, weights=str(real_path(config.weights)))
    output = Path(output)
    target = real_path(output)
    work = target.with_name(target.name + ".shards")
    if target.exists():
        done = _already_done(output, records, config, start)
        with WriterLock(work):
            # Left by a run stopped between its merge and the removal of its shards.
            shutil.rmtree(work, ignore_errors=True)
        return done
    ray = _import_ray()
    work.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(work):
        started = _connect(ray, address)
        try:
            resources = ray.cluster_resources()
            gpu = config.device.startswith("cuda") or (config.device == "auto" and resources.get("GPU", 0) > 0)
            threads = config.threads or 1
            if shards is None:
                shards = int(resources.get("GPU", 0)) if gpu else int(resources.get("CPU", 1)) // threads
                shards = max(shards, 1)
            if shards > n_unique:
                log.info("%d shards asked for, but %s holds %d unique sequences: %d shards", shards, input_path,
                         n_unique, n_unique)
                shards = n_unique
            work.mkdir(exist_ok=True)
            paths = [work / f"shard-{i}-of-{shards}.h5" for i in range(shards)]
            shard_config = dataclasses.replace(config, threads=threads, device="cuda" if gpu else config.device)
            log.info("%s: %d records in %d shards on Ray (%s), %s per shard", input_path, len(records), shards,
                     address or "a local instance", "1 GPU" if gpu else f"{threads} CPU threads")
            results = _run(ray, paths, str(input_path), shard_config, gpu, max_retries,
                           {"fmt": fmt, "id_col": id_col, "seq_col": seq_col, "command": command})
        finally:
            if started:
                ray.shutdown()
        merge_caches(paths, output, command=command)
        shutil.rmtree(work)
    seconds = time.perf_counter() - start
    residues = sum(r["residues_embedded"] for r in results)
    summary = ExtractSummary(
        output=str(output),
        records=len(records),
        unique_sequences=n_unique,
        already_present=sum(r["already_present"] for r in results),
        embedded=sum(r["embedded"] for r in results),
        residues_embedded=residues,
        truncated=sum(r["truncated"] for r in results),
        chunked=sum(r["chunked"] for r in results),
        skipped=sum(r["skipped"] for r in results),
        seconds=seconds,
        residues_per_second=residues / seconds if seconds > 0 else 0.0,
        oom_retries=sum(r["oom_retries"] for r in results),
    )
    log.info("%s: %d shards embedded %d sequences (%d residues) and were merged in %.1f s", output, shards,
             summary.embedded, residues, seconds)
    return summary


def _already_done(output: Path, records, config: ExtractConfig, start: float) -> ExtractSummary:
    """An existing output is left alone: fine when it holds every ID of the input already, made with these
    settings, refused otherwise."""
    from .store import EmbeddingCache

    with EmbeddingCache(output) as cache:
        differ = settings_differences(cache.attrs, config)
        if differ:
            raise CacheError(f"{output}: exists and was made with other settings ({'; '.join(differ)}); the ray "
                             "executor writes a new file: choose another output, or run with the settings it was "
                             "made with")
        ids, _, keys = cache.all_ids()
    have = dict(zip(ids, keys))
    missing = [rec.id for rec in records if have.get(rec.id) != rec.key]
    if missing:
        raise CacheError(f"{output}: exists and lacks {len(missing)} IDs of the input (e.g. {missing[0]!r}); the "
                         "ray executor writes a new file: choose another output, then `embedcache merge` the two")
    log.info("%s: already holds every ID of the input", output)
    return ExtractSummary(output=str(output), records=len(records), unique_sequences=len({r.key for r in records}),
                          already_present=len({r.key for r in records}), embedded=0, residues_embedded=0,
                          truncated=0, chunked=0, skipped=0, seconds=time.perf_counter() - start,
                          residues_per_second=0.0, written=False)


def settings_differences(attrs: dict, config: ExtractConfig) -> list[str]:
    """Where ``config`` asks for other embeddings than an existing cache's ``attrs`` hold.

    Judged without loading the model, from what the cache recorded of it (its weights' sha256,
    number of layers, window), so that the driver of a cluster run needs neither the weights'
    memory nor the workers' device. ``precision`` auto accepts what auto picks on any device.
    """
    from .backbones import weights_digest
    from .layout import jsonable, settings_of

    found = settings_of(attrs)
    stored_config = attrs.get("config")
    try:
        requested = json.loads(jsonable(stored_config)) if stored_config is not None else {}
    except (TypeError, ValueError):
        requested = {}
    differ = []

    def compare(name: str, wanted, have) -> None:
        if wanted != have:
            differ.append(f"{name}: {have!r} there, {wanted!r} now")

    if config.weights is not None:
        compare("weights sha256", weights_digest(Path(config.weights)), found.get("weights_sha256"))
    elif config.model not in (attrs.get("model"), requested.get("model")) and (
        _model_sha256(config.model) != found.get("weights_sha256")
    ):
        compare("model", config.model, attrs.get("model"))
    num_layers = attrs.get("num_layers")
    if isinstance(num_layers, int):
        layers = sorted({layer + num_layers + 1 if layer < 0 else layer for layer in (config.layers or (-1,))})
        compare("layers", layers, [int(x) for x in np.atleast_1d(found.get("layers", []))])
    compare("long_policy", config.long, found.get("long_policy"))
    compare("chunk_overlap", config.chunk_overlap if config.long == "chunk" else 0, found.get("chunk_overlap"))
    window = config.max_length if config.max_length is not None else attrs.get("max_residues")
    compare("max_length", None if window == "none" else window,
            None if found.get("max_length") == "none" else found.get("max_length"))
    compare("dtype", config.dtype, found.get("dtype"))
    compare("store", config.store, found.get("store"))
    precision = found.get("precision")
    if config.precision != "auto":
        compare("precision", config.precision, precision)
    elif precision == "int8":  # auto never picks int8
        compare("precision", "auto (fp32, bf16 or fp16)", precision)
    return differ


def _model_sha256(name: str | None) -> str | None:
    """The sha256 of the weights a model name loads, when it can be known without loading them."""
    from .backbones import family_of_name, weights_digest

    if not name:
        return None
    family = family_of_name(name)
    if family is None:
        return None
    try:
        local = family.locate(name)
    except (OSError, ValueError):
        local = None
    return weights_digest(local) if local is not None else family.official_sha256(name)


def _import_ray():
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ValueError("the ray executor needs Ray, which is not installed here: pip install "
                         "'embedcache[cluster]' (or pip install 'ray>=2.9')") from None


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` (or start a local instance); True when this call started Ray."""
    if address and address != "auto" and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=10):
                pass
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot reach a Ray cluster at {address!r} ({err}); start one with `ray start --head` "
                             "and give the address it prints, or leave out --address for a local one") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except Exception as err:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ValueError(f"cannot connect to {where}: {err.__class__.__name__}: {err}") from None
    return True


def _run(ray, paths: list[Path], input_path: str, config: ExtractConfig, gpu: bool, max_retries: int,
         options: dict) -> list[dict]:
    """Every shard as a task; results in shard order. A failed shard cancels the others."""
    task = ray.remote(_run_shard).options(
        num_cpus=1 if gpu else config.threads, num_gpus=1 if gpu else 0, max_retries=max_retries,
        retry_exceptions=False,
    )
    count = len(paths)
    pending = {
        task.remote(input_path, str(path), dataclasses.asdict(config), f"{i}/{count}", options): i
        for i, path in enumerate(paths)
    }
    results: dict[int, dict] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                first_line = (str(err).strip().splitlines() or [""])[0]
                if isinstance(err, ray.exceptions.RayTaskError):
                    what = f"its task failed ({first_line})"
                else:
                    what = f"its worker died {max_retries + 1} times ({err.__class__.__name__}: {first_line})"
                raise CacheError(f"{paths[index]} (shard {index}/{count}): {what}; run the same command again to "
                                 "resume it") from None
            if "error" in result:
                hint = ""
                if result["kind"] == "CacheError":
                    hint = (f" ({paths[index].parent} is this command's work folder: when an earlier run with "
                            "another input or other settings left it, delete it)")
                raise CacheError(f"{paths[index]} (shard {index}/{count}): {result['error']}{hint}")
            results[index] = result
            log.info("shard %d/%d done on %s: %d sequences embedded (%d residues, %.1f s); %d shards to go",
                     index, count, result["node"], result["embedded"], result["residues_embedded"],
                     result["seconds"], len(pending))
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    return [results[i] for i in range(count)]


def _run_shard(input_path: str, path: str, config: dict, shard: str, options: dict) -> dict:
    """One shard, in a Ray worker: a summary, or {"error": message} for a user error (which a retry cannot fix)."""
    from .extract import extract
    from .models import ModelLoadError
    from .sequences import InputError

    config = dict(config, shard=shard, layers=tuple(config["layers"]))
    restore = _die_after_first_part(path)
    try:
        summary = extract(input_path, path, ExtractConfig(**config), fmt=options["fmt"], id_col=options["id_col"],
                          seq_col=options["seq_col"], progress=False, command=options["command"])
    except (InputError, ModelLoadError, CacheError, ValueError, OSError) as err:
        return {"error": str(err), "kind": err.__class__.__name__}
    finally:
        restore()
    return dict(dataclasses.asdict(summary), node=socket.gethostname())


def _die_after_first_part(path: str):
    """For tests: the process of the first attempt at shard ``path`` dies as a killed worker would."""
    doomed, _, marker_path = os.environ.get(KILL_AFTER_FIRST_PART, "").partition("|")
    if doomed != path:
        return lambda: None
    marker = Path(marker_path)
    if marker.exists():
        return lambda: None
    from .writer import CacheWriter

    original = CacheWriter.write_part

    def write_part(self, results):
        written = original(self, results)
        marker.touch()
        os._exit(137)
        return written

    CacheWriter.write_part = write_part  # type: ignore[method-assign]

    def restore() -> None:
        CacheWriter.write_part = original  # type: ignore[method-assign]

    return restore
