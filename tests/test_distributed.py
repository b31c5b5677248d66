"""extract --executor ray: shards as Ray tasks on a local 2-CPU cluster, a worker killed mid-shard, errors."""

from __future__ import annotations

import os
import re
import sys

import pytest
from click.testing import CliRunner

from embedcache.cli import main
from embedcache.distributed import KILL_AFTER_FIRST_PART, extract_distributed
from embedcache.extract import ExtractConfig, extract
from embedcache.layout import format_version_for
from embedcache.merge import merge_caches
from embedcache.store import EmbeddingCache, verify_cache

from test_extract import cache_contents
from test_shard import assert_equal_up_to_rounding, contents, make_input, run_shards


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray instance with 2 CPUs whose workers kill the first attempt at one chosen shard."""
    ray = pytest.importorskip("ray")
    work = tmp_path_factory.mktemp("ray_run")
    doomed = work / "out.h5.shards" / "shard-1-of-2.h5"
    previous = os.environ.get(KILL_AFTER_FIRST_PART)
    os.environ[KILL_AFTER_FIRST_PART] = f"{doomed}|{work / 'killed'}"  # workers inherit the environment of ray.init
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield work
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop(KILL_AFTER_FIRST_PART, None)
        else:
            os.environ[KILL_AFTER_FIRST_PART] = previous


@pytest.mark.slow
def test_ray_run_with_a_worker_killed_mid_shard_equals_the_sharded_and_the_single_run(ray_cluster, tiny_weights):
    work = ray_cluster
    src = make_input(work, n=60)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--toks-per-batch", "256", "--layers", "0,-1"]
    out = work / "out.h5"
    result = CliRunner().invoke(main, ["extract", str(src), str(out), *args, "--executor", "ray", "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert "out.h5: 63 IDs, 60 unique sequences; embedded " in result.output, result.output
    # Shard 1's first worker died after writing a part; Ray ran it again and the rerun took the part's
    # sequences as already there.
    assert (work / "killed").exists()
    resumed = int(re.search(r"(\d+) were already there", result.output).group(1))
    assert 0 < resumed < 30, result.output
    assert not (work / "out.h5.shards").exists()
    # The same shards run one after another here give the same file.
    cfg = {"long": "truncate", "layers": (0, -1), "toks_per_batch": 256}
    local = run_shards(src, work / "local", tiny_weights, 2, **cfg)
    merge_caches(local, work / "local.h5")
    same, got = cache_contents(work / "local.h5"), cache_contents(out)
    for c in (same, got):
        c["attrs"].pop("merged_from")  # the shards' paths and file hashes
    assert same == got
    single = work / "single.h5"
    extract(src, single, ExtractConfig(weights=str(tiny_weights), threads=1, **cfg), progress=False)
    assert contents(out) == contents(single)
    assert assert_equal_up_to_rounding(single, out) < 1e-2
    (work / "out.h5.shards").mkdir()  # as a run stopped between its merge and its clean-up leaves it
    again = CliRunner().invoke(main, ["extract", str(src), str(out), *args, "--executor", "ray"])
    assert again.exit_code == 0 and "embedded 0 now" in again.output, again.output
    assert not (work / "out.h5.shards").exists()
    # A shard that fails for a reason a retry cannot fix (here a stale shard of another input in the
    # work folder) stops the run with its message.
    other = make_input(work, seed=11, name="other.fasta")
    (work / "second.h5.shards").mkdir()
    extract(other, work / "second.h5.shards" / "shard-0-of-2.h5",
            ExtractConfig(weights=str(tiny_weights), threads=1, shard="0/2", **cfg), progress=False)
    failed = CliRunner().invoke(main, ["extract", str(src), str(work / "second.h5"), *args, "--executor", "ray",
                                       "--shards", "2"])
    assert failed.exit_code == 1, failed.output
    assert "shard-0-of-2.h5 (shard 0/2): " in failed.output and "is this command's work folder" in (
        failed.output), failed.output
    assert not (work / "second.h5").exists()


@pytest.mark.slow
def test_ray_run_with_store_pooled_holds_what_one_pooled_run_holds(ray_cluster, tiny_weights):
    work = ray_cluster / "pooled"
    work.mkdir()
    src = make_input(work, n=12)
    args = ["--weights", str(tiny_weights), "--threads", "1", "--store", "pooled"]
    out = work / "out.h5"
    result = CliRunner().invoke(main, ["extract", str(src), str(out), *args, "--executor", "ray", "--shards", "2"])
    assert result.exit_code == 0, result.output
    single = work / "single.h5"
    extract(src, single, ExtractConfig(weights=str(tiny_weights), threads=1, store="pooled"), progress=False)
    assert contents(out) == contents(single)
    assert assert_equal_up_to_rounding(single, out) < 1e-2
    with EmbeddingCache(out) as c:
        assert c.store == "pooled" and c._offsets[-1] == 0 and c.format_version == format_version_for("pooled")
    assert verify_cache(out).ok and not (work / "out.h5.shards").exists()


def test_ray_not_installed_is_a_clear_error(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    src = make_input(tmp_path)
    message = r"needs Ray, which is not installed here: pip install 'embedcache\[cluster\]'"
    with pytest.raises(ValueError, match=message):
        extract_distributed(src, tmp_path / "o.h5", ExtractConfig(weights=str(tiny_weights)), shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta"]


def test_an_unreachable_address_is_a_clear_error(tmp_path, tiny_weights):
    pytest.importorskip("ray")
    src = make_input(tmp_path)
    result = CliRunner().invoke(main, ["extract", str(src), str(tmp_path / "o.h5"), "--weights", str(tiny_weights),
                                       "--executor", "ray", "--address", "127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    assert "Error: cannot reach a Ray cluster at '127.0.0.1:9'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.h5").exists() and not (tmp_path / "o.h5.shards").exists()


def test_ray_options_that_do_not_fit_are_usage_errors(tmp_path, tiny_weights):
    src = make_input(tmp_path)
    base = ["extract", str(src), str(tmp_path / "o.h5"), "--weights", str(tiny_weights)]
    cases = [
        (["--executor", "ray", "--shard", "0/2"], "with --executor ray give the number of shards with --shards"),
        (["--shards", "2"], "--address and --shards go with --executor ray"),
        (["--address", "auto"], "--address and --shards go with --executor ray"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(ValueError, match="not standard input"):
        extract_distributed("-", tmp_path / "o.h5", ExtractConfig(weights=str(tiny_weights)), shards=2)


def test_an_existing_output_of_other_settings_is_refused_not_reported_done(tmp_path, tiny_weights, monkeypatch):
    from embedcache import distributed
    from embedcache.models import build_tiny_esm2
    from embedcache.store import CacheError

    src = make_input(tmp_path, n=10)
    out = tmp_path / "out.h5"
    extract(src, out, ExtractConfig(weights=str(tiny_weights), threads=1), progress=False)
    before = out.read_bytes()

    def no_cluster():
        raise AssertionError("an existing output is judged without starting Ray")

    monkeypatch.setattr(distributed, "_import_ray", no_cluster)
    same = extract_distributed(src, out, ExtractConfig(weights=str(tiny_weights), threads=1, layers=(-1,)), shards=2)
    assert same.written is False and same.embedded == 0
    other_weights = build_tiny_esm2(tmp_path / "other.pt", num_layers=3, embed_dim=32, attention_heads=4, seed=7)
    cases = [
        ({"dtype": "float32"}, "dtype: 'float16' there, 'float32' now"),
        ({"store": "pooled"}, "store: 'both' there, 'pooled' now"),
        ({"layers": (1,)}, r"layers: \[3\] there, \[1\] now"),
        ({"max_length": 20}, "max_length: 1022 there, 20 now"),
        ({"long": "chunk", "max_length": 1022, "chunk_overlap": 100}, "long_policy: 'truncate' there, 'chunk' now"),
        ({"precision": "bf16"}, "precision: 'fp32' there, 'bf16' now"),
        ({"precision": "int8"}, "precision: 'fp32' there, 'int8' now"),
        ({"weights": str(other_weights)}, "weights sha256: "),
    ]
    for change, message in cases:
        settings = {"weights": str(tiny_weights), "threads": 1, **change}
        with pytest.raises(CacheError, match=message):
            extract_distributed(src, out, ExtractConfig(**settings), shards=2)
    assert out.read_bytes() == before


def test_a_fifo_input_is_refused_by_the_ray_executor_instead_of_hanging_the_workers(tmp_path, tiny_weights,
                                                                                   monkeypatch):
    import contextlib
    import threading

    from embedcache import distributed

    data = make_input(tmp_path, n=10).read_bytes()
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with contextlib.suppress(OSError), open(fifo, "wb") as handle:
            handle.write(data)

    def no_cluster():
        raise AssertionError("the workers would open the FIFO again and wait for ever")

    monkeypatch.setattr(distributed, "_import_ray", no_cluster)
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(ValueError, match="not a regular file .*every worker read INPUT"):
            extract_distributed(fifo, tmp_path / "o.h5", ExtractConfig(weights=str(tiny_weights)), shards=2)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets a writer still waiting for a reader finish
        writer.join(10)
    assert not (tmp_path / "o.h5").exists()
