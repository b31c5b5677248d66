"""Run directories: one run per directory, its model files and backbone checked at prediction."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from embedcache.extract import ExtractConfig, extract
from embedcache.models import build_tiny_esm2
from embedcache.sequences import read_sequences
from embedcache.store import EmbeddingCache, write_arrays
from heads.cli import main as heads_main
from heads.rundir import RunDirectoryError, check_identity

from conftest import write_fasta
from test_heads import planted_cache, planted_dataset

FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--bootstrap", "100", "--folds", "stratified", "--no-figures"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted_runs")
    csv, cache = planted_cache(tmp, tiny_weights, n_per_class=20)
    return csv, cache


def run_cli(*args) -> object:
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def cv(csv, cache, out, *extra, head="logreg", k=3):
    return run_cli("cv", "--cache", cache, "--data", csv, "--head", head, "--k", k, "--out", out, *FAST, *extra)


def predict(run, cache, out, *extra):
    return run_cli("predict", "--run", run, "--cache", cache, "--out", out, *extra)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_records_its_backbone_fingerprint_and_every_model_file(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    with EmbeddingCache(cache) as c:
        assert config["backbone"]["weights_sha256"] == c.attrs["weights_sha256"]
        assert config["backbone"]["architecture"] == c.attrs["architecture"]
        assert config["backbone"]["layer"] == c.layers[-1]
        keys = {c.key(i) for i in c.ids}
    assert {"dtype", "precision", "embed_dim", "family", "pooling"} <= set(config["backbone"])
    assert len(config["fingerprint"]) == 64
    manifest_path = out / "models" / "manifest.json"
    assert config["manifest_sha256"] == sha256(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["fingerprint"] == config["fingerprint"]
    assert [(m["method"], m["split"]) for m in manifest["models"]] == [
        ("logreg", "test0_val1"), ("logreg", "test1_val2"), ("logreg", "test2_val0")]
    for entry in manifest["models"]:
        assert sha256(out / "models" / entry["file"]) == entry["sha256"]
        assert entry["classes"] == ["class0", "class1", "class2"]
    written = sorted(p.relative_to(out / "models").as_posix() for p in (out / "models").rglob("*.joblib"))
    assert written == sorted(m["file"] for m in manifest["models"])
    assert set((out / "models" / "training_keys.txt").read_text().split()) == keys


def test_a_second_run_with_other_folds_is_refused_and_overwrite_replaces_the_first(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out, k=4).exit_code == 0
    result = cv(csv, cache, out, k=3)
    assert result.exit_code == 1 and "holds another run" in result.output and "--overwrite" in result.output
    assert len(list((out / "models" / "logreg").iterdir())) == 4  # the first run is untouched
    result = cv(csv, cache, out, "--overwrite", k=3)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "models" / "logreg").iterdir()) == [
        "test0_val1.joblib", "test1_val2.joblib", "test2_val0.joblib"]
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 0 and "ensemble of 3 logreg models" in result.output


def test_fewer_heads_over_a_run_never_leave_its_other_models_for_predict(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    both = ["compare", "--cache", cache, "--data", csv, "--k", 3, "--out", out, *FAST,
            "--set", "lightgbm.n_estimators=20", "--set", "lightgbm.n_jobs=1"]
    assert run_cli(*both, "--heads", "logreg,lightgbm").exit_code == 0
    result = run_cli(*both, "--heads", "logreg")
    assert result.exit_code == 1 and "holds another run" in result.output
    assert run_cli(*both, "--heads", "logreg", "--overwrite").exit_code == 0
    assert not (out / "models" / "lightgbm").exists()
    result = predict(out, cache, tmp_path / "p.tsv", "--head", "lightgbm")
    assert result.exit_code == 1 and "no saved models for head 'lightgbm'" in result.output
    assert not (tmp_path / "p.tsv").exists()


def test_a_run_with_fewer_classes_over_another_is_refused_and_predicts_its_own_classes(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    two = tmp_path / "two.csv"
    frame = pd.read_csv(csv)
    frame[frame["label"] != "class2"].to_csv(two, index=False)
    result = cv(two, cache, out)
    assert result.exit_code == 1 and "holds another run" in result.output
    assert cv(two, cache, out, "--overwrite").exit_code == 0
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert [c for c in pred.columns if c.startswith("p_")] == ["p_class0", "p_class1"]
    # Proteins of the dropped class were not trained on.
    trained = dict(zip(pred["id"], pred["in_training_data"]))
    assert all(trained[i] != i.startswith("c2_") for i in pred["id"])


def test_predict_refuses_a_cache_of_another_model_of_the_same_width(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    # Same file name, shape and width; other weights.
    other_weights = build_tiny_esm2(tmp_path / "other" / "tiny_esm2.pt", num_layers=3, embed_dim=32,
                                    attention_heads=4, seed=1)
    other = tmp_path / "other.h5"
    extract(csv, other, ExtractConfig(weights=str(other_weights), threads=1), progress=False)
    result = predict(out, other, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "another backbone" in result.output
    with EmbeddingCache(cache) as a, EmbeddingCache(other) as b:
        assert a.attrs["weights_sha256"][:12] in result.output and b.attrs["weights_sha256"][:12] in result.output
    assert not (tmp_path / "p.tsv").exists()
    # Another width is refused the same way, before any model sees it.
    narrow = build_tiny_esm2(tmp_path / "narrow.pt", num_layers=3, embed_dim=16, attention_heads=4)
    extract(csv, tmp_path / "narrow.h5", ExtractConfig(weights=str(narrow), threads=1), progress=False)
    result = predict(out, tmp_path / "narrow.h5", tmp_path / "p.tsv")
    assert result.exit_code == 1 and "embed_dim 16 (the run's: 32)" in result.output


def test_predict_refuses_external_embeddings_of_another_model(planted, tmp_path):
    csv, _ = planted
    records = read_sequences(csv)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(len(r.sequence), 8)).astype(np.float32) for r in records]
    a = write_arrays(tmp_path / "a.h5", records, arrays, model="embedder-a")
    b = write_arrays(tmp_path / "b.h5", records, arrays, model="embedder-b")
    out = tmp_path / "run"
    assert cv(csv, a, out).exit_code == 0
    assert predict(out, a, tmp_path / "p.tsv").exit_code == 0
    result = predict(out, b, tmp_path / "q.tsv")
    assert result.exit_code == 1 and "architecture 'embedder-b' (the run's: 'embedder-a')" in result.output
    # Without `embedcache extract` settings there is no way to embed new sequences the same way.
    result = run_cli("predict", "--run", out, "--sequences", csv, "--out", tmp_path / "r.tsv")
    assert result.exit_code == 1 and "not made by `embedcache extract`" in result.output


def test_predict_checks_every_model_file_against_the_manifest(planted, tmp_path, caplog):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    models = out / "models" / "logreg"
    first, second = models / "test0_val1.joblib", models / "test1_val2.joblib"
    saved = first.read_bytes()

    shutil.copy(second, first)  # a model file replaced by another
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "test0_val1.joblib: sha256" in result.output and "differs" in result.output

    first.unlink()
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "test0_val1.joblib: listed in the run's manifest but missing" in result.output

    first.write_bytes(saved)
    shutil.copy(second, models / "stale_test9_val0.joblib")  # not written by this run: ignored
    with caplog.at_level(logging.WARNING):
        result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 0 and "ensemble of 3 logreg models" in result.output
    assert "stale_test9_val0.joblib" in caplog.text and "ignored" in caplog.text

    manifest_path = out / "models" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["models"] = manifest["models"][1:]  # a model dropped from the manifest by hand
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "manifest.json: changed after the run wrote it" in result.output


def test_an_edited_backbone_in_config_json_is_refused(planted, tmp_path):
    """config.json says which layer and model the run trained on; an edit there must not make
    predict feed the models other embeddings."""
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["backbone"]["layer"] = 99
    (out / "config.json").write_text(json.dumps(config))
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "config.json was edited" in result.output


def test_predict_embeds_sequences_with_the_runs_backbone_and_marks_training_proteins(planted, tmp_path,
                                                                                      monkeypatch):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    frame = pd.read_csv(csv)
    novel = "MKKRRKRLLIVKRKKRDEKR"
    known = list(zip(frame["id"][:5], frame["sequence"][:5]))
    fasta = write_fasta(tmp_path / "new.fasta", [*known, ("novel", novel)])
    result = run_cli("predict", "--run", out, "--sequences", fasta, "--out", tmp_path / "seq.tsv")
    assert result.exit_code == 0, result.output
    by_sequence = pd.read_csv(tmp_path / "seq.tsv", sep="\t").set_index("id")
    assert by_sequence["in_training_data"].to_dict() == {**dict.fromkeys(frame["id"][:5], True), "novel": False}
    assert predict(out, cache, tmp_path / "cache.tsv").exit_code == 0
    by_cache = pd.read_csv(tmp_path / "cache.tsv", sep="\t").set_index("id")
    columns = ["p_class0", "p_class1", "p_class2"]
    np.testing.assert_allclose(by_sequence.loc[frame["id"][:5], columns], by_cache.loc[frame["id"][:5], columns],
                               atol=1e-3)
    (made,) = (out / "embeddings").glob("*.h5")
    with EmbeddingCache(made) as c, EmbeddingCache(cache) as original:
        assert c.attrs["weights_sha256"] == original.attrs["weights_sha256"] and c.layers == original.layers[-1:]
    # Asked again, the cache beside the run is reused: nothing is embedded.
    import embedcache.extract

    monkeypatch.setattr(embedcache.extract, "extract", lambda *a, **k: pytest.fail("embedded again"))
    result = run_cli("predict", "--run", out, "--sequences", fasta, "--out", tmp_path / "again.tsv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.tsv").read_bytes() == (tmp_path / "seq.tsv").read_bytes()


def test_predict_refuses_a_pipe_instead_of_finding_it_empty_or_waiting_for_ever(planted, tmp_path):
    from heads.run import predict as predict_frame

    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    frame = pd.read_csv(csv)
    read, write = os.pipe()
    os.write(write, "".join(f">q{i}\n{s}\n" for i, s in enumerate(frame["sequence"][:3])).encode())
    os.close(write)
    try:
        with pytest.raises(ValueError, match="not a regular file .*save the sequences to a file"):
            predict_frame(out, sequences=f"/dev/fd/{read}")
    finally:
        os.close(read)
    assert not (out / "embeddings").exists()


def test_predict_options_are_explicit(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    result = run_cli("predict", "--run", out, "--out", tmp_path / "p.tsv")
    assert result.exit_code == 2 and "--cache C.h5 or with --sequences FILE" in result.output
    result = run_cli("predict", "--run", out, "--cache", cache, "--sequences", csv, "--out", tmp_path / "p.tsv")
    assert result.exit_code == 2
    result = predict(out, csv, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "not an HDF5 embedding cache" in result.output and "--sequences" in result.output


def test_an_unfinished_or_old_run_is_not_predicted_with(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    unfinished = {k: v for k, v in config.items() if k != "manifest_sha256"}
    (out / "config.json").write_text(json.dumps(unfinished))
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "did not finish" in result.output
    old = {k: v for k, v in unfinished.items() if k != "fingerprint"}
    (out / "config.json").write_text(json.dumps(old))
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "older heads" in result.output
    result = cv(csv, cache, out)
    assert result.exit_code == 1 and "without a fingerprint" in result.output


def test_overwrite_deletes_only_run_directories_and_never_their_inputs(planted, tmp_path):
    csv, cache = planted
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    result = cv(csv, cache, other, "--overwrite")
    assert result.exit_code == 1 and "holds no run" in result.output
    assert (other / "mine.txt").read_text() == "keep"
    # A config.json that merely names classes is not a run either.
    (other / "config.json").write_text('{"classes": ["cat", "dog"]}')
    result = cv(csv, cache, other, "--overwrite")
    assert result.exit_code == 1 and "holds no run" in result.output
    assert (other / "mine.txt").read_text() == "keep"
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    inside = out / "inputs" / "planted.h5"
    inside.parent.mkdir()
    shutil.copy(cache, inside)
    result = cv(csv, inside, out, "--overwrite", k=4)
    assert result.exit_code == 1 and "would delete" in result.output and inside.exists()


INTERRUPTED = """
import os, sys
import heads.evaluate, heads.run
real = heads.evaluate.cross_validate
def once(*args, **kwargs):
    result = real(*args, **kwargs)
    os._exit(9)  # as abrupt as kill -9: no cleanup, no lock released by Python
