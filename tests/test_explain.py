from __future__ import annotations

import json
import re
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from embedcache.extract import ExtractConfig, extract
from heads.attention import AttentionHead
from heads.cli import main as heads_main
from heads.explain import (
    AttentionFileError,
    check_has_attention,
    compute_attention,
    file_name,
    group_name,
    read_attention,
    seen_ranges,
    top_positions,
)
from heads.features import ArrayResidues
from heads.finetune import FinetuneHead, crop_positions, crop_sequence
from heads.rundir import FinishedRun, open_finished

MOTIF = "WCHWC"
BACKGROUND = np.array(list("ADEFGIKLMNPQRSTVY"))  # no W, C, H: the motif is made of them


def motif_sequences(n: int, seed: int, low: int = 40, high: int = 120) -> tuple[list[str], np.ndarray, list[int]]:
    """Odd proteins carry MOTIF at a random place (its start, else -1); the label says which."""
    rng = np.random.default_rng(seed)
    sequences, labels, starts = [], [], []
    for i in range(n):
        length = int(rng.integers(low, high))
        seq = "".join(rng.choice(BACKGROUND, length))
        at = -1
        if i % 2:
            at = int(rng.integers(0, length - len(MOTIF)))
            seq = seq[:at] + MOTIF + seq[at + len(MOTIF):]
        sequences.append(seq)
        labels.append(i % 2)
        starts.append(at)
    return sequences, np.array(labels), starts


def embed_by_letter(sequences: list[str], seed: int, dim: int = 16) -> list[np.ndarray]:
    """A hand-made per-residue embedding: a fixed vector per letter plus noise; channel 0 marks W, C and H."""
    table_rng = np.random.default_rng(123)
    table = {a: table_rng.normal(size=dim).astype(np.float32) for a in "ACDEFGHIKLMNPQRSTVWY"}
    for a, v in table.items():
        v[0] = 2.0 if a in MOTIF else 0.0
    rng = np.random.default_rng(seed)
    return [np.stack([table[a] for a in s]) + 0.3 * rng.normal(size=(len(s), dim)).astype(np.float32)
            for s in sequences]


def test_attention_head_weights_peak_on_a_planted_motif():
    train_seqs, y, _ = motif_sequences(120, 1)
    val_seqs, vy, _ = motif_sequences(60, 2)
    test_seqs, ty, starts = motif_sequences(60, 3)
    head = AttentionHead(heads=4, hidden=16, max_epochs=15, patience=50, dropout=0.1, lr=3e-3, max_batch=8,
                         threads=1, random_state=0)
    head.fit(ArrayResidues(embed_by_letter(train_seqs, 1)), y,
             eval_set=(ArrayResidues(embed_by_letter(val_seqs, 2)), vy))
    found = head.attention(ArrayResidues(embed_by_letter(test_seqs, 3)))
    assert (found.proba.argmax(1) == ty).mean() >= 0.9
    share, fair = [], []
    for w, at, seq in zip(found.weights, starts, test_seqs):
        if at >= 0:
            share.append(w.mean(0)[at:at + len(MOTIF)].sum())
            fair.append(len(MOTIF) / len(seq))
    share, fair = np.array(share), np.array(fair)
    # The motif is ~6% of a protein; the trained head puts several times that share of its attention there.
    assert np.median(share) > 2.5 * np.median(fair), (np.median(share), np.median(fair))
    assert (share > 2 * fair).mean() >= 0.7, share / fair


def test_attention_weights_sum_to_one_over_real_residues_and_match_one_protein_alone():
    seqs, y, _ = motif_sequences(30, 4, low=5, high=60)
    X = embed_by_letter(seqs, 4)
    head = AttentionHead(heads=4, hidden=8, max_epochs=2, threads=1, crop=50).fit(ArrayResidues(X), y)
    found = head.attention(ArrayResidues(X))  # length-bucketed batches: short proteins padded
    for i, (w, pos) in enumerate(zip(found.weights, found.positions)):
        seen = min(len(seqs[i]), 50)
        assert w.shape == (4, seen) and list(pos) == list(range(seen))  # crop keeps the N-terminal residues
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
        alone = head.attention(ArrayResidues([X[i]]))
        np.testing.assert_allclose(alone.weights[0], w, atol=1e-5)
        np.testing.assert_allclose(alone.proba[0], found.proba[i], atol=1e-5)
    np.testing.assert_allclose(found.proba, head.predict_proba(ArrayResidues(X)), atol=1e-5)


