"""Multi-label decisions: a threshold per label chosen on validation data, and the predicted sets.

A multi-label head gives every label its own probability. A label is predicted when its
probability reaches the label's threshold, chosen on the validation fold to maximise that
label's MCC (as DeepLoc 2.0 chose its per-location thresholds). Every protein gets at least
one label: where no probability reaches its threshold, the most probable label is predicted.
"""

from __future__ import annotations

import numpy as np

# The threshold of a label the validation fold cannot inform (all 0 or all 1 there, or
# probabilities that do not separate its proteins).
DEFAULT_THRESHOLD = 0.5


def _mcc_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate thresholds (the distinct probabilities) and the MCC of predicting ``p >= t`` for each."""
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order].astype(np.float64)
    # Predicting the first i+1 proteins positive: tp and fp at each distinct probability's last position.
    last = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    pos, n = y.sum(), len(y)
    fn, tn = pos - tp, (n - pos) - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(denom > 0, (tp * tn - fp * fn) / denom, 0.0)
    return p[last], mcc


def choose_thresholds(proba: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per label, the threshold on these (validation) probabilities that maximises MCC.

    The threshold is placed halfway between the last probability predicted positive and the
    next one below it, so that it does not sit exactly on a validation protein's value. Ties
    in MCC go to the threshold nearest 0.5. Where no threshold reaches a positive MCC (the
    probabilities do not separate the label's proteins: a label training never saw gets the
    same probability for every protein), the label keeps 0.5: the only threshold with MCC 0
    among the candidates would predict it for every protein.
    """
    proba, Y = np.asarray(proba, dtype=np.float64), np.asarray(Y)
    if proba.shape != Y.shape or proba.ndim != 2:
        raise ValueError(f"probabilities {proba.shape} and labels {Y.shape} must be the same (proteins, labels) shape")
    out = np.full(proba.shape[1], DEFAULT_THRESHOLD)
    for j in range(proba.shape[1]):
        y = Y[:, j] > 0
        if y.all() or not y.any():
            continue
        values, mcc = _mcc_curve(proba[:, j], y)
        if not mcc.max() > 0:
            continue
        below = np.r_[values[1:], values[-1] / 2]  # the next lower probability (the last: halfway to 0)
        cuts = (values + below) / 2
        best = np.flatnonzero(mcc >= mcc.max() - 1e-12)
        out[j] = cuts[best[np.argmin(np.abs(cuts[best] - DEFAULT_THRESHOLD))]]
    return out


def label_sets(proba: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """(n, L) bool: labels whose probability reaches their threshold; at least the most probable one."""
    proba = np.asarray(proba, dtype=np.float64)
    sets = proba >= np.asarray(thresholds, dtype=np.float64)
    empty = ~sets.any(1)
    if empty.any():
        sets[np.flatnonzero(empty), proba[empty].argmax(1)] = True
    return sets


def set_names(row: np.ndarray, classes: list[str]) -> str:
    """A set as text: its label names joined by ";"."""
    return ";".join(c for c, on in zip(classes, row) if on)
