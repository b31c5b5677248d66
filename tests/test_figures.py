from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from heads.datasets import LabeledSet
from heads.evaluate import MethodResult
from heads.figstyle import FigureContext
from heads.figures import baselines, length_bins
from heads.metrics import bootstrap_per_class_f1, per_class_f1_from_confusion
from heads.report import write_run
from heads.run import RunConfig, _fingerprint_settings, figure_context
from heads.rundir import run_fingerprint


def synthetic_run(n_classes: int, n: int = 150, groups: bool = False, seed: int = 0):
    """A labelled set, two methods' probabilities (one better than the other, one with training curves)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    classes = [f"Class {chr(65 + k)}" for k in range(n_classes)]
    sequences = ["M" * int(rng.integers(30, 400)) for _ in range(n)]
    data = LabeledSet("synthetic", [f"p{i}" for i in range(n)], sequences, labels, classes,
                      np.array(["Gram+", "Gram-", "Archaea"])[np.arange(n) % 3] if groups else None,
                      np.arange(n) % 5)
    results = []
    for name, signal in (("logreg", 2.5), ("attention", 1.0)):
        logits = rng.normal(size=(n, n_classes))
        logits[np.arange(n), labels] += signal
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        result = MethodResult(name, proba, data.folds.copy())
        if name == "attention":
            result.splits = [{"split": f"test{t}_val{(t + 1) % 5}", "best_epoch": 3,
                              "history": [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e + 0.01 * e,
                                           "val_macro_f1": 0.5 + 0.05 * min(e, 3)} for e in range(1, 7)]}
                             for t in range(5)]
        results.append(result)
    features = rng.normal(size=(n, 16)).astype(np.float32) + labels[:, None]
    return data, results, features


CONTEXT = FigureContext("planted/synthetic.csv", "UniRep-256 (unirep256)", "CV over 5 stratified random folds (seed 0)",
                        150)


def _svg_text(path) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", path.read_text()).split())


def _check_saved(figure) -> None:
    """SVG and PNG both written; the PNG at 200 dpi or more (its pHYs and its pixels against the SVG's size)."""
    assert figure.svg.stat().st_size > 0 and figure.png.stat().st_size > 0
    with Image.open(figure.png) as image:
        dpi = image.info["dpi"]
        width_px = image.size[0]
    assert min(dpi) >= 199.5, dpi
    width_pt = float(re.search(r'<svg[^>]*width="([\d.]+)pt"', figure.svg.read_text()).group(1))
    assert width_px >= width_pt / 72 * 200 * 0.97, (width_px, width_pt)  # tight bounding boxes differ slightly


def _write(tmp_path, data, results, features, context):
    config = {"scheme": "simple", "backbone": None}
    return write_run(tmp_path, config, data, results, "t", n_boot=200, context=context, features=features)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multiclass")
    data, results, features = synthetic_run(3, groups=True)
    return data, _write(tmp_path, data, results, features, CONTEXT), tmp_path


def test_multiclass_run_draws_every_figure_titled_with_the_run(multiclass):
    data, summary, tmp_path = multiclass
    stems = [f.stem.name for f in summary["figures"]]
    assert stems == ["comparison", "confusion_logreg", "confusion_attention", "per_class_f1", "per_group",
                     "roc_pr_logreg", "roc_pr_attention", "training_attention", "accuracy_by_length",
                     "embedding_map"]
    for figure in summary["figures"]:
        _check_saved(figure)
        assert figure.stem.parent == tmp_path / "plots" and figure.caption and figure.section
        text = _svg_text(figure.svg)
        for part in CONTEXT.subtitle().split(" · "):
            assert part in text, (figure.stem.name, part)
    # Methods by their readable names, the reference by the tool's name.
    assert "logistic regression" in _svg_text(tmp_path / "plots" / "comparison.svg")
    assert "Class A (n=50)" in _svg_text(tmp_path / "plots" / "per_class_f1.svg")
    assert "Gram+ (n=50)" in _svg_text(tmp_path / "plots" / "per_group.svg")
    assert "epoch kept" in _svg_text(tmp_path / "plots" / "training_attention.svg")


def test_binary_run_draws_one_roc_pr_figure_with_every_method_and_its_auc(tmp_path):
    data, results, features = synthetic_run(2)
    summary = _write(tmp_path, data, results, features, CONTEXT)
    stems = {f.stem.name for f in summary["figures"]}
    assert stems == {"comparison", "confusion_logreg", "confusion_attention", "per_class_f1", "roc_pr",
                     "training_attention", "accuracy_by_length", "embedding_map"}
    for figure in summary["figures"]:
        _check_saved(figure)
    text = _svg_text(tmp_path / "plots" / "roc_pr.svg")
    metrics = summary["metrics"]
    for name, title in (("logreg", "logistic regression"), ("attention", "attention")):
        assert f"(AUC {metrics[name]['roc_auc']:.3f})" in text and title in text
        assert f"(AP {metrics[name]['pr_auc']:.3f})" in text


def test_ten_class_confusion_matrix_has_a_colour_bar_and_every_class(tmp_path):
    data, results, _ = synthetic_run(10, n=300)
    summary = _write(tmp_path, data, results[:1], None, replace(CONTEXT, n=300))
    figure = next(f for f in summary["figures"] if f.stem.name == "confusion_logreg")
    _check_saved(figure)
    text = _svg_text(figure.svg)
    assert "share of the true class (row-normalised)" in text  # the colour bar's label
    assert all(f"{c} (n=30)" in text for c in data.classes)
    assert "embedding_map" not in {f.stem.name for f in summary["figures"]}  # no features, no map


def test_per_class_f1_intervals_are_saved_and_contain_the_point_estimate(multiclass):
    data, _, tmp_path = multiclass
    metrics = json.loads((tmp_path / "metrics.json").read_text())["methods"]
    for m in metrics.values():
        for c in data.classes:
            lo, hi = m["per_class"][c]["f1_ci95"]
            assert lo <= m["per_class"][c]["f1"] <= hi and lo < hi
        for g in m["per_group"].values():
            for key in ("accuracy", "macro_f1", "mcc"):
                assert g["ci95"][key][0] <= g[key] <= g["ci95"][key][1]


def test_per_class_f1_intervals_match_a_direct_recomputation():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 1, 2, 1, 2, 2, 0, 2, 1])
    ci = bootstrap_per_class_f1(y, pred, 3, n_boot=300, seed=7)
    idx = np.random.default_rng(7).integers(0, len(y), (300, len(y)))  # the draws _resampled_confusions makes
    direct = np.array([f1_score(y[i], pred[i], labels=[0, 1, 2], average=None, zero_division=0) for i in idx])
    np.testing.assert_allclose(ci, np.percentile(direct, [2.5, 97.5], axis=0).T, atol=1e-5)


