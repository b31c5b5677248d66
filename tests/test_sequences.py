from __future__ import annotations

import pytest

from embedcache.extract import ExtractConfig, extract
from embedcache.sequences import InputError, read_sequences, sequence_key

BAD_FASTA = {
    "empty": ("", "file is empty"),
    "blank": ("\n\n  \n", "file is empty"),
    "not_fasta": ("ID,sequence\nP1,MKT\n", "not FASTA: line 1"),
    "text_before": ("some notes\n>P1\nMKT\n", "not FASTA: line 1"),
    "empty_sequence": (">P1\nMKT\n>P2\n>P3\nMKV\n", "record 2 (line 3, id 'P2'): empty sequence"),
    "digit": (">P1\nMKT\n>P2\nMK7V\n", "record 2 (line 3, id 'P2'): invalid character '7' (digit) at residue 3"),
    "gap": (">P1\nMK-TV\n", "invalid character '-' (alignment gap; embed unaligned sequences) at residue 3"),
    "dot": (">P1\nMK.TV\n", "invalid character '.' (alignment gap; embed unaligned sequences) at residue 3"),
    "space_inside": (">P1\nMKT\n>P2\nMK TV\n", "record 2 (line 3, id 'P2'): whitespace inside the sequence on line 4"),
    "tab_inside": (">P1\nMK\tTV\n", "whitespace inside the sequence on line 2"),
    "non_ascii": (">P1\nMKÅTV\n", "non-ASCII, U+00C5"),
    "star_inside": (">P1\nMK*TV\n", "invalid character '*' at residue 3"),
    "duplicate_id": (">P1\nMKT\n>P2\nMKV\n>P1 again\nMKW\n", "record 3: duplicate ID 'P1' with a different sequence than record 1"),
    "no_id": (">\nMKT\n", "header has no ID"),
}


@pytest.mark.parametrize("name", sorted(BAD_FASTA))
def test_bad_fasta_is_refused_naming_file_record_and_problem(tmp_path, tiny_weights, name):
    text, message = BAD_FASTA[name]
    path = tmp_path / f"{name}.fasta"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out.h5"
    with pytest.raises(InputError) as err:
        extract(path, out, ExtractConfig(weights=str(tiny_weights)), progress=False)
    assert str(err.value).startswith(str(path) + ": ")
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == [path], "nothing may be written for a bad input"


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_bytes(b">P1\nMK\xff\xfeTV\n")
    with pytest.raises(InputError, match="not a text file"):
        read_sequences(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_sequences(tmp_path / "absent.fasta")


def test_normalisation_case_stop_and_multiline(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(">sp|P1|X desc here\nmktay\nIAK*\n\n>P2\r\nMKV\r\n")
    recs = read_sequences(path)
    assert [(r.id, r.header, r.sequence) for r in recs] == [
        ("sp|P1|X", "sp|P1|X desc here", "MKTAYIAK"),
        ("P2", "P2", "MKV"),
    ]
    assert recs[0].key == sequence_key("mktayiak")


def test_repeated_id_with_same_sequence_is_kept_once(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(">P1\nMKT\n>P1\nmkt\n>P2\nMKT\n")
    recs = read_sequences(path)
    assert [r.id for r in recs] == ["P1", "P2"]


def test_ambiguous_letters_are_accepted(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_text(">P1\nBZJUOX\n")
    assert read_sequences(path)[0].sequence == "BZJUOX"


def test_csv_with_index_column_and_case_insensitive_names(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("0,Entry,Sequence,label\n0,P1,mkt,1\n1,P2,MKV*,0\n")
    recs = read_sequences(path)
    assert [(r.id, r.sequence) for r in recs] == [("P1", "MKT"), ("P2", "MKV")]


def test_csv_explicit_columns_and_errors(tmp_path):
    path = tmp_path / "in.tsv"
    path.write_text("acc\tprotein\nP1\tMKT\nP2\tMK1\n")
    with pytest.raises(InputError, match="cannot tell which column"):
        read_sequences(path)
    with pytest.raises(InputError, match=r"row 3 \(id 'P2'\): invalid character '1' \(digit\) at residue 3"):
        read_sequences(path, id_col="acc", seq_col="protein")
    with pytest.raises(InputError, match="no column 'nope'"):
        read_sequences(path, id_col="nope", seq_col="protein")


def test_csv_empty_cell(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,sequence\nP1,MKT\nP2,\n")
    with pytest.raises(InputError, match=r"row 3 \(id 'P2'\): empty sequence"):
        read_sequences(path)


def test_header_only_csv(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,sequence\n")
    with pytest.raises(InputError, match="no rows"):
        read_sequences(path)
