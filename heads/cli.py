"""``heads`` command line: a thin click layer over :mod:`heads.run`.

Like ``embedcache``'s, it imports torch and the heads only inside the commands, after the
signal handlers are in place (:class:`embedcache.cliutil.InterruptibleGroup`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from embedcache import __version__
from embedcache.cliutil import InterruptibleGroup, LazyChoice, resumable


def _user_errors() -> tuple[type[BaseException], ...]:
    from embedcache.atomic import DiskFullError
    from embedcache.layout import CacheError
    from embedcache.sequences import InputError

    return (InputError, CacheError, ValueError, KeyError, FileNotFoundError, RuntimeError, DiskFullError)


def _head_names() -> tuple[str, ...]:
    from .registry import HEADS

    return tuple(HEADS)


def _schemes() -> tuple[str, ...]:
    from .folds import SCHEMES

    return tuple(SCHEMES)


def _fold_sources() -> tuple[str, ...]:
    from .run import FOLD_SOURCES

    return tuple(FOLD_SOURCES)


class FoldsChoice(click.ParamType):
    """--folds: one of the words, or the path of a folds file (a word wins over a file of that name)."""

    name = "folds"

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(_fold_sources()) + "|FILE]"

    def convert(self, value, param, ctx):
        value = str(value)
        if value in _fold_sources():
            return value
        path = Path(value)
        if not path.exists():
            self.fail(f"{value!r} is neither one of {', '.join(_fold_sources())} nor an existing file"
                      + (" (a broken symbolic link)" if path.is_symlink() else ""), param, ctx)
        if path.is_dir():
            self.fail(f"{value!r} is a directory, not a folds file", param, ctx)
        if not path.is_file():
            self.fail(f"{value!r} is not a regular file (a pipe, FIFO or device); give a folds file", param, ctx)
        return value


def _params(values: tuple[str, ...]) -> dict:
    """``--set attention.max_epochs=30`` -> {"attention": {"max_epochs": 30}} (values read as JSON)."""
    from .registry import HEADS

    out: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        head, dot, name = key.partition(".")
        if not sep or not dot:
            raise click.BadParameter(f"{item!r} is not HEAD.PARAM=VALUE")
        if head not in HEADS:
            raise click.BadParameter(f"{item!r}: unknown head {head!r}; heads are {', '.join(HEADS)}")
        try:
            HEADS[head].check_param_names({name: None})
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(head, {})[name] = value
    return out


def _class_names(value: str | None) -> dict | None:
    if not value:
        return None
    pairs = [p.split("=", 1) for p in value.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise click.BadParameter(f"{value!r} is not VALUE=NAME,VALUE=NAME")
    return dict(pairs)


def _label_cols(ctx, param, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    cols = tuple(c.strip() for c in value.split(",") if c.strip())
    if not cols:
        raise click.BadParameter("give the label columns as A,B,C or 'auto'")
    return cols


def dataset_options(func):
    """How a labelled file is read: the same options for cv/compare, describe and folds."""
    options = [
        click.option("--kind", type=click.Choice(["deeplocpro", "deeploc1", "csv"]),
                     help="Dataset format [recognised]."),
        click.option("--id-col"), click.option("--seq-col"),
        click.option("--label-col", default="label", show_default=True),
        click.option("--class-names", help="CSV label values to names: 0=Cytoplasm,1=Nucleus."),
        click.option("--label-cols", callback=_label_cols,
                     help="Multi-label CSV: the 0/1 columns, one per label (A,B,C), or 'auto' (every 0/1 column). "
                          "Each label gets a probability and a threshold chosen on the validation fold."),
        click.option("--task", type=click.Choice(["location", "membrane", "multilabel"]), default="location",
                     show_default=True,
                     help="DeepLoc 1.0 headers as: the location, membrane-bound or soluble (proteins marked U left "
                          "out), or the set of locations (multi-label)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


ARGV = "heads.argv"  # click's context meta key for the command line


class HeadsGroup(InterruptibleGroup):
    """Keeps the command line as typed, for the run's config.json and report."""

    torch_commands = frozenset({"cv", "compare", "predict", "explain"})

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # info_name is "python -m heads" when run as a module: one word each.
        ctx.meta[ARGV] = [*(ctx.info_name or "heads").split(), *args]
        return super().parse_args(ctx, args)


