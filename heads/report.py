"""Run outputs: predictions, metrics, the comparison table, paired tests and plots.

A run directory holds::

    config.json        the run's settings, class names, backbone identity and fingerprint;
                       written last, with the manifest's sha256: a run without it did not finish
    predictions.csv    one row per protein and method: truth, fold, prediction, probabilities
    metrics.json       every metric of every method (overall, per class, per group), intervals, tests
    comparison.md/.csv the side-by-side table
    report.html        the run on one self-contained page: tables, paired tests, figures inline, provenance
    splits.json        per split: sizes, time, what validation chose, training curves
    plots/             metrics per method, confusion matrices, per-class F1, training curves (PNG)
    models/            fitted heads, one file per split, manifest.json (file, sha256, classes of
                       each) and training_keys.txt (for `heads predict`)
    work/              fine-tuning checkpoints and per-step/per-epoch logs and curves, per split
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from embedcache.atomic import atomic_path, write_json, write_text

from .datasets import LabeledSet
from .evaluate import MethodResult
from .htmlreport import context_from_config, legacy_figures, report_record, write_report
from .metrics import bootstrap_ci, classification_metrics, mcnemar, paired_bootstrap
from .rundir import json_default

log = logging.getLogger(__name__)


def method_metrics(result: MethodResult, data: LabeledSet, n_boot: int = 1000, seed: int = 0) -> dict:
    mask = result.predicted()
    y, proba = data.labels[mask], result.proba[mask]
    groups = data.groups[mask] if data.groups is not None else None
    out = classification_metrics(y, proba, data.classes, groups)
    out["ci95"] = bootstrap_ci(y, proba.argmax(1), data.n_classes, n_boot=n_boot, seed=seed)
    return out


def paired_tests(results: list[MethodResult], data: LabeledSet, baseline: str, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Each method against ``baseline`` on the proteins both predicted."""
    base = next(r for r in results if r.name == baseline)
    tests = {}
    for other in results:
        if other.name == baseline:
            continue
        mask = base.predicted() & other.predicted()
        y = data.labels[mask]
        a, b = other.proba[mask].argmax(1), base.proba[mask].argmax(1)
        tests[f"{other.name} vs {baseline}"] = {
            "n": int(mask.sum()),
            "mcnemar": mcnemar(y, a, b),
            "macro_f1_difference": paired_bootstrap(y, a, b, data.n_classes, "macro_f1", n_boot, seed),
            "accuracy_difference": paired_bootstrap(y, a, b, data.n_classes, "accuracy", n_boot, seed),
        }
    return tests


