"""Pieces every trained head shares: label encoding, class weights, validation records."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import score

VALIDATION_METRICS = ("accuracy", "macro_f1", "mcc")


def encode_labels(y, eval_set=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """classes_ (every label seen in training or validation), training targets, validation targets."""
    y = np.asarray(y)
    classes = np.unique(y if eval_set is None else np.concatenate([y, eval_set[1]]))
    index = {c: i for i, c in enumerate(classes)}
    targets = np.array([index[v] for v in y])
    val_targets = None if eval_set is None else np.array([index[v] for v in eval_set[1]])
    return classes, targets, val_targets


def class_weights(targets: np.ndarray, n_classes: int, mode: str | None) -> torch.Tensor | None:
    """``balanced``: loss weights by inverse class frequency (as scikit-learn defines them)."""
    if mode is None:
        return None
    if mode != "balanced":
        raise ValueError(f"class_weight must be None or 'balanced', not {mode!r}")
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def validation_record(proba: np.ndarray, targets: np.ndarray, weight: torch.Tensor | None) -> dict:
    """Validation loss (weighted like training) and metrics of predicted probabilities."""
    logp = torch.log(torch.from_numpy(proba).float().clamp_min(1e-12))
    record = {"val_loss": float(F.nll_loss(logp, torch.from_numpy(targets), weight=weight))}
    pred = proba.argmax(1)
    for m in VALIDATION_METRICS:
        record[f"val_{m}"] = score(targets, pred, m, proba.shape[1])
    return record


def describe_epoch(record: dict) -> str:
    if "val_loss" not in record:
        return ""
    return "  val loss {:.4f}  acc {:.3f}  macro-F1 {:.3f}  MCC {:.3f}".format(
        record["val_loss"], record["val_accuracy"], record["val_macro_f1"], record["val_mcc"])


def selection_key(record: dict, metric: str) -> tuple[float, float]:
    """What early stopping maximises: the chosen metric, ties broken by the lower validation loss."""
    return record[f"val_{metric}"], -record["val_loss"]