def _command_line() -> list[str]:
    return list(click.get_current_context().meta.get(ARGV) or ["heads", *sys.argv[1:]])


def common(func):
    options = [
        click.option("--cache", type=click.Path(exists=True, dir_okay=False),
                     help="Embedding cache (embedcache extract); frozen heads need it, finetune alone does not."),
        click.option("--data", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="Labelled dataset file (repeat to merge several)."),
        click.option("--test-data", type=click.Path(exists=True, dir_okay=False),
                     help="A labelled file used only as the test set: train and validate on --data, test here."),
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Run directory: new, empty, or holding this same run (which then resumes)."),
        click.option("--overwrite", is_flag=True,
                     help="Delete the run --out holds (other settings, data or embeddings) and write this one."),
        click.option("--scheme", type=LazyChoice(_schemes), default="simple", show_default=True,
                     help="simple: K models; nested: K(K-1) models (DeepLocPro's), test probabilities averaged. "
                          "Nested costs K(K-1) trainings per head: 20 fine-tunings of the backbone for K=5."),
        click.option("--folds", type=FoldsChoice(), default="auto", show_default=True,
                     help="auto: the data file's folds, else stratified; file: the data file's; stratified: random, "
                          "class proportions kept; homology: GraphPart partitions (reused from the folds cache when "
                          "built before from the same proteins and settings); or FILE: a folds file written by "
                          "`heads folds`, checked protein by protein against the data (a file named like one of "
                          "the words needs a path: ./homology)."),
        click.option("--fold-col", help="CSV/TSV column of --data holding each protein's fold (whole numbers; "
                                        "negative: left out)."),
        click.option("--k", type=click.IntRange(min=3), default=5, show_default=True,
                     help="Folds to build (stratified, homology)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
                     help="Identity threshold for homology folds."),
        click.option("--aligner", type=click.Choice(["mmseqs2", "needle"]), default="mmseqs2", show_default=True),
        click.option("--layer", type=int, help="Cache layer [highest stored]."),
        click.option("--reference", type=click.Path(exists=True, file_okay=False),
                     help="Folder of model_{test}_{val}.csv probabilities of another tool."),
        click.option("--reference-name",
                     help="The reference tool's name in figures and tables, e.g. DeepLocPro [reference]."),
        click.option("--set", "settings", multiple=True,
                     help="Head parameter, e.g. attention.max_epochs=30 or finetune.mode=lora (repeatable)."),
        click.option("--model", help="finetune: a model name as `embedcache models` lists it [the backbone that built "
                                     "--cache, found by its sha256]."),
        click.option("--weights", type=click.Path(exists=True),
                     help="finetune: local fair-esm ESM-2 .pt file [the backbone that built --cache]."),
        click.option("--lr", "lrs", type=float, multiple=True,
                     help="finetune learning rate; repeat for a sweep (one method per value, same splits)."),
        click.option("--figures/--no-figures", default=True, show_default=True,
                     help="Draw every figure into OUT/plots (SVG and PNG); --no-figures saves the time in sweeps."),
        click.option("--threads", type=click.IntRange(min=1),
                     help="CPU threads of every head (attention, finetune, LightGBM) [a resumed run's own; else the "
                          "cores free at the start]. Attention and finetune resume only with the count they began "
                          "with."),
        click.option("--ensemble", type=click.Choice(["mean", "stack"]), is_flag=False, flag_value="mean",
                     default=None,
                     help="Add a row combining every head method of the run (not the reference): mean of their "
                          "probabilities (--ensemble or --ensemble mean), or stacking (--ensemble stack: per split a "
                          "logistic regression fitted on the validation fold only). Paired tests against each "
                          "member; `heads predict --head ensemble` repeats it. Needs at least two methods."),
        click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=1000, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars (progress lines are still logged)."),
        click.option("--verbose", "-v", is_flag=True),
    ]
    for option in reversed(options):
        func = option(func)
    return dataset_options(func)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _run(heads: tuple[str, ...], kw: dict) -> None:
    _logging(kw.pop("verbose"))
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .progress import set_bars
    from .run import RunConfig, run_comparison

    set_bars(not kw.pop("quiet"))

    out = kw.pop("out")
    overwrite = kw.pop("overwrite")
    data = kw.pop("data")
    config = RunConfig(data=data[0] if len(data) == 1 else tuple(data), heads=heads,
                       head_params=_params(kw.pop("settings")), class_names=_class_names(kw.pop("class_names")),
                       lrs=tuple(kw.pop("lrs")), **kw)
    user_errors = _user_errors()
    try:
        with resumable(), logging_redirect_tqdm():
            summary = run_comparison(config, out, overwrite=overwrite, command=_command_line())
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    table = summary["table"]
    click.echo(table[[c for c in table.columns if not c.endswith("_ci95")]].to_string(index=False, float_format="%.3f"))
    click.echo(f"\nrun written to {out} (report: {out}/report.html)")


