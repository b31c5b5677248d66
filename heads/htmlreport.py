"""A run's report.html: one self-contained page with its tables, figures and provenance.

The page is written from the run's own outputs (metrics, paired tests, the comparison table,
figures) and config.json, so ``heads report RUN`` rebuilds the same page from a finished
run's files. What a page needs beyond those files (the figure context, each figure's section
and caption, the notes) is recorded in config.json under ``report`` when the run is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shlex
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

from . import htmlpage
from .figstyle import Figure, FigureContext
from .rundir import CONFIG, MANIFEST, RunDirectoryError, open_finished

log = logging.getLogger(__name__)

REPORT = "report.html"
# Distributions whose versions a run records (importlib.metadata names).
SOFTWARE = ("torch", "scikit-learn", "lightgbm", "numpy", "pandas", "scipy", "transformers", "peft",
            "h5py", "matplotlib", "umap-learn", "graph-part", "iterative-stratification")
# Figures of runs written before figures carried a section and caption: by file name.
LEGACY_FIGURES = {
    "comparison": ("Comparison", "Accuracy, macro-F1 and MCC of each method; bars: 95% bootstrap intervals."),
    "confusion_matrices": ("Confusion matrices", "Rows: true class, normalised to recall; cells: counts."),
    "per_class_f1": ("Per class", "F1 of each class and method."),
    "training_curves": ("Training", "Training and validation loss and validation macro-F1 per split."),
}


# -- what a run records for its report -------------------------------------------------------
def software_versions() -> dict[str, str]:
    """Python and the versions of the packages a run's numbers depend on."""
    import embedcache
    from embedcache.extract import _git_sha

    # This package's version from the code that runs (an installed copy's metadata can be older).
    out = {"python": platform.python_version(), "embedcache (embedcache and heads)": embedcache.__version__,
           "embedcache git commit": _git_sha()}
    for name in SOFTWARE:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_digests(config: dict) -> list[dict]:
    """Path and sha256 of each input file a run read (dataset files, test file, reference files)."""
    data = config.get("data")
    entries = [("data", p) for p in ([data] if isinstance(data, str) else list(data or []))]
    if config.get("test_data"):
        entries.append(("test data", config["test_data"]))
    if config.get("reference"):
        entries += [("reference", str(p)) for p in sorted(Path(config["reference"]).glob("model_*_*.csv"))]
    out = []
    for role, path in entries:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        out.append({"role": role, "path": str(path), "sha256": digest.hexdigest()})
    return out


def report_record(context: FigureContext, figures: list[Figure], notes: list[str], out: Path) -> dict:
    """config.json's ``report``: what ``heads report`` needs to rebuild the page as the run wrote it."""
    return {
        "context": asdict(context),
        "figures": [{"png": _relative(f.png, out), "section": f.section, "caption": f.caption} for f in figures],
        "notes": list(notes),
    }


