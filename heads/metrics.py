"""Metrics for per-protein predictions: point values, bootstrap intervals, paired tests.

Point values are scikit-learn's. Intervals resample proteins with replacement (percentile
bootstrap, 95%). Two methods on the same proteins are compared with McNemar's exact test
on the proteins exactly one of them gets right, and with a paired bootstrap of the
difference in macro-F1.

Macro-averages are over the classes that occur among the scored proteins' true labels. A
class no scored protein has adds no F1 of 0 to every method; predicting it is still an error
(single-label: it lowers the true class's recall and the accuracy; multi-label: it counts
against micro-F1, Jaccard, exact-set accuracy and Hamming loss). The class set is fixed from
the scored proteins for the point value, its bootstrap intervals (not re-derived per
resample) and the paired tests, and is recorded as ``macro_classes``. Multi-label sets are
scored by :func:`multilabel_metrics` and compared by :func:`paired_multilabel`.
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


def score(y: np.ndarray, pred: np.ndarray, metric: str, n_classes: int | None = None,
          labels: np.ndarray | None = None) -> float:
    """One number, for model selection and early stopping.

    Single-label macro_f1 averages over ``labels`` (class indices) when given, else over all
    ``n_classes``.

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
        if labels is None:
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
    """Everything DeepLocPro's tables report, for one method on one set of proteins.

    Macro-F1 averages over the classes present in ``y`` (``macro_classes``); the per-class
    table lists every class (support 0: not among these proteins).
    """
    y = np.asarray(y)
    pred = proba.argmax(1)
    labels = np.arange(len(classes))
    present = macro_class_indices(y, len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=present, zero_division=0)),
        "macro_classes": [classes[k] for k in present],
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
        per_group: dict[str, dict] = {}
        out["per_group"] = per_group
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


def macro_class_indices(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Indices of the classes (labels) macro-averages include: those some protein of ``y`` has.

    ``y`` is class indices (n,) or a 0/1 matrix (n, L). With no protein at all, every class.
    """
    y = np.asarray(y)
    counts = y.sum(0) if y.ndim == 2 else np.bincount(y.astype(np.int64), minlength=n_classes)
    present = np.flatnonzero(counts > 0)
    return present if len(present) else np.arange(n_classes)


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
    n_boot: int = 1000, seed: int = 0, classes: np.ndarray | None = None,
) -> dict:
    """Difference a - b of a metric over the same resampled proteins: interval and two-sided p.

    Macro-F1 averages over ``classes`` (indices; default all), fixed for every resample.
    """
    y = np.asarray(y)
    # The same seed draws the same proteins for both methods: that is what makes it paired.
    a = metrics_from_confusion(_resampled_confusions(y, np.asarray(pred_a), n_classes, n_boot, seed), classes)[metric]
    b = metrics_from_confusion(_resampled_confusions(y, np.asarray(pred_b), n_classes, n_boot, seed), classes)[metric]
    diffs = a - b
    observed = (score(y, pred_a, metric, n_classes, labels=classes)
                - score(y, pred_b, metric, n_classes, labels=classes))
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return {
        "metric": metric,
        "difference": float(observed),
        "ci95": (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))),
        "p_value": p,
    }


# ---------------------------------------------------------------- multi-label

MULTILABEL_INTERVALS = ("macro_f1", "micro_f1", "jaccard", "exact_set_accuracy")


def per_protein_jaccard(Y: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """(n,) |predicted ∩ true| / |predicted ∪ true| of each protein; 1 where both sets are empty
    (scikit-learn's jaccard_score(average="samples", zero_division=1) averages these)."""
    Y, sets = np.asarray(Y) > 0, np.asarray(sets) > 0
    inter = (Y & sets).sum(1)
    union = (Y | sets).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _label_counts(Y: np.ndarray, sets: np.ndarray, weights: np.ndarray | None = None):
    """Per label TP, FP, FN (and TN) counts; with ``weights`` (B, n) per resample: (B, L) each.

    A resample is a vector of how often each protein was drawn, so its counts are a weighted
    sum over proteins: one matrix product instead of a loop over resamples.
    """
    Y, sets = np.asarray(Y) > 0, np.asarray(sets) > 0
    parts = [(Y & sets), (~Y & sets), (Y & ~sets), (~Y & ~sets)]
    if weights is None:
        return tuple(p.sum(0).astype(np.float64) for p in parts)
    return tuple(weights @ p.astype(np.float64) for p in parts)


def _f1_from_counts(tp, fp, fn):
    """F1 = 2TP / (2TP + FP + FN); 0 where a label is neither true nor predicted (zero_division=0)."""
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def _mcc_from_counts(tp, fp, fn, tn):
    """MCC of binary counts; 0 where undefined (a constant truth or prediction), as scikit-learn gives."""
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1), 0.0)


