from __future__ import annotations

import pytest

from embedcache.extract import ExtractConfig, extract
from embedcache.sequences import InputError, read_sequences, sequence_key

BAD_FASTA = {
    "empty": ("", "file is empty"),
    "blank": ("\n\n  \n", "file is empty"),
    "not_fasta": ("ID sequence\nP1 MKT\n", "not FASTA: line 1"),
    "text_before": ("some notes\n>P1\nMKT\n", "not FASTA: line 1"),
    "empty_sequence": (">P1\nMKT\n>P2\n>P3\nMKV\n", "record 2 (line 3, id 'P2'): empty sequence"),
    "digit": (">P1\nMKT\n>P2\nMK7V\n", "record 2 (line 3, id 'P2'): invalid character '7' (digit) at residue 3"),
    "gap": (">P1\nMK-TV\n", "invalid character '-' (alignment gap; embed unaligned sequences) at residue 3"),
    "dot": (">P1\nMK.TV\n", "invalid character '.' (alignment gap; embed unaligned sequences) at residue 3"),
    "space_inside": (">P1\nMKT\n>P2\nMK TV\n", "record 2 (line 3, id 'P2'): whitespace inside the sequence on line 4"),
    "tab_inside": (">P1\nMK\tTV\n", "whitespace inside the sequence on line 2"),
    "non_ascii": (">P1\nMKÅTV\n", "non-ASCII, U+00C5"),
    "star_inside": (">P1\nMK*TV\n", "invalid character '*' at residue 3"),
    "duplicate_id": (">P1\nMKT\n>P2\nMKV\n>P1 again\nMKW\n",
                     "record 3 (line 5): duplicate ID 'P1' with a different sequence than record 1 (line 1)"),
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


def test_binary_file_is_refused_with_byte_offset_and_line(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_bytes(b">P1\nMK\xff\xfeTV\n")
    with pytest.raises(InputError, match=r"not UTF-8 text: byte 0xFF at byte offset 6 \(line 2, byte 3 of the line\)"):
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


# --- The input is judged as it is: nothing changed, nothing dropped before validation ----------


def _fasta(tmp_path, data: bytes | str, name: str = "in.fasta"):
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _pairs(records):
    return [(r.id, r.sequence) for r in records]


@pytest.mark.parametrize("indent", [" ", "\t", "  \t "])
def test_header_after_leading_whitespace_keeps_its_record(tmp_path, indent):
    path = _fasta(tmp_path, f"{indent}>P1 first\nMKT\n{indent}>P2\nMKV\n")
    recs = read_sequences(path)
    assert _pairs(recs) == [("P1", "MKT"), ("P2", "MKV")]
    assert recs[0].header == "P1 first"
    assert [r.line for r in recs] == [1, 3]


@pytest.mark.parametrize(
    "letter",
    [
        "\u0131",  # dotless i: upper() gives 'I'
        "\u00df",  # sharp s: upper() gives 'SS', one residue longer
        "\ufb00",  # ff ligature: upper() gives 'FF'
        "\u017f",  # long s: upper() gives 'S'
        "\u212a",  # Kelvin sign: lower() and case-insensitive regexes give 'k'
        "\u0391",  # Greek capital alpha, looks like 'A'
        "\u00a0",  # no-break space: str.strip() would remove it
        "\u200b",  # zero-width space: invisible
    ],
)
def test_non_ascii_is_refused_before_upper_casing_with_code_point_and_position(tmp_path, letter):
    fasta = _fasta(tmp_path, f">P1\nMKT\nAY{letter}K\n")
    with pytest.raises(InputError) as err:
        read_sequences(fasta)
    message = str(err.value)
    assert message.startswith(f"{fasta}: record 1 (line 1, id 'P1'): invalid character")
    assert f"U+{ord(letter):04X}" in message
    assert "at residue 6 (line 3, column 3)" in message
    table = tmp_path / "in.csv"
    table.write_text(f"id,sequence\nP1,MKTAY{letter}K\n", encoding="utf-8")
    expected = rf"row 2 \(id 'P1'\): invalid character .*U\+{ord(letter):04X}.* at residue 6"
    with pytest.raises(InputError, match=expected):
        read_sequences(table)


@pytest.mark.parametrize("letter", ["\u00df", "\u0131", "\ufb00", "\u017f"])
def test_sequence_key_never_folds_non_ascii_into_ascii(letter):
    with pytest.raises(ValueError, match=f"U\\+{ord(letter):04X}"):
        sequence_key("MK" + letter)


def test_sequence_key_is_sha1_of_ascii_upper_case():
    import hashlib

    assert sequence_key("mktX") == sequence_key("MKTX") == hashlib.sha1(b"MKTX").hexdigest()


def test_residue_position_names_line_and_column_across_lines(tmp_path):
    path = _fasta(tmp_path, ">P1\nMKTAY\n  IAK9Q\n")
    with pytest.raises(InputError, match=r"invalid character '9' \(digit\) at residue 9 \(line 3, column 6\)"):
        read_sequences(path)


def test_lower_case_stop_on_its_own_line_and_double_stop(tmp_path):
    assert _pairs(read_sequences(_fasta(tmp_path, ">P1\nmkt\n*\n"))) == [("P1", "MKT")]
    with pytest.raises(InputError, match=r"invalid character '\*' at residue 5 \(line 2, column 5\)"):
        read_sequences(_fasta(tmp_path, ">P1\nMKTA**\n"))


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("in.fasta", BOM + b">P1\nMKT\n", [("P1", "MKT")]),
        ("in.fasta", BOM + b"\n  \n>P1\r\nMKT\r\n", [("P1", "MKT")]),
        ("in.csv", BOM + b"id,sequence\nP1,MKT\n", [("P1", "MKT")]),
        ("in.tsv", BOM + b"Entry\tSequence\r\nP1\tMKT\r\n", [("P1", "MKT")]),
    ],
)
def test_utf8_byte_order_mark_is_skipped(tmp_path, name, data, expected):
    assert _pairs(read_sequences(_fasta(tmp_path, data, name))) == expected


