"""Every figure of a run, each titled with what it shows and on which data, saved as SVG and PNG.

``draw_run`` draws, into a run's ``plots/`` folder:

    comparison             accuracy, macro-F1 and MCC per method, 95% bootstrap intervals,
                           a majority-class and a chance line
    confusion_METHOD       one confusion matrix per method: colours row-normalised, counts in cells
    per_class_f1           F1 per class and method with 95% bootstrap intervals, supports in the labels
    per_group              accuracy, macro-F1 and MCC per organism group (datasets with groups)
    roc_pr[_METHOD]        ROC and precision-recall curves: binary tasks one figure with every
                           method; multi-class one figure per method, one-vs-rest per class
    training_METHOD        training curves of heads that record them (attention, finetune)
    accuracy_by_length     accuracy per sequence-length bin (quantiles), per method
    embedding_map          the pooled embeddings in 2-D (UMAP; PCA for small sets), coloured by class

Multi-label runs (``data.multilabel``) draw instead:

    comparison             macro-F1, micro-F1, mean per-protein Jaccard and exact-set accuracy
                           per method, 95% bootstrap intervals, the most frequent label set's line
    per_label_f1           F1 per label and method with 95% bootstrap intervals
    per_group              as above, with the multi-label metrics (datasets with groups)
    roc_per_label          a grid, one panel per label, every method's ROC curve and AUC
    pr_per_label           the same for precision-recall curves and average precision
    training_METHOD        as above
    jaccard_by_length      mean per-protein Jaccard per sequence-length bin, per method
    embedding_map          coloured by label set (the seven most frequent; the rest grey)

and no confusion matrices (per-label counts are in metrics.json and the per-label table).

Every number drawn comes from the predictions and ``metrics`` (metrics.json), never from
anything else, so a figure and the tables of a run always agree.
"""

from __future__ import annotations

import logging
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import LabeledSet
from .evaluate import MethodResult, scored_rows
from .figstyle import Figure, FigureContext, colour, pyplot, save_figure

log = logging.getLogger(__name__)

# Below this many proteins the embedding map is a PCA: UMAP's first call compiles numba code
# for ~10 s, too much for a small run (and its neighbourhoods mean little for a few dozen points).
UMAP_MIN_PROTEINS = 400
LENGTH_BINS = 5
METRIC_TITLES = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "mcc": "MCC"}
MULTILABEL_TITLES = {"macro_f1": "Macro-F1", "micro_f1": "Micro-F1", "jaccard": "Jaccard (mean per protein)",
                     "exact_set_accuracy": "Exact-set accuracy"}
# Label sets the embedding map gives a colour of their own; the rest are drawn grey.
MAP_SETS = 7


def draw_run(folder: Path, context: FigureContext, data: LabeledSet, results: list[MethodResult],
             metrics: dict[str, dict], features: np.ndarray | None = None) -> list[Figure]:
    """Draw every figure of a run into ``folder``; returns them in the order a report shows them.

    ``features`` are the pooled per-protein embeddings in ``data``'s order (for the map); the
    map is left out without them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if data.multilabel:
        return _draw_multilabel(folder, context, data, results, metrics, features)
    figures = [comparison_figure(folder, context, _scored(data, results), metrics)]
    figures += [confusion_figure(folder, context, data, name, metrics[name]) for name in metrics]
    figures.append(per_class_figure(folder, context, data, metrics))
    if data.groups is not None and all("per_group" in m for m in metrics.values()):
        figures.append(per_group_figure(folder, context, metrics))
    figures += curve_figures(folder, context, data, results)
    figures += [f for r in results if (f := training_figure(folder, context, r)) is not None]
    figures.append(length_figure(folder, context, data, results))
    if features is not None and len(features) == len(data) and len(data) >= 3:
        figures.append(embedding_map(folder, context, data, features))
    return figures


def _draw_multilabel(folder: Path, context: FigureContext, data: LabeledSet, results: list[MethodResult],
                     metrics: dict[str, dict], features: np.ndarray | None) -> list[Figure]:
    figures = [comparison_figure(folder, context, _scored(data, results), metrics),
               per_class_figure(folder, context, data, metrics)]
    if data.groups is not None and all("per_group" in m for m in metrics.values()):
        figures.append(per_group_figure(folder, context, metrics, MULTILABEL_TITLES))
    figures += label_curve_figures(folder, context, data, results)
    figures += [f for r in results if (f := training_figure(folder, context, r)) is not None]
    figures.append(jaccard_length_figure(folder, context, data, results))
    if features is not None and len(features) == len(data) and len(data) >= 3:
        figures.append(embedding_map(folder, context, data, features))
    return figures


# ---------------------------------------------------------------- shared pieces

def _scored(data: LabeledSet, results: list[MethodResult]) -> LabeledSet:
    """The proteins some method predicted: what the baselines' lines are scored on, as the methods are."""
    return data.subset(np.flatnonzero(scored_rows(results, len(data))))


