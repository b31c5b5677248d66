"""Run outputs: predictions, metrics, the comparison table, paired tests and plots.

A run directory holds::

    config.json        the run's settings, class names, backbone identity and fingerprint;
                       written last, with the manifest's sha256: a run without it did not finish
    predictions.csv    one row per protein and method: truth, fold, prediction, probabilities
    metrics.json       every metric of every method (overall, per class, per group), intervals, tests;
                       multi-label runs also the most frequent label set's scores ("baseline")
    comparison.md/.csv the side-by-side table
    report.html        the run on one self-contained page: tables, paired tests, figures inline, provenance
    splits.json        per split: sizes, time, what validation chose, training curves
    plots/             every figure (heads.figures), each as SVG and as PNG at 200 dpi: methods
                       compared, confusion matrices, per class and group, ROC and precision-recall,
                       training curves, accuracy by length, the embedding map (multi-label: per
                       label, per-label curves, Jaccard by length, no confusion matrices)
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
from .evaluate import MethodResult, scored_rows
from .figstyle import FigureContext
from .figures import draw_run
from .htmlreport import context_from_config, report_record, write_report
from .metrics import (
    MULTILABEL_INTERVALS,
    bootstrap_ci,
    bootstrap_per_class_f1,
    classification_metrics,
    macro_class_indices,
    majority_set_baseline,
    mcnemar,
    multilabel_metrics,
    paired_bootstrap,
    paired_multilabel,
)
from .rundir import json_default

log = logging.getLogger(__name__)


def method_metrics(result: MethodResult, data: LabeledSet, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every metric of one method on the proteins it predicted, with bootstrap intervals.

    Macro-F1 and its intervals average over the classes present among those proteins
    (``macro_classes``), for every method and the reference alike.
    """
    mask = result.predicted()
    groups = data.groups[mask] if data.groups is not None else None
    if data.multilabel:
        if result.thresholds is None:
            raise ValueError(f"{result.name}: multi-label probabilities without per-label thresholds; its predicted "
                             "label sets are unknown")
        return multilabel_metrics(data.labels[mask], result.proba[mask], result.sets()[mask], data.classes,
                                  result.thresholds[mask], groups, n_boot, seed)
    y, proba = data.labels[mask], result.proba[mask]
    pred = proba.argmax(1)
    out = classification_metrics(y, proba, data.classes, groups)
    present = macro_class_indices(y, data.n_classes)
    out["ci95"] = bootstrap_ci(y, pred, data.n_classes, n_boot=n_boot, seed=seed, classes=present)
    for c, interval in zip(data.classes, bootstrap_per_class_f1(y, pred, data.n_classes, n_boot, seed)):
        out["per_class"][c]["f1_ci95"] = (float(interval[0]), float(interval[1]))
    if groups is not None:
        for group, g in out["per_group"].items():
            inside = groups.astype(str) == group
            present = np.array([data.classes.index(c) for c in g["classes"]])
            g["ci95"] = bootstrap_ci(y[inside], pred[inside], data.n_classes, n_boot=n_boot, seed=seed,
                                     classes=present)
    return out


