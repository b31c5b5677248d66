"""Thread defaults: free cores from /proc/stat samples, OpenMP's wait policy, and --threads in every head.

Nothing here times anything: the decisions are tested on injected samples and load values.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_runs import FAST, planted, run_cli  # noqa: F401  (planted: the module's run fixture)

from embedcache import threads as th
from embedcache.extract import ExtractConfig, extract
from heads.estimators import LightGBMHead
from heads.registry import HEADS
from heads.run import RunConfig, _method_identity, build_heads


def stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat text whose CPU i spent cpus[i] = (busy, idle) ticks in user and idle time."""
    lines = [f"cpu  {sum(b for b, _ in cpus)} 0 0 {sum(i for _, i in cpus)} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0" for n, (busy, idle) in enumerate(cpus)]
    return "\n".join([*lines, "intr 12345 0 0", "ctxt 999", "btime 1700000000", ""])


def load_from(first: str, second: str, cpus=(0, 1), own=(0.0, 0.0)) -> float | None:
    texts, times = iter([first, second]), iter(own)
    return th.others_load(list(cpus), 0.1, read=lambda: next(texts), sleep=lambda s: None, own=lambda: next(times))


@pytest.fixture(autouse=True)
def _fresh_decision():
    th.forget()
    yield
    th.forget()


def test_an_idle_machine_gets_every_core():
    load = load_from(stat((100, 100), (100, 100)), stat((101, 199), (100, 200)))
    assert load == pytest.approx(0.01)
    assert th.choose_threads(2, load) == 2


def test_one_core_kept_busy_by_another_process_leaves_one_thread():
    load = load_from(stat((100, 100), (100, 100)), stat((200, 100), (102, 198)))
    assert load == pytest.approx(1.02)
    assert th.choose_threads(2, load) == 1
    assert th.decide_threads(cores=2, load=load).describe() == "2 cores, 1 busy (others use 1.0): 1 thread"


def test_a_fully_loaded_machine_still_gets_one_thread():
    load = load_from(stat((0, 0), (0, 0)), stat((100, 0), (100, 0)))
    assert load == pytest.approx(2.0)
    assert th.choose_threads(2, load) == 1


def test_this_process_own_cpu_time_is_not_counted_as_others_load():
    # Both cores busy for 0.1 s, of which this process used one core's worth itself.
    load = load_from(stat((0, 0), (0, 0)), stat((10, 0), (10, 0)), own=(5.0, 5.1))
    assert load == pytest.approx(1.0, abs=0.05)
    assert th.choose_threads(2, load) == 1


def test_only_the_cpus_this_process_may_use_are_counted():
    # CPU 1 is saturated, but this process may run only on CPU 0 (and CPU 2, idle).
    before, after = stat((0, 100), (0, 100), (0, 100)), stat((0, 200), (100, 100), (0, 200))
    assert load_from(before, after, cpus=(0, 2)) == 0.0
    assert load_from(before, after, cpus=(0, 1, 2)) == pytest.approx(1.0)


@pytest.mark.parametrize(("cores", "load", "threads"), [
    (2, 0.0, 2), (2, 0.39, 2), (2, 0.4, 1), (2, 1.3, 1), (4, 1.0, 3), (4, 2.5, 1), (8, 1.6, 6), (1, 3.0, 1),
])
def test_a_core_counts_as_busy_from_forty_percent_of_others_use(cores, load, threads):
    assert th.choose_threads(cores, load) == threads


def test_an_unreadable_proc_stat_means_unknown_load_and_every_core():
    def fail() -> str:
        raise OSError("no /proc")

    assert th.others_load([0, 1], 0.1, read=fail, sleep=lambda s: None) is None
    assert load_from("garbage\n", "cpu0 x y\n") is None
    choice = th.decide_threads(cores=3, load=None, sample=False)
    assert (choice.threads, choice.busy) == (3, None)
    assert choice.describe() == "3 cores, load unknown: 3 threads"


