"""Multi-label metrics, paired tests, report and figures; which classes macro-averages include.

Every metric is checked against scikit-learn's own functions on hand-made predictions.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    jaccard_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
)

from heads.cli import main as heads_main
from heads.datasets import LabeledSet
from heads.evaluate import MethodResult, read_reference
from heads.figstyle import FigureContext
from heads.metrics import multilabel_bootstrap, multilabel_metrics, paired_multilabel, per_protein_jaccard
from heads.report import method_metrics, paired_tests, write_run

from test_heads import planted_cache

GOLDEN = Path(__file__).parent / "golden"
CONTEXT = FigureContext("planted/multilabel.csv", "UniRep-256 (unirep256)", "CV over 5 folds", 90)


def hand_made(case: str):
    """(Y, proba, sets) of 4 labels: each case a shape the metrics must get right."""
    rng = np.random.default_rng(3)
    n, n_labels = 40, 4
    Y = np.zeros((n, n_labels), dtype=np.int64)
    Y[np.arange(n), rng.integers(0, n_labels, n)] = 1
    Y[rng.random(n) < 0.3, rng.integers(0, n_labels)] = 1
    proba = np.clip(0.6 * Y + 0.55 * rng.random((n, n_labels)), 0, 1)
    sets = proba >= 0.5
    if case == "label never true":
        Y[:, 2] = 0
        Y[Y.sum(1) == 0, 0] = 1
    elif case == "label never predicted":
        sets[:, 1] = False
    elif case == "label never true nor predicted":
        Y[:, 3] = 0
        Y[Y.sum(1) == 0, 0] = 1
        sets[:, 3] = False
    elif case == "one protein":
        Y, proba, sets = Y[:1], proba[:1], sets[:1]
    elif case == "all correct":
        sets = Y.astype(bool)
    return Y, proba, sets


CASES = ["random", "label never true", "label never predicted", "label never true nor predicted", "one protein",
         "all correct"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.filterwarnings("ignore:A single label was found")  # scikit-learn's MCC of a constant label
def test_multilabel_metrics_equal_scikit_learns_on_hand_made_sets(case):
    Y, proba, sets = hand_made(case)
    classes = ["A", "B", "C", "D"]
    m = multilabel_metrics(Y, proba, sets, classes, thresholds=np.full(Y.shape, 0.5), n_boot=50)
    S = sets.astype(np.int64)
    present = np.flatnonzero(Y.sum(0) > 0)
    precision, recall, f1, support = precision_recall_fscore_support(Y, S, average=None, zero_division=0)
    for j, c in enumerate(classes):
        v = m["per_class"][c]
        assert v["precision"] == pytest.approx(precision[j], abs=1e-9)
        assert v["recall"] == pytest.approx(recall[j], abs=1e-9)
        assert v["f1"] == pytest.approx(f1[j], abs=1e-9)
        assert v["support"] == support[j]
        assert v["mcc"] == pytest.approx(matthews_corrcoef(Y[:, j], S[:, j]), abs=1e-9)
        assert v["threshold"] == pytest.approx(0.5)
        if 0 < Y[:, j].sum() < len(Y):
            assert v["roc_auc"] == pytest.approx(roc_auc_score(Y[:, j], proba[:, j]), abs=1e-9)
        else:
            assert v["roc_auc"] is None  # undefined, never a crash
        if Y[:, j].any():
            assert v["pr_auc"] == pytest.approx(average_precision_score(Y[:, j], proba[:, j]), abs=1e-9)
        else:
            assert v["pr_auc"] is None and v["f1"] == 0.0
    assert m["macro_classes"] == [classes[j] for j in present]
    assert m["macro_f1"] == pytest.approx(f1_score(Y, S, labels=present, average="macro", zero_division=0), abs=1e-9)
    assert m["micro_f1"] == pytest.approx(f1_score(Y, S, average="micro", zero_division=0), abs=1e-9)
    assert m["jaccard"] == pytest.approx(jaccard_score(Y, S, average="samples", zero_division=1), abs=1e-9)
    assert m["exact_set_accuracy"] == pytest.approx(accuracy_score(Y, S), abs=1e-9)
    assert m["hamming_loss"] == pytest.approx(hamming_loss(Y, S), abs=1e-9)
    assert m["cardinality"] == pytest.approx(Y.sum(1).mean())
    assert m["predicted_cardinality"] == pytest.approx(S.sum(1).mean())
    defined = [j for j in present if 0 < Y[:, j].sum() < len(Y)]
    if defined:
        assert m["mean_roc_auc"] == pytest.approx(roc_auc_score(Y[:, defined], proba[:, defined], average="macro"))
    else:
        assert m["mean_roc_auc"] is None
    assert m["mean_pr_auc"] == pytest.approx(average_precision_score(Y[:, present], proba[:, present],
                                                                     average="macro"))
    if case == "all correct":
        assert m["macro_f1"] == m["micro_f1"] == m["jaccard"] == m["exact_set_accuracy"] == 1.0
        assert m["ci95"]["jaccard"] == (1.0, 1.0)


def test_a_label_no_protein_has_but_predicted_stays_out_of_macro_f1_and_counts_against_micro_f1():
    Y, proba, sets = hand_made("label never true")
    sets[:5, 2] = True  # predictions of C, which no protein has
    m = multilabel_metrics(Y, proba, sets, ["A", "B", "C", "D"], n_boot=50)
    assert m["macro_classes"] == ["A", "B", "D"]
    assert m["per_class"]["C"]["support"] == 0 and m["per_class"]["C"]["predicted"] >= 5
    S = sets.astype(np.int64)
    assert m["macro_f1"] == pytest.approx(f1_score(Y[:, [0, 1, 3]], S[:, [0, 1, 3]], average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(Y, S, average="micro"))  # C's false positives count here
    assert m["micro_f1"] < f1_score(Y[:, [0, 1, 3]], S[:, [0, 1, 3]], average="micro")


def test_multilabel_intervals_contain_the_point_value_and_equal_a_slow_loop():
    Y, _, sets = hand_made("label never true")
    Y, sets = Y[:12], sets[:12]
    present = np.flatnonzero(Y.sum(0) > 0)
    ci, f1_ci = multilabel_bootstrap(Y, sets, present, n_boot=300, seed=7)
    idx = np.random.default_rng(7).integers(0, len(Y), (300, len(Y)))  # the draws of the single-label code
    S = sets.astype(np.int64)
    slow = {"macro_f1": [], "micro_f1": [], "jaccard": [], "exact_set_accuracy": [], "f1": []}
    for i in idx:
        # The macro classes stay those of the full set, also where a resample lacks one.
        slow["macro_f1"].append(f1_score(Y[i], S[i], labels=present, average="macro", zero_division=0))
        slow["micro_f1"].append(f1_score(Y[i], S[i], average="micro", zero_division=0))
        slow["jaccard"].append(jaccard_score(Y[i], S[i], average="samples", zero_division=1))
        slow["exact_set_accuracy"].append(accuracy_score(Y[i], S[i]))
        slow["f1"].append(f1_score(Y[i], S[i], average=None, zero_division=0))
    for key, (lo, hi) in ci.items():
        assert (lo, hi) == pytest.approx(tuple(np.percentile(slow[key], [2.5, 97.5])), abs=1e-5), key
    np.testing.assert_allclose(f1_ci, np.percentile(np.array(slow["f1"]), [2.5, 97.5], axis=0).T, atol=1e-5)
    Y, proba, sets = hand_made("random")
    m = multilabel_metrics(Y, proba, sets, list("ABCD"), n_boot=200)
    for key, (lo, hi) in m["ci95"].items():
        assert lo <= m[key] <= hi and lo < hi, key
    for v in m["per_class"].values():
        assert v["f1_ci95"][0] <= v["f1"] <= v["f1_ci95"][1]


def test_the_paired_multilabel_test_is_antisymmetric_and_gives_p_1_for_identical_sets():
    Y, proba, sets_a = hand_made("random")
    sets_b = proba >= 0.65
    present = np.arange(4)
    ab = paired_multilabel(Y, sets_a, sets_b, present, n_boot=300, seed=1)
    ba = paired_multilabel(Y, sets_b, sets_a, present, n_boot=300, seed=1)
    jaccard = jaccard_score(Y, sets_a.astype(int), average="samples") - jaccard_score(Y, sets_b.astype(int),
                                                                                       average="samples")
    macro = f1_score(Y, sets_a.astype(int), average="macro") - f1_score(Y, sets_b.astype(int), average="macro")
    assert ab["jaccard_difference"]["difference"] == pytest.approx(jaccard)
    assert ab["macro_f1_difference"]["difference"] == pytest.approx(macro)
    for key in ("jaccard_difference", "macro_f1_difference"):
        assert ab[key]["difference"] == pytest.approx(-ba[key]["difference"], abs=1e-12)
        assert ab[key]["ci95"] == pytest.approx((-ba[key]["ci95"][1], -ba[key]["ci95"][0]), abs=1e-9)
        assert ab[key]["p_value"] == ba[key]["p_value"]
        assert ab[key]["ci95"][0] <= ab[key]["difference"] <= ab[key]["ci95"][1]
    d = per_protein_jaccard(Y, sets_a) - per_protein_jaccard(Y, sets_b)
    assert (ab["sign_test"]["a_better"], ab["sign_test"]["b_better"]) == (int((d > 0).sum()), int((d < 0).sum()))
    assert ab["sign_test"]["a_better"] == ba["sign_test"]["b_better"]
    assert ab["sign_test"]["p_value"] == ba["sign_test"]["p_value"]
    same = paired_multilabel(Y, sets_a, sets_a.copy(), present, n_boot=300, seed=1)
    for key in ("jaccard_difference", "macro_f1_difference"):
        assert same[key]["difference"] == 0.0 and same[key]["p_value"] == 1.0 and same[key]["ci95"] == (0.0, 0.0)
    assert same["sign_test"] == {"a_better": 0, "b_better": 0, "p_value": 1.0}


# ---------------------------------------------------------------- results as a run makes them

def multilabel_set(n: int = 90, seed: int = 0, classes=("A", "B", "C")) -> tuple[LabeledSet, list[MethodResult]]:
    rng = np.random.default_rng(seed)
    L = len(classes)
    Y = np.zeros((n, L), dtype=np.int64)
    Y[np.arange(n), np.arange(n) % L] = 1
    Y[np.arange(n) % 4 == 0, (np.arange(n)[np.arange(n) % 4 == 0] + 1) % L] = 1
    data = LabeledSet("ml", [f"p{i}" for i in range(n)], ["M" * int(rng.integers(20, 300)) for _ in range(n)], Y,
                      list(classes), None, np.arange(n) % 3)
    results = []
    for name, signal in (("logreg", 2.0), ("lightgbm", 0.8)):
        logits = rng.normal(size=(n, L)) - 1 + 2 * signal * Y
        thresholds = np.clip(0.5 + 0.05 * rng.normal(size=(n, L)), 0.05, 0.95)
        results.append(MethodResult(name, 1 / (1 + np.exp(-logits)), data.folds.copy(), thresholds=thresholds))
    return data, results


def test_a_method_that_predicted_some_proteins_is_scored_on_those_and_tested_on_those_both_predicted():
    data, (a, b) = multilabel_set()
    a.proba[:10] = np.nan  # not predicted
    a.thresholds[:10] = np.nan
    b.proba[5:15, 1] = np.nan  # a NaN in one label: the protein is not predicted
    m = method_metrics(a, data, n_boot=50)
    keep = np.arange(10, len(data))
    assert m["n"] == len(keep)
    sets = a.sets()
    assert not sets[:10].any()
    assert m["jaccard"] == pytest.approx(jaccard_score(data.labels[keep], sets[keep].astype(int), average="samples"))
    tests = paired_tests([a, b], data, [("logreg", "lightgbm")], n_boot=50)
    test = tests["logreg vs lightgbm"]
    both = np.r_[np.arange(15, len(data))]
    assert test["n"] == len(both) and "mcnemar" not in test
    expected = (jaccard_score(data.labels[both], a.sets()[both].astype(int), average="samples")
                - jaccard_score(data.labels[both], b.sets()[both].astype(int), average="samples"))
    assert test["jaccard_difference"]["difference"] == pytest.approx(expected)


def test_multilabel_results_without_thresholds_are_refused_with_a_message():
    data, (a, _) = multilabel_set()
    a.thresholds = None
    with pytest.raises(ValueError, match="logreg: multi-label probabilities without per-label thresholds"):
        method_metrics(a, data, n_boot=10)


# ---------------------------------------------------------------- the class rule, single-label

def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "macro_classes"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.parametrize("n_classes,golden", [(3, "single_label_multiclass_metrics.json"),
                                              (2, "single_label_binary_metrics.json")])
def test_single_label_metrics_are_unchanged_where_every_class_is_present(tmp_path, n_classes, golden):
    """metrics.json of a run whose proteins have every class, written by the code before the class
    rule, is what the code writes now (plus the macro_classes it records)."""
    from test_figures import CONTEXT as SINGLE
    from test_figures import synthetic_run

    data, results, _ = synthetic_run(n_classes, groups=n_classes == 3)
    write_run(tmp_path, {"scheme": "simple", "backbone": None}, data, results, "t", n_boot=200, context=SINGLE,
              figures=False)
    now = json.loads((tmp_path / "metrics.json").read_text())
    before = json.loads((GOLDEN / golden).read_text())
    assert json.dumps(_strip(now)) == json.dumps(before)
    assert all(m["macro_classes"] == data.classes for m in now["methods"].values())


def single_label_without_d(tmp_path):
    """Classes A-D, no protein of D; a head that predicts D for some proteins, and a reference read from files."""
    rng = np.random.default_rng(5)
    n = 60
    classes = ["A", "B", "C", "D"]
    y = np.arange(n) % 3
    data = LabeledSet("four", [f"p{i}" for i in range(n)], ["MK" * 10] * n, y, classes, None, np.arange(n) % 2)
    logits = rng.normal(size=(n, 4))
    logits[np.arange(n), y] += 1.5
    logits[:8, 3] += 5  # predicts D, which no protein has
    head = MethodResult("logreg", np.exp(logits) / np.exp(logits).sum(1, keepdims=True), data.folds.copy())
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    other = rng.random((n, 4))
    other[np.arange(n), y] += 0.8
    other[10:14, 3] += 3
    other /= other.sum(1, keepdims=True)
    for fold in (0, 1):
        rows = np.flatnonzero(data.folds == fold)
        pd.DataFrame(other[rows], index=[data.ids[i] for i in rows], columns=classes).to_csv(
            ref_dir / f"model_{fold}_{1 - fold}.csv")
    return data, head, read_reference(ref_dir, data)


def test_macro_f1_of_a_test_set_lacking_a_class_is_over_the_classes_present_for_a_head_and_a_reference(tmp_path):
    data, head, reference = single_label_without_d(tmp_path)
    present = [0, 1, 2]
    idx = np.random.default_rng(0).integers(0, len(data), (100, len(data)))
    for result in (head, reference):
        pred = result.proba.argmax(1)
        assert (pred == 3).any()  # D is predicted, so its errors must count
        m = method_metrics(result, data, n_boot=100, seed=0)
        assert m["macro_classes"] == ["A", "B", "C"]
        assert m["macro_f1"] == pytest.approx(f1_score(data.labels, pred, labels=present, average="macro"))
        assert m["macro_f1"] > f1_score(data.labels, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)
        assert m["per_class"]["D"]["support"] == 0 and m["per_class"]["D"]["f1"] == 0.0
        slow = [f1_score(data.labels[i], pred[i], labels=present, average="macro", zero_division=0) for i in idx]
        assert m["ci95"]["macro_f1"] == pytest.approx(tuple(np.percentile(slow, [2.5, 97.5])), abs=1e-5)
    test = paired_tests([head, reference], data, [("logreg", "reference")], n_boot=100)["logreg vs reference"]
    expected = (f1_score(data.labels, head.proba.argmax(1), labels=present, average="macro")
                - f1_score(data.labels, reference.proba.argmax(1), labels=present, average="macro"))
    assert test["macro_f1_difference"]["difference"] == pytest.approx(expected)
    assert test["macro_classes"] == ["A", "B", "C"]
    # Said in the notes, and marked in the per-class table.
    summary = write_run(tmp_path / "run", {"scheme": "simple", "backbone": None}, data, [head, reference], "t",
                        n_boot=100, context=CONTEXT, figures=False)
    assert summary["metrics"]["reference"]["macro_f1"] == pytest.approx(
        f1_score(data.labels, reference.proba.argmax(1), labels=present, average="macro"))
    md = (tmp_path / "run" / "comparison.md").read_text()
    assert "averages over the 3 classes the scored proteins have; left out, as no scored protein has them: D" in md
    page = (tmp_path / "run" / "report.html").read_text()
    assert "left out, as no scored protein has them: D" in page
    assert '<td class="text">D (not in the test set)</td><td>0</td>' in page


# ---------------------------------------------------------------- report and figures

def _svg_text(path: Path) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", path.read_text()).split())


def test_a_multilabel_report_shows_labels_escaped_thresholds_and_the_jaccard_test(tmp_path):
    data, results = multilabel_set(classes=("<i>Nucleus</i>", "Cyto;plasm", "Extra & cellular", "Plastid"))
    data.labels[:, 3] = 0  # a label no protein has
    rng = np.random.default_rng(2)
    features = rng.normal(size=(len(data), 8)).astype(np.float32)
    summary = write_run(tmp_path, {"scheme": "simple", "backbone": None, "label_cols": ["auto"]}, data, results,
                        "t", n_boot=100, context=CONTEXT, features=features)
    page = (tmp_path / "report.html").read_text()
    assert "<i>Nucleus" not in page and "&lt;i&gt;Nucleus&lt;/i&gt;" in page
    assert "Extra &amp; cellular" in page and "Cyto;plasm" in page
    assert '<td class="text">Plastid (not in the test set)</td><td>0</td>' in page
    assert "<h2>Per label</h2>" in page and "<h2>Per class</h2>" not in page and "McNemar p</th>" not in page
    m = summary["metrics"]["logreg"]
    threshold = m["per_class"]["Cyto;plasm"]["threshold"]
    assert threshold == pytest.approx(results[0].thresholds[:, 1].mean())
    assert f"<td>{threshold:.3f}</td>" in page
    (test,) = summary["tests"].values()
    j = test["jaccard_difference"]
    assert f"{j['difference']:+.3f} [{j['ci95'][0]:+.3f}, {j['ci95'][1]:+.3f}]" in page and "sign test p" in page
    md = (tmp_path / "comparison.md").read_text()
    assert f"sign test p={test['sign_test']['p_value']:.3g}" in md and "McNemar" not in md
    assert "left out, as no scored protein has them: Plastid" in md
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert list(table.columns[:12]) == ["method", "n", "macro_f1", "macro_f1_ci95", "micro_f1", "micro_f1_ci95",
                                        "jaccard", "jaccard_ci95", "exact_set_accuracy", "exact_set_accuracy_ci95",
                                        "predicted_cardinality", "mean_roc_auc"]
    stems = [f.stem.name for f in summary["figures"]]
    assert stems == ["comparison", "per_label_f1", "roc_per_label", "pr_per_label", "jaccard_by_length",
                     "embedding_map"]
    assert "Jaccard" in _svg_text(tmp_path / "plots" / "comparison.svg")
    assert "Plastid (n=0, not in the test set)" in _svg_text(tmp_path / "plots" / "per_label_f1.svg")
    assert "no protein has it (not in the test set): no curve" in _svg_text(tmp_path / "plots" / "roc_per_label.svg")
    assert "&lt;i&gt;Nucleus&lt;/i&gt; (n=" in (tmp_path / "plots" / "roc_per_label.svg").read_text()
    baseline = json.loads((tmp_path / "metrics.json").read_text())["baseline"]["majority_set"]
    assert baseline["set"] and 0 < baseline["share"] <= 1


# ---------------------------------------------------------------- a whole run

@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory, tiny_weights):
    import heads.run
    from heads.run import RunConfig, run_comparison

    tmp = tmp_path_factory.mktemp("multilabel_run")
    csv, cache = planted_cache(tmp, tiny_weights, n_per_class=12)
    frame = pd.read_csv(csv)
    k = frame["label"].str[-1].astype(int).to_numpy()
    labels = {"<b>Nucleus</b>": k == 0, "Cytoplasm \"soluble\"": k == 1,
              "Membrane & wall": (k == 2) | (np.arange(len(k)) % 4 == 0)}
    multi = frame[["id", "sequence"]].assign(**{name: v.astype(int) for name, v in labels.items()})
    path = tmp / "multilabel.csv"
    multi.to_csv(path, index=False)
    config = RunConfig(data=str(path), cache=str(cache), heads=("logreg", "lightgbm"), label_cols=("auto",),
                       folds="stratified", k=3, n_boot=100, figures=True,
                       head_params={"logreg": {"Cs": [0.1, 1.0]}, "lightgbm": {"n_estimators": 20, "n_jobs": 1}})
    # Multi-label stratified folds come from elsewhere; these folds are given.
    real = heads.run.stratified_folds
    heads.run.stratified_folds = lambda labels, sequences, k, seed: np.arange(len(sequences)) % k
    try:
        run_comparison(config, tmp / "run")
    finally:
        heads.run.stratified_folds = real
    return tmp / "run"


def test_a_multilabel_run_writes_its_metrics_tables_report_and_figures(multilabel_run):
    out = multilabel_run
    metrics = json.loads((out / "metrics.json").read_text())
    for m in metrics["methods"].values():
        assert m["multilabel"] and {"macro_f1", "micro_f1", "jaccard", "exact_set_accuracy", "hamming_loss",
                                    "cardinality", "predicted_cardinality", "ci95"} <= set(m)
        assert set(m["per_class"]) == {"<b>Nucleus</b>", "Cytoplasm \"soluble\"", "Membrane & wall"}
        assert all(v["threshold"] is not None for v in m["per_class"].values())
    (key,) = metrics["paired_tests"]
    assert {"jaccard_difference", "sign_test", "macro_f1_difference"} <= set(metrics["paired_tests"][key])
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 2 * 36
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["method"]) == ["logreg", "lightgbm"]
    for name, m in metrics["methods"].items():
        assert table.set_index("method").loc[name, "jaccard"] == pytest.approx(m["jaccard"])
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;Nucleus&lt;/b&gt;" in page and "<b>Nucleus" not in page
    assert "Cytoplasm &quot;soluble&quot;" in page and "Membrane &amp; wall" in page
    assert "Labels (multi-label)" in page
    for stem in ("comparison", "per_label_f1", "roc_per_label", "pr_per_label", "jaccard_by_length", "embedding_map"):
        assert (out / "plots" / f"{stem}.png").is_file() and (out / "plots" / f"{stem}.svg").is_file()
    assert page.count("data:image/png;base64,") == len(list((out / "plots").glob("*.png")))


def test_heads_report_rebuilds_a_multilabel_report_byte_for_byte(multilabel_run, tmp_path):
    rebuilt = tmp_path / "rebuilt.html"
    result = CliRunner().invoke(heads_main, ["report", str(multilabel_run), "--out", str(rebuilt)])
    assert result.exit_code == 0, result.output
    assert rebuilt.read_bytes() == (multilabel_run / "report.html").read_bytes()
    # A table without the multi-label columns is refused, naming them.
    damaged = tmp_path / "run"
    shutil.copytree(multilabel_run, damaged)
    pd.read_csv(damaged / "comparison.csv").drop(columns=["jaccard"]).to_csv(damaged / "comparison.csv", index=False)
    result = CliRunner().invoke(heads_main, ["report", str(damaged)])
    assert result.exit_code == 1 and "no column jaccard" in result.output


@pytest.mark.skipif(shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
                    reason="needs Chromium (Debian package chromium) to render the page")
def test_chromium_renders_a_multilabel_report_without_a_problem(multilabel_run):
    from test_htmlreport import load_checker

    assert load_checker().check_page(multilabel_run / "report.html") == []


def test_majority_and_chance_lines_average_over_the_classes_present():
    from heads.figures import baselines

    labels = np.array([0] * 6 + [1] * 4)  # three classes, none of class 2
    base = baselines(labels, 3)
    assert base["majority"]["macro_f1"] == pytest.approx(f1_score(labels, np.zeros(10, int), labels=[0, 1],
                                                                  average="macro"))
    expected = np.mean([2 * p / 3 / (p + 1 / 3) for p in (0.6, 0.4)])  # a guess may still name class 2
    assert base["chance"]["macro_f1"] == pytest.approx(expected) and base["chance"]["accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("panels", [3, 4])
def test_grouped_bars_on_shared_axes_read_top_down_whatever_the_number_of_panels(panels):
    from heads.figstyle import pyplot
    from heads.figures import _grouped_hbars

    plt = pyplot()
    fig, axes = plt.subplots(1, panels, sharey=True)
    for ax in axes:
        _grouped_hbars(ax, ["first", "second"], ["m"], np.array([[0.5, 0.6]]), np.full((1, 2, 2), np.nan))
    assert all(ax.yaxis_inverted() for ax in axes)  # the first row at the top
    plt.close(fig)