def _title(fig, what: str, context: FigureContext) -> None:
    """``what`` in bold above the run's subtitle, both wrapped to the figure's width (the subtitle at " · ")."""
    chars = max(40, int(fig.get_figwidth() * 72 / (8 * 0.52)))  # 8 pt text: about 0.52 em per character
    lines, line = [], ""
    for part in context.subtitle().split(" · "):
        candidate = f"{line} · {part}" if line else part
        if line and len(candidate) > chars:
            lines.append(line)
            line = part
        else:
            line = candidate
    lines = [w for text in [*lines, line] for w in textwrap.wrap(text, chars)]
    heading = [w for text in what.split("\n") for w in textwrap.wrap(text, int(chars * 0.75))]
    fig.text(0.5, 1.0, "\n".join(lines), fontsize=8, ha="center", va="bottom", color="#333333", linespacing=1.35)
    above = (len(lines) * 8 * 1.35 + 4) / 72 / fig.get_figheight()
    fig.text(0.5, 1.0 + above, "\n".join(heading), fontsize=10, fontweight="bold", ha="center", va="bottom",
             linespacing=1.3)


def _save(fig, folder: Path, stem: str, section: str, caption: str) -> Figure:
    save_figure(fig, folder / stem)
    return Figure(folder / stem, section, caption)


def _file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _class_labels(data: LabeledSet, metrics: dict) -> list[str]:
    support = next(iter(metrics.values()))["per_class"] if metrics else {}
    return [(f"{c} (n=0, not in the test set)" if support[c]["support"] == 0 else f"{c} (n={support[c]['support']:,})")
            if c in support else c for c in data.classes]


