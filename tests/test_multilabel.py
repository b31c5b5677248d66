"""Multi-label targets: readers, per-label heads, thresholds from validation, predict; the membrane task."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from embedcache.extract import ExtractConfig, extract
from embedcache.sequences import InputError
from embedcache.store import EmbeddingCache
from heads.attention import AttentionHead
from heads.cli import main as heads_main
from heads.datasets import load_labeled, merge, read_deeploc1, read_labeled_csv
from heads.estimators import Head, LightGBMHead, LogisticHead
from heads.evaluate import cross_validate
from heads.features import FeatureSource
from heads.folds import SimpleCV
from heads.multilabel import choose_thresholds, label_sets, set_names

from conftest import write_fasta

LABELS = ["Alpha", "Beta", "Gamma"]
RICH = {"Alpha": "KR", "Beta": "DE", "Gamma": "LIV"}
HEADS = {
    "logreg": LogisticHead(Cs=(0.01, 1.0)),
    "lightgbm": LightGBMHead(n_estimators=200, learning_rate=0.1, early_stopping_rounds=20, n_jobs=1),
    "attention": AttentionHead(heads=4, hidden=32, max_epochs=25, patience=6, dropout=0.1, lr=3e-3, threads=1),
}


def planted_multilabel(path, n=150, seed=0):
    """Each protein has each label with probability 0.4 (at least one); a label on enriches its residues."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    rows = []
    for i in range(n):
        on = rng.random(len(LABELS)) < 0.4
        if not on.any():
            on[rng.integers(len(LABELS))] = True
        length = int(rng.integers(40, 120))
        seq = rng.choice(alphabet, size=length)
        for name, flag in zip(LABELS, on):
            if flag:
                enriched = rng.random(length) < 0.25
                seq[enriched] = rng.choice(list(RICH[name]), size=int(enriched.sum()))
        rows.append({"sid": f"p{i}", **{name: int(f) for name, f in zip(LABELS, on)}, "Sequence": "".join(seq)})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("multilabel")
    csv = planted_multilabel(tmp / "planted_ml.csv")
    cache = tmp / "planted_ml.h5"
    extract(csv, cache, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    data = read_labeled_csv(csv, label_cols=("auto",))
    folds = np.arange(len(data)) % 5
    return data.with_folds(folds), cache, csv


# -- readers -------------------------------------------------------------------------------------
def test_label_columns_give_a_sorted_label_matrix_named_or_found(tmp_path):
    path = tmp_path / "ml.csv"
    path.write_text("sid,Zeta,Alpha,Sequence,score\np1,1,0,MKV,0.3\np2,1,1,MKL,2\np3,0,1,MKW,1\n")
    named = read_labeled_csv(path, label_cols=("Zeta", "Alpha"))
    assert named.multilabel and named.classes == ["Alpha", "Zeta"]
    np.testing.assert_array_equal(named.labels, [[0, 1], [1, 1], [1, 0]])
    auto = read_labeled_csv(path, label_cols=("auto",))  # "score" holds 0.3 and 2: not a 0/1 column
    assert auto.classes == named.classes
    np.testing.assert_array_equal(auto.labels, named.labels)
    assert named.label_names() == ["Zeta", "Alpha;Zeta", "Alpha"]
    assert list(named.frame()["label"]) == ["Zeta", "Alpha;Zeta", "Alpha"]


@pytest.mark.parametrize("text, expected", [
    ("sid,A,B,Sequence\np1,1,2,MKV\n", "column 'B' holds '2'"),
    ("sid,A,B,Sequence\np1,1,,MKV\n", "column 'B' holds ''"),
    ("sid,A,B,Sequence\np1,0,0,MKV\n", "no label set"),
    ("sid,A,B,Sequence\np1,1,0,MKV\np1,0,1,MKW\n", "appears twice"),
])
def test_bad_label_columns_are_refused_naming_row_and_column(tmp_path, text, expected):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=expected) as err:
        read_labeled_csv(path, label_cols=("A", "B"))
    assert "bad.csv" in str(err.value)
    if "twice" not in expected:
        assert "row 2" in str(err.value)


