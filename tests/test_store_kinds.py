"""What a cache keeps (--store both|pooled|per-residue): layout, reads, checks, extension, heads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from embedcache.atomic import DiskFullError
from embedcache.backbones.esm2 import ESM2Backbone
from embedcache.cli import main as embedcache_main
from embedcache.extract import ExtractConfig, extract
from embedcache.layout import attrs_digest, parts_dir
from embedcache.models import load_esm2
from embedcache.store import CacheError, EmbeddingCache, verify_cache
from heads.cli import main as heads_main

from conftest import SEQUENCES, write_fasta
from test_extract import assert_same_cache, cache_contents
from test_heads import planted_dataset


def config(weights, **kw) -> ExtractConfig:
    return ExtractConfig(weights=str(weights), threads=1, **kw)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_weights):
    """The same proteins extracted with each --store, two layers, a truncated one among them."""
    tmp = tmp_path_factory.mktemp("stores")
    fasta = write_fasta(tmp / "proteins.fasta", SEQUENCES)
    out = {}
    for store in ("both", "pooled", "per-residue"):
        out[store] = tmp / f"{store}.h5"
        extract(fasta, out[store], config(tiny_weights, store=store, layers=(1, -1), max_length=100), progress=False)
    return out


def test_a_pooled_cache_holds_the_same_pooled_vectors_and_no_residues(caches):
    both, pooled = cache_contents(caches["both"]), cache_contents(caches["pooled"])
    assert not any("per_residue" in name for name in pooled)
    for name in ("L1/pooled", "L3/pooled", "sequences/key", "sequences/n_residues", "sequences/status", "ids/id"):
        assert pooled[name] == both[name], name
    with EmbeddingCache(caches["pooled"]) as cache, EmbeddingCache(caches["both"]) as full:
        assert cache.store == "pooled" and full.store == "both"
        assert cache.format_version == 3 and full.format_version == 2
        assert not cache._offsets.any()
        # What the pooled vector is the mean of, truncation included, is still known.
        assert cache.n_residues(cache.ids).tolist() == full.n_residues(cache.ids).tolist()
        assert max(cache.n_residues(cache.ids)) == 100
        assert cache.embed_dim == 32 and cache.info()["stored_dtype"] == "float16"
        np.testing.assert_array_equal(cache.pooled(cache.ids), full.pooled(cache.ids))
    assert verify_cache(caches["pooled"]).ok
    assert caches["pooled"].stat().st_size < caches["both"].stat().st_size


@pytest.mark.parametrize("read", ["per_residue", "per_residue_many", "iter_chunks", "iter_residue_blocks"])
def test_reading_residues_of_a_pooled_cache_names_the_file_and_the_store(caches, read):
    with EmbeddingCache(caches["pooled"]) as cache:
        calls = {
            "per_residue": lambda: cache.per_residue("P69905"),
            "per_residue_many": lambda: cache.per_residue_many(["P69905"]),
            "iter_chunks": lambda: next(cache.iter_chunks(per_residue=True)),
            "iter_residue_blocks": lambda: next(cache.iter_residue_blocks(3)),
        }
        with pytest.raises(CacheError, match="--store pooled") as err:
            calls[read]()
        assert str(caches["pooled"]) in str(err.value)


def test_a_per_residue_cache_reads_pooled_vectors_as_the_mean_of_its_residues(caches, tmp_path, tiny_weights):
    residues, both = cache_contents(caches["per-residue"]), cache_contents(caches["both"])
    assert not any(name.endswith("/pooled") for name in residues)
    assert residues["L3/per_residue"] == both["L3/per_residue"]
    assert verify_cache(caches["per-residue"]).ok
    with EmbeddingCache(caches["per-residue"]) as cache, EmbeddingCache(caches["both"]) as full:
        assert cache.store == "per-residue"
        ids = cache.ids
        pooled = cache.pooled(ids[::-1], layer=1)[::-1]  # asked in another order, computed once per row
        assert pooled.dtype == np.float16
        for ident, row in zip(ids, pooled):
            np.testing.assert_array_equal(row, cache.per_residue(ident, 1).mean(0, dtype=np.float64).astype(np.float16))
        # Within the storage rounding of the model's own pooled vector.
        np.testing.assert_allclose(pooled.astype(np.float32), full.pooled(ids, 1).astype(np.float32), atol=5e-3)
    # Stored as float32 the two agree to float precision.
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    exact = {}
    for store in ("both", "per-residue"):
        exact[store] = tmp_path / f"{store}32.h5"
        extract(fasta, exact[store], config(tiny_weights, store=store, dtype="float32"), progress=False)
    with EmbeddingCache(exact["per-residue"]) as a, EmbeddingCache(exact["both"]) as b:
        np.testing.assert_allclose(a.pooled(a.ids), b.pooled(a.ids), atol=1e-5)


def test_per_residue_store_is_refused_for_a_model_whose_pooled_vector_includes_a_start_state(tmp_path, tiny_weights):
    loaded = load_esm2(weights=tiny_weights)
    backbone = ESM2Backbone(loaded.model, loaded.alphabet, loaded.name, loaded.architecture)
    backbone.leading_states = 1  # as UniRep's: its h_avg includes the state after the start token
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="--store per-residue is not possible .* Use --store both or pooled"):
        extract(fasta, out, config(tiny_weights, store="per-residue"), backbone=backbone, progress=False)
    assert not out.exists() and not parts_dir(out).exists()
    # Pooled-only is exact for it: the pooled vector is computed as always, then kept.
    extract(fasta, out, config(tiny_weights, store="pooled"), backbone=backbone, progress=False)
    assert verify_cache(out).ok


def test_unirep_refuses_per_residue_store_and_keeps_its_pooled_vector_under_pooled(tmp_path):
    from embedcache.unirep import build_tiny_unirep

    weights = build_tiny_unirep(tmp_path / "tiny_unirep.npz", hidden=16, layers=2, seed=0)
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "c.h5"
    with pytest.raises(ValueError, match="--store per-residue is not possible with UniRep"):
        extract(fasta, out, config(weights, store="per-residue"), progress=False)
    assert not out.exists() and not parts_dir(out).exists()
    extract(fasta, tmp_path / "both.h5", config(weights), progress=False)
    extract(fasta, out, config(weights, store="pooled"), progress=False)
    with EmbeddingCache(out) as pooled, EmbeddingCache(tmp_path / "both.h5") as both:
        np.testing.assert_array_equal(pooled.pooled(both.ids), both.pooled(both.ids))


def test_an_unknown_store_is_refused():
    with pytest.raises(ValueError, match="store must be one of"):
        extract("unused.fasta", "unused.h5", ExtractConfig(store="mean"))


def test_extending_a_cache_with_another_store_is_refused_both_ways(tmp_path, tiny_weights):
    items = list(SEQUENCES.items())
    first = write_fasta(tmp_path / "first.fasta", items[:3])
    more = write_fasta(tmp_path / "more.fasta", items)
    for made, asked in (("pooled", "both"), ("both", "pooled"), ("per-residue", "pooled"), ("pooled", "per-residue")):
        out = tmp_path / f"{made}-{asked}.h5"
        extract(first, out, config(tiny_weights, store=made), progress=False)
        before = out.read_bytes()
        with pytest.raises(CacheError, match=f"store: '{made}' there, '{asked}' now\\). It keeps .*: extend it "
                                             f"with --store {made}"):
            extract(more, out, config(tiny_weights, store=asked), progress=False)
        assert out.read_bytes() == before and not parts_dir(out).exists()
        extract(more, out, config(tiny_weights, store=made), progress=False)
        with EmbeddingCache(out) as cache:
            assert cache.store == made and len(cache) == len(items)


def test_parts_of_an_interrupted_run_with_another_store_are_refused(tmp_path, tiny_weights, monkeypatch):
    from embedcache import writer

    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "c.h5"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_consolidate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(fasta, out, config(tiny_weights, store="pooled"), progress=False)
    monkeypatch.undo()
    assert list(parts_dir(out).glob("part-*.h5"))
    with pytest.raises(CacheError, match="an interrupted run.*store: 'pooled' there, 'both' now"):
        extract(fasta, out, config(tiny_weights), progress=False)
    # Without settings.json each part's own settings are checked.
    (parts_dir(out) / "settings.json").unlink()
    with pytest.raises(CacheError, match="a part of an interrupted run.*store: 'pooled' there, 'both' now"):
        extract(fasta, out, config(tiny_weights), progress=False)
    summary = extract(fasta, out, config(tiny_weights, store="pooled"), progress=False)
    assert summary.embedded == 0 and verify_cache(out).ok


def _drop_store_attribute(path: Path) -> None:
    """Make a cache look like one written before the store setting existed."""
    with h5py.File(path, "r+") as f:
        del f.attrs["store"]
        f.attrs["config"] = json.dumps({k: v for k, v in json.loads(f.attrs["config"]).items() if k != "store"})
        f.attrs["attrs_checksum"] = attrs_digest(f.attrs)


def test_a_cache_without_the_store_attribute_keeps_both_and_extends_with_the_default(tmp_path, tiny_weights):
    items = list(SEQUENCES.items())
    first = write_fasta(tmp_path / "first.fasta", items[:3])
    more = write_fasta(tmp_path / "more.fasta", items)
    out = tmp_path / "old.h5"
    extract(first, out, config(tiny_weights), progress=False)
    _drop_store_attribute(out)
    with EmbeddingCache(out) as cache:
        assert cache.store == "both" and "store" not in cache.attrs
    assert verify_cache(out).ok
    with pytest.raises(CacheError, match="store: 'both' there, 'pooled' now"):
        extract(more, out, config(tiny_weights, store="pooled"), progress=False)
    summary = extract(more, out, config(tiny_weights), progress=False)
    assert summary.embedded == len(items) - 3
    with EmbeddingCache(out) as cache:
        assert cache.store == "both" and cache.format_version == 2 and len(cache) == len(items)
    assert verify_cache(out).ok


def test_parts_left_by_a_run_before_the_store_setting_are_resumed_with_the_default(tmp_path, tiny_weights,
                                                                                  monkeypatch):
    from embedcache import writer

    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    reference, out = tmp_path / "reference.h5", tmp_path / "c.h5"
    extract(fasta, reference, config(tiny_weights), progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_consolidate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(fasta, out, config(tiny_weights), progress=False)
    monkeypatch.undo()
    settings = parts_dir(out) / "settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "store"}))
    for part in parts_dir(out).glob("part-*.h5"):
        with h5py.File(part, "r+") as f:
            own = json.loads(f.attrs["settings"])
            del own["store"]
            f.attrs["settings"] = json.dumps(own, sort_keys=True)
    summary = extract(fasta, out, config(tiny_weights), progress=False)
    assert summary.embedded == 0
    assert_same_cache(reference, out)


def test_a_pooled_cache_grown_in_two_runs_holds_the_vectors_of_one_run(tmp_path, tiny_weights):
    items = list(SEQUENCES.items())
    one = tmp_path / "one.h5"
    grown = tmp_path / "grown.h5"
    extract(write_fasta(tmp_path / "all.fasta", items), one, config(tiny_weights, store="pooled"), progress=False)
    extract(write_fasta(tmp_path / "a.fasta", items[:2]), grown, config(tiny_weights, store="pooled"), progress=False)
    extract(write_fasta(tmp_path / "b.fasta", items[2:]), grown, config(tiny_weights, store="pooled"),
            progress=False)
    assert verify_cache(grown).ok
    with EmbeddingCache(one) as a, EmbeddingCache(grown) as b:
        assert sorted(a.ids) == sorted(b.ids) and not b._offsets.any()
        np.testing.assert_allclose(a.pooled(a.ids).astype(np.float32), b.pooled(a.ids).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("damage", ["pooled value", "offset", "n_residues", "store attribute", "pooled missing",
                                    "pooled shape"])
def test_verify_finds_damage_in_a_pooled_only_cache(caches, tmp_path, damage):
    path = tmp_path / "damaged.h5"
    shutil.copy(caches["pooled"], path)
    with h5py.File(path, "r+") as f:
        if damage == "pooled value":
            data = f["L3/pooled"][:]
            data[2, 5] += 1
            f["L3/pooled"][:] = data
        elif damage == "offset":
            offsets = f["sequences/offset"][:]
            offsets[-1] = 7
            f["sequences/offset"][:] = offsets
        elif damage == "n_residues":
            counts = f["sequences/n_residues"][:]
            counts[0] += 1
            f["sequences/n_residues"][:] = counts
        elif damage == "store attribute":
            f.attrs["store"] = "both"
        elif damage == "pooled missing":
            del f["L1/pooled"]
        else:
            checksum = f["L1/pooled"].attrs["checksum"]
            data = f["L1/pooled"][:-1]
            del f["L1/pooled"]
            f.create_dataset("L1/pooled", data=data).attrs["checksum"] = checksum
    report = verify_cache(path)
    assert not report.ok and str(path) in report.problems[0]
    result = CliRunner().invoke(embedcache_main, ["verify", str(path)])
    assert result.exit_code == 1 and "problem:" in result.output


def test_info_shows_what_a_cache_keeps(caches):
    for store, words in (("pooled", "pooled vectors only"), ("both", "per-residue arrays and pooled vectors"),
                         ("per-residue", "per-residue arrays only")):
        result = CliRunner().invoke(embedcache_main, ["info", str(caches[store])])
        assert result.exit_code == 0, result.output
        assert f"  store        {store}: {words}" in result.output
        info = json.loads(CliRunner().invoke(embedcache_main, ["info", "--json", str(caches[store])]).output)
        assert info["store"] == store
        assert info["residues_stored"] == (0 if store == "pooled" else info["residues_embedded"])


def test_the_disk_estimate_counts_only_what_is_kept(tmp_path, tiny_weights, monkeypatch):
    from embedcache import extract as extract_module

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(extract_module.shutil, "disk_usage", lambda path: Usage(10**6, 10**6, 1000))
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    new = {}
    for store in ("both", "pooled", "per-residue"):
        with pytest.raises(DiskFullError) as err:
            extract(fasta, tmp_path / f"{store}.h5", config(tiny_weights, store=store), progress=False)
        new[store] = str(err.value).split("(")[1].split(" of new embeddings")[0]
    residues = sum(len(s) for s in SEQUENCES.values())
    tables = sum(100 + 2 * len(s) for s in SEQUENCES.values())
    row = 2 * 32  # float16, dim 32, one layer
    expected = {"both": (residues + len(SEQUENCES)) * row + tables + 8 * len(SEQUENCES),
                "pooled": len(SEQUENCES) * row + tables,
                "per-residue": residues * row + tables + 8 * len(SEQUENCES)}
    from embedcache.atomic import format_bytes

    assert new == {store: format_bytes(n) for store, n in expected.items()}


def test_the_cli_passes_store_and_refuses_an_unknown_one(tmp_path, tiny_weights):
    fasta = write_fasta(tmp_path / "p.fasta", SEQUENCES)
    out = tmp_path / "c.h5"
    bad = CliRunner().invoke(embedcache_main, ["extract", str(fasta), str(out), "--weights", str(tiny_weights),
                                               "--store", "mean", "-q"])
    assert bad.exit_code == 2 and "'mean' is not one of" in bad.output
    ok = CliRunner().invoke(embedcache_main, ["extract", str(fasta), str(out), "--weights", str(tiny_weights),
                                              "--store", "pooled", "--threads", "1", "-q"])
    assert ok.exit_code == 0, ok.output
    with EmbeddingCache(out) as cache:
        assert cache.store == "pooled" and json.loads(cache.attrs["config"])["store"] == "pooled"


# -- interrupted pooled runs ------------------------------------------------------------


def _many(tmp_path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(3)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    return write_fasta(tmp_path / "many.fasta",
                       [(f"s{i}", "".join(rng.choice(letters, size=int(k)))) for i, k in
                        enumerate(rng.integers(20, 300, n))])


def _cli(args):
    return subprocess.Popen([sys.executable, "-m", "embedcache", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_a_pooled_run_stopped_mid_way_then_resumed_equals_an_uninterrupted_one(tmp_path, tiny_weights, sig):
    src = _many(tmp_path)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256", "--store", "pooled",
            "--quiet"]
    reference = tmp_path / "ref" / "c.h5"
    reference.parent.mkdir()
    assert _cli(["extract", str(src), str(reference), *args]).wait(timeout=300) == 0
    out = tmp_path / "c.h5"
    proc = _cli(["extract", str(src), str(out), *args])
    deadline = time.time() + 120
    while not (parts_dir(out).exists() and len(list(parts_dir(out).glob("part-*.h5"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.01)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == (143 if sig == signal.SIGTERM else -9), output
    assert not out.exists() and list(parts_dir(out).glob("part-*.h5"))
    with h5py.File(next(parts_dir(out).glob("part-*.h5"))) as part:
        assert "L3/pooled" in part and "L3/per_residue" not in part
    resumed = _cli(["extract", str(src), str(out), *args])
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "already there" in output and not parts_dir(out).exists()
    assert_same_cache(reference, out)
    assert verify_cache(out).ok


# -- heads ---------------------------------------------------------------------------------

FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--bootstrap", "100", "--folds", "stratified", "--no-figures", "--k", "3",
        "--seed", "3"]


@pytest.fixture(scope="module")
def planted_stores(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted_stores")
    csv = planted_dataset(tmp, n_per_class=15)
    out = {}
    for store in ("both", "pooled"):
        out[store] = tmp / f"{store}.h5"
        extract(csv, out[store], ExtractConfig(weights=str(tiny_weights), threads=1, store=store), progress=False)
    return csv, out


def heads_cli(*args):
    return CliRunner().invoke(heads_main, [str(a) for a in args])


def test_pooled_heads_give_the_same_results_on_a_pooled_cache(planted_stores, tmp_path):
    csv, caches = planted_stores
    for store in ("both", "pooled"):
        result = heads_cli("compare", "--cache", caches[store], "--data", csv, "--heads", "logreg,lightgbm",
                           "--out", tmp_path / store, *FAST, "--set", "lightgbm.n_estimators=20",
                           "--set", "lightgbm.n_jobs=1")
        assert result.exit_code == 0, result.output
    assert (tmp_path / "both" / "metrics.json").read_bytes() == (tmp_path / "pooled" / "metrics.json").read_bytes()
    # A run trained on the full cache predicts from the pooled-only one, and the same.
    for store in ("both", "pooled"):
        assert heads_cli("predict", "--run", tmp_path / "both", "--cache", caches[store],
                         "--out", tmp_path / f"{store}.tsv").exit_code == 0
    assert (tmp_path / "both.tsv").read_bytes() == (tmp_path / "pooled.tsv").read_bytes()


def test_the_attention_head_refuses_a_pooled_cache_before_any_training(planted_stores, tmp_path, monkeypatch):
    import heads.run

    csv, caches = planted_stores
    trained = []
    monkeypatch.setattr(heads.run, "cross_validate", lambda *a, **k: trained.append(a) or pytest.fail("trained"))
    result = heads_cli("compare", "--cache", caches["pooled"], "--data", csv, "--heads", "logreg,attention",
                       "--out", tmp_path / "run", *FAST)
    assert result.exit_code == 1 and not trained
    assert f"{caches['pooled']}: was made with --store pooled" in result.output
    assert "head attention reads per-residue embeddings" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_predict_and_explain_with_attention_refuse_a_pooled_cache(planted_stores, tmp_path):
    csv, caches = planted_stores
    run = tmp_path / "run"
    result = heads_cli("cv", "--cache", caches["both"], "--data", csv, "--head", "attention", "--out", run, *FAST,
                       "--set", "attention.max_epochs=2", "--set", "attention.threads=1",
                       "--set", "attention.heads=4")
    assert result.exit_code == 0, result.output
    for extra in ([], ["--attention", tmp_path / "maps.h5"]):
        result = heads_cli("predict", "--run", run, "--cache", caches["pooled"], "--out", tmp_path / "p.tsv", *extra)
        assert result.exit_code == 1 and "was made with --store pooled" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "p.tsv").exists()
    result = heads_cli("explain", "--run", run, "--id", "c0_0", "--cache", caches["pooled"], "--out", tmp_path / "x")
    assert result.exit_code == 1 and "was made with --store pooled" in result.output, result.output
    # The full cache still works for both.
    assert heads_cli("predict", "--run", run, "--cache", caches["both"], "--out", tmp_path / "p.tsv").exit_code == 0


def test_cached_residues_of_a_pooled_cache_are_refused(planted_stores):
    from heads.features import CachedResidues, FeatureSource

    _, caches = planted_stores
    with EmbeddingCache(caches["pooled"]) as cache:
        source = FeatureSource.from_rows(cache, np.arange(3))
        assert source.pooled().shape == (3, 32)
        with pytest.raises(ValueError, match="--store pooled"):
            source.for_input("per_residue")
        with pytest.raises(ValueError, match="--store pooled"):
            CachedResidues(cache, np.arange(3))