def baselines(labels: np.ndarray, n_classes: int) -> dict[str, dict[str, float]]:
    """What predicting without looking at the proteins scores, from the class shares alone.

    majority: always the largest class: accuracy = its share p; its F1 is 2p/(1+p), every
    other class's 0, so macro-F1 = 2p/(1+p)/K; MCC is 0 (a constant prediction).
    chance: a class drawn uniformly at random: expected accuracy 1/K; class k's precision is
    its share p_k and its recall 1/K, so its F1 is 2 p_k (1/K) / (p_k + 1/K); MCC 0.
    K counts every class (a guess may name any), while macro-F1 averages over the classes
    the proteins have, as the methods' macro-F1 does.
    """
    share = np.bincount(labels, minlength=n_classes) / max(1, len(labels))
    p = float(share.max())
    k = n_classes
    present = max(1, int((share > 0).sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(share > 0, 2 * share / k / (share + 1 / k), 0.0)
    return {"majority": {"accuracy": p, "macro_f1": 2 * p / (1 + p) / present, "mcc": 0.0},
            "chance": {"accuracy": 1 / k, "macro_f1": float(f1.sum() / present), "mcc": 0.0}}


# ---------------------------------------------------------------- 1. comparison

def comparison_figure(folder: Path, context: FigureContext, data: LabeledSet, metrics: dict) -> Figure:
    plt = pyplot()
    names = list(metrics)
    titles = [context.method_title(n) for n in names]
    if data.multilabel:
        from .metrics import majority_set_baseline

        keys = MULTILABEL_TITLES
        top = majority_set_baseline(data.labels, data.classes)
        lines = [(f"always the most frequent label set ({_set_text(top['set'])})", "--", 1.0, top)]
    else:
        keys = METRIC_TITLES
        base = baselines(data.labels, data.n_classes)
        lines = [("majority class", "--", 1.0, base["majority"]), ("uniform random guess", ":", 1.2, base["chance"])]
    width = max(6.5, len(keys) * (0.9 + 0.45 * len(names)))
    fig, axes = plt.subplots(1, len(keys), figsize=(width, 3.4), sharey=False)
    low = min(0.0, *(m["ci95"][k][0] for m in metrics.values() for k in keys if m["ci95"][k][0] == m["ci95"][k][0]))
    for ax, key in zip(axes, keys):
        values = np.array([metrics[n][key] for n in names])
        ci = np.array([metrics[n]["ci95"][key] for n in names]).reshape(-1, 2).T
        x = np.arange(len(names))
        ax.bar(x, values, 0.7, color=[colour(i) for i in range(len(names))],
               yerr=np.clip(np.abs(ci - values), 0, None), capsize=3, ecolor="#333333", error_kw={"lw": 1})
        for xi, v, hi in zip(x, values, ci[1]):
            ax.text(xi, hi + 0.02, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        for label, style, lw, values_of in lines:
            ax.axhline(values_of[key], color="#555555", ls=style, lw=lw, label=label)
        ax.set_xticks(x, titles, rotation=30 if len(names) > 1 else 0, ha="right" if len(names) > 1 else "center")
        ax.set_title(keys[key])
        ax.set_ylim(low - (0.05 if low < 0 else 0), 1.12)
        ax.set_xlim(-0.6, len(names) - 0.4)
    axes[0].set_ylabel("score (bars: 95% bootstrap interval)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    fig.tight_layout()
    _title(fig, "Methods compared on the same proteins and folds", context)
    if data.multilabel:
        caption = ("Macro-F1 (averaged over the labels the scored proteins have), micro-F1, the mean per-protein "
                   "Jaccard index (|predicted ∩ true| / |predicted ∪ true|) and exact-set accuracy (the share of "
                   "proteins whose predicted set is exactly the true one) of each method, with 95% "
                   "percentile-bootstrap intervals over proteins. Dashed: always predicting the most frequent label "
                   f"set, {_set_text(top['set'])} ({top['share']:.1%} of the proteins; macro-F1 "
                   f"{top['macro_f1']:.3f}, micro-F1 {top['micro_f1']:.3f}, Jaccard {top['jaccard']:.3f}, "
                   f"exact-set accuracy {top['exact_set_accuracy']:.3f}).")
        return _save(fig, folder, "comparison", "Comparison", caption)
    m, c = base["majority"], base["chance"]
    caption = (f"Accuracy, macro-F1 and MCC of each method with 95% percentile-bootstrap intervals over proteins. "
               f"Dashed: always predicting the largest class (accuracy {m['accuracy']:.3f} = its share; macro-F1 "
               f"{m['macro_f1']:.3f}; MCC 0). Dotted: guessing one of the {data.n_classes} classes uniformly at "
               f"random (expected accuracy {c['accuracy']:.3f}; macro-F1 {c['macro_f1']:.3f}; MCC 0).")
    return _save(fig, folder, "comparison", "Comparison", caption)


def _set_text(names: str) -> str:
    """A label set for a reader ("A + B"); names joined by ";" in files may hold ";" themselves."""
    return names.replace(";", " + ") if names else "no label"


# ---------------------------------------------------------------- 2. confusion matrices

def confusion_figure(folder: Path, context: FigureContext, data: LabeledSet, name: str, m: dict) -> Figure:
    plt = pyplot()
    counts = np.array(m["confusion"], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(data.classes)
    side = max(3.4, 0.5 * k + 1.6)
    fig, ax = plt.subplots(figsize=(side + 1.4, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    size = 8 if k <= 6 else 7 if k <= 10 else 6
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(counts[i, j]):,}", ha="center", va="center", fontsize=size,
                    color="white" if share[i, j] > 0.55 else "black")
    labels = _class_labels(data, {name: m})
    ax.set_xticks(range(k), data.classes, rotation=45 if k > 2 else 0, ha="right" if k > 2 else "center")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.spines[:].set_visible(False)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class (row-normalised)")
    title = context.method_title(name)
    fig.tight_layout()
    _title(fig, f"Confusion matrix: {title}\naccuracy {m['accuracy']:.3f}, MCC {m['mcc']:.3f}",
           context.for_method(name))
    caption = (f"{title}: rows are the true classes (with their number of proteins), columns the predicted ones. "
               "Each cell shows a count of proteins; its colour is that count's share of the row (recall on the "
               "diagonal).")
    return _save(fig, folder, f"confusion_{_file_name(name)}", "Confusion matrices", caption)


# ---------------------------------------------------------------- 3. per class and per group

def _grouped_hbars(ax, rows: list[str], titles: list[str], values: np.ndarray, ci: np.ndarray) -> None:
    """Horizontal bars, a group per row, a bar per method; ``ci`` is (methods, rows, 2)."""
    height = 0.8 / len(titles)
    y = np.arange(len(rows))
    for k, title in enumerate(titles):
        pos = y - 0.4 + height * (k + 0.5)
        err = np.clip(np.abs(ci[k].T - values[k]), 0, None)
        ax.barh(pos, values[k], height, color=colour(k), label=title, xerr=err, capsize=2,
                error_kw={"lw": 0.8, "ecolor": "#333333"})
    ax.set_yticks(y, rows)
    if not ax.yaxis_inverted():  # axes sharing y share the inversion: toggling each would undo it
        ax.invert_yaxis()


def per_class_figure(folder: Path, context: FigureContext, data: LabeledSet, metrics: dict) -> Figure:
    plt = pyplot()
    names = list(metrics)
    titles = [context.method_title(n) for n in names]
    classes = data.classes
    values = np.array([[metrics[n]["per_class"][c]["f1"] for c in classes] for n in names])
    ci = np.array([[metrics[n]["per_class"][c].get("f1_ci95", (np.nan, np.nan)) for c in classes] for n in names])
    height = max(2.6, 0.22 * len(classes) * len(names) + 0.35 * len(classes) + 0.8)
    fig, ax = plt.subplots(figsize=(6.5, height))
    _grouped_hbars(ax, _class_labels(data, metrics), titles, values, ci)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (bars: 95% bootstrap interval)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method")
    fig.tight_layout()
    if data.multilabel:
        _title(fig, "F1 per label", context)
        caption = ("F1 of each label for each method (the label predicted where its probability reaches its "
                   "threshold), with 95% percentile-bootstrap intervals over proteins; n is the number of proteins "
                   "that have the label. A label no scored protein has is marked and left out of macro-F1. "
                   "Confusion matrices are not drawn for label sets: each label's counts are in metrics.json "
                   "and its precision and recall in the per-label table.")
        return _save(fig, folder, "per_label_f1", "Per label", caption)
    _title(fig, "F1 per class", context)
    caption = ("F1 of each class for each method, with 95% percentile-bootstrap intervals over proteins; "
               "n is the number of proteins of the class.")
    return _save(fig, folder, "per_class_f1", "Per class", caption)


def per_group_figure(folder: Path, context: FigureContext, metrics: dict,
                     keys: dict[str, str] = METRIC_TITLES) -> Figure:
    plt = pyplot()
    names = list(metrics)
    titles = [context.method_title(n) for n in names]
    groups = list(next(iter(metrics.values()))["per_group"])
    first = next(iter(metrics.values()))["per_group"]
    rows = [f"{g} (n={first[g]['n']:,})" for g in groups]
    height = max(2.4, 0.25 * len(groups) * len(names) + 0.4 * len(groups) + 1.0)
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), height), sharey=True)
    for ax, key in zip(axes, keys):
        values = np.array([[metrics[n]["per_group"][g][key] for g in groups] for n in names])
        ci = np.array([[metrics[n]["per_group"][g].get("ci95", {}).get(key, (np.nan, np.nan)) for g in groups]
                       for n in names])
        _grouped_hbars(ax, rows, titles, values, ci)
        ax.set_title(textwrap.fill(keys[key], 22))
        ax.set_xlim(min(0.0, float(np.nanmin(ci[..., 0])) - 0.05) if key == "mcc" else 0, 1)
        if ax is not axes[0]:
            ax.tick_params(left=False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(names)),
               frameon=False)
    fig.tight_layout()
    what = ("Accuracy, macro-F1 and MCC" if keys is METRIC_TITLES
            else "Macro-F1, micro-F1, Jaccard and exact-set accuracy")
    _title(fig, f"{what} per organism group", context)
    caption = ("Each method's scores on the proteins of each organism group (n proteins), with 95% "
               "percentile-bootstrap intervals over the group's proteins.")
    return _save(fig, folder, "per_group", "Per group", caption)


# ---------------------------------------------------------------- 4. ROC and precision-recall

def curve_figures(folder: Path, context: FigureContext, data: LabeledSet, results: list[MethodResult]) -> list[Figure]:
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = pyplot()
    figures = []
    if data.n_classes == 2:
        positive = data.classes[1]
        fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(8, 3.9))
        for k, r in enumerate(results):
            mask = r.predicted()
            y, p = data.labels[mask] == 1, r.proba[mask, 1]
            if y.all() or not y.any():
                continue
            title = context.method_title(r.name)
            fpr, tpr, _ = roc_curve(y, p)
            roc_ax.plot(fpr, tpr, color=colour(k), lw=1.4, label=f"{title} (AUC {auc(fpr, tpr):.3f})")
            precision, recall, _ = precision_recall_curve(y, p)
            pr_ax.plot(recall, precision, color=colour(k), lw=1.4, drawstyle="steps-post",
                       label=f"{title} (AP {average_precision_score(y, p):.3f})")
        prevalence = float((data.labels == 1).mean())
        _roc_pr_axes(roc_ax, pr_ax, prevalence)
        fig.tight_layout()
        _title(fig, f"ROC and precision-recall curves ({positive} as the positive class)", context)
        caption = (f"{positive} is the positive class, scored by each method's probability of it. AUC: area under "
                   f"the ROC curve; AP: average precision. Grey lines: a random score (ROC diagonal; precision "
                   f"= the share of {positive}, {prevalence:.3f}).")
        figures.append(_save(fig, folder, "roc_pr", "ROC and precision-recall", caption))
        return figures
    for r in results:
        mask = r.predicted()
        y, proba = data.labels[mask], r.proba[mask]
        title = context.method_title(r.name)
        fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9.5, 4.2))
        aucs = []
        for k, c in enumerate(data.classes):
            truth = y == k
            if truth.all() or not truth.any():
                continue
            style = {"color": colour(k), "ls": _dashes(k), "lw": 1.2}
            fpr, tpr, _ = roc_curve(truth, proba[:, k])
            aucs.append(roc_auc_score(truth, proba[:, k]))
            ap = average_precision_score(truth, proba[:, k])
            roc_ax.plot(fpr, tpr, label=f"{c} ({aucs[-1]:.3f} / {ap:.3f})", **style)
            precision, recall, _ = precision_recall_curve(truth, proba[:, k])
            pr_ax.plot(recall, precision, drawstyle="steps-post", **style)
        _roc_pr_axes(roc_ax, pr_ax, None)
        handles, labels = roc_ax.get_legend_handles_labels()
        pr_ax.legend(handles, labels, title="class (ROC AUC / AP)", loc="upper left", bbox_to_anchor=(1.03, 1.0),
                     fontsize=7, title_fontsize=7, frameon=False)
        fig.tight_layout()
        macro = f", macro ROC AUC {np.mean(aucs):.3f}" if aucs else ""
        _title(fig, f"ROC and precision-recall curves, one class against the rest: {title}{macro}",
               context.for_method(r.name))
        caption = (f"{title}: each class against all others, scored by the method's probability of that class. "
                   "The legend gives each class's area under the ROC curve and its average precision (AP); "
                   "classes beyond the eighth repeat the colours dashed. "
                   "Grey diagonal: a random score.")
        figures.append(_save(fig, folder, f"roc_pr_{_file_name(r.name)}", "ROC and precision-recall", caption))
    return figures


