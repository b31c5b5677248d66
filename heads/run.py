"""Runs: dataset + cache + heads + folds -> a run directory. Typed functions the CLI wraps."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from embedcache.atomic import real_path
from embedcache.backbones import ModelLoadError, backbone_for_cache, family_of_name, weights_digest
from embedcache.sequences import read_sequences, sequence_key
from embedcache.store import EmbeddingCache

from .combine import (
    ENSEMBLE,
    check_kind,
    check_stackable,
    combine,
    describe,
    load_stacker,
    predict_combined,
    save_stackers,
)
from .datasets import LabeledSet, describe_labels, load_labeled_files, merge, present_classes
from .evaluate import MethodResult, cross_validate, read_reference
from .features import FeatureSource, require_residues
from .figstyle import FigureContext
from .folds import folds_for, homology_partition, read_folds, scheme, stratified_folds
from .htmlreport import describe_folds, file_digests, software_versions
from .multilabel import label_sets, set_names
from .progress import bars_shown, with_run_log
from .registry import Head, get_head_class, make_head
from .report import write_config, write_run
from .rundir import (
    FinishedRun,
    RunDirectory,
    RunDirectoryError,
    backbone_identity,
    canonical_json,
    check_has_attention,
    check_identity,
    describe_identity,
    open_finished,
    read_config,
    run_fingerprint,
    write_manifest,
    write_training_keys,
)

log = logging.getLogger(__name__)

FOLD_SOURCES = ("auto", "file", "stratified", "homology")


@dataclass
class RunConfig:
    """Everything a comparison depends on; saved as the run's config.json."""

    data: str | tuple[str, ...]  # labelled file(s): DeepLocPro FASTA, DeepLoc 1.0 FASTA, or CSV; several are merged
    cache: str | None = None  # embedcache file holding every protein of `data` (frozen heads need it)
    heads: tuple[str, ...] = ("logreg",)  # logreg | lightgbm | attention | finetune
    scheme: str = "simple"  # simple: K models | nested: K(K-1) models, test probabilities averaged
    model: str | None = None  # finetune's ESM-2 by name; with `weights` None: the cache's own backbone
    weights: str | None = None  # finetune's ESM-2 as a local fair-esm .pt file
    lrs: tuple[float, ...] = ()  # learning-rate sweep: one finetune method per value, on the same splits
    # auto (the file's, else stratified) | file | stratified | homology (GraphPart, cached by content) |
    # the path of a folds file written by `heads folds` (a word wins over a file of that name)
    folds: str = "auto"
    k: int = 5  # folds to build when the file has none
    seed: int = 0  # for built folds and for every head's random_state
    threshold: float = 0.3  # sequence identity allowed across homology folds
    aligner: str = "mmseqs2"  # GraphPart's aligner: mmseqs2 | needle
    layer: int | None = None  # cache layer to use; None: the highest stored
    reference: str | None = None  # folder of model_{test}_{val}.csv probabilities from another tool
    reference_name: str | None = None  # the reference tool's name in figures and tables (display only)
    figures: bool = True  # draw plots/ (display only: a sweep of many runs may leave them out)
    test_data: str | None = None  # a labelled file held out as the only test set (train and validate on `data`)
    head_params: dict = field(default_factory=dict)  # {"attention": {"max_epochs": 30}, ...}
    kind: str | None = None  # dataset reader; None: recognised from the file
    id_col: str | None = None  # CSV columns (recognised when None)
    seq_col: str | None = None
    label_col: str = "label"
    class_names: dict | None = None  # CSV label value -> class name, e.g. {"0": "Cytoplasm"}
    # Multi-label CSV: one 0/1 column per label (("auto",): every 0/1 column); None: one label column
    label_cols: tuple[str, ...] | None = None
    # What DeepLoc 1.0 headers are read as: location (one per protein) | membrane (M/S; U left
    # out) | multilabel (the set of locations)
    task: str = "location"
    fold_col: str | None = None  # CSV column of `data` holding each protein's fold (negative: left out)
    n_boot: int = 1000  # bootstrap resamples for intervals and paired tests
    # CPU threads of every head that has a setting for them (attention, finetune, LightGBM);
    # None: a resumed run's own count, else the cores free at the start. config.json records the
    # count used. A head's own --set (attention.threads=...) wins.
    threads: int | None = None
    # One more row combining every head method the run trains (not the reference): None | "mean"
    # (the mean of their probabilities) | "stack" (per split a logistic regression fitted on the
    # validation fold only)
    ensemble: str | None = None


