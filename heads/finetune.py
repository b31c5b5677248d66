"""Fine-tuning a language model end to end (ESM-2, or UniRep), as one more head of the evaluation loop.

:class:`FinetuneHead` takes sequences (``input = "sequence"``) instead of cached embeddings,
loads its backbone through :mod:`embedcache`'s loader for every fit (each split starts from
the pretrained weights), and trains backbone and classifier together:

* ``mode``: ``full`` (every weight), ``top`` (the top ``top_layers`` transformer layers and
  the final layer norm), ``lora`` (adapters from ``peft`` on the attention projections, and
  optionally the feed-forward ones; the base weights stay frozen) or ``frozen`` (classifier
  only, the backbone as a fixed feature extractor).
* Batches are groups of similar length within a budget of padded tokens, so short proteins
  share a forward pass instead of being padded to the longest of a random batch.
* AdamW (no decay on biases and norms), linear warm-up then linear decay, gradient
  accumulation and clipping, optional class weights, bf16 autocast, gradient checkpointing.
* Early stopping on a validation metric; the best epoch's weights are restored at the end.
* With ``checkpoint_dir`` every finished epoch is saved atomically (``last.pt``); a fit with the
  same settings and data continues after the last saved epoch, so a crash (kill -9) costs at
  most the epoch in progress. Each epoch's shuffling and dropout are seeded from
  ``random_state`` and the epoch number, so a resumed fit follows the uninterrupted one.
  The same folder receives ``steps.csv`` (loss and learning rate per optimiser step),
  ``epochs.csv`` (training and validation loss and metrics per epoch) and ``curves.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedcache.backbone import Backbone
from embedcache.extract import ExtractConfig, available_cores, load_backbone, pick_device, torch_threads

from .attention import AttentionPooling, usable_heads
from .estimators import Head
from .features import length_batches
from .training import class_weights, describe_epoch, encode_labels, selection_key, validation_record

log = logging.getLogger(__name__)

MODES = ("full", "top", "lora", "frozen")
POOLINGS = ("mean", "attention")
CROPS = ("n_terminal", "ends", "random")
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FEED_FORWARD = ["fc1", "fc2"]
# Settings that change neither the result nor the meaning of a checkpoint.
_RUNTIME_PARAMS = {"checkpoint_dir", "threads", "device", "trust_weights"}


def crop_sequence(seq: str, max_residues: int | None, policy: str, rng: np.random.Generator | None = None) -> str:
    """At most ``max_residues`` residues of ``seq``.

    ``n_terminal`` keeps the start (where signal peptides and other sorting signals sit),
    ``ends`` keeps both termini (half each), ``random`` a random window in training
    (``rng`` given) and the start otherwise.
    """
    if not max_residues or len(seq) <= max_residues:
        return seq
    if policy == "ends":
        head = (max_residues + 1) // 2
        return seq[:head] + seq[len(seq) - (max_residues - head):]
    if policy == "random" and rng is not None:
        start = int(rng.integers(0, len(seq) - max_residues + 1))
        return seq[start:start + max_residues]
    return seq[:max_residues]


class SequenceClassifier(nn.Module):
    """A backbone's last-layer residue states, pooled over residues (padding masked), classified."""

    def __init__(self, backbone: Backbone, n_classes: int, pooling: str = "mean", dropout: float = 0.1,
                 attention_heads: int = 8, hidden: int = 64, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone = backbone
        self.encoder = backbone.model  # registered, so .parameters() and .to() reach the backbone
        self.pooling = pooling
        self.grad_checkpointing = grad_checkpointing
        dim = backbone.embed_dim
        if pooling == "attention":
            self.head = AttentionPooling(dim, n_classes, usable_heads(dim, attention_heads), hidden, dropout)
        else:
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))

    def forward(self, sequences: Sequence[str]) -> torch.Tensor:
        with self.backbone.autocast():
            states, mask = self.backbone.residue_states(sequences, self.grad_checkpointing and self.training)
        states = states.float()
        if self.pooling == "attention":
            return self.head(states, mask)
        weights = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.head(pooled)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes: parameters that require gradients, and the head's buffers."""
        state = {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}
        state.update({f"head.{name}": b.detach().cpu().clone() for name, b in self.head.named_buffers()})
        return state

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        own.update({f"head.{name}": b for name, b in self.head.named_buffers()})
        unknown = set(state) - set(own)
        if unknown:
            raise ValueError(f"saved state does not fit this model: unknown tensors {sorted(unknown)[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)


class FinetuneHead(Head):
    """ESM-2 (or UniRep) fine-tuned end to end with a pooling classifier (see the module docstring).

    ``model`` names official weights (torch hub cache, downloaded when absent; or unirep1900,
    unirep256, unirep64); ``weights`` is a local fair-esm .pt or UniRep .npz file, as for
    ``embedcache extract``. UniRep trains in modes full, top (its top mLSTM layers) and frozen.
    """

    input = "sequence"
    file_suffix = ".finetune.pt"

    def __init__(self, model=None, weights=None, mode="full", top_layers=2, lora_rank=8, lora_alpha=16,
                 lora_dropout=0.05, lora_feed_forward=False, pooling="mean", dropout=0.1, attention_heads=8,
                 lr=1e-4, head_lr=1e-3, weight_decay=0.01, warmup=0.1, max_epochs=10, patience=3,
                 batch_tokens=None, max_batch=64, grad_accum=1, clip_norm=1.0, class_weight=None,
                 crop=1022, crop_policy="n_terminal", precision="auto", grad_checkpointing=False,
                 metric="macro_f1", device="auto", threads=None, checkpoint_dir=None, trust_weights=False,
                 random_state=0):
        self.model = model  # official ESM-2 name, e.g. esm2_t33_650M_UR50D
        self.weights = weights  # or a local fair-esm .pt file (this wins over `model` for loading)
        self.mode = mode  # full | top | lora | frozen
        self.top_layers = top_layers  # layers trained in mode "top" (from the top)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha  # LoRA scales its update by alpha / rank
        self.lora_dropout = lora_dropout
        self.lora_feed_forward = lora_feed_forward  # adapters on fc1/fc2 too, not only q/k/v/out
        self.pooling = pooling  # mean | attention (the attention head's pooling module)
        self.dropout = dropout  # before the classifier
        self.attention_heads = attention_heads  # for pooling="attention"
        self.lr = lr  # peak learning rate of the backbone
        self.head_lr = head_lr  # peak learning rate of the freshly initialised classifier
        self.weight_decay = weight_decay  # AdamW, not applied to biases and norms
        self.warmup = warmup  # share of all optimiser steps spent warming up linearly
        self.max_epochs = max_epochs  # the learning rate decays linearly to 0 at the end of these
        self.patience = patience  # epochs without a better validation metric before stopping
        self.batch_tokens = batch_tokens  # padded tokens per forward pass [ESM-2 4096, UniRep 16384]
        self.max_batch = max_batch  # proteins per forward pass at most
        self.grad_accum = grad_accum  # forward passes per optimiser step
        self.clip_norm = clip_norm  # gradient norm clipping; None: off
        self.class_weight = class_weight  # None or "balanced"
        self.crop = crop  # residues per protein at most (ESM-2 saw 1022)
        self.crop_policy = crop_policy  # n_terminal | ends | random (window in training, start otherwise)
        self.precision = precision  # auto (bf16 on GPUs that have it, else fp32) | fp32 | bf16
        self.grad_checkpointing = grad_checkpointing  # ESM-2: recompute layer activations (less memory, one more forward)
        self.metric = metric  # early stopping: accuracy | macro_f1 | mcc
        self.device = device  # auto | cpu | cuda | cuda:N
        self.threads = threads  # CPU threads [all available cores]
        self.checkpoint_dir = checkpoint_dir  # per-epoch checkpoints and training logs; enables resume
        self.trust_weights = trust_weights  # allow pickled objects in the weights file
        self.random_state = random_state

    # -- set-up --------------------------------------------------------------------------
    def _check_params(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("pooling", self.pooling, POOLINGS),
                                     ("crop_policy", self.crop_policy, CROPS),
                                     ("precision", self.precision, ("auto", "fp32", "bf16")),
                                     ("metric", self.metric, ("accuracy", "macro_f1", "mcc"))):
            if value not in allowed:
                raise ValueError(f"finetune {name} must be one of {allowed}, not {value!r}")
        if self.model is None and self.weights is None:
            raise ValueError("finetune needs a backbone: --model NAME or --weights PATH")
        if self.grad_accum < 1 or self.max_epochs < 1:
            raise ValueError("finetune grad_accum and max_epochs must be at least 1")

    def _build(self, n_classes: int) -> SequenceClassifier:
        device = pick_device(self.device)
        # LoRA's adapters and the classifier are drawn from random_state alone; the caller's
        # torch generators are left as they were.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.random_state)
            backbone = load_backbone(ExtractConfig(model=None if self.weights else self.model, weights=self.weights,
                                                   trust_weights=self.trust_weights))
            if self.grad_checkpointing and not backbone.supports_grad_checkpointing:
                raise ValueError(f"gradient checkpointing is not implemented for {backbone.architecture} "
                                 f"({backbone.family}); set finetune.grad_checkpointing=false")
            backbone.to(device)
            backbone.set_precision(backbone.pick_precision(self.precision, device, training=True))
            torch.manual_seed(self.random_state)  # whatever loading drew from the generator
            backbone.configure_training(self.mode, self.top_layers, lora={
                "rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "feed_forward": self.lora_feed_forward})
            classifier = SequenceClassifier(backbone, n_classes, self.pooling, self.dropout, self.attention_heads,
                                            grad_checkpointing=self.grad_checkpointing)
        classifier.head.to(device)
        self.backbone_info_ = backbone.describe()
        return classifier

    def _budget(self) -> int:
        return self.batch_tokens or self.classifier_.backbone.train_budget

    def _optimiser(self, classifier: SequenceClassifier) -> torch.optim.Optimizer:
        groups: dict[tuple[float, float], list] = {}
        for name, p in classifier.named_parameters():
            if not p.requires_grad:
                continue
            lr = self.head_lr if name.startswith("head.") else self.lr
            decay = self.weight_decay if p.ndim >= 2 else 0.0
            groups.setdefault((lr, decay), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()])

    # -- training ------------------------------------------------------------------------
    def fit(self, X, y, eval_set=None):
        self._check_params()
        sequences = [str(s) for s in X]
        self.classes_, targets, val_targets = encode_labels(y, eval_set)
        val = None if eval_set is None else ([str(s) for s in eval_set[0]], val_targets)
        folder = Path(self.checkpoint_dir) if self.checkpoint_dir else None
        fingerprint = self._fingerprint(sequences, targets, val)
        self.classifier_ = classifier = self._build(len(self.classes_))
        device = classifier.backbone.device
        threads = self.threads or available_cores()

        weight = class_weights(targets, len(self.classes_), self.class_weight)
        train_weight = None if weight is None else weight.to(device)
        lengths = np.array([min(len(s), self.crop or 1 << 30) for s in sequences]) + classifier.backbone.extra_tokens
        batches = length_batches(lengths, self._budget(), self.max_batch,
                                 min_size=2 if self.pooling == "attention" else 1)
        steps_per_epoch = math.ceil(len(batches) / self.grad_accum)
        total_steps = steps_per_epoch * self.max_epochs
        warm = max(1, round(self.warmup * total_steps)) if self.warmup else 0
        optimiser = self._optimiser(classifier)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total_steps - step) / max(1, total_steps - warm))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
        self.history_: list[dict] = []
        self.best_epoch_ = 0
        best, best_state, stale, start_epoch, step = None, None, 0, 1, 0

        saved = self._load_checkpoint(folder, fingerprint) if folder else None
        if saved is not None:
            classifier.load_trainable(saved["trainable"])
            self.history_ = saved["history"]
            self.best_epoch_ = saved["best_epoch"]
            best = tuple(saved["best"]) if saved["best"] is not None else None
            best_state, stale, step = saved["best_state"], saved["stale"], saved["step"]
            start_epoch = saved["epoch"] + 1
            if saved["finished"]:
                start_epoch = self.max_epochs + 1
            else:
                optimiser.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            _trim_steps(folder / "steps.csv", saved["epoch"])  # rows of an epoch the crash cut short
            log.info("resuming from %s: %d epoch(s) done%s", folder / "last.pt", saved["epoch"],
                     ", training had finished" if saved["finished"] else "")
        elif folder:
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("steps.csv", "epochs.csv"):
                (folder / name).unlink(missing_ok=True)
            (folder / "params.json").write_text(json.dumps(self._result_params(), indent=2, default=str))

        n_trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
        log.info("fine-tuning %s (%s, mode %s): %s trainable parameters, %d proteins in %d batches, "
                 "%d optimiser steps per epoch, %s on %s", self.backbone_info_["model"],
                 self.backbone_info_["architecture"], self.mode, f"{n_trainable:,}", len(sequences), len(batches),
                 steps_per_epoch, classifier.backbone.precision, device)
        with torch_threads(threads):
            for epoch in range(start_epoch, self.max_epochs + 1):
                started = time.perf_counter()
                rng = np.random.default_rng([self.random_state, epoch])
                torch.manual_seed(self.random_state * 100_003 + epoch)
                classifier.train()
                order = rng.permutation(len(batches))
                total_loss, seen, tokens, step_rows = 0.0, 0, 0, []
                reported = started
                for first in range(0, len(order), self.grad_accum):
                    group = [batches[b] for b in order[first:first + self.grad_accum]]
                    n_group = sum(len(b) for b in group)
                    optimiser.zero_grad(set_to_none=True)
                    step_loss = 0.0
                    for idx in group:
                        batch = [crop_sequence(sequences[i], self.crop, self.crop_policy, rng) for i in idx]
                        logits = classifier(batch)
                        target = torch.from_numpy(targets[idx]).to(device)
                        loss = F.cross_entropy(logits, target, weight=train_weight, reduction="sum") / n_group
                        loss.backward()
                        step_loss += loss.item()
                        tokens += sum(len(s) + classifier.backbone.extra_tokens for s in batch)
                    if self.clip_norm:
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in classifier.parameters() if p.grad is not None], self.clip_norm)
                    optimiser.step()
                    scheduler.step()
                    step += 1
                    total_loss += step_loss * n_group
                    seen += n_group
                    step_rows.append({"step": step, "epoch": epoch, "loss": step_loss,
                                      "lr": optimiser.param_groups[0]["lr"], "proteins": n_group})
                    if time.perf_counter() - reported > 30:
                        reported = time.perf_counter()
                        log.info("epoch %d: step %d/%d, loss %.4f, %.0f tokens/s", epoch, len(step_rows),
                                 steps_per_epoch, step_loss, tokens / (reported - started))
                train_seconds = time.perf_counter() - started
                record = {"epoch": epoch, "train_loss": total_loss / seen, "train_tokens_per_s": tokens / train_seconds}
                if val is not None:
                    record.update(validation_record(self._proba(val[0]), val[1], weight))
                record["seconds"] = time.perf_counter() - started
                self.history_.append(record)
                log.info("epoch %3d  train loss %.4f  %.0f tokens/s%s  %.1f s", epoch, record["train_loss"],
                         record["train_tokens_per_s"], describe_epoch(record), record["seconds"])
                stop = False
                if val is not None:
                    key = selection_key(record, self.metric)
                    if best is None or key > best:
                        best, best_state, stale = key, classifier.trainable_state(), 0
                        self.best_epoch_ = epoch
                    else:
                        stale += 1
                        stop = stale >= self.patience
                finished = stop or epoch == self.max_epochs
                if folder:
                    _append_csv(folder / "steps.csv", step_rows)
                    _write_csv(folder / "epochs.csv", self.history_)
                    state = {"fingerprint": fingerprint, "epoch": epoch, "finished": finished, "step": step,
                             "history": self.history_, "best": None if best is None else list(best),
                             "best_epoch": self.best_epoch_, "stale": stale}
                    if finished:
                        # Only the weights a restart restores: no second copy, no optimiser moments.
                        state.update(trainable=best_state or classifier.trainable_state(), best_state=None)
                    else:
                        state.update(trainable=classifier.trainable_state(), best_state=best_state,
                                     optimizer=optimiser.state_dict(), scheduler=scheduler.state_dict())
                    self._save_checkpoint(folder, state)
                    _plot_curves(folder)
                if stop:
                    break
        if best_state is not None:
            classifier.load_trainable(best_state)
        elif best is None:  # no validation set: the last epoch
            self.best_epoch_ = len(self.history_)
        classifier.eval()
        return self

    def _fingerprint(self, sequences, targets, val) -> str:
        digest = hashlib.sha256(json.dumps(self._result_params(), sort_keys=True, default=str).encode())
        for seqs, labels in ((sequences, targets), val or ((), ())):
            digest.update("\n".join(seqs).encode())
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        if self.weights:
            digest.update(str(os.path.getsize(self.weights)).encode())
        return digest.hexdigest()

    def _result_params(self) -> dict:
        return {k: v for k, v in self.get_params().items() if k not in _RUNTIME_PARAMS}

    def _load_checkpoint(self, folder: Path, fingerprint: str) -> dict | None:
        path = folder / "last.pt"
        if not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s was written for other settings or data; training from the start", path)
            return None
        return saved

    @staticmethod
    def _save_checkpoint(folder: Path, state: dict) -> None:
        tmp = folder / "last.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, folder / "last.pt")

    # -- prediction ----------------------------------------------------------------------
    def _proba(self, sequences: Sequence[str]) -> np.ndarray:
        classifier = self.classifier_
        classifier.eval()
        cropped = [crop_sequence(str(s), self.crop, self.crop_policy) for s in sequences]
        lengths = np.array([len(s) for s in cropped]) + classifier.backbone.extra_tokens
        out = np.zeros((len(cropped), len(self.classes_)), dtype=np.float32)
        with torch.inference_mode():
            for idx in length_batches(lengths, self._budget(), self.max_batch):
                logits = classifier([cropped[i] for i in idx])
                out[idx] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return out

    def predict_proba(self, X):
        with torch_threads(self.threads or available_cores()):
            return self._proba(list(X))

    def selection_summary(self):
        return {"best_epoch": self.best_epoch_, "epochs_run": len(self.history_)}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path):
        """The trained state (LoRA: adapters and classifier only) and how to rebuild the rest."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({
            "kind": "finetune",
            "params": self.get_params(),
            "classes": self.classes_.tolist(),
            "backbone": self.backbone_info_,
            "trainable": self.classifier_.trainable_state(),
            "history": self.history_,
            "best_epoch": self.best_epoch_,
        }, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path, weights=None):
        """A saved fine-tuned model; its base weights are loaded again (``weights`` overrides the path)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(data["params"])
        if weights is not None:
            params["weights"] = str(weights)
        head = cls(**params)
        head.classes_ = np.array(data["classes"])
        head.classifier_ = head._build(len(head.classes_))
        if head.backbone_info_["weights_sha256"] != data["backbone"]["weights_sha256"]:
            raise ValueError(f"{path} was trained from weights with sha256 {data['backbone']['weights_sha256'][:12]}, "
                             f"but {head.backbone_info_['weights']} has {head.backbone_info_['weights_sha256'][:12]}")
        head.classifier_.load_trainable(data["trainable"])
        head.classifier_.eval()
        head.history_ = data["history"]
        head.best_epoch_ = data["best_epoch"]
        return head

    def save_backbone(self, path: Path | str) -> Path:
        """The fine-tuned backbone (LoRA merged) in its family's own format, for ``embedcache extract --weights``:
        a fair-esm checkpoint, UniRep .npz arrays, or a Hugging Face directory.
        """
        return self.classifier_.backbone.export(path)


