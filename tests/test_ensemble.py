"""The ensemble row of a comparison: mean of the members or stacking on the validation folds, and predict."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from embedcache.store import EmbeddingCache
from heads.base import Head
from heads.cli import main as heads_main
from heads.combine import (
    STACK_C,
    Stacker,
    check_kind,
    fit_stacker,
    mean_ensemble,
    predict_combined,
    stack_ensemble,
)
from heads.datasets import LabeledSet
from heads.evaluate import MethodResult, cross_validate
from heads.features import FeatureSource
from heads.folds import SimpleCV
from heads.multilabel import choose_thresholds
from heads.registry import make_head
from heads.run import RunConfig, load_data
from heads.run import predict as predict_frame

from test_heads import planted_cache

FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--set", "lightgbm.n_estimators=20", "--set", "lightgbm.n_jobs=1",
        "--set", "lightgbm.min_child_samples=5", "--bootstrap", "100", "--folds", "stratified", "--no-figures"]
MEMBERS = ["logreg", "lightgbm"]


def run_cli(*args):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def compare(csv, cache, out, *extra, heads="logreg,lightgbm"):
    return run_cli("compare", "--cache", cache, "--data", csv, "--heads", heads, "--k", 3, "--out", out, *FAST,
                   *extra)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted_ensemble")
    return planted_cache(tmp, tiny_weights, n_per_class=20)


@pytest.fixture(scope="module")
def runs(planted, tmp_path_factory):
    """One finished run with a mean ensemble and one with stacking, shared by the tests that only read them."""
    csv, cache = planted
    tmp = tmp_path_factory.mktemp("ensemble_runs")
    made = {}
    for kind in ("mean", "stack"):
        result = compare(csv, cache, tmp / kind, "--ensemble", kind)
        assert result.exit_code == 0, result.output
        made[kind] = tmp / kind
    return made


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# -- the run's outputs -------------------------------------------------------------------------

def test_the_mean_ensemble_is_the_mean_of_the_members_probabilities_in_predictions_csv(runs):
    pred = pd.read_csv(runs["mean"] / "predictions.csv")
    columns = [c for c in pred.columns if c.startswith("p_")]
    by_method = {m: g.set_index("id").sort_index() for m, g in pred.groupby("method")}
    assert set(by_method) == {*MEMBERS, "ensemble"}
    hand = sum(by_method[m][columns] for m in MEMBERS) / len(MEMBERS)
    ensemble = by_method["ensemble"]
    assert list(ensemble.index) == list(hand.index)  # the same proteins
    np.testing.assert_allclose(ensemble[columns].to_numpy(), hand.to_numpy(), atol=1e-5)
    # Every member differs from the mean: the row is not one member's copy.
    for m in MEMBERS:
        assert np.abs(by_method[m][columns].to_numpy() - hand.to_numpy()).max() > 1e-3
    assert (ensemble["test_fold"] == by_method["logreg"]["test_fold"]).all()


def test_the_ensemble_row_has_metrics_and_paired_tests_against_every_member(runs):
    for kind, run in runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["methods"]["ensemble"]["n"] == 60
        for key in ("accuracy", "macro_f1", "mcc", "ci95", "per_class", "confusion"):
            assert key in metrics["methods"]["ensemble"], (kind, key)
        tests = metrics["paired_tests"]
        for member in MEMBERS:
            pair = f"ensemble vs {member}" if f"ensemble vs {member}" in tests else f"{member} vs ensemble"
            assert tests[pair]["n"] == 60 and "mcnemar" in tests[pair], (kind, member, list(tests))
        table = pd.read_csv(run / "comparison.csv")
        assert list(table["method"]) == [*MEMBERS, "ensemble"]
        assert "ensemble" in json.loads((run / "splits.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert config["ensemble"] == kind and config["ensemble_members"] == MEMBERS
    page = (runs["mean"] / "report.html").read_text()
    assert "ensemble: mean of the probabilities of logreg, lightgbm" in page
    metrics = json.loads((runs["mean"] / "metrics.json").read_text())["methods"]
    if max(metrics, key=lambda m: metrics[m]["macro_f1"]) != "ensemble":
        assert "and the ensemble against each of its members, on the proteins both predicted" in page
    else:
        assert "Each method against ensemble, on the proteins both predicted" in page
    assert "ensemble: stacking of logreg, lightgbm" in (runs["stack"] / "comparison.md").read_text()


def test_stackers_are_model_files_of_the_manifest_with_their_sha256(runs):
    run = runs["stack"]
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    assert manifest["ensemble"] == {"kind": "stack", "members": MEMBERS, "multilabel": False, "thresholds": None}
    stackers = [e for e in manifest["models"] if e["method"] == "ensemble"]
    assert [e["split"] for e in stackers] == ["test0_val1", "test1_val2", "test2_val0"]
    for entry in stackers:
        path = run / "models" / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        stacker = Stacker.from_json(path.read_text())
        assert stacker.members == MEMBERS and stacker.split == entry["split"]
    splits = json.loads((run / "splits.json").read_text())["ensemble"]
    assert all(set(s["member_weights"]) == set(MEMBERS) and s["C"] == STACK_C for s in splits)
    mean = json.loads((runs["mean"] / "models" / "manifest.json").read_text())
    assert not any(e["method"] == "ensemble" for e in mean["models"])  # the mean has no files of its own


def test_a_run_without_ensemble_writes_its_manifest_as_before(planted, tmp_path):
    csv, cache = planted
    assert compare(csv, cache, tmp_path / "plain").exit_code == 0
    manifest = json.loads((tmp_path / "plain" / "models" / "manifest.json").read_text())
    assert "ensemble" not in manifest
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["ensemble"] is None and "ensemble_members" not in config
    assert "ensemble" not in pd.read_csv(tmp_path / "plain" / "comparison.csv")["method"].tolist()


def test_the_ensemble_figures_are_drawn_like_any_methods(planted, tmp_path):
    """A method without models or training curves: its confusion, ROC and length figures, no training figure."""
    from heads.figstyle import FigureContext
    from heads.figures import confusion_figure, curve_figures, length_figure, training_figure
    from heads.report import method_metrics

    csv, cache = planted
    data, members = member_results(csv, cache)
    ensemble = mean_ensemble(members, data).result
    context = FigureContext("planted", "tiny", "3 folds", len(data))
    folder = tmp_path / "plots"
    confusion_figure(folder, context, data, "ensemble", method_metrics(ensemble, data, n_boot=100))
    curve_figures(folder, context, data, [ensemble])
    length_figure(folder, context, data, [ensemble])
    assert training_figure(folder, context, ensemble) is None
    drawn = {p.name for p in folder.iterdir()}
    assert {"confusion_ensemble.png", "roc_pr_ensemble.svg", "accuracy_by_length.png"} <= drawn


# -- the library: members of one run ----------------------------------------------------------

def member_results(csv, cache) -> tuple[LabeledSet, list[MethodResult]]:
    data, _ = load_data(RunConfig(data=str(csv), cache=str(cache), folds="stratified", k=3))
    splits = SimpleCV().split(data.require_folds())
    heads = {"logreg": make_head("logreg", {"Cs": [0.1, 1.0]}),
             "lightgbm": make_head("lightgbm", {"n_estimators": 20, "n_jobs": 1, "min_child_samples": 5})}
    with EmbeddingCache(cache) as c:
        features = FeatureSource(c, data.sequences, ids=data.ids)
        members = [cross_validate(h, data, features, splits, name, keep_models=False) for name, h in heads.items()]
    return data, members


def only_split(result: MethodResult, i: int) -> MethodResult:
    return replace(result, validation=[result.validation[i]], split_test=[result.split_test[i]])


def test_stacking_never_sees_the_test_folds_labels(planted):
    """Per split, other labels on the test fold give the same stacker and the same ensemble probabilities."""
    csv, cache = planted
    data, members = member_results(csv, cache)
    rng = np.random.default_rng(0)
    for i, (split, _) in enumerate(members[0].split_test):
        mine = [only_split(m, i) for m in members]
        other = data.subset(np.arange(len(data)))
        other.labels = data.labels.copy()
        other.labels[split.test] = rng.permutation(data.labels[split.test])[::-1]
        assert (other.labels[split.test] != data.labels[split.test]).any()
        a, b = stack_ensemble(mine, data), stack_ensemble(mine, other)
        np.testing.assert_array_equal(a.result.split_test[0][1], b.result.split_test[0][1])
        np.testing.assert_array_equal(a.stackers[0].coef, b.stackers[0].coef)
        # ...while other validation labels do change it: the stacker is fitted on them.
        other.labels[split.val] = rng.permutation(data.labels[split.val])
        c = stack_ensemble(mine, other)
        assert np.abs(c.result.split_test[0][1] - a.result.split_test[0][1]).max() > 1e-3


def test_the_mean_ensemble_equals_the_mean_of_the_members_on_every_split(planted):
    csv, cache = planted
    data, members = member_results(csv, cache)
    combined = mean_ensemble(members, data)
    np.testing.assert_allclose(combined.result.proba, (members[0].proba + members[1].proba) / 2, atol=1e-12)
    assert combined.result.thresholds is None and combined.members == MEMBERS
    np.testing.assert_array_equal(combined.result.folds, members[0].folds)


# -- synthetic members -----------------------------------------------------------------------

def synthetic(labels: np.ndarray, n_classes: int, k: int = 3) -> tuple[LabeledSet, list]:
    n = len(labels)
    folds = np.arange(n) % k
    data = LabeledSet("synthetic", [f"p{i}" for i in range(n)], ["M"] * n, labels,
                      [f"c{j}" for j in range(n_classes)], folds=folds)
    return data, SimpleCV().split(folds)


def member(name: str, data: LabeledSet, splits, val_fn, test_fn) -> MethodResult:
    """A member whose split models give val_fn(rows) on validation and test_fn(rows) on the test fold."""
    per_split = [(s, test_fn(s.test)) for s in splits]
    total = np.zeros((len(data), data.n_classes))
    for s, p in per_split:
        total[s.test] += p
    result = MethodResult(name, total, data.require_folds().copy(), split_test=per_split,
                          validation=[(s, val_fn(s.val)) for s in splits])
    if data.multilabel:
        result.thresholds = np.full(total.shape, 0.5)
    return result


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[labels]


def test_a_member_perfect_on_validation_gets_the_stackers_weight_even_when_random_on_test():
    """The stacker learns from the validation folds: a member whose validation predictions are perfect
    (and test predictions random) outweighs one that is merely informative on validation."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 150)
    data, splits = synthetic(labels, 3)

    def perfect(rows):
        return 0.9 * one_hot(labels[rows], 3) + 0.1 / 3

    def random(rows):
        return rng.dirichlet(np.ones(3), len(rows))

    def noisy(rows):
        return 0.3 * one_hot(labels[rows], 3) + 0.7 * rng.dirichlet(np.ones(3), len(rows))

    members = [member("oracle", data, splits, perfect, random), member("honest", data, splits, noisy, noisy)]
    combined = stack_ensemble(members, data)
    for stacker, info in zip(combined.stackers, combined.result.splits):
        weights = stacker.weights()
        assert weights["oracle"] > 2 * weights["honest"], weights
        assert info["member_weights"] == {k: round(v, 6) for k, v in weights.items()}
    # Its test predictions follow the oracle's random ones: accuracy near chance.
    accuracy = (combined.result.proba.argmax(1) == labels).mean()
    assert accuracy < 0.6


