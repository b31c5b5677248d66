"""Folds built once (`heads folds`), read back by runs (--folds FILE, --fold-col) and cached by content."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import heads.folds as folds_module
from embedcache.atomic import DiskFullError
from embedcache.sequences import InputError, sequence_key
from heads.cli import FoldsChoice
from heads.cli import main as heads_main
from heads.datasets import read_deeplocpro, read_labeled_csv
from heads.folds import (
    Partition,
    build_partition,
    folds_cache_dir,
    folds_for,
    homology_folds,
    homology_partition,
    read_folds,
    stratified_folds,
    write_folds,
)
from heads.htmlreport import describe_folds
from heads.run import RunConfig, load_data

from test_heads import planted_cache

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--bootstrap", "100", "--no-figures", "--threads", "1"]
needs_mmseqs = pytest.mark.skipif(shutil.which("mmseqs") is None,
                                  reason="MMseqs2 not installed (scripts/setup.sh installs it)")
ALPHABET = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def families_csv(path: Path, n_families: int = 10, members: int = 3, seed: int = 0) -> Path:
    """Families of close relatives (5% mutated from a root), two classes: what GraphPart must keep together."""
    rng = np.random.default_rng(seed)
    rows = []
    for family in range(n_families):
        root = rng.choice(ALPHABET, size=80)
        for member in range(members):
            seq = root.copy()
            mutate = rng.random(80) < 0.05
            seq[mutate] = rng.choice(ALPHABET, size=int(mutate.sum()))
            rows.append((f"f{family}_m{member}", "".join(seq), f"class{family % 2}"))
    pd.DataFrame(rows, columns=["id", "sequence", "label"]).to_csv(path, index=False)
    return path


def stratified_file(tmp_path: Path, csv: Path, name: str = "folds.tsv", seed: int = 0, k: int = 3) -> Path:
    out = tmp_path / name
    result = CliRunner().invoke(heads_main, ["folds", str(csv), "--out", str(out), "--method", "stratified",
                                             "--k", str(k), "--seed", str(seed)])
    assert result.exit_code == 0, result.output
    return out


def count_graphpart(monkeypatch) -> list[int]:
    """Counts the GraphPart child processes started (the real one still runs)."""
    calls: list[int] = []
    real = folds_module.run_tool

    def counting(command, what, *args, **kwargs):
        if what == "GraphPart":
            calls.append(1)
        return real(command, what, *args, **kwargs)

    monkeypatch.setattr(folds_module, "run_tool", counting)
    return calls


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted_folds")
    return planted_cache(tmp, tiny_weights, n_per_class=12)


def _cv(csv: Path, cache: Path, out: Path, *extra: str):
    return CliRunner().invoke(heads_main, ["cv", "--head", "logreg", "--cache", str(cache), "--data", str(csv),
                                           "--k", "3", "--out", str(out), *FAST, *extra])


# -- the command and the file -----------------------------------------------------------------
@needs_mmseqs
def test_folds_command_writes_the_partition_homology_folds_computes(tmp_path):
    csv = families_csv(tmp_path / "families.csv")
    out = tmp_path / "folds.tsv"
    result = CliRunner().invoke(heads_main, ["folds", str(csv), "--out", str(out), "--k", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(csv)
    direct = homology_folds(list(frame["id"]), list(frame["sequence"]),
                            np.array([0 if x == "class0" else 1 for x in frame["label"]]), k=3, threads=1)
    table = read_folds(out)
    part = table.partition
    assert part.ids == list(frame["id"]) and np.array_equal(part.folds, direct.folds)
    assert part.keys == [sequence_key(s) for s in frame["sequence"]]
    header = table.header
    assert (header["method"], header["k"], header["threshold"], header["aligner"]) == ("homology", "3", "0.3",
                                                                                       "mmseqs2")
    assert header["proteins"] == "30" and "graph-part" in header["software"] and "heads" in header["software"]
    # Summary line: folds, sizes, removed, time.
    assert result.output.startswith(f"{out}: 3 folds (homology: GraphPart, mmseqs2, 30% identity) of 30 proteins, "
                                    "sizes ")
    assert "removed; built in " in result.output
    log = Path(f"{out}.log").read_text()
    assert "createdb" in log and "homology partitioning of 30 sequences" in log  # the tools' lines, in the log


def test_folds_file_round_trips_and_is_self_describing(tmp_path):
    ids = ["a", "b\twith tab", "c", "#d", "e"]
    seqs = ["MKV", "MKW", "MKV", "AAAA", "CCC"]
    part = Partition(ids, [sequence_key(s) for s in seqs], np.array([0, 1, 0, -1, 2]), "homology", 3, 0, 0.3,
                     "mmseqs2", built="2026-01-01T00:00:00+00:00", software="x", data="d.csv\nnewline")
    path = write_folds(part, tmp_path / "f.tsv")
    text = path.read_text()
    assert text.startswith("# heads folds file, format 1\n")
    assert "# data: d.csv?newline\n" in text  # one header line whatever the name
    back = read_folds(path).partition
    assert back.ids == ids and back.keys == part.keys and back.folds.tolist() == [0, 1, 0, -1, 2]
    assert back.removed == 1 and back.threshold == 0.3 and back.aligner == "mmseqs2"
    folds, unused = folds_for(read_folds(path), ["c", "b\twith tab"], ["MKV", "mkw"])
    assert folds.tolist() == [0, 1] and unused == ["#d", "a", "e"]


@pytest.mark.parametrize("transform", ["crlf", "bom", "gzip", "symlink"])
def test_folds_file_reads_through_crlf_bom_gzip_and_links(tmp_path, transform):
    csv = families_csv(tmp_path / "families.csv")
    path = stratified_file(tmp_path, csv)
    expected = read_folds(path).partition.folds
    raw = path.read_bytes()
    target = tmp_path / f"changed_{transform}"
    if transform == "crlf":
        target.write_bytes(raw.replace(b"\n", b"\r\n"))
    elif transform == "bom":
        target.write_bytes(b"\xef\xbb\xbf" + raw)
    elif transform == "gzip":
        target.write_bytes(gzip.compress(raw))
    else:
        target.symlink_to(path)
    found = read_folds(target)
    assert np.array_equal(found.partition.folds, expected)
    data, info = load_data(RunConfig(data=str(csv), folds=str(target), k=3))
    assert info["source"] == "folds_file" and info["sha256"] == found.sha256


def test_a_folds_file_of_other_data_is_refused_naming_the_id(tmp_path):
    csv = families_csv(tmp_path / "families.csv")
    path = stratified_file(tmp_path, csv)
    frame = pd.read_csv(csv)
    frame.loc[4, "sequence"] = "M" + frame.loc[4, "sequence"][1:].replace("A", "W")
    changed = tmp_path / "changed.csv"
    frame.to_csv(changed, index=False)
    with pytest.raises(InputError, match=r"ID 'f1_m1' has another sequence in folds.tsv \(made from other data\?\)"):
        load_data(RunConfig(data=str(changed), folds=str(path), k=3))


def test_a_folds_file_missing_a_protein_is_refused(tmp_path):
    csv = families_csv(tmp_path / "families.csv")
    small = tmp_path / "small.csv"
    pd.read_csv(csv).iloc[:-1].to_csv(small, index=False)
    path = stratified_file(tmp_path, small)
    with pytest.raises(InputError, match=r"ID 'f9_m2' of the data is not in folds.tsv"):
        load_data(RunConfig(data=str(csv), folds=str(path), k=3))
    # The other way round the data is a subset of the file's proteins: allowed.
    data, info = load_data(RunConfig(data=str(small), folds=str(stratified_file(tmp_path, csv, "all.tsv")), k=3))
    assert len(data) == 29 and info["proteins_not_in_data"] == 1


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate_rows", r"holds 2\d proteins but its header says 30 \(truncated or edited\?\)"),
    ("truncate_mid_row", r"line \d+: .*(tab-separated fields|not a sequence key)"),
    ("truncate_header", r"damaged header: no .*content_sha256"),
    ("empty", r"file is empty"),
    ("edit_fold", r"do not match the digests in its header \(edited or damaged\?\)"),
    ("bad_fold", r"fold 'x' of 'f0_m0' is not a whole number from -1 \(left out\) to 2"),
    ("fold_out_of_range", r"fold '7' of 'f0_m0' is not a whole number from -1"),
    ("duplicate", r"ID 'f0_m0' appears twice \(lines \d+ and \d+\)"),
    ("no_column", r"no column 'sequence_key'"),
    ("bad_k", r"damaged header: k 'five' is not a whole number"),
    ("not_folds", r"not a folds file of heads"),
    ("newer", r"format 9, newer than this heads reads"),
])
def test_a_damaged_folds_file_is_refused_clearly(tmp_path, damage, message):
    csv = families_csv(tmp_path / "families.csv")
    path = stratified_file(tmp_path, csv)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    body = next(i for i, line in enumerate(lines) if line.startswith("id\t"))
    if damage == "truncate_rows":
        text = "".join(lines[:-3])
    elif damage == "truncate_mid_row":
        text = text[:-25]
    elif damage == "truncate_header":
        text = "".join(lines[:8])
    elif damage == "empty":
        text = ""
    elif damage == "edit_fold":
        ident, fold, key = lines[body + 1].rstrip("\n").split("\t")
        lines[body + 1] = f"{ident}\t{(int(fold) + 1) % 3}\t{key}\n"
        text = "".join(lines)
    elif damage in ("bad_fold", "fold_out_of_range"):
        ident, _, key = lines[body + 1].rstrip("\n").split("\t")
        lines[body + 1] = f"{ident}\t{'x' if damage == 'bad_fold' else 7}\t{key}\n"
        text = "".join(lines)
    elif damage == "duplicate":
        text = "".join([*lines, lines[body + 1]])
    elif damage == "no_column":
        text = text.replace("id\tfold\tsequence_key", "id\tfold\tkey")
    elif damage == "bad_k":
        text = text.replace("# k: 3", "# k: five")
    elif damage == "not_folds":
        text = "".join(lines[body:])
    elif damage == "newer":
        text = text.replace("format 1", "format 9", 1)
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        load_data(RunConfig(data=str(csv), folds=str(path), k=3))
    assert str(err.value).startswith(f"{path}: ")


def test_a_damaged_folds_file_is_an_error_line_of_the_cli_not_a_traceback(planted, tmp_path):
    csv, cache = planted
    path = stratified_file(tmp_path, csv)
    path.write_text(path.read_text()[:-30])
    result = _cv(csv, cache, tmp_path / "run", "--folds", str(path))
    assert result.exit_code == 1 and result.output.startswith(f"Error: {path}: ") and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing", "broken_link"])
def test_folds_option_refuses_a_fifo_a_directory_or_a_missing_file_without_waiting(tmp_path, kind):
    target = tmp_path / "folds_thing"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "broken_link":
        target.symlink_to(tmp_path / "nowhere")
    with pytest.raises(Exception, match=r"FIFO|directory|neither") as err:  # click.BadParameter
        FoldsChoice().convert(str(target), None, None)
    assert type(err.value).__name__ == "BadParameter"
    if kind in ("fifo", "directory"):
        with pytest.raises(InputError, match=r"FIFO|directory"):  # the library refuses before opening it
            read_folds(target)


def test_a_word_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("homology").write_text("not folds")
    assert FoldsChoice().convert("homology", None, None) == "homology"
    assert FoldsChoice().convert("./homology", None, None) == "./homology"


def test_an_empty_data_file_is_an_error_line(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    result = CliRunner().invoke(heads_main, ["folds", str(empty), "--out", str(tmp_path / "f.tsv"),
                                             "--method", "stratified"])
    assert result.exit_code == 1 and "Error:" in result.output and "empty" in result.output
    assert not (tmp_path / "f.tsv").exists()


def test_folds_command_refuses_to_write_over_its_data(tmp_path):
    csv = families_csv(tmp_path / "families.csv")
    before = csv.read_bytes()
    result = CliRunner().invoke(heads_main, ["folds", str(csv), "--out", str(csv), "--method", "stratified"])
    assert result.exit_code == 2 and "would destroy it" in result.output
    assert csv.read_bytes() == before


# -- runs reading the file --------------------------------------------------------------------
@needs_mmseqs
def test_a_run_on_the_folds_file_equals_the_run_on_homology_folds(planted, tmp_path, monkeypatch):
    csv, cache = planted
    calls = count_graphpart(monkeypatch)
    path = tmp_path / "folds.tsv"
    result = CliRunner().invoke(heads_main, ["folds", str(csv), "--out", str(path), "--k", "3", "--no-cache"])
    assert result.exit_code == 0, result.output
    first = _cv(csv, cache, tmp_path / "homology", "--folds", "homology")
    assert first.exit_code == 0, first.output
    second = _cv(csv, cache, tmp_path / "from_file", "--folds", str(path))
    assert second.exit_code == 0, second.output
    assert len(calls) == 2  # the folds command and the first run; the file needs no GraphPart
    metrics = [(tmp_path / name / "metrics.json").read_bytes() for name in ("homology", "from_file")]
    assert metrics[0] == metrics[1]
    config = json.loads((tmp_path / "from_file" / "config.json").read_text())
    info = config["folds_info"]
    assert info["source"] == "folds_file" and info["method"] == "homology" and info["threshold"] == 0.3
    assert {"role": "folds", "path": str(path), "sha256": read_folds(path).sha256} in config["data_files"]
    assert "3 folds from folds.tsv (homology: GraphPart, mmseqs2, 30% identity)" in config["report"]["notes"][0]


def test_a_run_resumed_with_another_folds_file_is_refused_and_a_moved_one_resumes(planted, tmp_path):
    csv, cache = planted
    first = stratified_file(tmp_path, csv, "first.tsv", seed=0)
    other = stratified_file(tmp_path, csv, "other.tsv", seed=1)
    assert not np.array_equal(read_folds(first).partition.folds, read_folds(other).partition.folds)
    out = tmp_path / "run"
    assert _cv(csv, cache, out, "--folds", str(first)).exit_code == 0
    refused = _cv(csv, cache, out, "--folds", str(other))
    assert refused.exit_code == 1 and "holds another run" in refused.output
    moved = tmp_path / "elsewhere" / "renamed.tsv"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    resumed = _cv(csv, cache, out, "--folds", str(moved))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in (out / "run.log").read_text()


def test_the_fingerprint_follows_the_folds_file_bytes(planted, tmp_path):
    from heads.run import _fingerprint_settings

    csv, _ = planted
    path = stratified_file(tmp_path, csv)
    config = RunConfig(data=str(csv), folds=str(path), k=3)
    _, info = load_data(config)
    settings = _fingerprint_settings(config, info)
    assert settings["folds"] == f"folds file sha256 {read_folds(path).sha256}" and "fold_col" not in settings
    path.write_bytes(gzip.compress(path.read_bytes()))  # the same folds in other bytes: another file
    _, info2 = load_data(config)
    assert _fingerprint_settings(config, info2)["folds"] != settings["folds"]


def test_describe_folds_names_the_file_and_how_it_was_built():
    info = {"source": "folds_file", "path": "/x/cn_folds.tsv", "method": "homology", "threshold": 0.3,
            "aligner": "mmseqs2", "sizes": {0: 5, 1: 5, 2: 5}}
    assert describe_folds(info) == "3 folds from cn_folds.tsv (homology: GraphPart, mmseqs2, 30% identity)"
    info = {"source": "folds_file", "path": "s.tsv", "method": "stratified", "seed": 4, "sizes": {0: 5, 1: 5, 2: 5}}
    assert describe_folds(info, "simple") == "CV over 3 folds from s.tsv (stratified, seed 4)"
    assert describe_folds({"source": "file", "column": "part", "sizes": {0: 1, 1: 1, 2: 1}}) == \
        "the file's 3 folds (column part)"


# -- --fold-col -------------------------------------------------------------------------------
def test_fold_col_gives_the_run_its_folds(planted, tmp_path):
    csv, cache = planted
    frame = pd.read_csv(csv)
    frame["part"] = [str(i % 3) if i % 7 else "-1" for i in range(len(frame))]
    frame.loc[1, "part"] = "2.0"  # as a spreadsheet writes a whole number
    with_folds = tmp_path / "with_folds.csv"
    frame.to_csv(with_folds, index=False)
    data, info = load_data(RunConfig(data=str(with_folds), fold_col="part"))
    assert info["source"] == "file" and info["column"] == "part"
    assert len(data) == sum(1 for i in range(len(frame)) if i % 7)
    result = _cv(with_folds, cache, tmp_path / "run", "--fold-col", "part")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["fold_col"] == "part" and "(column part)" in config["report"]["notes"][0]


@pytest.mark.parametrize("value", ["1.5", "two", "", "1e3"])
def test_fold_col_with_a_value_that_is_no_whole_number_names_the_row(tmp_path, value):
    csv = families_csv(tmp_path / "families.csv")
    frame = pd.read_csv(csv)
    frame["part"] = [str(i % 3) for i in range(len(frame))]
    frame.loc[3, "part"] = value
    path = tmp_path / "bad_folds.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InputError, match=rf"bad_folds.csv: row 5: fold {value!r} in column 'part' is not a whole"):
        read_labeled_csv(path, fold_col="part")
    result = CliRunner().invoke(heads_main, ["cv", "--head", "logreg", "--data", str(path), "--out",
                                             str(tmp_path / "run"), "--fold-col", "part", "--threads", "1"])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {path}: row 5: fold "), result.output


def test_fold_col_refuses_a_fasta_and_a_conflicting_folds_choice(tmp_path):
    csv = families_csv(tmp_path / "families.csv")
    frame = pd.read_csv(csv)
    frame["part"] = [i % 3 for i in range(len(frame))]
    frame.to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"--fold-col part gives the folds, and --folds stratified asks for other"):
        load_data(RunConfig(data=str(csv), fold_col="part", folds="stratified"))
    fasta = tmp_path / "d.fasta"
    fasta.write_text(">P1|Cytoplasmic|archaea|0\nMKV\n>P2|Cytoplasmic|archaea|1\nMKW\n")
    with pytest.raises(ValueError, match=r"--fold-col reads a column of a CSV/TSV; .* is deeplocpro"):
        load_data(RunConfig(data=str(fasta), fold_col="part"))


def test_a_deeplocpro_fold_in_other_digits_is_an_input_error(tmp_path):
    fasta = tmp_path / "d.fasta"
    fasta.write_text(">P1|Cytoplasmic|archaea|\u00b2\nMKV\n")
    with pytest.raises(InputError, match=r"record 1.*fold '\u00b2' is not a whole number"):
        read_deeplocpro(fasta)


# -- the cache --------------------------------------------------------------------------------
def _family_inputs(tmp_path: Path, seed: int = 0):
    frame = pd.read_csv(families_csv(tmp_path / f"families{seed}.csv", seed=seed))
    return list(frame["id"]), list(frame["sequence"]), np.array([int(x[-1]) for x in frame["label"]])


@needs_mmseqs
def test_the_cache_is_hit_for_the_same_content_and_missed_for_other_settings_or_sequences(tmp_path, monkeypatch,
                                                                                          caplog, folds_cache):
    calls = count_graphpart(monkeypatch)
    ids, seqs, labels = _family_inputs(tmp_path)
    first = homology_partition(ids, seqs, labels, k=3, threads=1)
    assert len(calls) == 1 and first.cached is None and len(list(folds_cache.glob("*.tsv"))) == 1
    order = np.random.default_rng(0).permutation(len(ids))  # the same content in another order
    with caplog.at_level("INFO", logger="heads.folds"):
        again = homology_partition([ids[i] for i in order], [seqs[i] for i in order], labels[order], k=3, threads=1)
    assert len(calls) == 1 and again.cached is not None
    assert np.array_equal(again.folds, first.folds[order])
    assert any(r.getMessage().startswith(f"reusing homology folds from {folds_cache}") and "(built on " in
               r.getMessage() for r in caplog.records)
    homology_partition(ids, seqs, labels, k=3, threshold=0.5, threads=1)
    assert len(calls) == 2
    changed = list(seqs)
    changed[0] = changed[0][:-1] + ("A" if changed[0][-1] != "A" else "C")
    homology_partition(ids, changed, labels, k=3, threads=1)
    assert len(calls) == 3
    homology_partition(ids, seqs, 1 - labels, k=3, threads=1)  # other labels: GraphPart stratifies on them
    assert len(calls) == 4
    homology_partition(ids, seqs, labels, k=3, threads=1, cache=False)
    assert len(calls) == 5 and len(list(folds_cache.glob("*.tsv"))) == 4


@needs_mmseqs
def test_a_second_homology_run_reuses_the_cached_partition(planted, tmp_path, monkeypatch):
    csv, cache = planted
    calls = count_graphpart(monkeypatch)
    assert _cv(csv, cache, tmp_path / "one", "--folds", "homology").exit_code == 0
    second = _cv(csv, cache, tmp_path / "two", "--folds", "homology")
    assert second.exit_code == 0 and len(calls) == 1
    one, two = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("one", "two"))
    assert one["fingerprint"] == two["fingerprint"]
    assert "cached" not in one["folds_info"] and two["folds_info"]["cached"].startswith(str(folds_cache_dir()))
    assert "reusing homology folds from" in (tmp_path / "two" / "run.log").read_text()


def _fake_graphpart(monkeypatch) -> list[int]:
    """homology_folds replaced by a count and a fixed answer: for the cache's own logic."""
    calls: list[int] = []

    def fake(ids, sequences, labels, k=5, threshold=0.3, aligner="mmseqs2", threads=2, classes=None):
        calls.append(1)
        return folds_module.HomologyPartition(np.arange(len(ids)) % k, threshold, aligner, 0, built="then",
                                              software="fake")

    monkeypatch.setattr(folds_module, "homology_folds", fake)
    return calls


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other_key", "directory"])
def test_a_damaged_cached_partition_is_ignored_with_a_warning_and_built_again(tmp_path, monkeypatch, caplog,
                                                                                folds_cache, damage):
    calls = _fake_graphpart(monkeypatch)
    ids, seqs, labels = ["a", "b", "c", "d"], ["MKV", "MKW", "MKY", "MKK"], np.array([0, 1, 0, 1])
    homology_partition(ids, seqs, labels, k=3)
    (cached,) = folds_cache.glob("*.tsv")
    if damage == "truncated":
        cached.write_text(cached.read_text()[:-20])
    elif damage == "garbage":
        cached.write_bytes(b"\x00\x01garbage")
    elif damage == "other_key":
        text = cached.read_text()
        key = cached.stem
        cached.write_text(text.replace(f"# cache_key: {key}", "# cache_key: " + "0" * 64))
    else:
        cached.unlink()
        cached.mkdir()
    with caplog.at_level("WARNING", logger="heads.folds"):
        part = homology_partition(ids, seqs, labels, k=3)
    assert len(calls) == 2 and part.cached is None
    assert any("ignoring a damaged cached partition" in r.getMessage() or "could not store" in r.getMessage()
               for r in caplog.records)
    if damage != "directory":
        assert read_folds(cached).partition.ids == ids  # replaced by a good one
        assert homology_partition(ids, seqs, labels, k=3).cached == str(cached) and len(calls) == 2


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch, caplog):
    calls = _fake_graphpart(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HEADS_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    with caplog.at_level("WARNING", logger="heads.folds"):
        part = homology_partition(["a", "b", "c"], ["MKV", "MKW", "MKY"], np.array([0, 1, 0]), k=3)
    assert len(calls) == 1 and part.folds.tolist() == [0, 1, 2]
    assert any("could not store the homology folds in the cache" in r.getMessage() for r in caplog.records)


def test_a_full_disk_while_caching_only_warns_and_leaves_no_file(tmp_path, monkeypatch, caplog, folds_cache):
    _fake_graphpart(monkeypatch)
    real_replace = os.replace

    def no_space(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with caplog.at_level("WARNING", logger="heads.folds"):
        homology_partition(["a", "b", "c"], ["MKV", "MKW", "MKY"], np.array([0, 1, 0]), k=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert any("disk is full" in r.getMessage() for r in caplog.records)
    assert list(folds_cache.iterdir()) == []


def test_cache_folder_follows_heads_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HEADS_CACHE_DIR", str(tmp_path / "own"))
    assert folds_cache_dir() == tmp_path / "own"
    monkeypatch.delenv("HEADS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folds_cache_dir() == tmp_path / "xdg" / "heads" / "folds"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # invalid by the XDG specification: ignored
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert folds_cache_dir() == tmp_path / "home" / ".cache" / "heads" / "folds"


def test_homology_labels_of_a_label_set_matrix_are_sorted_names(monkeypatch, tmp_path):
    seen = {}

    def fake_run_tool(command, what, output, cwd=None, env=None, **kwargs):
        request = json.loads(Path(command[-2]).read_text())
        seen.update(request["labels"])
        Path(command[-1]).write_text(json.dumps([list(request["sequences"])]))

    monkeypatch.setattr(folds_module, "run_tool", fake_run_tool)
    monkeypatch.setattr(folds_module.shutil, "which", lambda name: "/bin/true")
    Y = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    homology_folds(["p", "q", "r"], ["MKV", "MKW", "MKY"], Y, k=3, classes=["Cytoplasm", "Nucleus", "Membrane"])
    assert seen == {"p": "Cytoplasm;Membrane", "q": "Nucleus", "r": ""}
    homology_folds(["p", "q", "r"], ["MKV", "MKW", "MKY"], np.array([2, 0, 1]), k=3)
    assert seen == {"p": "2", "q": "0", "r": "1"}  # single-label: as before, the class index


# -- whole or nothing -------------------------------------------------------------------------
KILLED_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
import heads.folds as folds
from embedcache.sequences import sequence_key

real = Path.write_bytes
def slow(self, data):
    with open(self, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        Path(sys.argv[2]).touch()
        time.sleep(60)
Path.write_bytes = slow
ids = [f"p{i}" for i in range(50)]
part = folds.Partition(ids, [sequence_key("MKV" + "A" * i) for i in range(50)], np.arange(50) % 5, "stratified", 5)
folds.write_folds(part, sys.argv[1])
"""


def test_kill_9_while_writing_leaves_no_partial_folds_file(tmp_path):
    out, halfway = tmp_path / "folds.tsv", tmp_path / "halfway"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), str(halfway)], env=env)
    try:
        for _ in range(6000):
            if halfway.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert halfway.exists(), "the writer never got halfway"
        proc.kill()
    finally:
        proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob("folds.tsv.tmp-*"))
    assert len(leftovers) == 1  # the dead writer's, removed by the next write
    part = Partition(["a", "b", "c"], [sequence_key(s) for s in ("MKV", "MKW", "MKY")], np.array([0, 1, 2]),
                     "stratified", 3)
    write_folds(part, out)
    assert read_folds(out).partition.ids == ["a", "b", "c"] and not list(tmp_path.glob("folds.tsv.tmp-*"))


def test_two_writers_of_one_folds_file_at_once_leave_one_whole_file(tmp_path, monkeypatch):
    out = tmp_path / "folds.tsv"
    parts = [Partition([f"p{i}" for i in range(2000)], [sequence_key("MK" + "A" * (i % 50)) for i in range(2000)],
                       (np.arange(2000) + shift) % 5, "stratified", 5, seed=shift) for shift in range(2)]
    # Both writers between opening their temporary file and renaming it, at the same time.
    barrier = threading.Barrier(2)
    real = Path.write_bytes

    def together(self, data):
        with open(self, "wb") as handle:
            handle.write(data[:100])
            barrier.wait(timeout=30)
            handle.write(data[100:])
        return len(data)

    monkeypatch.setattr(Path, "write_bytes", together)
    errors: list[BaseException] = []

    def write(part):
        try:
            write_folds(part, out)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(Path, "write_bytes", real)
    assert errors == []
    found = read_folds(out).partition  # whole: its digests match
    assert found.seed in (0, 1) and np.array_equal(found.folds, parts[found.seed].folds)
    assert not list(tmp_path.glob("folds.tsv.tmp*"))


FSIZE_WRITER = """
import resource, sys
import numpy as np
import heads.folds as folds
from embedcache.sequences import sequence_key
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
ids = [f"p{i}" for i in range(200)]
part = folds.Partition(ids, [sequence_key("MKV" + "A" * i) for i in range(200)], np.arange(200) % 5, "stratified", 5)
try:
    folds.write_folds(part, sys.argv[1])
except folds.DiskFullError as err:
    print("DISKFULL", err)
"""


def test_a_file_size_limit_while_writing_is_a_disk_full_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "folds.tsv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FSIZE_WRITER, str(out)], env=env, capture_output=True, text=True,
                          check=False)
    assert "DISKFULL" in done.stdout and "the disk is full" in done.stdout, done.stdout + done.stderr
    assert not out.exists() and not list(tmp_path.glob("folds.tsv.tmp*"))


def test_the_folds_command_on_a_full_disk_is_an_error_line(tmp_path, monkeypatch):
    csv = families_csv(tmp_path / "families.csv")
    out = tmp_path / "folds.tsv"
    out.write_text("old")

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    result = CliRunner().invoke(heads_main, ["folds", str(csv), "--out", str(out), "--method", "stratified"])
    assert result.exit_code == 1 and "Error:" in result.output and "the disk is full" in result.output
    assert out.read_text() == "old" and isinstance(DiskFullError(), OSError)


# -- multi-label stratification ---------------------------------------------------------------
def _multilabel_set(n: int = 600, labels: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    rates = np.array([0.5, 0.3, 0.15, 0.08, 0.04])[:labels]
    Y = (rng.random((n, labels)) < rates).astype(np.int64)
    seqs = ["".join(rng.choice(ALPHABET, size=20)) for _ in range(n)]
    for i in range(0, 60, 3):  # some sequences twice and thrice, under other IDs and partly other labels
        seqs[i + 1] = seqs[i]
        seqs[i + 2] = seqs[i]
    return Y, seqs


def test_iterative_stratification_keeps_label_proportions_and_identical_sequences_together():
    Y, seqs = _multilabel_set()
    folds = stratified_folds(Y, seqs, k=5, seed=0)
    assert set(folds.tolist()) == {0, 1, 2, 3, 4}
    overall = Y.mean(0)
    for f in range(5):
        share = Y[folds == f].mean(0)
        assert np.all(np.abs(share - overall) <= 0.03 + 0.15 * overall), (f, share, overall)
        assert abs((folds == f).mean() - 0.2) < 0.03
    for i in range(0, 60, 3):
        assert folds[i] == folds[i + 1] == folds[i + 2]
    assert np.array_equal(stratified_folds(Y, seqs, k=5, seed=0), folds)
    assert not np.array_equal(stratified_folds(Y, seqs, k=5, seed=1), folds)


def test_iterative_stratification_beats_chance_on_a_rare_label():
    Y, seqs = _multilabel_set(n=400)
    folds = stratified_folds(Y, seqs, k=5, seed=3)
    rare = Y[:, 4].sum()
    per_fold = [int(Y[folds == f, 4].sum()) for f in range(5)]
    assert max(per_fold) - min(per_fold) <= 2, (rare, per_fold)


def test_multilabel_build_partition_and_file_record_the_software(tmp_path):
    Y, seqs = _multilabel_set(n=60)
    ids = [f"p{i}" for i in range(60)]
    part = build_partition(ids, seqs, Y, method="stratified", k=3, seed=2, classes=list("ABCDE"))
    assert "iterative-stratification" in part.software
    back = read_folds(write_folds(part, tmp_path / "ml.tsv")).partition
    assert np.array_equal(back.folds, part.folds) and back.seed == 2


def test_stratified_folds_need_k_distinct_sequences():
    with pytest.raises(ValueError, match=r"5 folds need at least 5 distinct sequences; there are 2"):
        stratified_folds(np.array([0, 1, 0]), ["MKV", "MKW", "MKV"], k=5)


@needs_mmseqs
def test_ids_graphpart_would_misread_still_keep_families_together(tmp_path):
    frame = pd.read_csv(families_csv(tmp_path / "families.csv"))
    # "x y" reached MMseqs2 as "x": its family's alignments went to another protein, and it landed
    # in another fold than its relatives; "c\nd" came back as no protein at all (silently removed).
    odd = {0: "a b", 1: "c\nd", 3: "x y", 4: "e|f", 5: "g:h", 6: "x", 7: "t\tab"}
    ids = [odd.get(i, ident) for i, ident in enumerate(frame["id"])]
    part = homology_folds(ids, list(frame["sequence"]), np.array([int(x[-1]) for x in frame["label"]]), k=3,
                          threads=1)
    assert part.removed == 0
    for family in range(10):
        assert len({int(part.folds[i]) for i in range(family * 3, family * 3 + 3)}) == 1, family


def test_an_id_with_a_tab_or_newline_goes_through_the_command_and_back(tmp_path):
    frame = pd.read_csv(families_csv(tmp_path / "families.csv"))
    frame.loc[0, "id"] = "a\tb"
    frame.loc[1, "id"] = "c\nd"
    csv = tmp_path / "odd_ids.csv"
    frame.to_csv(csv, index=False)
    path = stratified_file(tmp_path, csv)
    data, info = load_data(RunConfig(data=str(csv), folds=str(path), k=3))
    assert {"a\tb", "c\nd"} <= set(data.ids) and info["n"] == 30


def test_tests_never_use_the_real_folds_cache():
    assert not folds_cache_dir().is_relative_to(Path.home() / ".cache")