FASTA_BYTES = b">P1 one\nMKTAY\nIAK\n>P2\nmkv*\n"
CSV_BYTES = b"id,sequence\nP1,MKTAYIAK\nP2,mkv*\n"
EXPECTED = [("P1", "MKTAYIAK"), ("P2", "MKV")]


def _compress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    return {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[kind](data)


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz"])
@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("in.fasta.gz", FASTA_BYTES),
        ("in.fasta", FASTA_BYTES),  # compressed bytes, plain name
        ("in.gz", FASTA_BYTES),
        ("in.txt", FASTA_BYTES),
        ("in.csv.gz", CSV_BYTES),
        ("in.csv", CSV_BYTES),
        ("in.bz2", CSV_BYTES),
    ],
)
def test_compressed_input_is_read_by_magic_bytes_whatever_the_name(tmp_path, kind, name, data):
    path = _fasta(tmp_path, _compress(kind, data), name)
    assert _pairs(read_sequences(path)) == EXPECTED


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: _compress("gzip", FASTA_BYTES)[:-10], "truncated gzip data"),
        (lambda: _compress("gzip", FASTA_BYTES * 50)[:40], "truncated gzip data"),
        (lambda: _compress("bz2", FASTA_BYTES)[:-6], "truncated bz2 data"),
        (lambda: _compress("xz", FASTA_BYTES)[:-6], "truncated xz data"),
        (lambda: _compress("gzip", FASTA_BYTES)[:-8] + b"\0\0\0\0" + _compress("gzip", FASTA_BYTES)[-4:],
         "corrupt gzip data"),
        (lambda: _compress("gzip", b""), "file is empty"),
        (lambda: _compress("gzip", b"  \n\n"), "file is empty"),
        (lambda: _zip(FASTA_BYTES), "a zip archive; unzip it"),
        (lambda: _tar_gz(FASTA_BYTES), "a tar archive"),
        (lambda: b"\x28\xb5\x2f\xfd" + b"\0" * 20, "zstd-compressed"),
        (lambda: b"\x89HDF\r\n\x1a\n" + b"\0" * 20, "an HDF5 file"),
    ],
)
def test_broken_or_unsupported_compression_is_named(tmp_path, data, message):
    path = _fasta(tmp_path, data(), "in.fasta")
    with pytest.raises(InputError, match=message):
        read_sequences(path)


def _zip(data: bytes) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("in.fasta", data)
    return buffer.getvalue()


