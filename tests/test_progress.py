"""Progress and logs: results alone on stdout, everything else in the run's run.log and on stderr."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from heads.cli import main as heads_main
from heads.folds import homology_folds
from heads.progress import RUN_LOG, TOOL_LOGGER, RunLog, ToolOutput, run_tool
from heads.rundir import RunDirectory

from test_heads import planted_cache

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "logreg.Cs=[0.1,1.0]", "--bootstrap", "100"]
needs_mmseqs = pytest.mark.skipif(shutil.which("mmseqs") is None,
                                  reason="MMseqs2 not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted_progress")
    csv, cache = planted_cache(tmp, tiny_weights, n_per_class=12)
    return csv, cache


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _cv_args(csv, cache, out, *extra) -> list[str]:
    return ["cv", "--head", "logreg", "--cache", str(cache), "--data", str(csv), "--k", "3", "--out", str(out),
            *FAST, *extra]


def _starts(log: str) -> list[str]:
    return [line.split(" ")[2] for line in log.splitlines() if line.startswith("===== run ")]


@needs_mmseqs
def test_a_homology_run_prints_only_results_on_stdout_and_graphpart_goes_to_run_log(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    # A real process: MMseqs2 writes to file descriptor 1, which no in-process capture sees.
    done = subprocess.run([sys.executable, "-m", "heads", *_cv_args(csv, cache, out, "--folds", "homology")],
                          env=_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["method", "n", "accuracy", "macro_f1", "mcc"]
    assert lines[1].split()[0] == "logreg"
    assert lines[2:] == ["", f"run written to {out} (report: {out / 'report.html'})"], done.stdout
    for noise in ("MMseqs", "createdb", "alignments", "Initializing", "samples"):
        assert noise not in done.stdout + done.stderr
    log = (out / RUN_LOG).read_text()
    assert _starts(log) == ["started"]
    for expected in ("createdb", "Calculation of alignments", "Currently have this many samples",  # the tools
                     "homology partitioning of 36 sequences", "GraphPart (mmseqs2, identity 0.30)",
                     "logreg: split 1/3", "ETA", "logreg: split 3/3", "run written to"):
        assert expected in log, expected
    assert f"DEBUG {TOOL_LOGGER}.graphpart: createdb" in log
    assert "split 1/3" in done.stderr and "createdb" not in done.stderr  # progress on stderr, tool output not


@needs_mmseqs
def test_homology_folds_outside_a_run_log_graphpart_at_debug_and_print_nothing(capfd, caplog):
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=80)) for _ in range(12)]
    with caplog.at_level(logging.DEBUG):
        part = homology_folds([f"p{i}" for i in range(12)], seqs, np.arange(12) % 2, k=3, threads=1)
    assert len(part.folds) == 12
    captured = capfd.readouterr()  # file descriptors 1 and 2: also what MMseqs2 would print
    assert captured.out == "" and "createdb" not in captured.err
    tool = [r for r in caplog.records if r.name.startswith(TOOL_LOGGER)]
    assert tool and all(r.levelno == logging.DEBUG for r in tool)
    assert any("createdb" in r.getMessage() for r in tool)


def test_a_failing_tool_is_an_error_quoting_its_last_output(tmp_path):
    output = ToolOutput(logging.getLogger(TOOL_LOGGER + ".test"), lambda line: None)
    code = "import sys; print('reading input'); print('no such database', file=sys.stderr); sys.exit(3)"
    with pytest.raises(RuntimeError, match=r"(?s)exit status 3.*no such database"):
        run_tool([sys.executable, "-c", code], "tool", output)


HEARTBEAT_CHILD = """
import os, sys, time
print("Calculation of alignments", flush=True)
sys.stdout.write("[" + "=" * 13)  # a fifth of MMseqs2's bar, still being drawn
sys.stdout.flush()
for _ in range(6000):  # until the test has seen a heartbeat that reports the bar (at most a minute)
    if os.path.exists(sys.argv[1]):
        break
    time.sleep(0.01)
