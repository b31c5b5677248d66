"""Multi-label runs, ensembles and the membrane task under hostile inputs: each test pins a case
that once gave a wrong number, an inconsistent file or a traceback."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from heads.cli import main as heads_main
from heads.combine import Stacker
from heads.datasets import LabeledSet
from heads.evaluate import MethodResult
from heads.figstyle import FigureContext
from heads.multilabel import DEFAULT_THRESHOLD, choose_thresholds, label_sets, set_names
from heads.report import write_run
from heads.run import RunConfig, load_data, prediction_frame

from conftest import write_fasta

CONTEXT = FigureContext("attack.csv", "tiny", "CV over 3 folds", 12)


def run_cli(*args):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def held_out_set(multilabel: bool) -> tuple[LabeledSet, list[MethodResult]]:
    """20 training proteins (fold 0/1, never scored) and 10 test proteins (fold 2), as --test-data
    makes them: the methods predict the test proteins only. The training proteins are mostly of
    another class (set) than the test proteins."""
    n_train, n_test = 20, 10
    n = n_train + n_test
    folds = np.r_[np.arange(n_train) % 2, np.full(n_test, 2)]
    if multilabel:
        labels = np.zeros((n, 2), dtype=np.int64)
        labels[:n_train, 0] = 1  # training: {A}
        labels[n_train:, 1] = 1  # test: {B}, three of them {A, B}
        labels[n_train:n_train + 3, 0] = 1
    else:
        labels = np.r_[np.zeros(n_train, dtype=np.int64), np.ones(n_test - 3, dtype=np.int64), np.zeros(3, np.int64)]
    data = LabeledSet("held", [f"p{i}" for i in range(n)], ["MKV" * (i + 1) for i in range(n)], labels, ["A", "B"],
                      None, folds)
    rng = np.random.default_rng(0)
    proba = np.full((n, 2), np.nan)
    truth = labels if multilabel else np.eye(2)[labels]
    proba[n_train:] = np.clip(0.7 * truth[n_train:] + 0.3 * rng.random((n_test, 2)), 0, 1)
    if not multilabel:
        proba[n_train:] /= proba[n_train:].sum(1, keepdims=True)
    thresholds = None
    if multilabel:
        thresholds = np.full((n, 2), np.nan)
        thresholds[n_train:] = 0.5
    return data, [MethodResult("logreg", proba, np.where(folds == 2, 2, -1), thresholds=thresholds)]


def test_the_most_frequent_label_set_baseline_is_scored_on_the_test_proteins_only(tmp_path):
    data, results = held_out_set(multilabel=True)
    write_run(tmp_path, {"scheme": "simple", "backbone": None}, data, results, "t", n_boot=100, context=CONTEXT,
              figures=False)
    baseline = json.loads((tmp_path / "metrics.json").read_text())["baseline"]["majority_set"]
    # Among the 10 scored proteins {B} is the most frequent set (7 of 10); over all 30 it would be {A}.
    assert baseline["set"] == "B" and baseline["share"] == pytest.approx(0.7)
    assert "1.30 true (all 10 scored proteins)" in (tmp_path / "comparison.md").read_text()


def test_the_majority_class_line_of_the_comparison_figure_is_scored_on_the_test_proteins_only(tmp_path):
    from heads.figures import draw_run

    data, results = held_out_set(multilabel=False)
    metrics = json.loads(json.dumps(write_run(tmp_path, {"scheme": "simple", "backbone": None}, data, results, "t",
                                              n_boot=100, context=CONTEXT, figures=False)["metrics"]))
    figures = draw_run(tmp_path / "plots", CONTEXT, data, results, metrics)
    caption = next(f.caption for f in figures if f.stem.name == "comparison")
    # The largest class among the 10 test proteins is B, 7 of them; over all 30 it would be A, 23 of 30.
    assert "accuracy 0.700 = its share" in caption
    assert length_bin_counts(tmp_path / "plots" / "accuracy_by_length.svg") == 10


def length_bin_counts(svg) -> int:
    """The proteins the length figure's bins say they hold (their "(n=...)" tick labels), summed."""
    import re

    return sum(int(n.replace(",", "")) for n in re.findall(r"\(n=([0-9,]+)\)", svg.read_text()))


def test_the_jaccard_by_length_bins_hold_the_test_proteins_only(tmp_path):
    data, results = held_out_set(multilabel=True)
    write_run(tmp_path, {"scheme": "simple", "backbone": None}, data, results, "t", n_boot=100, context=CONTEXT)
    assert length_bin_counts(tmp_path / "plots" / "jaccard_by_length.svg") == 10