def _relative(path: Path, out: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(path)


def context_from_config(config: dict, n: int | None = None) -> FigureContext:
    """What a run's figures show, from its config.json (for runs that did not record it)."""
    data = config.get("data")
    files = [data] if isinstance(data, str) else list(data or [])
    dataset = " + ".join(Path(f).name for f in files) or "unknown data"
    if config.get("test_data"):
        dataset += f" -> {Path(config['test_data']).name}"
    backbone = config.get("backbone") or {}
    if backbone:
        text = f"{backbone.get('model') or backbone.get('architecture')}"
        if backbone.get("layer") is not None:
            text += f", layer {backbone['layer']}"
        if backbone.get("pooling"):
            text += f", {backbone['pooling']}"
    else:
        text = "sequences (no embedding cache)"
    info = config.get("folds_info") or {}
    return FigureContext(dataset=dataset, backbone=text, folds=describe_folds(info, config.get("scheme")),
                         n=int(n if n is not None else info.get("n", 0)),
                         reference=_reference_name(config))


def _reference_name(config: dict) -> str:
    if not config.get("reference"):
        return "reference"
    data = config.get("data")
    names = " ".join([data] if isinstance(data, str) else list(data or [])).lower()
    return "DeepLocPro" if "deeplocpro" in names or config.get("kind") == "deeplocpro" else "reference"


def describe_folds(info: dict, scheme: str | None = None, n_splits: int | None = None) -> str:
    """The folds and the scheme: "nested CV over 5 GraphPart homology partitions (30% identity)"."""
    k = len([f for f in info.get("sizes") or {} if str(f) != str(info.get("test_fold"))]) or info.get("k")
    source = info.get("source")
    if source == "homology":
        folds = f"{k} GraphPart homology partitions ({info.get('threshold', 0):.0%} identity)"
    elif source == "stratified":
        folds = f"{k} stratified random folds" + (f" (seed {info['seed']})" if "seed" in info else "")
    elif source == "file":
        folds = f"the file's {k} folds" + (f" (column {info['column']})" if info.get("column") else "")
    elif source == "folds_file":
        how = (f"homology: GraphPart, {info.get('aligner')}, {info.get('threshold', 0):.0%} identity"
               if info.get("method") == "homology" else f"{info.get('method')}, seed {info.get('seed')}")
        folds = f"{k} folds from {Path(str(info.get('path'))).name} ({how})"
    else:
        folds = f"{k} folds ({source})"
    if scheme is None:
        return folds
    scheme_name = "nested CV" if scheme == "nested" else "CV"
    if "test_fold" in info:
        models = f" ({n_splits} models)" if n_splits else ""
        return f"trained with {scheme_name} over {folds}, tested on the held-out file{models}"
    return f"{scheme_name} over {folds}"


def legacy_figures(run: Path) -> list[Figure]:
    """The PNGs of a run's plots/ folder as figures, sections and captions by their file names."""
    figures = []
    for png in sorted((run / "plots").glob("*.png")):
        stem = png.with_suffix("")
        key = next((k for k in LEGACY_FIGURES if png.stem == k or png.stem.startswith(k + "_")), None)
        section, caption = LEGACY_FIGURES.get(key or "", ("Figures", ""))
        if key == "training_curves":
            caption = f"{png.stem[len(key) + 1:]}: {caption}"
        figures.append(Figure(stem, section, caption))
    return figures


# -- the page ---------------------------------------------------------------------------------
def write_report(out: Path, context: FigureContext, figures: list[Figure], metrics: dict, tests: dict,
                 table: pd.DataFrame, config: dict, notes: list[str], baseline: dict | None = None) -> Path:
    """Write ``out/report.html`` (self-contained: figures inline, no scripts) and return its path.

    ``baseline``: metrics.json's "baseline" (multi-label runs: the most frequent label set's scores).
    """
    return write_report_to(Path(out) / REPORT, Path(out), context, figures, metrics, tests, table, config, notes,
                           baseline)


def is_multilabel(metrics: dict) -> bool:
    return any(isinstance(m, dict) and m.get("multilabel") for m in metrics.values())


def write_report_to(path: Path, run: Path, context: FigureContext, figures: list[Figure], metrics: dict,
                    tests: dict, table: pd.DataFrame, config: dict, notes: list[str],
                    baseline: dict | None = None) -> Path:
    name = context.method_title
    multilabel = is_multilabel(metrics)
    headline = _headline_multilabel(metrics, table, name, baseline) if multilabel else _headline(metrics, table, name)
    parts: dict[str, list[str]] = {"Comparison": [headline]}
    if notes:
        parts["Comparison"].append(htmlpage.bullets(notes))
    if tests:
        parts["Paired tests"] = [_paired_multilabel(tests, name) if multilabel else _paired(tests, name)]
    if multilabel:
        parts["Per label"] = _per_label(metrics, name)
    else:
        parts["Per class"] = _per_class(metrics, name)
    groups = _per_group(metrics, name)
    if groups:
        parts["Per group"] = [groups]
    for figure in figures:
        if not figure.png.is_file():
            raise RunDirectoryError(f"{figure.png}: a figure of the run is missing; the report cannot show it")
        _check_png(figure.png)
        parts.setdefault(figure.section, []).append(
            htmlpage.image(figure.png, alt=figure.caption or figure.stem.name, caption=figure.caption or None))
    parts["Provenance"] = _provenance(run, config)
    sections = [htmlpage.section(title, *body) for title, body in parts.items()]
    title = f"{context.dataset}: {', '.join(name(m) for m in metrics)}"
    return htmlpage.write_page(path, title, context.subtitle(), sections)


def _check_png(path: Path) -> None:
    # A damaged or replaced PNG would be inlined as a broken image that nobody notices in the page's source.
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise RunDirectoryError(f"{path}: not a PNG image ({image.format}); the report cannot show it")
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as err:
        if isinstance(err, RunDirectoryError):
            raise
        raise RunDirectoryError(f"{path}: a figure of the run is damaged (not a readable PNG: {err}); "
                                "run the same heads command again to draw it") from None


def _interval(value: float, ci) -> str:
    if value is None or value != value:
        return ""
    if ci is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _headline(metrics: dict, table: pd.DataFrame, name) -> str:
    rows = []
    for record in table.to_dict("records"):
        method = str(record["method"])
        m = metrics.get(method, {})
        row = {"method": name(method), "n": int(record["n"])}
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("mcc", "MCC")):
            row[f"{label} [95% CI]"] = _interval(float(record[key]), (m.get("ci95") or {}).get(key))
        for key, label in (("roc_auc", "ROC AUC"), ("pr_auc", "PR AUC")):
            if key in table.columns:
                row[label] = float(record[key])
        rows.append(row)
    text = htmlpage.table(pd.DataFrame(rows))
    first = next(iter(metrics.values()), None)
    support = {c: v["support"] for c, v in (first or {}).get("per_class", {}).items()}
    total = sum(support.values())
    if total:
        top = max(support, key=lambda c: support[c])
        share = support[top] / total
        # Always predicting one class: its F1 is 2p/(1+p), every other class's 0; macro-F1
        # averages over the classes the proteins have.
        present = sum(1 for v in support.values() if v > 0)
        text += (f"<p>Baseline: always predicting the most frequent class ({htmlpage.escape(top)}) gives accuracy "
                 f"{share:.3f}, macro-F1 {2 * share / (1 + share) / present:.3f} and MCC 0 (chance). "
                 "Brackets: 95% percentile bootstrap intervals over proteins.</p>")
    return text


