from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from embedcache.extract import ExtractConfig, extract
from embedcache.store import EmbeddingCache
from heads.attention import AttentionHead, AttentionPooling
from heads.cli import main as heads_main
from heads.datasets import LabeledSet, read_deeploc1, read_deeplocpro, read_labeled_csv
from heads.estimators import Head, LightGBMHead, LogisticHead
from heads.evaluate import cross_validate, read_reference
from heads.features import ArrayResidues, FeatureSource, length_batches, pad
from heads.folds import NestedCV, SimpleCV, homology_folds, stratified_folds
from heads.metrics import bootstrap_ci, classification_metrics, mcnemar
from heads.run import RunConfig, load_data

from conftest import DEEPLOCPRO_SUBSET, SHARED_DATA, write_fasta

FAST = {
    "logreg": LogisticHead(Cs=(0.01, 1.0)),
    "lightgbm": LightGBMHead(n_estimators=200, learning_rate=0.1, early_stopping_rounds=20, n_jobs=1),
    "attention": AttentionHead(heads=4, hidden=32, max_epochs=25, patience=6, dropout=0.1, lr=3e-3, threads=1),
}
# Class k proteins are enriched in residues RICH[k]: a composition signal every embedding carries.
RICH = ["KR", "DE", "LIV"]


def planted_dataset(tmp_path, n_per_class=45, seed=0):
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records, labels = [], []
    for k, rich in enumerate(RICH):
        for i in range(n_per_class):
            length = int(rng.integers(30, 120))
            seq = rng.choice(alphabet, size=length)
            enriched = rng.random(length) < 0.35
            seq[enriched] = rng.choice(list(rich), size=int(enriched.sum()))
            records.append((f"c{k}_{i}", "".join(seq)))
            labels.append(f"class{k}")
    path = tmp_path / "planted.csv"
    frame = pd.DataFrame({"id": [r[0] for r in records], "sequence": [r[1] for r in records], "label": labels})
    frame.to_csv(path, index=False)
    return path


