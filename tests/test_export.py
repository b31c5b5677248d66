"""Exports read back the way their consumers read them: fair-esm's extract.py files with torch.load,
bio_embeddings' HDF5 files with h5py by md5 and original_id, npz and npy with numpy."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from embedcache.cli import main
from embedcache.export import FORMATS, _output_lock, export_cache, safe_file_names
from embedcache.extract import ExtractConfig, extract
from embedcache.layout import CacheDamagedError, CacheError
from embedcache.reader import EmbeddingCache

from conftest import write_fasta

MAX_LENGTH = 40
# Headers as fair-esm's extract.py labels them: the whole line after '>'.
PLAIN = [
    ("sp|P69905|HBA_HUMAN Hemoglobin subunit alpha", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQ"),
    ("P1", "MKTAYIAKQRQISFVKSHFSRQ"),
    ("P1_copy same sequence as P1", "MKTAYIAKQRQISFVKSHFSRQ"),
    ("short", "MK"),
    ("one", "W"),
]
HOSTILE = [
    ("a/b/../../etc", "MKTAYIAKQR"),
    ("sp|Q1|X", "MKVLAAGWQ"),
    ("..", "MKVLSPA"),
    (".", "MKVLSPAD"),
    (".hidden", "MKVLSPADK"),
    ("prötein_α", "MKVLSPADKT"),
    ("CON", "MKVLSPADKTN"),
    ("abc", "MKVLSPADKTNV"),
    ("ABC", "MKVLSPADKTNVK"),
    ("x" * 300, "MKVLSPADKTNVKA"),
    ("-rf", "MKVLSPADKTNVKAA"),
    ("~home", "MKVLSPADKTNVKAAW"),
    ("a_b", "MKVLSPADKTNVKAAWG"),
    ("a:b", "MKVLSPADKTNVKAAWGK"),
]


def config(weights, **kw) -> ExtractConfig:
    kw.setdefault("max_length", MAX_LENGTH)
    return ExtractConfig(weights=str(weights), layers=(0, -1), threads=1, **kw)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("plain")
    fasta = write_fasta(folder / "plain.fasta", PLAIN)
    cache = folder / "plain.h5"
    extract(fasta, cache, config(tiny_weights), progress=False)
    return fasta, cache


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("hostile")
    fasta = write_fasta(folder / "hostile.fasta", HOSTILE)
    cache = folder / "hostile.h5"
    extract(fasta, cache, config(tiny_weights), progress=False)
    return cache


def fair_esm_extract(weights: Path, fasta: Path, out: Path, repr_layers, include, truncation_seq_length) -> None:
    """fair-esm's scripts/extract.py ``run`` (not shipped in the package), on CPU, its lines kept."""
    from esm import FastaBatchedDataset
    from esm.pretrained import load_model_and_alphabet_core

    from embedcache.backbones.esm2 import load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, alphabet = load_model_and_alphabet_core("esm2", load_checkpoint(weights), None)
    model.eval()
    dataset = FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    data_loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(truncation_seq_length), batch_sampler=batches
    )
    out.mkdir(parents=True, exist_ok=True)
    repr_layers = [(i + model.num_layers + 1) % (model.num_layers + 1) for i in repr_layers]
    with torch.no_grad():
        for labels, strs, toks in data_loader:
            result_all = model(toks, repr_layers=repr_layers, return_contacts=False)
            representations = {layer: t.to(device="cpu") for layer, t in result_all["representations"].items()}
            for i, label in enumerate(labels):
                result: dict = {"label": label}
                truncate_len = min(truncation_seq_length, len(strs[i]))
                if "per_tok" in include:
                    result["representations"] = {
                        layer: t[i, 1 : truncate_len + 1].clone() for layer, t in representations.items()
                    }
                if "mean" in include:
                    result["mean_representations"] = {
                        layer: t[i, 1 : truncate_len + 1].mean(0).clone() for layer, t in representations.items()
                    }
                torch.save(result, out / f"{label}.pt")