def _grid(n_panels: int) -> tuple[int, int]:
    """(rows, columns) of a grid of at most five panels a row, the rows as even as possible."""
    rows = max(1, -(-n_panels // 5))
    return rows, -(-n_panels // rows)


def label_curve_figures(folder: Path, context: FigureContext, data: LabeledSet,
                        results: list[MethodResult]) -> list[Figure]:
    """Multi-label: a grid of ROC curves and one of precision-recall curves, a panel per label, every method."""
    from matplotlib.lines import Line2D
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = pyplot()
    figures = []
    n_rows, n_cols = _grid(data.n_classes)
    for kind in ("roc", "pr"):
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.3 * n_cols + 0.3, 2.45 * n_rows + 0.5), squeeze=False)
        for j, (ax, label) in enumerate(zip(axes.flat, data.classes)):
            positives = int(data.labels[:, j].sum())
            ax.set_title(textwrap.fill(f"{label} (n={positives:,})", 30), fontsize=8)
            drawn = False
            for k, r in enumerate(results):
                mask = r.predicted()
                truth, p = data.labels[mask, j] > 0, r.proba[mask, j]
                if kind == "roc" and (truth.all() or not truth.any()):
                    continue
                if kind == "pr" and not truth.any():
                    continue
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(truth, p)
                    ax.plot(fpr, tpr, color=colour(k), lw=1.1, label=f"{roc_auc_score(truth, p):.3f}")
                else:
                    precision, recall, _ = precision_recall_curve(truth, p)
                    ax.plot(recall, precision, color=colour(k), lw=1.1, drawstyle="steps-post",
                            label=f"{average_precision_score(truth, p):.3f}")
                drawn = True
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls=":")
            else:
                ax.axhline(positives / max(1, len(data)), color="#999999", lw=0.8, ls=":")
            if drawn:
                ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=6.5, handlelength=1.2,
                          title="AUC" if kind == "roc" else "AP", title_fontsize=6.5, borderpad=0.3,
                          labelspacing=0.2, framealpha=0.8)
            else:
                why = "no protein has it\n(not in the test set)" if positives == 0 else "every protein has it"
                ax.text(0.5, 0.5, f"{why}:\nno curve", ha="center", va="center", fontsize=7, color="#555555",
                        transform=ax.transAxes, bbox={"facecolor": "white", "edgecolor": "none", "pad": 2})
            ax.set(xlim=(0, 1), ylim=(0, 1.02))
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            row, col = divmod(j, n_cols)
            if row == n_rows - 1 or j + n_cols >= data.n_classes:
                ax.set_xlabel("false positive rate" if kind == "roc" else "recall", fontsize=8)
            if col == 0:
                ax.set_ylabel("true positive rate" if kind == "roc" else "precision", fontsize=8)
        for ax in list(axes.flat)[data.n_classes:]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=colour(k), lw=1.4, label=context.method_title(r.name))
                   for k, r in enumerate(results)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(results)),
                   frameon=False, title="method")
        fig.tight_layout()
        if kind == "roc":
            _title(fig, "ROC curves per label", context)
            caption = ("One panel per label (n: proteins that have it): each method's ROC curve of the label's "
                       "probability, with its area under the curve (AUC) in the panel's legend in the method's "
                       "colour. Dotted: a random score. A label without both outcomes among the proteins has no "
                       "curve.")
            figures.append(_save(fig, folder, "roc_per_label", "ROC and precision-recall", caption))
        else:
            _title(fig, "Precision-recall curves per label", context)
            caption = ("One panel per label (n: proteins that have it): each method's precision-recall curve of "
                       "the label's probability, with its average precision (AP) in the panel's legend in the "
                       "method's colour. Dotted: a random score (precision = the label's share of the proteins).")
            figures.append(_save(fig, folder, "pr_per_label", "ROC and precision-recall", caption))
    return figures


