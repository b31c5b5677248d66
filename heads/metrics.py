"""Metrics for per-protein predictions: point values, bootstrap intervals, paired tests.

Point values are scikit-learn's. Intervals resample proteins with replacement (percentile
bootstrap, 95%). Two methods on the same proteins are compared with McNemar's exact test
on the proteins exactly one of them gets right, and with a paired bootstrap of the
difference in macro-F1.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
)

SELECTION_METRICS = ("accuracy", "macro_f1", "mcc")


def score(y: np.ndarray, pred: np.ndarray, metric: str, n_classes: int | None = None) -> float:
    """One number, for model selection and early stopping.

    Multi-label ((n, L) 0/1 ``y`` and ``pred``): accuracy is exact-set accuracy, macro_f1 the
    mean of the labels' F1, mcc the mean of the labels' MCC.
    """
    if np.ndim(y) == 2:
        y, pred = np.asarray(y), np.asarray(pred)
        if metric == "accuracy":
            return float((y == pred).all(1).mean())
        if metric == "macro_f1":
            return float(f1_score(y, pred, average="macro", zero_division=0))
        if metric == "mcc":
            return float(np.mean([matthews_corrcoef(y[:, j], pred[:, j]) for j in range(y.shape[1])]))
        raise ValueError(f"metric must be one of {SELECTION_METRICS}, not {metric!r}")
    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    if metric == "macro_f1":
        labels = np.arange(n_classes) if n_classes else None
        return float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    if metric == "mcc":
        return float(matthews_corrcoef(y, pred))
    raise ValueError(f"metric must be one of {SELECTION_METRICS}, not {metric!r}")


def _one_vs_rest_mcc(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(matthews_corrcoef(y == k, pred == k))


def classification_metrics(
    y: np.ndarray, proba: np.ndarray, classes: list[str], groups: np.ndarray | None = None
) -> dict:
    """Everything DeepLocPro's tables report, for one method on one set of proteins."""
    y = np.asarray(y)
    pred = proba.argmax(1)
    labels = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=labels, zero_division=0)),
        "mcc": float(matthews_corrcoef(y, pred)),
        "per_class": {
            c: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "mcc": _one_vs_rest_mcc(y, pred, k),
                "support": int(support[k]),
            }
            for k, c in enumerate(classes)
        },
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }
    if len(classes) == 2 and len(np.unique(y)) == 2:
        out["roc_auc"] = float(roc_auc_score(y, proba[:, 1]))
        out["pr_auc"] = float(average_precision_score(y, proba[:, 1]))
    if groups is not None:
        out["per_group"] = {}
        for group in sorted(set(groups)):
            mask = groups == group
            # Macro-F1 over the classes the group has: a class no protein of the group belongs to
            # would add an F1 of 0 for every method (archaea have no outer membrane).
            present = np.unique(y[mask])
            out["per_group"][str(group)] = {
                "n": int(mask.sum()),
                "classes": [classes[k] for k in present],
                "accuracy": float(accuracy_score(y[mask], pred[mask])),
                "macro_f1": float(f1_score(y[mask], pred[mask], average="macro", labels=present, zero_division=0)),
                # From the full confusion matrix: a group of one class is MCC 0, without sklearn's warning.
                "mcc": float(metrics_from_confusion(confusion_matrix(y[mask], pred[mask], labels=labels))["mcc"]),
            }
    return out


def per_class_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """(..., K) F1 of each class of (..., K, K) confusion matrices; 0 where a class is neither true nor predicted."""
    c = confusion.astype(np.float64)
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    both = c.sum(-1) + c.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(both > 0, 2 * tp / both, 0.0)


def metrics_from_confusion(confusion: np.ndarray, classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and MCC of (..., K, K) confusion matrices.

    Macro-F1 averages over ``classes`` (indices; all K by default), an F1 of 0 where undefined.
    """
    c = confusion.astype(np.float64)
    n = c.sum((-2, -1))
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    true, pred = c.sum(-1), c.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(true + pred > 0, 2 * tp / (true + pred), 0.0)
        cov = tp.sum(-1) * n - (true * pred).sum(-1)
        denom = np.sqrt((n**2 - (pred**2).sum(-1)) * (n**2 - (true**2).sum(-1)))
        mcc = np.where(denom > 0, cov / denom, 0.0)
    return {"accuracy": tp.sum(-1) / n, "macro_f1": (f1 if classes is None else f1[..., classes]).mean(-1), "mcc": mcc}


def _resampled_confusions(y: np.ndarray, pred: np.ndarray, n_classes: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, K, K) confusion matrices of proteins drawn with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), (n_boot, len(y)))
    codes = (y[idx] * n_classes + pred[idx]) + np.arange(n_boot)[:, None] * n_classes**2
    return np.bincount(codes.ravel(), minlength=n_boot * n_classes**2).reshape(n_boot, n_classes, n_classes)


def bootstrap_ci(
    y: np.ndarray, pred: np.ndarray, n_classes: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
    classes: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of accuracy, macro-F1 (over ``classes``) and MCC of resampled proteins."""
    confusions = _resampled_confusions(np.asarray(y), np.asarray(pred), n_classes, n_boot, seed)
    values = metrics_from_confusion(confusions, classes)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {m: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for m, v in values.items()}


def bootstrap_per_class_f1(
    y: np.ndarray, pred: np.ndarray, n_classes: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """(K, 2) percentile intervals of each class's F1, over the same resamples as ``bootstrap_ci`` draws."""
    f1 = per_class_f1_from_confusion(_resampled_confusions(np.asarray(y), np.asarray(pred), n_classes, n_boot, seed))
    return np.percentile(f1, [(1 - level) / 2 * 100, (1 + level) / 2 * 100], axis=0).T


def mcnemar(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact McNemar test: among proteins exactly one method gets right, is the split 50/50?"""
    from scipy.stats import binomtest

    right_a, right_b = pred_a == y, pred_b == y
    only_a = int((right_a & ~right_b).sum())
    only_b = int((~right_a & right_b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": p}


def paired_bootstrap(
    y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int, metric: str = "macro_f1",
    n_boot: int = 1000, seed: int = 0,
) -> dict:
    """Difference a - b of a metric over the same resampled proteins: interval and two-sided p."""
    y = np.asarray(y)
    # The same seed draws the same proteins for both methods: that is what makes it paired.
    a = metrics_from_confusion(_resampled_confusions(y, np.asarray(pred_a), n_classes, n_boot, seed))[metric]
    b = metrics_from_confusion(_resampled_confusions(y, np.asarray(pred_b), n_classes, n_boot, seed))[metric]
    diffs = a - b
    observed = score(y, pred_a, metric, n_classes) - score(y, pred_b, metric, n_classes)
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return {
        "metric": metric,
        "difference": float(observed),
        "ci95": (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))),
        "p_value": p,
    }
