"""The store: checksums and damage, format versions, parts, symlinks, full disks and signals."""

from __future__ import annotations

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

from embedcache import atomic
from embedcache.cli import main
from embedcache.extract import ExtractConfig, extract
from embedcache.sequences import read_sequences
from embedcache.store import (
    FORMAT_VERSION,
    CacheDamagedError,
    CacheError,
    CacheLockedError,
    EmbeddingCache,
    WriterLock,
    lock_holder,
    parts_dir,
    verify_cache,
    write_arrays,
)

from conftest import SEQUENCES, write_fasta
from test_extract import assert_same_cache, cache_contents


def config(weights, **kw) -> ExtractConfig:
    return ExtractConfig(weights=str(weights), threads=1, **kw)


def synthetic_cache(tmp_path: Path, name: str = "c.h5", items=None, seed: int = 0, dim: int = 8) -> Path:
    """A small cache from random arrays, written through the real writer."""
    items = list(SEQUENCES.items()) if items is None else items
    records = read_sequences(write_fasta(tmp_path / f"{name}.fasta", items))
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((len(r.sequence), dim)).astype(np.float32) for r in records]
    return write_arrays(tmp_path / name, records, arrays, "synthetic", layer=0, batch=2)


def snapshot(path: Path) -> dict:
    """Everything the read API gives: IDs, counts, headers, sequences, every array."""
    with EmbeddingCache(path) as c:
        info = c.info()
        info.pop("path"), info.pop("file_size_bytes")
        keys = [c.key(i) for i in c.ids]
        return {
            "ids": list(c.ids), "skipped": list(c.skipped_ids), "info": info,
            "headers": [c.header(i) for i in c.ids + c.skipped_ids], "seqs": [c.sequence(i) for i in c.ids],
            "keys": keys, "status": [int(c.status(i)) for i in c.ids],
            "lengths": [c.length(i) for i in c.ids], "residues": [c.per_residue(i).tobytes() for i in c.ids],
            "many": [a.tobytes() for a in c.per_residue_many(c.ids)], "pooled": c.pooled().tobytes(),
            "by_key": c.rows(keys=keys).tolist(), "has": c.has_keys(keys).tolist(),
        }


def make_version_1(path: Path) -> None:
    """Turn a cache into what embedcache < 0.2 wrote: the same layout without checksums."""
    with h5py.File(path, "r+") as f:
        del f.attrs["attrs_checksum"]
        f.attrs["format_version"] = 1

        def strip(name, obj):
            if isinstance(obj, h5py.Dataset) and "checksum" in obj.attrs:
                del obj.attrs["checksum"]

        f.visititems(strip)
        for layer in np.atleast_1d(f.attrs["layers"]):
            del f[f"L{layer}/per_residue_checksum"]


# -- damage ------------------------------------------------------------------------------


def test_random_1kib_overwrites_give_cache_error_or_identical_data(tmp_path):
    path = synthetic_cache(tmp_path)
    reference = snapshot(path)
    original = path.read_bytes()
    rng = np.random.default_rng(2024)
    damaged = tmp_path / "damaged.h5"
    outcomes = {"error": 0, "identical": 0}
    for trial in range(150):
        offset = int(rng.integers(0, len(original) - 1024))
        data = bytearray(original)
        data[offset : offset + 1024] = rng.integers(0, 256, 1024, dtype=np.uint8).tobytes()
        damaged.write_bytes(bytes(data))
        try:
            got = snapshot(damaged)
        except CacheError as err:
            assert str(damaged) in str(err), err
            outcomes["error"] += 1
            continue
        assert got == reference, f"trial {trial}: 1 KiB at {offset} changed what is read without an error"
        outcomes["identical"] += 1
        report = verify_cache(damaged)
        if not report.ok:
            assert all(str(damaged) in p for p in report.problems)
    assert outcomes["error"] > 100, outcomes  # most damage hits something that is checked