def mapping(folder: Path) -> list[dict]:
    import csv

    with open(folder / "mapping.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_esm_extract_files_are_fair_esm_extract_py_files_of_the_cache_values(tmp_path, plain, tiny_weights):
    fasta, cache_path = plain
    long = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"  # truncated at MAX_LENGTH by both
    fasta = write_fasta(tmp_path / "in.fasta", [*PLAIN, ("long protein", long)])
    cache_path = tmp_path / "c.h5"
    extract(fasta, cache_path, config(tiny_weights), progress=False)
    reference = tmp_path / "fair_esm"
    fair_esm_extract(tiny_weights, fasta, reference, [0, -1], ["mean", "per_tok"], MAX_LENGTH)
    out = tmp_path / "esm"
    summary = export_cache(cache_path, "esm-extract", out)
    assert summary.layers == [0, 3] and summary.ids == len(PLAIN) + 1 and summary.unique_sequences == len(PLAIN)
    rows = mapping(out)
    assert len(rows) == len(PLAIN) + 1 == len(list(out.glob("*.pt")))
    with EmbeddingCache(cache_path) as cache:
        for row in rows:
            ours = torch.load(out / row["file"])  # torch's default, weights_only loader, as a consumer would
            theirs = torch.load(reference / f"{row['header']}.pt")
            assert set(ours) == set(theirs) == {"label", "representations", "mean_representations"}
            assert ours["label"] == theirs["label"] == row["header"]
            assert list(ours["representations"]) == list(theirs["representations"]) == [0, 3]
            for layer in (0, 3):
                mine, ref = ours["representations"][layer], theirs["representations"][layer]
                assert mine.dtype == ref.dtype == torch.float32 and mine.shape == ref.shape
                assert torch.equal(mine, torch.from_numpy(cache.per_residue(row["id"], layer).astype(np.float32)))
                torch.testing.assert_close(mine, ref, rtol=5e-3, atol=5e-3)  # fp16 storage
                mean, ref_mean = ours["mean_representations"][layer], theirs["mean_representations"][layer]
                assert mean.dtype == torch.float32 and mean.shape == ref_mean.shape == (32,)
                assert torch.equal(mean, torch.from_numpy(cache.pooled([row["id"]], layer)[0].astype(np.float32)))
                torch.testing.assert_close(mean, ref_mean, rtol=5e-3, atol=5e-3)
    long_row = next(r for r in rows if r["id"] == "long")
    assert (long_row["status"], long_row["length"], long_row["residues"]) == ("truncated", str(len(long)),
                                                                              str(MAX_LENGTH))
    assert json.loads((out / "export.json").read_text())["layers"] == [0, 3]


def test_esm_extract_layer_option_writes_that_layer_only(tmp_path, plain):
    out = tmp_path / "esm"
    export_cache(plain[1], "esm-extract", out, layer=0)
    data = torch.load(out / "P1.pt")
    assert list(data["representations"]) == list(data["mean_representations"]) == [0]
    export_cache(plain[1], "npz", tmp_path / "last.npz", layer=-1)
    assert json.loads(str(np.load(tmp_path / "last.npz")["metadata"]))["layers"] == [3]
    with pytest.raises(ValueError, match=r"layer 7 is not in .*stored layers: \[0, 3\]"):
        export_cache(plain[1], "esm-extract", tmp_path / "other", layer=7)


def test_pooled_only_esm_extract_is_include_mean(tmp_path, plain):
    out = tmp_path / "esm"
    summary = export_cache(plain[1], "esm-extract", out, pooled_only=True)
    assert not summary.per_residue
    data = torch.load(out / "P1.pt")
    assert set(data) == {"label", "mean_representations"}


def test_pooled_only_cache_exports_pooled_without_reading_residues(tmp_path, plain, monkeypatch):
    def refuse(*args, **kwargs):
        raise CacheError("made with --store pooled")

    monkeypatch.setattr(EmbeddingCache, "store", "pooled", raising=False)
    monkeypatch.setattr(EmbeddingCache, "per_residue_rows", refuse)
    monkeypatch.setattr(EmbeddingCache, "per_residue", refuse)
    for fmt in FORMATS:
        summary = export_cache(plain[1], fmt, tmp_path / fmt)
        assert not summary.per_residue
    assert set(torch.load(tmp_path / "esm-extract" / "P1.pt")) == {"label", "mean_representations"}
    with h5py.File(tmp_path / "bio-embeddings") as f:
        assert all(f[k].shape == (32,) for k in f)
    assert not any(name.startswith("residues_") for name in np.load(tmp_path / "npz").files)
    assert sorted(os.listdir(tmp_path / "npy")) == ["export.json", "ids.txt", "pooled.npy"]


def test_bio_embeddings_file_is_keyed_by_sequence_md5_with_original_id(tmp_path, plain):
    out = tmp_path / "emb.h5"
    summary = export_cache(plain[1], "bio-embeddings", out)
    assert summary.unique_sequences == len(PLAIN) - 1
    with h5py.File(out, "r") as f, EmbeddingCache(plain[1]) as cache:
        # the lookup of bio_embeddings.utilities.QueryEmbeddingsFile
        lookup = {f[new_id].attrs["original_id"]: new_id for new_id in f.keys()}  # noqa: SIM118
        expected = {hashlib.md5(seq.encode()).hexdigest() for _, seq in PLAIN}
        assert set(f.keys()) == expected
        for ident in ("sp|P69905|HBA_HUMAN", "P1", "short", "one"):
            assert lookup[ident] == hashlib.md5(cache.sequence(ident).encode()).hexdigest()
            array = np.array(f[lookup[ident]])
            assert array.dtype == np.float32 and array.shape == (cache.n_residues([ident])[0], 32)
            np.testing.assert_array_equal(array, cache.per_residue(ident).astype(np.float32))
        # bio_embeddings refuses duplicate sequences; the dataset is named after the first ID
        assert "P1_copy" not in lookup
        assert json.loads(f[lookup["P1"]].attrs["other_ids"]) == ["P1_copy"]
    reduced = tmp_path / "reduced.h5"
    export_cache(plain[1], "bio-embeddings", reduced, pooled_only=True, layer=0, dtype="float16")
    with h5py.File(reduced, "r") as f, EmbeddingCache(plain[1]) as cache:
        lookup = {f[new_id].attrs["original_id"]: new_id for new_id in f.keys()}  # noqa: SIM118
        array = np.array(f[lookup["P1"]])
        assert array.shape == (32,) and array.dtype == np.float16
        np.testing.assert_array_equal(array, cache.pooled(["P1"], layer=0)[0])


def test_npz_read_back_with_np_load(tmp_path, plain):
    out = tmp_path / "emb.npz"
    export_cache(plain[1], "npz", out)
    with np.load(out, allow_pickle=False) as z, EmbeddingCache(plain[1]) as cache:
        ids = list(z["ids"])
        assert ids == cache.ids and list(z["headers"]) == [h for h, _ in PLAIN]
        assert list(z["sequence_keys"]) == [cache.key(i) for i in ids]
        np.testing.assert_array_equal(z["pooled"], cache.pooled(ids))
        assert z["pooled"].dtype == np.float16
        for i, ident in enumerate(ids):
            np.testing.assert_array_equal(z[f"residues_{i}"], cache.per_residue(ident))
        assert json.loads(str(z["metadata"]))["layers"] == [3]


def test_npy_read_back_with_np_load_and_memory_mapping(tmp_path, plain):
    out = tmp_path / "npy"
    export_cache(plain[1], "npy", out, dtype="float32", layer=0)
    ids = (out / "ids.txt").read_text(encoding="utf-8").splitlines()
    pooled = np.load(out / "pooled.npy")
    residues = np.load(out / "per_residue.npy", mmap_mode="r")
    bounds = np.load(out / "bounds.npy")
    with EmbeddingCache(plain[1]) as cache:
        assert ids == cache.ids and pooled.dtype == residues.dtype == np.float32
        np.testing.assert_array_equal(pooled, cache.pooled(ids, layer=0).astype(np.float32))
        for ident, (lo, hi) in zip(ids, bounds):
            np.testing.assert_array_equal(residues[lo:hi], cache.per_residue(ident, layer=0).astype(np.float32))
        assert residues.shape[0] == sum(min(len(s), MAX_LENGTH) for s in {s for _, s in PLAIN})  # copies share rows
    assert list(bounds[ids.index("P1")]) == list(bounds[ids.index("P1_copy")])


def test_hostile_ids_get_distinct_file_names_inside_the_export(tmp_path, hostile):
    out = tmp_path / "esm"
    export_cache(hostile, "esm-extract", out)
    rows = mapping(out)
    assert [r["id"] for r in rows] == [h for h, _ in HOSTILE]
    files = [r["file"] for r in rows]
    assert len({f.casefold() for f in files}) == len(files)  # distinct on case-insensitive file systems too
    assert sorted(os.listdir(out)) == sorted([*files, "mapping.csv", "export.json"])  # nothing outside, no subfolders
    for row in rows:
        name = row["file"]
        assert "/" not in name and not name.startswith((".", "~", "-")) and len(name.encode()) <= 255
        assert name.isascii() and name.split(".")[0].upper() != "CON"
        assert torch.load(out / name)["label"] == row["id"]
    assert not (tmp_path / "etc").exists()
    assert dict(zip([r["id"] for r in rows], files))["abc"] != "abc.pt"  # abc and ABC would share a file on macOS


def test_safe_names_cannot_collide():
    ids = ["a/b", "a_b", "a b", "a|b", "a~b", "x" * 400, "x" * 401, "a_b~" + "0" * 16, "\u00e9", "e\u0301", "A_B", "-x"]
    names = safe_file_names(ids)
    assert len({n.casefold() for n in names.values()}) == len(ids)
    assert names["a/b"] != "a_b" and names["a~b"].startswith("a_b~") and names["-x"].startswith("x~")


def test_ids_with_spaces_from_a_table(tmp_path, tiny_weights):
    table = tmp_path / "in.csv"
    table.write_text('id,sequence\n"my protein 1",MKTAYIAKQR\n"my protein 2",MKVLAAGWQ\n')
    cache = tmp_path / "c.h5"
    extract(table, cache, config(tiny_weights), progress=False)
    for fmt in FORMATS:
        export_cache(cache, fmt, tmp_path / fmt)
    assert [r["id"] for r in mapping(tmp_path / "esm-extract")] == ["my protein 1", "my protein 2"]
    assert (tmp_path / "npy" / "ids.txt").read_text() == "my protein 1\nmy protein 2\n"
    with h5py.File(tmp_path / "bio-embeddings") as f:
        assert sorted(f[k].attrs["original_id"] for k in f) == ["my protein 1", "my protein 2"]



@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_npy_refuses_an_id_that_a_line_splitting_reader_would_cut_in_two(tmp_path, tiny_weights, separator):
    table = tmp_path / "in.csv"
    table.write_text(f'id,sequence\n"a{separator}b",MKTAYIAKQR\nc,MKVLAAGWQ\n', encoding="utf-8")
    cache = tmp_path / "c.h5"
    extract(table, cache, config(tiny_weights), progress=False)
    with pytest.raises(ValueError, match="holds a line break, which ids.txt"):
        export_cache(cache, "npy", tmp_path / "npy")
    assert not (tmp_path / "npy").exists()
    export_cache(cache, "npz", tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz") as npz:
        assert list(npz["ids"]) == [f"a{separator}b", "c"]

def test_cache_of_skipped_ids_only_exports_empty_outputs_listing_them(tmp_path, tiny_weights):
    fasta = write_fasta(tmp_path / "long.fasta", {"a": "MKTAYIAKQR", "b": "MKTAYIAKQRQISF"})
    cache = tmp_path / "c.h5"
    extract(fasta, cache, config(tiny_weights, long="skip", max_length=5), progress=False)
    for fmt in FORMATS:
        summary = export_cache(cache, fmt, tmp_path / fmt)
        assert summary.ids == 0 and summary.skipped == ["a", "b"]
    assert [(r["id"], r["status"], r["file"]) for r in mapping(tmp_path / "esm-extract")] == [
        ("a", "skipped", ""), ("b", "skipped", "")]
    with h5py.File(tmp_path / "bio-embeddings") as f:
        assert list(f.keys()) == []
    with np.load(tmp_path / "npz") as z:
        assert z["ids"].shape == (0,) and z["pooled"].shape == (0, 32)
    assert np.load(tmp_path / "npy" / "pooled.npy").shape == (0, 32)
    assert np.load(tmp_path / "npy" / "per_residue.npy").shape == (0, 32)
    assert json.loads((tmp_path / "npy" / "export.json").read_text())["skipped_ids"] == ["a", "b"]
    result = CliRunner().invoke(main, ["export", str(cache), str(tmp_path / "cli"), "--format", "npz", "-q"])
    assert result.exit_code == 0 and "2 skipped IDs not exported (a, b)" in result.output


def test_chunked_proteins_are_exported_at_full_length(tmp_path, tiny_weights):
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"
    fasta = write_fasta(tmp_path / "in.fasta", {"long": seq})
    cache = tmp_path / "c.h5"
    extract(fasta, cache, config(tiny_weights, long="chunk", max_length=30, chunk_overlap=10), progress=False)
    export_cache(cache, "esm-extract", tmp_path / "esm")
    assert torch.load(tmp_path / "esm" / "long.pt")["representations"][3].shape == (len(seq), 32)
    assert mapping(tmp_path / "esm")[0]["status"] == "chunked"


def test_existing_output_needs_overwrite_and_only_an_export_is_replaced(tmp_path, plain):
    out = tmp_path / "esm"
    export_cache(plain[1], "esm-extract", out)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        export_cache(plain[1], "esm-extract", out)
    export_cache(plain[1], "esm-extract", out, overwrite=True, layer=0)
    assert list(torch.load(out / "P1.pt")["representations"]) == [0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by embedcache export"):
        export_cache(plain[1], "npy", mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "f.npz").write_text("old")
    with pytest.raises(FileExistsError):
        export_cache(plain[1], "npz", tmp_path / "f.npz")
    export_cache(plain[1], "npz", tmp_path / "f.npz", overwrite=True)
    assert "pooled" in np.load(tmp_path / "f.npz").files
    with pytest.raises(ValueError, match="is the cache being exported"):
        export_cache(plain[1], "npz", plain[1], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["esm", "f.npz", "mine"]



@pytest.mark.parametrize("fmt", ["npy", "esm-extract"])
def test_overwrite_never_replaces_a_users_file_with_an_export_directory(tmp_path, plain, fmt):
    mine = tmp_path / "results.csv"
    mine.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file, not a directory of an earlier export"):
        export_cache(plain[1], fmt, mine, overwrite=True)
    assert mine.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_overwrite_never_renames_a_file_export_over_a_fifo(tmp_path, plain):
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    with pytest.raises(FileExistsError, match="not a regular file"):
        export_cache(plain[1], "npz", fifo, overwrite=True)
    assert fifo.is_fifo()

def test_unknown_format_and_bad_dtype_are_refused(tmp_path, plain):
    with pytest.raises(ValueError, match="unknown export format 'hdf5'; choose one of esm-extract"):
        export_cache(plain[1], "hdf5", tmp_path / "x")
    with pytest.raises(ValueError, match="extract.py saves them"):
        export_cache(plain[1], "esm-extract", tmp_path / "x", dtype="float16")
    result = CliRunner().invoke(main, ["export", str(plain[1]), str(tmp_path / "x"), "--format", "hdf5"])
    assert result.exit_code == 2 and "'hdf5' is not one of" in result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path / "none.h5"), str(tmp_path / "x"), "--format", "npz"])
    assert result.exit_code == 1 and "Error: " in result.output and "no such cache file" in result.output
    assert not (tmp_path / "x").exists()


def test_damaged_cache_stops_with_the_readers_message_and_leaves_nothing(tmp_path, plain):
    import shutil

    cache = tmp_path / "c.h5"
    shutil.copy(plain[1], cache)
    with EmbeddingCache(cache) as c:
        lo = int(c._bounds[c.rows(["one"])[0]])
    with h5py.File(cache, "r+") as f:
        f["L3/per_residue"][lo, 0] += 1
    for fmt in FORMATS:
        out = tmp_path / fmt
        with pytest.raises(CacheDamagedError, match=r"L3/per_residue rows of 'one' do not match their checksum"):
            export_cache(cache, fmt, out)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
    result = CliRunner().invoke(main, ["export", str(cache), str(tmp_path / "x"), "--format", "npz", "-q"])
    assert result.exit_code == 1 and "Error: " in result.output and "Traceback" not in result.output


def test_second_export_to_the_same_output_is_refused(tmp_path, plain):
    out = tmp_path / "esm"
    with _output_lock(out), pytest.raises(CacheError, match="another export is writing it now"):
        export_cache(plain[1], "esm-extract", out)
    assert not out.exists()


# A child process that dies at its third protein (kill -9 or SIGTERM sent to itself): a
# deterministic point in the middle of the export, whatever the machine's speed.
DIE = """
import os, signal, sys
from embedcache import export
original = export._Job.residues
calls = [0]
def residues(self, row, layer):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return original(self, row, layer)
export._Job.residues = residues
from embedcache.cli import main
main(sys.argv[2:])
"""


def _die_while_exporting(signame: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DIE, signame, "export", *args, "-q"], capture_output=True,
                          text=True, timeout=120)