def planted_cache(tmp_path, weights, n_per_class=45):
    """The planted dataset and its embedding cache from ``weights`` (a tiny ESM-2)."""
    csv = planted_dataset(tmp_path, n_per_class=n_per_class)
    cache = tmp_path / "planted.h5"
    extract(csv, cache, ExtractConfig(weights=str(weights), threads=1), progress=False)
    return csv, cache


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted")
    csv = planted_dataset(tmp)
    cache = tmp / "planted.h5"
    extract(csv, cache, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    data, _ = load_data(RunConfig(data=str(csv), cache=str(cache), folds="stratified", k=5))
    return data, cache, csv


@pytest.mark.parametrize("name", list(FAST))
def test_each_head_finds_a_planted_signal_and_not_a_shuffled_one(planted, name):
    data, cache_path, _ = planted
    splits = SimpleCV().split(data.folds)
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource(cache, data.sequences, ids=data.ids)
        result = cross_validate(FAST[name], data, features, splits, name)
        accuracy = accuracy_score(data.labels, result.proba.argmax(1))
        assert accuracy >= 0.9, accuracy
        shuffled = data.subset(np.arange(len(data)))
        shuffled.labels = np.random.default_rng(1).permutation(data.labels)
        noise = cross_validate(FAST[name], shuffled, features, splits, name)
        chance = accuracy_score(shuffled.labels, noise.proba.argmax(1))
        assert chance <= 0.55, chance  # 3 balanced classes: chance is 1/3


@pytest.mark.parametrize("name", list(FAST))
def test_save_load_gives_identical_predictions(planted, name, tmp_path):
    data, cache_path, _ = planted
    with EmbeddingCache(cache_path) as cache:
        features = FeatureSource(cache, data.sequences, ids=data.ids)
        X = features.for_input(FAST[name].input)
        train, val = np.arange(0, len(data), 2), np.arange(1, len(data), 2)
        from sklearn.base import clone

        head = clone(FAST[name]).fit(X[train], data.labels[train], eval_set=(X[val], data.labels[val]))
        path = head.save(tmp_path / ("h.pt" if head.input == "per_residue" else "h.joblib"))
        again = Head.load(path)
        np.testing.assert_array_equal(again.predict_proba(X[val]), head.predict_proba(X[val]))
        assert list(again.classes_) == list(head.classes_)


def test_attention_padding_never_leaks():
    torch.manual_seed(0)
    module = AttentionPooling(dim=16, n_classes=3, heads=4, hidden=8, dropout=0.0).eval()
    short = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    long_ = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    x, mask = pad([short, long_])
    x[0, 5:] = 1e6  # garbage where the short protein is padded: a leak would show
    with torch.inference_mode():
        batched, attention = module.pool(torch.from_numpy(x), torch.from_numpy(mask))
        alone, _ = module.pool(torch.from_numpy(short[None]), torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert attention[0, 5:].abs().max().item() == 0.0
    assert torch.allclose(attention[0, :5].sum(0), torch.ones(4))


def test_length_batches_group_similar_lengths_within_budget():
    lengths = np.random.default_rng(0).integers(10, 800, 500)
    batches = length_batches(lengths, max_tokens=4000, max_size=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 64 and (lengths[b].max() * len(b) <= 4000 or len(b) == 1)
    padded = sum(lengths[b].max() * len(b) for b in batches)
    assert lengths.sum() / padded > 0.9  # padding efficiency of length bucketing


@pytest.mark.parametrize("cls,k,expected", [(SimpleCV, 5, 5), (NestedCV, 5, 20), (NestedCV, 4, 12)])
def test_splitters_never_reuse_a_protein_and_count_right(cls, k, expected):
    folds = np.repeat(np.arange(k), 7)
    folds[:3] = -1  # removed by partitioning: never used
    splits = cls().split(folds)
    assert len(splits) == expected
    for s in splits:
        parts = [set(s.train), set(s.val), set(s.test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(np.flatnonzero(folds >= 0))
        assert set(folds[s.test]) == {s.test_fold} and set(folds[s.val]) == {s.val_fold}
    tests = [s.test_fold for s in splits]
    assert all(tests.count(f) == (k - 1 if cls is NestedCV else 1) for f in range(k))
    if cls is SimpleCV:
        assert [(s.test_fold, s.val_fold) for s in splits] == [(f, (f + 1) % k) for f in range(k)]


def test_stratified_folds_keep_identical_sequences_together():
    seqs = [f"M{'K' * i}" for i in range(10)] * 3  # ten sequences, each under three IDs
    labels = np.array([i % 2 for i in range(len(seqs))])
    folds = stratified_folds(labels, seqs, k=3, seed=0)
    for s in set(seqs):
        assert len({folds[i] for i, t in enumerate(seqs) if t == s}) == 1
    assert sorted(set(folds)) == [0, 1, 2]


def test_metrics_match_scikit_learn_on_hand_made_predictions():
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    proba = np.eye(3)[pred] * 0.8 + 0.2 / 3
    groups = np.array(["a", "a", "b", "b", "a", "b", "a", "b"])
    m = classification_metrics(y, proba, ["x", "y", "z"], groups)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # By hand: F1(x) = 2*2/(2*2+1+1) = 2/3, F1(y) = 2*1/(2+1+1) = 1/2, F1(z) = 2*2/(4+1+1) = 2/3.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["per_group"]["a"]["n"] == 4 and m["per_group"]["a"]["accuracy"] == pytest.approx(3 / 4)
    assert m["per_class"]["y"]["recall"] == pytest.approx(1 / 2)
    ci = bootstrap_ci(y, pred, 3, n_boot=200)
    assert ci["accuracy"][0] <= 5 / 8 <= ci["accuracy"][1]
    # McNemar: a right where b wrong on 3 proteins, the reverse on 0 -> p = 2 * 0.5**3.
    test = mcnemar(y, y, np.array([1, 1, 1, 1, 1, 2, 2, 2]))
    assert (test["only_a_right"], test["only_b_right"]) == (3, 0) and test["p_value"] == pytest.approx(0.25)


def test_macro_f1_within_a_group_averages_over_the_classes_the_group_has():
    # Group "a" has classes x and y only; z is never true there. One protein of "a" predicted z
    # is an error that lowers y's recall, but z itself adds no F1 of 0 to the average.
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 2, 2, 2])
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    m = classification_metrics(y, np.eye(3)[pred], ["x", "y", "z"], groups)
    a = m["per_group"]["a"]
    assert a["classes"] == ["x", "y"]
    # By hand: F1(x) = 1, F1(y) = 2*1/(2*1+0+1) = 2/3.
    assert a["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert a["macro_f1"] == pytest.approx(f1_score(y[:4], pred[:4], labels=[0, 1], average="macro"))
    assert a["mcc"] == pytest.approx(matthews_corrcoef(y[:4], pred[:4]))
    assert m["per_group"]["b"]["mcc"] == 0.0  # one class only: no correlation to measure
    ci = bootstrap_ci(y[:4], pred[:4], 3, n_boot=300, classes=np.array([0, 1]))
    assert ci["macro_f1"][0] <= a["macro_f1"] <= ci["macro_f1"][1] <= 1.0


def test_binary_metrics_include_roc_and_pr_auc():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.3, 0.7], [0.35, 0.65], [0.2, 0.8]])
    m = classification_metrics(y, proba, ["cyto", "nuc"])
    # By hand: 3 of the 4 (positive, negative) pairs are ordered right; ranking pos, neg, pos, neg
    # gives average precision (1/1 + 2/3) / 2.
    assert m["roc_auc"] == pytest.approx(0.75) and m["pr_auc"] == pytest.approx(5 / 6)


def test_reference_predictions_reproduce_deeplocpro_numbers():
    if not DEEPLOCPRO_SUBSET.exists():
        pytest.skip("../shared/data not present")
    data = read_deeplocpro(DEEPLOCPRO_SUBSET)
    ref = read_reference(SHARED_DATA / "deeplocpro" / "cv_heldout_predictions", data)
    m = classification_metrics(data.labels, ref.proba, data.classes, data.groups)
    assert round(m["accuracy"], 3) == 0.775
    assert round(m["macro_f1"], 3) == 0.728
    assert round(m["mcc"], 3) == 0.714
    assert (ref.folds == data.folds).all() and len(ref.splits) == 5
    assert set(m["per_group"]) == {"archaea", "negative", "positive"}


def test_dataset_readers_on_the_shared_files():
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data not present")
    dlp = read_deeplocpro(DEEPLOCPRO_SUBSET)
    assert len(dlp) == 1131 and dlp.n_classes == 6 and sorted(np.bincount(dlp.folds)) == [210, 215, 232, 234, 240]
    csv = read_labeled_csv(SHARED_DATA / "teaching" / "uniprot_protein_data_assigment.csv",
                           class_names={"0": "Cytoplasm", "1": "Nucleus"})
    assert len(csv) == 3585 and csv.classes == ["Cytoplasm", "Nucleus"]
    assert np.bincount(csv.labels).tolist() == [1929, 1656]
    hard = read_deeploc1(SHARED_DATA / "deeploc1_light_attention" / "setHARD.fasta")
    assert len(hard) == 490 and hard.n_classes == 10 and set(hard.extra["membrane"]) == {"U"}
    val = read_deeploc1(SHARED_DATA / "deeploc1_light_attention" / "deeploc_our_val_set.fasta")
    dual = val.extra["annotation"] == "Cytoplasm-Nucleus"
    assert dual.sum() == 23 and {val.classes[k] for k in val.labels[dual]} == {"Cytoplasm"}
    assert np.bincount(val.labels)[val.classes.index("Nucleus")] == 476  # as SOURCES.md counts them


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="MMseqs2 not installed (scripts/setup.sh installs it)")
def test_homology_folds_put_close_relatives_together():
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    ids, seqs, labels = [], [], []
    for family in range(12):
        root = rng.choice(alphabet, size=150)
        for member in range(4):
            seq = root.copy()
            mutate = rng.random(150) < 0.05
            seq[mutate] = rng.choice(alphabet, size=int(mutate.sum()))
            ids.append(f"f{family}_m{member}")
            seqs.append("".join(seq))
            labels.append(family % 2)
    part = homology_folds(ids, seqs, np.array(labels), k=3, threshold=0.3, aligner="mmseqs2", threads=1)
    assert part.removed + int((part.folds >= 0).sum()) == len(ids)
    for family in range(12):
        placed = {int(f) for i, f in zip(ids, part.folds) if i.startswith(f"f{family}_") and f >= 0}
        assert len(placed) <= 1, (family, placed)


