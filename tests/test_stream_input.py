"""Input read as a stream: the same records and the same messages as reading the file whole, in
bounded memory; the sequences wait in a temporary file and the work plan does not change."""

from __future__ import annotations

import bz2
import errno
import gzip
import lzma
import tracemalloc

import numpy as np
import pytest

from embedcache import sequences
from embedcache.atomic import DiskFullError
from embedcache.batching import classify, plan_work
from embedcache.extract import ExtractConfig, classify_spilled, extract, index_input
from embedcache.sequences import (
    InputError,
    SpilledSequences,
    _choose_format,
    _parse_fasta,
    _parse_table,
    drop_repeated_ids,
    iter_sequences,
    load_text,
    open_input,
    read_sequences,
    table_records,
)
from embedcache.store import EmbeddingCache

from conftest import SEQUENCES, write_fasta
from test_extract import assert_same_cache


def whole_file_read(path):
    """What read_sequences did before it streamed: the text read whole, every record kept."""
    src = load_text(path)
    fmt, sep = _choose_format(src, None)
    if sep is None:
        records, unit = list(_parse_fasta(src)), "line"
    else:
        records, unit = table_records(_parse_table(src, sep)), "row"
    if not records:
        raise InputError(src.name, "no records found")
    return drop_repeated_ids(records, src.name, unit=unit)


def outcome(read, path):
    try:
        return [(r.id, r.header, r.sequence, r.line) for r in read(path)]
    except InputError as err:
        return f"InputError: {err}"