def _dashes(k: int) -> str:
    """Solid for the first eight classes, dashed for the next eight: the palette has eight colours."""
    return "-" if k < 8 else "--"


def _roc_pr_axes(roc_ax, pr_ax, prevalence: float | None) -> None:
    roc_ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls=":")
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc_ax.set_aspect("equal")
    if prevalence is not None:
        pr_ax.axhline(prevalence, color="#999999", lw=0.8, ls=":")
        roc_ax.legend(loc="lower right", fontsize=7)
        pr_ax.legend(loc="lower left", fontsize=7)
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title="Precision-recall")
    pr_ax.set_aspect("equal")


# ---------------------------------------------------------------- 5. training curves

def training_figure(folder: Path, context: FigureContext, result: MethodResult) -> Figure | None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    curves = [s for s in result.splits if s.get("history")]
    if not curves:
        return None
    plt = pyplot()
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    by_split = len(curves) <= 8
    for i, s in enumerate(curves):
        h = pd.DataFrame(s["history"])
        c = colour(i) if by_split else "#0072B2"
        alpha = 0.9 if by_split else 0.35
        loss_ax.plot(h["epoch"], h["train_loss"], color=c, lw=1.1, alpha=alpha)
        if "val_loss" in h:
            loss_ax.plot(h["epoch"], h["val_loss"], color=c, lw=1.1, ls="--", alpha=alpha)
        if "val_macro_f1" in h:
            metric_ax.plot(h["epoch"], h["val_macro_f1"], color=c, lw=1.1, alpha=alpha)
            best = s.get("best_epoch")
            chosen = h[h["epoch"] == best]
            if len(chosen):
                metric_ax.plot(chosen["epoch"], chosen["val_macro_f1"], "o", color=c, ms=5, mec="black", mew=0.6)
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    loss_ax.set(ylabel="loss", title="Loss")
    metric_ax.set(ylabel="validation macro-F1", title="Validation macro-F1")
    styles = [Line2D([], [], color="#333333", lw=1.1, label="training"),
              Line2D([], [], color="#333333", lw=1.1, ls="--", label="validation")]
    loss_ax.legend(handles=styles, loc="upper right")
    chosen_mark = Line2D([], [], marker="o", ls="", color="#777777", mec="black", mew=0.6, label="epoch kept")
    if by_split:
        splits = [Line2D([], [], color=colour(i), lw=1.1, label=s["split"]) for i, s in enumerate(curves)]
        metric_ax.legend(handles=[*splits, chosen_mark], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                         frameon=False, title="split")
    else:
        metric_ax.legend(handles=[Line2D([], [], color="#0072B2", alpha=0.5, label=f"{len(curves)} splits"),
                                  chosen_mark], loc="lower right")
    title = context.method_title(result.name)
    fig.tight_layout()
    _title(fig, f"Training curves: {title}", context)
    caption = (f"{title}, one line per training split (colour): loss on its training (solid) and validation "
               "(dashed) proteins per epoch, and validation macro-F1. The dot marks the epoch whose model was "
               "kept (best validation metric).")
    return _save(fig, folder, f"training_{_file_name(result.name)}", "Training", caption)