def test_cli_compare_writes_a_complete_run_and_predicts(planted, tmp_path):
    data, cache, csv = planted
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(heads_main, [
        "compare", "--cache", str(cache), "--data", str(csv), "--heads", "logreg,attention", "--folds", "stratified",
        "--k", "3", "--out", str(out), "--set", "attention.max_epochs=5", "--set", "attention.threads=1",
        "--set", "attention.heads=4", "--bootstrap", "200",
    ])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.json", "predictions.csv", "comparison.md", "comparison.csv", "splits.json",
                 "plots/confusion_logreg.png", "plots/per_class_f1.png", "plots/training_attention.png",
                 "plots/embedding_map.svg"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == ["class0", "class1", "class2"] and config["head_params"]["attention"]["max_epochs"] == 5
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 2 * len(data) and set(preds["method"]) == {"logreg", "attention"}
    assert len(list((out / "models" / "logreg").glob("*.joblib"))) == 3
    manifest = json.loads((out / "models" / "manifest.json").read_text())
    assert sorted((m["method"], m["split"]) for m in manifest["models"]) == sorted(
        (method, f"test{t}_val{(t + 1) % 3}") for method in ("logreg", "attention") for t in range(3))
    assert config["backbone"]["weights_sha256"] == config["cache_provenance"]["weights_sha256"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["paired_tests"]) == 1
    table = (out / "comparison.md").read_text()
    assert "| logreg |" in table and "McNemar" in table

    result = runner.invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache),
                                        "--out", str(tmp_path / "p.tsv"), "--head", "logreg"])
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert len(pred) == len(data) and (pred[["p_class0", "p_class1", "p_class2"]].sum(axis=1) - 1).abs().max() < 1e-4
    assert pred["in_training_data"].all()  # every protein was in some fold's training data
    # Without --head: the best method by macro-F1, from its own files.
    result = runner.invoke(heads_main,
                           ["predict", "--run", str(out), "--cache", str(cache), "--out", str(tmp_path / "q.tsv")])
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    best = max(metrics, key=lambda n: metrics[n]["macro_f1"])
    assert result.exit_code == 0 and f"ensemble of 3 {best} models" in result.output