def _resample_weights(n: int, n_boot: int, seed: int, chunk: int = 200):
    """(chunk, n) draw counts of each protein per resample, in chunks, for the same draws
    ``_resampled_confusions`` makes (one ``integers(0, n, (n_boot, n))`` call of the seed)."""
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    for start in range(0, n_boot, chunk):
        block = idx[start:start + chunk]
        rows = len(block)
        codes = (block + np.arange(rows)[:, None] * n).ravel()
        yield np.bincount(codes, minlength=rows * n).reshape(rows, n).astype(np.float64)


def _multilabel_values(Y: np.ndarray, sets: np.ndarray, macro: np.ndarray, weights: np.ndarray | None = None,
                       jaccard: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Macro-F1 (over ``macro``), micro-F1, mean Jaccard, exact-set accuracy and per-label F1,
    of the proteins as given or of each resample's draw counts ``weights``."""
    tp, fp, fn, _ = _label_counts(Y, sets, weights)
    f1 = _f1_from_counts(tp, fp, fn)
    jac = per_protein_jaccard(Y, sets) if jaccard is None else jaccard
    exact = (np.asarray(Y) > 0) == (np.asarray(sets) > 0)
    exact = exact.all(1).astype(np.float64)
    n = len(jac)
    if weights is None:
        mean_jac, mean_exact = jac.mean() if n else np.nan, exact.mean() if n else np.nan
    else:
        mean_jac, mean_exact = weights @ jac / n, weights @ exact / n
    return {"macro_f1": f1[..., macro].mean(-1),
            "micro_f1": _f1_from_counts(tp.sum(-1), fp.sum(-1), fn.sum(-1)),
            "jaccard": mean_jac, "exact_set_accuracy": mean_exact, "f1": f1}


def multilabel_bootstrap(Y: np.ndarray, sets: np.ndarray, macro: np.ndarray, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> tuple[dict[str, tuple[float, float]], np.ndarray]:
    """Percentile intervals of macro-F1 (over the label indices ``macro``, fixed), micro-F1,
    Jaccard and exact-set accuracy of proteins resampled with replacement; and (L, 2) intervals
    of each label's F1 over the same resamples."""
    Y, sets = np.asarray(Y), np.asarray(sets)
    if len(Y) == 0:
        return {k: (float("nan"), float("nan")) for k in MULTILABEL_INTERVALS}, np.full((Y.shape[1], 2), np.nan)
    jac = per_protein_jaccard(Y, sets)
    values: dict[str, list[np.ndarray]] = {k: [] for k in (*MULTILABEL_INTERVALS, "f1")}
    for weights in _resample_weights(len(Y), n_boot, seed):
        for key, v in _multilabel_values(Y, sets, macro, weights, jac).items():
            values[key].append(v)
    joined = {k: np.concatenate(v) for k, v in values.items()}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = {k: (float(np.percentile(joined[k], q[0])), float(np.percentile(joined[k], q[1])))
          for k in MULTILABEL_INTERVALS}
    return ci, np.percentile(joined["f1"], q, axis=0).T


def multilabel_metrics(Y: np.ndarray, proba: np.ndarray, sets: np.ndarray, classes: list[str],
                       thresholds: np.ndarray | None = None, groups: np.ndarray | None = None,
                       n_boot: int = 1000, seed: int = 0) -> dict:
    """Every multi-label metric of one method on one set of proteins (all rows scored).

    ``Y`` (n, L) 0/1 truth, ``proba`` (n, L) per-label probabilities, ``sets`` (n, L) the
    predicted sets, ``thresholds`` (n, L) or (L,) the thresholds used (their mean per label is
    reported). Per label ("per_class", as the single-label tables): precision, recall, F1, MCC
    (0 where undefined), ROC-AUC (None unless the label has both outcomes among these
    proteins), PR-AUC = average precision (None without a positive), support, counts and
    the F1 interval. A label no protein has ("not in the test set") keeps its row, with F1 0
    (scikit-learn's zero_division=0), and stays out of macro-F1 and the mean AUCs.
    """
    from sklearn.metrics import hamming_loss

    Y = (np.asarray(Y) > 0).astype(np.int64)
    sets = np.asarray(sets) > 0
    proba = np.asarray(proba, dtype=np.float64)
    n, n_labels = Y.shape
    if proba.shape != Y.shape or sets.shape != Y.shape:
        raise ValueError(f"labels {Y.shape}, probabilities {proba.shape} and sets {sets.shape} must have one shape")
    if len(classes) != n_labels:
        raise ValueError(f"{len(classes)} label names for {n_labels} label columns")
    macro = macro_class_indices(Y, n_labels)
    point = _multilabel_values(Y, sets, macro)
    tp, fp, fn, tn = _label_counts(Y, sets)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    mcc = _mcc_from_counts(tp, fp, fn, tn)
    if thresholds is not None:
        thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), Y.shape)
    per_class: dict[str, dict] = {}
    roc: dict[int, float] = {}
    pr: dict[int, float] = {}
    for j, c in enumerate(classes):
        positives = int(Y[:, j].sum())
        if 0 < positives < n:
            roc[j] = float(roc_auc_score(Y[:, j], proba[:, j]))
        if positives > 0:
            pr[j] = float(average_precision_score(Y[:, j], proba[:, j]))
        per_class[c] = {
            "precision": float(precision[j]), "recall": float(recall[j]), "f1": float(point["f1"][j]),
            "mcc": float(mcc[j]), "roc_auc": roc.get(j), "pr_auc": pr.get(j), "support": positives,
            "predicted": int(sets[:, j].sum()),
            "counts": {"tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j])},
            "threshold": None if thresholds is None or n == 0 else float(thresholds[:, j].mean()),
        }
    ci, f1_ci = multilabel_bootstrap(Y, sets, macro, n_boot, seed)
    for v, interval in zip(per_class.values(), f1_ci):
        v["f1_ci95"] = (float(interval[0]), float(interval[1]))
    in_macro = set(macro.tolist())
    out = {
        "multilabel": True,
        "n": int(n),
        "macro_f1": float(point["macro_f1"]),
        "macro_classes": [classes[j] for j in macro],
        "micro_f1": float(point["micro_f1"]),
        "jaccard": float(point["jaccard"]),
        "exact_set_accuracy": float(point["exact_set_accuracy"]),
        "hamming_loss": float(hamming_loss(Y, sets.astype(np.int64))) if n else float("nan"),
        "cardinality": float(Y.sum(1).mean()) if n else float("nan"),
        "predicted_cardinality": float(sets.sum(1).mean()) if n else float("nan"),
        # Means over the labels of macro_classes whose area is defined on these proteins.
        "mean_roc_auc": _mean_or_none([v for j, v in roc.items() if j in in_macro]),
        "mean_pr_auc": _mean_or_none([v for j, v in pr.items() if j in in_macro]),
        "per_class": per_class,
        "ci95": ci,
    }
    if groups is not None:
        per_group: dict[str, dict] = {}
        out["per_group"] = per_group
        for group in sorted(set(groups)):
            inside = np.asarray(groups) == group
            Yg, Sg = Y[inside], sets[inside]
            present = macro_class_indices(Yg, n_labels)
            values = _multilabel_values(Yg, Sg, present)
            g_ci, _ = multilabel_bootstrap(Yg, Sg, present, n_boot, seed)
            per_group[str(group)] = {
                "n": int(inside.sum()), "classes": [classes[j] for j in present],
                **{k: float(values[k]) for k in MULTILABEL_INTERVALS}, "ci95": g_ci}
    return out


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def majority_set_baseline(Y: np.ndarray, classes: list[str]) -> dict:
    """What always predicting the most frequent label set scores (a tie: the set np.unique sorts first)."""
    Y = (np.asarray(Y) > 0)
    if len(Y) == 0:
        return {"set": "", "share": float("nan"), **dict.fromkeys(MULTILABEL_INTERVALS, float("nan"))}
    rows, counts = np.unique(Y, axis=0, return_counts=True)
    best = rows[np.argmax(counts)]
    sets = np.broadcast_to(best, Y.shape)
    values = _multilabel_values(Y, sets, macro_class_indices(Y, len(classes)))
    return {"set": ";".join(c for c, on in zip(classes, best) if on), "share": float(counts.max() / len(Y)),
            **{k: float(values[k]) for k in MULTILABEL_INTERVALS}}


def paired_multilabel(Y: np.ndarray, sets_a: np.ndarray, sets_b: np.ndarray, macro: np.ndarray,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """Methods a and b on the same proteins: the per-protein Jaccard difference a - b (paired
    bootstrap of its mean: interval and two-sided p; an exact sign test on the proteins where
    the two differ), and the macro-F1 difference (over the label indices ``macro``) by paired
    bootstrap. Both methods are scored on the same resamples (the same draws)."""
    from scipy.stats import binomtest

    Y, sets_a, sets_b = np.asarray(Y), np.asarray(sets_a), np.asarray(sets_b)
    if len(Y) == 0:
        nothing = {"difference": float("nan"), "ci95": (float("nan"), float("nan")), "p_value": 1.0}
        return {"jaccard_difference": {"metric": "jaccard", **nothing},
                "sign_test": {"a_better": 0, "b_better": 0, "p_value": 1.0},
                "macro_f1_difference": {"metric": "macro_f1", **nothing}}
    jac_a, jac_b = per_protein_jaccard(Y, sets_a), per_protein_jaccard(Y, sets_b)
    d = jac_a - jac_b
    boot_jac, boot_f1 = [], []
    for weights in _resample_weights(len(Y), n_boot, seed):
        boot_jac.append(weights @ d / len(d))
        a = _multilabel_values(Y, sets_a, macro, weights, jac_a)["macro_f1"]
        b = _multilabel_values(Y, sets_b, macro, weights, jac_b)["macro_f1"]
        boot_f1.append(a - b)
    observed_f1 = float(_multilabel_values(Y, sets_a, macro)["macro_f1"]
                        - _multilabel_values(Y, sets_b, macro)["macro_f1"])
    a_better, b_better = int((d > 0).sum()), int((d < 0).sum())
    sign_p = 1.0 if a_better + b_better == 0 else float(binomtest(a_better, a_better + b_better, 0.5).pvalue)
    return {
        "jaccard_difference": _bootstrap_difference("jaccard", float(d.mean()), np.concatenate(boot_jac)),
        "sign_test": {"a_better": a_better, "b_better": b_better, "p_value": sign_p},
        "macro_f1_difference": _bootstrap_difference("macro_f1", observed_f1, np.concatenate(boot_f1)),
    }


def _bootstrap_difference(metric: str, observed: float, diffs: np.ndarray) -> dict:
    """As paired_bootstrap reports it: the observed difference, the percentile interval and two-sided p."""
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())))
    return {"metric": metric, "difference": observed,
            "ci95": (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))), "p_value": p}