# The multi-label headline: metrics.json key, column title.
MULTILABEL_COLUMNS = (("macro_f1", "macro-F1"), ("micro_f1", "micro-F1"), ("jaccard", "Jaccard"),
                      ("exact_set_accuracy", "exact-set accuracy"))


def _headline_multilabel(metrics: dict, table: pd.DataFrame, name, baseline: dict | None) -> str:
    rows = []
    for record in table.to_dict("records"):
        method = str(record["method"])
        m = metrics.get(method, {})
        row = {"method": name(method), "n": int(record["n"])}
        for key, label in MULTILABEL_COLUMNS:
            row[f"{label} [95% CI]"] = _interval(float(record[key]), (m.get("ci95") or {}).get(key))
        row["labels per protein (predicted)"] = float(record["predicted_cardinality"])
        row["mean ROC AUC"] = float(record.get("mean_roc_auc", float("nan")))
        row["mean PR AUC"] = float(record.get("mean_pr_auc", float("nan")))
        rows.append(row)
    text = htmlpage.table(pd.DataFrame(rows))
    first: dict = next(iter(metrics.values()), {})
    about = (f"<p>True labels per protein: {first.get('cardinality', float('nan')):.2f} (mean over the scored "
             "proteins). Jaccard: per protein |predicted ∩ true| / |predicted ∪ true|, averaged; exact-set "
             "accuracy: the share of proteins whose predicted set is exactly the true one; mean ROC and PR AUC: "
             "over the labels with both outcomes (PR: with a positive) among the scored proteins. ")
    top = (baseline or {}).get("majority_set")
    if top:
        about += (f"Baseline: always predicting the most frequent label set ({htmlpage.escape(top['set'])}, "
                  f"{top['share']:.1%} of the proteins) gives macro-F1 {top['macro_f1']:.3f}, micro-F1 "
                  f"{top['micro_f1']:.3f}, Jaccard {top['jaccard']:.3f} and exact-set accuracy "
                  f"{top['exact_set_accuracy']:.3f}. ")
    return text + about + "Brackets: 95% percentile bootstrap intervals over proteins.</p>"