heads.run.cross_validate = once
from heads.cli import main
main(sys.argv[1:])
"""


def test_an_interrupted_compare_resumes_and_another_command_is_refused(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    args = ["compare", "--cache", str(cache), "--data", str(csv), "--heads", "logreg,lightgbm", "--k", "3",
            "--out", str(out), *FAST, "--set", "lightgbm.n_estimators=20", "--set", "lightgbm.n_jobs=1"]
    python_path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    killed = subprocess.run([sys.executable, "-c", INTERRUPTED, *args], env=env, capture_output=True, text=True,
                            check=False)
    assert killed.returncode == 9, killed.stderr
    assert (out / "models" / "logreg").is_dir() and not (out / "models" / "manifest.json").exists()
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 1 and "did not finish" in result.output
    different = run_cli(*[a if a != "logreg,lightgbm" else "logreg" for a in args])
    assert different.exit_code == 1 and "holds another run" in different.output
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.output
    assert predict(out, cache, tmp_path / "p.tsv", "--head", "lightgbm").exit_code == 0
    fresh = tmp_path / "fresh"
    assert run_cli(*[a if a != str(out) else str(fresh) for a in args]).exit_code == 0
    assert (out / "metrics.json").read_bytes() == (fresh / "metrics.json").read_bytes()


def test_identical_compares_give_identical_metrics(planted, tmp_path):
    csv, cache = planted
    args = ["compare", "--cache", cache, "--data", csv, "--heads", "logreg,lightgbm,attention", "--k", 3,
            "--seed", 3, *FAST, "--set", "lightgbm.n_estimators=30", "--set", "attention.max_epochs=3",
            "--set", "attention.heads=4", "--set", "attention.threads=1"]
    assert run_cli(*args, "--out", tmp_path / "a").exit_code == 0
    assert run_cli(*args, "--out", tmp_path / "b").exit_code == 0
    first, second = (tmp_path / "a" / "metrics.json").read_bytes(), (tmp_path / "b" / "metrics.json").read_bytes()
    assert first == second
    a, b = (json.loads((tmp_path / r / "config.json").read_text()) for r in "ab")
    assert a["fingerprint"] == b["fingerprint"]


def test_proteins_held_out_as_the_test_file_are_not_training_data(planted, tmp_path):
    csv, cache = planted
    frame = pd.read_csv(csv)
    test = frame.iloc[::4]
    frame.drop(test.index).to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "run"
    result = run_cli("cv", "--cache", cache, "--data", tmp_path / "train.csv", "--test-data", tmp_path / "test.csv",
                     "--head", "logreg", "--k", 3, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert predict(out, cache, tmp_path / "p.tsv").exit_code == 0
    pred = pd.read_csv(tmp_path / "p.tsv", sep="\t").set_index("id")
    assert not pred.loc[test["id"], "in_training_data"].any()
    assert pred.drop(test["id"])["in_training_data"].all()


def test_a_cache_without_provenance_is_refused_with_a_message(tmp_path):
    run_identity = {"model": "esm2_t6_8M_UR50D", "weights_sha256": "ab" * 32, "layer": 6}
    with pytest.raises(RunDirectoryError, match="records no provenance"):
        check_identity(run_identity, {}, tmp_path / "run", tmp_path / "cache.h5")


def test_predict_without_the_runs_weights_says_how_to_get_them_back(tmp_path, tiny_weights):
    """The weights that built the run's cache are gone: predict --sequences stops with advice that
    fits predict (it has no --weights/--model of its own)."""
    weights = tmp_path / "w.pt"
    shutil.copy(tiny_weights, weights)
    csv = planted_dataset(tmp_path, n_per_class=10)
    cache = tmp_path / "c.h5"
    extract(csv, cache, ExtractConfig(weights=str(weights), threads=1), progress=False)
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    weights.unlink()
    fasta = write_fasta(tmp_path / "new.fasta", [("novel", "MKKRRKRLLIVKRKKRDEKR")])
    result = run_cli("predict", "--run", out, "--sequences", fasta, "--out", tmp_path / "p.tsv")
    assert result.exit_code == 1 and "Put those weights back" in result.output
    assert "Pass --weights" not in result.output and not (tmp_path / "p.tsv").exists()


def test_a_manifest_written_before_it_held_the_backbone_still_predicts(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    assert cv(csv, cache, out).exit_code == 0
    manifest_path = out / "models" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["backbone"]
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    config = json.loads((out / "config.json").read_text())
    config["manifest_sha256"] = sha256(manifest_path)
    (out / "config.json").write_text(json.dumps(config))
    result = predict(out, cache, tmp_path / "p.tsv")
    assert result.exit_code == 0, result.output