# esm-extract's child imports torch, seconds on a busy machine.
@pytest.mark.parametrize("fmt", [pytest.param("esm-extract", marks=pytest.mark.slow), "bio-embeddings", "npz", "npy"])
def test_kill_9_mid_export_leaves_no_output_and_a_rerun_works(tmp_path, plain, fmt):
    out = tmp_path / "out"
    proc = _die_while_exporting("SIGKILL", str(plain[1]), str(out), "--format", fmt)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    export_cache(plain[1], fmt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the leftover staging is gone
    clean = tmp_path / "clean"
    export_cache(plain[1], fmt, clean)
    assert _contents(out) == _contents(clean)


def _contents(path: Path) -> dict:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in path.iterdir() if p.name != "export.json"}
    try:
        with np.load(path) as z:
            return {k: z[k].tobytes() for k in z.files if k != "metadata"}
    except (ValueError, OSError):
        with h5py.File(path) as f:
            return {k: (f[k][()].tobytes(), dict(f[k].attrs)) for k in f}


def test_kill_9_during_overwrite_keeps_the_previous_export(tmp_path, plain):
    out = tmp_path / "out"
    export_cache(plain[1], "npy", out, layer=0)
    before = _contents(out)
    proc = _die_while_exporting("SIGKILL", str(plain[1]), str(out), "--format", "npy", "--overwrite")
    assert proc.returncode == -signal.SIGKILL
    assert _contents(out) == before
    export_cache(plain[1], "npy", out, overwrite=True)
    assert json.loads((out / "export.json").read_text())["layers"] == [3]
    assert _contents(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["npy", "bio-embeddings"])
