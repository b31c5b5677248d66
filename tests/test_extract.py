from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from embedcache.backbone import Backbone, ESM2Backbone
from embedcache.batching import Status, chunk_windows
from embedcache.extract import ExtractConfig, extract
from embedcache.models import load_esm2
from embedcache.sequences import read_sequences, sequence_key
from embedcache.store import CacheError, CacheLockedError, EmbeddingCache, WriterLock, parts_dir

from conftest import SEQUENCES, deeplocpro_head, write_fasta

# Attributes that record when and how a file was made rather than what it holds.
CIRCUMSTANTIAL = {"created", "updated", "commands", "config", "git_sha", "weights", "attrs_checksum"}


def cache_contents(path: Path) -> dict:
    """Every dataset's bytes and every attribute but the circumstantial ones."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items() if k not in CIRCUMSTANTIAL}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj[()].tobytes() if obj.dtype.kind != "O" else list(obj[()]))

        f.visititems(visit)
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = cache_contents(a), cache_contents(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        assert ca[key] == cb[key], key


def config(weights, **kw) -> ExtractConfig:
    return ExtractConfig(weights=str(weights), threads=1, **kw)


@pytest.fixture(scope="module")
def tiny_backbone(tiny_weights):
    loaded = load_esm2(weights=tiny_weights)
    return ESM2Backbone(loaded.model, loaded.alphabet, loaded.name, loaded.architecture)


def test_per_residue_and_pooled_exclude_special_tokens(tmp_path, fasta, tiny_weights, tiny_backbone):
    out = tmp_path / "c.h5"
    summary = extract(fasta, out, config(tiny_weights, dtype="float32", layers=(0, -1)), progress=False)
    assert summary.embedded == len(SEQUENCES) and summary.records == len(SEQUENCES)
    with EmbeddingCache(out) as cache, torch.inference_mode():
        assert cache.layers == [0, 3] and sorted(cache.ids) == sorted(SEQUENCES)
        for ident, seq in SEQUENCES.items():
            full = tiny_backbone.forward(tiny_backbone.tokenize([seq]), [3])[3][0].numpy()
            residues = full[1 : len(seq) + 1]  # without BOS (0) and EOS (len+1)
            stored = cache.per_residue(ident)
            assert stored.shape == (len(seq), 32) and stored.dtype == np.float32
            np.testing.assert_allclose(stored, residues, atol=1e-5)
            pooled = cache.pooled([ident])[0]
            np.testing.assert_allclose(pooled, residues.mean(0), atol=1e-5)
            # The test can tell: averaging BOS and EOS in gives another vector.
            assert not np.allclose(pooled, full[: len(seq) + 2].mean(0), atol=1e-3)
            assert cache.per_residue(ident, layer=0).shape == (len(seq), 32)


def test_fp16_storage_is_float32_rounded(tmp_path, fasta, tiny_weights):
    a, b = tmp_path / "16.h5", tmp_path / "32.h5"
    extract(fasta, a, config(tiny_weights), progress=False)
    extract(fasta, b, config(tiny_weights, dtype="float32"), progress=False)
    with EmbeddingCache(a) as half, EmbeddingCache(b) as full:
        assert half.per_residue("P69905").dtype == np.float16
        for ident in SEQUENCES:
            np.testing.assert_array_equal(half.per_residue(ident), full.per_residue(ident).astype(np.float16))
            np.testing.assert_array_equal(half.pooled([ident]), full.pooled([ident]).astype(np.float16))


def test_duplicate_sequences_are_embedded_once(tmp_path, tiny_weights):
    path = write_fasta(tmp_path / "d.fasta", [("A1", "MKTAYIAK"), ("B2 same as A1", "mktayiak"), ("C3", "MKV")])
    out = tmp_path / "d.h5"
    summary = extract(path, out, config(tiny_weights), progress=False)
    assert (summary.records, summary.unique_sequences, summary.embedded) == (3, 2, 2)
    with EmbeddingCache(out) as cache:
        assert cache.ids == ["A1", "B2", "C3"]
        assert cache.key("A1") == cache.key("B2") == sequence_key("MKTAYIAK")
        assert cache.header("B2") == "B2 same as A1"
        assert cache.info()["unique_sequences"] == 2
        np.testing.assert_array_equal(cache.per_residue("A1"), cache.per_residue("B2"))


def test_long_sequences_truncate_chunk_skip(tmp_path, tiny_weights, tiny_backbone):
    long_seq = (SEQUENCES["P68871"] * 3)[:400]
    path = write_fasta(tmp_path / "l.fasta", {"long": long_seq, "short": "MKTAYIAK"})
    for policy in ("truncate", "chunk", "skip"):
        out = tmp_path / f"{policy}.h5"
        cfg = config(tiny_weights, long=policy, max_length=150, chunk_overlap=40, dtype="float32")
        summary = extract(path, out, cfg, progress=False)
        with EmbeddingCache(out) as cache:
            assert cache.per_residue("short").shape == (8, 32)
            if policy == "truncate":
                assert summary.truncated == 1 and cache.status("long") == Status.TRUNCATED
                assert cache.per_residue("long").shape == (150, 32) and cache.length("long") == 400
                with torch.inference_mode():
                    first = tiny_backbone.embed([long_seq[:150]], [3])[3][0].numpy()
                np.testing.assert_allclose(cache.per_residue("long"), first, atol=1e-5)
            elif policy == "chunk":
                assert summary.chunked == 1 and cache.status("long") == Status.CHUNKED
                rows = cache.per_residue("long")
                assert rows.shape == (400, 32)
                spans = chunk_windows(400, 150, 40)
                with torch.inference_mode():
                    pieces = [tiny_backbone.embed([long_seq[s:e]], [3])[3][0].numpy() for s, e in spans]
                # Each overlap is split at its middle: window w supplies residues [cut_w, cut_w+1).
                cuts = [0] + [(nxt[0] + cur[1]) // 2 for cur, nxt in zip(spans, spans[1:])] + [400]
                for (start, _), piece, lo, hi in zip(spans, pieces, cuts, cuts[1:]):
                    np.testing.assert_allclose(rows[lo:hi], piece[lo - start : hi - start], atol=1e-5)
                np.testing.assert_allclose(cache.pooled(["long"])[0], rows.mean(0), atol=1e-5)
            else:
                assert summary.skipped == 1 and cache.skipped_ids == ["long"] and cache.ids == ["short"]
                with pytest.raises(KeyError, match="skipped"):
                    cache.per_residue("long")


def test_deeplocpro_first_100_end_to_end(tmp_path, tiny_weights):
    path = deeplocpro_head(tmp_path, 100)
    records = read_sequences(path)
    out = tmp_path / "dlp.h5"
    summary = extract(path, out, config(tiny_weights, long="chunk", toks_per_batch=2048), progress=False)
    longest = max(len(r.sequence) for r in records)
    assert summary.records == 100 and summary.chunked == sum(len(r.sequence) > 1022 for r in records)
    with EmbeddingCache(out) as cache:
        assert cache.ids == [r.id for r in records]
        assert cache.header(records[0].id) == records[0].header  # e.g. 'Q8DKG6|Cytoplasmic|negative|0'
        for rec in records:
            assert cache.per_residue(rec.id).shape == (len(rec.sequence), 32)
            assert cache.sequence(rec.id) == rec.sequence
        X = cache.pooled(cache.ids)
        assert X.shape == (100, 32) and np.isfinite(X).all()
        chunks = list(cache.iter_chunks(size=30, per_residue=True))
        assert [len(c[0]) for c in chunks] == [30, 30, 30, 10]
        for ids, arrays in chunks:
            for ident, arr in zip(ids, arrays):
                np.testing.assert_array_equal(arr, cache.per_residue(ident))
        info = cache.info()
        assert info["residues_stored"] == sum(len(r.sequence) for r in records)
        assert info["provenance"]["long_policy"] == "chunk" and longest > 1022


def test_extending_with_a_larger_input_keeps_what_is_there(tmp_path, tiny_weights):
    items = list(SEQUENCES.items())
    small = write_fasta(tmp_path / "small.fasta", items[:3])
    large = write_fasta(tmp_path / "large.fasta", items)
    grown, direct = tmp_path / "grown.h5", tmp_path / "direct.h5"
    extract(small, grown, config(tiny_weights), progress=False)
    with EmbeddingCache(grown) as before:
        kept = {i: before.per_residue(i) for i in before.ids}
    summary = extract(large, grown, config(tiny_weights), progress=False)
    assert summary.already_present == 3 and summary.embedded == len(items) - 3
    extract(large, direct, config(tiny_weights), progress=False)
    with EmbeddingCache(grown) as after, EmbeddingCache(direct) as reference:
        assert after.ids == [i for i, _ in items]
        for ident, rows in kept.items():
            np.testing.assert_array_equal(after.per_residue(ident), rows)
        # The new sequences were batched without the old ones: equal up to float rounding
        # (one fp16 step), not necessarily bit for bit.
        for ident in after.ids:
            np.testing.assert_allclose(after.per_residue(ident), reference.per_residue(ident), rtol=2e-3, atol=2e-3)
        assert len(eval(after.attrs["commands"])) == 2


def test_rerun_on_same_input_writes_nothing(tmp_path, fasta, tiny_weights):
    out = tmp_path / "c.h5"
    extract(fasta, out, config(tiny_weights), progress=False)
    stamp = out.stat().st_mtime_ns
    summary = extract(fasta, out, config(tiny_weights), progress=False)
    assert summary.embedded == 0 and not summary.written and out.stat().st_mtime_ns == stamp


def test_other_settings_or_conflicting_ids_are_refused(tmp_path, fasta, tiny_weights):
    out = tmp_path / "c.h5"
    extract(fasta, out, config(tiny_weights), progress=False)
    with pytest.raises(CacheError, match="layers"):
        extract(fasta, out, config(tiny_weights, layers=(1,)), progress=False)
    with pytest.raises(CacheError, match="dtype: 'float16' there, 'float32' now"):
        extract(fasta, out, config(tiny_weights, dtype="float32"), progress=False)
    changed = write_fasta(tmp_path / "changed.fasta", {"P69905": "MKTAYIAK"})
    with pytest.raises(CacheError, match="ID 'P69905' is already in the cache with a different sequence"):
        extract(changed, out, config(tiny_weights), progress=False)
    not_ours = tmp_path / "other.h5"
    with h5py.File(not_ours, "w") as f:
        f["x"] = 1
    with pytest.raises(CacheError, match="not an embedcache file"):
        extract(fasta, not_ours, config(tiny_weights), progress=False)


def test_second_writer_is_refused(tmp_path, fasta, tiny_weights):
    out = tmp_path / "c.h5"
    locked = f"another embedcache process \\(pid {os.getpid()}\\) is writing"
    with WriterLock(out), pytest.raises(CacheLockedError, match=locked):
        extract(fasta, out, config(tiny_weights), progress=False)
    assert not out.exists()
    extract(fasta, out, config(tiny_weights), progress=False)  # the lock is gone once released


class _FakeGPU(Backbone):
    """A backbone that reports a CUDA device and runs out of memory there above ``max_tokens``
    padded tokens; moved to the CPU (as the fallback's deep copy is) it embeds anything.

    ``log`` is a class attribute so that the deep copy reports into the same list.
    """

    log: list[tuple[str, str, int]] = []  # (device type, precision, batch size) per embed call

    def __init__(self, inner, max_tokens):
        super().__init__()
        self.inner, self.max_tokens = inner, max_tokens
        for name in ("name", "architecture", "source", "sha256", "num_layers", "embed_dim", "max_residues",
                     "extra_tokens", "leading_states"):
            setattr(self, name, getattr(inner, name))
        self.device = torch.device("cuda")
        self.precision = "bf16"

    @classmethod
    def load(cls, model=None, weights=None, trust=False):
        raise NotImplementedError

    def to(self, device):
        self.device = torch.device(device)  # the wrapped model stays on the CPU, where it can run
        return self

    def embed(self, sequences, layers):
        _FakeGPU.log.append((self.device.type, self.precision, len(sequences)))
        if self.device.type == "cuda" and len(sequences) * (max(map(len, sequences)) + 2) > self.max_tokens:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.embed(sequences, layers)

    def residue_states(self, sequences, checkpoint=False):
        raise NotImplementedError

    def export(self, path):
        raise NotImplementedError


def test_out_of_memory_halves_the_budget_then_falls_back_to_cpu(tmp_path, fasta, tiny_backbone):
    from embedcache.batching import classify, plan_work
    from embedcache.extract import _Runner

    entries = [classify(sequence_key(s), s, 1022, "truncate") for s in SEQUENCES.values()]
    items = plan_work(entries, 4096, 2, 1022, 0)
    reference = [_Runner(tiny_backbone, [3], 4096).run(item) for item in items]

    _FakeGPU.log = []
    gpu = _FakeGPU(tiny_backbone, max_tokens=100)
    runner = _Runner(gpu, [3], 4096)
    results = [runner.run(item) for item in items]
    too_long = [s for s in SEQUENCES.values() if len(s) + 2 > 100]
    assert len(too_long) == 2
    assert runner.oom_retries > 0 and runner.budget < 4096
    on_gpu = [n for device, _, n in _FakeGPU.log if device == "cuda"]
    assert max(on_gpu) > 1 and 1 in on_gpu  # halved down to single sequences first
    # Each sequence that does not fit alone ran once more, on a CPU copy computing in fp32;
    # the GPU backbone itself stayed where it was.
    assert [entry for entry in _FakeGPU.log if entry[0] == "cpu"] == [("cpu", "fp32", 1)] * len(too_long)
    assert gpu.device.type == "cuda" and gpu.precision == "bf16"
    for got, want in zip(results, reference):
        for g, w in zip(got, want):
            assert g.entry == w.entry
            np.testing.assert_allclose(g.per_residue[3], w.per_residue[3], atol=1e-5)
            np.testing.assert_allclose(g.pooled[3], w.pooled[3], atol=1e-5)


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "embedcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, **kw)


def _killable_input(tmp_path: Path) -> Path:
    """Enough work items that a run lasts a few seconds with a tiny model and a small budget."""
    rng = np.random.default_rng(7)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    records = [(f"s{i}", "".join(rng.choice(letters, size=int(n)))) for i, n in enumerate(rng.integers(20, 400, 500))]
    records.append(("long", "".join(rng.choice(letters, size=2500))))
    return write_fasta(tmp_path / "many.fasta", records)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_gives_identical_contents(tmp_path, tiny_weights):
    src = _killable_input(tmp_path)
    args = ["extract", str(src), "--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256",
            "--long", "chunk", "--max-length", "300", "--quiet"]
    reference, resumed = tmp_path / "reference.h5", tmp_path / "resumed.h5"
    assert _run_cli([*args[:2], str(reference), *args[2:]]).wait(timeout=300) == 0

    parts = parts_dir(resumed)
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(8):
        proc = _run_cli([*args[:2], str(resumed), *args[2:]])
        # First kill once work is under way; later ones at random moments, which may hit a
        # part being written, the final file being written, or the clean-up after it.
        deadline = time.time() + 60
        while attempt == 0 and not (parts.exists() and len(list(parts.glob("part-*.h5"))) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
            time.sleep(0.01)
        if attempt:
            time.sleep(rng.uniform(0.5, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            assert proc.returncode == 0, proc.stdout.read().decode()
            break
    assert kills >= 1
    final = _run_cli([*args[:2], str(resumed), *args[2:]])
    output = final.communicate(timeout=300)[0].decode()
    assert final.returncode == 0, output
    assert not parts.exists()
    assert_same_cache(reference, resumed)


def test_leftovers_of_a_crash_are_recovered(tmp_path, fasta, tiny_weights):
    """The states kill -9 can leave, made by hand: each must complete to the same file."""
    reference = tmp_path / "reference.h5"
    extract(fasta, reference, config(tiny_weights), progress=False)

    # 1. Killed while writing a part: a half-written temporary part.
    out = tmp_path / "c1.h5"
    parts_dir(out).mkdir()
    (parts_dir(out) / "part-abc-3.h5.tmp").write_bytes(b"\x89HDF half written")
    extract(fasta, out, config(tiny_weights), progress=False)
    assert_same_cache(reference, out)
    assert not parts_dir(out).exists()

    # 2. Killed while writing the final file: a half-written cache.tmp beside complete parts.
    out = tmp_path / "c2.h5"
    items = list(SEQUENCES.items())
    extract(write_fasta(tmp_path / "half.fasta", items[:3]), out, config(tiny_weights), progress=False)
    before = cache_contents(out)
    from embedcache import writer as store

    def crash(*args, **kwargs):
        out.with_name(out.name + ".tmp").write_bytes(b"\x89HDF partial")
        raise KeyboardInterrupt

    original = store._consolidate
    store._consolidate = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(fasta, out, config(tiny_weights), progress=False)
    finally:
        store._consolidate = original
    assert cache_contents(out) == before, "the old file must be untouched"
    assert len(list(parts_dir(out).glob("part-*.h5"))) > 0
    summary = extract(fasta, out, config(tiny_weights), progress=False)
    assert summary.embedded == 0  # everything came from the parts
    direct = tmp_path / "c2_direct.h5"
    extract(write_fasta(tmp_path / "half.fasta", items[:3]), direct, config(tiny_weights), progress=False)
    extract(fasta, direct, config(tiny_weights), progress=False)
    assert_same_cache(direct, out)

    # 3. Killed after the new file replaced the old but before the parts were removed.
    out = tmp_path / "c3.h5"
    original_remove = store.CacheWriter._remove_parts
    store.CacheWriter._remove_parts = lambda self: None
    try:
        extract(fasta, out, config(tiny_weights), progress=False)
    finally:
        store.CacheWriter._remove_parts = original_remove
    assert parts_dir(out).exists()
    summary = extract(fasta, out, config(tiny_weights), progress=False)
    assert summary.embedded == 0 and not parts_dir(out).exists()
    assert_same_cache(reference, out)


def test_unfinished_cache_is_reported_by_the_reader(tmp_path, fasta):
    out = tmp_path / "c.h5"
    parts_dir(out).mkdir()
    (parts_dir(out) / "part-x-1.h5").write_bytes(b"")
    with pytest.raises(CacheError, match="not finished yet"):
        EmbeddingCache(out)
    with pytest.raises(CacheError, match="no such cache file"):
        EmbeddingCache(tmp_path / "absent.h5")


def test_csv_input_and_provenance(tmp_path, tiny_weights):
    path = tmp_path / "in.csv"
    path.write_text("0,Entry,Sequence,label\n0,P1,MKTAYIAK,1\n1,P2,MKV,0\n")
    out = tmp_path / "c.h5"
    extract(path, out, config(tiny_weights), progress=False, command="embedcache extract in.csv c.h5")
    with EmbeddingCache(out) as cache:
        assert cache.ids == ["P1", "P2"]
        prov = cache.info()["provenance"]
    for name in ("model", "architecture", "layers", "dtype", "precision", "long_policy", "max_length",
                 "fair_esm_version", "torch_version", "embedcache_version", "created", "commands", "weights_sha256"):
        assert name in prov, name
    assert prov["layers"] == [3] and prov["dtype"] == "float16" and prov["precision"] == "fp32"
    assert prov["max_length"] == 1022 and prov["fair_esm_version"] == "2.0.0"
    assert "embedcache extract in.csv c.h5" in prov["commands"]


def test_bf16_compute_and_fp16_storage_keep_per_protein_cosine(tmp_path, tiny_weights):
    path = deeplocpro_head(tmp_path, 30)
    exact, fast = tmp_path / "exact.h5", tmp_path / "fast.h5"
    extract(path, exact, config(tiny_weights, dtype="float32"), progress=False)
    extract(path, fast, config(tiny_weights, precision="bf16"), progress=False)
    with EmbeddingCache(exact) as a, EmbeddingCache(fast) as b:
        assert b.attrs["precision"] == "bf16"
        x, y = a.pooled().astype(np.float64), b.pooled(a.ids).astype(np.float64)
        cosine = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cosine.min() >= 0.999, cosine.min()


def test_input_whose_every_sequence_is_skipped(tmp_path, tiny_weights):
    path = write_fasta(tmp_path / "long.fasta", {"a": "MKTAYIAKQR", "b": "MKTAYIAKQRQISF"})
    out = tmp_path / "c.h5"
    summary = extract(path, out, config(tiny_weights, long="skip", max_length=5), progress=False)
    assert summary.skipped == 2 and summary.embedded == 0
    with EmbeddingCache(out) as cache:
        assert cache.ids == [] and cache.skipped_ids == ["a", "b"]
        assert cache.pooled([]).shape == (0, 32)


@pytest.mark.parametrize("bad,message", [
    ({"long": "cut"}, "long-sequence policy"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"precision": "fp8"}, "precision must be auto or one of"),
    ({"long": "chunk", "max_length": 100, "chunk_overlap": 100},
     "chunk overlap \\(100\\) must be smaller than the window \\(100\\)"),
    ({"toks_per_batch": 0}, "toks_per_batch must be a positive number"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, fasta, tiny_weights, bad, message):
    with pytest.raises(ValueError, match=message):
        extract(fasta, tmp_path / "c.h5", config(tiny_weights, **bad), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proteins.fasta"]
