"""How many CPU threads torch gets when nobody says: the cores that are free now, not merely ours.

torch parallelises each operation over its OpenMP pool, and every operation ends at a barrier
that waits for the slowest thread. A thread sharing a core with another process runs only in
its time slices (milliseconds), so each barrier can wait for a whole slice: with one of two
cores busy, two threads ran extraction 1.8x slower than one, and UniRep's many small per-step
operations about 10x slower. Threads beyond the free cores never help, so the default counts
the cores other processes keep busy (from /proc/stat over a fraction of a second) and leaves
them out. An explicit thread count always wins.

Nothing here imports torch or numpy: the command lines call it before torch is loaded.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# A core counts as busy when other processes use at least this share of it. Two threads on two
# cores, one of them 40% used by someone else, finish each step no sooner than one thread alone
# (the shared core's thread gets 60% of it) and add barrier waits; below that, two still gain.
BUSY_SHARE = 0.4
SAMPLE_SECONDS = 0.15  # long enough for the kernel's 10 ms tick counts to mean something
REUSE_SECONDS = 60.0  # a decision is reused this long: several heads in one run ask in turn

def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), whether or not others use them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative ticks of one CPU from a /proc/stat line."""

    busy: int  # user, nice, system, irq, softirq, steal
    total: int  # the above plus idle and iowait