print("] done")
"""


def test_the_heartbeat_names_the_stage_and_how_far_a_bar_has_come(tmp_path, caplog):
    seen = tmp_path / "seen"

    class Release(logging.Handler):
        def emit(self, record):
            if "about 20% done" in record.getMessage():
                seen.touch()

    release = Release()
    logging.getLogger("heads.progress").addHandler(release)
    stages = {"Calculation of alignments": "aligning"}
    output = ToolOutput(logging.getLogger(TOOL_LOGGER + ".test"), stages.get)
    try:
        with caplog.at_level(logging.INFO, logger="heads.progress"):
            run_tool([sys.executable, "-c", HEARTBEAT_CHILD, str(seen)], "aligner", output, heartbeat=0.05)
    finally:
        logging.getLogger("heads.progress").removeHandler(release)
    assert seen.exists(), "no heartbeat reported the bar"
    beats = [r.getMessage() for r in caplog.records if r.name == "heads.progress"]
    assert any(b.startswith("aligner: ") and "elapsed; aligning, about 20% done, about " in b for b in beats), beats


def test_tool_output_is_logged_line_by_line_whatever_the_chunks(caplog):
    output = ToolOutput(logging.getLogger(TOOL_LOGGER + ".test"), lambda line: "b" if line.startswith("b") else None)
    with caplog.at_level(logging.DEBUG, logger=TOOL_LOGGER):
        for chunk in ["al", "pha\nbe", "ta 1%\rbeta 50%\r", "beta 100%\n\ngam", "ma"]:
            output.feed(chunk)
        assert output.describe() == "b"
        output.close()
    assert [r.getMessage() for r in caplog.records] == ["alpha", "beta 1%", "beta 50%", "beta 100%", "gamma"]


INTERRUPTED = """
import os, sys
import heads.evaluate, heads.run
real = heads.evaluate.cross_validate
def once(*args, **kwargs):
    result = real(*args, **kwargs)
    os._exit(9)  # as abrupt as kill -9
heads.run.cross_validate = once
from heads.cli import main
main(sys.argv[1:])
"""


def test_a_run_log_left_by_a_killed_run_is_appended_to_on_resume(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    args = _cv_args(csv, cache, out, "--folds", "stratified")
    killed = subprocess.run([sys.executable, "-c", INTERRUPTED, *args], env=_env(), capture_output=True, text=True,
                            check=False)
    assert killed.returncode == 9, killed.stderr
    before = (out / RUN_LOG).read_text()
    assert _starts(before) == ["started"] and "logreg: split 3/3" in before
    resumed = CliRunner().invoke(heads_main, args)
    assert resumed.exit_code == 0, resumed.output
    log = (out / RUN_LOG).read_text()
    assert log.startswith(before)
    assert _starts(log) == ["started", "resumed"]
    assert "split 1/3" not in resumed.stdout and "run written to" in resumed.stdout  # the results only


def test_a_directory_holding_only_a_run_log_is_empty_to_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_LOG).write_text("2026-01-01 00:00:00 INFO heads.run: a run killed before its config.json\n")
    with RunDirectory(out, "f" * 64) as run_dir:
        assert not run_dir.resumed
    assert (out / RUN_LOG).exists()  # its history stays
    with RunDirectory(out, "e" * 64, overwrite=True):
        pass
    assert not (out / RUN_LOG).exists()


def test_overwrite_removes_the_old_runs_log(planted, tmp_path):
    csv, cache = planted
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(heads_main, _cv_args(csv, cache, out, "--folds", "stratified")).exit_code == 0
    first = (out / RUN_LOG).read_text()
    other = _cv_args(csv, cache, out, "--folds", "stratified", "--seed", "5")
    refused = runner.invoke(heads_main, other)
    assert refused.exit_code == 1 and "holds another run" in refused.output
    assert (out / RUN_LOG).read_text() == first  # a refused run writes nothing into another run's log
    assert runner.invoke(heads_main, [*other, "--overwrite"]).exit_code == 0
    log = (out / RUN_LOG).read_text()
    assert _starts(log) == ["started"] and log.count("run written to") == 1  # the first run's lines are gone
    assert "--overwrite: deleting the run there" in log


def test_a_run_log_that_is_a_directory_or_a_link_elsewhere_is_refused_and_nothing_written_through_it(tmp_path):
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("someone else's file\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / RUN_LOG).symlink_to(victim)
    folder = tmp_path / "folder"
    (folder / RUN_LOG).mkdir(parents=True)
    for out, problem in ((linked, "is a symbolic link"), (folder, "is not a file")):
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=problem), RunLog(), RunDirectory(out, "f" * 64, overwrite=overwrite):
                logging.getLogger("heads.test").info("a line for the run's log")
    assert victim.read_text() == "someone else's file\n"
    assert (folder / RUN_LOG).is_dir() and not any((folder / RUN_LOG).iterdir())