def load_data(config: RunConfig) -> tuple[LabeledSet, dict]:
    """The labelled set with the folds the config asks for, and a description of the folds.

    With ``test_data``, its proteins form one more fold, the only one used for testing;
    training proteins whose sequence also occurs in it are dropped first.
    """
    source = fold_source(config)
    data = _read(config, config.data, config.fold_col)
    present = present_classes(data)
    if not data.multilabel and len(present) < 2:
        # Refused here, by name, before folds are built (homology folds take minutes); a head
        # would refuse it later naming only the class's index.
        how = (" (--task membrane: M is Membrane, S Soluble; proteins marked U are left out)"
               if config.task == "membrane" else "")
        files = config.data if isinstance(config.data, str) else " + ".join(config.data)
        raise ValueError(f"{files}: every protein is {present[0] if present else 'unlabelled'}{how}; a "
                         "classifier needs at least two classes")
    if source == "auto":
        source = "file" if data.folds is not None else "stratified"
    info: dict[str, Any] = {"source": source}
    if source == "file":
        if data.folds is None:
            raise ValueError(f"{config.data} gives no folds; use --folds stratified or --folds homology, a folds "
                             "file (--folds FILE), or a column of the data (--fold-col COLUMN)")
        folds = data.folds
        if config.fold_col:
            info["column"] = config.fold_col
    elif source == "stratified":
        folds = stratified_folds(data.labels, data.sequences, config.k, config.seed)
        info.update(k=config.k, seed=config.seed)
    elif source == "homology":
        names = [config.data] if isinstance(config.data, str) else list(config.data)
        part = homology_partition(data.ids, data.sequences, data.labels, config.k, config.threshold, config.aligner,
                                  classes=data.classes, data_name=", ".join(Path(n).name for n in names))
        folds = part.folds
        info.update(k=config.k, threshold=config.threshold, aligner=config.aligner, removed=part.removed)
        if part.cached:
            info.update(cached=part.cached, built=part.built)
    else:
        table = read_folds(config.folds)
        folds, unused = folds_for(table, data.ids, data.sequences)
        info.update(table.info(), removed=int((folds < 0).sum()), proteins_not_in_data=len(unused))
        info["source"] = "folds_file"
    data = data.with_folds(folds)
    if config.test_data:
        test = _read(config, config.test_data)
        held_out = {sequence_key(s) for s in test.sequences}
        keep = np.array([sequence_key(s) not in held_out for s in data.sequences])
        test.folds = np.full(len(test), int(data.require_folds().max()) + 1)
        info.update(test_data=str(config.test_data), test_fold=int(test.folds[0]), n_test=len(test),
                    training_sequences_also_in_test_removed=int((~keep).sum()))
        if not keep.any():
            raise ValueError(f"every protein of {config.data} also occurs in the test data {config.test_data}; "
                             "nothing is left to train on")
        unseen = sorted(set(test.classes) - set(present_classes(data.subset(np.flatnonzero(keep)))))
        if unseen:
            info["test_classes_without_training_examples"] = unseen
            log.warning("%s: classes %s have no training examples in %s; no model can predict them",
                        config.test_data, ", ".join(unseen), config.data)
        data = merge([data.subset(np.flatnonzero(keep)), test], f"{data.name}->{test.name}")
    folds = data.require_folds()
    info["sizes"] = {int(f): int((folds == f).sum()) for f in np.unique(folds)}
    info["n"] = len(data)
    return data, info


def fold_source(config: RunConfig) -> str:
    """The config's folds as one of FOLD_SOURCES, or "folds_file" for the path of a folds file."""
    source = config.folds
    if source not in FOLD_SOURCES:
        path = Path(source)
        if not path.exists() and not path.is_symlink():
            raise ValueError(f"folds must be one of {', '.join(FOLD_SOURCES)} or a folds file (heads folds); "
                             f"{source!r} is neither")
        source = "folds_file"
    if config.fold_col and source not in ("auto", "file"):
        raise ValueError(f"--fold-col {config.fold_col} gives the folds, and --folds {config.folds} asks for other "
                         "ones; give one of them")
    return source


def _read(config: RunConfig, paths: str | tuple[str, ...], fold_col: str | None = None) -> LabeledSet:
    return load_labeled_files(paths, config.kind, fold_col, config.task, id_col=config.id_col, seq_col=config.seq_col,
                              label_col=config.label_col, class_names=config.class_names,
                              label_cols=config.label_cols)


def build_heads(config: RunConfig, cache_provenance: dict | None = None) -> dict[str, Head]:
    """Method name -> head. With ``lrs`` the finetune head becomes one method per learning rate."""
    heads = {}
    for name in config.heads:
        params = {"random_state": config.seed, **_thread_params(name, config.threads),
                  **config.head_params.get(name, {})}
        if name == "finetune":
            params.update(_backbone_params(config, cache_provenance, params))
            for lr in config.lrs or (None,):
                method = name if lr is None else f"{name}_lr{lr:g}"
                heads[method] = make_head(name, params if lr is None else {**params, "lr": lr})
        else:
            heads[name] = make_head(name, params)
    return heads


def _thread_params(name: str, threads: int | None) -> dict:
    param = get_head_class(name).threads_param
    return {param: threads} if param is not None and threads is not None else {}


def _backbone_params(config: RunConfig, provenance: dict | None, params: dict) -> dict:
    """finetune's backbone: --model/--weights, else the weights that built the cache (found by their sha256)."""
    if config.model or config.weights:
        return {"model": config.model, "weights": config.weights}
    if params.get("model") or params.get("weights"):
        return {}
    if provenance and config.cache:
        model, weights = backbone_for_cache(provenance, Path(config.cache))
        return {"model": model, "weights": weights}
    raise ValueError("finetune needs a backbone: --model NAME or --weights PATH (or a --cache, whose own weights "
                     "are then used)")