def test_sigterm_mid_export_ends_with_one_line_and_leaves_nothing(tmp_path, plain, fmt):
    out = tmp_path / "out"
    proc = _die_while_exporting("SIGTERM", str(plain[1]), str(out), "--format", fmt)
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_export_reports_what_it_wrote(tmp_path, plain):
    result = CliRunner().invoke(main, ["export", str(plain[1]), str(tmp_path / "e"), "--format", "esm-extract",
                                       "--pooled-only", "-q"])
    assert result.exit_code == 0, result.output
    assert "esm-extract, 5 IDs (4 unique sequences), pooled, layers [0, 3], float32" in result.output


@pytest.mark.parametrize("fmt", [pytest.param("esm-extract", marks=pytest.mark.slow), "bio-embeddings", "npz", "npy"])
def test_full_disk_stops_with_an_error_and_leaves_nothing(tmp_path, plain, fmt):
    import resource

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death past the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "embedcache", "export", str(plain[1]), str(tmp_path / "out"),
                           "--format", fmt, "-q"], capture_output=True, text=True, preexec_fn=child,
                          restore_signals=False, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Error: " in proc.stderr and "the disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cache_without_checksums_exports_the_same_arrays(tmp_path, plain):
    import shutil

    from test_store import make_version_1

    old = tmp_path / "v1.h5"
    shutil.copy(plain[1], old)
    make_version_1(old)
    export_cache(old, "npz", tmp_path / "v1.npz")
    export_cache(plain[1], "npz", tmp_path / "v2.npz")
    assert _contents(tmp_path / "v1.npz") == _contents(tmp_path / "v2.npz")