def test_majority_and_chance_lines_follow_from_the_class_shares():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    base = baselines(labels, 3)
    assert base["majority"]["accuracy"] == pytest.approx(0.6)
    # Always predicting class 0: its F1 is 2*6/(6+10), the others' 0.
    assert base["majority"]["macro_f1"] == pytest.approx(2 * 6 / 16 / 3)
    # Uniform guessing: each true class spreads evenly over the predicted columns.
    expected = np.bincount(labels)[:, None] * np.full((3, 3), 1 / 3)
    assert base["chance"]["macro_f1"] == pytest.approx(per_class_f1_from_confusion(expected).mean())
    assert base["chance"]["accuracy"] == pytest.approx(1 / 3)


def test_length_bins_cover_every_length_once():
    lengths = np.array([10, 10, 10, 50, 60, 70, 200, 1000])
    edges = length_bins(lengths, 4)
    which = np.searchsorted(edges, lengths, side="right") - 1
    assert edges[0] == 10 and edges[-1] == 1001 and (np.diff(edges) > 0).all()
    assert ((which >= 0) & (which < len(edges) - 1)).all()


def test_reference_name_and_figures_switch_do_not_change_the_fingerprint(tmp_path):
    data, results, _ = synthetic_run(3)
    plain = RunConfig(data="x.fasta", reference="ref")
    named = replace(plain, reference_name="DeepLocPro")
    assert run_fingerprint(_fingerprint_settings(plain), None, {}, data) == \
        run_fingerprint(_fingerprint_settings(named), None, {}, data)
    assert run_fingerprint(_fingerprint_settings(plain), None, {}, data) == \
        run_fingerprint(_fingerprint_settings(replace(plain, figures=False)), None, {}, data)
    assert run_fingerprint(_fingerprint_settings(plain), None, {}, data) != \
        run_fingerprint(_fingerprint_settings(replace(plain, n_boot=500)), None, {}, data)
    context = figure_context(named, data, {"source": "file", "sizes": dict.fromkeys(range(5), 30)}, 5, None, None)
    assert context.method_title("reference") == "DeepLocPro (own model)" and "the file's 5 folds" in context.folds
    results[1].name = "reference"
    _write(tmp_path, data, results, None, context)
    assert "DeepLocPro" in _svg_text(tmp_path / "plots" / "comparison.svg")
    # The reference's own figures do not claim it ran on this run's embeddings.
    own = _svg_text(tmp_path / "plots" / "confusion_reference.svg")
    assert "DeepLocPro's own predictions" in own and context.backbone not in own
    assert context.backbone in _svg_text(tmp_path / "plots" / f"confusion_{results[0].name}.svg")
    assert "| DeepLocPro (reference) |" in (tmp_path / "comparison.md").read_text()
    assert "reference" in json.loads((tmp_path / "metrics.json").read_text())["methods"]