def test_cli_errors_are_messages(tmp_path, planted):
    _, cache, csv = planted
    runner = CliRunner()
    result = runner.invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(csv), "--head", "logreg",
                                        "--folds", "file", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "gives no folds; use --folds stratified" in result.output
    other = write_fasta(tmp_path / "o.fasta", {"P1|Cytoplasmic|negative|0": "MKT", "P2|Cytoplasmic|negative|1": "MKV",
                                                "P3|Extracellular|negative|2": "MKW"})
    result = runner.invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(other), "--head", "logreg",
                                        "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "3 of 3 proteins have no embedding" in result.output
    assert not (tmp_path / "r2").exists()  # refused before anything was written
    result = runner.invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(csv), "--head", "logreg",
                                        "--folds", "stratified", "--k", "3", "--set", "logreg.Cs=[1.0]",
                                        "--bootstrap", "100", "--out", str(tmp_path / "r3")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(csv), "--head", "logreg",
                                        "--folds", "stratified", "--k", "4", "--out", str(tmp_path / "r3")])
    assert result.exit_code == 1 and "holds another run" in result.output and "Traceback" not in result.output
    result = runner.invoke(heads_main, ["predict", "--run", str(tmp_path / "r3"), "--cache", str(cache),
                                        "--out", str(tmp_path / "p.tsv"), "--head", "attention"])
    assert result.exit_code == 1 and "no saved models for head 'attention'" in result.output


def test_bootstrap_metrics_from_confusion_equal_scikit_learn():
    from sklearn.metrics import confusion_matrix

    from heads.metrics import metrics_from_confusion

    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 6):
        y = rng.integers(0, n_classes, 200)
        pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, n_classes, 200))
        pred[pred == n_classes - 1] = 0  # one class never predicted: F1 0, as zero_division=0 has it
        got = metrics_from_confusion(confusion_matrix(y, pred, labels=np.arange(n_classes)))
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
        expected_f1 = f1_score(y, pred, average="macro", labels=np.arange(n_classes), zero_division=0)
        assert got["macro_f1"] == pytest.approx(expected_f1)
        assert got["mcc"] == pytest.approx(matthews_corrcoef(y, pred))


