"""One way to write a file: all of it or none of it.

Every file the project writes (caches, parts, models, checkpoints, tables, figures) goes
through :func:`atomic_path`: the caller writes a temporary file beside the target, which is
fsynced and renamed over the target only when the writing finished. A crash, ``kill -9``, a
signal or a full disk therefore leaves either the old file or the new one, never half of
one, and a failed write removes its temporary file.

A target that is a symbolic link is written through: the link stays and the file it points
to is replaced, as an editor saving a linked file would do.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "no room": a full disk, a quota, a file-size limit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """Writing stopped because the disk (or a quota) is full; nothing was replaced."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def real_path(path: Path | str) -> Path:
    """``path`` with every symbolic link resolved (the file itself need not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def is_no_space(err: BaseException) -> bool:
    """An OSError that says the disk is full, also when a library put errno only in its message."""
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    if getattr(err, "errno", None) in NO_SPACE:
        return True
    text = str(err)
    return any(os.strerror(code) in text for code in NO_SPACE) or "errno = 28" in text


def disk_full_error(path: Path, err: BaseException) -> DiskFullError:
    where = path.parent if path.parent.exists() else Path.cwd()
    free = shutil.disk_usage(where).free
    # HDF5's messages run over several lines; the first says what failed.
    detail = str(err).splitlines()[0][:200] if str(err) else ""
    return DiskFullError(
        errno.ENOSPC,
        f"{path}: the disk is full ({format_bytes(free)} free in {where}; or a quota or file-size limit was "
        f"reached); nothing was replaced. Free some space and run the same command again "
        f"({err.__class__.__name__}: {detail})",
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def tmp_path_for(path: Path | str, keep_suffix: bool = False) -> Path:
    """The temporary name :func:`atomic_path` uses for ``path`` (after resolving links)."""
    target = real_path(path)
    if keep_suffix and target.suffix:
        return target.with_name(f"{target.stem}.tmp{target.suffix}")
    return target.with_name(target.name + ".tmp")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


UNIQUE_TMP = ".tmp-"


def unique_tmp_path_for(path: Path | str) -> Path:
    """A temporary name for ``path`` of this process's own: ``NAME.tmp-PID-RANDOM``."""
    target = real_path(path)
    return target.with_name(f"{target.name}{UNIQUE_TMP}{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_tmps(path: Path | str) -> list[Path]:
    """Remove the temporary files of ``path`` (:func:`unique_tmp_path_for`) left by processes no longer running.

    A process killed while writing (kill -9, a power cut) leaves its temporary file; one of a
    process still running is being written and is left alone.
    """
    target = real_path(path)
    removed = []
    with contextlib.suppress(OSError):
        for tmp in target.parent.glob(f"{glob.escape(target.name)}{UNIQUE_TMP}*"):
            pid = tmp.name[len(target.name) + len(UNIQUE_TMP):].split("-")[0]
            if pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): running
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: Path | str, keep_suffix: bool = False, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    ``keep_suffix`` keeps the target's suffix on the temporary name, for writers that pick
    a format from it (matplotlib's ``savefig``, ``numpy.savez``). On any exception, including
    KeyboardInterrupt and SystemExit, the temporary file is removed and ``path`` is left as
    it was; a full disk is reported as :class:`DiskFullError`.

    ``unique`` names the temporary file for this process alone (:func:`unique_tmp_path_for`),
    for targets that several processes may write at once (a shared cache, one output named
    by two commands): under the common name one writer could rename another's half-written
    file into place. Each then replaces the target whole, the last one winning.
    """
    target = real_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if unique and keep_suffix:
        raise ValueError("atomic_path: unique and keep_suffix cannot be combined")
    tmp = unique_tmp_path_for(target) if unique else tmp_path_for(target, keep_suffix)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: the writer did not create the file")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(target, err) from None
        raise
    with contextlib.suppress(OSError):
        fsync_dir(target.parent)


def write_bytes(path: Path | str, data: bytes, unique: bool = False) -> Path:
    with atomic_path(path, unique=unique) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str, unique: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), unique=unique)


def write_json(path: Path | str, obj, **kwargs) -> Path:
    kwargs.setdefault("indent", 2)
    return write_text(path, json.dumps(obj, **kwargs) + "\n")


@contextlib.contextmanager
def atomic_h5(path: Path | str) -> Iterator:
    """An h5py File written at the temporary path of :func:`atomic_path`, closed before anything else.

    HDF5 writes some data and metadata late, when an object or the file is closed. When
    such a write fails (a full disk), h5py reports it only as an "ignored exception" from a
    destructor, and the file's next close can crash the process (h5py 3.16: a segmentation
    fault). So failures reported that way are collected and fail the write, the file is
    flushed before it is closed, and a failed file's descriptor is pointed at /dev/null
    before closing, so that its last flush succeeds and goes nowhere; the temporary file is
    then removed.
    """
    import h5py

    late: list[BaseException] = []
    previous = sys.unraisablehook

    def collect(unraisable) -> None:
        if isinstance(unraisable.exc_value, (RuntimeError, OSError)):
            late.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = collect
    try:
        with atomic_path(path) as tmp:
            f = h5py.File(tmp, "w")
            try:
                yield f
                _raise_late(late)
                f.flush()
                _raise_late(late)
                f.close()
                _raise_late(late)
            except BaseException:
                _discard_h5(f)
                raise
    finally:
        sys.unraisablehook = previous


def _raise_late(late: list[BaseException]) -> None:
    if late:
        err = late[0]
        if is_no_space(err):
            raise OSError(errno.ENOSPC, str(err))
        raise OSError(errno.EIO, f"HDF5 could not write ({err})")


def _discard_h5(f) -> None:
    """Close an h5py File whose contents are being thrown away, without writing to its file."""
    with contextlib.suppress(Exception):
        if f.id.valid:
            fd = f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
    with contextlib.suppress(Exception):
        f.close()


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
