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
* Training runs in the loop every torch head shares (:func:`heads.training.train`): early
  stopping on a validation metric with the best epoch restored, and with ``checkpoint_dir``
  an atomic checkpoint after every epoch that a fit with the same settings and data resumes
  from, so a crash (kill -9) costs at most the epoch in progress; ``steps.csv``,
  ``epochs.csv`` and ``curves.png`` in the same folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from embedcache.atomic import atomic_path, write_json
from embedcache.backbone import Backbone
from embedcache.extract import ExtractConfig, default_threads, load_backbone, pick_device, torch_threads

from .attention import AttentionPooling, ResidueAttention, usable_heads
from .base import (
    METRIC,
    Head,
    boolean,
    check_labels,
    class_weight_check,
    integer,
    is_multilabel,
    number,
    one_of,
    path_check,
)
from .features import length_batches
from .training import Schedule, Task, class_weights, head_loss, isolated_rng, output_proba, seed_torch, train

log = logging.getLogger(__name__)

MODES = ("full", "top", "lora", "frozen")
POOLINGS = ("mean", "attention")
CROPS = ("n_terminal", "ends", "random")
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


def crop_positions(length: int, max_residues: int | None, policy: str) -> np.ndarray:
    """The 0-based sequence indices :func:`crop_sequence` keeps at prediction (no ``rng``)."""
    if not max_residues or length <= max_residues:
        return np.arange(length)
    if policy == "ends":
        head = (max_residues + 1) // 2
        return np.concatenate([np.arange(head), np.arange(length - (max_residues - head), length)])
    return np.arange(max_residues)


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
            self.head: nn.Module = AttentionPooling(dim, n_classes, usable_heads(dim, attention_heads), hidden, dropout)
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

    def forward_with_attention(self, sequences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the attention pooling's weights (B, residues, heads); pooling must be attention."""
        with self.backbone.autocast():
            states, mask = self.backbone.residue_states(sequences, False)
        head = self.head
        if not isinstance(head, AttentionPooling):
            raise ValueError(f"this model pools residues by their {self.pooling}: it has no attention weights")
        pooled, attention = head.pool(states.float(), mask)
        return head.classifier(pooled), attention

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What training changes: parameters that require gradients, and the head's buffers."""
        state = {name: p.detach().cpu().clone() for name, p in self.named_parameters() if p.requires_grad}
        state.update({f"head.{name}": b.detach().cpu().clone() for name, b in self.head.named_buffers()})
        return state

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        own: dict[str, torch.Tensor] = dict(self.named_parameters())
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

    kind = "finetune"
    title = "fine-tuned backbone"
    input = "sequence"
    file_suffix = ".finetune.pt"
    threads_param = "threads"
    fitted_attributes = ("classes_", "classifier_")
    constraints: ClassVar[dict] = {
        "model": lambda v: None if v is None or isinstance(v, str) else "a model name or null",
        "weights": path_check, "mode": one_of(*MODES), "top_layers": integer(1), "lora_rank": integer(1),
        "lora_alpha": number(0, low_open=True), "lora_dropout": number(0, 1, high_open=True),
        "lora_feed_forward": boolean, "pooling": one_of(*POOLINGS), "dropout": number(0, 1, high_open=True),
        "attention_heads": integer(1), "lr": number(0, low_open=True), "head_lr": number(0, low_open=True),
        "weight_decay": number(0), "warmup": number(0, 1, high_open=True), "max_epochs": integer(1),
        "patience": integer(1), "batch_tokens": integer(1, none_ok=True), "max_batch": integer(1),
        "grad_accum": integer(1), "clip_norm": number(0, low_open=True, none_ok=True),
        "class_weight": class_weight_check(), "crop": integer(1, none_ok=True), "crop_policy": one_of(*CROPS),
        "precision": lambda v: one_of("auto", "fp32", "bf16")(v) and (
            "auto, fp32 or bf16 (int8 is for extraction only: training does not run in int8)"),
        "grad_checkpointing": boolean, "metric": METRIC,
        "device": lambda v: None if isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda", "mps")
        else "auto, cpu, cuda or cuda:N",
        "threads": integer(1, none_ok=True), "checkpoint_dir": path_check, "trust_weights": boolean,
        "random_state": integer(0),
    }

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
        self.lora_rank = lora_rank  # rank of the LoRA adapters
        self.lora_alpha = lora_alpha  # LoRA scales its update by alpha / rank
        self.lora_dropout = lora_dropout  # dropout on the LoRA adapters' input
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
        self.grad_checkpointing = grad_checkpointing  # ESM-2: recompute layer activations (less memory, 1 more forward)
        self.metric = metric  # early stopping: accuracy | macro_f1 | mcc
        self.device = device  # auto | cpu | cuda | cuda:N
        self.threads = threads  # CPU threads [the cores free when it starts]
        self.checkpoint_dir = checkpoint_dir  # per-epoch checkpoints and training logs; enables resume
        self.trust_weights = trust_weights  # allow pickled objects in the weights file
        self.random_state = random_state  # seed of the classifier's initial weights, shuffling, crops and dropout

    # -- set-up --------------------------------------------------------------------------
    def validate_params(self) -> None:
        super().validate_params()
        if self.model is None and self.weights is None:
            raise ValueError("finetune needs a backbone: --model NAME or --weights PATH")

    def _build(self, n_classes: int) -> SequenceClassifier:
        device = pick_device(self.device)
        # LoRA's adapters and the classifier are drawn from random_state alone; the caller's
        # torch generators are left as they were.
        with isolated_rng(device):
            seed_torch(self.random_state, device)
            backbone = load_backbone(ExtractConfig(model=None if self.weights else self.model, weights=self.weights,
                                                   trust_weights=self.trust_weights))
            if self.grad_checkpointing and not backbone.supports_grad_checkpointing:
                raise ValueError(f"gradient checkpointing is not implemented for {backbone.architecture} "
                                 f"({backbone.family}); set finetune.grad_checkpointing=false")
            backbone.to(device)
            backbone.set_precision(backbone.pick_precision(self.precision, device, training=True))
            seed_torch(self.random_state, device)  # whatever loading drew from the generator
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

    # -- training ------------------------------------------------------------------------
    def fit(self, X, y, eval_set=None):
        self.validate_params()
        sequences = [str(s) for s in X]
        if not sequences:
            raise ValueError("finetune got no proteins")
        classes, targets, val_targets = check_labels(y, eval_set, len(sequences))
        val = None if eval_set is None else [str(s) for s in eval_set[0]]
        folder = Path(self.checkpoint_dir) if self.checkpoint_dir else None
        device = pick_device(self.device)
        with isolated_rng(device):
            # Before building: LoRA adapters draw their initial weights as they are attached.
            seed_torch(self.random_state, device)
            self.classes_ = classes
            self.multilabel_ = is_multilabel(targets)
            self.classifier_ = classifier = self._build(len(classes))
            # After loading: a checkpoint resumes only on the very weights it was trained from.
            fingerprint = self._fingerprint(sequences, targets, None if val is None else (val, val_targets))
            with torch_threads(self.threads or default_threads()):
                outcome = self._train(classifier, sequences, targets, val, val_targets, folder, fingerprint)
        self.history_ = outcome.history
        self.best_epoch_ = outcome.best_epoch
        return self

    def _train(self, classifier, sequences, targets, val, val_targets, folder, fingerprint):
        device = classifier.backbone.device
        extra = classifier.backbone.extra_tokens
        weight = class_weights(targets, len(self.classes_), self.class_weight)
        train_weight = None if weight is None else weight.to(device)
        lengths = np.array([min(len(s), self.crop or 1 << 30) for s in sequences]) + extra
        batches = length_batches(lengths, self._budget(), self.max_batch,
                                 min_size=2 if self.pooling == "attention" else 1)

        def steps(rng):
            order = rng.permutation(len(batches))
            return [[batches[b] for b in order[i:i + self.grad_accum]] for i in range(0, len(order), self.grad_accum)]

        def loss(idx, rng):
            batch = [crop_sequence(sequences[i], self.crop, self.crop_policy, rng) for i in idx]
            logits = classifier(batch)
            target = torch.from_numpy(targets[idx]).to(device)
            return (head_loss(logits, target, train_weight, self.multilabel_), len(idx),
                    sum(len(s) + extra for s in batch))

        n_trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
        log.info("fine-tuning %s (%s, mode %s): %s trainable parameters, %d proteins in %d batches, "
                 "%d optimiser steps per epoch, %s on %s", self.backbone_info_["model"],
                 self.backbone_info_["architecture"], self.mode, f"{n_trainable:,}", len(sequences), len(batches),
                 -(-len(batches) // self.grad_accum), classifier.backbone.precision, device)
        task = Task(module=classifier, param_groups=self._param_groups(classifier), steps=steps, loss=loss,
                    state=classifier.trainable_state, load_state=classifier.load_trainable,
                    predict=None if val is None else (lambda: self._proba(val)), val_targets=val_targets,
                    val_weight=weight, device=device)
        schedule = Schedule(max_epochs=self.max_epochs, patience=self.patience, metric=self.metric,
                            warmup=self.warmup, decay=True, clip_norm=self.clip_norm, seed=self.random_state)
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "params.json", self._result_params(), default=str)
        return train(task, schedule, folder, fingerprint)

    def _param_groups(self, classifier: SequenceClassifier) -> list[dict]:
        """AdamW groups: backbone and classifier learning rates; no decay on biases and norms."""
        groups: dict[tuple[float, float], list] = {}
        for name, p in classifier.named_parameters():
            if not p.requires_grad:
                continue
            lr = self.head_lr if name.startswith("head.") else self.lr
            decay = self.weight_decay if p.ndim >= 2 else 0.0
            groups.setdefault((lr, decay), []).append(p)
        return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]

    def _fingerprint(self, sequences, targets, val) -> str:
        digest = hashlib.sha256(json.dumps(self._result_params(), sort_keys=True, default=str).encode())
        for seqs, labels in ((sequences, targets), val or ((), ())):
            digest.update("\n".join(seqs).encode())
            labels = np.asarray(labels, dtype=np.int64)
            digest.update(labels.tobytes())
            if labels.ndim == 2:  # a label matrix: its shape too (single-label fingerprints stay as they were)
                digest.update(str(labels.shape).encode())
        digest.update(self.backbone_info_["weights_sha256"].encode())
        return digest.hexdigest()

    def _result_params(self) -> dict:
        return {k: v for k, v in self.get_params().items() if k not in _RUNTIME_PARAMS}

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
                out[idx] = output_proba(logits, getattr(self, "multilabel_", False)).cpu().numpy()
        return out

    def predict_proba(self, X):
        self.check_fitted()
        with torch_threads(self.threads or default_threads()):
            return self._proba(list(X))

    def attention(self, X) -> ResidueAttention:
        """Probabilities and each protein's attention weights over the residues it saw (pooling="attention").

        Residue states are aligned to residues (BOS/EOS removed by the backbone), so weight j
        belongs to the j-th residue of the cropped sequence, mapped back to its place in the
        whole sequence.
        """
        self.check_fitted()
        if self.pooling != "attention":
            raise ValueError(f"this fine-tuned model pools residues by their {self.pooling}, so it has no attention "
                             "weights; only finetune.pooling=attention (or the attention head) has them")
        sequences = [str(s) for s in X]
        classifier = self.classifier_
        classifier.eval()
        cropped = [crop_sequence(s, self.crop, self.crop_policy) for s in sequences]
        lengths = np.array([len(s) for s in cropped]) + classifier.backbone.extra_tokens
        proba = np.zeros((len(cropped), len(self.classes_)), dtype=np.float32)
        weights: list[np.ndarray] = [np.zeros((0, 0), dtype=np.float32)] * len(cropped)
        with torch_threads(self.threads or default_threads()), torch.inference_mode():
            for idx in length_batches(lengths, self._budget(), self.max_batch):
                logits, attention = classifier.forward_with_attention([cropped[i] for i in idx])
                proba[idx] = output_proba(logits, getattr(self, "multilabel_", False)).cpu().numpy()
                for row, i in enumerate(idx):
                    weights[i] = attention[row, :len(cropped[i])].T.float().cpu().contiguous().numpy()
        positions = [crop_positions(len(s), self.crop, self.crop_policy) for s in sequences]
        return ResidueAttention(proba, weights, positions)

    def selection_summary(self):
        return {"best_epoch": self.best_epoch_, "epochs_run": len(self.history_)}

    # -- persistence ---------------------------------------------------------------------
    def save(self, path):
        """The trained state (LoRA: adapters and classifier only) and how to rebuild the rest."""
        self.check_fitted()
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save({
                **self.payload(),
                "params": self.get_params(),
                "classes": self.classes_.tolist(),
                "backbone": self.backbone_info_,
                "trainable": self.classifier_.trainable_state(),
                "history": self.history_,
                "best_epoch": self.best_epoch_,
            }, tmp)
        return path

    @classmethod
    def load(cls, path, weights=None, **options) -> FinetuneHead:
        """A saved fine-tuned model; its base weights are loaded again (``weights`` overrides the path)."""
        return super().load(path, weights=weights, **options)

    @classmethod
    def from_saved(cls, data, path, weights=None, **options):
        if options:
            raise TypeError(f"unexpected options for a fine-tuned head: {', '.join(sorted(options))}")
        params = dict(data["params"])
        if weights is not None:
            params["weights"] = str(weights)
        head = cls(**{k: v for k, v in params.items() if k in cls.param_names()})
        head.classes_ = np.array(data["classes"])
        with isolated_rng(pick_device(head.device)):
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

