"""Folds and cross-validation schemes.

Folds come from the dataset file when it has them (DeepLocPro's GraphPart partitions), or
are built here: stratified random (identical sequences kept in one fold), or homology
partitioned with GraphPart so that no two folds share sequences above an identity
threshold. Schemes turn folds into (train, validation, test) splits:

``simple``  test fold k, validation fold k+1 (mod K), the rest train: K models.
``nested``  DeepLocPro's: for each test fold every other fold is the validation fold once,
            K-1 models whose test probabilities are averaged: K(K-1) models.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.sequences import sequence_key

log = logging.getLogger(__name__)

SCHEMES = ("simple", "nested")


@dataclass(frozen=True)
class Split:
    test_fold: int
    val_fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def name(self) -> str:
        return f"test{self.test_fold}_val{self.val_fold}"


class _Scheme:
    name = ""

    def pairs(self, fold_ids: list[int]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def split(self, folds: np.ndarray, test_fold: int | None = None) -> list[Split]:
        """Every fold as the test fold in turn; or only ``test_fold`` (a held-out test set).

        With a fixed test fold, ``simple`` trains one model (validation on the first other
        fold) and ``nested`` one per other fold as validation, their probabilities averaged.
        """
        folds = np.asarray(folds)
        fold_ids = sorted(int(f) for f in np.unique(folds) if f >= 0)
        if len(fold_ids) < 3:
            raise ValueError(f"{self.name} cross-validation needs at least 3 folds, found {len(fold_ids)}")
        pairs = self.pairs(fold_ids)
        if test_fold is not None:
            others = [f for f in fold_ids if f != test_fold]
            pairs = [(test_fold, others[0])] if self.name == "simple" else [(test_fold, v) for v in others]
        out = []
        for test, val in pairs:
            out.append(Split(
                test, val,
                train=np.flatnonzero((folds >= 0) & (folds != test) & (folds != val)),
                val=np.flatnonzero(folds == val),
                test=np.flatnonzero(folds == test),
            ))
        return out


class SimpleCV(_Scheme):
    name = "simple"

    def pairs(self, fold_ids):
        return [(t, fold_ids[(i + 1) % len(fold_ids)]) for i, t in enumerate(fold_ids)]


class NestedCV(_Scheme):
    name = "nested"

    def pairs(self, fold_ids):
        return [(t, v) for t in fold_ids for v in fold_ids if v != t]


def scheme(name: str) -> _Scheme:
    schemes = {"simple": SimpleCV, "nested": NestedCV}
    if name not in schemes:
        raise ValueError(f"scheme must be one of {SCHEMES}, not {name!r}")
    return schemes[name]()


def stratified_folds(labels: np.ndarray, sequences: list[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """Random folds with class proportions kept; identical sequences always share a fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array([sequence_key(s) for s in sequences])
    folds = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = fold
    return folds


@dataclass
class HomologyPartition:
    folds: np.ndarray  # -1 for sequences GraphPart removed
    threshold: float
    aligner: str
    removed: int


def homology_folds(
    ids: list[str],
    sequences: list[str],
    labels: np.ndarray,
    k: int = 5,
    threshold: float = 0.3,
    aligner: str = "mmseqs2",
    threads: int = 2,
) -> HomologyPartition:
    """GraphPart partitions: no pair across folds above ``threshold`` identity.

    GraphPart removes sequences it cannot place without breaking the threshold, as
    DeepLocPro reported; they get fold -1 and are counted.
    """
    from graph_part import stratified_k_fold

    binary = {"mmseqs2": "mmseqs", "needle": "needleall"}.get(aligner)
    if binary is None:
        raise ValueError(f"aligner must be mmseqs2 or needle, not {aligner!r}")
    if shutil.which(binary) is None:
        raise RuntimeError(
            f"GraphPart with {aligner} needs the '{binary}' program; install it (Debian: apt-get install "
            f"{'mmseqs2' if aligner == 'mmseqs2' else 'emboss'})"
        )
    # GraphPart writes its temporary files into the working directory, and calls a helper script
    # (mmseqs_fake_prefilter.sh) installed beside this Python, which is not on PATH when a virtual
    # environment's python is run without activating it.
    here, path = os.getcwd(), os.environ.get("PATH", "")
    scripts = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory(prefix="graphpart_") as tmp:
        os.chdir(tmp)
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts
        try:
            parts = stratified_k_fold(
                sequences=dict(zip(ids, sequences)),
                labels={i: str(l) for i, l in zip(ids, labels)},
                partitions=k,
                threshold=threshold,
                alignment_mode=aligner,
                threads=threads,
                # Identity over the shorter sequence for MMseqs2 (the stricter choice; GraphPart's
                # default 'full' exists only for needle).
                denominator="shortest" if aligner == "mmseqs2" else "full",
            )
        finally:
            os.chdir(here)
            os.environ["PATH"] = path
    fold_of = {ident: fold for fold, members in enumerate(parts) for ident in members}
    folds = np.array([fold_of.get(i, -1) for i in ids], dtype=np.int64)
    removed = int((folds < 0).sum())
    log.info("GraphPart (%s, identity %.2f): %d folds, %d of %d sequences removed",
             aligner, threshold, k, removed, len(ids))
    return HomologyPartition(folds, threshold, aligner, removed)