def _append_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    _append_csv(tmp, rows)
    os.replace(tmp, path)


def _trim_steps(path: Path, last_epoch: int) -> None:
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= last_epoch]
    _write_csv(path, rows)


def _plot_curves(folder: Path) -> None:
    """curves.png: loss per optimiser step and per epoch, validation metrics, learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    steps = pd.read_csv(folder / "steps.csv")
    epochs = pd.read_csv(folder / "epochs.csv")
    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_ax.plot(steps["step"], steps["loss"], alpha=0.3, lw=0.8, label="training, per step")
    loss_ax.plot(steps["step"], steps["loss"].rolling(10, min_periods=1).mean(), lw=1.2,
                 label="training, mean of 10 steps")
    ends = steps.groupby("epoch")["step"].max()
    loss_ax.plot(ends.loc[epochs["epoch"]].to_numpy(), epochs["train_loss"], "o-", label="training, epoch mean")
    if "val_loss" in epochs:
        loss_ax.plot(ends.loc[epochs["epoch"]].to_numpy(), epochs["val_loss"], "s--", label="validation")
        for m in ("accuracy", "macro_f1", "mcc"):
            metric_ax.plot(epochs["epoch"], epochs[f"val_{m}"], "o-", label=m)
        metric_ax.legend(fontsize=8)
    loss_ax.set(xlabel="optimiser step", ylabel="cross-entropy", title="loss")
    loss_ax.legend(fontsize=8)
    metric_ax.set(xlabel="epoch", ylabel="validation", title="validation metrics")
    lr_ax.plot(steps["step"], steps["lr"])
    lr_ax.set(xlabel="optimiser step", ylabel="learning rate (backbone)", title="schedule")
    fig.tight_layout()
    tmp = folder / "curves.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, folder / "curves.png")