def test_training_batches_never_hold_a_single_protein():
    lengths = np.array([1000, 990, 980, 50])
    batches = length_batches(lengths, max_tokens=2000, max_size=64, min_size=2)
    assert all(len(b) >= 2 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2, 3]
    head = AttentionHead(heads=2, hidden=4, max_epochs=2, batch_tokens=40, threads=1)
    arrays = [np.random.default_rng(i).normal(size=(n, 8)).astype(np.float32) for i, n in enumerate([30, 5, 12])]
    head.fit(ArrayResidues(arrays), np.array([0, 1, 0]))  # batches of 1 would break batch norm
    assert head.predict_proba(ArrayResidues(arrays)).shape == (3, 2)


def test_features_are_found_by_sequence_whatever_the_ids(tmp_path, tiny_weights):
    """A DeepLocPro cache keys IDs by the header's first word; the dataset by accession."""
    fasta = write_fasta(tmp_path / "d.fasta", {"P1|Cytoplasmic|negative|0": "MKTAYIAK",
                                               "P2|Periplasmic|positive|1": "MKVW",
                                               "P3|Cytoplasmic|archaea|2": "MKTAYIAK"})
    cache_path = tmp_path / "d.h5"
    extract(fasta, cache_path, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    data = read_deeplocpro(fasta)
    with EmbeddingCache(cache_path) as cache:
        assert cache.ids[0] == "P1|Cytoplasmic|negative|0" and data.ids[0] == "P1"
        X = FeatureSource(cache, data.sequences, ids=data.ids).pooled()
        np.testing.assert_array_equal(X, cache.pooled(cache.ids).astype(np.float32))


def test_attention_heads_adapt_to_any_embedding_width(tmp_path):
    from heads.attention import usable_heads

    assert usable_heads(1900, 8) == 5 and usable_heads(320, 8) == 8 and usable_heads(7, 8) == 7
    arrays = [np.random.default_rng(i).normal(size=(10 + i, 38)).astype(np.float32) for i in range(6)]
    head = AttentionHead(heads=8, hidden=4, max_epochs=2, threads=1).fit(ArrayResidues(arrays), np.array([0, 1] * 3))
    assert head.heads_ == 2  # 38 = 2 x 19
    again = Head.load(head.save(tmp_path / "h.pt"))
    np.testing.assert_array_equal(again.predict_proba(ArrayResidues(arrays)), head.predict_proba(ArrayResidues(arrays)))


def test_held_out_test_fold_splits():
    folds = np.repeat([0, 1, 2, 3, 9], 4)
    nested = NestedCV().split(folds, test_fold=9)
    assert [(s.test_fold, s.val_fold) for s in nested] == [(9, 0), (9, 1), (9, 2), (9, 3)]
    assert all(set(folds[s.train]) == {0, 1, 2, 3} - {s.val_fold} for s in nested)
    simple = SimpleCV().split(folds, test_fold=9)
    assert [(s.test_fold, s.val_fold) for s in simple] == [(9, 0)]


def test_train_on_one_file_test_on_another(planted, tmp_path):
    data, cache, csv = planted
    frame = pd.read_csv(csv)
    test = frame.iloc[::4]
    train = pd.concat([frame.drop(test.index), test.iloc[:3].assign(id=lambda f: f["id"] + "_copy")])
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(heads_main, [
        "compare", "--cache", str(cache), "--data", str(tmp_path / "train.csv"),
        "--test-data", str(tmp_path / "test.csv"),
        "--heads", "logreg", "--scheme", "nested", "--k", "3", "--out", str(out), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["id"]) == sorted(test["id"]) and (preds["test_fold"] == 3).all()
    info = json.loads((out / "config.json").read_text())["folds_info"]
    assert info["training_sequences_also_in_test_removed"] == 3 and info["n_test"] == len(test)
    assert len(json.loads((out / "splits.json").read_text())["logreg"]) == 3
    assert "tested only on" in (out / "comparison.md").read_text()


# -- scikit-learn conventions, checks and persistence ---------------------------------------
def pooled_task(n=30, dim=6, seed=0, labels=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    y = np.array([labels[i % len(labels)] for i in range(n)])
    X = rng.normal(size=(n, dim)).astype(np.float32)
    for k, label in enumerate(labels):
        X[y == label, k] += 3.0
    return X, y


def residues_of(X, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayResidues([np.tile(row, (int(rng.integers(3, 9)), 1)) for row in X])


def small_head(name):
    from heads.registry import make_head

    params = {"logreg": {"Cs": [0.1, 1.0]}, "lightgbm": {"n_estimators": 20, "min_child_samples": 1, "n_jobs": 1},
              "attention": {"heads": 2, "hidden": 4, "max_epochs": 2, "threads": 1}}[name]
    return make_head(name, params)


def fit_small(name, X, y, eval_set=None, **params):
    head = small_head(name).set_params(**params)
    if head.input == "per_residue":
        X = residues_of(X)
        eval_set = None if eval_set is None else (residues_of(eval_set[0], 1), eval_set[1])
    return head.fit(X, y, eval_set=eval_set), X


FROZEN = ["logreg", "lightgbm", "attention"]


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "attention", "finetune"])
def test_every_head_clones_with_its_parameters(name, tmp_path):
    from sklearn.base import clone

    from heads.registry import HEADS

    cls = HEADS[name]
    params = {"finetune": {"weights": "w.pt", "mode": "lora", "checkpoint_dir": str(tmp_path)},
              "attention": {"conv_kernel": 9, "checkpoint_dir": str(tmp_path)}, "logreg": {"Cs": [0.5]},
              "lightgbm": {"num_leaves": 7}}[name]
    head = cls(**params)
    copy = clone(head)
    assert type(copy) is cls and copy.get_params() == head.get_params() and copy is not head


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "attention", "finetune"])
def test_unfitted_heads_raise_not_fitted_error(name, tmp_path):
    from sklearn.exceptions import NotFittedError

    from heads.registry import HEADS

    head = HEADS[name](weights="w.pt") if name == "finetune" else HEADS[name]()
    X = np.zeros((2, 4), dtype=np.float32)
    if head.input == "per_residue":
        X = residues_of(X)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        head.predict_proba(X if head.input != "sequence" else ["MKV"])
    with pytest.raises(NotFittedError):
        head.save(tmp_path / "h")


