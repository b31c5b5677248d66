"""Attention pooling over residues (DeepLocPro / Light Attention style), as a scikit-learn head.

The module scores every residue with ``heads`` attention heads (each owning a slice of the
channels), takes a masked softmax over residues per head, and concatenates the
attention-weighted sum with a masked max over residues; a small MLP classifies that. With
``conv_kernel > 0`` features and attention logits come from 1-D convolutions over
neighbouring residues, as in Light Attention (much more compute per residue).

Padding never enters a pooling step: softmax logits and max inputs at padded positions are
set to -inf. Training reads length-bucketed batches from the cache in the loop every torch
head shares (:func:`heads.training.train`): early stopping on a validation metric, the best
epoch restored, and with ``checkpoint_dir`` per-epoch checkpoints that a fit resumes from.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from embedcache.atomic import atomic_path
from embedcache.extract import default_threads, torch_threads
from embedcache.store import CONTENT_SETTINGS

from .base import (
    METRIC,
    Head,
    check_finite_batch,
    check_labels,
    check_width,
    class_weight_check,
    integer,
    is_multilabel,
    number,
    path_check,
    seed_check,
)
from .features import ArrayResidues, CachedResidues, Residues, length_batches, pad
from .training import (
    Schedule,
    Task,
    class_weights,
    head_loss,
    isolated_rng,
    output_proba,
    seed_from,
    seed_torch,
    train,
)

log = logging.getLogger(__name__)

# Settings that change neither the result nor the meaning of a checkpoint.
_RUNTIME_PARAMS = {"checkpoint_dir", "threads"}


class AttentionPooling(nn.Module):
    def __init__(self, dim: int, n_classes: int, heads: int = 8, hidden: int = 64, dropout: float = 0.25,
                 conv_kernel: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by {heads} attention heads")
        self.heads = heads
        self.dropout = dropout
        if conv_kernel:
            self.features: nn.Module | None = nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2)
            self.logits: nn.Module = nn.Conv1d(dim, heads, conv_kernel, padding=conv_kernel // 2)
        else:
            self.features, self.logits = None, nn.Linear(dim, heads)
        # Batch norm standardises the pooled features, as logistic regression's scaler does: mean-
        # and max-pooled values differ in scale by orders of magnitude.
        self.classifier = nn.Sequential(
            nn.BatchNorm1d(2 * dim), nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D), mask (B, L) True at residues -> pooled (B, 2D), attention (B, L, heads)."""
        if self.training and self.dropout > 0:
            # Channel dropout: one mask per protein and dimension, shared by its residues.
            # Dropping single residue values costs a random number per value (most of a step).
            keep = torch.rand(x.shape[0], 1, x.shape[2], device=x.device) >= self.dropout
            x = x * keep.to(x.dtype) / (1 - self.dropout)
        if self.features is not None:
            conv_in = x.transpose(1, 2)
            feats = self.features(conv_in).transpose(1, 2)
            logits = self.logits(conv_in).transpose(1, 2)
        else:
            feats, logits = x, self.logits(x)
        padding = ~mask.unsqueeze(-1)
        attention = torch.softmax(logits.masked_fill(padding, float("-inf")), dim=1)  # over residues
        b, length, dim = feats.shape
        per_head = feats.view(b, length, self.heads, dim // self.heads)
        weighted = (attention.unsqueeze(-1) * per_head).sum(1).reshape(b, dim)
        maxed = feats.masked_fill(padding, float("-inf")).max(1).values
        return torch.cat([weighted, maxed], dim=1), attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x, mask)[0])


@dataclass
class ResidueAttention:
    """What a model with attention pooling predicted for some proteins, and where it looked."""

    proba: np.ndarray  # (proteins, classes) probabilities, columns as the model's classes_
    weights: list[np.ndarray]  # per protein (attention heads, residues seen): each head's weights sum to 1
    positions: list[np.ndarray]  # per protein, the 0-based sequence index of each residue seen


def _conv_kernel_check(v) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and (v == 0 or (v > 0 and v % 2)) else \
        "0 (no convolution) or an odd positive number (a window centred on each residue)"


