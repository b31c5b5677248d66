"""The one training loop of the torch heads (attention pooling, fine-tuning) and what it writes.

A head supplies a :class:`Task`: its module, optimiser parameter groups, one epoch's
optimiser steps (batches drawn with the epoch's generator), the summed loss of a batch, and
probabilities for the validation set. :func:`train` runs epochs with early stopping on a
validation metric (ties broken by the lower validation loss) and restores the best epoch.

Randomness: every epoch draws from generators seeded by ``(seed, epoch)`` (numpy for
shuffling and crops, torch's for dropout), inside :func:`isolated_rng`, so the caller's
global torch and numpy random states are the same after a fit as before it, two fits with
the same seed are identical, and a fit resumed after epoch k follows the uninterrupted one.

With a checkpoint folder every finished epoch is saved atomically (``last.pt``: weights,
optimiser moments, step, history, best epoch so far) and a fit with the same fingerprint
(settings and data) continues after the last saved epoch; ``steps.csv``, ``epochs.csv``
and ``curves.png`` are rewritten whole after every epoch. The learning rate is a pure
function of the optimiser step, so a resumed schedule needs nothing but the step.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedcache.atomic import atomic_path, write_text

from .base import VALIDATION_METRICS
from .metrics import score

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


def class_weights(targets: np.ndarray, n_classes: int, mode: str | None) -> torch.Tensor | None:
    """``balanced``: loss weights by inverse class frequency (as scikit-learn defines them);
    multi-label (2-D targets): each label's positives weighted by its negatives/positives."""
    if mode is None:
        return None
    if mode != "balanced":
        raise ValueError(f"class_weight must be None or 'balanced', not {mode!r}")
    if targets.ndim == 2:
        positives = targets.sum(0).astype(np.float64)
        return torch.tensor((len(targets) - positives) / np.maximum(positives, 1), dtype=torch.float32)
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def head_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
              multilabel: bool) -> torch.Tensor:
    """Summed over proteins: cross-entropy over classes, or (multi-label) binary cross-entropy
    summed over the labels, ``weight`` then weighting each label's positives."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight,
                                                  reduction="sum")
    return F.cross_entropy(logits, target, weight=weight, reduction="sum")


def output_proba(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Class probabilities (softmax), or each label's own probability (sigmoid)."""
    return torch.sigmoid(logits.float()) if multilabel else torch.softmax(logits.float(), dim=1)


def validation_record(proba: np.ndarray, targets: np.ndarray, weight: torch.Tensor | None) -> dict:
    """Validation loss (weighted like training) and metrics of predicted probabilities.

    Multi-label metrics are those of the sets at threshold 0.5 (the per-label thresholds are
    chosen on the validation fold after training).
    """
    if targets.ndim == 2:
        from .multilabel import DEFAULT_THRESHOLD, label_sets

        p = torch.from_numpy(proba).double().clamp(1e-12, 1 - 1e-12)
        y = torch.from_numpy(targets).double()
        pos = 1.0 if weight is None else weight.double()
        loss = -(pos * y * torch.log(p) + (1 - y) * torch.log1p(-p)).sum(1).mean()
        record = {"val_loss": float(loss)}
        pred = label_sets(proba, DEFAULT_THRESHOLD).astype(np.int64)
    else:
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


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay: bool) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then constant, or with ``decay`` linear decay to 0
    at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def seed_from(random_state: int | None) -> int:
    """The seed a fit uses: ``random_state``, or fresh entropy (not the global RNG) when None."""
    if random_state is None:
        # Without an argument, SeedSequence draws its entropy as one int.
        return int(cast(int, np.random.SeedSequence().entropy) % (1 << 63))
    return int(random_state)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] % (1 << 63))


def seed_torch(seed: int, device: torch.device | str | None = None) -> None:
    """Seed the generators this fit draws from: the CPU's, and the training device's.

    Not ``torch.manual_seed``, which also seeds every CUDA device (queued until CUDA starts,
    where it would change the caller's stream after the fit).
    """
    torch.random.default_generator.manual_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.default_generators[_cuda_index(device)].manual_seed(seed)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@contextlib.contextmanager