@pytest.mark.parametrize("name", FROZEN)
def test_frozen_heads_know_their_width_and_refuse_another(name):
    X, y = pooled_task()
    head, _ = fit_small(name, X, y, eval_set=pooled_task(seed=1))
    assert head.n_features_in_ == 6
    narrow = X[:, :5]
    with pytest.raises(ValueError, match="trained on 6-dimensional embeddings, got 5"):
        head.predict_proba(residues_of(narrow) if head.input == "per_residue" else narrow)


@pytest.mark.parametrize("name", FROZEN)
def test_nan_or_infinite_features_are_a_clear_error(name):
    X, y = pooled_task()
    bad = X.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_small(name, bad, y)
    head, _ = fit_small(name, X, y)
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        head.predict_proba(residues_of(bad) if head.input == "per_residue" else bad)


@pytest.mark.parametrize("name", ["logreg", "lightgbm", "attention", "finetune"])
def test_training_on_a_single_class_is_a_clear_error(name):
    from heads.registry import HEADS

    X, _ = pooled_task(n=6)
    y = np.array(["Nucleus"] * 6)
    if name == "finetune":
        head, X = HEADS[name](weights="never-loaded.pt"), ["MKVL"] * 6
    else:
        head = small_head(name)
        X = residues_of(X) if head.input == "per_residue" else X
    with pytest.raises(ValueError, match=r"training data hold one class \(Nucleus\); a classifier needs at least two"):
        head.fit(X, y, eval_set=(X, np.array(["Cytoplasm"] * 6)))