def _tar_gz(data: bytes) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("in.fasta")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("\ufeff>P1\nMKT\n".encode("utf-16-le"), "UTF-16 text; save it as UTF-8"),
        ("\ufeff>P1\nMKT\n".encode("utf-16-be"), "UTF-16 text; save it as UTF-8"),
        ("\ufeff>P1\nMKT\n".encode("utf-32-le"), "UTF-32 text; save it as UTF-8"),
        (">P1\nMKT\n".encode("utf-16-le"), r"NUL byte at byte offset 1 \(line 1, byte 2 of the line\): .*UTF-16"),
        (b">P1\nMK\x00T\n", r"NUL byte at byte offset 6 \(line 2, byte 3 of the line\)"),
        (">P1 Å\nMKT\n".encode("latin-1"), r"byte 0xC5 at byte offset 4 \(line 1, byte 5 of the line\)"),
        # UTF-8 first, Latin-1 later: the first bad byte is named, with its line.
        (">P1 Å\nMKT\n>P2 Å\nMKV\n".encode() + ">P3 Å\n".encode("latin-1"),
         r"byte 0xC5 at byte offset 26 \(line 5, byte 5 of the line\)"),
        (BOM + b"\xff\n>P1\nMKT\n", r"byte 0xFF at byte offset 3 \(line 1, byte 4 of the line\)"),
    ],
)
def test_encoding_problems_are_named_with_offset_and_line(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        read_sequences(_fasta(tmp_path, data))


def test_gzip_encoding_problem_says_offset_is_in_decompressed_data(tmp_path):
    path = _fasta(tmp_path, _compress("gzip", b">P1\nMK\xe9T\n"), "in.fa.gz")
    with pytest.raises(InputError, match=r"byte 0xE9 at byte offset 6 of the gzip-decompressed data \(line 2"):
        read_sequences(path)


@pytest.mark.parametrize(
    ("name", "data", "expected_format"),
    [
        ("in.csv", b"id;sequence;label\nP1;MKTAYIAK;a\nP2;mkv*;b\n", "csv"),
        ("in.csv", b"id|sequence\nP1|MKTAYIAK\nP2|mkv*\n", "csv"),
        ("in.csv", b"id\tsequence\nP1\tMKTAYIAK\nP2\tmkv*\n", "tsv"),
        ("in.tsv", b"id,sequence\nP1,MKTAYIAK\nP2,mkv*\n", "csv"),
        ("in.txt", b"id;sequence\nP1;MKTAYIAK\nP2;mkv*\n", "csv"),
        ("in.txt", CSV_BYTES, "csv"),
        ("noext", b"id\tsequence\nP1\tMKTAYIAK\nP2\tmkv*\n", "tsv"),
        ("in.csv", FASTA_BYTES, "fasta"),
        ("in.tsv", b"\n  >P1 one\nMKTAY\nIAK\n>P2\nmkv*\n", "fasta"),
        ("in.fasta", CSV_BYTES, "csv"),
        # A comma inside a quoted field does not outvote the real delimiter.
        ("in.csv", b'id;sequence;note\nP1;MKTAYIAK;"a, b, c, d"\nP2;mkv*;x\n', "csv"),
    ],
)
def test_delimiter_and_format_come_from_the_content(tmp_path, name, data, expected_format):
    from embedcache.sequences import detect_format

    path = _fasta(tmp_path, data, name)
    assert detect_format(path) == expected_format
    assert _pairs(read_sequences(path)) == EXPECTED


@pytest.mark.parametrize(
    ("name", "data", "warning"),
    [
        ("in.csv", FASTA_BYTES, "named .csv but holds FASTA"),
        ("in.fasta", CSV_BYTES, "named .fasta but holds a table"),
        ("in.csv", b"id;sequence\nP1;MKTAYIAK\nP2;mkv*\n", "header is separated by semicolon"),
    ],
)
def test_suffix_that_disagrees_with_the_content_is_warned_about(tmp_path, caplog, name, data, warning):
    path = _fasta(tmp_path, data, name)
    with caplog.at_level("WARNING", logger="embedcache.sequences"):
        assert _pairs(read_sequences(path)) == EXPECTED
    assert warning in caplog.text


def test_explicit_table_format_on_fasta_is_refused(tmp_path):
    path = _fasta(tmp_path, FASTA_BYTES, "in.txt")
    with pytest.raises(InputError, match="format 'csv' was asked for, but line 1 starts with '>'"):
        read_sequences(path, fmt="csv")


def test_explicit_format_still_finds_the_delimiter(tmp_path):
    path = _fasta(tmp_path, b"id;sequence\nP1;MKTAYIAK\nP2;mkv*\n", "in.dat")
    assert _pairs(read_sequences(path, fmt="csv")) == EXPECTED
    assert _pairs(read_sequences(path, fmt="tsv")) == EXPECTED


def test_neither_fasta_nor_table_says_both(tmp_path):
    path = _fasta(tmp_path, b"MKTAYIAK\nMKV\n", "in.txt")
    with pytest.raises(InputError, match=r"not FASTA: line 1 should start with '>' but reads 'MKTAYIAK'; nor a table"):
        read_sequences(path)


def test_one_column_table_names_the_delimiter(tmp_path):
    path = _fasta(tmp_path, b"id sequence\nP1 MKT\n", "in.csv")
    with pytest.raises(InputError, match="header has one column when split at each comma"):
        read_sequences(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # pandas took the extra first field as an index and shifted the columns silently.
        (b"id,sequence\nP1,MKT,MKV\n", r"row 2: has 3 fields separated by comma but the header \(line 1\) has 2"),
        (b"id,sequence,label\nP1,MKT\n", r"row 2: has 2 fields separated by comma but the header \(line 1\) has 3"),
        (b"id,sequence,id\nP1,MKT,P2\n", r"column names appear more than once: \['id'\]"),
        (b"ID,id,sequence\nP1,P2,MKT\n", r"columns \['ID', 'id'\] all match 'id'; pass --id-col"),
    ],
)
def test_ragged_or_ambiguous_tables_are_refused(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        read_sequences(_fasta(tmp_path, data, "in.csv"))


def test_csv_rows_are_file_lines_even_after_blank_lines_and_quoted_newlines(tmp_path):
    path = _fasta(tmp_path, b'id,sequence,note\n\nP1,MKT,"two\nlines"\nP2,MK1,x\n', "in.csv")
    with pytest.raises(InputError, match=r"row 5 \(id 'P2'\): invalid character '1'"):
        read_sequences(path)


def test_duplicate_id_in_csv_names_both_rows(tmp_path):
    path = _fasta(tmp_path, b"id,sequence\nP1,MKT\nP2,MKV\nP1,MKW\n", "in.csv")
    with pytest.raises(InputError, match=r"row 4: duplicate ID 'P1' with a different sequence than row 2"):
        read_sequences(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b">P1\r\nMKT\r\nAY\r\n>P2\r\nMKV\r\n", [("P1", "MKTAY"), ("P2", "MKV")]),  # Windows
        (b">P1\rMKT\rAY\r>P2\rMKV\r", [("P1", "MKTAY"), ("P2", "MKV")]),  # classic Mac
        (b">P1\nMKT", [("P1", "MKT")]),  # no final newline
        (b"\n\n>P1\n\n  MKT  \n\n", [("P1", "MKT")]),  # blank lines, spaces around a sequence line
        (b">P1 caf\xc3\xa9 \xe2\x80\x94 desc\nMKT\n", [("P1", "MKT")]),  # non-ASCII in a header is fine
    ],
)
def test_line_endings_and_blank_lines(tmp_path, data, expected):
    assert _pairs(read_sequences(_fasta(tmp_path, data))) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "file is empty"),
        (b" \t\r\n\n", "file is empty"),
        (BOM, "file is empty"),
        (BOM + b"  \r\n\n", "file is empty"),
        (b">P1\n", r"record 1 \(line 1, id 'P1'\): empty sequence"),
        (b">P1\n*\n", "empty sequence"),
        (b">P1\nMKT\n\xef\xbb\xbf>P2\nMKV\n", r"byte-order mark, U\+FEFF; were files concatenated"),
    ],
)
def test_hostile_small_inputs(tmp_path, data, message):
    with pytest.raises(InputError, match=message):
        read_sequences(_fasta(tmp_path, data))