@click.group(cls=HeadsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="heads")
def main() -> None:
    """Train light heads on an embedding cache and compare them under the same folds."""


@main.command("cv")
@click.option("--head", type=LazyChoice(_head_names), required=True)
@common
def cv_cmd(head, **kw) -> None:
    """Cross-validate one head."""
    _run((head,), kw)


@main.command("compare")
@click.option("--heads", default="logreg,lightgbm,attention", show_default=True,
              help="Comma-separated heads: logreg, lightgbm, attention (frozen embeddings), "
                   "finetune (ESM-2 end to end).")
@common
def compare_cmd(heads, **kw) -> None:
    """Cross-validate several heads on the same splits (and a reference tool) in one table.

    finetune trains ESM-2 itself on every split (full, top layers or LoRA: --set finetune.mode=lora);
    it saves a checkpoint after every epoch under OUT/work/, and the same command started again
    resumes there.
    """
    _run(tuple(h.strip() for h in heads.split(",") if h.strip()), kw)


@main.command("predict")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A run directory.")
@click.option("--cache", type=click.Path(exists=True, dir_okay=False),
              help="Embedding cache of the proteins, made with the run's backbone and extraction settings.")
@click.option("--sequences", type=click.Path(exists=True, dir_okay=False),
              help="FASTA or CSV/TSV of the proteins: embedded with the run's backbone and settings "
                   "(cached in RUN/embeddings/ and reused).")
@click.option("--id-col", help="--sequences CSV: ID column [recognised].")
@click.option("--seq-col", help="--sequences CSV: sequence column [recognised].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TSV of predictions.")
@click.option("--head", help="Which head's fold models, or 'ensemble' for the run's ensemble of its heads "
                              "[the run's best by macro-F1].")
@click.option("--embeddings", "embeddings_dir", type=click.Path(file_okay=False),
              help="Folder for the caches --sequences builds [RUN/embeddings].")
@click.option("--device", default="auto", show_default=True, help="--sequences: where to embed (cpu, cuda, cuda:N).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for embedding --sequences and for the models [the cores free at the start].")
@click.option("--attention", "attention_out", type=click.Path(dir_okay=False),
              help="Also write every protein's per-residue attention weights (each attention head and their mean, "
                   "averaged over the fold models) to this HDF5 file; for the attention head and fine-tuning with "
                   "attention pooling.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar while embedding --sequences.")
@click.option("--verbose", "-v", is_flag=True)
def predict_cmd(run_dir, cache, sequences, id_col, seq_col, out, head, embeddings_dir, device, threads,
                attention_out, quiet, verbose) -> None:
    """Predict proteins with the ensemble of a run's fold models.

    Give the proteins as a cache of the run's own backbone (--cache) or as a FASTA/CSV file
    (--sequences), which is embedded the way the run's cache was. Only the model files the
    run recorded are used, each checked against its sha256. The column in_training_data
    marks proteins whose sequence the run trained on. --attention FILE.h5 also writes where
    each protein's models looked (`heads explain` draws it).
    """
    _logging(verbose)
    if (cache is None) == (sequences is None):
        raise click.UsageError("give the proteins with --cache C.h5 or with --sequences FILE (one of them)")
    if sequences is None and (id_col or seq_col):
        raise click.UsageError("--id-col and --seq-col apply to --sequences")
    if attention_out is not None and Path(attention_out).resolve() == Path(out).resolve():
        raise click.UsageError("--attention and --out must be different files")
    for option, target in (("--out", out), ("--attention", attention_out)):
        _refuse_overwriting_inputs(option, target, {"--cache": cache, "--sequences": sequences}, run_dir)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from embedcache.atomic import atomic_path

    from .progress import set_bars
    from .run import ensemble

    set_bars(not quiet)
    user_errors = _user_errors()
    try:
        with resumable(), logging_redirect_tqdm():
            result = ensemble(run_dir, cache, head, sequences=sequences, id_col=id_col, seq_col=seq_col,
                              embeddings_dir=embeddings_dir, device=device, threads=threads,
                              attention=attention_out is not None)
            frame = result.frame
            if attention_out is not None:
                from .explain import proteins_of, write_attention
                from .rundir import open_finished

                finished = open_finished(run_dir)
                write_attention(attention_out, proteins_of(result, finished), finished)
            with atomic_path(out) as tmp:
                # Multi-label: every digit, so that a row's set is exactly the labels whose p_ reaches
                # its threshold_ (rounded, a probability just below its threshold prints equal to it).
                frame.to_csv(tmp, sep="\t", index=False,
                             float_format=None if frame.attrs.get("multilabel") else "%.5f")
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    seen = int(frame["in_training_data"].sum())
    what = frame.attrs.get("what") or f"ensemble of {frame.attrs['models']} {frame.attrs['head']} models"
    click.echo(f"{out}: {len(frame)} proteins ({seen} with a sequence from the run's training data), {what}")
    if attention_out is not None:
        click.echo(f"{attention_out}: per-residue attention of every protein (mean over the "
                   f"{frame.attrs['models']} models)")