@pytest.mark.parametrize("name", FROZEN)
def test_string_labels_with_an_eval_set_train_and_predict(name):
    X, y = pooled_task(labels=("Cytoplasm", "Nucleus"))
    Xv, yv = pooled_task(seed=1, labels=("Cytoplasm", "Nucleus"))
    settings = {"max_epochs": 10, "lr": 1e-2} if name == "attention" else {}
    head, _ = fit_small(name, X, y, eval_set=(Xv, yv), **settings)
    assert list(head.classes_) == ["Cytoplasm", "Nucleus"]
    pred = head.predict(residues_of(Xv) if head.input == "per_residue" else Xv)
    assert set(pred) <= {"Cytoplasm", "Nucleus"} and (pred == yv).mean() > 0.8


@pytest.mark.parametrize("name", FROZEN)
def test_labels_of_mixed_types_or_an_empty_eval_set_are_clear_errors(name):
    X, _ = pooled_task(n=6)
    with pytest.raises(ValueError, match="labels mix types"):
        fit_small(name, X, [1, "a", 1, "a", 1, "a"])
    with pytest.raises(ValueError, match="labels mix types"):
        fit_small(name, X, np.array([0, 1] * 3), eval_set=(X, np.array(["0", "1"] * 3)))
    with pytest.raises(ValueError, match="holds no proteins"):
        fit_small(name, X, np.array([0, 1] * 3), eval_set=(X[:0], np.array([], dtype=int)))


@pytest.mark.parametrize("name", FROZEN)
def test_one_protein_per_class_still_trains(name):
    X, y = pooled_task(n=3)
    head, Xin = fit_small(name, X, y, eval_set=(X, y))
    proba = head.predict_proba(Xin)
    assert proba.shape == (3, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("params,message", [
    ({"conv_kernel": 4}, "conv_kernel must be 0 .* or an odd positive number"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"heads": 0}, "heads must be a whole number >= 1"),
    ({"metric": "auc"}, "metric must be one of"),
    ({"crop": -5}, "crop must be a whole number >= 1 or null"),
])
def test_bad_attention_parameters_are_clear_errors_before_training(params, message):
    from heads.registry import make_head

    with pytest.raises(ValueError, match=message):
        make_head("attention", params)
    X, y = pooled_task(n=6)
    with pytest.raises(ValueError, match=message):  # also when built directly: fit checks first
        AttentionHead(**params, threads=1).fit(residues_of(X), y)


def test_unknown_parameters_list_the_valid_ones(planted, tmp_path):
    from heads.registry import make_head

    with pytest.raises(ValueError, match="logreg has no parameter 'foo'; its parameters are Cs, class_weight"):
        make_head("logreg", {"foo": 1})
    _, cache, csv = planted
    result = CliRunner().invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(csv), "--head", "logreg",
                                             "--out", str(tmp_path / "r"), "--set", "logreg.foo=1"])
    assert result.exit_code == 2 and "logreg has no parameter 'foo'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()
    result = CliRunner().invoke(heads_main, ["cv", "--cache", str(cache), "--data", str(csv), "--head", "attention",
                                             "--out", str(tmp_path / "r"), "--set", "attention.conv_kernel=4"])
    assert result.exit_code == 1 and "conv_kernel must be" in result.output and "Traceback" not in result.output


def test_params_command_lists_every_parameter_with_default_and_meaning():
    from heads.registry import HEADS

    result = CliRunner().invoke(heads_main, ["params"])
    assert result.exit_code == 0, result.output
    for name, cls in HEADS.items():
        docs = cls.param_docs()
        assert set(docs) == set(cls().get_params() if name != "finetune" else cls(weights="w").get_params())
        for param, (_default, meaning) in docs.items():
            assert meaning, f"{name}.{param} has no meaning"
            assert any(line.split()[:1] == [param] and meaning in line for line in result.output.splitlines()), param
    one = CliRunner().invoke(heads_main, ["params", "attention"])
    assert "conv_kernel" in one.output and "Cs" not in one.output