def parse_proc_stat(text: str, cpus: Sequence[int] | None = None) -> dict[int, CpuTimes]:
    """The per-CPU lines (``cpuN ...``) of /proc/stat, only those of ``cpus`` when given."""
    out: dict[int, CpuTimes] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            values = [int(v) for v in fields[:8]]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        values += [0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        busy = user + nice + system + irq + softirq + steal
        out[cpu] = CpuTimes(busy=busy, total=busy + idle + iowait)
    return out


def busy_share(before: dict[int, CpuTimes], after: dict[int, CpuTimes]) -> float:
    """Cores' worth of CPU in use between two samples of the same CPUs (0 .. number of CPUs)."""
    used = 0.0
    for cpu, b in before.items():
        a = after.get(cpu)
        if a is None or a.total <= b.total:
            continue
        used += min(1.0, max(0.0, (a.busy - b.busy) / (a.total - b.total)))
    return used


def busy_cores(others: float) -> int:
    """Whole cores that others' load of ``others`` cores' worth takes away (see BUSY_SHARE)."""
    return max(0, math.floor(others + (1 - BUSY_SHARE) + 1e-9))


def choose_threads(cores: int, others: float) -> int:
    """Threads for ``cores`` cores of which others use ``others`` cores' worth: the free ones, at least 1."""
    return max(1, cores - busy_cores(others))


def cgroup_cores(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``) in whole cores, rounded up; None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def others_load(cpus: Sequence[int], seconds: float = SAMPLE_SECONDS, *,
                read: Callable[[], str] | None = None, sleep: Callable[[float], None] = time.sleep,
                own: Callable[[], float] = _own_cpu_seconds) -> float | None:
    """Cores' worth of CPU that other processes used on ``cpus`` over ``seconds``; None: cannot tell.

    Read from /proc/stat before and after a short sleep, less what this process itself used
    meanwhile (its other threads may be working).
    """
    if read is None:
        def read() -> str:
            return Path("/proc/stat").read_text()
    try:
        own_before, first = own(), read()
        start = time.perf_counter()
        sleep(seconds)
        second, own_after = read(), own()
        elapsed = max(time.perf_counter() - start, seconds)
    except OSError:
        return None
    before, after = parse_proc_stat(first, cpus), parse_proc_stat(second, cpus)
    if not before or not after:
        return None
    mine = max(0.0, own_after - own_before) / elapsed
    return max(0.0, busy_share(before, after) - mine)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    cores: int  # cores this process may use (affinity, and the cgroup quota)
    busy: int | None  # of those, cores other processes keep busy; None: unknown
    load: float | None  # others' load in cores' worth

    def describe(self) -> str:
        cores = f"{self.cores} core{'s' if self.cores != 1 else ''}"
        if self.busy is None:
            unknown = ", load unknown" if self.cores > 1 else ""  # one core is all there is, busy or not
            return f"{cores}{unknown}: {self.threads} thread{'s' if self.threads != 1 else ''}"
        return (f"{cores}, {self.busy} busy (others use {self.load:.1f}): "
                f"{self.threads} thread{'s' if self.threads != 1 else ''}")


def decide_threads(*, cores: int | None = None, load: float | None = None, sample: bool = True) -> ThreadChoice:
    """The thread count for now: available cores less the ones other processes keep busy.

    ``cores`` and ``load`` override what is read from the system (for tests and callers
    that know better); ``sample=False`` skips measuring and counts no core as busy.
    """
    if cores is None:
        cores = available_cores()
        quota = cgroup_cores()
        if quota is not None:
            cores = min(cores, quota)
    if load is None and sample and cores > 1:
        load = others_load(_affinity())
        if load is None:
            load = _loadavg_others()
    if load is None:
        return ThreadChoice(cores, cores, None, None)
    return ThreadChoice(choose_threads(cores, load), cores, min(cores, busy_cores(load)), load)


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _loadavg_others() -> float | None:
    # Without /proc/stat (macOS): the 1-minute load average, less this process, which has just
    # been busy importing; a coarse view, but one that still sees a core held by another job.
    try:
        return max(0.0, os.getloadavg()[0] - 1.0)
    except (AttributeError, OSError):
        return None


_lock = threading.Lock()
_last: tuple[float, ThreadChoice] | None = None
_announced: ThreadChoice | None = None  # the decision last logged
_notes: list[str] = []  # said before logging was set up, logged with the next decision


def current_choice(announce: bool = True) -> ThreadChoice:
    """The decision for now, measured at most once a minute per process and logged when it changes."""
    global _last, _announced
    with _lock:
        now = time.monotonic()
        if _last is None or now - _last[0] >= REUSE_SECONDS:
            _last = (now, decide_threads())
        choice = _last[1]
        if announce and choice != _announced:
            log.info("CPU threads: %s (--threads N to choose)", choice.describe())
            for note in _notes:
                log.info("%s", note)
            _notes.clear()
            _announced = choice
        return choice


def default_threads() -> int:
    """Threads torch gets when none are asked for: the free cores now (at least 1).

    Measured at most once a minute per process (a 0.15 s sample of /proc/stat), so callers
    that ask in turn get the same answer without waiting again.
    """
    return current_choice().threads


def forget() -> None:
    """Measure afresh on the next call of :func:`current_choice`."""
    global _last, _announced
    with _lock:
        _last = _announced = None
        _notes.clear()


def wait_policy(choice: ThreadChoice, environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """OMP_WAIT_POLICY to set for this choice: PASSIVE when other processes hold a core; None: leave it.

    OpenMP threads spin at every barrier before they sleep. When a thread shares its core
    with another process (threads asked for beyond the free cores, or load that arrives after
    the start), the spinning holds the core that the awaited thread needs: UniRep's small
    steps ran 5-10x slower than on one thread. Sleeping at once costs a wake-up per barrier,
    which an idle machine need not pay, so the policy is left alone there (and whenever the
    user has set it).
    """
    if "OMP_WAIT_POLICY" in environ or not choice.busy:
        return None
    return "PASSIVE"


def prepare_openmp() -> None:
    """Before torch is imported: decide the default threads and OpenMP's wait policy.

    OpenMP reads its environment once, when torch loads it, so this must come first; once
    torch is loaded it does nothing. Called before logging is set up: what it decided is
    logged with the first use of the decision.
    """
    if "torch" in sys.modules:
        return
    choice = current_choice(announce=False)
    policy = wait_policy(choice)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
        _notes.append(f"OMP_WAIT_POLICY={policy}: other processes keep {choice.busy} of {choice.cores} cores busy, "
                      "and spinning OpenMP threads would hold cores that they need")