@with_run_log
def run_comparison(config: RunConfig, out: Path | str, title: str | None = None, overwrite: bool = False,
                   command: list[str] | None = None) -> dict:
    """Cross-validate every head on the same splits, add the reference, write the run.

    ``out`` must be new, empty, or hold this same run (same fingerprint), which then resumes:
    finished methods are computed again, fine-tuning continues from its checkpoints. Another
    run there is refused unless ``overwrite``, which deletes it first. ``command`` (the command
    line) and the software versions go into config.json but not into the fingerprint.
    """
    out = Path(out)
    config, threads_source, previous = _resolve_threads(config, out, overwrite)
    data, fold_info = load_data(config)
    if config.reference and data.multilabel:
        # Its files give one probability per class summing to 1, and no thresholds to make sets.
        raise ValueError(f"--reference reads another tool's single-label probabilities (DeepLocPro's format); "
                         f"{config.data} is multi-label")
    splits = scheme(config.scheme).split(data.require_folds(), fold_info.get("test_fold"))
    results: list[MethodResult] = []
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(EmbeddingCache(config.cache)) if config.cache else None
        cache_info: dict[str, Any] = cache.info() if cache else {"provenance": {}, "layers": [None]}
        heads = build_heads(config, cache_info["provenance"])  # fail on a bad head name before any training
        members = list(heads)  # the ensemble's, when asked: every head method, never the reference
        check_kind(config.ensemble, members)
        if config.ensemble == "stack":
            check_stackable(data, splits)
        frozen = [n for n, h in heads.items() if h.input != "sequence"]
        if frozen and cache is None:
            raise ValueError(f"heads {', '.join(frozen)} read embeddings: give --cache")
        residue_heads = [n for n, h in heads.items() if h.input == "per_residue"]
        if residue_heads and cache is not None:  # refused before any head is trained
            require_residues(cache, f"head{'s' if len(residue_heads) > 1 else ''} {', '.join(residue_heads)}")
        if cache is not None and config.layer is not None and config.layer not in cache.layers:
            raise ValueError(f"layer {config.layer} is not in {cache.path}; stored layers: {cache.layers}")
        features = FeatureSource(cache, data.sequences, config.layer, ids=data.ids)
        prov = cache_info["provenance"]
        layer = cache_info["layers"][-1] if config.layer is None else config.layer
        identity = backbone_identity(prov, layer) if cache is not None else None
        methods = {name: _method_identity(head) for name, head in heads.items()}
        fingerprint = run_fingerprint(_fingerprint_settings(config, fold_info), identity, methods, data)
        if previous is not None and previous[0] != config.threads and previous[1] != fingerprint:
            _refuse_other_threads(config, heads, identity, data, out, previous, fold_info)
        folds_file = fold_info.get("path") if fold_info["source"] == "folds_file" else None
        inputs = [*([config.data] if isinstance(config.data, str) else config.data), config.test_data,
                  config.cache, config.reference, config.weights, folds_file]
        run_dir = stack.enter_context(RunDirectory(out, fingerprint, overwrite, inputs))

        notes = [
            f"{len(data)} proteins, {describe_labels(data)}; folds: {describe_folds(fold_info)} (sizes "
            f"{', '.join(str(n) for n in fold_info['sizes'].values())}); scheme {config.scheme} "
            f"({len(splits)} models per head)",
            "95% intervals: percentile bootstrap over proteins",
        ]
        if cache is not None:
            notes.insert(1, f"embeddings: {prov.get('model')} ({prov.get('architecture')}), layer {layer}, "
                            f"weights sha256 {str(prov.get('weights_sha256'))[:12]}")
        for name, head in heads.items():
            if head.input == "sequence":
                p = head.get_params()
                notes.append(f"{name}: fine-tuned {p['weights'] or p['model']} (mode {p['mode']}, lr {p['lr']:g}, "
                             f"pooling {p['pooling']}); per-epoch logs and curves in work/{name}/")
        run_config = {
            **asdict(config),
            "multilabel": data.multilabel,
            "methods": methods,
            "folds_info": fold_info,
            "splits": [s.name for s in splits],
            "cache_provenance": prov,
            "cache_path": str(real_path(config.cache)) if config.cache else None,
            "backbone": identity,
            "fingerprint": fingerprint,
            "threads_chosen": threads_source,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "data_files": file_digests(asdict(config)) + (
                [{"role": "folds", "path": folds_file, "sha256": fold_info["sha256"]}] if folds_file else []),
            "software": software_versions(),
            "command": list(command) if command else None,
        }
        if config.ensemble:
            run_config["ensemble_members"] = members
        # Written first so that an interrupted run is recognised (and resumed) by its fingerprint;
        # without manifest_sha256 it does not count as finished.
        write_config(out, run_config, data.classes)
        for name, head in heads.items():
            # Sequence heads hold a whole backbone: saved as they finish, not kept in memory.
            result = cross_validate(head, data, features, splits, name, keep_models=head.input != "sequence",
                                    model_dir=out / "models" / name, work_dir=out / "work")
            results.append(result)
        record = None
        if config.ensemble:
            log.info("%s ensemble of %s", config.ensemble, ", ".join(members))
            combined = combine(config.ensemble, results[:len(members)], data, config.seed)
            save_stackers(combined, out / "models" / ENSEMBLE)
            results.append(combined.result)
            record = combined.record(data.multilabel)
            notes.append(describe(config.ensemble, members))
        if config.reference:
            results.append(read_reference(config.reference, data))
        if "test_fold" in fold_info:
            notes.insert(1, f"trained and validated on {config.data}, tested only on {config.test_data} "
                            f"({fold_info['n_test']} proteins; {fold_info['training_sequences_also_in_test_removed']} "
                            "training sequences also in the test file were dropped)")
        trained = sorted({int(i) for s in splits for i in (*s.train, *s.val)})
        keys = write_training_keys(out, (sequence_key(data.sequences[i]) for i in trained))
        saved = [model for result in results for model in result.saved]
        run_config["manifest_sha256"] = write_manifest(out, fingerprint, data.classes, saved, keys, identity,
                                                       ensemble=record)
        context = figure_context(config, data, fold_info, len(splits), prov, layer if cache is not None else None)
        pooled = None
        if cache is not None and config.figures:
            try:  # read already by any pooled head; only the embedding map needs it otherwise
                pooled = features.pooled()
            except (KeyError, ValueError, OSError) as err:
                log.warning("%s: no pooled embeddings for the embedding map (%s); the map is left out", cache.path, err)
        log.info("writing the results, intervals, paired tests and figures to %s", out)
        summary = write_run(out, run_config, data, results, title or f"{data.name}: {', '.join(heads)}", notes,
                            n_boot=config.n_boot, seed=config.seed, context=context, features=pooled,
                            figures=config.figures,
                            pairs=[(ENSEMBLE, m) for m in members] if config.ensemble else None)
    log.info("run written to %s%s", out, " (resumed)" if run_dir.resumed else "")
    return summary


