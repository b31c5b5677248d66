"""Progress and logs of long steps: the run's log file, heartbeats of external tools, bars.

Results go to stdout, progress to stderr (log lines, and tqdm bars where stderr is a
terminal), and a run directory keeps everything in its ``run.log``: the library's records at
INFO and up, and every line GraphPart and MMseqs2 print (logged at DEBUG on
:data:`TOOL_LOGGER`, so that a library call outside a run directory shows them only to
whoever asks for DEBUG).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

# In every run directory; not part of the run (its fingerprint, manifest or the check for another run).
RUN_LOG = "run.log"
TOOL_LOGGER = "heads.tools"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
HEARTBEAT_SECONDS = 30.0

_bars = True


def set_bars(enabled: bool) -> None:
    """Allow tqdm bars (the CLI turns them off with --quiet); they show only where stderr is a terminal."""
    global _bars
    _bars = enabled


def bars_shown() -> bool:
    return _bars and sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar on stderr, drawn only where stderr is a terminal and bars are allowed."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not bars_shown(), file=sys.stderr, **kwargs)


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12.3s: elapsed times and estimates in log lines."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class _RunLogHandler(logging.Handler):
    """Keeps records in memory until the run directory is known and claimed, then appends to its log.

    Records are written (and flushed) one by one, so a killed run leaves its log up to the end.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        self.addFilter(self._wanted)
        self._pending: list[logging.LogRecord] = []
        self._stream: TextIO | None = None
        self.path: Path | None = None

    @staticmethod
    def _wanted(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or record.name == TOOL_LOGGER or record.name.startswith(TOOL_LOGGER + ".")

    def emit(self, record: logging.LogRecord) -> None:
        if self._stream is None:
            self._pending.append(record)
            return
        try:
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:
            self.handleError(record)

    def open(self, path: Path, first_line: str) -> None:
        self.acquire()
        try:
            # A log, not a result: appended to, never replaced, so atomic writes do not apply.
            # O_NOFOLLOW: never append to a file elsewhere that a link in the run directory points at.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            stream = open(fd, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 (open until close())
            stream.write(first_line + "\n")
            self._stream, self.path = stream, path
            pending, self._pending = self._pending, []
        finally:
            self.release()
        for record in pending:
            self.handle(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
            self._pending = []
        finally:
            self.release()
        super().close()


_active: list[RunLog] = []


def with_run_log(func: Callable) -> Callable:
    """Collect the log of everything ``func`` does, for the run directory it claims (see :class:`RunLog`)."""

    @functools.wraps(func)
    def logged(*args, **kwargs):
        with RunLog():
            return func(*args, **kwargs)

    return logged


def attach_run_log(directory: Path | str, resumed: bool) -> Path | None:
    """Start writing the active run log (if any) into ``directory``; the caller holds its lock."""
    return _active[-1].attach(directory, resumed) if _active else None


class RunLog:
    """The log of one run: collects records from the start, written to ``DIR/run.log`` once claimed.

    Use as a context manager around the whole run, and call :meth:`attach` once the run
    directory is locked and claimed: records from before (loading, homology partitioning)
    are written then, after a line that marks the start (or the resumed start) of this
    process's part of the log. A run refused before attaching writes nothing anywhere.
    """

    def __init__(self) -> None:
        self.handler = _RunLogHandler()
        self.started = time.time()
        self._saved: list[tuple[logging.Logger, int, bool]] = []

    def __enter__(self) -> RunLog:
        root = logging.getLogger()
        root.addHandler(self.handler)
        # The library's INFO records reach the file also where the application configured no logging.
        for name in ("heads", "embedcache"):
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        tools = logging.getLogger(TOOL_LOGGER)
        self._saved.append((tools, tools.level, tools.propagate))
        if root.getEffectiveLevel() > logging.DEBUG:
            # Tool output goes to the file only; the console shows it only with --verbose.
            tools.setLevel(logging.DEBUG)
            tools.propagate = False
            tools.addHandler(self.handler)
        _active.append(self)
        return self

    def attach(self, directory: Path | str, resumed: bool) -> Path:
        path = Path(directory) / RUN_LOG
        stamp = time.strftime(DATEFMT, time.localtime(self.started))
        what = "resumed" if resumed else "started"
        self.handler.open(path, f"===== run {what} {stamp} (pid {os.getpid()}): {shlex.join(sys.argv)}")
        return path

    def attach_file(self, path: Path | str) -> Path:
        """Start writing this log to ``path`` (appended to), for a command that makes no run directory."""
        path = Path(path)
        stamp = time.strftime(DATEFMT, time.localtime(self.started))
        self.handler.open(path, f"===== started {stamp} (pid {os.getpid()}): {shlex.join(sys.argv)}")
        return path

    def __exit__(self, *exc) -> None:
        if self in _active:
            _active.remove(self)
        logging.getLogger().removeHandler(self.handler)
        tools = logging.getLogger(TOOL_LOGGER)
        tools.removeHandler(self.handler)
        for logger, level, propagate in reversed(self._saved):
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved = []
        self.handler.close()


# -- external tools --------------------------------------------------------------------------
class ToolOutput:
    """Lines an external program prints, logged one by one; the last informative one names the stage.

    ``\\r``-redrawn progress (tqdm, MMseqs2's ``[=====`` bars) is split into pieces; the piece
    not yet ended is kept so that a heartbeat can report a bar in progress.
    """

    def __init__(self, logger: logging.Logger, stage_of: Callable[[str], str | None]):
        self.logger = logger
        self.stage_of = stage_of
        self.stage: str | None = None
        self.stage_started = time.monotonic()
        self.partial = ""
        self.tail: list[str] = []  # the last lines, for an error message
        self._lock = threading.Lock()

    def feed(self, text: str) -> None:
        with self._lock:
            pieces = re.split(r"[\r\n]", self.partial + text)
            self.partial = pieces.pop()
        for piece in pieces:
            self._line(piece)

    def close(self) -> None:
        with self._lock:
            rest, self.partial = self.partial, ""
        self._line(rest)

    def _line(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        self.logger.debug("%s", line)
        self.tail = (self.tail + [line])[-20:]
        stage = self.stage_of(line)
        if stage and stage != self.stage:
            self.stage, self.stage_started = stage, time.monotonic()

    def describe(self) -> str | None:
        """The stage, and how far its bar has come with an estimate of the time left."""
        with self._lock:
            partial = self.partial
        fraction = _bar_fraction(partial)
        if fraction is None or not self.stage:
            return self.stage
        text = f"{self.stage}, about {100 * fraction:.0f}% done"
        if fraction > 0:
            spent = time.monotonic() - self.stage_started
            text += f", about {duration(spent / fraction * (1 - fraction))} left"
        return text


# MMseqs2 draws its bars as "[" and 65 "=" (then "] 100.00% ...").
_MMSEQS_BAR = 65


def _bar_fraction(text: str) -> float | None:
    """How far a bar still being drawn has come: MMseqs2's, or a tqdm bar's percentage."""
    match = re.fullmatch(r"\s*\[(=*)\s*", text)
    if match is not None:
        return min(1.0, len(match.group(1)) / _MMSEQS_BAR)
    match = re.search(r"(\d+)%\|", text)
    return int(match.group(1)) / 100 if match else None


def run_tool(command: list[str], what: str, output: ToolOutput, *, cwd: str | Path | None = None,
             env: dict | None = None, heartbeat: float = HEARTBEAT_SECONDS) -> None:
    """Run ``command`` with its stdout and stderr logged (never on this process's), with a heartbeat.

    Every ``heartbeat`` seconds an INFO line gives the elapsed time and the stage the output
    reveals. An exit status other than 0 is a RuntimeError quoting the last lines printed.
    """
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)

    def pump() -> None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while block := os.read(fd, 65536):
            output.feed(block.decode("utf-8", errors="replace"))
        output.close()

    reader = threading.Thread(target=pump, name=f"{what} output", daemon=True)
    reader.start()
    try:
        while True:
            try:
                proc.wait(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                stage = output.describe()
                log.info("%s: %s elapsed%s", what, duration(time.monotonic() - start),
                         f"; {stage}" if stage else "")
    finally:
        if proc.poll() is None:  # interrupted: the program must not outlive the run
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        last = "\n".join(output.tail[-8:])
        raise RuntimeError(f"{what} failed (exit status {proc.returncode}) after {duration(time.monotonic() - start)}"
                           + (f"; its last output:\n{last}" if last else ""))


def eta(done: int, total: int, elapsed: float) -> str:
    """'elapsed 1m05s, ETA 3m20s' after ``done`` of ``total`` equal-ish steps."""
    if done <= 0 or done >= total:
        return f"elapsed {duration(elapsed)}"
    return f"elapsed {duration(elapsed)}, ETA {duration(elapsed / done * (total - done))}"