def test_class_names_that_match_no_label_are_an_error(tmp_path):
    from embedcache.sequences import InputError

    path = tmp_path / "d.csv"
    pd.DataFrame({"id": ["a", "b"], "sequence": ["MKV", "MKL"], "label": ["0", "1"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"--class-names 'Cytoplasm', 'Nucleus' match no value of column 'label'; "
                                         r"its values are '0', '1'"):
        read_labeled_csv(path, class_names={"Cytoplasm": "0", "Nucleus": "1"})  # the pairs written backwards
    with pytest.raises(InputError, match=r"--class-names '2' match no value"):
        read_labeled_csv(path, class_names={"0": "Cytoplasm", "2": "Nucleus"})
    assert read_labeled_csv(path, class_names={"0": "Cytoplasm", "1": "Nucleus"}).classes == ["Cytoplasm", "Nucleus"]


@pytest.mark.parametrize("name", FROZEN)
def test_saved_heads_record_kind_and_version_and_load_by_kind(name, tmp_path):
    import joblib

    from embedcache import __version__

    X, y = pooled_task()
    head, Xin = fit_small(name, X, y, eval_set=pooled_task(seed=1))
    path = head.save(tmp_path / "model.bin")  # the recorded kind, not the file name, picks the reader
    data = torch.load(path, weights_only=True) if head.input == "per_residue" else joblib.load(path)
    assert data["kind"] == name and data["version"] == __version__
    again = Head.load(path)
    assert type(again) is type(head)
    np.testing.assert_array_equal(again.predict_proba(Xin), head.predict_proba(Xin))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_head_from_a_newer_version_warns(tmp_path):
    import joblib

    from heads.base import NewerVersionWarning

    head, X = fit_small("logreg", *pooled_task())
    path = head.save(tmp_path / "m.joblib")
    data = joblib.load(path)
    data["version"] = "99.0.0"
    joblib.dump(data, path)
    with pytest.warns(NewerVersionWarning, match="saved by embedcache 99.0.0"):
        Head.load(path)


def test_files_written_before_heads_recorded_a_kind_still_load(tmp_path):
    import joblib

    X, y = pooled_task()
    logreg, _ = fit_small("logreg", X, y)
    joblib.dump(logreg, tmp_path / "old.joblib")  # the earlier format: the bare estimator
    np.testing.assert_array_equal(Head.load(tmp_path / "old.joblib").predict_proba(X), logreg.predict_proba(X))
    attention, R = fit_small("attention", X, y)
    saved = torch.load(attention.save(tmp_path / "new.pt"), weights_only=True)
    old = {k: v for k, v in saved.items() if k not in ("kind", "version")}
    old["params"] = {k: v for k, v in old["params"].items() if k != "checkpoint_dir"}
    torch.save(old, tmp_path / "old.pt")
    np.testing.assert_array_equal(Head.load(tmp_path / "old.pt").predict_proba(R), attention.predict_proba(R))


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04broken zip"])
def test_a_damaged_saved_head_is_a_clear_error(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="m.pt: not a"):
        Head.load(path)


def test_fit_leaves_the_callers_random_state_alone_for_every_frozen_head():
    X, y = pooled_task()
    for name in FROZEN:
        torch.manual_seed(5)
        np.random.seed(5)
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
        head, Xin = fit_small(name, X, y, eval_set=pooled_task(seed=1))
        head.predict_proba(Xin)
        assert torch.equal(torch.get_rng_state(), torch_state), name
        assert np.array_equal(np.random.get_state()[1], numpy_state[1]), name


def test_no_import_cycles_in_heads():
    """Every import between heads modules, also inside functions, forms an acyclic graph."""
    import ast
    from pathlib import Path

    import heads

    package = Path(heads.__file__).parent
    graph = {}
    for path in package.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    edges |= {node.module} if node.module else {a.name for a in node.names}
                elif node.module and node.module.startswith("heads."):
                    edges.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[1] for a in node.names if a.name.startswith("heads.")}
        graph[path.stem] = edges - {"__init__"}
    state: dict[str, int] = {}

    def visit(module, trail):
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for other in graph.get(module, ()):
            visit(other, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])
    assert "registry" not in graph["base"] and graph["registry"] >= {"attention", "estimators", "finetune"}


def test_reference_file_without_fold_numbers_is_named_in_the_error(tmp_path):
    data = LabeledSet("set", ["P1", "P2"], ["MKT", "MKV"], np.array([0, 1]), ["a", "b"])
    pd.DataFrame({"a": [0.9, 0.2], "b": [0.1, 0.8]}, index=["P1", "P2"]).to_csv(tmp_path / "model_x_y.csv")
    with pytest.raises(ValueError, match=r"model_x_y\.csv: not named model_\{test\}_\{val\}\.csv"):
        read_reference(tmp_path, data)