def _paired(tests: dict, name) -> str:
    rows, against = [], []
    for key, t in tests.items():
        a, _, b = key.partition(" vs ")
        against.append(name(b))
        f1, acc, mc = t["macro_f1_difference"], t["accuracy_difference"], t["mcnemar"]
        rows.append({
            "first − second": f"{name(a)} − {name(b)}",
            "n": int(t["n"]),
            "Δ macro-F1 [95% CI]": f"{f1['difference']:+.3f} [{f1['ci95'][0]:+.3f}, {f1['ci95'][1]:+.3f}]",
            "p (macro-F1)": _p(f1["p_value"]),
            "Δ accuracy": f"{acc['difference']:+.3f}",
            "only first right": int(mc["only_a_right"]),
            "only second right": int(mc["only_b_right"]),
            "McNemar p": _p(mc["p_value"]),
        })
    return (htmlpage.table(pd.DataFrame(rows))
            + f"<p>{_which_pairs(tests, against)}, on the proteins both predicted. Δ: first minus "
              "second; for macro-F1 with a paired bootstrap 95% interval and two-sided p (accuracy's are in "
              "metrics.json). McNemar's exact test on the proteins exactly one of the two gets right.</p>")


def _paired_multilabel(tests: dict, name) -> str:
    rows, against = [], []
    for key, t in tests.items():
        a, _, b = key.partition(" vs ")
        against.append(name(b))
        f1, jac, sign = t["macro_f1_difference"], t["jaccard_difference"], t["sign_test"]
        rows.append({
            "first − second": f"{name(a)} − {name(b)}",
            "n": int(t["n"]),
            "Δ macro-F1 [95% CI]": _signed_interval(f1),
            "p (macro-F1)": _p(f1["p_value"]),
            "Δ Jaccard [95% CI]": _signed_interval(jac),
            "p (Jaccard)": _p(jac["p_value"]),
            "first better": int(sign["a_better"]),
            "second better": int(sign["b_better"]),
            "sign test p": _p(sign["p_value"]),
        })
    return (htmlpage.table(pd.DataFrame(rows))
            + f"<p>{_which_pairs(tests, against)}, on the proteins both predicted. Δ: first minus "
              "second, with a paired bootstrap 95% interval and two-sided p (the same resampled proteins for "
              "both methods). Jaccard: the mean of the per-protein Jaccard index. First/second better: proteins "
              "whose predicted set has the higher Jaccard index under that method; the exact sign test asks "
              "whether those split 50/50 (multi-label sets can be partly right, so there is no McNemar test).</p>")


def _which_pairs(tests: dict, against: list[str]) -> str:
    """What the paired tests compare: every method against the best one (first), then pairs
    asked for besides (the ensemble against each of its members)."""
    firsts = [key.partition(" vs ")[0] for key in tests]
    baseline = against[0] if against else "the baseline"
    extra = [a for a, b in zip(firsts, against) if b != baseline]
    which = f"Each method against {htmlpage.escape(baseline)}"
    if extra and set(extra) == {"ensemble"}:
        which += ", and the ensemble against each of its members"
    elif extra:
        which = "Each pair"
    return which