# Settings that change how a run is shown, never what it computes.
DISPLAY_ONLY = ("reference_name", "figures")


def _fingerprint_settings(config: RunConfig, fold_info: dict | None = None) -> dict:
    """The config without the paths of inputs the fingerprint covers by content, and without display settings.

    The thread count enters through the methods instead, and only for heads whose numbers depend
    on it (attention, finetune): logistic regression runs on one BLAS thread and LightGBM's
    trees do not change with it, so a run of those resumes with any count. A folds file enters
    by the sha256 of its bytes (its folds also by the proteins' folds), not by its path.
    Settings added after runs were first made count only when set, so that an earlier run
    keeps its fingerprint and resumes.
    """
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("data", "test_data", "cache", "threads", *DISPLAY_ONLY)
                and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
    if fold_info and fold_info.get("source") == "folds_file":
        settings["folds"] = f"folds file sha256 {fold_info['sha256']}"
    return settings


# Settings added after the first runs, with the value that means "as before".
LATER_SETTINGS: dict[str, Any] = {"label_cols": None, "task": "location", "ensemble": None, "fold_col": None}


def _resolve_threads(config: RunConfig, out: Path, overwrite: bool) -> tuple[RunConfig, str, tuple | None]:
    """The config with the thread count the run uses; how it was chosen; the (threads, fingerprint) found in out.

    A run started again without --threads takes the count it started with: the default follows
    the load of the moment, and a resumed fine-tuning must not continue with another count.
    """
    previous = None
    if not overwrite:
        with contextlib.suppress(RunDirectoryError, OSError):
            found = (read_config(out) if out.is_dir() else None) or {}
            count, fingerprint = found.get("threads"), found.get("fingerprint")
            # An edited or older config.json without a usable count: the default decides.
            if isinstance(count, int) and not isinstance(count, bool) and count >= 1 and fingerprint:
                previous = (count, fingerprint)
    if config.threads is not None:
        return config, "given", previous
    if previous is not None:
        log.info("%s: resuming with the %d threads this run started with (--threads N to choose)", out, previous[0])
        return replace(config, threads=previous[0]), "resumed", previous
    from embedcache.threads import default_threads

    return replace(config, threads=default_threads()), "default", previous


def _refuse_other_threads(config: RunConfig, heads: dict[str, Head], identity: dict | None, data: LabeledSet,
                          out: Path, previous: tuple[int, str], fold_info: dict) -> None:
    """Out holds this very run, started with another thread count that changes its numbers: say so."""
    threads, fingerprint = previous
    methods, depends = {}, []
    for name, head in heads.items():
        method = _method_identity(head)
        param = head.threads_param
        own = param in config.head_params.get(head.kind, {})
        if param is not None and head.threads_change_results and not own and param in method:
            method = {**method, param: threads}
            depends.append(name)
        methods[name] = method
    if run_fingerprint(_fingerprint_settings(config, fold_info), identity, methods, data) == fingerprint:
        raise RunDirectoryError(
            f"{out} holds this run, started with {threads} threads; the numbers of {', '.join(depends)} depend on "
            f"the thread count, so it resumes only with --threads {threads} (or without --threads). "
            "--overwrite starts it again")