def test_a_multilabel_prediction_table_gives_sets_that_follow_from_its_own_columns(tmp_path, monkeypatch):
    import heads.run as run_module

    classes = ["A", "B"]
    # Each probability sits just below its threshold: rounded to 5 decimals they would print equal.
    proba = np.array([[0.1234541, 0.9], [0.8, 0.6666641]])
    thresholds = np.broadcast_to([0.1234543, 0.6666643], proba.shape)
    predicted = [set_names(row, classes) for row in label_sets(proba, thresholds)]
    frame = prediction_frame(["x", "y"], predicted, [False, False], classes, proba, thresholds)
    frame.attrs.update(models=1, head="logreg")
    monkeypatch.setattr(run_module, "ensemble",
                        lambda *a, **k: run_module.Ensemble(frame, ["MKV", "MKW"], "logreg", 1))
    out = tmp_path / "p.tsv"
    (tmp_path / "c.h5").write_bytes(b"")  # never opened: ensemble is replaced
    result = run_cli("predict", "--run", tmp_path, "--cache", tmp_path / "c.h5", "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, sep="\t", keep_default_na=False)
    assert list(table["prediction"]) == ["B", "A"]
    shown_p = table[["p_A", "p_B"]].to_numpy()
    shown_t = table[["threshold_A", "threshold_B"]].to_numpy()
    assert [set_names(row, classes) for row in label_sets(shown_p, shown_t)] == ["B", "A"]


def test_a_single_label_prediction_table_keeps_five_decimals(tmp_path, monkeypatch):
    import heads.run as run_module

    frame = prediction_frame(["x"], ["A"], [True], ["A", "B"], np.array([[0.123456789, 0.876543211]]), None)
    frame.attrs.update(models=1, head="logreg")
    monkeypatch.setattr(run_module, "ensemble",
                        lambda *a, **k: run_module.Ensemble(frame, ["MKV"], "logreg", 1))
    out = tmp_path / "p.tsv"
    (tmp_path / "c.h5").write_bytes(b"")  # never opened: ensemble is replaced
    result = run_cli("predict", "--run", tmp_path, "--cache", tmp_path / "c.h5", "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[1] == "x\tA\tTrue\t0.12346\t0.87654"


def test_tables_of_many_labels_are_built_without_pandas_fragmentation_warnings():
    n, L = 4, 60
    classes = [f"L{j:02d}" for j in range(L)]
    labels = np.zeros((n, L), dtype=np.int64)
    labels[:, 0] = 1
    data = LabeledSet("many", [f"p{i}" for i in range(n)], ["MKV"] * n, labels, classes, None, np.arange(n) % 3)
    proba = np.full((n, L), 0.2)
    result = MethodResult("logreg", proba, data.folds.copy(), thresholds=np.full((n, L), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = result.frame(data)
        table = prediction_frame(data.ids, ["L00"] * n, [False] * n, classes, proba, np.full((n, L), 0.5))
    assert frame.shape == (n, 6 + 2 * L) and table.shape == (n, 3 + 2 * L)
    assert list(frame.columns[:7]) == ["method", "id", "label", "fold", "test_fold", "prediction", "p_L00"]
    assert list(table.columns[:4]) == ["id", "prediction", "in_training_data", "p_L00"]


# -- thresholds --------------------------------------------------------------------------------
def test_a_label_whose_validation_probabilities_do_not_separate_it_keeps_one_half():
    Y = np.array([[1, 0], [0, 1], [0, 1], [0, 0], [1, 0]])
    proba = np.array([[0.0, 0.9], [0.0, 0.1], [0.0, 0.2], [0.0, 0.8], [0.0, 0.3]])  # label 0: one value for all
    thresholds = choose_thresholds(proba, Y)
    assert thresholds[0] == DEFAULT_THRESHOLD
    # Label 1 is ranked backwards: every threshold that predicts it has MCC <= 0.
    assert thresholds[1] == DEFAULT_THRESHOLD
    informative = choose_thresholds(np.array([[0.9], [0.1], [0.8], [0.2]]), np.array([[1], [0], [1], [0]]))
    assert 0.2 < informative[0] < 0.8


def test_a_label_of_one_protein_is_not_predicted_for_a_whole_test_fold(tmp_path):
    """Training folds without the label give it probability 0 everywhere; its validation fold then
    held the one positive, and the threshold chosen there (0) predicted it for every protein."""
    from heads.evaluate import cross_validate
    from heads.folds import SimpleCV
    from heads.registry import make_head

    rng = np.random.default_rng(0)
    n = 30
    X = rng.normal(size=(n, 4)).astype(np.float32)
    labels = np.zeros((n, 3), dtype=np.int64)
    labels[:, 0] = (X[:, 0] > 0).astype(int)
    labels[:, 1] = 1 - labels[:, 0]
    labels[7, 2] = 1  # the rare label: one protein, in fold 1
    folds = np.arange(n) % 3
    data = LabeledSet("rare", [f"p{i}" for i in range(n)], ["MKV"] * n, labels, ["A", "B", "Rare"], None, folds)

    class Pooled:  # what cross_validate reads of a feature source, from memory
        def for_input(self, kind):
            assert kind == "pooled"
            return X

    result = cross_validate(make_head("logreg", {"Cs": [1.0]}), data, Pooled(), SimpleCV().split(folds), "logreg")
    sets = result.sets()
    assert sets[:, 2].sum() <= 1, f"the rare label predicted for {sets[:, 2].sum()} proteins"


# -- stackers ------------------------------------------------------------------------------------
def stacker_text(**changes) -> str:
    record = json.loads(Stacker("s", ["a", "b"], 2, True, [0, 1], np.ones((2, 2)), np.zeros(2), [],
                                np.array([0.4, 0.6])).to_json())
    record.update(changes)
    return json.dumps(record)


@pytest.mark.parametrize("changes, problem", [
    ({"coef": [[float("nan"), 1.0], [1.0, 1.0]]}, "not finite"),
    ({"intercept": [float("inf"), 0.0]}, "not finite"),
    ({"thresholds": [0.5]}, "finite thresholds"),
    ({"thresholds": None}, "finite thresholds"),
    ({"mean_labels": [5]}, "mean_labels"),
    ({"classes": [0, 7]}, "classes"),
])
def test_a_damaged_stacker_file_is_refused_naming_what_is_wrong(changes, problem):
    assert Stacker.from_json(stacker_text(), "s.stack.json").members == ["a", "b"]
    with pytest.raises(ValueError, match=problem) as err:
        Stacker.from_json(stacker_text(**changes), "s.stack.json")
    assert "s.stack.json" in str(err.value)


# -- membrane task ---------------------------------------------------------------------------------
def test_a_membrane_set_of_one_class_is_refused_by_name_before_folds_are_built(tmp_path, monkeypatch):
    import heads.run as run_module

    path = write_fasta(tmp_path / "m.fasta", [(f"Q{i} Nucleus-{'M' if i < 6 else 'U'}", "MKVLA" + "W" * i)
                                              for i in range(9)])

    def no_folds(*args, **kwargs):
        raise AssertionError("folds built for a set that cannot be trained on")

    monkeypatch.setattr(run_module, "homology_partition", no_folds)
    with pytest.raises(ValueError, match=r"m.fasta: every protein is Membrane \(--task membrane"):
        load_data(RunConfig(data=str(path), task="membrane", folds="homology", k=3))


# -- label columns ---------------------------------------------------------------------------------
@pytest.mark.parametrize("label_cols, fold_col, role", [
    (("A", "part"), "part", "fold"),
    (("A", "sid"), None, "ID"),
    (("A", "Sequence"), None, "sequence"),
])
def test_a_label_column_that_is_the_id_sequence_or_fold_column_is_refused(tmp_path, label_cols, fold_col, role):
    from embedcache.sequences import InputError
    from heads.datasets import read_labeled_csv

    path = tmp_path / "ml.csv"
    # part holds 0/1: as a label it would pass the 0/1 check, and the labels would be the folds.
    path.write_text("sid,A,B,part,Sequence\np1,1,0,0,MKV\np2,0,1,1,MKW\np3,1,1,0,MKY\np4,0,1,1,MKL\n")
    with pytest.raises(InputError, match=f"the {role} column"):
        read_labeled_csv(path, label_cols=label_cols, fold_col=fold_col)
    auto = read_labeled_csv(path, label_cols=("auto",), fold_col="part")
    assert auto.classes == ["A", "B"] and auto.folds.tolist() == [0, 1, 0, 1]


# -- heads folds -----------------------------------------------------------------------------------
def test_heads_folds_makes_the_folder_of_its_output_and_log(tmp_path):
    data = tmp_path / "ml.csv"
    data.write_text("sid,A,B,Sequence\n" + "".join(f"p{i},{i % 2},{1 - i % 2},MKV{'W' * i}\n" for i in range(9)))
    out = tmp_path / "new" / "deeper" / "f.tsv"
    result = run_cli("folds", data, "--label-cols", "auto", "--method", "stratified", "--k", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "new" / "deeper" / "f.tsv.log").is_file()


def test_heads_folds_refuses_an_output_folder_it_cannot_make_before_building_anything(tmp_path, monkeypatch):
    import heads.folds as folds_module

    def no_partition(*args, **kwargs):
        raise AssertionError("folds built for an output that cannot be written")

    monkeypatch.setattr(folds_module, "build_partition", no_partition)
    data = tmp_path / "ml.csv"
    data.write_text("sid,A,B,Sequence\n" + "".join(f"p{i},{i % 2},{1 - i % 2},MKV{'W' * i}\n" for i in range(9)))
    (tmp_path / "a_file").write_text("")
    result = run_cli("folds", data, "--label-cols", "auto", "--k", 3, "--out", tmp_path / "a_file" / "f.tsv",
                     "--log", tmp_path / "f.log")
    assert result.exit_code == 2 and "--out" in result.output and "cannot make its folder" in result.output
