"""The dataset report (heads describe) on hand-made sets whose every number is known."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from embedcache.atomic import atomic_path
from embedcache.extract import ExtractConfig, extract
from heads.cli import main
from heads.describe import describe, window_from_cache, write_report

from conftest import write_fasta

LONG = "M" * 1030  # 8 residues over ESM-2's 1,022

# ID|class|group|fold. ACDE twice with one label across folds; GGGG twice with two labels;
# e and g hold unusual residues (X, B; B, Z, J, U, O, X); f is longer than the window.
RECORDS = [
    ("a|A|pos|0", "ACDE"),
    ("b|A|pos|1", "ACDE"),
    ("c|B|neg|0", "GGGG"),
    ("d|A|neg|1", "GGGG"),
    ("e|B|neg|0", "MKVXB"),
    ("f|A|pos|1", LONG),
    ("g|B|pos|0", "BZJUOX"),
]


@pytest.fixture
def small(tmp_path):
    return write_fasta(tmp_path / "small.fasta", RECORDS)


def test_counts_per_class_group_fold_and_cross_tables(small):
    counts = describe(small)["counts"]
    assert counts["n"] == 7
    assert counts["per_class"] == {"A": 4, "B": 3}
    assert counts["per_group"] == {"neg": 3, "pos": 4}
    assert counts["per_fold"] == {"0": 4, "1": 3}
    assert counts["class_by_fold"] == {"A": {"0": 1, "1": 3}, "B": {"0": 3, "1": 0}}
    assert counts["class_by_group"] == {"A": {"neg": 1, "pos": 3}, "B": {"neg": 2, "pos": 1}}


def test_duplicates_found_with_label_conflicts_and_fold_leaks(small):
    dup = describe(small)["duplicates"]
    assert dup["unique_sequences"] == 5
    assert dup["duplicate_sets"] == 2 and dup["proteins_in_duplicate_sets"] == 4 and dup["redundant_proteins"] == 2
    assert dup["sets_with_conflicting_labels"] == 1
    assert dup["sets_across_folds"] == 2
    conflicting = dup["sets"][0]  # conflicts are listed first
    assert conflicting["ids"] == ["c", "d"] and conflicting["labels"] == ["B", "A"]
    assert not conflicting["labels_agree"]
    assert dup["sets"][1]["ids"] == ["a", "b"] and dup["sets"][1]["labels_agree"]


def test_repeated_id_is_refused_naming_file_and_lines(tmp_path):
    path = write_fasta(tmp_path / "twice.fasta", [("a|A|pos|0", "ACDE"), ("a|B|pos|1", "GGGG")])
    result = CliRunner().invoke(main, ["describe", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "twice.fasta" in result.output and "ID 'a' appears twice (lines 1 and 3)" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "describe.json").exists()


def test_over_window_truncation_and_chunking_without_cache_assume_esm2(small):
    report = describe(small)
    window = report["window"]
    assert window["window"] == 1022 and window["source"] == "assumed" and window["extra_tokens"] == 2
    assert window["over_window"] == 1 and window["over_window_per_class"] == {"A": 1, "B": 0}
    assert window["truncation"]["residues_lost"] == 8
    # 1030 residues in windows of 1022 overlapping by >= 256: two windows; six proteins need one.
    assert window["chunking"]["windows_total"] == 8 and window["chunking"]["extra_windows"] == 1
    assert window["over_window_ids"] == [{"id": "f", "label": "A", "length": 1030, "residues_lost_truncated": 8,
                                          "windows_chunked": 2}]


def test_tokens_include_bos_eos_and_p95_covers_95_percent(small):
    tokens = describe(small)["tokens"]
    # lengths 4,4,4,4,5,1030,6 plus BOS and EOS; of 7 proteins, 95% needs all 7.
    assert tokens["median"] == 6 and tokens["max"] == 1032 and tokens["p95"] == 1032
    assert tokens["covered_by_p95"] == 1.0
    assert tokens["total"] == 4 * 4 + 5 + 1030 + 6 + 7 * 2


def test_p95_is_the_smallest_count_covering_95_percent(tmp_path):
    records = [(f"p{i}|A|g", "A" * (i + 1)) for i in range(100)]  # lengths 1..100
    tokens = describe(write_fasta(tmp_path / "ramp.fasta", records))["tokens"]
    assert tokens["p95"] == 95 + 2 and tokens["covered_by_p95"] == pytest.approx(0.95)


def test_unknown_and_ambiguous_residues_counted_per_letter_and_protein(small):
    res = describe(small)["residues"]
    assert res["per_letter"] == {"B": 2, "J": 1, "O": 1, "U": 1, "X": 2, "Z": 1}
    assert res["total"] == 8 and res["proteins_with_any"] == 2 and res["most_in_one_protein"] == 6
    assert [(p["id"], p["nonstandard"]) for p in res["proteins"]] == [("g", 6), ("e", 2)]
    assert res["per_protein_histogram"] == {"2": 1, "6": 1}


def test_against_finds_exact_overlap_by_sequence_content(small, tmp_path):
    other = write_fasta(tmp_path / "bench.fasta", [("h|A|pos", "acde"), ("i|B|neg", "WWWWW")])
    exact = describe(small, against=other)["against"]["exact"]
    assert exact["proteins"] == 2 and exact["ids"] == ["a", "b"] and exact["other_proteins"] == 1
    assert exact["pairs"][0]["other_ids"] == ["h"] and exact["labels_disagree"] == 0


def test_against_reads_an_unlabelled_fasta_for_its_sequences(small, tmp_path):
    other = write_fasta(tmp_path / "plain.fasta", [("x1", "GGGG"), ("x2", "PPPP")])
    exact = describe(small, against=other)["against"]["exact"]
    assert exact["ids"] == ["c", "d"] and "labels_disagree" not in exact


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="MMseqs2 (mmseqs) not installed")
def test_mmseqs_overlap_finds_a_close_relative_not_an_unrelated_protein(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    base = rng.choice(alphabet, 150)
    mutant = base.copy()
    mutant[::10] = "W"  # at most 15 of 150 changed: at least 90% identical
    unrelated = rng.choice(alphabet, 150)
    data = write_fasta(tmp_path / "d.fasta", [("q1|A|g", "".join(base)), ("q2|A|g", "".join(unrelated)),
                                              ("q3|B|g", "ACDEFGHIK")])
    other = write_fasta(tmp_path / "o.fasta", [("t1|A|g", "".join(mutant)), ("t2|B|g", "ACDEFGHIK")])
    hom = describe(data, against=other, identity=0.5, threads=1)["against"]["homology"]
    assert hom["available"]
    # q3 is too short for MMseqs2's E-value cut, but identical sequences always count.
    assert sorted(hom["ids"]) == ["q1", "q3"] and hom["other_proteins"] == 2
    best = {h["id"]: h for h in hom["best_hits"]}
    assert best["q1"]["other_id"] == "t1" and 0.9 <= best["q1"]["identity"] < 1
    assert best["q3"]["identity"] == 1.0


def test_window_comes_from_a_unirep_cache_as_no_window():
    model = window_from_cache({"family": "unirep", "architecture": "UniRep mLSTM 256x4", "model": "unirep256",
                               "max_length": "none", "long_policy": "truncate", "chunk_overlap": 0}, "c.h5")
    assert model.window is None and model.extra_tokens == 1 and not model.supports_chunking


def test_window_and_policy_come_from_the_cache_settings(tmp_path, tiny_weights):
    data = write_fasta(tmp_path / "d.fasta", [("a|A|g", "ACDEFGHIKLMNPQ"), ("b|B|g", "ACDEF")])
    cache = tmp_path / "c.h5"
    extract(data, cache, ExtractConfig(weights=str(tiny_weights), max_length=10, long="chunk", chunk_overlap=4,
                                       threads=1), progress=False)
    report = describe(data, cache=cache)
    window = report["window"]
    assert window["window"] == 10 and window["long_policy"] == "chunk" and window["chunk_overlap"] == 4
    assert window["over_window"] == 1 and window["truncation"]["residues_lost"] == 4
    assert window["chunking"]["windows_total"] == 3  # 14 residues: windows 0-10 and 4-14, plus b's one
    assert report["cache"]["in_cache"] == 2 and report["cache"]["missing"] == 0
    assert report["tokens"]["p95"] == 14 + 2


def test_csv_with_class_names_and_no_groups_or_folds(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,sequence,label\np1,ACDE,0\np2,MKV,1\np3,ACDE,1\n")
    report = describe(path, class_names={"0": "Cytoplasm", "1": "Nucleus"})
    assert report["counts"]["per_class"] == {"Cytoplasm": 1, "Nucleus": 2}
    assert "per_group" not in report["counts"] and "per_fold" not in report["counts"]
    assert report["duplicates"]["sets_with_conflicting_labels"] == 1 and "sets_across_folds" not in report["duplicates"]


def test_cli_writes_json_html_and_titled_figures(small, tmp_path):
    other = write_fasta(tmp_path / "bench.fasta", [("h|A|pos", "ACDE")])
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["describe", str(small), "--against", str(other), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "7 proteins, 2 classes, 2 duplicated sequences (1 with conflicting labels)" in result.output
    saved = json.loads((out / "describe.json").read_text())
    assert saved["counts"]["n"] == 7 and saved["against"]["exact"]["proteins"] == 2
    for stem in ("class_balance", "fold_class_counts", "length_histogram", "length_boxplot", "tokens"):
        assert (out / f"{stem}.png").stat().st_size > 0
        assert "n = 7" in (out / f"{stem}.svg").read_text()
    page = (out / "describe.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "<script" not in page
    assert "Duplicate sequences" in page and "Overlap" in page


def test_cli_bad_record_is_an_error_naming_file_and_record(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a|A|g\nACDE\n>b|A\nMKV\n")
    result = CliRunner().invoke(main, ["describe", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "bad.fasta: record 2:" in result.output


def test_write_report_returns_what_describe_returns(small, tmp_path):
    report = write_report(tmp_path / "r", small)
    plain = describe(small)
    for key in ("counts", "duplicates", "lengths", "window", "tokens", "residues"):
        assert report[key] == plain[key]


def test_a_full_disk_leaves_the_previous_report_whole_and_no_part_of_the_new_one(small, tmp_path, monkeypatch):
    import errno

    import heads.htmlpage

    out = tmp_path / "report"
    assert CliRunner().invoke(main, ["describe", str(small), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_fasta(tmp_path / "other.fasta", [("h|A|pos|0", "ACDEFG"), ("i|B|neg|1", "MKVLLA")])

    def full(path, text):
        with atomic_path(path):  # the write itself meets the full disk, as a real one would
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(heads.htmlpage, "write_text", full)
    result = CliRunner().invoke(main, ["describe", str(other), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "the disk is full" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new figure, no new describe.json


def test_out_under_a_file_is_an_error_not_a_traceback(small, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(main, ["describe", str(small), "--out", str(blocker / "report")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "a_file/report: cannot write the report there" in result.output


def test_a_cache_of_other_proteins_is_said_aloud_not_only_counted(tmp_path, tiny_weights, caplog):
    other = write_fasta(tmp_path / "other.fasta", [("x|A|g", "MKVLLAGG"), ("y|B|g", "WWWPPP")])
    cache = tmp_path / "other.h5"
    extract(other, cache, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    data = write_fasta(tmp_path / "d.fasta", [("a|A|g", "ACDEFGHIKLMNPQ"), ("b|B|g", "ACDEF")])
    with caplog.at_level("WARNING", logger="heads.describe"):
        report = describe(data, cache=cache)
    assert report["cache"]["in_cache"] == 0 and report["cache"]["missing"] == 2
    assert "other.h5: holds 0 of the 2 sequences" in caplog.text and "a cache of other proteins" in caplog.text


def test_class_and_group_names_with_markup_are_escaped_in_describe_html(tmp_path):
    data = write_fasta(tmp_path / "x.fasta", [("a|<script>alert(1)</script>|<b>g</b>|0", "ACDE"),
                                              ("b|B&amp;|neg|1", "ACDE")])
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["describe", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "describe.html").read_text()
    assert "<script" not in page and "<b>g</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "B&amp;amp;" in page