# What a run directory holds of its own: predictions written beside them are welcome, over them not.
RUN_FILES = frozenset({"config.json", "metrics.json", "comparison.csv", "comparison.md", "predictions.csv",
                       "splits.json", "report.html", "run.log", ".heads.lock"})
RUN_FOLDERS = frozenset({"models", "plots", "work", "embeddings"})


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _refuse_overwriting_inputs(option: str, target: str | None, inputs: dict[str, str | None], run_dir: str) -> None:
    """An output written over an input or a run's own file would destroy what the result was made from."""
    if target is None:
        return
    path = Path(target)
    for name, source in inputs.items():
        if source is not None and _same_file(path, Path(source)):
            raise click.UsageError(f"{option} {target} is the {name} file; writing there would destroy it")
    run = Path(run_dir).resolve()
    where = path.resolve()
    if where.is_relative_to(run):
        parts = where.relative_to(run).parts
        if parts and (parts[0] in RUN_FOLDERS or (len(parts) == 1 and parts[0] in RUN_FILES)):
            raise click.UsageError(f"{option} {target} is a file of the run {run_dir}; write elsewhere")


@main.command("explain")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A run directory.")
@click.option("--id", "ident", required=True, help="The protein's ID.")
@click.option("--attention", type=click.Path(exists=True, dir_okay=False),
              help="Attention file written by `heads predict --attention` for this run.")
@click.option("--cache", type=click.Path(exists=True, dir_okay=False),
              help="Or compute it now: an embedding cache holding the protein (the run's backbone and settings).")
@click.option("--sequences", type=click.Path(exists=True, dir_okay=False),
              help="Or compute it now: a FASTA or CSV/TSV holding the protein (only it is embedded).")
@click.option("--id-col", help="--sequences CSV: ID column [recognised].")
@click.option("--seq-col", help="--sequences CSV: sequence column [recognised].")
@click.option("--head", help="Which head's fold models [the run's best with attention].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for attention_ID.svg and .png.")
@click.option("--embeddings", "embeddings_dir", type=click.Path(file_okay=False),
              help="Folder for the cache --sequences builds [RUN/embeddings].")
@click.option("--device", default="auto", show_default=True, help="--sequences: where to embed (cpu, cuda, cuda:N).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for embedding --sequences and for the models [the cores free at the start].")
@click.option("--verbose", "-v", is_flag=True)
def explain_cmd(run_dir, ident, attention, cache, sequences, id_col, seq_col, head, out, embeddings_dir, device,
                threads, verbose) -> None:
    """Draw where a run's attention models looked in one protein: residue position against attention
    (each attention head and their mean), the predicted class and probability, the N-terminal 30
    residues shaded."""
    _logging(verbose)
    given = sum(x is not None for x in (attention, cache, sequences))
    if given != 1:
        raise click.UsageError("give one of --attention FILE.h5 (from heads predict), --cache C.h5 or "
                               "--sequences FILE")
    if sequences is None and (id_col or seq_col):
        raise click.UsageError("--id-col and --seq-col apply to --sequences")
    from .explain import explain

    user_errors = _user_errors()
    try:
        with resumable():
            paths = explain(run_dir, ident, out, attention=attention, cache=cache, sequences=sequences, head=head,
                            id_col=id_col, seq_col=seq_col, embeddings_dir=embeddings_dir, device=device,
                            threads=threads)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{paths['png']} and {paths['svg'].name}: attention of {ident}")