def figure_context(config: RunConfig, data: LabeledSet, fold_info: dict, n_splits: int,
                   provenance: dict | None, layer: int | None) -> FigureContext:
    """What every figure of the run says it shows: dataset, backbone, folds and scheme, proteins."""
    def named(path: str) -> str:
        p = Path(path)
        return f"{p.parent.name}/{p.name}" if p.parent.name not in ("", ".") else p.name

    paths = [config.data] if isinstance(config.data, str) else list(config.data)
    dataset = " + ".join(named(p) for p in paths)
    if config.test_data:
        dataset += f", tested on {named(config.test_data)}"
    folds = describe_folds({"seed": config.seed, "threshold": config.threshold, **fold_info}, config.scheme, n_splits)
    return FigureContext(dataset, backbone_title(provenance, layer, config), folds, len(data),
                         config.reference_name or "reference")


def backbone_title(provenance: dict | None, layer: int | None, config: RunConfig | None = None) -> str:
    """The embeddings' backbone as a reader knows it, e.g. "UniRep-256 (unirep256)" or "ESM-2 8M (NAME), layer 6"."""
    if not provenance:
        if config is not None and "finetune" in config.heads:
            return f"fine-tuned {config.model or Path(config.weights or '').name or 'ESM-2'}"
        return "no embeddings"
    model = str(provenance.get("model"))
    architecture = str(provenance.get("architecture") or "")
    family = provenance.get("family")
    if family == "unirep":
        size = "".join(ch for ch in model if ch.isdigit())
        return f"UniRep-{size} ({model})" if size else f"UniRep ({model})"
    if family == "esm2" or architecture.startswith("esm2_"):
        size = next((part for part in architecture.split("_") if part[:-1].isdigit() and part[-1] in "MB"), "")
        name = f"ESM-2 {size}".strip()
        total = provenance.get("num_layers")
        where = f", layer {layer}" + (f" of {total}" if total else "") if layer is not None else ""
        return f"{name} ({model}){where}"
    return f"{model} ({architecture})" + (f", layer {layer}" if layer is not None else "")


def predict(run: Path | str, cache_path: Path | str | None = None, head: str | None = None, *,
            sequences: Path | str | None = None, id_col: str | None = None, seq_col: str | None = None,
            embeddings_dir: Path | str | None = None, device: str = "auto",
            threads: int | None = None) -> pd.DataFrame:
    """Ensemble of a run's fold models on every protein of a cache, or of a FASTA/CSV file.

    Only the model files the run's manifest lists are loaded, each after its sha256 is
    checked. A cache must hold embeddings of the run's own backbone and settings. A sequence
    file is embedded with them into ``embeddings_dir`` (default RUN/embeddings/), one cache
    per input file, reused when asked again. The frame's ``in_training_data`` says whether a
    protein's sequence was among the run's training (or validation) sequences.
    """
    return ensemble(run, cache_path, head, sequences=sequences, id_col=id_col, seq_col=seq_col,
                    embeddings_dir=embeddings_dir, device=device, threads=threads).frame


@dataclass
class Ensemble:
    """What :func:`ensemble` predicted, and with ``attention`` where the models looked."""

    frame: pd.DataFrame  # as predict returns it
    sequences: list[str]  # the proteins' sequences, in the frame's order
    head: str  # the method whose fold models were averaged
    n_models: int
    # Per protein (attention heads, sequence length): each model's weights placed at their residues
    # (0 at residues a model did not see), averaged over the fold models.
    attention: list[np.ndarray] | None = None
    seen: list[np.ndarray] | None = None  # per protein, True at the residues the models saw


