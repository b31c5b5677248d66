from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from embedcache import __version__
from embedcache.cli import main
from embedcache.cliutil import RESUME
from embedcache.store import EmbeddingCache

from conftest import write_fasta
from test_heads import planted_cache


def test_extract_then_info(tmp_path, fasta, tiny_weights):
    out = tmp_path / "c.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(fasta), str(out), "--weights", str(tiny_weights), "--layers", "0,-1",
                                  "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "6 IDs, 6 unique sequences; embedded 6 now" in result.output
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0 and "layers       [0, 3], dim 32, stored as float16" in info.output
    as_json = json.loads(runner.invoke(main, ["info", str(out), "--json"]).output)
    with EmbeddingCache(out) as cache:
        assert as_json["ids"] == len(cache.ids) == 6


def test_user_errors_are_messages_not_tracebacks(tmp_path, tiny_weights):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">P1\nMK-V\n")
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(bad), str(tmp_path / "o.h5"), "--weights", str(tiny_weights)])
    assert result.exit_code == 1
    assert "Error: " in result.output and "record 1 (line 1, id 'P1'): invalid character '-'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.h5").exists()
    result = runner.invoke(main, ["extract", str(bad), str(tmp_path / "o.h5")])
    assert result.exit_code == 2 and "give --model NAME or --weights PATH" in result.output
    result = runner.invoke(main, ["info", str(tmp_path / "none.h5")])
    assert result.exit_code == 1 and "no such cache file" in result.output


def test_tiny_model_and_models_commands(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["tiny-model", str(tmp_path / "t.pt"), "--layers", "1", "--dim", "16", "--heads", "2"])
    assert result.exit_code == 0 and (tmp_path / "t.pt").exists()
    listing = runner.invoke(main, ["models"]).output
    assert "esm2_t33_650M_UR50D" in listing and "TORCH_HOME" in listing


# -- interruption at start-up ----------------------------------------------------------------

def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _start_then_signal(command: list[str], sig: int, delay: float) -> tuple[int, str, str]:
    """Start a CLI, signal it ``delay`` seconds after its handlers are set, and wait for it to end.

    Waiting for the handlers (SIGTERM's is set last) instead of a fixed time from the start makes
    the signal land in the CLI's imports and option parsing on a slow machine as on a fast one.
    """
    proc = subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120  # only against hanging forever
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(), err.decode()


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock")]


def _assert_interrupted(sig: int, delay: float, rc: int, stdout: str, stderr: str) -> str:
    assert rc == (130 if sig == signal.SIGINT else 143), (rc, stdout, stderr)
    assert "Traceback" not in stderr + stdout and "Aborted" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    # Signalled as soon as the handlers are set, the CLI is still parsing options or importing
    # torch (seconds): no work has started. A second later it may have started on a fast machine.
    assert last in (("interrupted",) if delay == 0 else ("interrupted", RESUME)), stderr
    return last


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
EARLY = [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0), (signal.SIGINT, 1.0), (signal.SIGTERM, 1.0)]


@needs_proc
@pytest.mark.parametrize("sig,delay", EARLY)
def test_extract_interrupted_while_starting_exits_quietly_leaving_nothing(tmp_path, tiny_weights, sig, delay):
    rng = np.random.default_rng(0)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    # Enough work that the process is still running whenever the signal comes.
    src = write_fasta(tmp_path / "in.fasta", [(f"s{i}", "".join(rng.choice(letters, size=300))) for i in range(300)])
    out = tmp_path / "c.h5"
    rc, stdout, stderr = _start_then_signal(
        ["embedcache", "extract", str(src), str(out), "--weights", str(tiny_weights), "--threads", "1",
         "--toks-per-batch", "256", "--quiet"], sig, delay)
    last = _assert_interrupted(sig, delay, rc, stdout, stderr)
    assert _leftovers(tmp_path) == []
    if last == "interrupted":  # before any work: nothing was written at all
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta"]
    else:
        assert not out.exists()


@pytest.fixture(scope="module")
def planted_run_inputs(tmp_path_factory, tiny_weights):
    tmp = tmp_path_factory.mktemp("planted")
    csv, cache = planted_cache(tmp, tiny_weights, n_per_class=20)
    return csv, cache


