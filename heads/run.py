"""Runs: dataset + cache + heads + folds -> a run directory. Typed functions the CLI wraps."""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embedcache.store import EmbeddingCache

from embedcache.sequences import sequence_key

from .datasets import LabeledSet, load_labeled, merge
from .estimators import Head, make_head
from .evaluate import MethodResult, cross_validate, read_reference
from .features import FeatureSource
from .folds import homology_folds, scheme, stratified_folds
from .report import write_run

log = logging.getLogger(__name__)

FOLD_SOURCES = ("auto", "file", "stratified", "homology")


@dataclass
class RunConfig:
    """Everything a comparison depends on; saved as the run's config.json."""

    data: str | tuple[str, ...]  # labelled file(s): DeepLocPro FASTA, DeepLoc 1.0 FASTA, or CSV; several are merged
    cache: str  # embedcache file holding every protein of `data`
    heads: tuple[str, ...] = ("logreg",)  # logreg | lightgbm | attention
    scheme: str = "simple"  # simple: K models | nested: K(K-1) models, test probabilities averaged
    folds: str = "auto"  # auto (the file's, else stratified) | file | stratified | homology (GraphPart)
    k: int = 5  # folds to build when the file has none
    seed: int = 0  # for built folds and for every head's random_state
    threshold: float = 0.3  # sequence identity allowed across homology folds
    aligner: str = "mmseqs2"  # GraphPart's aligner: mmseqs2 | needle
    layer: int | None = None  # cache layer to use; None: the highest stored
    reference: str | None = None  # folder of model_{test}_{val}.csv probabilities from another tool
    test_data: str | None = None  # a labelled file held out as the only test set (train and validate on `data`)
    head_params: dict = field(default_factory=dict)  # {"attention": {"max_epochs": 30}, ...}
    kind: str | None = None  # dataset reader; None: recognised from the file
    id_col: str | None = None  # CSV columns (recognised when None)
    seq_col: str | None = None
    label_col: str = "label"
    class_names: dict | None = None  # CSV label value -> class name, e.g. {"0": "Cytoplasm"}
    n_boot: int = 1000  # bootstrap resamples for intervals and paired tests


def load_data(config: RunConfig) -> tuple[LabeledSet, dict]:
    """The labelled set with the folds the config asks for, and a description of the folds.

    With ``test_data``, its proteins form one more fold, the only one used for testing;
    training proteins whose sequence also occurs in it are dropped first.
    """
    data = _read(config, config.data)
    source = config.folds
    if source not in FOLD_SOURCES:
        raise ValueError(f"folds must be one of {FOLD_SOURCES}, not {source!r}")
    if source == "auto":
        source = "file" if data.folds is not None else "stratified"
    info = {"source": source}
    if source == "file":
        if data.folds is None:
            raise ValueError(f"{config.data} gives no folds; use --folds stratified or --folds homology")
        folds = data.folds
    elif source == "stratified":
        folds = stratified_folds(data.labels, data.sequences, config.k, config.seed)
        info.update(k=config.k, seed=config.seed)
    else:
        part = homology_folds(data.ids, data.sequences, data.labels, config.k, config.threshold, config.aligner)
        folds = part.folds
        info.update(k=config.k, threshold=config.threshold, aligner=config.aligner, removed=part.removed)
    data = data.with_folds(folds)
    if config.test_data:
        test = _read(config, config.test_data)
        held_out = {sequence_key(s) for s in test.sequences}
        keep = np.array([sequence_key(s) not in held_out for s in data.sequences])
        test.folds = np.full(len(test), int(data.folds.max()) + 1)
        info.update(test_data=str(config.test_data), test_fold=int(test.folds[0]), n_test=len(test),
                    training_sequences_also_in_test_removed=int((~keep).sum()))
        data = merge([data.subset(np.flatnonzero(keep)), test], f"{data.name}->{test.name}")
    info["sizes"] = {int(f): int((data.folds == f).sum()) for f in np.unique(data.folds)}
    info["n"] = len(data)
    return data, info