def isolated_rng(device: torch.device | str | None = None) -> Iterator[None]:
    """Seeding inside leaves the caller's torch (CPU and this CUDA device) RNG state as it was."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    devices = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@dataclass
class Task:
    """What a head gives the loop."""

    module: nn.Module  # put in train() for training steps; ``predict`` puts it in eval()
    param_groups: list[dict]  # optimiser groups: params, lr (the peak), weight_decay
    steps: Callable[[np.random.Generator], list[list]]  # one epoch's optimiser steps, each a list of batches
    # batch -> (summed loss, proteins, tokens)
    loss: Callable[[object, np.random.Generator], tuple[torch.Tensor, int, int]]
    state: Callable[[], dict]  # the tensors training changes (what a checkpoint holds)
    load_state: Callable[[dict], None]
    predict: Callable[[], np.ndarray] | None = None  # validation probabilities
    val_targets: np.ndarray | None = None
    val_weight: torch.Tensor | None = None  # class weights of the validation loss
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class Schedule:
    """How long and how fast; the same for every head."""

    max_epochs: int
    patience: int  # epochs without a better validation metric before stopping
    metric: str = "macro_f1"  # accuracy | macro_f1 | mcc
    warmup: float = 0.0  # share of all optimiser steps spent warming up
    decay: bool = False  # linear decay to 0 at the end of max_epochs
    clip_norm: float | None = None  # gradient norm clipping
    seed: int = 0
    log_every: float = 30.0  # seconds between progress lines within an epoch


@dataclass
class Outcome:
    history: list[dict]
    best_epoch: int
    steps: list[dict]


# curves.png costs about a second to draw: redrawn after an epoch only when this long has passed, and at the end.
PLOT_EVERY_S = 60.0


def train(task: Task, schedule: Schedule, folder: Path | None = None, fingerprint: str = "",
          description: str = "") -> Outcome:
    """Train ``task`` (see the module docstring); the module ends in eval mode with the best epoch's weights."""
    optimiser = torch.optim.AdamW(task.param_groups)
    peaks = [group["lr"] for group in optimiser.param_groups]  # the schedule scales these
    history: list[dict] = []
    step_rows: list[dict] = []
    best, best_state, stale, best_epoch, start_epoch, step = None, None, 0, 0, 1, 0
    seed = schedule.seed
    checkpoint = folder / CHECKPOINT if folder else None  # named in log lines
    saved = _load_checkpoint(folder, fingerprint, task) if folder else None
    if saved is not None and not saved["finished"]:
        try:
            optimiser.load_state_dict(saved["optimizer"])
        except (KeyError, ValueError) as err:
            log.warning("%s holds an optimiser state that does not fit (%s); training from the start",
                        checkpoint, err)
            saved = None
    if saved is not None:
        task.load_state(saved["trainable"])
        history, step_rows = list(saved["history"]), list(saved.get("steps", []))
        best_epoch = saved["best_epoch"]
        best = tuple(saved["best"]) if saved["best"] is not None else None
        best_state, stale, step = saved["best_state"], saved["stale"], saved["step"]
        seed = saved.get("seed", seed)
        start_epoch = schedule.max_epochs + 1 if saved["finished"] else saved["epoch"] + 1
        log.info("resuming from %s: %d epoch(s) done%s", checkpoint, saved["epoch"],
                 ", training had finished" if saved["finished"] else "")
    elif folder:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("steps.csv", "epochs.csv", "curves.png"):
            (folder / name).unlink(missing_ok=True)

    steps_per_epoch = None
    plotted = time.monotonic()
    for epoch in range(start_epoch, schedule.max_epochs + 1):
        started = time.perf_counter()
        rng = np.random.default_rng(epoch_seed(seed, epoch))
        seed_torch(epoch_seed(seed, epoch), task.device)
        task.module.train()
        epoch_steps = task.steps(rng)
        steps_per_epoch = len(epoch_steps)
        total_steps = steps_per_epoch * schedule.max_epochs
        warm = max(1, round(schedule.warmup * total_steps)) if schedule.warmup else 0
        losses, sizes, lrs = [], [], []
        tokens, reported = 0, started
        for batches in epoch_steps:
            factor = lr_factor(step, total_steps, warm, schedule.decay)
            for group, peak in zip(optimiser.param_groups, peaks):
                group["lr"] = peak * factor
            optimiser.zero_grad(set_to_none=True)
            summed, proteins = [], 0
            n_step = sum(_size(b) for b in batches)
            for batch in batches:
                loss, n, t = task.loss(batch, rng)
                (loss / n_step).backward()
                summed.append(loss.detach())
                proteins += n
                tokens += t
            if schedule.clip_norm:
                torch.nn.utils.clip_grad_norm_([p for g in optimiser.param_groups for p in g["params"]
                                                if p.grad is not None], schedule.clip_norm)
            optimiser.step()
            step += 1
            losses.append(torch.stack(summed).sum() / n_step)
            sizes.append(proteins)
            lrs.append(optimiser.param_groups[0]["lr"])
            if time.perf_counter() - reported > schedule.log_every:
                reported = time.perf_counter()
                log.info("epoch %d: step %d/%d, loss %.4f, %.0f tokens/s", epoch, len(losses), steps_per_epoch,
                         losses[-1].item(), tokens / (reported - started))
        # One transfer per epoch: the per-step losses as Python floats.
        values = torch.stack(losses).float().cpu().tolist() if losses else []
        first = step - len(values) + 1
        step_rows += [{"step": first + i, "epoch": epoch, "loss": v, "lr": lr, "proteins": n}
                      for i, (v, lr, n) in enumerate(zip(values, lrs, sizes))]
        train_seconds = time.perf_counter() - started
        seen = sum(sizes)
        record = {"epoch": epoch, "train_loss": sum(v * n for v, n in zip(values, sizes)) / max(1, seen),
                  "train_tokens_per_s": tokens / max(train_seconds, 1e-9)}
        if task.predict is not None:
            if task.val_targets is None:
                raise ValueError("a training task that predicts validation probabilities needs val_targets")
            record.update(validation_record(task.predict(), task.val_targets, task.val_weight))
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        log.info("%sepoch %3d  train loss %.4f%s  %.1f s", description, epoch, record["train_loss"],
                 describe_epoch(record), record["seconds"])
        stop = False
        if task.predict is not None:
            key = selection_key(record, schedule.metric)
            if best is None or key > best:
                best, best_state, stale, best_epoch = key, _copy(task.state()), 0, epoch
            else:
                stale += 1
                stop = stale >= schedule.patience
        finished = stop or epoch == schedule.max_epochs
        if folder:
            state = {"fingerprint": fingerprint, "epoch": epoch, "finished": finished, "step": step, "seed": seed,
                     "history": history, "steps": step_rows, "best": None if best is None else list(best),
                     "best_epoch": best_epoch, "stale": stale}
            if finished:
                # Only the weights a restart restores: no second copy, no optimiser moments.
                state.update(trainable=best_state or task.state(), best_state=None)
            else:
                state.update(trainable=task.state(), best_state=best_state, optimizer=optimiser.state_dict())
            plot = finished or time.monotonic() - plotted > PLOT_EVERY_S
            write_logs(folder, step_rows, history, plot)
            if plot:
                plotted = time.monotonic()
            save_checkpoint(folder, state)
        if stop:
            break
    if best_state is not None:
        task.load_state(best_state)
    elif best is None:  # no validation set: the last epoch
        best_epoch = len(history)
    task.module.eval()
    return Outcome(history, best_epoch, step_rows)