def test_the_stackers_probabilities_are_scikit_learns():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    for n_classes, present in ((2, [0, 1]), (3, [0, 1, 2]), (4, [0, 2, 3])):
        labels = rng.choice(present, 60)
        val = [rng.dirichlet(np.ones(n_classes), 60) for _ in range(2)]
        split = SimpleCV().split(np.arange(60) % 3)[0]
        stacker = fit_stacker(split, ["a", "b"], val, labels, n_classes)
        features = np.hstack(val)
        model = LogisticRegression(C=STACK_C, max_iter=2000).fit(features, labels)
        new = [rng.dirichlet(np.ones(n_classes), 25) for _ in range(2)]
        expected = np.zeros((25, n_classes))
        expected[:, model.classes_] = model.predict_proba(np.hstack(new))
        np.testing.assert_allclose(stacker.predict_proba(new), expected, atol=1e-5)
        # Written and read back, it predicts the same bits.
        again = Stacker.from_json(stacker.to_json())
        np.testing.assert_array_equal(again.predict_proba(new), stacker.predict_proba(new))
        assert stacker.classes == present


# -- multi-label -----------------------------------------------------------------------------

def planted_multilabel(n: int = 150, seed: int = 0):
    """Three labels; member "a" sees labels 0 and 1 through noise, member "b" sees label 2."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, 3)) < [0.4, 0.3, 0.5]).astype(np.int64)
    Y[Y.sum(1) == 0, 0] = 1
    data, splits = synthetic(Y, 3)

    def seeing(labels_seen):
        def f(rows):
            p = rng.random((len(rows), 3)) * 0.6
            p[:, labels_seen] = np.clip(0.65 * Y[rows][:, labels_seen] + 0.35 * rng.random((len(rows),
                                                                                            len(labels_seen))), 0, 1)
            return p
        return f

    a = member("a", data, splits, seeing([0, 1]), seeing([0, 1]))
    b = member("b", data, splits, seeing([2]), seeing([2]))
    return data, splits, [a, b]


def test_the_multilabel_mean_ensemble_chooses_thresholds_on_the_mean_validation_probabilities():
    data, splits, members = planted_multilabel()
    combined = mean_ensemble(members, data)
    for i, split in enumerate(splits):
        val = (members[0].validation[i][1] + members[1].validation[i][1]) / 2
        expected = choose_thresholds(val, data.labels[split.val])
        assert combined.thresholds[split.name] == expected.tolist()
        # One split per test fold (simple scheme): its proteins carry that split's thresholds.
        np.testing.assert_allclose(combined.result.thresholds[split.test], np.tile(expected, (len(split.test), 1)))
    np.testing.assert_allclose(combined.result.proba, (members[0].proba + members[1].proba) / 2, atol=1e-12)
    sets = combined.result.sets()
    assert sets.any(1).all()  # every protein gets a label
    assert combined.record(True)["thresholds"] == combined.thresholds


def test_multilabel_stacking_recovers_each_label_from_the_member_that_sees_it_and_never_reads_test_labels():
    data, splits, members = planted_multilabel()
    combined = stack_ensemble(members, data, seed=0)
    for stacker in combined.stackers:
        # Label 0 and 1 lean on member a, label 2 on member b.
        assert stacker.coef[0, 0] > abs(stacker.coef[0, 1]) and stacker.coef[1, 0] > abs(stacker.coef[1, 1])
        assert stacker.coef[2, 1] > abs(stacker.coef[2, 0])
        assert stacker.thresholds is not None and stacker.thresholds.shape == (3,)
    f1 = [((combined.result.sets()[:, j] & (data.labels[:, j] == 1)).sum() * 2
           / (combined.result.sets()[:, j].sum() + data.labels[:, j].sum())) for j in range(3)]
    assert min(f1) > 0.7, f1
    rng = np.random.default_rng(5)
    for i, split in enumerate(splits):
        mine = [only_split(m, i) for m in members]
        other = data.subset(np.arange(len(data)))
        other.labels = data.labels.copy()
        other.labels[split.test] = rng.integers(0, 2, (len(split.test), 3))
        a, b = stack_ensemble(mine, data), stack_ensemble(mine, other)
        np.testing.assert_array_equal(a.result.split_test[0][1], b.result.split_test[0][1])
        np.testing.assert_array_equal(a.stackers[0].thresholds, b.stackers[0].thresholds)
        np.testing.assert_array_equal(a.result.thresholds, b.result.thresholds)


def test_a_label_with_one_outcome_in_a_validation_fold_falls_back_to_the_members_mean():
    data, splits, members = planted_multilabel()
    data.labels[splits[0].val, 2] = 0  # label 2 absent from split 0's validation fold
    combined = stack_ensemble(members, data)
    stacker = combined.stackers[0]
    assert stacker.mean_labels == [2] and stacker.thresholds[2] == 0.5
    test = [m.split_test[0][1] for m in members]
    np.testing.assert_allclose(stacker.predict_proba(test)[:, 2], (test[0][:, 2] + test[1][:, 2]) / 2)
    assert combined.stackers[1].mean_labels == []


# -- attacks on the inputs -------------------------------------------------------------------

def test_members_that_cannot_be_combined_are_refused_with_their_names():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    data, splits = synthetic(labels, 3)

    def fn(rows):
        return rng.dirichlet(np.ones(3), len(rows))

    a, b = member("a", data, splits, fn, fn), member("b", data, splits, fn, fn)
    empty = replace(b, proba=np.full(b.proba.shape, np.nan))
    with pytest.raises(ValueError, match="b: predicted no protein"):
        mean_ensemble([a, empty], data)
    narrow = replace(b, proba=b.proba[:, :2])
    with pytest.raises(ValueError, match="b: probabilities of shape .* same 3 classes"):
        mean_ensemble([a, narrow], data)
    fewer = replace(b, split_test=b.split_test[:2], validation=b.validation[:2])
    with pytest.raises(ValueError, match="members must share the splits"):
        stack_ensemble([a, fewer], data)
    with pytest.raises(ValueError, match="at least two members"):
        mean_ensemble([a], data)
    reference = MethodResult("reference", a.proba.copy(), a.folds.copy())
    with pytest.raises(ValueError, match="no per-split predictions"):
        mean_ensemble([reference, a], data)


def test_nan_probabilities_leave_those_proteins_unpredicted_and_out_of_the_stacker():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    data, splits = synthetic(labels, 3)

    def fn(rows):
        return 0.5 * one_hot(labels[rows], 3) + 0.5 * rng.dirichlet(np.ones(3), len(rows))

    a, b = member("a", data, splits, fn, fn), member("b", data, splits, fn, fn)
    bad_test = splits[0].test[:4]
    b.split_test[0][1][:4] = np.nan
    b.validation[0][1][:3] = np.nan
    b.proba[bad_test] = np.nan
    for combined in (mean_ensemble([a, b], data), stack_ensemble([a, b], data)):
        done = combined.result.predicted()
        assert not done[bad_test].any() and done.sum() == len(data) - 4
        assert np.isfinite(combined.result.proba[done]).all()
    # The stacker was fitted on the validation proteins both members predicted.
    clean = [a.validation[0][1][3:], b.validation[0][1][3:]]
    expected = fit_stacker(splits[0], ["a", "b"], clean, labels[splits[0].val][3:], 3)
    np.testing.assert_allclose(stack_ensemble([a, b], data).stackers[0].coef, expected.coef, atol=1e-5)
    for p in (a.validation[0][1], b.validation[0][1]):
        p[:] = np.nan
    with pytest.raises(ValueError, match="no validation protein has finite probabilities"):
        stack_ensemble([a, b], data)


def test_an_ensemble_needs_two_methods_and_a_known_kind():
    check_kind(None, ["logreg"])
    check_kind("mean", ["finetune_lr0.0001", "finetune_lr2e-05"])  # a sweep's methods count
    with pytest.raises(ValueError, match="this run has one \\(logreg\\)"):
        check_kind("mean", ["logreg"])
    with pytest.raises(ValueError, match="ensemble must be one of mean, stack"):
        check_kind("median", ["logreg", "lightgbm"])


def test_ensemble_with_one_method_is_a_clear_error_before_training(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "one"
    result = run_cli("cv", "--cache", cache, "--data", csv, "--head", "logreg", "--k", 3, "--out", out, *FAST,
                     "--ensemble")
    assert result.exit_code == 1
    assert "Error: --ensemble combines several methods; this run has one (logreg)" in result.output
    assert "Traceback" not in result.output and not (out / "models").exists()
    result = run_cli("cv", "--cache", cache, "--data", csv, "--head", "logreg", "--out", out, "--ensemble", "max")
    assert result.exit_code == 2 and "'max' is not one of 'mean', 'stack'" in result.output


def test_stacking_with_a_one_class_validation_fold_is_refused_before_training(planted, tmp_path):
    csv, cache = planted
    frame = pd.read_csv(csv)
    frame["fold"] = [0 if lab == "class0" else (1 + i % 2) for i, lab in enumerate(frame["label"])]
    frame.to_csv(tmp_path / "folds.csv", index=False)
    from heads.run import run_comparison

    config = RunConfig(data=str(tmp_path / "folds.csv"), cache=str(cache), heads=("logreg", "lightgbm"),
                       folds="stratified", k=3, ensemble="stack", n_boot=100, figures=False)
    import heads.run

    original = heads.run.stratified_folds
    try:
        heads.run.stratified_folds = lambda labels, sequences, k, seed: frame["fold"].to_numpy()
        with pytest.raises(ValueError, match="split test2_val0 holds one class \\(class0\\).*--ensemble mean"):
            run_comparison(config, tmp_path / "run")
    finally:
        heads.run.stratified_folds = original
    assert not (tmp_path / "run" / "models").exists()


# -- resuming and identity -------------------------------------------------------------------

def test_another_ensemble_over_a_run_is_refused_and_never_mixed(runs, planted, tmp_path):
    csv, cache = planted
    run = copy_run(runs["mean"], tmp_path)
    before = (run / "metrics.json").read_bytes()
    for other in (["--ensemble", "stack"], []):
        result = compare(csv, cache, run, *other)
        assert result.exit_code == 1 and "holds another run" in result.output, result.output
    assert (run / "metrics.json").read_bytes() == before
    result = compare(csv, cache, run, "--ensemble", "stack", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "models" / "manifest.json").read_text())["ensemble"]["kind"] == "stack"
    assert (run / "metrics.json").read_bytes() == (runs["stack"] / "metrics.json").read_bytes()
    # The same ensemble again resumes (same fingerprint) and gives the same files.
    assert compare(csv, cache, run, "--ensemble", "stack").exit_code == 0
    assert (run / "metrics.json").read_bytes() == (runs["stack"] / "metrics.json").read_bytes()


KILLED_AFTER_STACKERS = """
import os, sys
import heads.run
real = heads.run.save_stackers
def once(*args, **kwargs):
    saved = real(*args, **kwargs)
    os._exit(9)  # as abrupt as kill -9, with the stackers written and no manifest yet
