"""Shards (extract --shard I/N) and merging them (embedcache merge): partition, provenance, refusals, damage."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedcache.batching import assign_shards, parse_shard
from embedcache.cli import main
from embedcache.extract import ExtractConfig, extract
from embedcache.layout import format_version_for
from embedcache.merge import merge_caches
from embedcache.models import build_tiny_esm2
from embedcache.store import (
    CacheDamagedError,
    CacheError,
    CacheLockedError,
    EmbeddingCache,
    WriterLock,
    parts_dir,
    verify_cache,
)

from conftest import write_fasta
from test_extract import assert_same_cache

LETTERS = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def make_input(tmp_path: Path, n: int = 30, seed: int = 3, name: str = "in.fasta") -> Path:
    """Random proteins, some longer than 150 residues, and sequences repeated under other IDs."""
    rng = np.random.default_rng(seed)
    records = [(f"s{i} protein {i}", "".join(rng.choice(LETTERS, size=int(k))))
               for i, k in enumerate(rng.integers(5, 260, n))]
    records += [(f"alias{i} same as s{i}", records[i][1]) for i in (0, 4, 9)]
    return write_fasta(tmp_path / name, records)


def config(weights, **kw) -> ExtractConfig:
    kw.setdefault("toks_per_batch", 512)
    return ExtractConfig(weights=str(weights), threads=1, **kw)


def run_shards(src: Path, out_dir: Path, weights, n: int, **kw) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out_dir / f"shard{i}.h5"
        extract(src, path, config(weights, shard=f"{i}/{n}", **kw), progress=False)
        paths.append(path)
    return paths


def contents(path: Path) -> dict:
    """What one run holds, independent of the order of IDs: IDs, headers, sequences, statuses, row order."""
    with EmbeddingCache(path) as c:
        ids, headers, keys = c.all_ids()
        return {
            "ids": sorted(zip(ids, headers, keys)), "embedded": sorted(c.ids), "skipped": sorted(c.skipped_ids),
            "rows": list(c._keys), "sequences": {i: c.sequence(i) for i in c.ids},
            "status": {i: int(c.status(i)) for i in c.ids}, "lengths": {i: c.length(i) for i in c.ids},
            "layers": c.layers,
        }


def assert_equal_up_to_rounding(a: Path, b: Path) -> float:
    """Every stored array of ``b`` within one step of the stored dtype of ``a``'s (plus 1e-5); the max difference.

    Only what ``a`` stores is compared: no residues of a pooled-only cache, no pooled vectors (means
    computed when read) of a per-residue one.
    """
    worst = 0.0
    with EmbeddingCache(a) as ca, EmbeddingCache(b) as cb:
        for layer in ca.layers:
            pairs = [(ca.per_residue(i, layer), cb.per_residue(i, layer)) for i in ca.ids] if ca.stores_residues else []
            if ca.stores_pooled:
                pairs.append((ca.pooled(ca.ids, layer), cb.pooled(ca.ids, layer)))
            for x, y in pairs:
                assert x.dtype == y.dtype and x.shape == y.shape
                step = np.spacing(np.maximum(np.abs(x), np.abs(y))).astype(np.float64)
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                assert (diff <= step + 1e-5).all(), float((diff - step).max())
                worst = max(worst, float(diff.max()))
    return worst


# -- the partition --------------------------------------------------------------------------


def test_assign_shards_is_a_balanced_partition_that_ignores_input_order():
    rng = np.random.default_rng(0)
    sizes = {hashlib.sha1(str(i).encode()).hexdigest(): int(s) for i, s in enumerate(rng.integers(0, 2000, 500))}
    for n in (1, 2, 3, 7):
        owner = assign_shards(sizes, n)
        assert owner.keys() == sizes.keys() and set(owner.values()) == set(range(n))
        shuffled = dict(sorted(sizes.items(), key=lambda kv: rng.random()))
        assert assign_shards(shuffled, n) == owner
        loads = [sum(max(sizes[k], 1) for k in sizes if owner[k] == s) for s in range(n)]
        assert max(loads) - min(loads) <= max(sizes.values())  # LPT: within one item of each other


def test_no_shard_is_empty_while_there_are_as_many_sequences_as_shards_even_of_size_zero():
    sizes = {"a": 0, "b": 0, "c": 5, "d": 0}
    assert sorted(set(assign_shards(sizes, 4).values())) == [0, 1, 2, 3]


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "1", "0/0", "1/2/3", "", "3/-4"])
def test_parse_shard_refuses_anything_but_i_of_n(text):
    with pytest.raises(ValueError, match="not of the form I/N"):
        parse_shard(text)
    assert parse_shard(" 1/4 ") == (1, 4)


def test_cli_bad_shard_value_is_a_usage_error_without_traceback(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    for bad in ("4/4", "x"):
        result = CliRunner().invoke(main, ["extract", str(src), str(tmp_path / "o.h5"), "--weights",
                                           str(tiny_weights), "--shard", bad])
        assert result.exit_code == 2 and "Invalid value for '--shard'" in result.output, result.output
        assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["extract", str(src), str(tmp_path / "o.h5"), "--weights", str(tiny_weights),
                                       "--shard", "0/40"])
    message = "holds 30 unique sequences, so 40 shards would leave some empty; use at most 30 shards"
    assert result.exit_code == 1 and message in result.output, result.output


# -- shards merged equal one run ------------------------------------------------------------


@pytest.mark.parametrize("long", ["truncate", "skip", "chunk"])
def test_merged_shards_hold_what_one_unsharded_run_holds(tmp_path, tiny_weights, long):
    src = make_input(tmp_path)
    kw = {"long": long, "max_length": 150, "chunk_overlap": 40, "layers": (0, -1)}
    whole = tmp_path / "whole.h5"
    extract(src, whole, config(tiny_weights, **kw), progress=False)
    shards = run_shards(src, tmp_path / "shards", tiny_weights, 3, **kw)
    summary = merge_caches(shards, tmp_path / "merged.h5")
    assert summary.shards == "3 of 3" and summary.missing_shards == [] and summary.duplicates == 0
    assert contents(tmp_path / "merged.h5") == contents(whole)
    worst = assert_equal_up_to_rounding(whole, tmp_path / "merged.h5")
    assert worst < 1e-2
    print(f"{long}: max abs difference merged vs unsharded {worst:.2e}")
    with EmbeddingCache(tmp_path / "merged.h5") as c:
        assert "shard" not in c.attrs and json.loads(c.attrs["config"])["shard"] is None
        assert [m["shard"] for m in json.loads(c.attrs["merged_from"])] == ["0/3", "1/3", "2/3"]
        assert json.loads(c.attrs["input"])["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # IDs that share a sequence sit in the same shard; skipped IDs travel with their sequence.
    by_shard = [contents(p) for p in shards]
    for ident in ("s0", "alias0"):
        assert sum(ident in {i for i, _, _ in c["ids"]} for c in by_shard) == 1
    assert [i for c in by_shard for i, _, _ in c["ids"] if i in ("s0", "alias0")] == ["alias0", "s0"]
    if long == "skip":
        assert sum(len(c["skipped"]) for c in by_shard) == len(contents(whole)["skipped"]) > 0


def test_shard_provenance_names_the_shard_the_input_and_its_columns(tmp_path, tiny_weights):
    table = tmp_path / "in.csv"
    table.write_text("Entry,Residues,Other\nA1,MKTAYIAKQR,x\nA2,MVLSPADKTNVKAAW,y\nA3,MKV,z\n")
    out = tmp_path / "s.h5"
    extract(table, out, config(tiny_weights, shard="1/2"), id_col="Entry", seq_col="Residues", progress=False)
    with EmbeddingCache(out) as c:
        assert c.attrs["shard"] == "1/2"
        identity = json.loads(c.attrs["input"])
    assert identity["sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()
    assert (identity["id_col"], identity["seq_col"], identity["records"], identity["sequences"]) == (
        "Entry", "Residues", 3, 3)
    assert identity["path"] == str(table.resolve())



def test_a_shard_of_a_fifo_reads_it_once_and_is_the_same_shard_as_one_of_the_file(tmp_path, tiny_weights, monkeypatch):
    import threading

    from embedcache import merge

    src = make_input(tmp_path, n=10)
    from_file = tmp_path / "file.h5"
    extract(src, from_file, config(tiny_weights, shard="0/2"), progress=False)
    real_sha256 = merge.file_sha256

    def sha256_of_regular_files(path):
        # Opened again, a named FIFO waits for a writer that never comes.
        assert Path(path).is_file(), f"{path} opened a second time"
        return real_sha256(path)

    monkeypatch.setattr(merge, "file_sha256", sha256_of_regular_files)
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as handle:
            handle.write(src.read_bytes())

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    from_fifo = tmp_path / "fifo.h5"
    extract(fifo, from_fifo, config(tiny_weights, shard="0/2"), progress=False)
    writer.join(10)
    with EmbeddingCache(from_file) as a, EmbeddingCache(from_fifo) as b:
        file_identity, fifo_identity = json.loads(a.attrs["input"]), json.loads(b.attrs["input"])
    assert fifo_identity["sha256"] is None and file_identity["sha256"] is not None
    assert fifo_identity["records_sha256"] == file_identity["records_sha256"]
    assert contents(from_fifo) == contents(from_file)

def test_a_shard_rerun_finds_everything_there_and_another_shard_or_whole_run_is_refused(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    out = tmp_path / "s0.h5"
    extract(src, out, config(tiny_weights, shard="0/2"), progress=False)
    again = extract(src, out, config(tiny_weights, shard="0/2"), progress=False)
    assert again.embedded == 0 and not again.written
    for other in ("1/2", "0/3", None):
        with pytest.raises(CacheError, match="Write each shard to a file of its own"):
            extract(src, out, config(tiny_weights, shard=other), progress=False)
    whole = tmp_path / "whole.h5"
    extract(src, whole, config(tiny_weights), progress=False)
    with pytest.raises(CacheError, match="holds a whole input"):
        extract(src, whole, config(tiny_weights, shard="0/2"), progress=False)


def test_a_second_writer_on_the_same_shard_is_refused(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    out = tmp_path / "s0.h5"
    with WriterLock(out), pytest.raises(CacheLockedError, match="another embedcache process"):
        extract(src, out, config(tiny_weights, shard="0/2"), progress=False)


# -- merge refusals -------------------------------------------------------------------------


@pytest.fixture
def two_shards(tmp_path, tiny_weights) -> tuple[Path, list[Path]]:
    src = make_input(tmp_path)
    return src, run_shards(src, tmp_path / "shards", tiny_weights, 2)


def _refused(inputs, output, match, **kw) -> None:
    with pytest.raises(CacheError, match=match):
        merge_caches(inputs, output, **kw)
    assert not Path(output).exists()
    leftovers = [p.name for p in Path(output).parent.iterdir() if p.name.endswith((".tmp", ".lock", ".merging"))]
    assert leftovers == []


def test_merge_refuses_a_shard_of_another_model_or_dtype(tmp_path, tiny_weights, two_shards):
    src, (s0, _) = two_shards
    other = build_tiny_esm2(tmp_path / "other.pt", num_layers=3, embed_dim=32, attention_heads=4, seed=9)
    s1_other = run_shards(src, tmp_path / "other", other, 2)[1]
    _refused([s0, s1_other], tmp_path / "m.h5", r"different settings \(weights_sha256: ")
    s1_fp32 = tmp_path / "fp32.h5"
    extract(src, s1_fp32, config(tiny_weights, shard="1/2", dtype="float32"), progress=False)
    _refused([s0, s1_fp32], tmp_path / "m.h5", "dtype: 'float16' in .*shard0.h5, 'float32' in .*fp32.h5")


def test_merge_refuses_shards_of_another_input_or_count(tmp_path, tiny_weights, two_shards):
    src, (s0, s1) = two_shards
    changed = make_input(tmp_path, seed=4, name="changed.fasta")
    s1_changed = run_shards(changed, tmp_path / "changed", tiny_weights, 2)[1]
    _refused([s0, s1_changed], tmp_path / "m.h5", "shards of different inputs: .*in.fasta.*changed.fasta")
    s1_of_3 = run_shards(src, tmp_path / "three", tiny_weights, 3)[1]
    _refused([s0, s1_of_3], tmp_path / "m.h5", "different shard counts: .* 0/2, .* 1/3")
    whole = tmp_path / "whole.h5"
    extract(src, whole, config(tiny_weights), progress=False)
    _refused([s0, whole], tmp_path / "m.h5", "cannot merge shards with a whole cache")


def test_an_incomplete_set_is_refused_naming_the_missing_unless_partial(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    s = run_shards(src, tmp_path / "shards", tiny_weights, 3)
    _refused([s[0], s[2]], tmp_path / "m.h5", r"shards 1/3 of .*in.fasta are missing \(given: 0/3, 2/3\)")
    summary = merge_caches([s[2], s[0]], tmp_path / "part.h5", partial=True)
    assert summary.missing_shards == [1] and summary.shards == "2 of 3"
    with EmbeddingCache(tmp_path / "part.h5") as c:
        assert c.attrs["shard"] == "0,2/3"
    # The partial merge and the missing shard make the whole.
    merge_caches([tmp_path / "part.h5", s[1]], tmp_path / "all.h5")
    merge_caches(s, tmp_path / "direct.h5")
    assert contents(tmp_path / "all.h5") == contents(tmp_path / "direct.h5")
    assert_equal_up_to_rounding(tmp_path / "direct.h5", tmp_path / "all.h5")



def test_a_merge_with_another_input_does_not_claim_to_hold_the_first_input_alone(tmp_path, tiny_weights, two_shards):
    src, shards = two_shards
    merge_caches(shards, tmp_path / "a.h5")
    other = write_fasta(tmp_path / "other.fasta", {"x1": "MKTAYIAKQR", "x2": "MVLSPADKTNVKAAW"})
    extract(other, tmp_path / "b.h5", config(tiny_weights), progress=False)
    merge_caches([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "ab.h5")
    with EmbeddingCache(tmp_path / "a.h5") as a, EmbeddingCache(tmp_path / "ab.h5") as ab:
        assert json.loads(a.attrs["input"])["path"] == str(src.resolve())
        assert "input" not in ab.attrs and "shard" not in ab.attrs
        assert len(json.loads(ab.attrs["merged_from"])) == 2
    # Merged with itself under another name the input stays recorded: the merge holds that input alone.
    shutil.copy(tmp_path / "a.h5", tmp_path / "a2.h5")
    merge_caches([tmp_path / "a.h5", tmp_path / "a2.h5"], tmp_path / "aa.h5")
    with EmbeddingCache(tmp_path / "aa.h5") as aa:
        assert json.loads(aa.attrs["input"])["path"] == str(src.resolve())

def test_merge_refuses_an_output_that_is_an_input_by_real_path_or_exists(tmp_path, two_shards):
    _, (s0, s1) = two_shards
    link = tmp_path / "link.h5"
    link.symlink_to(s1)
    before = s1.read_bytes()
    _refused_existing = pytest.raises(CacheError, match="is also an input")
    with _refused_existing:
        merge_caches([s0, s1], link)
    with pytest.raises(ValueError, match="given twice"):
        merge_caches([s0, s1, link], tmp_path / "m.h5")
    other = tmp_path / "existing.h5"
    shutil.copy(s0, other)
    with pytest.raises(CacheError, match="exists; merge into a new file"):
        merge_caches([s0, s1], other)
    assert s1.read_bytes() == before and other.read_bytes() == s0.read_bytes()


def test_merge_removes_duplicates_and_unites_ids_of_overlapping_caches(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    lines = src.read_text().splitlines()
    a = write_fasta(tmp_path / "a.fasta", [(lines[i][1:], lines[i + 1]) for i in range(0, 30, 2)])
    b = write_fasta(tmp_path / "b.fasta", [(lines[i][1:], lines[i + 1]) for i in range(20, len(lines), 2)])
    for name, path in (("a", a), ("b", b), ("whole", src)):
        extract(path, tmp_path / f"{name}.h5", config(tiny_weights), progress=False)
    summary = merge_caches([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5")
    assert summary.duplicates == 8 and summary.shards is None  # s10-s14, and alias0/4/9 of s0/4/9
    assert contents(tmp_path / "m.h5") == contents(tmp_path / "whole.h5")
    with EmbeddingCache(tmp_path / "m.h5") as m, EmbeddingCache(tmp_path / "a.h5") as ca:
        for ident in ca.ids:  # a sequence in both inputs comes from the first
            assert m.per_residue(ident).tobytes() == ca.per_residue(ident).tobytes()


def test_one_id_with_two_sequences_is_refused_naming_both_files(tmp_path, tiny_weights):
    one = write_fasta(tmp_path / "one.fasta", {"P1": "MKTAYIAKQR", "P2": "MVLSPADK"})
    two = write_fasta(tmp_path / "two.fasta", {"P1": "MKTAYIAKQW", "P3": "MKV"})
    for path in (one, two):
        extract(path, path.with_suffix(".h5"), config(tiny_weights), progress=False)
    _refused([one.with_suffix(".h5"), two.with_suffix(".h5")], tmp_path / "m.h5",
             "ID 'P1' has different sequences in .*one.h5 .* and .*two.h5")


def test_merge_refuses_an_unfinished_or_locked_input(tmp_path, tiny_weights, two_shards):
    _, (s0, s1) = two_shards
    with WriterLock(s1):
        _refused([s0, s1], tmp_path / "m.h5", "being written now by process")
    parts_dir(s1).mkdir()
    _refused([s0, s1], tmp_path / "m.h5", "an interrupted run left parts beside it")
    parts_dir(s1).rmdir()
    s1.unlink()
    _refused([s0, s1], tmp_path / "m.h5", "no such cache file")


# -- damage, old formats, full disks, kills ---------------------------------------------------


def test_a_damaged_input_is_refused_naming_it_and_nothing_is_written(tmp_path, two_shards):
    _, (s0, s1) = two_shards
    with h5py.File(s1, "r") as f:
        layer = int(np.atleast_1d(f.attrs["layers"])[-1])
        offset = f[f"L{layer}/per_residue"].id.get_offset()
    data = bytearray(s1.read_bytes())
    data[offset + 100] ^= 0xFF  # one residue value of the first protein
    s1.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match=f"{s1}: L{layer}/per_residue rows of .* do not match their checksum"):
        merge_caches([s0, s1], tmp_path / "m.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "shards"]
    # Damage in a table is found when the input is opened.
    data = bytearray(s0.read_bytes())
    with h5py.File(s0, "r") as f:
        offset = f["ids/index"].id.get_offset()
    data[offset] ^= 0x01
    s0.write_bytes(bytes(data))
    with pytest.raises(CacheDamagedError, match=str(s0)):
        merge_caches([s0, s1], tmp_path / "m.h5")


def test_format_version_1_inputs_are_merged_into_a_checked_file(tmp_path, two_shards):
    from test_store import make_version_1

    _, (s0, s1) = two_shards
    merge_caches([s0, s1], tmp_path / "new.h5")
    make_version_1(s1)
    with EmbeddingCache(s1) as c:
        assert c.format_version == 1
    merge_caches([s0, s1], tmp_path / "from_v1.h5")
    assert verify_cache(tmp_path / "from_v1.h5").ok
    with EmbeddingCache(tmp_path / "from_v1.h5") as c:
        assert c.has_checksums
    with h5py.File(tmp_path / "new.h5") as a, h5py.File(tmp_path / "from_v1.h5") as b:
        for name in ("sequences/key", "ids/id", "L3/per_residue", "L3/per_residue_checksum", "L3/pooled"):
            assert np.array_equal(a[name][()], b[name][()]), name


def test_a_stale_staging_file_of_a_killed_merge_is_replaced(tmp_path, two_shards):
    _, shards = two_shards
    staged = tmp_path / "m.h5.merging"
    staged.write_bytes(b"half a file")
    merge_caches(shards, tmp_path / "m.h5")
    assert not staged.exists() and verify_cache(tmp_path / "m.h5").ok


def _cli(args, limit: int | None = None) -> subprocess.Popen:
    def child():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death past the limit
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.Popen([sys.executable, "-m", "embedcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=child, restore_signals=False)


def test_a_full_disk_during_merge_writes_nothing_and_the_same_command_then_works(tmp_path, two_shards):
    _, shards = two_shards
    out = tmp_path / "m.h5"
    for limit in (4_000, sum(p.stat().st_size for p in shards) // 2):
        proc = _cli(["merge", *map(str, shards), str(out)], limit=limit)
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 1, output
        assert "Error: " in output and "the disk is full" in output and "Traceback" not in output, output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "shards"], output
    result = CliRunner().invoke(main, ["merge", *map(str, shards), str(out)])
    assert result.exit_code == 0 and "shards: 2 of 2" in result.output, result.output
    assert verify_cache(out).ok


@pytest.mark.slow
def test_kill_9_of_a_shard_run_then_resume_gives_the_uninterrupted_shard(tmp_path, tiny_weights):
    rng = np.random.default_rng(7)
    records = [(f"s{i}", "".join(rng.choice(LETTERS, size=int(n)))) for i, n in enumerate(rng.integers(20, 400, 300))]
    src = write_fasta(tmp_path / "many.fasta", records)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256", "--shard", "1/2", "--quiet"]
    reference, resumed = tmp_path / "reference.h5", tmp_path / "resumed.h5"
    assert _cli(["extract", str(src), str(reference), *args]).wait(timeout=300) == 0
    proc = _cli(["extract", str(src), str(resumed), *args])
    deadline = time.time() + 120
    while not (parts_dir(resumed).exists() and len(list(parts_dir(resumed).glob("part-*.h5"))) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not resumed.exists()
    final = _cli(["extract", str(src), str(resumed), *args])
    output = final.communicate(timeout=300)[0].decode()
    assert final.returncode == 0 and "were already there" in output, output
    assert_same_cache(reference, resumed)


def test_a_complete_set_of_shards_must_hold_as_many_ids_as_their_input_had(tmp_path, two_shards):
    from embedcache.layout import attrs_digest

    _, shards = two_shards
    for path in shards:
        with h5py.File(path, "r+") as f:
            identity = json.loads(f.attrs["input"])
            identity["records"] += 1
            f.attrs["input"] = json.dumps(identity, sort_keys=True)
            f.attrs["attrs_checksum"] = attrs_digest(f.attrs)
    with pytest.raises(CacheDamagedError, match=r"the shards hold 33 IDs of 30 sequences, but their input .* has 34 "):
        merge_caches(shards, tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_info_names_a_shard_and_its_input_and_a_merge_its_inputs(tmp_path, two_shards):
    src, shards = two_shards
    result = CliRunner().invoke(main, ["info", str(shards[1])])
    assert f"shard        1/2 of {src.resolve()} (sha256 {hashlib.sha256(src.read_bytes()).hexdigest()})" in (
        result.output), result.output
    merged = tmp_path / "m.h5"
    result = CliRunner().invoke(main, ["merge", *map(str, shards), str(merged)])
    assert result.exit_code == 0 and "33 IDs, 30 unique sequences from 2 caches" in result.output, result.output
    result = CliRunner().invoke(main, ["info", str(merged)])
    assert f"merged from  {shards[0]}, {shards[1]}" in result.output and "shard    " not in result.output


def test_a_second_merge_into_the_same_output_is_refused_and_a_new_folder_is_made(tmp_path, two_shards):
    _, shards = two_shards
    out = tmp_path / "m.h5"
    with WriterLock(out), pytest.raises(CacheLockedError, match="another embedcache process"):
        merge_caches(shards, out)
    assert not out.exists()
    nested = tmp_path / "new" / "folder" / "m.h5"
    merge_caches(shards, nested)
    assert verify_cache(nested).ok


def _datasets(path: Path) -> dict[str, tuple]:
    found: dict[str, tuple] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.update({name: obj.shape}) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.parametrize("store", ["pooled", "per-residue", "both"])
def test_merged_shards_keep_the_store_and_lay_it_out_as_one_unsharded_run(tmp_path, tiny_weights, store):
    src = make_input(tmp_path)
    kw = {"store": store, "long": "truncate", "max_length": 150, "layers": (0, -1)}
    whole = tmp_path / "whole.h5"
    extract(src, whole, config(tiny_weights, **kw), progress=False)
    shards = run_shards(src, tmp_path / "shards", tiny_weights, 2, **kw)
    merged = tmp_path / "merged.h5"
    summary = merge_caches(shards, merged)
    assert summary.shards == "2 of 2" and verify_cache(merged).ok
    assert contents(merged) == contents(whole)
    assert assert_equal_up_to_rounding(whole, merged) < 1e-2
    # The same datasets of the same shapes: no per-residue arrays under pooled, no pooled matrix under per-residue.
    layout = _datasets(merged)
    assert layout == _datasets(whole)
    assert any(name.endswith("/per_residue") for name in layout) == (store != "pooled")
    assert any(name.endswith("/pooled") for name in layout) == (store != "per-residue")
    with h5py.File(whole, "r") as a, h5py.File(merged, "r") as b:
        for name in ("sequences/offset", "sequences/n_residues"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert a.attrs["format_version"] == b.attrs["format_version"] == format_version_for(store)
    with EmbeddingCache(whole) as w, EmbeddingCache(merged) as m:
        assert m.store == store and m.attrs["store"] == store
        assert m.n_residues(m.ids).tolist() == w.n_residues(m.ids).tolist() and m.n_residues(m.ids).sum() > 0
        if store == "pooled":
            assert m._offsets[-1] == 0
            with pytest.raises(CacheError, match="made with --store pooled"):
                m.per_residue(m.ids[0])
        # Pooled reads work whatever is stored (under per-residue: the mean of the stored residues).
        assert np.allclose(m.pooled(m.ids, 0), w.pooled(m.ids, 0), atol=1e-2)


def test_merge_refuses_inputs_of_different_stores_naming_both_and_absent_means_both(tmp_path, tiny_weights, two_shards):
    from embedcache.layout import attrs_digest

    src, (s0, s1) = two_shards
    p0 = run_shards(src, tmp_path / "pooled", tiny_weights, 2, store="pooled")[0]
    _refused([p0, s1], tmp_path / "m.h5", f"store: 'pooled' in {p0}, 'both' in {s1}")
    r1 = tmp_path / "r1.h5"
    extract(src, r1, config(tiny_weights, shard="1/2", store="per-residue"), progress=False)
    _refused([p0, r1], tmp_path / "m.h5", f"store: 'pooled' in {p0}, 'per-residue' in {r1}")
    # A file written before the store setting existed keeps both kinds.
    with h5py.File(s1, "r+") as f:
        del f.attrs["store"]
        f.attrs["attrs_checksum"] = attrs_digest(f.attrs)
    _refused([p0, s1], tmp_path / "m.h5", f"store: 'pooled' in {p0}, 'both' in {s1}")
    merge_caches([s0, s1], tmp_path / "both.h5")
    with EmbeddingCache(tmp_path / "both.h5") as c:
        assert c.store == "both" and c.format_version == format_version_for("both")


def test_a_damaged_pooled_only_input_is_refused_naming_it_and_nothing_is_written(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    p0, p1 = run_shards(src, tmp_path / "shards", tiny_weights, 2, store="pooled")
    with h5py.File(p1, "r") as f:
        layer = int(np.atleast_1d(f.attrs["layers"])[-1])
        offset = f[f"L{layer}/pooled"].id.get_offset()
    data = bytearray(p1.read_bytes())
    data[offset + 10] ^= 0xFF  # one value of the first protein's pooled vector
    p1.write_bytes(bytes(data))
    _refused([p0, p1], tmp_path / "m.h5", f"{p1}: dataset /L{layer}/pooled does not match its checksum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "shards"]