def test_damaged_residue_rows_name_the_file_dataset_and_protein(tmp_path):
    path = synthetic_cache(tmp_path)
    with h5py.File(path, "r+") as f:
        offset = f["sequences/offset"][:]
        keys = [k.decode() for k in f["sequences/key"][:]]
        row = keys.index(f["ids/key"][list(f["ids/id"].asstr()[:]).index("insulin")].decode())
        data = f["L0/per_residue"]
        data[offset[row] + 3, 2] = data[offset[row] + 3, 2] + np.float16(1)
    with EmbeddingCache(path) as cache:
        np.testing.assert_array_equal(cache.per_residue("P69905").shape, (len(SEQUENCES["P69905"]), 8))
        with pytest.raises(CacheDamagedError, match=rf"{path}: L0/per_residue rows of 'insulin' do not match"):
            cache.per_residue("insulin")
        with pytest.raises(CacheDamagedError, match="'insulin'"):
            cache.per_residue_many(cache.ids)
    with EmbeddingCache(path, verify=False) as cache:
        assert cache.per_residue("insulin").shape == (len(SEQUENCES["insulin"]), 8)
    report = verify_cache(path)
    assert not report.ok and len(report.problems) == 1 and "'insulin'" in report.problems[0]
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1 and "problem: " in result.output and "'insulin'" in result.output


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("table", ["ids/index", "ids/key"])
def test_damaged_id_index_fails_info_and_extract_clearly(tmp_path, tiny_weights, fasta, version, table):
    out = tmp_path / "c.h5"
    extract(fasta, out, config(tiny_weights), progress=False)
    if version == 1:
        make_version_1(out)
    with h5py.File(out, "r+") as f:
        values = f[table][:]
        # The first ID now points at the second one's row, or carries the second one's key.
        values[0] = values[1]
        f[table][...] = values
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(out)])
    assert result.exit_code == 1 and "damaged" in result.output and "Traceback" not in result.output, result.output
    with pytest.raises(CacheDamagedError, match=str(out)):
        extract(fasta, out, config(tiny_weights), progress=False)
    result = runner.invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "damaged" in result.output


def test_damaged_pooled_matrix_and_tables_are_caught_when_read(tmp_path):
    path = synthetic_cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f["L0/pooled"][1, 1] = 7.0
    with EmbeddingCache(path) as cache:
        cache.per_residue(cache.ids[0])  # rows are fine
        with pytest.raises(CacheDamagedError, match="L0/pooled does not match its checksum"):
            cache.pooled()
    path = synthetic_cache(tmp_path, "h.h5")
    with h5py.File(path, "r+") as f:
        f["ids/header"][0] = "P69905 some other header"
    with pytest.raises(CacheDamagedError, match="ids/header does not match its checksum"):
        EmbeddingCache(path)
    path = synthetic_cache(tmp_path, "a.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["dtype"] = "float32"
    with pytest.raises(CacheDamagedError, match="attributes do not match their checksum"):
        EmbeddingCache(path)


def test_verify_says_ok_and_notes_files_without_checksums(tmp_path):
    path = synthetic_cache(tmp_path)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0 and result.output.strip() == "ok"
    make_version_1(path)
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0 and "no checksums: written by embedcache < 0.2" in result.output
    info = CliRunner().invoke(main, ["info", str(path)])
    assert "no checksums: written by embedcache < 0.2" in info.output


# -- format versions ---------------------------------------------------------------------


def test_version_1_file_stays_readable_and_extending_it_writes_version_2(tmp_path):
    items = list(SEQUENCES.items())
    path = synthetic_cache(tmp_path, items=items[:4])
    before = snapshot(path)
    make_version_1(path)
    old = snapshot(path)
    assert old["residues"] == before["residues"] and old["info"]["checksums"] is False
    # Extended with the same arrays for the old sequences plus two more.
    grown = synthetic_cache(tmp_path, "grown_direct.h5", items=items)
    records = read_sequences(write_fasta(tmp_path / "all.fasta", items))
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((len(r.sequence), 8)).astype(np.float32) for r in records]
    write_arrays(path, records, arrays, "synthetic", layer=0, batch=2)
    with EmbeddingCache(path) as cache:
        assert cache.format_version == 2 and cache.has_checksums
    assert verify_cache(path).ok
    new, direct = snapshot(path), snapshot(grown)
    assert new["residues"][:4] == old["residues"]
    assert sorted(new["residues"]) == sorted(direct["residues"])