class AttentionHead(Head):
    """Attention pooling + MLP trained on per-residue embeddings."""

    kind = "attention"
    title = "attention pooling"
    input = "per_residue"
    threads_param = "threads"
    file_suffix = ".pt"
    fitted_attributes = ("classes_", "module_")
    constraints: ClassVar[dict] = {
        "heads": integer(1), "hidden": integer(1), "dropout": number(0, 1, high_open=True),
        "conv_kernel": _conv_kernel_check, "lr": number(0, low_open=True), "weight_decay": number(0),
        "max_epochs": integer(1), "patience": integer(1), "batch_tokens": integer(1), "max_batch": integer(2),
        "crop": integer(1, none_ok=True), "class_weight": class_weight_check(), "metric": METRIC,
        "threads": integer(1, none_ok=True), "checkpoint_dir": path_check, "random_state": seed_check,
    }

    def __init__(self, heads=8, hidden=64, dropout=0.25, conv_kernel=0, lr=3e-3, weight_decay=1e-2,
                 max_epochs=30, patience=5, batch_tokens=32768, max_batch=128, crop=1022, class_weight=None,
                 metric="macro_f1", threads=None, checkpoint_dir=None, random_state=0):
        self.heads = heads  # attention heads, each pooling dim/heads channels (fewer if they do not divide dim)
        self.hidden = hidden  # width of the MLP's hidden layer
        self.dropout = dropout  # channel dropout on the input, and dropout in the MLP
        self.conv_kernel = conv_kernel  # 0: linear attention; odd, e.g. 9: Light Attention's convolutions
        self.lr = lr  # AdamW learning rate (constant)
        self.weight_decay = weight_decay  # AdamW weight decay
        self.max_epochs = max_epochs  # epochs at most
        self.patience = patience  # epochs without a better validation metric before stopping
        self.batch_tokens = batch_tokens  # padded residues per batch
        self.max_batch = max_batch  # proteins per batch at most
        self.crop = crop  # residues per protein seen in training (N-terminal part); null: all
        self.class_weight = class_weight  # null or 'balanced' (weights the loss by inverse class frequency)
        self.metric = metric  # validation metric for early stopping: accuracy | macro_f1 | mcc
        self.threads = threads  # CPU threads [the cores free when it starts]
        self.checkpoint_dir = checkpoint_dir  # per-epoch checkpoints and training logs; enables resume
        self.random_state = random_state  # seed of initial weights, shuffling and dropout; null: fresh each fit

    # -- training ------------------------------------------------------------------------
    def fit(self, X: Residues, y, eval_set=None):
        self.validate_params()
        X = _as_residues(X)
        if len(X) == 0:
            raise ValueError("attention head got no proteins")
        classes, targets, val_targets = check_labels(y, eval_set, len(X))
        val = None
        if eval_set is not None:
            val = _as_residues(eval_set[0])
            if val.dim != X.dim:
                raise ValueError(f"validation embeddings are {val.dim}-dimensional, training ones {X.dim}")
        self.classes_ = classes
        self.multilabel_ = multilabel = is_multilabel(targets)
        self.n_features_in_ = X.dim
        self.heads_ = usable_heads(X.dim, self.heads)
        seed = seed_from(self.random_state)
        folder = Path(self.checkpoint_dir) if self.checkpoint_dir else None
        fingerprint = self._fingerprint(X, targets, val, val_targets) if folder else ""
        weight = class_weights(targets, len(classes), self.class_weight)
        lengths = np.minimum(X.lengths, self.crop or 1 << 30)
        batches = length_batches(lengths, self.batch_tokens, self.max_batch, min_size=2)
        with isolated_rng(), torch_threads(self.threads or default_threads()):
            seed_torch(seed)
            self.module_ = module = AttentionPooling(X.dim, len(classes), self.heads_, self.hidden, self.dropout,
                                                     self.conv_kernel)

            def loss(idx, rng):
                x, mask = pad(_read(X, idx), self.crop)
                logits = module(torch.from_numpy(x), torch.from_numpy(mask))
                target = torch.from_numpy(targets[idx])
                return head_loss(logits, target, weight, multilabel), len(idx), int(mask.sum())

            def load_state(state):
                module.load_state_dict(state)

            task = Task(module=module, param_groups=[{"params": list(module.parameters()), "lr": self.lr,
                                                      "weight_decay": self.weight_decay}],
                        steps=lambda rng: [[batches[b]] for b in rng.permutation(len(batches))],
                        loss=loss, state=module.state_dict, load_state=load_state,
                        predict=None if val is None else (lambda: self._proba(val)), val_targets=val_targets,
                        val_weight=weight)
            outcome = train(task, Schedule(max_epochs=self.max_epochs, patience=self.patience, metric=self.metric,
                                           seed=seed), folder, fingerprint)
        self.history_ = outcome.history
        self.best_epoch_ = outcome.best_epoch
        return self

    def _fingerprint(self, X: Residues, targets, val, val_targets) -> str:
        """Settings and data of a fit, so a checkpoint is resumed only by the same fit."""
        params = {k: v for k, v in self.get_params().items() if k not in _RUNTIME_PARAMS}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
        for view, labels in ((X, targets), (val, val_targets)):
            if view is None:
                continue
            digest.update(residues_identity(view).encode())
            labels = np.asarray(labels, dtype=np.int64)
            digest.update(labels.tobytes())
            if labels.ndim == 2:  # a label matrix: its shape too (single-label fingerprints stay as they were)
                digest.update(str(labels.shape).encode())
        return digest.hexdigest()

    # -- prediction ----------------------------------------------------------------------
    def _proba(self, X: Residues) -> np.ndarray:
        self.module_.eval()
        out = np.zeros((len(X), len(self.classes_)), dtype=np.float32)
        with torch.inference_mode():
            for idx in length_batches(np.minimum(X.lengths, self.crop or 1 << 30), self.batch_tokens, self.max_batch):
                x, mask = pad(_read(X, idx), self.crop)
                logits = self.module_(torch.from_numpy(x), torch.from_numpy(mask))
                out[idx] = output_proba(logits, getattr(self, "multilabel_", False)).numpy()
        return out

    def predict_proba(self, X):
        self.check_fitted()
        X = _as_residues(X)
        check_width(self, X.dim)
        if len(X) == 0:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        with torch_threads(self.threads or default_threads()):
            return self._proba(X)

    def attention(self, X) -> ResidueAttention:
        """Probabilities and each protein's attention weights over the residues the module saw.

        A cache's residue rows start at the sequence's first residue (BOS/EOS are not stored;
        truncation keeps the N-terminal part) and the head reads at most ``crop`` of them, so
        the residues seen are the first ``min(stored, crop)`` of the sequence.
        """
        self.check_fitted()
        X = _as_residues(X)
        check_width(self, X.dim)
        proba = np.zeros((len(X), len(self.classes_)), dtype=np.float32)
        weights: list[np.ndarray] = [np.zeros((self.heads_, 0), dtype=np.float32)] * len(X)
        if len(X) == 0:
            return ResidueAttention(proba, weights, [])
        module = self.module_
        module.eval()
        lengths = np.minimum(X.lengths, self.crop or 1 << 30)
        with torch_threads(self.threads or default_threads()), torch.inference_mode():
            for idx in length_batches(lengths, self.batch_tokens, self.max_batch):
                x, mask = pad(_read(X, idx), self.crop)
                pooled, attention = module.pool(torch.from_numpy(x), torch.from_numpy(mask))
                proba[idx] = output_proba(module.classifier(pooled), getattr(self, "multilabel_", False)).numpy()
                for row, i in enumerate(idx):
                    weights[i] = attention[row, :lengths[i]].T.contiguous().numpy()
        return ResidueAttention(proba, weights, [np.arange(n) for n in lengths])

    def selection_summary(self):
        return {"best_epoch": self.best_epoch_, "epochs_run": len(self.history_)}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path):
        self.check_fitted()
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save({
                **self.payload(),
                "params": self.get_params(),
                "state_dict": self.module_.state_dict(),
                "classes": self.classes_.tolist(),
                "n_features_in": self.n_features_in_,
                "heads": self.heads_,
                "history": self.history_,
                "best_epoch": self.best_epoch_,
            }, tmp)
        return path

    @classmethod
    def from_saved(cls, data, path, **options):
        params = dict(data["params"])
        params.setdefault("checkpoint_dir", None)
        head = cls(**{k: v for k, v in params.items() if k in cls.param_names()})
        head.classes_ = np.array(data["classes"])
        head.n_features_in_ = data["n_features_in"]
        head.history_ = data["history"]
        head.best_epoch_ = data["best_epoch"]
        head.heads_ = data["heads"]
        head.module_ = AttentionPooling(head.n_features_in_, len(head.classes_), head.heads_, head.hidden,
                                        head.dropout, head.conv_kernel)
        head.module_.load_state_dict(data["state_dict"])
        head.module_.eval()
        return head


