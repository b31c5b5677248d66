"""Runs: dataset + cache + heads + folds -> a run directory. Typed functions the CLI wraps."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from embedcache.models import ESM2_MODELS
from embedcache.unirep import UNIREP_SIZES
from embedcache.sequences import sequence_key
from embedcache.store import EmbeddingCache

from .datasets import LabeledSet, load_labeled, merge
from .registry import Head, make_head
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
    cache: str | None = None  # embedcache file holding every protein of `data` (frozen heads need it)
    heads: tuple[str, ...] = ("logreg",)  # logreg | lightgbm | attention | finetune
    scheme: str = "simple"  # simple: K models | nested: K(K-1) models, test probabilities averaged
    model: str | None = None  # finetune's ESM-2 by name; with `weights` None: the cache's own backbone
    weights: str | None = None  # finetune's ESM-2 as a local fair-esm .pt file
    lrs: tuple[float, ...] = ()  # learning-rate sweep: one finetune method per value, on the same splits
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


def build_heads(config: RunConfig, cache_provenance: dict | None = None) -> dict[str, Head]:
    """Method name -> head. With ``lrs`` the finetune head becomes one method per learning rate."""
    heads = {}
    for name in config.heads:
        params = {"random_state": config.seed, **config.head_params.get(name, {})}
        if name == "finetune":
            params.update(_backbone_params(config, cache_provenance, params))
            for lr in config.lrs or (None,):
                method = name if lr is None else f"{name}_lr{lr:g}"
                heads[method] = make_head(name, params if lr is None else {**params, "lr": lr})
        else:
            heads[name] = make_head(name, params)
    return heads


def _backbone_params(config: RunConfig, provenance: dict | None, params: dict) -> dict:
    """finetune's backbone: --model/--weights, else the weights that built the cache."""
    if config.model or config.weights:
        return {"model": config.model, "weights": config.weights}
    if params.get("model") or params.get("weights"):
        return {}
    if provenance:
        weights = provenance.get("weights")
        if weights and Path(weights).is_file():
            return {"weights": weights}
        if provenance.get("model") in ESM2_MODELS or provenance.get("model") in UNIREP_SIZES:
            return {"model": provenance["model"]}
    raise ValueError("finetune needs a backbone: --model NAME or --weights PATH (the cache's own weights "
                     "were not found)")


def run_comparison(config: RunConfig, out: Path | str, title: str | None = None) -> dict:
    """Cross-validate every head on the same splits, add the reference, write the run."""
    out = Path(out)
    data, fold_info = load_data(config)
    splits = scheme(config.scheme).split(data.folds, fold_info.get("test_fold"))
    results: list[MethodResult] = []
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(EmbeddingCache(config.cache)) if config.cache else None
        cache_info = cache.info() if cache else {"provenance": {}, "layers": [None]}
        heads = build_heads(config, cache_info["provenance"])  # fail on a bad head name before any training
        frozen = [n for n, h in heads.items() if h.input != "sequence"]
        if frozen and cache is None:
            raise ValueError(f"heads {', '.join(frozen)} read embeddings: give --cache")
        features = FeatureSource(cache, data.sequences, config.layer, ids=data.ids)
        for name, head in heads.items():
            # Sequence heads hold a whole backbone: saved as they finish, not kept in memory.
            result = cross_validate(head, data, features, splits, name, keep_models=head.input != "sequence",
                                    model_dir=out / "models" / name, work_dir=out / "work")
            results.append(result)
    if config.reference:
        results.append(read_reference(config.reference, data))
    prov = cache_info["provenance"]
    notes = [
        f"{len(data)} proteins, {data.n_classes} classes; folds: {fold_info}; scheme {config.scheme} "
        f"({len(splits)} models per head)",
        "95% intervals: percentile bootstrap over proteins",
    ]
    if cache is not None:
        notes.insert(1, f"embeddings: {prov.get('model')} ({prov.get('architecture')}), layer "
                        f"{cache_info['layers'][-1] if config.layer is None else config.layer}, "
                        f"weights sha256 {str(prov.get('weights_sha256'))[:12]}")
    for name, head in heads.items():
        if head.input == "sequence":
            p = head.get_params()
            notes.append(f"{name}: fine-tuned {p['weights'] or p['model']} (mode {p['mode']}, lr {p['lr']:g}, "
                         f"pooling {p['pooling']}); per-epoch logs and curves in work/{name}/")
    run_config = {
        **asdict(config),
        "methods": {name: head.get_params() for name, head in heads.items()},
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
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource.from_rows(cache, cache.rows(cache.ids), layer if layer is not None else config.get("layer"))
        total = np.zeros((len(cache.ids), len(classes)))
        for path in files:  # one at a time: a fine-tuned model holds a whole backbone
            model = Head.load(path)
            proba = model.predict_proba(features.for_input(model.input))
            total[:, np.asarray(model.classes_, dtype=np.int64)] += proba
            del model
        proba = total / len(files)
        frame = pd.DataFrame({"id": cache.ids, "prediction": [classes[k] for k in proba.argmax(1)]})
    for k, c in enumerate(classes):
        frame[f"p_{c}"] = proba[:, k]
    frame.attrs["head"] = head
    frame.attrs["models"] = len(files)
    return frame