HOSTILE = [
    b">P1 one\nMKTAY\nIAK\n>P2\nmkv*\n",
    b">P1 caf\xc3\xa9 \xe2\x80\x94 desc\r\nMKT\r\nAAA\r\n>P2\rMKV\r\r>P3\nW",
    b"\xef\xbb\xbf>P1\nMKT\n>P2\nMKV\n",
    b">P1\nMKT\n>P2\nMK\x00V\n",
    b">P1\nMKT\n>P2 \xe9\nMKV\n",
    b">P1\nMKT\n>P2\nMKV\n" * 3 + b">P3\nMK\xc3",
    b"\xff\xfe>\x00P\x001\x00",
    b"\xef\xbb\xbf",
    b"  \n\n",
    b">P1\nMKT\n>P1\nMKV\n>P2\nMK7\n",  # a conflicting duplicate ID before a bad residue: the residue is reported
    b">P1\nMKT\n>P1\nMKT\n>P2\nMKV\n",
    b"stray\n>P1\nMKT\n",
    b">P1\nMK T\n",
    b">\nMKT\n",
    b"id,sequence\nP1,MKTAYIAK\nP2,mkv*\n",
    b"id,sequence\r\nP1,MKT\r\nP2,MK7\r\nP3,MKV,extra\r\n",  # the table's shape is reported before a bad row
    b"id,sequence\nP1,MKT\nP1,MKV\nP2,MKV\n",
    b"id;sequence;id\nP1;MKT;x\n",
    b"name,seq,sequence\nP1,MKT,MKT\n",
    b"id,sequence\n",
    b"id,label\nP1,a\n",
    b'id,sequence\nP1,"MKT\nAAA"\n',
    b'id,sequence\nP1,"MKT\n',
    b"id\tsequence\nP1\tMKT\n\nP2\tmkv\n",
    b"Entry;Sequence;label\r\nP1;mkt;a\r\n\r\nP2;MKV;b\r\n",
    b"id,sequence\nP1,MKT\n>P2\nMKV\n",
    b"PK\x03\x04rest",
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("compress", [None, "gzip", "bz2", "xz"])
def test_streamed_reading_gives_what_whole_file_reading_gives(tmp_path, monkeypatch, chunk, compress):
    """Records, headers and line numbers, or the very same message, for every input and every
    size of the blocks the stream is decoded in (lines, characters and CRLFs cut anywhere)."""
    monkeypatch.setattr(sequences, "_CHUNK", chunk)
    pack = {None: lambda d: d, "gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compress]
    for number, data in enumerate(HOSTILE):
        suffix = ".csv" if data.startswith((b"id", b"name", b"Entry")) else ".fasta"
        path = tmp_path / f"in{number}{suffix}"
        path.write_bytes(pack(data))
        assert outcome(read_sequences, path) == outcome(whole_file_read, path), data


def test_bytes_errors_name_the_same_offset_line_and_column_far_into_a_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(sequences, "_CHUNK", 100)
    body = b"".join(b">P%d\n%s\n" % (i, b"MKTAYIAKQR" * (i % 7 + 1)) for i in range(300))
    for bad in (b"\x00", b"\xe9", b"\xc3(", b"\xef\xbb\xbf"):
        for cut in (len(body) // 3, len(body) // 2 + 1, len(body) - 3):
            path = tmp_path / "in.fasta"
            path.write_bytes(body[:cut] + bad + body[cut:])
            assert outcome(read_sequences, path) == outcome(whole_file_read, path)


def test_a_file_that_changes_between_the_two_passes_is_refused(tmp_path):
    path = write_fasta(tmp_path / "in.fasta", SEQUENCES)
    src = open_input(path)
    with path.open("a") as handle:
        handle.write(">late\nMKV\n")
    with pytest.raises(InputError, match="changed while it was being read"):
        list(_parse_fasta(src))


def test_a_conflict_found_after_yielded_records_is_raised_at_the_end(tmp_path):
    path = tmp_path / "in.fasta"
    path.write_bytes(b">P1\nMKT\n>P2\nMKV\n>P1\nMKA\n")
    stream = iter_sequences(path)
    assert next(stream).id == "P1" and next(stream).id == "P2"
    with pytest.raises(InputError, match=r"duplicate ID 'P1' with a different sequence than record 1 \(line 1\)"):
        next(stream)


def _long_fasta(path, n):
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    with gzip.open(path, "wb") as out:
        for i in range(n):
            out.write(b">s%d\n%s\n" % (i, letters[rng.integers(0, 20, 20_000)].tobytes()))
    return path


def _peaks(tmp_path, n):
    path = _long_fasta(tmp_path / f"long{n}.fasta.gz", n)
    tracemalloc.start()
    try:
        with SpilledSequences(tmp_path) as spill:
            records, spans = index_input(path, spill)
            streamed = tracemalloc.get_traced_memory()[1]
            assert spill.size == n * 20_000 and len(records) == len(spans) == n
        tracemalloc.reset_peak()
        whole_file_read(path)
        whole = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return streamed, whole


def test_reading_keeps_the_index_in_memory_not_the_sequences(tmp_path):
    small, large = _peaks(tmp_path, 200), _peaks(tmp_path, 600)
    added = 400 * 20_000  # residues the larger input adds
    # Whole-file reading holds the text and every sequence; the stream holds a few blocks and the index.
    assert large[1] - small[1] > added
    assert large[0] - small[0] < added / 20
    assert large[0] < 4 * sequences._CHUNK * 2 + 2**20


def test_sequences_come_back_from_the_spill_exactly(tmp_path):
    with SpilledSequences(tmp_path) as spill:
        offsets = [spill.add(s) for s in SEQUENCES.values()]
        assert [spill.read(o, len(s)) for o, s in zip(offsets, SEQUENCES.values())] == list(SEQUENCES.values())
        later = spill.add("MKV")
        assert spill.read(later, 3) == "MKV"
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing to clean up, even after kill -9


def test_a_full_disk_while_spilling_is_a_clear_disk_full_error(tmp_path, monkeypatch):
    spill = SpilledSequences(tmp_path)

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    spill._file = Full()
    with pytest.raises(DiskFullError, match=f"{tmp_path}: the disk is full .* while keeping the input's sequences"):
        spill.add("MKT")
    spill.close()  # never fails: what it held is of no use


@pytest.mark.parametrize("policy,max_length", [("truncate", 40), ("chunk", 30), ("skip", 40), ("truncate", None)])
def test_planning_without_the_sequences_gives_the_same_work_items(tmp_path, policy, max_length):
    rng = np.random.default_rng(1)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    items = [(f"s{i}", "".join(rng.choice(letters, size=int(n)))) for i, n in enumerate(rng.integers(1, 90, 120))]
    items += [("again", items[3][1])]
    path = write_fasta(tmp_path / "in.fasta", items)
    records = read_sequences(path)
    unique = {}
    for rec in records:
        unique.setdefault(rec.key, classify(rec.key, rec.sequence, max_length, policy))
    before = plan_work(unique.values(), 128, 2, max_length, 10)
    with SpilledSequences(tmp_path) as spill:
        index, spans = index_input(path, spill)
        planned = classify_spilled(spans, max_length, policy)
        after = plan_work(planned.values(), 128, 2, max_length, 10)
        assert [[(e.key, e.status, e.n_residues) for e in i.entries] for i in after] == \
               [[(e.key, e.status, e.n_residues) for e in i.entries] for i in before]
        assert [i.windows for i in after] == [i.windows for i in before]
        from embedcache.extract import load_item

        assert [load_item(i, spill).entries for i in after] == [i.entries for i in before]
    assert [(r.id, r.header, r.key) for r in index] == [(r.id, r.header, r.key) for r in records]


def test_extraction_from_a_gzip_stdin_equals_extraction_from_the_file(tmp_path, tiny_weights, monkeypatch):
    import io
    import sys

    path = write_fasta(tmp_path / "in.fasta", SEQUENCES)
    extract(path, tmp_path / "file.h5", ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    monkeypatch.setattr(sequences, "_stdin_data", None)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(path.read_bytes()))))
    extract("-", tmp_path / "stdin.h5", ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    assert_same_cache(tmp_path / "file.h5", tmp_path / "stdin.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.h5", "in.fasta", "stdin.h5"]
    with EmbeddingCache(tmp_path / "stdin.h5") as cache:
        assert sorted(cache.ids) == sorted(SEQUENCES)