def _signed_interval(d: dict) -> str:
    if d["difference"] != d["difference"]:
        return ""
    return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# How the tables mark a class or label none of the scored proteins has.
ABSENT = "not in the test set"


def _shown_class(c: str, v: dict) -> str:
    return f"{c} ({ABSENT})" if v["support"] == 0 else c


def _per_class(metrics: dict, name) -> list[str]:
    parts = []
    for method, m in metrics.items():
        rows = [{"class": _shown_class(c, v), "support": v["support"], "precision": v["precision"],
                 "recall": v["recall"], "F1 [95% CI]": _interval(v["f1"], v.get("f1_ci95")),
                 "MCC (one vs rest)": v["mcc"]}
                for c, v in m.get("per_class", {}).items()]
        parts.append(f"<h3>{htmlpage.escape(name(method))}</h3>" + htmlpage.table(pd.DataFrame(rows)))
    if any(v["support"] == 0 for m in metrics.values() for v in m.get("per_class", {}).values()):
        parts.append(f"<p>A class marked {ABSENT} has no protein among those scored: its F1 is 0 by convention "
                     "and macro-F1 leaves it out; a prediction of it still counts as an error.</p>")
    return parts


def _per_label(metrics: dict, name) -> list[str]:
    parts = []
    for method, m in metrics.items():
        rows = [{"label": _shown_class(c, v), "support": v["support"], "predicted": v.get("predicted", ""),
                 "threshold": _number(v.get("threshold")), "precision": v["precision"], "recall": v["recall"],
                 "F1 [95% CI]": _interval(v["f1"], v.get("f1_ci95")), "MCC": v["mcc"],
                 "ROC AUC": _number(v.get("roc_auc")), "PR AUC": _number(v.get("pr_auc"))}
                for c, v in m.get("per_class", {}).items()]
        parts.append(f"<h3>{htmlpage.escape(name(method))}</h3>" + htmlpage.table(pd.DataFrame(rows)))
    parts.append("<p>Per label: support = proteins that have it, predicted = proteins given it; threshold = the "
                 "mean of the per-label decision thresholds (chosen on each model's validation fold to maximise "
                 "the label's MCC; 0.5 where no threshold there reaches a positive MCC) over the scored proteins; "
                 "a label is predicted where its probability reaches "
                 "the threshold, and every protein gets at least its most probable label. ROC AUC is left empty "
                 "for a label without both outcomes among the scored proteins, PR AUC (average precision) for one "
                 f"without a positive. A label marked {ABSENT} has F1 0 by convention and stays out of "
                 "macro-F1 and the mean AUCs.</p>")
    return parts


def _number(value) -> float:
    """A value for a table cell; None (undefined) shows as an empty cell."""
    return float("nan") if value is None else float(value)


def _per_group(metrics: dict, name) -> str:
    columns = (MULTILABEL_COLUMNS if is_multilabel(metrics)
               else (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("mcc", "MCC")))
    rows = [{"method": name(method), "group": group, "n": g["n"],
             **{f"{label} [95% CI]": _interval(g[key], (g.get("ci95") or {}).get(key)) for key, label in columns}}
            for method, m in metrics.items() for group, g in (m.get("per_group") or {}).items()]
    if not rows:
        return ""
    if is_multilabel(metrics):
        return (htmlpage.table(pd.DataFrame(rows))
                + "<p>Macro-F1 within a group averages over the labels the group's proteins have; predicting a "
                  "label the group lacks still counts against micro-F1, Jaccard and exact-set accuracy.</p>")
    return (htmlpage.table(pd.DataFrame(rows))
            + "<p>Macro-F1 within a group averages over the classes the group has proteins of (archaea "
              "have no outer membrane); a prediction of a class the group lacks still counts as an error.</p>")