@pytest.mark.parametrize("name", ["big.fasta", "big.csv"])
def test_huge_single_line_record_is_read_exactly(tmp_path, name):
    residues = ("ACDEFGHIKLMNPQRSTVWY" * 10_000)[:200_000]
    text = f">P1\n{residues}\n" if name.endswith("fasta") else f"id,sequence\nP1,{residues}\n"
    (record,) = read_sequences(_fasta(tmp_path, text, name))
    assert record.sequence == residues


def test_directory_is_refused(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        read_sequences(tmp_path)


def test_symlink_is_followed_and_broken_symlink_is_named(tmp_path):
    target = _fasta(tmp_path, FASTA_BYTES)
    link = tmp_path / "link.fasta"
    link.symlink_to(target)
    assert _pairs(read_sequences(link)) == EXPECTED
    broken = tmp_path / "broken.fasta"
    broken.symlink_to(tmp_path / "absent.fasta")
    with pytest.raises(InputError, match="broken symbolic link"):
        read_sequences(broken)


def test_fifo_is_read(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.fasta"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as handle:
            handle.write(_compress("gzip", FASTA_BYTES))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert _pairs(read_sequences(fifo)) == EXPECTED
    finally:
        writer.join(timeout=10)


@pytest.fixture
def stdin(monkeypatch):
    """Replace standard input with bytes; the reader keeps what it read, so start afresh."""
    import io
    import sys

    import embedcache.sequences as sequences

    def feed(data: bytes):
        monkeypatch.setattr(sequences, "_stdin_data", None)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    yield feed


@pytest.mark.parametrize("data", [FASTA_BYTES, CSV_BYTES, b"id;sequence\nP1;MKTAYIAK\nP2;mkv*\n"])
def test_dash_reads_standard_input_once_whatever_the_format(stdin, data):
    from embedcache.sequences import detect_format

    stdin(_compress("gzip", data))
    detect_format("-")  # consumes stdin; reading afterwards must see the same bytes
    assert _pairs(read_sequences("-")) == EXPECTED


def test_dash_names_stdin_in_messages(stdin):
    stdin(b">P1\nMK7\n")
    with pytest.raises(InputError, match=r"^<stdin>: record 1 \(line 1, id 'P1'\): invalid character '7'"):
        read_sequences("-")


def test_dash_reads_a_real_pipe_in_a_subprocess(tmp_path):
    import os
    import subprocess
    import sys

    code = "from embedcache.sequences import read_sequences; print([(r.id, r.sequence) for r in read_sequences('-')])"
    result = subprocess.run([sys.executable, "-c", code], input=_compress("xz", CSV_BYTES), capture_output=True,
                            env=dict(os.environ), timeout=60, check=True)
    assert result.stdout.decode().strip() == repr(EXPECTED)


def test_importing_sequences_does_not_import_torch():
    import subprocess
    import sys

    code = "import embedcache.sequences, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


def test_labeled_csv_and_fasta_read_like_sequences(tmp_path):
    from heads.datasets import load_labeled

    csv_path = _fasta(tmp_path, _compress("gzip", BOM + b"Entry;Sequence;label\r\nP1;mkt;a\r\n\r\nP2;MKV;b\r\n"),
                      "set.csv")
    data = load_labeled(csv_path)
    assert (data.ids, data.sequences, data.classes, data.labels.tolist()) == (
        ["P1", "P2"], ["MKT", "MKV"], ["a", "b"], [0, 1])
    fasta_path = _fasta(tmp_path, _compress("gzip", b" >P1|Cytoplasmic|archaea|0\nMKT\n>P2|Membrane|archaea|1\nMKV\n"),
                        "set.csv")
    data = load_labeled(fasta_path)
    assert (data.ids, data.classes, data.folds.tolist()) == (["P1", "P2"], ["Cytoplasmic", "Membrane"], [0, 1])


def test_labeled_csv_duplicate_id_names_file_rows(tmp_path):
    from heads.datasets import read_labeled_csv

    path = _fasta(tmp_path, b"id,sequence,label\n\nP1,MKT,a\nP1,MKV,b\n", "set.csv")
    with pytest.raises(InputError, match=r"ID 'P1' appears twice \(rows 3 and 4\)"):
        read_labeled_csv(path)


def test_gzip_inside_gzip_is_read(tmp_path):
    path = _fasta(tmp_path, _compress("gzip", _compress("bz2", FASTA_BYTES)), "in.fasta.bz2.gz")
    assert _pairs(read_sequences(path)) == EXPECTED
    truncated = _fasta(tmp_path, _compress("gzip", _compress("gzip", FASTA_BYTES)[:-6]), "t.fasta.gz.gz")
    with pytest.raises(InputError, match="truncated gzip-inside-gzip data"):
        read_sequences(truncated)


def test_unclosed_quote_in_table_is_named(tmp_path):
    path = _fasta(tmp_path, b'id,sequence\nP1,"MKT\nP2,MKV\n', "in.csv")
    with pytest.raises(InputError,
                       match=r"row 2 \(id 'P1'\): the 'sequence' field spans several lines \(a quote left open\?\)"):
        read_sequences(path)


def test_extract_cli_reads_standard_input(tmp_path, tiny_weights, monkeypatch):
    from click.testing import CliRunner

    import embedcache.sequences as sequences
    from embedcache.cli import main
    from embedcache.store import EmbeddingCache

    monkeypatch.setattr(sequences, "_stdin_data", None)
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(main, ["extract", "-", str(out), "--weights", str(tiny_weights), "--threads", "1",
                                       "--quiet"], input=_compress("gzip", b"id;sequence\nP1;MKTAYIAK\nP2;mkv*\n"))
    assert result.exit_code == 0, result.output
    assert "2 IDs, 2 unique sequences" in result.output
    with EmbeddingCache(out) as cache:
        assert cache.key("P2") == sequence_key("MKV")