def test_label_columns_need_two_and_exclude_class_names(tmp_path):
    path = tmp_path / "ml.csv"
    path.write_text("sid,A,B,Sequence\np1,1,0,MKV\np2,0,1,MKW\n")
    with pytest.raises(InputError, match="at least two"):
        read_labeled_csv(path, label_cols=("A",))
    with pytest.raises(InputError, match="class-names"):
        read_labeled_csv(path, label_cols=("A", "B"), class_names={"1": "x"})
    with pytest.raises(InputError, match="twice"):
        read_labeled_csv(path, label_cols=("A", "a"))
    one = tmp_path / "one.csv"
    one.write_text("sid,A,Sequence\np1,1,MKV\np2,0,MKW\n")
    with pytest.raises(InputError, match="found 1 column"):
        read_labeled_csv(one, label_cols=("auto",))


def test_a_gzipped_multilabel_csv_reads_the_same(tmp_path):
    text = "sid,A,B,Sequence\np1,1,0,MKV\np2,1,1,MKW\n"
    plain, packed = tmp_path / "m.csv", tmp_path / "m.csv.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    a, b = read_labeled_csv(plain, label_cols=("auto",)), read_labeled_csv(packed, label_cols=("auto",))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.classes == b.classes


DEEPLOC1 = [
    ("P1 Cytoplasm-Nucleus-U", "MKVLA"),
    ("P2 Nucleus-S", "MKVLW"),
    ("P3 Cell.membrane-M test", "MKVLY"),
    ("P4 Lysosome/Vacuole-M", "MKVLF"),
]


def test_deeploc1_headers_read_as_location_sets_and_membrane(tmp_path):
    path = write_fasta(tmp_path / "dl1.fasta", DEEPLOC1)
    single = read_deeploc1(path)
    assert [single.classes[i] for i in single.labels] == ["Cytoplasm", "Nucleus", "Cell.membrane",
                                                          "Lysosome/Vacuole"]
    sets = read_deeploc1(path, "multilabel")
    assert sets.classes == ["Cell.membrane", "Cytoplasm", "Lysosome/Vacuole", "Nucleus"]
    assert sets.label_names() == ["Cytoplasm;Nucleus", "Nucleus", "Cell.membrane", "Lysosome/Vacuole"]
    membrane = read_deeploc1(path, "membrane")
    assert membrane.ids == ["P2", "P3", "P4"]  # P1 is U: unknown, left out
    assert [membrane.classes[i] for i in membrane.labels] == ["Soluble", "Membrane", "Membrane"]
    assert membrane.classes == ["Membrane", "Soluble"]