def test_newer_format_version_is_refused_clearly(tmp_path):
    path = synthetic_cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheError, match="written by a newer embedcache .*upgrade"):
        EmbeddingCache(path)
    records = read_sequences(tmp_path / "c.h5.fasta")
    with pytest.raises(CacheError, match="newer embedcache"):
        write_arrays(path, records, [np.zeros((len(r.sequence), 8)) for r in records], "synthetic", layer=0)


# -- parts ---------------------------------------------------------------------------------


def _interrupted_parts(tmp_path: Path, weights, name: str, **kw) -> Path:
    """Parts of an interrupted run: every part written, the final file not."""
    from embedcache import writer

    out = tmp_path / name
    original = writer.CacheWriter.finish
    writer.CacheWriter.finish = lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(tmp_path / "proteins.fasta", out, config(weights, toks_per_batch=128, **kw), progress=False)
    finally:
        writer.CacheWriter.finish = original
    assert len(list(parts_dir(out).glob("part-*.h5"))) > 1
    return out


def test_part_from_another_model_is_refused_without_settings_json(tmp_path, fasta, tiny_weights):
    from embedcache.models import build_tiny_esm2

    other = build_tiny_esm2(tmp_path / "other.pt", num_layers=3, embed_dim=32, attention_heads=4, seed=1)
    out = _interrupted_parts(tmp_path, other, "c.h5")
    (parts_dir(out) / "settings.json").unlink()
    with pytest.raises(CacheError, match=r"part-.*\.h5 \(a part of an interrupted run\) was made with other settings "
                                         r"\(weights_sha256"):
        extract(fasta, out, config(tiny_weights), progress=False)
    # The same model's parts are taken, settings.json or not.
    reference = tmp_path / "reference.h5"
    extract(fasta, reference, config(tiny_weights, toks_per_batch=128), progress=False)
    out = _interrupted_parts(tmp_path, tiny_weights, "mine.h5")
    (parts_dir(out) / "settings.json").unlink()
    summary = extract(fasta, out, config(tiny_weights, toks_per_batch=128), progress=False)
    assert summary.embedded == 0
    assert_same_cache(reference, out)