# ---------------------------------------------------------------- 6. accuracy by length

def length_bins(lengths: np.ndarray, n_bins: int = LENGTH_BINS) -> np.ndarray:
    """Integer bin edges at length quantiles, duplicates merged; bin i is [edges[i], edges[i+1])."""
    edges = np.unique(np.round(np.quantile(lengths, np.linspace(0, 1, n_bins + 1))).astype(int))
    edges[-1] = int(lengths.max()) + 1
    return edges if len(edges) > 1 else np.array([int(lengths.min()), int(lengths.max()) + 1])


def _scored_length_bins(data: LabeledSet, results: list[MethodResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Length bins at the quantiles of the scored proteins' lengths (with a held-out test file, its
    proteins, not the training ones): the edges, each protein's bin, and the scored proteins per bin."""
    lengths = np.array([len(s) for s in data.sequences])
    scored = scored_rows(results, len(data))
    edges = length_bins(lengths[scored] if scored.any() else lengths)
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, len(edges) - 2)
    return edges, which, np.bincount(which[scored], minlength=len(edges) - 1)


def _wilson(k: np.ndarray, n: np.ndarray, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
    n = np.maximum(n, 1)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return centre - half, centre + half


def _mean_interval(values: np.ndarray, which: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per bin: mean and 95% normal-approximation interval (mean ± 1.96 standard errors, within 0-1)."""
    n = np.bincount(which, minlength=n_bins)
    total = np.bincount(which, weights=values, minlength=n_bins)
    squares = np.bincount(which, weights=values**2, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        var = np.where(n > 1, (squares - n * mean**2) / np.maximum(n - 1, 1), 0.0)
        half = 1.96 * np.sqrt(np.clip(var, 0, None) / np.maximum(n, 1))
    return mean, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)


def _wilson_interval(right: np.ndarray, which: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per bin: the share right and its 95% Wilson score interval."""
    n = np.bincount(which, minlength=n_bins)
    hits = np.bincount(which, weights=right, minlength=n_bins)
    lo, hi = _wilson(hits, n)
    return np.where(n > 0, hits / np.maximum(n, 1), np.nan), lo, hi


def _by_length(folder: Path, context: FigureContext, data: LabeledSet, results: list[MethodResult],
               per_protein, interval, ylabel: str, title: str, stem: str, caption: str) -> Figure:
    """One line per method: ``per_protein(result, mask)`` summarised by ``interval`` in each length bin."""
    plt = pyplot()
    edges, which, counts = _scored_length_bins(data, results)
    n_bins = len(edges) - 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n_bins + 2.5), 3.6))
    offset = 0.6 / max(1, len(results))
    for k, r in enumerate(results):
        mask = r.predicted()
        mean, lo, hi = interval(per_protein(r, mask).astype(float), which[mask], n_bins)
        x = np.arange(n_bins) - 0.3 + offset * (k + 0.5)
        ax.errorbar(x, mean, yerr=[np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)], fmt="o-",
                    color=colour(k), ms=4, lw=1.1, capsize=2, label=context.method_title(r.name))
    ticks = [f"{edges[i]}–{edges[i + 1] - 1}\n(n={counts[i]:,})" for i in range(n_bins)]
    ax.set_xticks(range(n_bins), ticks)
    ax.set_xlabel("sequence length (residues), bins at length quantiles")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="method")
    fig.tight_layout()
    _title(fig, title, context)
    return _save(fig, folder, stem, "Sequence length", caption)