def paired_tests(results: list[MethodResult], data: LabeledSet, pairs: list[tuple[str, str]], n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Each pair (a, b) of methods, a against b, on the proteins both predicted; keys "a vs b".

    Single-label: exact McNemar, and paired bootstraps of the macro-F1 and accuracy differences.
    Multi-label (no McNemar: a set can be partly right): the per-protein Jaccard difference
    (paired bootstrap of its mean, and an exact sign test) and the macro-F1 difference by
    paired bootstrap. Macro-F1 averages over the classes present among the proteins tested.
    """
    by_name = {r.name: r for r in results}
    tests = {}
    for first, second in pairs:
        other, base = by_name[first], by_name[second]
        mask = base.predicted() & other.predicted()
        y = data.labels[mask]
        present = macro_class_indices(y, data.n_classes)
        if data.multilabel:
            tests[f"{first} vs {second}"] = {
                "n": int(mask.sum()),
                **paired_multilabel(y, other.sets()[mask], base.sets()[mask], present, n_boot, seed),
                "macro_classes": [data.classes[k] for k in present],
            }
            continue
        a, b = other.proba[mask].argmax(1), base.proba[mask].argmax(1)
        tests[f"{first} vs {second}"] = {
            "n": int(mask.sum()),
            "mcnemar": mcnemar(y, a, b),
            "macro_f1_difference": paired_bootstrap(y, a, b, data.n_classes, "macro_f1", n_boot, seed, present),
            "accuracy_difference": paired_bootstrap(y, a, b, data.n_classes, "accuracy", n_boot, seed),
            "macro_classes": [data.classes[k] for k in present],
        }
    return tests


def paired_note(name: str, test: dict) -> str:
    """One paired test as a line of the notes."""
    d = test["macro_f1_difference"]
    text = (f"{name}: macro-F1 difference {d['difference']:+.3f} (95% CI {d['ci95'][0]:+.3f} to "
            f"{d['ci95'][1]:+.3f}, paired bootstrap p={d['p_value']:.3f}); ")
    if "jaccard_difference" in test:
        j = test["jaccard_difference"]
        return text + (f"per-protein Jaccard difference {j['difference']:+.3f} (95% CI {j['ci95'][0]:+.3f} to "
                       f"{j['ci95'][1]:+.3f}, paired bootstrap p={j['p_value']:.3f}; sign test "
                       f"p={test['sign_test']['p_value']:.3g})")
    return text + f"McNemar p={test['mcnemar']['p_value']:.3g}"


def macro_notes(metrics: dict[str, dict], data: LabeledSet) -> list[str]:
    """Which classes macro-averages leave out (none of the scored proteins has them), per set of methods."""
    kind = "labels" if data.multilabel else "classes"
    errors = ("against micro-F1, Jaccard, exact-set accuracy and Hamming loss" if data.multilabel
              else "as an error, against the true class's recall and the accuracy")
    by_left: dict[tuple[str, ...], list[str]] = {}
    for name, m in metrics.items():
        left = tuple(c for c in data.classes if c not in set(m.get("macro_classes", data.classes)))
        by_left.setdefault(left, []).append(name)
    notes = []
    for left, names in by_left.items():
        if not left:
            continue
        who = "" if len(names) == len(metrics) else f" of {', '.join(names)}"
        notes.append(f"macro-F1{who} averages over the {data.n_classes - len(left)} {kind} the scored proteins have; "
                     f"left out, as no scored protein has them: {', '.join(left)} (predicting them still counts "
                     f"{errors})")
    return notes


def comparison_table(metrics: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for name, m in metrics.items():
        if m.get("multilabel"):
            rows.append(_multilabel_row(name, m))
            continue
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


def _multilabel_row(name: str, m: dict) -> dict:
    row: dict = {"method": name, "n": m["n"]}
    for key in MULTILABEL_INTERVALS:
        lo, hi = m["ci95"][key]
        row[key] = m[key]
        row[f"{key}_ci95"] = f"{lo:.3f}-{hi:.3f}"
    row["predicted_cardinality"] = m["predicted_cardinality"]
    for key in ("mean_roc_auc", "mean_pr_auc"):
        row[key] = np.nan if m.get(key) is None else m[key]
    for group, g in m.get("per_group", {}).items():
        row[f"macro_f1_{group}"] = g["macro_f1"]
        row[f"jaccard_{group}"] = g["jaccard"]
    return row


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
              seed: int = 0, context: FigureContext | None = None, features: np.ndarray | None = None,
              figures: bool = True, pairs: list[tuple[str, str]] | None = None) -> dict:
    """Every output of a run; config.json last (its ``manifest_sha256`` marks a finished run).

    metrics.json depends only on the predictions, ``n_boot`` and ``seed``: no times, no dates.
    ``context`` says in every figure's title what the run is; ``features`` (pooled embeddings in
    ``data``'s order) give the embedding map. Paired tests: every method against ``baseline``
    (the best by macro-F1 when None), then ``pairs`` (a, b) not already tested. The returned
    dict's "figures" lists the figures drawn.
    """
    out.mkdir(parents=True, exist_ok=True)
    metrics = {r.name: method_metrics(r, data, n_boot, seed) for r in results}
    if baseline is None and len(results) > 1:
        # Compare everything with the best method by macro-F1.
        baseline = max(metrics, key=lambda n: metrics[n]["macro_f1"])
    tested = [(r.name, baseline) for r in results if baseline and r.name != baseline]
    for a, b in pairs or []:
        if (a, b) not in tested and (b, a) not in tested and a != b:
            tested.append((a, b))
    tests = paired_tests(results, data, tested, n_boot, seed)
    table = comparison_table(metrics)
    notes = list(notes or [])
    notes += macro_notes(metrics, data)
    run_notes = list(notes)  # the report shows the paired tests as a table of their own
    baseline_scores = None
    if data.multilabel:  # the report's headline says both
        scored = data.labels[scored_rows(results, len(data))]
        baseline_scores = majority_set_baseline(scored, data.classes)
        notes.append(f"labels per protein: {scored.sum(1).mean():.2f} true (all {len(scored)} scored proteins), "
                     "predicted: the predicted_cardinality column")
    notes += [paired_note(name, test) for name, test in tests.items()]
    saved = {"methods": metrics, "paired_tests": tests}
    if baseline_scores is not None:
        saved["baseline"] = {"majority_set": baseline_scores}
    _write_json(out / "metrics.json", saved)
    _write_json(out / "splits.json", {r.name: r.splits for r in results})
    with atomic_path(out / "predictions.csv") as tmp:
        pd.concat([r.frame(data) for r in results]).to_csv(tmp, index=False)
    with atomic_path(out / "comparison.csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = table.assign(method=[_shown_name(n, context) for n in table["method"]])
    write_text(out / "comparison.md", markdown_table(shown, title, notes))
    if context is None:
        context = context_from_config(config, len(data))
    drawn = draw_run(out / "plots", context, data, results, metrics, features) if figures else []
    # The page is written from config.json as it will be, so that `heads report` rebuilds it exactly.
    config = {**config, "report": report_record(context, drawn, run_notes, out), "classes": data.classes}
    write_report(out, context, drawn, metrics, tests, table, config, run_notes,
                 baseline=saved.get("baseline"))
    write_config(out, config, data.classes)
    return {"metrics": metrics, "tests": tests, "table": table, "figures": drawn}


def _shown_name(name: str, context: FigureContext | None) -> str:
    """The reference tool by its name in tables a person reads; heads keep their method names."""
    if name == "reference" and context is not None and context.reference != "reference":
        return f"{context.reference} (reference)"
    return name


def write_config(out: Path, config: dict, classes: list[str]) -> None:
    _write_json(out / "config.json", {**config, "classes": classes})


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, default=json_default)