def test_parts_directory_appears_only_with_its_settings(tmp_path, fasta, tiny_weights, monkeypatch):
    from embedcache import writer

    out = tmp_path / "c.h5"

    def no_room(path, obj, **kw):
        Path(path).with_name(Path(path).name + ".tmp").write_text("{")
        raise atomic.DiskFullError(28, f"{path}: the disk is full")

    monkeypatch.setattr(writer, "write_json", no_room)
    with pytest.raises(atomic.DiskFullError):
        extract(fasta, out, config(tiny_weights), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proteins.fasta"]  # no parts directory, no lock
    monkeypatch.undo()
    # A directory left half-made by a killed run is removed by the next one.
    (tmp_path / "c.h5.parts.tmp-abc").mkdir()
    extract(fasta, out, config(tiny_weights), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "proteins.fasta"]


def test_damaged_part_is_removed_and_its_sequences_embedded_again(tmp_path, fasta, tiny_weights):
    reference = tmp_path / "reference.h5"
    extract(fasta, reference, config(tiny_weights, toks_per_batch=128), progress=False)
    out = _interrupted_parts(tmp_path, tiny_weights, "c.h5")
    part = sorted(parts_dir(out).glob("part-*.h5"))[0]
    with h5py.File(part, "r+") as f:
        f["L3/per_residue"][0, 0] += 1
    with pytest.raises(CacheDamagedError, match=f"{part.name}: a part of this run is damaged and has been removed"):
        extract(fasta, out, config(tiny_weights, toks_per_batch=128), progress=False)
    assert not part.exists() and not out.exists()
    summary = extract(fasta, out, config(tiny_weights, toks_per_batch=128), progress=False)
    assert summary.embedded > 0
    assert_same_cache(reference, out)


# -- symlinks ------------------------------------------------------------------------------


def test_second_writer_through_a_symlink_is_refused(tmp_path, fasta, tiny_weights):
    real = tmp_path / "data" / "c.h5"
    real.parent.mkdir()
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    with WriterLock(real), pytest.raises(CacheLockedError, match="another embedcache process"):
        extract(fasta, link, config(tiny_weights), progress=False)
    assert not real.exists() and not (tmp_path / "link.h5.parts").exists()


def test_extending_through_a_symlink_updates_the_target_and_keeps_the_link(tmp_path, tiny_weights):
    items = list(SEQUENCES.items())
    real = tmp_path / "data" / "c.h5"
    real.parent.mkdir()
    extract(write_fasta(tmp_path / "small.fasta", items[:3]), real, config(tiny_weights), progress=False)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    summary = extract(write_fasta(tmp_path / "all.fasta", items), link, config(tiny_weights), progress=False)
    assert summary.embedded == len(items) - 3
    assert link.is_symlink() and os.readlink(link) == str(real)
    with EmbeddingCache(real) as cache:
        assert len(cache.ids) == len(items)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.fasta", "data", "link.h5", "small.fasta"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["c.h5"]


# -- disk space, info while writing --------------------------------------------------------


def test_disk_estimate_counts_part_overhead_in_human_units(tmp_path, fasta, tiny_weights, monkeypatch):
    from embedcache import extract as extract_module

    free = 30_000  # more than the 6 sequences' arrays (about 12 kB twice), less than with HDF5's overhead
    monkeypatch.setattr(extract_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, free))
    with pytest.raises(atomic.DiskFullError, match=r"needs about \d+\.\d kB of disk .* but 30\.0 kB are free"):
        extract(fasta, tmp_path / "c.h5", config(tiny_weights, toks_per_batch=128), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proteins.fasta"]


def test_info_on_a_cache_being_written_names_the_writer(tmp_path, fasta, tiny_weights):
    out = _interrupted_parts(tmp_path, tiny_weights, "c.h5")
    n = len(list(parts_dir(out).glob("part-*.h5")))
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(out)])
    assert f"an interrupted run left {n} parts" in result.output
    with WriterLock(out):
        assert lock_holder(out) == str(os.getpid())
        result = runner.invoke(main, ["info", str(out)])
        assert result.exit_code == 1
        assert f"being written now by process {os.getpid()} ({n} parts so far)" in result.output
    assert lock_holder(out) is None
    extract(fasta, out, config(tiny_weights, toks_per_batch=128), progress=False)
    with WriterLock(out):
        result = runner.invoke(main, ["info", str(out)])
        assert result.exit_code == 0 and f"being extended now by process {os.getpid()}" in result.output


# -- real CLI runs: full disks and signals -------------------------------------------------