def ensemble(run: Path | str, cache_path: Path | str | None = None, head: str | None = None, *,
             sequences: Path | str | None = None, id_col: str | None = None, seq_col: str | None = None,
             embeddings_dir: Path | str | None = None, device: str = "auto", threads: int | None = None,
             attention: bool = False, only_ids: list[str] | None = None,
             per_split: dict[str, np.ndarray] | None = None) -> Ensemble:
    """:func:`predict`, optionally with residue attention (``attention``) and for some IDs only.

    ``per_split``, when given, receives each split's model's probabilities (split name -> (n, classes)
    in the frame's row order), before they are averaged.
    """
    if (cache_path is None) == (sequences is None):
        raise ValueError("give the proteins to predict as an embedding cache or as a sequence file (one of them)")
    run = Path(run)
    finished = open_finished(run)
    classes = finished.classes
    if head is None:
        head = _best_method(finished)
    if head == ENSEMBLE:
        if attention:
            raise ValueError(f"the {ENSEMBLE} has no attention weights of its own; choose one of its members with "
                             "--head")
        return _combined_ensemble(finished, cache_path, sequences=sequences, id_col=id_col, seq_col=seq_col,
                                  embeddings_dir=embeddings_dir, device=device, threads=threads, only_ids=only_ids)
    if attention:
        check_has_attention(finished, head)
    entries = finished.models(head)
    kind = entries[0]["input"]
    training = finished.training_keys()
    if cache_path is not None and not h5py.is_hdf5(cache_path):
        raise ValueError(f"{cache_path}: not an HDF5 embedding cache; to predict the proteins of a FASTA or CSV "
                         "file, give it as --sequences (they are embedded with the run's backbone)")
    with contextlib.ExitStack() as stack:
        if kind == "sequence" and sequences is not None:
            # Fine-tuned models read residues, not embeddings: nothing to embed.
            records = read_sequences(sequences, None, id_col, seq_col)
            if only_ids is not None:
                known = {r.id for r in records}
                _check_ids(only_ids, known, sequences)
                wanted = set(only_ids)
                records = [r for r in records if r.id in wanted]
            ids, keys = [r.id for r in records], [r.key for r in records]
            features = FeatureSource(None, [r.sequence for r in records])
        else:
            if sequences is not None:
                cache_path = embed_for_run(finished, sequences, id_col, seq_col, embeddings_dir, device, threads)
            if cache_path is None:  # excluded above: proteins come as a cache or as sequences
                raise ValueError("give the proteins to predict as an embedding cache or as a sequence file")
            cache = stack.enter_context(EmbeddingCache(cache_path))
            if kind == "per_residue":
                require_residues(cache, f"{head} (attention pooling over residues)")
            if kind != "sequence":
                try:
                    check_identity(finished.config.get("backbone"), cache.attrs, run, Path(cache_path))
                except RunDirectoryError:
                    if sequences is not None:  # made here from other weights: never reuse it
                        cache.close()
                        Path(cache_path).unlink(missing_ok=True)
                    raise
            if cache.skipped_ids:
                log.warning("%s: %d IDs have no embedding (longer than max_length, skipped) and get no prediction",
                            cache_path, len(cache.skipped_ids))
            ids = cache.ids
            if only_ids is not None:
                _check_ids(only_ids, set(ids) | set(cache.skipped_ids), cache_path)
                skipped = sorted(set(only_ids) & set(cache.skipped_ids))
                if skipped:
                    raise ValueError(f"{cache_path}: {', '.join(skipped[:5])} has no embedding (longer than the "
                                     "cache's max_length, skipped)")
                wanted = set(only_ids)
                ids = [i for i in ids if i in wanted]
            keys = [cache.key(i) for i in ids]
            layer = (finished.config.get("backbone") or {}).get("layer")
            features = FeatureSource.from_rows(cache, cache.rows(ids), layer)
        seqs = [str(s) for s in features.sequences()]
        total = np.zeros((len(ids), len(classes)))
        multilabel = bool(finished.config.get("multilabel"))
        thresholds = np.zeros(len(classes))
        maps: list[np.ndarray | None] | None = [None] * len(ids) if attention else None
        seen = [np.zeros(len(s), dtype=bool) for s in seqs]
        for entry in entries:  # one at a time: a fine-tuned model holds a whole backbone
            path = run / "models" / entry["file"]
            # Trained with the run's thread count; predictions keep this machine's (the same to
            # float rounding).
            model = Head.load(path).use_threads(threads)
            columns = np.asarray(model.classes_, dtype=np.int64)
            if [classes[k] for k in columns] != entry["classes"] or model.input != entry["input"]:
                raise RunDirectoryError(f"{path}: holds a model of classes {columns.tolist()} ({model.input}); the "
                                        f"manifest says {entry['classes']} ({entry['input']})")
            if bool(getattr(model, "multilabel_", False)) != multilabel:
                raise RunDirectoryError(f"{path}: holds a {'single' if multilabel else 'multi'}-label model; the run "
                                        f"is {'multi' if multilabel else 'single'}-label")
            if multilabel:
                if getattr(model, "thresholds_", None) is None or len(model.thresholds_) != len(classes):
                    raise RunDirectoryError(f"{path}: a multi-label model without its {len(classes)} thresholds")
                thresholds += model.thresholds_
            one = np.zeros((len(ids), len(classes)))
            if maps is None:
                one[:, columns] = model.predict_proba(features.for_input(model.input))
            else:
                if not hasattr(model, "attention"):
                    raise ValueError(f"{path}: a {model.kind} model has no attention weights")
                found = model.attention(features.for_input(model.input))
                one[:, columns] = found.proba
                _add_attention(maps, seen, found, seqs, path)
            total += one
            if per_split is not None:
                per_split[entry["split"]] = one
            del model
        proba = total / len(entries)
    if multilabel:
        # The fold models' probabilities and thresholds are averaged alike, as cross-validation did.
        thresholds /= len(entries)
        predicted = [set_names(row, classes) for row in label_sets(proba, thresholds)]
    else:
        predicted = [classes[k] for k in proba.argmax(1)]
    frame = prediction_frame(ids, predicted, [k in training for k in keys], classes, proba,
                             np.broadcast_to(thresholds, proba.shape) if multilabel else None)
    frame.attrs["head"] = head
    frame.attrs["models"] = len(entries)
    frame.attrs["cache"] = None if cache_path is None else str(cache_path)
    if maps is None:
        return Ensemble(frame, seqs, head, len(entries))
    averaged = [np.zeros((0, len(s)), dtype=np.float32) if m is None else m / len(entries) for m, s in zip(maps, seqs)]
    return Ensemble(frame, seqs, head, len(entries), averaged, seen)