def comparison_table(metrics: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, m in metrics.items():
        row = {"method": name, "n": m["n"]}
        for key in ("accuracy", "macro_f1", "mcc"):
            lo, hi = m["ci95"][key]
            row[key] = m[key]
            row[f"{key}_ci95"] = f"{lo:.3f}-{hi:.3f}"
        for key in ("roc_auc", "pr_auc"):
            if key in m:
                row[key] = m[key]
        for group, g in m.get("per_group", {}).items():
            row[f"acc_{group}"] = g["accuracy"]
            row[f"mcc_{group}"] = g["mcc"]
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, title: str, notes: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)

    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(fmt(v) for v in row.values) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_run(out: Path, config: dict, data: LabeledSet, results: list[MethodResult], title: str,
              notes: list[str] | None = None, baseline: str | None = None, n_boot: int = 1000,
              seed: int = 0) -> dict:
    """Every output of a run; config.json last (its ``manifest_sha256`` marks a finished run).

    metrics.json depends only on the predictions, ``n_boot`` and ``seed``: no times, no dates.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics = {r.name: method_metrics(r, data, n_boot, seed) for r in results}
    if baseline is None and len(results) > 1:
        # Compare everything with the best method by macro-F1.
        baseline = max(metrics, key=lambda n: metrics[n]["macro_f1"])
    tests = paired_tests(results, data, baseline, n_boot, seed) if baseline else {}
    table = comparison_table(metrics)
    notes = list(notes or [])
    run_notes = list(notes)  # the report shows the paired tests as a table of their own
    for name, test in tests.items():
        d = test["macro_f1_difference"]
        notes.append(f"{name}: macro-F1 difference {d['difference']:+.3f} (95% CI {d['ci95'][0]:+.3f} to "
                     f"{d['ci95'][1]:+.3f}, paired bootstrap p={d['p_value']:.3f}); "
                     f"McNemar p={test['mcnemar']['p_value']:.3g}")
    _write_json(out / "metrics.json", {"methods": metrics, "paired_tests": tests})
    _write_json(out / "splits.json", {r.name: r.splits for r in results})
    with atomic_path(out / "predictions.csv") as tmp:
        pd.concat([r.frame(data) for r in results]).to_csv(tmp, index=False)
    with atomic_path(out / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(out / "comparison.md", markdown_table(table, title, notes))
    plot_run(out / "plots", data, results, metrics)
    context, figures = context_from_config(config, len(data)), legacy_figures(out)
    # The page is written from config.json as it will be, so that `heads report` rebuilds it exactly.
    config = {**config, "report": report_record(context, figures, run_notes, out), "classes": data.classes}
    write_report(out, context, figures, metrics, tests, table, config, run_notes)
    write_config(out, config, data.classes)
    return {"metrics": metrics, "tests": tests, "table": table}


def write_config(out: Path, config: dict, classes: list[str]) -> None:
    _write_json(out / "config.json", {**config, "classes": classes})


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, default=json_default)


def plot_run(folder: Path, data: LabeledSet, results: list[MethodResult], metrics: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = list(metrics)
    # Confusion matrices, rows normalised to recall, counts written in each cell.
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        counts = np.array(metrics[name]["confusion"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(data.classes)):
            for j in range(len(data.classes)):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(data.classes)), data.classes, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(data.classes)), data.classes, fontsize=7)
        ax.set_title(f"{name}\nacc {metrics[name]['accuracy']:.3f}, MCC {metrics[name]['mcc']:.3f}", fontsize=9)
        ax.set_xlabel("predicted")
    axes[0][0].set_ylabel("true")
    fig.tight_layout()
    _savefig(fig, folder / "confusion_matrices.png")
    plt.close(fig)

    # Per-class F1, one bar per method.
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(data.classes) * max(1, len(names)) / 2), 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        f1 = [metrics[name]["per_class"][c]["f1"] for c in data.classes]
        ax.bar(np.arange(len(data.classes)) + k * width, f1, width, label=name)
    ax.set_xticks(np.arange(len(data.classes)) + 0.4 - width / 2, data.classes, rotation=30, ha="right")
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=min(4, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("per-class F1")
    fig.tight_layout()
    _savefig(fig, folder / "per_class_f1.png")
    plt.close(fig)

    # Headline metrics per method with their bootstrap intervals (a learning-rate sweep reads here).
    keys = ("accuracy", "macro_f1", "mcc")
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) * len(keys) / 2), 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = np.array([metrics[name][key] for key in keys])
        ci = np.array([metrics[name]["ci95"][key] for key in keys]).T
        ax.bar(np.arange(len(keys)) + k * width, values, width, label=name,
               yerr=np.abs(ci - values), capsize=3)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, ["accuracy", "macro-F1", "MCC"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (95% bootstrap interval)")
    ax.legend(fontsize=8, ncol=min(4, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("methods on the same proteins and folds")
    fig.tight_layout()
    _savefig(fig, folder / "comparison.png")
    plt.close(fig)

    # Training curves of heads that record them.
    for result in results:
        curves = [s for s in result.splits if s.get("history")]
        if not curves:
            continue
        fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for s in curves:
            h = pd.DataFrame(s["history"])
            line = loss_ax.plot(h["epoch"], h["train_loss"], alpha=0.6)[0]
            if "val_loss" in h:
                loss_ax.plot(h["epoch"], h["val_loss"], "--", color=line.get_color(), alpha=0.6)
                metric_ax.plot(h["epoch"], h["val_macro_f1"], color=line.get_color(), alpha=0.6,
                               label=s["split"] if len(curves) <= 6 else None)
                if "best_epoch" in s:
                    metric_ax.axvline(s["best_epoch"], color=line.get_color(), alpha=0.2)
        loss_ax.set(xlabel="epoch", ylabel="loss", title="training (solid) and validation (dashed) loss")
        metric_ax.set(xlabel="epoch", ylabel="validation macro-F1", title="validation macro-F1 (line: best epoch)")
        if len(curves) <= 6:
            metric_ax.legend(fontsize=7)
        fig.suptitle(result.name)
        fig.tight_layout()
        _savefig(fig, folder / f"training_curves_{result.name}.png")
        plt.close(fig)


def _savefig(fig, path: Path) -> None:
    with atomic_path(path, keep_suffix=True) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