@main.command("describe")
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for describe.json, describe.html and the figures (SVG and PNG).")
@click.option("--cache", type=click.Path(exists=True, dir_okay=False),
              help="Embedding cache: the model window, long-sequence policy and special tokens come from its "
                   "recorded settings [ESM-2: 1,022 residues, BOS and EOS].")
@click.option("--against", type=click.Path(exists=True, dir_okay=False),
              help="Another set (e.g. a benchmark): proteins both share, identical and by MMseqs2 identity.")
@click.option("--identity", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="--against: identity over the shorter sequence counted as overlap.")
@dataset_options
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="MMseqs2 threads.")
@click.option("--verbose", "-v", is_flag=True)
def describe_cmd(data, out, cache, against, identity, kind, id_col, seq_col, label_col, class_names, label_cols,
                 task, threads, verbose) -> None:
    """Describe a labelled dataset: classes, groups, folds, duplicates, lengths against the model
    window, tokens, unusual residues and overlap with another set."""
    import shlex
    import sys

    _logging(verbose)
    from .describe import write_report

    user_errors = _user_errors()
    try:
        with resumable():
            report = write_report(out, data, kind=kind, cache=cache, against=against, identity=identity,
                                  threads=threads, id_col=id_col, seq_col=seq_col, label_col=label_col,
                                  class_names=_class_names(class_names), label_cols=label_cols, task=task,
                                  command=shlex.join(["heads", *sys.argv[1:]]))
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    counts, dup, window, tok = report["counts"], report["duplicates"], report["window"], report["tokens"]
    click.echo(f"{report['dataset']}: {counts['n']:,} proteins, {len(counts['classes'])} classes, "
               f"{dup['duplicate_sets']:,} duplicated sequences ({dup['sets_with_conflicting_labels']:,} with "
               f"conflicting labels)")
    if window["window"] is not None:
        click.echo(f"over the {window['window']:,}-residue window: {window['over_window']:,}; "
                   f"tokens p95 {tok['p95']:,}")
    else:
        click.echo(f"no model window ({window['family']}); tokens p95 {tok['p95']:,}")
    if "against" in report:
        other = report["against"]
        line = f"overlap with {other['dataset']}: {other['exact']['proteins']:,} identical"
        if other["homology"].get("available"):
            line += f", {other['homology']['proteins']:,} at >= {other['homology']['identity']:.0%} identity"
        click.echo(line)
    click.echo(f"report written to {out}/describe.html")


@main.command("folds")
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The folds file to write (TSV: id, fold, sequence_key, under a header of how they were built).")
@click.option("--method", type=click.Choice(["homology", "stratified"]), default="homology", show_default=True,
              help="homology: GraphPart partitions, no pair across folds above --threshold identity; stratified: "
                   "random folds, label proportions kept, identical sequences together.")
