"""Attention pooling over residues (DeepLocPro / Light Attention style), as a scikit-learn head.

The module scores every residue with ``heads`` attention heads (each owning a slice of the
channels), takes a masked softmax over residues per head, and concatenates the
attention-weighted sum with a masked max over residues; a small MLP classifies that. With
``conv_kernel > 0`` features and attention logits come from 1-D convolutions over
neighbouring residues, as in Light Attention (much more compute per residue).

Padding never enters a pooling step: softmax logits and max inputs at padded positions are
set to -inf. Training reads length-bucketed batches from the cache, stops early on a
validation metric and restores the best epoch.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedcache.extract import available_cores, torch_threads

from .estimators import Head
from .features import ArrayResidues, Residues, length_batches, pad
from .training import class_weights, describe_epoch, encode_labels, selection_key, validation_record

log = logging.getLogger(__name__)


class AttentionPooling(nn.Module):
    def __init__(self, dim: int, n_classes: int, heads: int = 8, hidden: int = 64, dropout: float = 0.25,
                 conv_kernel: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by {heads} attention heads")
        self.heads = heads
        self.dropout = dropout
        if conv_kernel:
            self.features = nn.Conv1d(dim, dim, conv_kernel, padding=conv_kernel // 2)
            self.logits = nn.Conv1d(dim, heads, conv_kernel, padding=conv_kernel // 2)
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


class AttentionHead(Head):
    """Attention pooling + MLP trained on per-residue embeddings."""

    input = "per_residue"
    file_suffix = ".pt"

    def __init__(self, heads=8, hidden=64, dropout=0.25, conv_kernel=0, lr=3e-3, weight_decay=1e-2,
                 max_epochs=30, patience=5, batch_tokens=32768, max_batch=128, crop=1022, class_weight=None,
                 metric="macro_f1", threads=None, random_state=0):
        self.heads = heads  # attention heads, each pooling dim/heads channels (fewer if they do not divide dim)
        self.hidden = hidden  # width of the MLP's hidden layer
        self.dropout = dropout  # channel dropout on the input, and dropout in the MLP
        self.conv_kernel = conv_kernel  # 0: linear attention; 9: Light Attention's convolutions
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience  # epochs without a better validation metric before stopping
        self.batch_tokens = batch_tokens  # padded residues per batch
        self.max_batch = max_batch
        self.crop = crop  # residues per protein seen in training (N-terminal part); None: all
        self.class_weight = class_weight  # None or "balanced" (weights the loss by inverse class frequency)
        self.metric = metric  # validation metric for early stopping: accuracy | macro_f1 | mcc
        self.threads = threads
        self.random_state = random_state

    # -- training ------------------------------------------------------------------------
    def fit(self, X: Residues, y, eval_set=None):
        X = _as_residues(X)
        self.classes_, targets, val_targets = encode_labels(y, eval_set)
        val = None if eval_set is None else (_as_residues(eval_set[0]), val_targets)
        torch.manual_seed(self.random_state)
        rng = np.random.default_rng(self.random_state)
        self.n_features_in_ = X.dim
        self.heads_ = usable_heads(X.dim, self.heads)
        self.module_ = AttentionPooling(X.dim, len(self.classes_), self.heads_, self.hidden, self.dropout,
                                        self.conv_kernel)
        optimiser = torch.optim.AdamW(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        weight = class_weights(targets, len(self.classes_), self.class_weight)
        batches = length_batches(np.minimum(X.lengths, self.crop or 1 << 30), self.batch_tokens, self.max_batch,
                                 min_size=2)
        self.history_ = []
        best, best_state, stale = None, None, 0
        with torch_threads(self.threads or available_cores()):
            for epoch in range(1, self.max_epochs + 1):
                start = time.perf_counter()
                self.module_.train()
                total, seen = 0.0, 0
                for b in rng.permutation(len(batches)):
                    idx = batches[b]
                    x, mask = pad(X.read(idx), self.crop)
                    logits = self.module_(torch.from_numpy(x), torch.from_numpy(mask))
                    loss = F.cross_entropy(logits, torch.from_numpy(targets[idx]), weight=weight)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += loss.item() * len(idx)
                    seen += len(idx)
                record = {"epoch": epoch, "train_loss": total / seen, "seconds": 0.0}
                if val is not None:
                    record.update(validation_record(self._proba(val[0]), val[1], weight))
                record["seconds"] = time.perf_counter() - start
                self.history_.append(record)
                log.info("epoch %3d  train loss %.4f%s  %.1f s", epoch, record["train_loss"], describe_epoch(record),
                         record["seconds"])
                if val is None:
                    continue
                key = selection_key(record, self.metric)
                if best is None or key > best:
                    best, best_state, stale = key, copy.deepcopy(self.module_.state_dict()), 0
                    self.best_epoch_ = epoch
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        if best_state is not None:
            self.module_.load_state_dict(best_state)
        else:
            self.best_epoch_ = len(self.history_)
        self.module_.eval()
        return self

    # -- prediction ----------------------------------------------------------------------
    def _proba(self, X: Residues) -> np.ndarray:
        self.module_.eval()
        out = np.zeros((len(X), len(self.classes_)), dtype=np.float32)
        with torch.inference_mode():
            for idx in length_batches(np.minimum(X.lengths, self.crop or 1 << 30), self.batch_tokens, self.max_batch):
                x, mask = pad(X.read(idx), self.crop)
                out[idx] = torch.softmax(self.module_(torch.from_numpy(x), torch.from_numpy(mask)), dim=1).numpy()
        return out

    def predict_proba(self, X):
        X = _as_residues(X)
        with torch_threads(self.threads or available_cores()):
            return self._proba(X)

    def selection_summary(self):
        return {"best_epoch": self.best_epoch_, "epochs_run": len(self.history_)}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path):
        path = Path(path)
        torch.save({
            "params": self.get_params(),
            "state_dict": self.module_.state_dict(),
            "classes": self.classes_.tolist(),
            "n_features_in": self.n_features_in_,
            "heads": self.heads_,
            "history": self.history_,
            "best_epoch": self.best_epoch_,
        }, path)
        return path

    @classmethod
    def load(cls, path):
        data = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(**data["params"])
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


def usable_heads(dim: int, wanted: int) -> int:
    """The largest number of attention heads, at most ``wanted``, that splits ``dim`` evenly."""
    heads = max(h for h in range(1, max(1, wanted) + 1) if dim % h == 0)
    if heads != wanted:
        log.info("%d attention heads do not split %d dimensions evenly; using %d", wanted, dim, heads)
    return heads


def _as_residues(X) -> Residues:
    return X if isinstance(X, Residues) else ArrayResidues(X)