def _combined_ensemble(finished: FinishedRun, cache_path: Path | str | None, **options) -> Ensemble:
    """The run's ensemble on new proteins, made as cross-validation made it.

    Each member predicts with its own checked model files; per split the members' probabilities
    are combined (their mean, or that split's stacker), then the splits are averaged, and so
    are a multi-label ensemble's per-split thresholds.
    """
    record = finished.ensemble()
    if record is None:
        raise RunDirectoryError(f"{finished.path}: the run has no {ENSEMBLE} (it was made without --ensemble); "
                                f"its methods: {', '.join(finished.methods)}")
    stackers = None
    n_stackers = 0
    if record["kind"] == "stack":
        entries = finished.models(ENSEMBLE)  # each file checked against its sha256
        stackers = {e["split"]: load_stacker(finished.path / "models" / e["file"]) for e in entries}
        n_stackers = len(entries)
    parts, member_splits = {}, {}
    for member in record["members"]:
        splits: dict[str, np.ndarray] = {}
        parts[member] = ensemble(finished.path, cache_path, member, per_split=splits, **options)
        member_splits[member] = splits
    first = parts[record["members"][0]]
    # Members that read sequences and members that read a cache may miss different proteins
    # (too long for the cache): the ensemble predicts those every member predicted.
    known = [set(p.frame["id"]) for p in parts.values()]
    ids = [i for i in first.frame["id"] if all(i in k for k in known)]
    if len(ids) < len(first.frame):
        log.warning("%d proteins lack a prediction of some ensemble member and get none from the ensemble",
                    len(first.frame) - len(ids))
    for member, part in parts.items():
        row = {ident: k for k, ident in enumerate(part.frame["id"])}
        order = np.array([row[i] for i in ids], dtype=np.int64)
        member_splits[member] = {s: p[order] for s, p in member_splits[member].items()}
    keep = np.array([{i: k for k, i in enumerate(first.frame["id"])}[i] for i in ids], dtype=np.int64)
    proba, thresholds = predict_combined(record, member_splits, stackers)
    classes = finished.classes
    if thresholds is not None:
        predicted = [set_names(row, classes) for row in label_sets(proba, thresholds)]
    else:
        predicted = [classes[k] for k in np.nan_to_num(proba, nan=0.0).argmax(1)]
    frame = prediction_frame(ids, predicted, first.frame["in_training_data"].to_numpy()[keep], classes, proba,
                             thresholds)
    n_models = sum(p.n_models for p in parts.values()) + n_stackers
    frame.attrs.update(head=ENSEMBLE, models=n_models, cache=first.frame.attrs.get("cache"),
                       what=f"{record['kind']} ensemble of {', '.join(record['members'])} ({n_models} models"
                            f"{', stackers included' if n_stackers else ''})")
    return Ensemble(frame, [first.sequences[k] for k in keep], ENSEMBLE, n_models)


def prediction_frame(ids: list[str], predicted: list[str], in_training, classes: list[str], proba: np.ndarray,
                     thresholds: np.ndarray | None) -> pd.DataFrame:
    """predict's table: id, prediction, in_training_data, p_CLASS per class and (multi-label)
    threshold_LABEL per label; ``attrs["multilabel"]`` says which."""
    columns: dict[str, Any] = {"id": ids, "prediction": predicted, "in_training_data": list(in_training)}
    columns.update({f"p_{c}": proba[:, k] for k, c in enumerate(classes)})
    if thresholds is not None:
        columns.update({f"threshold_{c}": thresholds[:, k] for k, c in enumerate(classes)})
    # One frame from all columns at once: a column added at a time fragments it (pandas warns
    # past 100 columns, which a run of 50 labels reaches).
    frame = pd.DataFrame(columns)
    frame.attrs["multilabel"] = thresholds is not None
    return frame


def _check_ids(wanted: list[str], known: set[str], source) -> None:
    missing = [i for i in wanted if i not in known]
    if missing:
        raise ValueError(f"{source}: no protein with ID {', '.join(map(repr, missing[:5]))}")


def _add_attention(maps: list, seen: list, found, sequences: list[str], path: Path) -> None:
    """Add one model's weights, placed at the residues they belong to, to the running sums."""
    for i, (w, pos) in enumerate(zip(found.weights, found.positions)):
        if len(pos) and pos.max() >= len(sequences[i]):
            raise ValueError(f"{path}: attention over {pos.max() + 1} residues for a sequence of {len(sequences[i])}")
        full = np.zeros((w.shape[0], len(sequences[i])), dtype=np.float32)
        full[:, pos] = w
        if maps[i] is None:
            maps[i] = full
        elif maps[i].shape[0] != full.shape[0]:
            raise ValueError(f"{path}: {full.shape[0]} attention heads, the run's other models have {maps[i].shape[0]}")
        else:
            maps[i] += full
        seen[i][pos] = True