def residues_identity(view: Residues) -> str:
    """What a set of per-residue arrays is: a cache's settings and sequences, or the arrays' bytes.

    A cache is content-addressed (the same weights, settings and sequence give the same
    arrays), so its rows are identified without reading them.
    """
    digest = hashlib.sha256()
    if isinstance(view, CachedResidues):
        # What the cache keeps beside the residues does not change them: "store" is left out, so
        # the identity of a cache made before it existed stays the same.
        settings = {k: view.cache.attrs.get(k) for k in CONTENT_SETTINGS if k != "store"}
        digest.update(json.dumps({"settings": settings, "layer": view.layer}, sort_keys=True, default=str).encode())
        digest.update("\n".join(view.cache.sequences_rows(view.rows.tolist())).encode())
    else:
        for start in range(0, len(view), 256):
            for a in view.read(range(start, min(len(view), start + 256))):
                digest.update(np.ascontiguousarray(a).tobytes())
                digest.update(str(a.shape).encode())
    digest.update(np.asarray(view.lengths, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _read(X: Residues, idx) -> list[np.ndarray]:
    arrays = X.read(idx)
    check_finite_batch(arrays, idx)
    return arrays


def usable_heads(dim: int, wanted: int) -> int:
    """The largest number of attention heads, at most ``wanted``, that splits ``dim`` evenly."""
    heads = max(h for h in range(1, max(1, wanted) + 1) if dim % h == 0)
    if heads != wanted:
        log.info("%d attention heads do not split %d dimensions evenly; using %d", wanted, dim, heads)
    return heads


def _as_residues(X) -> Residues:
    return X if isinstance(X, Residues) else ArrayResidues(X)