def _read(config: RunConfig, paths: str | tuple[str, ...]) -> LabeledSet:
    paths = [paths] if isinstance(paths, str) else list(paths)
    sets = [load_labeled(p, config.kind, id_col=config.id_col, seq_col=config.seq_col,
                         label_col=config.label_col, class_names=config.class_names) for p in paths]
    return sets[0] if len(sets) == 1 else merge(sets, "+".join(s.name for s in sets))


def build_heads(config: RunConfig) -> dict[str, Head]:
    heads = {}
    for name in config.heads:
        params = {"random_state": config.seed, **config.head_params.get(name, {})}
        heads[name] = make_head(name, params)
    return heads


def run_comparison(config: RunConfig, out: Path | str, title: str | None = None) -> dict:
    """Cross-validate every head on the same splits, add the reference, write the run."""
    out = Path(out)
    data, fold_info = load_data(config)
    splits = scheme(config.scheme).split(data.folds, fold_info.get("test_fold"))
    heads = build_heads(config)  # fail on a bad head name before any training
    results: list[MethodResult] = []
    with EmbeddingCache(config.cache) as cache:
        features = FeatureSource(cache, data.sequences, config.layer, ids=data.ids)
        cache_info = cache.info()
        for name, head in heads.items():
            result = cross_validate(head, data, features, splits, name)
            _save_models(out / "models" / name, result)
            results.append(result)
    if config.reference:
        results.append(read_reference(config.reference, data))
    prov = cache_info["provenance"]
    notes = [
        f"{len(data)} proteins, {data.n_classes} classes; folds: {fold_info}; scheme {config.scheme} "
        f"({len(splits)} models per head)",
        f"embeddings: {prov.get('model')} ({prov.get('architecture')}), layer {cache_info['layers'][-1] if config.layer is None else config.layer}, "
        f"weights sha256 {str(prov.get('weights_sha256'))[:12]}",
        "95% intervals: percentile bootstrap over proteins",
    ]
    run_config = {
        **asdict(config),
        "folds_info": fold_info,
        "splits": [s.name for s in splits],
        "cache_provenance": prov,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if "test_fold" in fold_info:
        notes.insert(1, f"trained and validated on {config.data}, tested only on {config.test_data} "
                        f"({fold_info['n_test']} proteins; {fold_info['training_sequences_also_in_test_removed']} "
                        "training sequences also in the test file were dropped)")
    summary = write_run(out, run_config, data, results, title or f"{data.name}: {', '.join(heads)}", notes,
                        n_boot=config.n_boot)
    log.info("run written to %s", out)
    return summary


def _save_models(folder: Path, result: MethodResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, model in result.models:
        model.save(folder / f"{split.name}{'.pt' if model.input == 'per_residue' else '.joblib'}")


def predict(run: Path | str, cache_path: Path | str, head: str | None = None, layer: int | None = None) -> pd.DataFrame:
    """Ensemble of a run's fold models on every protein of another cache."""
    run = Path(run)
    config = json.loads((run / "config.json").read_text())
    classes = config["classes"]
    if head is None:
        metrics = json.loads((run / "metrics.json").read_text())["methods"]
        trained = [n for n in metrics if (run / "models" / n).is_dir()]
        head = max(trained, key=lambda n: metrics[n]["macro_f1"])
    files = sorted((run / "models" / head).glob("*.*"))
    if not files:
        raise FileNotFoundError(f"{run}: no saved models for head {head!r}")
    models = [Head.load(f) for f in files]
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource.from_rows(cache, cache.rows(cache.ids), layer if layer is not None else config.get("layer"))
        X = features.for_input(models[0].input)
        total = np.zeros((len(cache.ids), len(classes)))
        for model in models:
            proba = model.predict_proba(X)
            total[:, np.asarray(model.classes_, dtype=np.int64)] += proba
        proba = total / len(models)
        frame = pd.DataFrame({"id": cache.ids, "prediction": [classes[k] for k in proba.argmax(1)]})
    for k, c in enumerate(classes):
        frame[f"p_{c}"] = proba[:, k]
    frame.attrs["head"] = head
    frame.attrs["models"] = len(models)
    return frame