def _input(tmp_path: Path, n: int = 80, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records = [(f"s{i}", "".join(rng.choice(letters, size=int(k)))) for i, k in enumerate(rng.integers(20, 300, n))]
    return write_fasta(tmp_path / "in.fasta", records)


def _cli(args, limit: int | None = None, **kw) -> subprocess.Popen:
    def child():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death past the limit
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.Popen([sys.executable, "-m", "embedcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=child, restore_signals=False, **kw)


def _assert_clean_stop(out: Path, output: str) -> None:
    assert "Traceback" not in output and "Segmentation" not in output, output
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith((".tmp", ".lock")) or ".tmp-" in p.name]
    assert leftovers == [], leftovers
    if parts_dir(out).exists():
        assert not list(parts_dir(out).glob("*.tmp"))


def test_disk_full_while_writing_parts_or_the_cache_then_resume(tmp_path, tiny_weights):
    src = _input(tmp_path, n=40)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "512", "--quiet"]
    cfg = config(tiny_weights, toks_per_batch=512)
    # The existing cache to extend holds the first 10 sequences; the reference grew the same way.
    head = write_fasta(tmp_path / "head.fasta", [(r.id, r.sequence) for r in read_sequences(src)[:10]])
    grown = tmp_path / "ref" / "grown.h5"
    for path in (head, src):
        extract(path, grown, cfg, progress=False)
    # Below any part (fails on the first part), then above every part but below the cache.
    for limit in (6_000, grown.stat().st_size // 2):
        work = tmp_path / f"limit{limit}"
        work.mkdir()
        out = work / "c.h5"
        extract(head, out, cfg, progress=False)
        before = cache_contents(out)
        proc = _cli(["extract", str(src), str(out), *args], limit=limit)
        output = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 1, output
        assert "Error: " in output and "the disk is full" in output, output
        _assert_clean_stop(out, output)
        assert cache_contents(out) == before, "the existing cache must be untouched"
        if limit > 6_000:
            assert len(list(parts_dir(out).glob("part-*.h5"))) > 1  # the parts were written, the cache was not
        extract(src, out, cfg, progress=False)
        assert not parts_dir(out).exists()
        assert_same_cache(grown, out)


def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path, tiny_weights):
    src = _input(tmp_path, n=150)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256", "--quiet"]
    reference = tmp_path / "ref" / "c.h5"
    extract(src, reference, config(tiny_weights, toks_per_batch=256), progress=False)
    out = tmp_path / "c.h5"
    proc = _cli(["extract", str(src), str(out), *args])
    deadline = time.time() + 120
    while not (parts_dir(out).exists() and len(list(parts_dir(out).glob("part-*.h5"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 143, output
    assert output.strip().splitlines()[-1] == "interrupted; run the same command again to resume", output
    _assert_clean_stop(out, output)
    assert not out.exists() and lock_holder(out) is None
    summary = extract(src, out, config(tiny_weights, toks_per_batch=256), progress=False)
    assert 0 < summary.embedded < 150
    assert_same_cache(reference, out)


@pytest.mark.slow
def test_sigterm_and_sigint_at_random_moments_then_resume_gives_identical_contents(tmp_path, tiny_weights):
    src = _input(tmp_path, n=300)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256", "--quiet"]
    reference = tmp_path / "ref" / "c.h5"
    extract(src, reference, config(tiny_weights, toks_per_batch=256), progress=False)
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(5)
    stops = 0
    for attempt in range(8):
        proc = _cli(["extract", str(src), str(out), *args])
        # Python's own imports come first (torch: seconds); a signal then ends the process
        # before it has opened anything. The moments that matter follow the first log line:
        # loading the model, the parts, the final write and the clean-up after it.
        first = proc.stdout.readline()
        if attempt == 0:  # a first stop that the speed of the machine cannot skip: while parts are written
            deadline = time.time() + 120
            while not (parts_dir(out).exists() and len(list(parts_dir(out).glob("part-*.h5"))) >= 2):
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
                time.sleep(0.01)
        else:
            time.sleep(rng.uniform(0.0, 4.0))
        if proc.poll() is not None:
            assert proc.returncode == 0
            break
        sig = signal.SIGTERM if attempt % 2 == 0 else signal.SIGINT
        proc.send_signal(sig)
        output = (first + proc.communicate(timeout=60)[0]).decode()
        if proc.returncode == 0 or "were already there" in output:  # finished before the signal came
            break
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), output
        assert "interrupted; run the same command again to resume" in output
        _assert_clean_stop(out, output)
        stops += 1
    assert stops >= 1
    assert _cli(["extract", str(src), str(out), *args]).wait(timeout=300) == 0
    assert_same_cache(reference, out)


def test_real_full_disk_on_a_small_tmpfs_then_resume(tmp_path, tiny_weights, monkeypatch):
    from embedcache import extract as extract_module

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        src = _input(tmp_path, n=40)
        cfg = config(tiny_weights, toks_per_batch=512)
        reference = tmp_path / "reference.h5"
        extract(src, reference, cfg, progress=False)
        # The up-front estimate would refuse; the disk must fill during the run.
        monkeypatch.setattr(extract_module, "_check_disk_space", lambda *args: None)
        out = mnt / "c.h5"
        # 64 kB: full while writing parts; then room for the parts but not for the cache beside them.
        for size in (64 * 1024, int(reference.stat().st_size * 1.6)):
            subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
            with pytest.raises(atomic.DiskFullError, match="the disk is full"):
                extract(src, out, cfg, progress=False)
            _assert_clean_stop(out, "")
            assert not out.exists() and lock_holder(out) is None
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
        extract(src, out, cfg, progress=False)
        assert_same_cache(reference, out)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_file_with_checksums_that_lost_its_version_is_damaged_not_version_1(tmp_path):
    """Read as version 1, every check would be off and damaged rows would come back as numbers."""
    path = synthetic_cache(tmp_path)
    for edit in ("delete", "one"):
        copy = tmp_path / f"{edit}.h5"
        shutil.copy(path, copy)
        with h5py.File(copy, "r+") as f:
            if edit == "delete":
                del f.attrs["format_version"]
            else:
                f.attrs["format_version"] = 1
        with pytest.raises(CacheDamagedError, match="carries checksums but says format version 1"):
            EmbeddingCache(copy)


def test_rows_out_of_range_are_an_index_error_never_another_protein(tmp_path):
    path = synthetic_cache(tmp_path)
    with EmbeddingCache(path) as cache:
        n = len(cache.rows(keys=[cache.key(i) for i in cache.ids]))
        for rows in ([-1], [n], [0, n + 5]):
            for read in (cache.pooled_rows, cache.per_residue_rows, cache.n_residues_rows, cache.sequences_rows):
                with pytest.raises(IndexError, match="out of range"):
                    read(rows)


def test_a_fifo_or_directory_as_cache_or_weights_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "c.h5"
    os.mkfifo(fifo)
    folder = tmp_path / "d.h5"
    folder.mkdir()
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKTAYIAK"})
    code = ("import sys; from embedcache.cli import main; sys.argv = ['embedcache', *sys.argv[1:]]; main()")
    for args, message in ((["info", fifo], "not a regular file"), (["verify", fifo], "not a regular file"),
                          (["info", folder], "is a directory"),
                          (["extract", fasta, fifo, "--weights", empty], "an empty file"),
                          (["extract", fasta, tmp_path / "o.h5", "--weights", fifo], "not a regular file")):
        done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        said = done.stdout + done.stderr
        assert done.returncode != 0 and message in said and "Traceback" not in said, (args, done)


def test_external_arrays_of_another_width_under_the_same_name_are_refused(tmp_path):
    path = synthetic_cache(tmp_path, dim=8)
    records = read_sequences(write_fasta(tmp_path / "more.fasta", {"new": "MKVLAAGI"}))
    with pytest.raises(CacheError, match="embed_dim"):
        write_arrays(path, records, [np.ones((8, 16), dtype=np.float32)], "synthetic", layer=0)
    assert not (tmp_path / "c.h5.parts").exists()


def test_an_hdf5_file_of_something_else_is_named_as_such(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    fasta = write_fasta(tmp_path / "p.fasta", {"a": "MKTAYIAK"})
    records = read_sequences(fasta)
    with pytest.raises(CacheError, match="exists and is not an embedcache file") as err:
        write_arrays(plain, records, [np.ones((8, 4), dtype=np.float32)], "synthetic", layer=0)
    assert "cannot be read as HDF5" not in str(err.value)