heads.run.save_stackers = once
from heads.cli import main
main(sys.argv[1:])
"""


def test_a_stacking_run_killed_after_its_stackers_resumes_to_the_same_result(runs, planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "stack"
    args = ["compare", "--cache", str(cache), "--data", str(csv), "--heads", "logreg,lightgbm", "--k", "3",
            "--out", str(out), *FAST, "--ensemble", "stack"]
    python_path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_STACKERS, *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": python_path}, check=False)
    assert killed.returncode == 9, killed.stderr
    assert (out / "models" / "ensemble").is_dir() and not (out / "models" / "manifest.json").exists()
    result = run_cli("predict", "--run", out, "--cache", cache, "--out", tmp_path / "p.tsv", "--head", "ensemble")
    assert result.exit_code == 1 and "did not finish" in result.output
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    fresh = runs["stack"]
    assert (out / "metrics.json").read_bytes() == (fresh / "metrics.json").read_bytes()
    for path in sorted((fresh / "models" / "ensemble").iterdir()):
        assert (out / "models" / "ensemble" / path.name).read_bytes() == path.read_bytes()


# -- heads predict --head ensemble -----------------------------------------------------------

def split_models(run: Path, method: str) -> dict[str, Head]:
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    return {e["split"]: Head.load(run / "models" / e["file"]) for e in manifest["models"] if e["method"] == method}


def pooled(cache: Path) -> tuple[list[str], np.ndarray]:
    with EmbeddingCache(cache) as c:
        ids = c.ids
        return ids, FeatureSource.from_rows(c, c.rows(ids), c.layers[-1]).pooled()


def test_predict_ensemble_of_a_mean_run_is_the_mean_of_its_members_predictions(runs, planted, tmp_path):
    _, cache = planted
    run = runs["mean"]
    frames = {m: predict_frame(run, cache, m).set_index("id") for m in MEMBERS}
    ensemble = predict_frame(run, cache, "ensemble").set_index("id")
    columns = [c for c in ensemble.columns if c.startswith("p_")]
    assert columns == ["p_class0", "p_class1", "p_class2"]
    hand = sum(frames[m][columns] for m in MEMBERS) / 2
    np.testing.assert_allclose(ensemble[columns].to_numpy(), hand.loc[ensemble.index].to_numpy(), atol=1e-5)
    assert (ensemble["prediction"] == hand.idxmax(axis=1).str[2:]).all()
    assert (ensemble["in_training_data"] == frames["logreg"]["in_training_data"]).all()
    result = run_cli("predict", "--run", run, "--cache", cache, "--out", tmp_path / "p.tsv", "--head", "ensemble")
    assert result.exit_code == 0, result.output
    assert "mean ensemble of logreg, lightgbm (6 models)" in result.output
    written = pd.read_csv(tmp_path / "p.tsv", sep="\t").set_index("id")
    np.testing.assert_allclose(written[columns].to_numpy(), ensemble[columns].to_numpy(), atol=1e-5)


def test_predict_ensemble_of_a_stacking_run_applies_each_splits_stacker_to_that_splits_models(runs, planted):
    _, cache = planted
    run = runs["stack"]
    ids, X = pooled(cache)
    models = {m: split_models(run, m) for m in MEMBERS}
    manifest = json.loads((run / "models" / "manifest.json").read_text())
    total = np.zeros((len(ids), 3))
    splits = [e for e in manifest["models"] if e["method"] == "ensemble"]
    for entry in splits:
        record = json.loads((run / "models" / entry["file"]).read_text())
        features = np.hstack([models[m][entry["split"]].predict_proba(X) for m in record["members"]])
        z = features @ np.array(record["coef"]).T + np.array(record["intercept"])
        e = np.exp(z - z.max(1, keepdims=True))
        total += e / e.sum(1, keepdims=True)
    hand = total / len(splits)
    frame = predict_frame(run, cache, "ensemble")
    assert list(frame["id"]) == ids
    np.testing.assert_allclose(frame[["p_class0", "p_class1", "p_class2"]].to_numpy(), hand, atol=1e-5)
    # Not the mean of the members: the stackers weigh them.
    mean = sum(predict_frame(run, cache, m)[["p_class0", "p_class1", "p_class2"]].to_numpy() for m in MEMBERS) / 2
    assert np.abs(mean - hand).max() > 1e-2


def test_the_default_head_may_be_the_ensemble(runs, planted, tmp_path):
    _, cache = planted
    run = copy_run(runs["mean"], tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    best = max(metrics["methods"][m]["macro_f1"] for m in MEMBERS)
    metrics["methods"]["ensemble"]["macro_f1"] = best + 0.01
    (run / "metrics.json").write_text(json.dumps(metrics))
    frame = predict_frame(run, cache)
    assert frame.attrs["head"] == "ensemble"
    metrics["methods"]["ensemble"]["macro_f1"] = best - 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert predict_frame(run, cache).attrs["head"] in MEMBERS


def test_predict_refuses_a_changed_stacker_and_a_config_naming_other_members(runs, planted, tmp_path):
    _, cache = planted
    run = copy_run(runs["stack"], tmp_path)
    out = tmp_path / "p.tsv"
    stacker = run / "models" / "ensemble" / "test1_val2.stack.json"
    original = stacker.read_text()
    record = json.loads(original)
    record["coef"][0][0] += 1.0
    stacker.write_text(json.dumps(record))
    result = run_cli("predict", "--run", run, "--cache", cache, "--out", out, "--head", "ensemble")
    assert result.exit_code == 1 and "test1_val2.stack.json: sha256" in result.output and "differs" in result.output
    assert not out.exists()
    stacker.write_text(original)
    assert run_cli("predict", "--run", run, "--cache", cache, "--out", out, "--head", "ensemble").exit_code == 0

    config_path = run / "config.json"
    config = json.loads(config_path.read_text())
    for edit, message in (({"ensemble_members": ["logreg", "attention"]}, "config.json was edited"),
                          ({"ensemble": "mean"}, "config.json was edited"),
                          ({"ensemble": None}, "ensemble None")):
        config_path.write_text(json.dumps({**config, **edit}))
        result = run_cli("predict", "--run", run, "--cache", cache, "--out", tmp_path / "q.tsv", "--head",
                         "ensemble")
        assert result.exit_code == 1 and message in result.output, result.output
    # Members the manifest lists no models of are refused, naming them.
    finished_config = {**config, "ensemble_members": ["logreg", "lightgbm"]}
    config_path.write_text(json.dumps(finished_config))
    manifest_path = run / "models" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["ensemble"]["members"] = ["logreg", "attention"]
    manifest["models"] = [e for e in manifest["models"] if e["method"] != "lightgbm"]
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    config_path.write_text(json.dumps({**finished_config, "ensemble_members": ["logreg", "attention"],
                                       "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest()}))
    result = run_cli("predict", "--run", run, "--cache", cache, "--out", tmp_path / "q.tsv", "--head", "ensemble")
    assert result.exit_code == 1 and "ensemble members attention have no saved models" in result.output


def test_predict_ensemble_of_a_run_without_one_or_with_attention_is_refused(runs, planted, tmp_path):
    csv, cache = planted
    assert compare(csv, cache, tmp_path / "plain").exit_code == 0
    result = run_cli("predict", "--run", tmp_path / "plain", "--cache", cache, "--out", tmp_path / "p.tsv",
                     "--head", "ensemble")
    assert result.exit_code == 1 and "has no ensemble (it was made without --ensemble)" in result.output
    result = run_cli("predict", "--run", runs["mean"], "--cache", cache, "--out", tmp_path / "p.tsv", "--head",
                     "ensemble", "--attention", tmp_path / "a.h5")
    assert result.exit_code == 1 and "no attention weights of its own" in result.output
    result = run_cli("explain", "--run", runs["stack"], "--id", "c0_0", "--cache", cache, "--head", "ensemble",
                     "--out", tmp_path / "figs")
    assert result.exit_code == 1 and "the ensemble combines its members' probabilities" in result.output


def test_predict_combined_averages_thresholds_of_the_splits_as_cross_validation_does():
    a = {"s1": np.array([[0.2, 0.8]]), "s2": np.array([[0.4, 0.6]])}
    b = {"s1": np.array([[0.6, 0.4]]), "s2": np.array([[0.0, 1.0]])}
    record = {"kind": "mean", "members": ["a", "b"], "multilabel": True,
              "thresholds": {"s1": [0.3, 0.5], "s2": [0.5, 0.7]}}
    proba, thresholds = predict_combined(record, {"a": a, "b": b})
    np.testing.assert_allclose(proba, [[0.3, 0.7]])
    np.testing.assert_allclose(thresholds, [[0.4, 0.6]])
    with pytest.raises(ValueError, match="no predictions of ensemble members b"):
        predict_combined(record, {"a": a})


# -- a multi-label run end to end --------------------------------------------------------------

def test_a_multilabel_run_with_a_stacking_ensemble_predicts_it(planted, tmp_path, monkeypatch):
    import heads.run
    from heads.run import run_comparison

    csv, cache = planted
    frame = pd.read_csv(csv)
    k = frame["label"].str[-1].astype(int).to_numpy()
    rng = np.random.default_rng(0)
    frame["A"] = (k == 0).astype(int)
    frame["B"] = ((k == 1) | (rng.random(len(frame)) < 0.3)).astype(int)
    frame["C"] = (k == 2).astype(int)
    frame.drop(columns="label").to_csv(tmp_path / "ml.csv", index=False)
    monkeypatch.setattr(heads.run, "stratified_folds", lambda labels, sequences, k, seed: np.arange(len(labels)) % k)
    config = RunConfig(data=str(tmp_path / "ml.csv"), cache=str(cache), heads=("logreg", "lightgbm"),
                       label_cols=("A", "B", "C"), folds="stratified", k=3, n_boot=100, figures=False,
                       ensemble="stack", head_params={"logreg": {"Cs": [0.1, 1.0]},
                                                      "lightgbm": {"n_estimators": 20, "n_jobs": 1}})
    run_comparison(config, tmp_path / "run")
    pred = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert "ensemble" in set(pred["method"]) and "threshold_A" in pred.columns
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"ensemble vs logreg", "ensemble vs lightgbm"} & set(metrics["paired_tests"]) or \
        {"logreg vs ensemble", "lightgbm vs ensemble"} & set(metrics["paired_tests"])
    ensemble = predict_frame(tmp_path / "run", cache, "ensemble")
    assert [c for c in ensemble.columns if c.startswith("threshold_")] == ["threshold_A", "threshold_B",
                                                                           "threshold_C"]
    assert all(ensemble["prediction"].str.len() > 0)
    manifest = json.loads((tmp_path / "run" / "models" / "manifest.json").read_text())
    stackers = [Stacker.from_json((tmp_path / "run" / "models" / e["file"]).read_text())
                for e in manifest["models"] if e["method"] == "ensemble"]
    expected = np.mean([s.thresholds for s in stackers], axis=0)
    np.testing.assert_allclose(ensemble[["threshold_A", "threshold_B", "threshold_C"]].to_numpy()[0], expected)