def _size(batch) -> int:
    return len(batch)


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


# -- checkpoints -----------------------------------------------------------------------------
def save_checkpoint(folder: Path, state: dict) -> None:
    with atomic_path(folder / CHECKPOINT) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(folder: Path, fingerprint: str, task: Task) -> dict | None:
    """The saved state of this very fit, or None (with a warning when a file was there but unusable)."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or "epoch" not in saved or "trainable" not in saved:
            raise ValueError("not a training checkpoint")
    except Exception as err:  # a damaged file fails in many ways: zip, pickle, storage
        log.warning("%s cannot be read (%s: %s); training from the start", path, type(err).__name__, err)
        return None
    if saved.get("fingerprint") != fingerprint:
        log.warning("%s was written for other settings or data; training from the start", path)
        return None
    own = task.state()
    theirs = saved["trainable"]
    if set(theirs) != set(own) or any(tuple(theirs[k].shape) != tuple(own[k].shape) for k in own):
        log.warning("%s holds tensors that do not fit this model; training from the start", path)
        return None
    return saved


# -- logs and curves -----------------------------------------------------------------------
def write_logs(folder: Path, steps: list[dict], epochs: list[dict], plot: bool = True) -> None:
    write_csv(folder / "steps.csv", steps)
    write_csv(folder / "epochs.csv", epochs)
    if plot and steps and epochs:
        plot_curves(folder / "curves.png", steps, epochs)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())


def plot_curves(path: Path, steps: list[dict], epochs: list[dict]) -> None:
    """Loss per optimiser step and per epoch, validation metrics, learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = np.array([r["step"] for r in steps])
    loss = np.array([r["loss"] for r in steps])
    window = min(10, len(loss))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ends = {}
    for r in steps:
        ends[r["epoch"]] = r["step"]
    epoch_end = [ends.get(r["epoch"], np.nan) for r in epochs]
    fig, (loss_ax, metric_ax, lr_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_ax.plot(step, loss, alpha=0.3, lw=0.8, label="training, per step")
    loss_ax.plot(step[window - 1:], smooth, lw=1.2, label=f"training, mean of {window} steps")
    loss_ax.plot(epoch_end, [r["train_loss"] for r in epochs], "o-", label="training, epoch mean")
    if "val_loss" in epochs[0]:
        loss_ax.plot(epoch_end, [r["val_loss"] for r in epochs], "s--", label="validation")
        for m in VALIDATION_METRICS:
            metric_ax.plot([r["epoch"] for r in epochs], [r[f"val_{m}"] for r in epochs], "o-", label=m)
        metric_ax.legend(fontsize=8, loc="best")
    loss_ax.set(xlabel="optimiser step", ylabel="cross-entropy", title="loss")
    loss_ax.legend(fontsize=8)
    metric_ax.set(xlabel="epoch", ylabel="validation", title="validation metrics")
    lr_ax.plot(step, [r["lr"] for r in steps])
    lr_ax.set(xlabel="optimiser step", ylabel="learning rate", title="schedule")
    lr_ax.set_ylim(bottom=0)  # a constant rate should read as constant, not as noise around it
    fig.tight_layout()
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