def _best_method(finished: FinishedRun) -> str:
    path = finished.path / "metrics.json"
    try:
        metrics = json.loads(path.read_text())["methods"]
    except (OSError, ValueError, KeyError) as err:
        raise RunDirectoryError(f"{path}: cannot be read ({err}); name the head with --head") from None
    scored = [n for n in finished.methods if n in metrics and n != ENSEMBLE]
    if ENSEMBLE in metrics and finished.ensemble() is not None:
        scored.append(ENSEMBLE)
    if not scored:
        raise RunDirectoryError(f"{finished.path}: no saved models of a scored method; name the head with --head")
    return max(scored, key=lambda n: metrics[n]["macro_f1"])


def embed_for_run(finished: FinishedRun, sequences: Path | str, id_col: str | None = None,
                  seq_col: str | None = None, embeddings_dir: Path | str | None = None, device: str = "auto",
                  threads: int | None = None) -> Path:
    """Embed a FASTA/CSV with the backbone and extraction settings of the run's cache.

    The cache goes to ``embeddings_dir/<sha1 of the file, its column options and the settings>.h5``;
    a complete one is reused, an interrupted one resumed.
    """
    from embedcache.extract import ExtractConfig, extract

    identity = finished.config.get("backbone")
    prov = finished.config.get("cache_provenance") or {}
    if identity is None:
        raise RunDirectoryError(f"{finished.path}: the run was trained without an embedding cache; "
                                "its frozen heads cannot embed new proteins")
    settings = prov.get("config")
    settings = json.loads(settings) if isinstance(settings, str) else settings
    if not isinstance(settings, dict):
        raise RunDirectoryError(
            f"{finished.path}: its cache was not made by `embedcache extract` ({describe_identity(identity)}), so "
            "the proteins cannot be embedded the same way here; embed them as the run's cache was and give --cache")
    from_stdin = str(sequences) == "-"
    if not from_stdin and Path(sequences).exists() and not Path(sequences).is_file():
        # It is read three times (checked, named, embedded): a pipe gives its data to the first
        # reader only, and a named FIFO keeps the next one waiting for ever.
        raise ValueError(f"{sequences}: not a regular file (a pipe, FIFO or device); save the sequences to a file "
                         "and give that")
    records = read_sequences(sequences, None, id_col, seq_col)  # a bad file fails before any model is loaded
    # Named by the input and the embedding settings: runs of one backbone share a folder safely.
    digest = hashlib.sha1()
    if from_stdin:
        # Read once into a copy that extract reads again; its records name it.
        for rec in records:
            digest.update(f"{rec.id}\0{rec.header}\0{rec.key}\n".encode())
    else:
        with open(sequences, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    digest.update(f"\0{id_col}\0{seq_col}\0{canonical_json(identity)}".encode())
    target = Path(embeddings_dir or finished.path / "embeddings") / f"{digest.hexdigest()}.h5"
    if target.exists():
        with EmbeddingCache(target) as done:
            ids, _, keys = done.all_ids()
            known = dict(zip(ids, keys))
            # Each ID with its own sequence, not only its name: an ID may name another protein elsewhere.
            if all(known.get(r.id) == r.key for r in records):
                log.info("%s: embeddings of %s already there", target, sequences)
                return target
    try:
        model, weights = backbone_for_cache(prov, Path(finished.config.get("cache_path") or finished.config["cache"]))
    except ModelLoadError as err:
        # Its advice (--weights/--model) is for fine-tuning; predict uses only the run's own weights.
        raise ModelLoadError(f"{finished.path}: cannot embed {sequences} with the run's backbone: "
                             f"{str(err).split('. Pass --weights')[0]}. Put those weights back where the run's "
                             "cache recorded them, or beside that cache, or embed the proteins with them "
                             "yourself and pass --cache") from None
    config = ExtractConfig(
        model=model, weights=weights, layers=(int(identity["layer"]),), long=prov.get("long_policy", "truncate"),
        max_length=_int_or_none(prov.get("max_length")), chunk_overlap=int(prov.get("chunk_overlap") or 0),
        precision=prov.get("precision", "auto"), dtype=prov.get("dtype", "float16"), device=device, threads=threads,
        trust_weights=bool(settings.get("trust_weights", False)),
    )
    log.info("embedding %s with the run's backbone (%s) into %s", sequences, describe_identity(identity), target)
    extract(sequences, target, config, id_col=id_col, seq_col=seq_col, progress=bars_shown(),
            command=f"heads predict --run {finished.path} --sequences {sequences}")
    return target


def _method_identity(head: Head) -> dict:
    """A head's parameters; for a head that trains a backbone, also the sha256 of its weights.

    A weights path names a file whose contents may change: the run is the same run only on
    the same weights.
    """
    params = head.get_params()
    if head.threads_param is not None and not head.threads_change_results:
        params.pop(head.threads_param, None)  # the same numbers with any thread count
    if head.input != "sequence":
        return params
    digest = None
    if params.get("weights"):
        digest = weights_digest(Path(params["weights"]))
    elif params.get("model"):
        family = family_of_name(params["model"])
        local = family.locate(params["model"]) if family is not None else None
        digest = weights_digest(local) if local is not None else None
    return {**params, "weights_sha256": digest}


def _int_or_none(value) -> int | None:
    return None if value in (None, "none") else int(value)