def test_the_membrane_task_needs_deeploc1_headers_and_some_m_or_s(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("id,sequence,label\na,MKV,x\nb,MKW,y\n")
    with pytest.raises(InputError, match="--task membrane reads DeepLoc 1.0 headers"):
        load_labeled(csv, task="membrane")
    unknown = write_fasta(tmp_path / "u.fasta", [("P1 Nucleus-U", "MKV"), ("P2 Cytoplasm-U", "MKW")])
    with pytest.raises(InputError, match="every protein is marked U"):
        load_labeled(unknown, task="membrane")


def test_merging_multilabel_sets_unites_labels_and_refuses_mixing(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("sid,A,B,Sequence\np1,1,0,MKV\np2,0,1,MKW\n")
    b = tmp_path / "b.csv"
    b.write_text("sid,B,C,Sequence\nq1,1,1,MKY\n")
    both = merge([read_labeled_csv(a, label_cols=("auto",)), read_labeled_csv(b, label_cols=("auto",))], "ab")
    assert both.classes == ["A", "B", "C"]
    np.testing.assert_array_equal(both.labels, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    single = tmp_path / "s.csv"
    single.write_text("id,sequence,label\nz,MKV,x\nzz,MKW,y\n")
    with pytest.raises(ValueError, match="some are multi-label"):
        merge([read_labeled_csv(a, label_cols=("auto",)), read_labeled_csv(single)], "mixed")


# -- thresholds ----------------------------------------------------------------------------------
def test_chosen_thresholds_reach_the_best_mcc_of_any_threshold():
    rng = np.random.default_rng(3)
    Y = (rng.random((200, 4)) < [0.1, 0.3, 0.5, 0.8]).astype(int)
    proba = np.clip(Y * 0.3 + rng.random((200, 4)) * 0.7, 0, 1)
    thresholds = choose_thresholds(proba, Y)
    for j in range(4):
        grid = np.unique(proba[:, j])
        best = max(matthews_corrcoef(Y[:, j], proba[:, j] >= t) for t in grid)
        assert matthews_corrcoef(Y[:, j], proba[:, j] >= thresholds[j]) == pytest.approx(best, abs=1e-12)
        assert not np.isin(thresholds[j], proba[:, j])  # between two proteins' values, not on one


def test_a_label_the_validation_fold_cannot_inform_keeps_one_half():
    proba = np.array([[0.9, 0.2], [0.1, 0.7], [0.8, 0.6]])
    Y = np.array([[1, 0], [0, 0], [1, 0]])
    thresholds = choose_thresholds(proba, Y)
    assert thresholds[1] == 0.5
    assert 0.1 < thresholds[0] <= 0.8


def test_every_protein_gets_at_least_its_most_probable_label():
    proba = np.array([[0.2, 0.4, 0.1], [0.9, 0.8, 0.1], [0.05, 0.01, 0.02]])
    sets = label_sets(proba, np.array([0.5, 0.5, 0.5]))
    np.testing.assert_array_equal(sets, [[0, 1, 0], [1, 1, 0], [1, 0, 0]])
    assert set_names(sets[1], ["A", "B", "C"]) == "A;B"


# -- heads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HEADS))
def test_each_head_recovers_planted_labels_and_not_shuffled_ones(planted, name):
    data, cache_path, _ = planted
    splits = SimpleCV().split(data.folds)
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource(cache, data.sequences, ids=data.ids)
        result = cross_validate(HEADS[name], data, features, splits, name)
        auc = [roc_auc_score(data.labels[:, j], result.proba[:, j]) for j in range(len(LABELS))]
        assert min(auc) >= 0.85, auc
        assert result.thresholds is not None and np.isfinite(result.thresholds).all()
        assert result.sets().any(1).all()  # at least one label each
        shuffled = data.subset(np.arange(len(data)))
        shuffled.labels = data.labels[np.random.default_rng(1).permutation(len(data))]
        noise = cross_validate(HEADS[name], shuffled, features, splits, name)
        chance = [roc_auc_score(shuffled.labels[:, j], noise.proba[:, j]) for j in range(len(LABELS))]
        assert max(chance) <= 0.7, chance


@pytest.mark.parametrize("name", list(HEADS))
def test_a_saved_multilabel_head_keeps_its_thresholds_and_predicts_the_same(planted, name, tmp_path):
    data, cache_path, _ = planted
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource(cache, data.sequences, ids=data.ids)
        X = features.for_input(HEADS[name].input)
        train, val = np.arange(0, len(data), 2), np.arange(1, len(data), 2)
        head = clone(HEADS[name]).fit(X[train], data.labels[train], eval_set=(X[val], data.labels[val]))
        head.fit_thresholds(X[val], data.labels[val])
        path = head.save(tmp_path / ("h.pt" if head.input == "per_residue" else "h.joblib"))
        again = Head.load(path)
        assert again.multilabel_ and np.array_equal(again.thresholds_, head.thresholds_)
        np.testing.assert_allclose(again.predict_proba(X[val]), head.predict_proba(X[val]), atol=1e-6)
        np.testing.assert_array_equal(again.predict(X[val]), head.predict(X[val]))
        assert again.predict(X[val]).shape == (len(val), len(LABELS))


def test_a_label_that_training_never_sees_gets_a_constant_probability(planted):
    data, cache_path, _ = planted
    with EmbeddingCache(cache_path) as cache:
        X = FeatureSource(cache, data.sequences, ids=data.ids).pooled()
    Y = data.labels.copy()
    Y[:, 2] = 0
    Y[Y.sum(1) == 0, 0] = 1
    for head in (clone(HEADS["logreg"]), clone(HEADS["lightgbm"])):
        proba = head.fit(X, Y).predict_proba(X)
        assert (proba[:, 2] == 0).all()


def test_a_single_label_head_refuses_thresholds(planted):
    data, cache_path, _ = planted
    with EmbeddingCache(cache_path) as cache:
        X = FeatureSource(cache, data.sequences, ids=data.ids).pooled()
    head = clone(HEADS["logreg"]).fit(X, data.labels[:, 0])
    with pytest.raises(ValueError, match="one label per protein"):
        head.fit_thresholds(X, data.labels)


def test_labels_other_than_zero_and_one_are_refused(planted):
    data, cache_path, _ = planted
    with EmbeddingCache(cache_path) as cache:
        X = FeatureSource(cache, data.sequences, ids=data.ids).pooled()
    Y = data.labels.copy()
    Y[0, 0] = 2
    with pytest.raises(ValueError, match="0 and 1 only"):
        clone(HEADS["logreg"]).fit(X, Y)


# -- runs and predict ----------------------------------------------------------------------------
def run_cli(*args):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def test_predict_on_a_multilabel_run_writes_each_labels_probability_threshold_and_set(planted, tmp_path):
    _, cache, csv = planted
    out = tmp_path / "run"
    result = run_cli("cv", "--cache", cache, "--data", csv, "--label-cols", "auto", "--head", "logreg", "--k", 3,
                     "--set", "logreg.Cs=[0.1,1.0]", "--bootstrap", 100, "--no-figures", "--out", out)
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(out / "predictions.csv")
    assert {f"p_{c}" for c in LABELS} | {f"threshold_{c}" for c in LABELS} <= set(predictions.columns)
    table = tmp_path / "pred.tsv"
    result = run_cli("predict", "--run", out, "--cache", cache, "--out", table)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(table, sep="\t")
    proba = frame[[f"p_{c}" for c in LABELS]].to_numpy()
    thresholds = frame[[f"threshold_{c}" for c in LABELS]].to_numpy()
    assert (thresholds == thresholds[0]).all()  # the mean of the fold models' thresholds, for every protein
    expected = [set_names(row, LABELS) for row in label_sets(proba, thresholds[0])]
    assert list(frame["prediction"]) == expected
    assert all(frame["prediction"].str.len() > 0)


def test_a_membrane_run_trains_on_m_and_s_only(tmp_path, tiny_weights):
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records = []
    for i in range(60):
        mark = "MSU"[i % 3]
        seq = rng.choice(alphabet, size=60)
        if mark == "M":
            seq[rng.random(60) < 0.4] = "L"
        records.append((f"Q{i} {['Nucleus', 'Cytoplasm'][i % 2]}-{mark}", "".join(seq)))
    path = write_fasta(tmp_path / "dl1.fasta", records)
    cache = tmp_path / "dl1.h5"
    extract(path, cache, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    out = tmp_path / "membrane"
    result = run_cli("cv", "--cache", cache, "--data", path, "--task", "membrane", "--head", "logreg", "--k", 3,
                     "--folds", "stratified", "--bootstrap", 100, "--no-figures", "--out", out)
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 40 and set(predictions["label"]) == {"Membrane", "Soluble"}
    assert set(predictions["p_Membrane"].index) and "p_Nucleus" not in predictions.columns


def test_describe_counts_each_label_and_lists_label_sets(tmp_path):
    from heads.describe import write_report

    path = tmp_path / "ml.csv"
    path.write_text("sid,A,B,Sequence\np1,1,0,MKVLAAGG\np2,1,1,MKWLAAGG\np3,0,1,MKYLAAGG\np4,1,1,MKYLAAGG\n")
    report = write_report(tmp_path / "describe", path, label_cols=("auto",))
    counts = report["counts"]
    assert counts["per_class"] == {"A": 3, "B": 3}
    assert counts["labels_per_protein"] == {"1": 2, "2": 2}
    assert counts["per_label_set"] == {"A;B": 2, "A": 1, "B": 1}
    # p3 and p4 share a sequence with different label sets
    assert report["duplicates"]["sets_with_conflicting_labels"] == 1
    assert "Label sets" in (tmp_path / "describe" / "describe.html").read_text()


def test_describe_reads_the_membrane_task(tmp_path):
    from heads.describe import write_report

    path = write_fasta(tmp_path / "dl1.fasta", DEEPLOC1)
    report = write_report(tmp_path / "describe", path, task="membrane")
    assert report["counts"]["per_class"] == {"Membrane": 2, "Soluble": 1}


def test_label_columns_on_a_fasta_are_refused_not_ignored(tmp_path):
    path = write_fasta(tmp_path / "dl1.fasta", DEEPLOC1)
    with pytest.raises(InputError, match="--task multilabel"):
        load_labeled(path, label_cols=("auto",))
    ml = tmp_path / "semi.csv"
    ml.write_text("sid,A;B,C,Sequence\np1,1,0,MKV\np2,0,1,MKW\n")
    with pytest.raises(InputError, match="';' in its name"):
        read_labeled_csv(ml, label_cols=("auto",))


def test_settings_added_later_leave_the_fingerprint_of_a_run_without_them_unchanged():
    from dataclasses import asdict

    from heads.run import LATER_SETTINGS, RunConfig, _fingerprint_settings

    config = RunConfig(data="d.csv")
    settings = _fingerprint_settings(config)
    assert not set(LATER_SETTINGS) & set(settings)
    assert set(LATER_SETTINGS) <= set(asdict(config))  # every one is a real field, at its default here
    for name, value in {"label_cols": ("auto",), "task": "membrane", "ensemble": "mean"}.items():
        changed = _fingerprint_settings(RunConfig(data="d.csv", **{name: value}))
        assert changed[name] == (list(value) if isinstance(value, tuple) else value) or changed[name] == value


def test_a_reference_for_a_multilabel_set_is_refused_before_any_training(planted, tmp_path):
    _, cache, csv = planted
    ref = tmp_path / "ref"
    ref.mkdir()
    result = run_cli("cv", "--cache", cache, "--data", csv, "--label-cols", "auto", "--head", "logreg",
                     "--reference", ref, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "single-label probabilities" in result.output
    assert not (tmp_path / "run" / "models").exists()


def test_uniprot_location_text_maps_to_deeploc2_categories():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_multilabel_csv.py"
    spec = importlib.util.spec_from_file_location("make_multilabel_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("SUBCELLULAR LOCATION: Nucleus, nucleolus {ECO:0000269|PubMed:1}. Chromosome {ECO:0000250}. "
            "Note=Moves to the cytoplasm in mitosis. {ECO:0000269}. [Isoform 2]: Cytoplasm, cytosol "
            "{ECO:0000250}. Cytoplasmic vesicle membrane {ECO:0000269}; Peripheral membrane protein.")
    assert module.locations(text) == {"Nucleus", "Cytoplasm"}  # not chromosome, the note or the vesicle
    assert module.locations(text, experimental_only=True) == {"Nucleus"}
    assert module.locations("SUBCELLULAR LOCATION: Secreted. Golgi apparatus membrane; Single-pass membrane "
                            "protein. Lysosome.") == {"Extracellular", "Golgi apparatus", "Lysosome/Vacuole"}
