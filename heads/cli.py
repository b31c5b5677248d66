"""``heads`` command line: a thin click layer over :mod:`heads.run`.

Like ``embedcache``'s, it imports torch and the heads only inside the commands, after the
signal handlers are in place (:class:`embedcache.cliutil.InterruptibleGroup`).
"""

from __future__ import annotations

import json
import logging

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
        click.option("--folds", type=LazyChoice(_fold_sources), default="auto", show_default=True,
                     help="The file's folds, stratified random ones, or GraphPart homology partitions."),
        click.option("--k", type=click.IntRange(min=3), default=5, show_default=True, help="Folds to build."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
                     help="Identity threshold for homology folds."),
        click.option("--aligner", type=click.Choice(["mmseqs2", "needle"]), default="mmseqs2", show_default=True),
        click.option("--layer", type=int, help="Cache layer [highest stored]."),
        click.option("--reference", type=click.Path(exists=True, file_okay=False),
                     help="Folder of model_{test}_{val}.csv probabilities of another tool."),
        click.option("--kind", type=click.Choice(["deeplocpro", "deeploc1", "csv"]),
                     help="Dataset format [recognised]."),
        click.option("--id-col"), click.option("--seq-col"),
        click.option("--label-col", default="label", show_default=True),
        click.option("--class-names", help="CSV label values to names: 0=Cytoplasm,1=Nucleus."),
        click.option("--set", "settings", multiple=True,
                     help="Head parameter, e.g. attention.max_epochs=30 or finetune.mode=lora (repeatable)."),
        click.option("--model", help="finetune: a model name as `embedcache models` lists it [the backbone that built "
                                     "--cache, found by its sha256]."),
        click.option("--weights", type=click.Path(exists=True),
                     help="finetune: local fair-esm ESM-2 .pt file [the backbone that built --cache]."),
        click.option("--lr", "lrs", type=float, multiple=True,
                     help="finetune learning rate; repeat for a sweep (one method per value, same splits)."),
        click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=1000, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars (progress lines are still logged)."),
        click.option("--verbose", "-v", is_flag=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
            summary = run_comparison(config, out, overwrite=overwrite)
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    table = summary["table"]
    click.echo(table[[c for c in table.columns if not c.endswith("_ci95")]].to_string(index=False, float_format="%.3f"))
    click.echo(f"\nrun written to {out}")


@click.group(cls=InterruptibleGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--head", help="Which head's fold models [the run's best by macro-F1].")
@click.option("--embeddings", "embeddings_dir", type=click.Path(file_okay=False),
              help="Folder for the caches --sequences builds [RUN/embeddings].")
@click.option("--device", default="auto", show_default=True, help="--sequences: where to embed (cpu, cuda, cuda:N).")
@click.option("--threads", type=click.IntRange(min=1), help="--sequences: torch CPU threads [cores available].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar while embedding --sequences.")
@click.option("--verbose", "-v", is_flag=True)
def predict_cmd(run_dir, cache, sequences, id_col, seq_col, out, head, embeddings_dir, device, threads,
                quiet, verbose) -> None:
    """Predict proteins with the ensemble of a run's fold models.

    Give the proteins as a cache of the run's own backbone (--cache) or as a FASTA/CSV file
    (--sequences), which is embedded the way the run's cache was. Only the model files the
    run recorded are used, each checked against its sha256. The column in_training_data
    marks proteins whose sequence the run trained on.
    """
    _logging(verbose)
    if (cache is None) == (sequences is None):
        raise click.UsageError("give the proteins with --cache C.h5 or with --sequences FILE (one of them)")
    if sequences is None and (id_col or seq_col):
        raise click.UsageError("--id-col and --seq-col apply to --sequences")
    from tqdm.contrib.logging import logging_redirect_tqdm

    from embedcache.atomic import atomic_path

    from .progress import set_bars
    from .run import predict

    set_bars(not quiet)
    user_errors = _user_errors()
    try:
        with resumable(), logging_redirect_tqdm():
            frame = predict(run_dir, cache, head, sequences=sequences, id_col=id_col, seq_col=seq_col,
                            embeddings_dir=embeddings_dir, device=device, threads=threads)
            with atomic_path(out) as tmp:
                frame.to_csv(tmp, sep="\t", index=False, float_format="%.5f")
    except user_errors as err:
        raise click.ClickException(str(err)) from None
    seen = int(frame["in_training_data"].sum())
    click.echo(f"{out}: {len(frame)} proteins ({seen} with a sequence from the run's training data), "
               f"ensemble of {frame.attrs['models']} {frame.attrs['head']} models")


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