def test_padded_positions_get_zero_attention_whatever_they_hold():
    import torch

    from heads.features import pad

    seqs, y, _ = motif_sequences(10, 5, low=10, high=40)
    X = embed_by_letter(seqs, 5)
    head = AttentionHead(heads=4, hidden=8, max_epochs=1, threads=1).fit(ArrayResidues(X), y)
    x, mask = pad(X)
    x[~mask] = 1e4  # garbage in the padding: any leak would draw the softmax there
    with torch.inference_mode():
        _, attention = head.module_.pool(torch.from_numpy(x), torch.from_numpy(mask))
    assert attention[torch.from_numpy(~mask)].abs().max().item() == 0.0
    np.testing.assert_allclose(attention.sum(1).numpy(), 1.0, atol=1e-5)


def test_crop_positions_are_the_residues_crop_sequence_keeps():
    seq = "ABCDEFGHIJ"
    for policy in ("n_terminal", "ends"):
        for crop in (None, 4, 5, 10, 20):
            kept = crop_sequence(seq, crop, policy)
            assert "".join(seq[i] for i in crop_positions(len(seq), crop, policy)) == kept


def test_finetune_with_attention_pooling_gives_weights_at_residue_positions(tiny_weights):
    seqs, y, _ = motif_sequences(12, 6, low=20, high=40)
    head = FinetuneHead(weights=str(tiny_weights), pooling="attention", attention_heads=4, max_epochs=1,
                        batch_tokens=1024, threads=1, crop=30, crop_policy="ends").fit(np.array(seqs, object), y)
    found = head.attention(seqs)
    for seq, w, pos in zip(seqs, found.weights, found.positions):
        assert w.shape == (4, min(len(seq), 30)) and list(pos) == list(crop_positions(len(seq), 30, "ends"))
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(found.proba, head.predict_proba(seqs), atol=1e-5)
    alone = head.attention(seqs[:1])
    np.testing.assert_allclose(alone.weights[0], found.weights[0], atol=1e-5)
    mean_pooled = FinetuneHead(weights=str(tiny_weights), max_epochs=1, batch_tokens=1024, threads=1)
    mean_pooled.fit(np.array(seqs[:4], object), y[:4])
    with pytest.raises(ValueError, match="has no attention weights"):
        mean_pooled.attention(seqs)