def length_figure(folder: Path, context: FigureContext, data: LabeledSet, results: list[MethodResult]) -> Figure:
    return _by_length(
        folder, context, data, results, lambda r, mask: r.proba[mask].argmax(1) == data.labels[mask],
        _wilson_interval, "accuracy (bars: 95% Wilson interval)", "Accuracy by sequence length", "accuracy_by_length",
        "Share of proteins predicted correctly in each sequence-length bin (bins at length quantiles; n proteins per "
        "bin), with 95% Wilson score intervals.")


def jaccard_length_figure(folder: Path, context: FigureContext, data: LabeledSet,
                          results: list[MethodResult]) -> Figure:
    """Multi-label: the mean per-protein Jaccard index in each sequence-length bin, per method."""
    from .metrics import per_protein_jaccard

    return _by_length(
        folder, context, data, results, lambda r, mask: per_protein_jaccard(data.labels[mask], r.sets()[mask]),
        _mean_interval, "mean Jaccard index (bars: 95% interval)", "Per-protein Jaccard index by sequence length",
        "jaccard_by_length",
        "Mean per-protein Jaccard index (|predicted ∩ true| / |predicted ∪ true| of the label sets) in each "
        "sequence-length bin (bins at length quantiles; n proteins per bin), with 95% normal-approximation "
        "intervals (mean ± 1.96 standard errors, clipped to 0-1).")


# ---------------------------------------------------------------- 7. embedding map