@click.option("--k", type=click.IntRange(min=3), default=5, show_default=True, help="Folds.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="homology: identity allowed across folds.")
@click.option("--aligner", type=click.Choice(["mmseqs2", "needle"]), default="mmseqs2", show_default=True,
              help="homology: GraphPart's aligner (MMseqs2, or EMBOSS needleall).")
@click.option("--seed", type=int, default=0, show_default=True, help="stratified: the random seed.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="homology: aligner threads.")
@click.option("--no-cache", is_flag=True,
              help="homology: build the partition again, neither reading nor storing the folds cache "
                   "($HEADS_CACHE_DIR, else ~/.cache/heads/folds).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False),
              help="Log of the command, every line GraphPart and MMseqs2 print included (appended to) [OUT.log].")
@dataset_options
@click.option("--verbose", "-v", is_flag=True, help="Also show every line GraphPart and MMseqs2 print.")
def folds_cmd(data, out, method, k, threshold, aligner, seed, threads, no_cache, log_file, kind, id_col, seq_col,
              label_col, class_names, label_cols, task, verbose) -> None:
    """Build the folds of DATA once (several files are merged, as --data repeated does) and write them to a folds
    file for `heads cv/compare --folds FILE`.

    The file names each protein with the key of its sequence: a run checks every protein against
    it, so folds built from other data are refused. Homology partitions are also kept in the folds
    cache and reused by `--folds homology` on the same proteins and settings.
    """
    import time

    _logging(verbose)
    log_file = log_file or f"{out}.log"
    if _same_file(Path(log_file), Path(out)):
        raise click.UsageError("--log and --out must be different files")
    for option, target in (("--out", out), ("--log", log_file)):
        for source in data:
            if _same_file(Path(target), Path(source)):
                raise click.UsageError(f"{option} {target} is the data file {source}; writing there would destroy it")
        # Made as the folds file's own folder would be, before the log is opened in it; a file in
        # the way is found now rather than after the partition is built (minutes).
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise click.UsageError(f"{option} {target}: cannot make its folder ({err.strerror or err})") from None
    # Not heads.run: building folds needs no torch.
    from .datasets import describe_labels, load_labeled_files
    from .folds import build_partition, write_folds
    from .progress import RunLog, duration

    names = _class_names(class_names)
    start = time.monotonic()
    user_errors = _user_errors()
    log = logging.getLogger("heads.folds")
    try:
        with RunLog() as run_log:
            run_log.attach_file(log_file)
            dataset = load_labeled_files(data, kind, None, task, id_col=id_col, seq_col=seq_col, label_col=label_col,
                                         class_names=names, label_cols=label_cols)
            log.info("%s: %d proteins, %s; building %d %s folds", ", ".join(data), len(dataset),
                     describe_labels(dataset), k, method)
            partition = build_partition(dataset.ids, dataset.sequences, dataset.labels, method, k, threshold, aligner,
                                        seed, threads, classes=dataset.classes, cache=not no_cache,
                                        data_name=", ".join(Path(d).name for d in data))
            write_folds(partition, out)
            how = f"reused from {partition.cached}" if partition.cached else "built"
            summary = f"{out}: {partition.summary()}; {how} in {duration(time.monotonic() - start)}"
            log.info("%s", summary)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    click.echo(summary)


@main.command("report")
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Where to write the page [RUN/report.html].")
@click.option("--verbose", "-v", is_flag=True)
def report_cmd(run_dir, out, verbose) -> None:
    """Write a finished run's report.html again from its files (e.g. for runs made before reports).

    One self-contained page: comparison table, paired tests, per-class and per-group tables,
    the run's figures inline and its provenance.
    """
    _logging(verbose)
    from .htmlreport import rebuild_report

    user_errors = _user_errors()
    try:
        path = rebuild_report(run_dir, out)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{path}: report of {run_dir}")


@main.command("export-backbone")
@click.option("--model", "model_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A fine-tuned model: OUT/models/finetune/SPLIT.finetune.pt of a run.")
@click.option("--out", required=True, type=click.Path(),
              help="Where to write the backbone in its own format: a fair-esm checkpoint, UniRep .npz arrays, "
                   "or a Hugging Face directory.")
@click.option("--weights", type=click.Path(exists=True), help="Base weights, if no longer where training found them.")
def export_backbone_cmd(model_file, out, weights) -> None:
    """Write a fine-tuned backbone (LoRA merged) for `embedcache extract --weights OUT`."""
    from .finetune import FinetuneHead

    user_errors = _user_errors()
    try:
        path = FinetuneHead.load(model_file, weights=weights).save_backbone(out)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{path}: fine-tuned backbone; build a cache with `embedcache extract --weights {path} ...`")


@main.command("params")
@click.argument("head", required=False, type=LazyChoice(_head_names))
def params_cmd(head) -> None:
    """List every parameter of every head (or of HEAD), its default and meaning; \
set them with --set HEAD.PARAM=VALUE."""
    from .registry import HEADS, param_table

    rows = param_table(head)
    width = max(len(r["param"]) for r in rows)
    current = None
    for row in rows:
        if row["head"] != current:
            current = row["head"]
            click.echo(f"{'' if current == rows[0]['head'] else chr(10)}{current} ({HEADS[current].__name__})")
        value = row["default"]
        default = json.dumps(list(value) if isinstance(value, tuple) else value)
        click.echo(f"  {row['param']:<{width}}  {default:<10}  {row['meaning']}")


if __name__ == "__main__":
    main()