def test_a_cgroup_cpu_quota_limits_the_cores(tmp_path):
    assert th.cgroup_cores(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert th.cgroup_cores(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert th.cgroup_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert th.cgroup_cores(tmp_path) == 1


def test_the_decision_is_measured_once_and_logged_once(monkeypatch, caplog):
    calls = []

    def decide(**kwargs):
        calls.append(kwargs)
        return th.ThreadChoice(1, 2, 1, 1.0)

    monkeypatch.setattr(th, "decide_threads", decide)
    with caplog.at_level(logging.INFO, logger="embedcache.threads"):
        assert [th.default_threads() for _ in range(3)] == [1, 1, 1]
    assert len(calls) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "CPU threads: 2 cores, 1 busy (others use 1.0): 1 thread (--threads N to choose)"]


def test_openmp_sleeps_at_barriers_only_when_others_hold_a_core():
    busy, idle = th.ThreadChoice(1, 2, 1, 1.0), th.ThreadChoice(2, 2, 0, 0.1)
    assert th.wait_policy(busy, {}) == "PASSIVE"
    assert th.wait_policy(idle, {}) is None
    assert th.wait_policy(busy, {"OMP_WAIT_POLICY": "ACTIVE"}) is None  # the user's choice stands


PREPARE = """
import json, os, sys
from embedcache import threads as th
th.decide_threads = lambda **kw: th.ThreadChoice(1, 2, 1, 1.0)
th.prepare_openmp()
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"), "torch": "torch" in sys.modules}))
"""


def test_the_wait_policy_is_set_before_torch_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", PREPARE], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"policy": "PASSIVE", "torch": False}


def test_once_torch_is_loaded_the_environment_is_left_alone(monkeypatch):
    import torch  # noqa: F401

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(th, "decide_threads", lambda **kw: th.ThreadChoice(1, 2, 1, 1.0))
    th.prepare_openmp()
    assert "OMP_WAIT_POLICY" not in os.environ


def test_extract_uses_the_default_unless_threads_are_given(monkeypatch, fasta, tiny_weights, tmp_path, caplog):
    import torch

    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    monkeypatch.setattr(th, "decide_threads", lambda **kw: th.ThreadChoice(1, 2, 1, 1.0))
    extract(fasta, tmp_path / "a.h5", ExtractConfig(weights=str(tiny_weights)), progress=False)
    assert seen[0] == 1
    seen.clear()
    extract(fasta, tmp_path / "b.h5", ExtractConfig(weights=str(tiny_weights), threads=2), progress=False)
    assert seen[0] == 2


# -- heads ----------------------------------------------------------------------------------
def test_threads_reach_every_head_and_a_heads_own_setting_wins(tiny_weights):
    config = RunConfig(data="x.csv", heads=("logreg", "lightgbm", "attention", "finetune"), weights=str(tiny_weights),
                       threads=3, head_params={"attention": {"threads": 1}})
    heads = build_heads(config)
    assert heads["lightgbm"].n_jobs == 3
    assert heads["finetune"].threads == 3
    assert heads["attention"].threads == 1
    assert "threads" not in heads["logreg"].get_params() and HEADS["logreg"].threads_param is None


def test_lightgbm_gives_the_same_trees_with_any_thread_count():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 16)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=150) > 0).astype(int) + (X[:, 1] > 1)
    fits = [LightGBMHead(n_estimators=40, n_jobs=n).fit(X[:100], y[:100], eval_set=(X[100:], y[100:]))
            for n in (1, 2)]
    assert np.array_equal(fits[0].predict_proba(X), fits[1].predict_proba(X))


def test_only_heads_whose_numbers_depend_on_threads_carry_them_in_the_run_identity(tiny_weights):
    def identities(n):
        config = RunConfig(data="x.csv", heads=("logreg", "lightgbm", "attention"), threads=n)
        return {name: _method_identity(head) for name, head in build_heads(config).items()}

    one, two = identities(1), identities(2)
    assert one["logreg"] == two["logreg"] and one["lightgbm"] == two["lightgbm"]
    assert "n_jobs" not in one["lightgbm"]
    assert one["attention"] != two["attention"]


ATTENTION = ["--set", "attention.max_epochs=1", "--set", "attention.heads=4", "--set", "attention.hidden=8"]


def test_threads_are_recorded_and_a_resumed_run_keeps_its_count(planted, tmp_path):  # noqa: F811
    csv, cache = planted
    out = tmp_path / "run"
    args = ["compare", "--cache", cache, "--data", csv, "--heads", "lightgbm,attention", "--k", 3, "--out", out,
            *FAST, *ATTENTION, "--set", "lightgbm.n_estimators=10"]
    first = run_cli(*args, "--threads", 1)
    assert first.exit_code == 0, first.output
    config = json.loads((out / "config.json").read_text())
    assert (config["threads"], config["threads_chosen"]) == (1, "given")
    assert config["methods"]["attention"]["threads"] == 1 and "n_jobs" not in config["methods"]["lightgbm"]

    other = run_cli(*args, "--threads", 2)
    assert other.exit_code == 1
    assert "started with 1 threads" in other.output and "--threads 1" in other.output

    again = run_cli(*args)  # no --threads: the run's own count, whatever the machine's load now
    assert again.exit_code == 0, again.output
    config = json.loads((out / "config.json").read_text())
    assert (config["threads"], config["threads_chosen"]) == (1, "resumed")


def test_a_run_of_thread_independent_heads_resumes_with_any_count(planted, tmp_path):  # noqa: F811
    csv, cache = planted
    out = tmp_path / "run"
    args = ["cv", "--cache", cache, "--data", csv, "--head", "lightgbm", "--k", 3, "--out", out, *FAST,
            "--set", "lightgbm.n_estimators=10"]
    assert run_cli(*args, "--threads", 1).exit_code == 0
    metrics = (out / "metrics.json").read_bytes()
    resumed = run_cli(*args, "--threads", 2)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "config.json").read_text())["threads"] == 2
    assert (out / "metrics.json").read_bytes() == metrics