def project_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows and the method's name: UMAP, or PCA below UMAP_MIN_PROTEINS rows."""
    x = np.asarray(features, dtype=np.float32)
    if len(x) < UMAP_MIN_PROTEINS:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA"
    start = time.perf_counter()
    with warnings.catch_warnings():
        # umap warns that a fixed random_state turns off its parallelism: wanted, for the same map every time.
        warnings.simplefilter("ignore")
        import umap
        from sklearn.decomposition import PCA

        if x.shape[1] > 50:  # neighbours are found faster in 50 principal components, and hardly differ
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        coords = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, n_epochs=200,
                           random_state=seed).fit_transform(x)
    log.info("UMAP of %d proteins in %.1f s", len(x), time.perf_counter() - start)
    return np.asarray(coords), "UMAP"


def embedding_map(folder: Path, context: FigureContext, data: LabeledSet, features: np.ndarray) -> Figure:
    if data.multilabel:
        return _label_set_map(folder, context, data, features)
    plt = pyplot()
    coords, method = project_2d(features)
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    size = 10 if len(data) < 2000 else 5
    counts = np.bincount(data.labels, minlength=data.n_classes)
    order = np.argsort(-counts)  # the largest class underneath, so small ones stay visible
    for k in order:
        inside = data.labels == k
        if inside.any():
            ax.scatter(coords[inside, 0], coords[inside, 1], s=size, color=colour(int(k)), alpha=0.7, lw=0,
                       marker="o" if k < 8 else "^",
                       label=f"{data.classes[k]} (n={counts[k]:,})", rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    handles, labels = ax.get_legend_handles_labels()
    keep = np.argsort([data.classes.index(lab.rsplit(" (n=", 1)[0]) for lab in labels])
    ax.legend([handles[i] for i in keep], [labels[i] for i in keep], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, title="class", markerscale=2)
    fig.tight_layout()
    _title(fig, f"Pooled embeddings in two dimensions ({method}), coloured by class", context)
    how = ("UMAP (of the first 50 principal components; 15 neighbours, min_dist 0.1, 200 epochs, seed 0)"
           if method == "UMAP"
           else f"the first two principal components (PCA; sets under {UMAP_MIN_PROTEINS} proteins)")
    caption = (f"Every protein's mean-pooled embedding, projected to two dimensions by {how}, coloured by its "
               "true class. The projection sees no labels; axes have no units.")
    return _save(fig, folder, "embedding_map", "Embeddings", caption)


def _label_set_map(folder: Path, context: FigureContext, data: LabeledSet, features: np.ndarray) -> Figure:
    """The embedding map of a multi-label set: each of the MAP_SETS most frequent label sets a colour, the rest grey."""
    plt = pyplot()
    coords, method = project_2d(features)
    fig, ax = plt.subplots(figsize=(6.8, 5.2))
    size = 10 if len(data) < 2000 else 5
    rows, inverse, counts = np.unique(data.labels > 0, axis=0, return_inverse=True, return_counts=True)
    inverse = np.asarray(inverse).ravel()
    order = sorted(range(len(rows)), key=lambda i: (-counts[i], [not v for v in rows[i]]))
    shown, rest = order[:MAP_SETS], order[MAP_SETS:]
    other = np.isin(inverse, rest)
    handles = []
    if other.any():  # underneath everything
        grey = ax.scatter(coords[other, 0], coords[other, 1], s=size, color="#BBBBBB", alpha=0.6, lw=0,
                          rasterized=True, label=f"{len(rest)} other sets (n={int(other.sum()):,})")
    for rank, i in enumerate(shown):  # the largest set underneath, so small ones stay visible
        inside = inverse == i
        names = " + ".join(c for c, on in zip(data.classes, rows[i]) if on) or "no label"
        handles.append(ax.scatter(coords[inside, 0], coords[inside, 1], s=size, color=colour(rank), alpha=0.75, lw=0,
                                  rasterized=True, label=f"{textwrap.shorten(names, 40)} (n={counts[i]:,})"))
    if other.any():
        handles.append(grey)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="true label set",
              markerscale=2)
    fig.tight_layout()
    _title(fig, f"Pooled embeddings in two dimensions ({method}), coloured by label set", context)
    how = ("UMAP (of the first 50 principal components; 15 neighbours, min_dist 0.1, 200 epochs, seed 0)"
           if method == "UMAP"
           else f"the first two principal components (PCA; sets under {UMAP_MIN_PROTEINS} proteins)")
    caption = (f"Every protein's mean-pooled embedding, projected to two dimensions by {how}, coloured by its true "
               f"label set: the {min(MAP_SETS, len(rows))} most frequent sets each in a colour, "
               + ("every other set in grey. " if rest else "") +
               "The projection sees no labels; axes have no units.")
    return _save(fig, folder, "embedding_map", "Embeddings", caption)
