"""What both command lines (``embedcache`` and ``heads``) share.

Signal handling that is in place before anything heavy is imported, and choices loaded only
when an option is used. Nothing here imports torch, numpy or h5py: torch alone takes seconds,
and an interruption during those seconds must end as quietly as one during the work.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any

import click

RESUME = "interrupted; run the same command again to resume"


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the program is so that every clean-up on the way up runs.

    Not a KeyboardInterrupt, which click turns into "Aborted!" while it parses options.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.resumable = False  # set on the way up through work that the same command carries on


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # A second signal must not raise into the clean-up of the first, so it ends the process at
    # once: as safe as kill -9, which every writer survives.
    signal.signal(signal.SIGTERM, _on_second_signal)
    signal.signal(signal.SIGINT, _on_second_signal)
    raise Interrupted(signum)


def _on_second_signal(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"interrupted again; stopping now (run the same command again to resume)\n")
    os._exit(128 + signum)


def _on_unraisable(hook_args: Any) -> None:
    # A signal whose handler ran inside a weakref callback or __del__ (h5py and torch free objects
    # all the time) raised into code that cannot propagate it: Python prints it and goes on, and
    # the run would finish as if nobody had asked it to stop. Raise it again a moment later from
    # a timer, whose handler runs at the main thread's next bytecode, past the callback (and if
    # that is another callback, this comes round again). Not a signal sent from here, nor a
    # thread: the handler of either would run inside this hook, where exceptions are lost too.
    if isinstance(hook_args.exc_value, Interrupted):
        signum = hook_args.exc_value.signum

        def again(alarm: int, frame: FrameType | None) -> None:
            raise Interrupted(signum)

        signal.signal(signal.SIGALRM, again)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    sys.__unraisablehook__(hook_args)


@contextlib.contextmanager
def resumable() -> Iterator[None]:
    """Work that the same command, started again, carries on: an interruption inside says so."""
    try:
        yield
    except Interrupted as err:
        err.resumable = True
        raise


class InterruptibleGroup(click.Group):
    """Commands that end on Ctrl-C or SIGTERM with one line and exit 130 or 143, after every clean-up ran.

    The handlers are set before the subcommand's options are parsed or its modules imported, so
    there is no moment after start-up at which a signal prints a traceback or ends the process
    without releasing locks, temporary files and open HDF5 files.
    """

    # Subcommands that run torch: OpenMP is set up for them before torch is imported, which
    # parsing their options may already do (choices loaded from torch-importing modules).
    torch_commands: frozenset[str] = frozenset()

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.torch_commands and not {"-h", "--help"} & set(args):
            from .threads import prepare_openmp

            prepare_openmp()
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        previous = {}
        previous_hook = sys.unraisablehook
        if threading.current_thread() is threading.main_thread():  # the only thread that may set handlers
            # SIGINT first: a process seen to catch SIGTERM then catches both.
            previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            previous[signal.SIGALRM] = signal.getsignal(signal.SIGALRM)
            sys.unraisablehook = _on_unraisable
        try:
            return super().main(*args, **kwargs)
        except Interrupted as err:
            click.echo(RESUME if err.resumable else "interrupted", err=True)
            sys.exit(128 + err.signum)
        finally:
            if previous:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sys.unraisablehook = previous_hook


class LazyChoice(click.Choice):
    """A choice among names defined in a module that is slow to import: loaded on first use.

    Parsing a command's options or showing its help loads them; starting the program does not.
    """

    def __init__(self, load: Callable[[], Iterable[str]], case_sensitive: bool = True) -> None:
        self._load = load
        self._loaded: tuple[str, ...] | None = None
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, value: Iterable[str]) -> None:
        self._loaded = tuple(value)