def test_group_names_keep_any_id_apart():
    ids = ["sp/P12345/x", "sp%2FP12345%2Fx", ".", "..", ".hidden", "a b|c", "plain_ID-1.2"]
    names = [group_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all("/" not in n and not n.startswith(".") for n in names)
    assert group_name("plain_ID-1.2") == "plain_ID-1.2"
    files = [file_name(i) for i in ids]
    assert len(set(files)) == len(ids) and all(re.fullmatch(r"[A-Za-z0-9._\-]+", f) for f in files)
    assert file_name("P12345") == "P12345" and file_name("sp/P1|x").startswith("sp_P1_x_")


def test_seen_ranges_and_top_positions():
    seen = np.array([1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    assert seen_ranges(seen) == [[1, 2], [5, 5], [7, 9]]
    mean = np.array([0.0, 0.5, 0.45, 0.1, 0.3, 0.0])
    assert top_positions(mean, k=3, spacing=2) == [1, 4]  # 2 is next to 1; zeros are never labelled


def test_methods_without_attention_are_refused():
    def run(input_, params):
        manifest = {"models": [{"method": "m", "input": input_, "file": "m/x", "split": "s"}]}
        return FinishedRun(None, {"methods": {"m": params}, "classes": ["a", "b"]}, manifest)

    assert check_has_attention(run("per_residue", {}), "m") == "attention"
    assert check_has_attention(run("sequence", {"pooling": "attention"}), "m") == "finetune"
    with pytest.raises(ValueError, match="mean pooling, which has no attention"):
        check_has_attention(run("sequence", {"pooling": "mean"}), "m")
    with pytest.raises(ValueError, match="mean-pooled vectors and has no attention"):
        check_has_attention(run("pooled", {}), "m")


# -- a run, predict --attention and explain -----------------------------------------------
@pytest.fixture(scope="module")
def motif_run(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("motif_run")
    seqs, y, _ = motif_sequences(36, 7, low=20, high=60)
    # IDs with '/' and '|' as UniProt and DeepLocPro write them.
    ids = [f"sp/P{i:05d}|{'motif' if label else 'plain'}" for i, label in enumerate(y)]
    csv = tmp / "motif.csv"
    labels = ["motif" if v else "plain" for v in y]
    pd.DataFrame({"id": ids, "sequence": seqs, "label": labels}).to_csv(csv, index=False)
    cache = tmp / "motif.h5"
    extract(csv, cache, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    out = tmp / "run"
    result = CliRunner().invoke(heads_main, [
        "compare", "--cache", str(cache), "--data", str(csv), "--heads", "logreg,attention", "--folds", "stratified",
        "--k", "3", "--out", str(out), "--set", "attention.max_epochs=2", "--set", "attention.threads=1",
        "--set", "attention.heads=4", "--set", "logreg.Cs=[1.0]", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    return out, cache, csv, ids


def test_predict_writes_every_proteins_attention_averaged_over_the_fold_models(motif_run, tmp_path):
    out, cache, _, ids = motif_run
    result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache), "--head", "attention",
                                             "--out", str(tmp_path / "p.tsv"), "--attention", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    finished = open_finished(out)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f.attrs["run_fingerprint"] == finished.config["fingerprint"]
        assert f.attrs["method"] == "attention" and f.attrs["n_models"] == 3 and "mean over" in f.attrs["aggregation"]
        assert list(f["index/id"].asstr()[()]) == list(pred["id"]) and sorted(pred["id"]) == sorted(ids)
        for row in pred.itertuples(index=False):
            g = f["proteins"][group_name(row.id)]
            seq = g.attrs["sequence"]
            assert g.attrs["id"] == row.id and g["heads"].shape == (4, len(seq))
            np.testing.assert_allclose(g["heads"][()].sum(1), 1.0, atol=1e-5)
            np.testing.assert_allclose(g["mean"][()], g["heads"][()].mean(0), atol=1e-6)
            assert g.attrs["predicted_class"] == row.prediction
            assert abs(g.attrs["probability"] - getattr(row, f"p_{row.prediction}")) < 1e-4
            assert json.loads(g.attrs["residues_seen"]) == [[1, len(seq)]]
    # The file's map of one protein is the one computed for that protein alone.
    for ident in (ids[0], ids[1]):
        from_file = read_attention(tmp_path / "a.h5", ident, finished)
        alone = compute_attention(out, ident, cache=cache, head="attention")
        np.testing.assert_allclose(from_file.weights, alone.weights, atol=1e-5)
        assert from_file.predicted == alone.predicted and abs(from_file.probability - alone.probability) < 1e-5


def test_predict_refuses_attention_for_a_head_without_it(motif_run, tmp_path):
    out, cache, _, _ = motif_run
    result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache), "--head", "logreg",
                                             "--out", str(tmp_path / "p.tsv"), "--attention", str(tmp_path / "a.h5")])
    assert result.exit_code == 1 and "logreg predicts from mean-pooled vectors and has no attention" in result.output
    assert "attention" in result.output.split("with attention:")[1] and "Traceback" not in result.output
    assert not (tmp_path / "p.tsv").exists() and not (tmp_path / "a.h5").exists()


def test_cli_explain_draws_one_protein_from_the_file_or_computed(motif_run, tmp_path):
    out, cache, csv, ids = motif_run
    runner = CliRunner()
    result = runner.invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache), "--head", "attention",
                                        "--out", str(tmp_path / "p.tsv"), "--attention", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    ident = ids[1]
    result = runner.invoke(heads_main, ["explain", "--run", str(out), "--id", ident, "--attention",
                                        str(tmp_path / "a.h5"), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    stem = tmp_path / "fig" / f"attention_{file_name(ident)}"
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    assert png.read_bytes()[:4] == b"\x89PNG" and "predicted" in svg.read_text()
    # Computed for the protein alone, from the cache or from the labelled file itself.
    for source in (["--cache", str(cache)], ["--sequences", str(csv)]):
        result = runner.invoke(heads_main, ["explain", "--run", str(out), "--id", ident, *source,
                                            "--out", str(tmp_path / "fig2"), "--embeddings", str(tmp_path / "emb")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(heads_main, ["explain", "--run", str(out), "--id", "nobody", "--cache", str(cache),
                                        "--out", str(tmp_path / "fig3")])
    assert result.exit_code == 1 and "no protein with ID 'nobody'" in result.output
    result = runner.invoke(heads_main, ["explain", "--run", str(out), "--id", ident, "--cache", str(cache),
                                        "--head", "logreg", "--out", str(tmp_path / "fig3")])
    assert result.exit_code == 1 and "has no attention" in result.output and not (tmp_path / "fig3").exists()
    result = runner.invoke(heads_main, ["explain", "--run", str(out), "--id", ident, "--out", str(tmp_path / "f4")])
    assert result.exit_code == 2 and "give one of --attention" in result.output


def test_an_attention_file_of_another_run_is_refused(motif_run, tmp_path):
    out, cache, _, ids = motif_run
    result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache), "--head", "attention",
                                             "--out", str(tmp_path / "p.tsv"), "--attention", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        f.attrs["run_fingerprint"] = "0" * 64
    with pytest.raises(AttentionFileError, match="written for another run"):
        read_attention(tmp_path / "a.h5", ids[0], open_finished(out))


def test_a_figure_file_name_of_a_very_long_id_fits_a_file_system_and_stays_unique():
    long_a, long_b = "sp/" + "x" * 400 + "|a", "sp/" + "x" * 400 + "|b"
    names = {file_name(long_a), file_name(long_b), file_name("P12345"), file_name("x" * 300)}
    assert len(names) == 4 and file_name("P12345") == "P12345"
    assert all(len(f"attention_{n}.tmp.svg".encode()) <= 255 for n in names)


def test_predict_refuses_to_write_over_its_cache_or_a_file_of_the_run(motif_run, tmp_path):
    out, cache, _, _ = motif_run
    copy = tmp_path / "copy.h5"
    shutil.copyfile(cache, copy)
    before = copy.read_bytes()
    link = tmp_path / "link.h5"
    link.symlink_to(copy)
    for option, target in (("--out", copy), ("--attention", copy), ("--attention", link)):
        args = ["predict", "--run", str(out), "--cache", str(copy), "--head", "attention", "--out",
                str(tmp_path / "p.tsv"), "--attention", str(tmp_path / "a.h5")]
        args[args.index(option) + 1] = str(target)
        result = CliRunner().invoke(heads_main, args)
        assert result.exit_code == 2 and "is the --cache file; writing there would destroy it" in result.output
    assert copy.read_bytes() == before
    config = (out / "config.json").read_bytes()
    result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(copy), "--head", "attention",
                                             "--out", str(out / "config.json")])
    assert result.exit_code == 2 and "is a file of the run" in result.output
    assert (out / "config.json").read_bytes() == config
    beside = out / "new_proteins.tsv"  # a new file beside the run's own may be written, and written again
    for _ in range(2):
        result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(copy), "--head",
                                                 "attention", "--out", str(beside)])
        assert result.exit_code == 0, result.output
    beside.unlink()


def _edit_protein(change):
    def edit(path, ident):
        with h5py.File(path, "r+") as f:
            change(f["proteins"][group_name(ident)])
    return edit


def _cut(path, ident):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _scale(g):
    g["heads"][0] = g["heads"][0] * 3  # a head that no longer sums to 1


ATTENTION_DAMAGES = {
    "cut in half": (_cut, "damaged attention file"),
    "record without its sequence key": (_edit_protein(lambda g: g.attrs.__delitem__("sequence_key")),
                                        "damaged attention file"),
    "map without heads": (_edit_protein(lambda g: g.__delitem__("heads")), "damaged attention file"),
    "probabilities not JSON": (_edit_protein(lambda g: g.attrs.__setitem__("probabilities", "{")),
                               "damaged attention file"),
    "weights edited": (_edit_protein(_scale), "not a softmax over the residues read"),
}


@pytest.mark.parametrize("damage", list(ATTENTION_DAMAGES))
def test_a_damaged_or_edited_attention_file_is_an_error_naming_it(motif_run, tmp_path, damage):
    out, cache, _, ids = motif_run
    path = tmp_path / "a.h5"
    result = CliRunner().invoke(heads_main, ["predict", "--run", str(out), "--cache", str(cache), "--head", "attention",
                                             "--out", str(tmp_path / "p.tsv"), "--attention", str(path)])
    assert result.exit_code == 0, result.output
    read_attention(path, ids[1], open_finished(out))  # whole, it reads
    change, message = ATTENTION_DAMAGES[damage]
    change(path, ids[1])
    result = CliRunner().invoke(heads_main, ["explain", "--run", str(out), "--id", ids[1], "--attention", str(path),
                                             "--out", str(tmp_path / "fig")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{path}:" in result.output and message in result.output
    assert not (tmp_path / "fig").exists() or not any((tmp_path / "fig").iterdir())
