"""The one evaluation loop: every head, every split, the same proteins and the same outputs.

For each split a fresh copy of the head is fitted on the training folds with the
validation fold as ``eval_set`` and predicts the test fold. Test probabilities of all the
models that share a test fold are averaged (one model per fold in the simple scheme, K-1 in
the nested one), so every protein gets exactly one prediction. Multi-label heads also get
their per-label thresholds from the validation fold; a protein's thresholds are the mean of
those of the models whose probabilities were averaged for it, as in ``heads predict``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone

from embedcache.atomic import atomic_path
from embedcache.models import sha256_of

from .base import Head
from .datasets import LabeledSet
from .features import FeatureSource
from .folds import Split
from .multilabel import label_sets
from .progress import eta, progress_bar
from .rundir import SavedModel

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    name: str
    proba: np.ndarray  # (n, n_classes), rows in the dataset's order; NaN where not predicted
    folds: np.ndarray  # test fold of each row
    splits: list[dict] = field(default_factory=list)  # per split: folds, sizes, seconds, what validation chose
    models: list[tuple[Split, Head]] = field(default_factory=list)
    saved: list[SavedModel] = field(default_factory=list)  # model files written, for the run's manifest
    # Multi-label: (n, L) per protein, the mean threshold of the models averaged for it (NaN where not predicted).
    thresholds: np.ndarray | None = None
    # Per split, its model's probabilities on split.val (rows in that order): what stacking and
    # an ensemble's thresholds are fitted on.
    validation: list[tuple[Split, np.ndarray]] = field(default_factory=list)
    # Per split, its model's probabilities on split.test (rows in that order), before the models
    # sharing a test fold are averaged: what a stacker is applied to.
    split_test: list[tuple[Split, np.ndarray]] = field(default_factory=list)

    def predicted(self) -> np.ndarray:
        return ~np.isnan(self.proba).any(1)

    def sets(self) -> np.ndarray:
        """(n, L) bool: each protein's predicted labels (multi-label); all False where not predicted."""
        if self.thresholds is None:
            raise ValueError(f"{self.name}: not a multi-label result")
        done = self.predicted()
        out = np.zeros(self.proba.shape, dtype=bool)
        out[done] = label_sets(self.proba[done], self.thresholds[done])
        return out

    def frame(self, data: LabeledSet) -> pd.DataFrame:
        out = data.frame()
        out.insert(0, "method", self.name)
        out["test_fold"] = self.folds
        if self.thresholds is not None:
            sets = self.sets()
            out["prediction"] = [";".join(c for c, on in zip(data.classes, row) if on) for row in sets]
        else:
            proba = np.nan_to_num(self.proba, nan=0.0)
            out["prediction"] = [data.classes[k] for k in proba.argmax(1)]
        columns = {f"p_{c}": self.proba[:, k] for k, c in enumerate(data.classes)}
        if self.thresholds is not None:
            columns.update({f"threshold_{c}": self.thresholds[:, k] for k, c in enumerate(data.classes)})
        # Joined at once: a column added at a time fragments the frame (pandas warns past 100 columns).
        out = pd.concat([out, pd.DataFrame(columns, index=out.index)], axis=1)
        return out[self.predicted()]


def scored_rows(results: list[MethodResult], n: int) -> np.ndarray:
    """(n,) bool: the proteins some method predicted. Baselines are scored on these, as the methods
    are: with a held-out test file they are its proteins, not the training ones."""
    out = np.zeros(n, dtype=bool)
    for result in results:
        out |= result.predicted()
    return out


def full_proba(head: Head, X, n_classes: int) -> np.ndarray:
    """Probabilities over all classes, also when a class was missing from training
    (multi-label heads give every label a column: classes_ is 0..L-1)."""
    proba = head.predict_proba(X)
    out = np.zeros((proba.shape[0], n_classes), dtype=np.float64)
    out[:, np.asarray(head.classes_, dtype=np.int64)] = proba
    return out