def _commands(value) -> list[str]:
    """The cache's extraction commands: recorded as a JSON list (in a string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _provenance(run: Path, config: dict) -> list[str]:
    parts = []
    # Data.
    recorded = config.get("data_files")
    if recorded:
        rows = [{"role": d["role"], "path": d["path"], "sha256": d["sha256"]} for d in recorded
                if d["role"] != "reference"]
        reference = [d for d in recorded if d["role"] == "reference"]
        if reference:  # a folder of one file per fold pair: one row, every file's hash stays in config.json
            rows.append({"role": "reference", "path": config.get("reference") or str(Path(reference[0]["path"]).parent),
                         "sha256": f"{len(reference)} files; the sha256 of each in config.json (data_files)"})
        frame = pd.DataFrame(rows)
    else:
        data = config.get("data")
        paths = [("data", p) for p in ([data] if isinstance(data, str) else list(data or []))]
        paths += [(r, config.get(k)) for r, k in (("test data", "test_data"), ("reference", "reference"))
                  if config.get(k)]
        frame = pd.DataFrame([{"role": r, "path": p, "sha256": "not recorded"} for r, p in paths])
    cache = config.get("cache_path") or config.get("cache")
    if cache:
        prov = config.get("cache_provenance") or {}
        frame = pd.concat([frame, pd.DataFrame([{
            "role": "embedding cache", "path": cache,
            "sha256": f"identified by its backbone (below); created {prov.get('created', 'unknown')}"}])])
    parts.append("<h3>Data</h3>" + htmlpage.table(frame))
    classes = config.get("classes")
    if config.get("class_names"):
        names = ", ".join(f"{k} = {v}" for k, v in config["class_names"].items())
        parts.append(f"<p>Class names (label value = class): {htmlpage.escape(names)}</p>")
    elif classes:
        multilabel = config.get("multilabel") or config.get("label_cols") or config.get("task") == "multilabel"
        kind = "Labels (multi-label)" if multilabel else "Classes"
        parts.append(f"<p>{kind}: {htmlpage.escape(', '.join(classes))}</p>")

    # Folds.
    info = config.get("folds_info") or {}
    items: list[tuple[str, object]] = [("source", info.get("source")), ("scheme", config.get("scheme"))]
    for key in ("k", "seed", "threshold", "aligner", "removed", "test_data", "test_fold", "n_test",
                "training_sequences_also_in_test_removed", "test_classes_without_training_examples"):
        if key in info:
            items.append((key.replace("_", " "), info[key]))
    sizes = info.get("sizes") or {}
    items.append(("fold sizes", ", ".join(f"{f}: {n}" for f, n in sizes.items())))
    items.append(("proteins", info.get("n")))
    items.append(("splits", ", ".join(config.get("splits") or [])))
    parts.append("<h3>Folds</h3>" + htmlpage.pairs(items))

    # Backbone: the manifest's copy is under the hash config.json records.
    backbone = config.get("backbone")
    manifest_path = run / MANIFEST
    if manifest_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            backbone = json.loads(manifest_path.read_text()).get("backbone", backbone)
    if backbone:
        keys = ("model", "family", "architecture", "weights_sha256", "layer", "pooling", "embed_dim", "dtype",
                "precision", "long_policy", "max_length", "chunk_overlap")
        items = [(k.replace("_", " "), backbone.get(k)) for k in keys if k in backbone]
        prov = config.get("cache_provenance") or {}
        if prov.get("weights"):
            items.append(("weights file", prov["weights"]))
        if prov.get("commands"):
            items.append(("cache made by", "; ".join(_commands(prov["commands"]))))
        parts.append("<h3>Backbone</h3>" + htmlpage.pairs(items))
    else:
        parts.append("<h3>Backbone</h3><p>No embedding cache: heads read sequences.</p>")

    # Heads.
    methods = config.get("methods") or {}
    rows = [{"method": m, "parameters": ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(p.items()))}
            for m, p in methods.items()]
    if rows:
        parts.append("<h3>Head parameters</h3>" + htmlpage.table(pd.DataFrame(rows)))

    # Software and command.
    software = config.get("software")
    parts.append("<h3>Software</h3>" + (htmlpage.pairs(list(software.items())) if software
                                         else "<p>Not recorded (the run predates it).</p>"))
    command = config.get("command")
    text = " ".join(shlex.quote(w) for w in command) if command else "not recorded (the run predates it)"
    items = [("fingerprint", config.get("fingerprint")), ("created", config.get("created")),
             ("manifest sha256", config.get("manifest_sha256"))]
    parts.append("<h3>Command</h3><pre>" + htmlpage.escape(text) + "</pre>" + htmlpage.pairs(items))
    return parts


# -- heads report -----------------------------------------------------------------------------
def rebuild_report(run: Path | str, out: Path | str | None = None) -> Path:
    """Write a finished run's report.html again from its files (into ``out``, default RUN/report.html)."""
    run = Path(run)
    finished = open_finished(run)
    config = finished.config
    metrics_path = run / "metrics.json"
    table_path = run / "comparison.csv"
    for path in (metrics_path, table_path):
        if not path.is_file():
            raise RunDirectoryError(f"{path}: missing; the run is incomplete (run the same heads command again)")
    try:
        saved = json.loads(metrics_path.read_text())
        metrics, tests, baseline = saved["methods"], saved.get("paired_tests", {}), saved.get("baseline")
        if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()) \
                or not isinstance(tests, dict) or not isinstance(baseline, (dict, type(None))):
            raise ValueError("'methods' and 'paired_tests' are not tables of methods")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise RunDirectoryError(f"{metrics_path}: cannot be read as a run's metrics ({err})") from None
    try:
        table = pd.read_csv(table_path)
    except (OSError, ValueError) as err:
        raise RunDirectoryError(f"{table_path}: cannot be read as the run's comparison table ({err})") from None
    needed = ({"method", "n", *(k for k, _ in MULTILABEL_COLUMNS), "predicted_cardinality"} if is_multilabel(metrics)
              else {"method", "n", "accuracy", "macro_f1", "mcc"})
    missing = needed - set(table.columns)
    if missing:
        raise RunDirectoryError(f"{table_path}: not the run's comparison table "
                                f"(no column {', '.join(sorted(missing))})")
    record = config.get("report")
    if record:
        try:
            context = FigureContext(**record["context"])
            figures = [Figure((run / f["png"]).with_suffix(""), f["section"], f["caption"]) for f in record["figures"]]
            notes = [str(n) for n in record.get("notes", [])]
        except (TypeError, KeyError, AttributeError) as err:
            raise RunDirectoryError(f"{run / CONFIG}: its 'report' record is damaged ({type(err).__name__}: {err}); "
                                    "run the same heads command again to rewrite it") from None
        home = run.resolve()
        for figure in figures:
            if not figure.png.resolve().is_relative_to(home):
                raise RunDirectoryError(f"{run / CONFIG}: lists a figure outside the run ({figure.png}); "
                                        "a report shows only the run's own files")
    else:
        context = context_from_config(config)
        figures = legacy_figures(run)
        notes = _markdown_notes(run / "comparison.md")
    target = Path(out) if out is not None else run / REPORT
    if target.is_dir():
        raise RunDirectoryError(f"{target}: is a directory; the report is one file (choose another --out)")
    log.info("writing %s from %s", target, run / CONFIG)
    return write_report_to(target, run, context, figures, metrics, tests, table, config, notes, baseline)


def _markdown_notes(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line[2:] for line in path.read_text().splitlines() if line.startswith("- ")]