@needs_proc
@pytest.mark.parametrize("sig,delay", EARLY)
def test_heads_cv_interrupted_while_starting_exits_quietly_leaving_nothing(tmp_path, planted_run_inputs, sig, delay):
    csv, cache = planted_run_inputs
    out = tmp_path / "run"
    # Training that lasts (patience never runs out) keeps the process alive whenever the signal comes.
    rc, stdout, stderr = _start_then_signal(
        ["heads", "cv", "--cache", str(cache), "--data", str(csv), "--head", "attention", "--folds", "stratified",
         "--k", "3", "--out", str(out), "--set", "attention.max_epochs=100000", "--set", "attention.patience=100000",
         "--set", "attention.threads=1", "--bootstrap", "100"], sig, delay)
    last = _assert_interrupted(sig, delay, rc, stdout, stderr)
    assert _leftovers(tmp_path) == []
    if last == "interrupted":
        assert not out.exists()


def test_interruption_inside_the_work_says_resume_and_restores_the_handlers(tmp_path, fasta, tiny_weights,
                                                                            monkeypatch):
    from embedcache import extract as extract_module

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
        raise AssertionError("SIGTERM was not turned into an exception")

    monkeypatch.setattr(extract_module, "extract", interrupted)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = CliRunner().invoke(main, ["extract", str(fasta), str(tmp_path / "c.h5"), "--weights", str(tiny_weights)])
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == RESUME and "Traceback" not in result.output
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_signal_handled_inside_a_finaliser_is_not_lost(tmp_path, fasta, tiny_weights, monkeypatch):
    # h5py and torch free objects in weakref callbacks and __del__ all the time; an exception
    # raised by a signal handler there is printed and dropped by Python, and the run went on to
    # the end as if the signal had never come.
    from embedcache import extract as extract_module

    class SignalsWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    def interrupted(*args, **kwargs):
        SignalsWhenFreed()
        deadline = time.time() + 5
        while time.time() < deadline:
            time.sleep(0.01)
        raise AssertionError("the SIGTERM handled inside __del__ was lost")

    monkeypatch.setattr(extract_module, "extract", interrupted)
    hook = sys.unraisablehook
    result = CliRunner().invoke(main, ["extract", str(fasta), str(tmp_path / "c.h5"), "--weights", str(tiny_weights)])
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == RESUME
    assert sys.unraisablehook is hook


def test_interruption_before_the_work_says_only_interrupted(tmp_path, fasta, tiny_weights, monkeypatch):
    from embedcache import extract as extract_module

    def interrupted(**kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("SIGINT was not turned into an exception")

    monkeypatch.setattr(extract_module, "ExtractConfig", interrupted)
    result = CliRunner().invoke(main, ["extract", str(fasta), str(tmp_path / "c.h5"), "--weights", str(tiny_weights)])
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted", result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proteins.fasta"]


def test_starting_either_cli_imports_nothing_heavy():
    # The signal handlers are set when the click group starts; everything imported before that
    # is a moment in which Ctrl-C would print a traceback.
    heavy = "sorted({'torch', 'numpy', 'h5py', 'pandas', 'sklearn'} & set(sys.modules))"
    code = f"import sys, embedcache.cli, heads.cli, embedcache.__main__, heads.__main__; print({heavy})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
    for command in (["embedcache", "--version"], ["heads", "--version"], ["embedcache", "--help"], ["heads", "--help"]):
        code = (f"import sys\nfrom {command[0]}.cli import main\ntry:\n    main({command[1:]!r})\n"
                f"except SystemExit as end:\n    assert end.code == 0\nprint('imported', {heavy})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip().endswith("imported []"), (command, done)


def test_python_dash_m_runs_both_clis():
    for package, name in (("embedcache", "embedcache"), ("heads", "heads"), ("embedcache.cli", "embedcache"),
                          ("heads.cli", "heads")):
        done = subprocess.run([sys.executable, "-m", package, "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.strip() == f"{name}, version {__version__}", done