def cross_validate(head: Head, data: LabeledSet, features: FeatureSource, splits: list[Split], name: str,
                   keep_models: bool = True, model_dir: Path | None = None,
                   work_dir: Path | None = None) -> MethodResult:
    """Fit a fresh copy of ``head`` per split and predict its test fold.

    With ``model_dir`` each model is saved as soon as it is fitted. Heads with a
    ``checkpoint_dir`` parameter (fine-tuning) get ``work_dir/name/split`` for their per-epoch
    checkpoints and logs, so a run that is started again resumes where it stopped.
    """
    X = features.for_input(head.input)
    y = data.labels
    total = np.zeros((len(data), data.n_classes))
    count = np.zeros(len(data))
    result = MethodResult(name, np.full((len(data), data.n_classes), np.nan), np.full(len(data), -1))
    thresholds = np.zeros((len(data), data.n_classes)) if data.multilabel else None
    if model_dir is not None:
        model_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for number, split in enumerate(progress_bar(splits, desc=name, unit="split", leave=False), 1):
        start = time.perf_counter()
        model = clone(head)
        if work_dir is not None and "checkpoint_dir" in model.get_params():
            model.set_params(checkpoint_dir=str(work_dir / name / split.name))
        model.fit(X[split.train], y[split.train], eval_set=(X[split.val], y[split.val]))
        val_proba = full_proba(model, X[split.val], data.n_classes)
        if thresholds is not None:
            model.fit_thresholds(X[split.val], y[split.val], proba=val_proba)
            thresholds[split.test] += model.thresholds_
        result.validation.append((split, val_proba))
        test_proba = full_proba(model, X[split.test], data.n_classes)
        result.split_test.append((split, test_proba))
        total[split.test] += test_proba
        count[split.test] += 1
        result.folds[split.test] = split.test_fold
        seconds = time.perf_counter() - start
        info = {"split": split.name, "test_fold": split.test_fold, "val_fold": split.val_fold,
                "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
                "seconds": round(seconds, 3), **model.selection_summary()}
        if hasattr(model, "history_"):
            info["history"] = model.history_
        result.splits.append(info)
        if model_dir is not None:
            result.saved.append(save_model(model, model_dir / f"{split.name}{model.file_suffix}", name, split.name))
        if keep_models:
            result.models.append((split, model))
        log.info("%s: split %d/%d (%s) in %.1f s; %s", name, number, len(splits), split.name, seconds,
                 eta(number, len(splits), time.perf_counter() - began))
    done = count > 0
    result.proba[done] = total[done] / count[done, None]
    if thresholds is not None:
        result.thresholds = np.full(thresholds.shape, np.nan)
        result.thresholds[done] = thresholds[done] / count[done, None]
    return result


def save_model(model: Head, path: Path, method: str, split: str) -> SavedModel:
    """Write a fitted head whole or not at all, and record what was written."""
    with atomic_path(path) as tmp:
        model.save(tmp)
    return SavedModel(method, split, path, sha256_of(path), [int(c) for c in model.classes_], model.input)


def read_reference(directory: Path | str, data: LabeledSet, name: str = "reference") -> MethodResult:
    """Per-protein probabilities from another tool, as DeepLocPro publishes its held-out CV output.

    ``directory`` holds ``model_{test}_{val}.csv`` files: an unnamed ID column, then one column
    per class. Models that share a test fold are averaged, as the nested scheme prescribes.
    Proteins of ``data`` missing from the files are an error; extra rows are ignored.
    """
    directory = Path(directory)
    files = sorted(directory.glob("model_*_*.csv"))
    if not files:
        raise FileNotFoundError(f"{directory}: no model_{{test}}_{{val}}.csv files")
    by_fold: dict[int, list[pd.DataFrame]] = defaultdict(list)
    for path in files:
        named = re.fullmatch(r"model_(\d+)_(\d+)\.csv", path.name)
        if named is None:
            raise ValueError(f"{path}: not named model_{{test}}_{{val}}.csv with fold numbers")
        test = int(named.group(1))
        frame = pd.read_csv(path, index_col=0)
        unknown = set(frame.columns) - set(data.classes)
        if unknown:
            raise ValueError(f"{path}: columns {sorted(unknown)} are not classes of {data.name} ({data.classes})")
        by_fold[test].append(frame)
    position = {ident: i for i, ident in enumerate(data.ids)}
    result = MethodResult(name, np.full((len(data), data.n_classes), np.nan), np.full(len(data), -1))
    for test, frames in sorted(by_fold.items()):
        mean = sum(f[data.classes] for f in frames) / len(frames)
        mine = mean.index.intersection(data.ids)
        rows = [position[i] for i in mine]
        result.proba[rows] = mean.loc[mine].to_numpy()
        result.folds[rows] = test
        result.splits.append({"test_fold": test, "models": len(frames), "n_test": len(rows)})
    missing = [data.ids[i] for i in np.flatnonzero(result.folds < 0)]
    if missing:
        raise ValueError(f"{directory}: no predictions for {len(missing)} proteins (first: {', '.join(missing[:5])})")
    if data.folds is not None:
        disagree = int((data.folds != result.folds).sum())
        if disagree:
            log.warning("%s: %d proteins sit in another test fold than the dataset says", directory, disagree)
    return result
