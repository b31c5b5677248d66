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

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedcache.sequences import sequence_key

from .progress import HEARTBEAT_SECONDS, TOOL_LOGGER, ToolOutput, duration, run_tool

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


_GRAPHPART_CHILD = """
import json, sys
from graph_part import stratified_k_fold
with open(sys.argv[1]) as handle:
    args = json.load(handle)
parts = stratified_k_fold(**args)
with open(sys.argv[2], "w") as handle:
    json.dump([[str(i) for i in part] for part in parts], handle)
"""

# What GraphPart and MMseqs2 print as they go, and the stage each line starts.
_STAGES = (
    ("createdb ", "MMseqs2: reading the sequences"),
    ("prefilter ", "MMseqs2: prefiltering"),
    ("align ", "MMseqs2: aligning every pair of sequences"),
    ("convertalis ", "MMseqs2: writing the alignments"),
    ("Initialization mode", "GraphPart: building the partitions"),
    ("clustering", "GraphPart: clustering"),
    ("Min-threshold", "GraphPart: moving or removing sequences above the threshold"),
    ("Currently have this many samples", "GraphPart: removing sequences it cannot place"),
    ("Need to remove", "GraphPart: removing sequences it cannot place"),
    ("Graph-Part executed", "GraphPart: done"),
)


def _graphpart_stage(line: str) -> str | None:
    text = line.strip()
    if text.startswith("Calculation of alignments"):
        return "MMseqs2: aligning every pair of sequences"
    for start, stage in _STAGES:
        if text.startswith(start):
            return stage
    # Alignment scores read into the graph: GraphPart's tqdm counter over the alignment table.
    if re.fullmatch(r"\d+it \[.*", text):
        return "GraphPart: reading the alignments"
    return None


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
    binary = {"mmseqs2": "mmseqs", "needle": "needleall"}.get(aligner)
    if binary is None:
        raise ValueError(f"aligner must be mmseqs2 or needle, not {aligner!r}")
    if shutil.which(binary) is None:
        raise RuntimeError(
            f"GraphPart with {aligner} needs the '{binary}' program; install it (Debian: apt-get install "
            f"{'mmseqs2' if aligner == 'mmseqs2' else 'emboss'})"
        )
    log.info("homology partitioning of %d sequences with GraphPart (%s, identity %.2f, %d folds): aligns every "
             "pair, minutes for thousands of sequences; a progress line every %.0f s", len(ids), aligner, threshold,
             k, HEARTBEAT_SECONDS)
    # GraphPart prints (and so do the MMseqs2 runs it starts) into the process's stdout, which
    # belongs to the results: it runs in a child Python whose output is logged line by line.
    # Its temporary files go to the working directory, so the child works in a directory of its
    # own, and it calls a helper script (mmseqs_fake_prefilter.sh) installed beside this Python,
    # which is not on PATH when a virtual environment's python is run without activating it.
    path = os.environ.get("PATH", "")
    scripts = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([scripts, path]) if path else scripts,
           "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "10"}
    args = {
        "sequences": dict(zip(ids, sequences)),
        "labels": {i: str(l) for i, l in zip(ids, labels)},
        "partitions": k,
        "threshold": threshold,
        "alignment_mode": aligner,
        "threads": threads,
        # Identity over the shorter sequence for MMseqs2 (the stricter choice; GraphPart's
        # default 'full' exists only for needle).
        "denominator": "shortest" if aligner == "mmseqs2" else "full",
    }
    output = ToolOutput(logging.getLogger(TOOL_LOGGER + ".graphpart"), _graphpart_stage)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="graphpart_") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "partitions.json"
        request.write_text(json.dumps(args))  # a scratch file of this call, deleted with its folder
        run_tool([sys.executable, "-c", _GRAPHPART_CHILD, str(request), str(answer)], "GraphPart", output,
                 cwd=tmp, env=env)
        try:
            parts = json.loads(answer.read_text())
        except (OSError, ValueError) as err:
            last = "\n".join(output.tail[-8:])
            raise RuntimeError(f"GraphPart gave no partitions ({err}); its last output:\n{last}") from None
    fold_of = {ident: fold for fold, members in enumerate(parts) for ident in members}
    folds = np.array([fold_of.get(i, -1) for i in ids], dtype=np.int64)
    removed = int((folds < 0).sum())
    log.info("GraphPart (%s, identity %.2f): %d folds, %d of %d sequences removed, in %s",
             aligner, threshold, k, removed, len(ids), duration(time.monotonic() - start))
    return HomologyPartition(folds, threshold, aligner, removed)
