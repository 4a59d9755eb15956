"""Small helpers shared across the package: atomic file and folder writes, and human-readable numbers.

Nothing is written in place. A file is written under a temporary name beside it and renamed over it; a
folder (a converted checkpoint, a prepared dataset) is built whole in a temporary folder beside it and
exchanged with the old one in one step. Temporary names carry the writer's process id, so what a killed
process left behind is recognised and removed by the next writer, and never what a live one is writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

from dsv3.errors import Dsv3Error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have given the file: mkstemp makes it owner-only


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then rename tmp_path onto `path`: readers see the old file or the new one,
    never half of one, even if the process is killed mid-write."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_stale(directory, f".tmp-*-{os.path.basename(path)}")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{os.getpid()}-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


_PID = re.compile(r"\.[a-z]+-(\d+)-")


def remove_stale(directory: str | os.PathLike, pattern: str) -> None:
    """Remove what killed processes left in `directory`: entries matching the glob `pattern` whose name
    carries the id of a process that no longer runs."""
    import fnmatch

    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _PID.match(name)
        if m and fnmatch.fnmatchcase(name, pattern) and not _alive(int(m.group(1))):
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def check_destination(dst: str | os.PathLike, *, overwrite: bool, sources: tuple[str, ...] = (),
                      allow: Callable[[str], bool] | None = None, what: str = "destination") -> str:
    """Refuse a destination folder that is a file, that is, holds or lies inside one of `sources` (after
    resolving links), or that already holds something, unless `overwrite` or `allow(dst)` (a folder this
    command wrote itself). Returns the destination's path."""
    dst = os.fspath(dst)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise Dsv3Error(f"{what} {dst} is a file; name a folder")
    real = os.path.realpath(dst)
    for src in sources:
        src_real = os.path.realpath(src)
        if real == src_real or _within(real, src_real) or _within(src_real, real):
            raise Dsv3Error(f"{what} {dst} is, holds or lies inside the source {src}; write somewhere else")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite and not (allow and allow(dst)):
        raise Dsv3Error(f"{what} {dst} already holds files; pass --overwrite to replace it, or name another folder")
    return dst


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, tag: str) -> Iterator[str]:
    """Build a folder whole under a temporary name beside `dst`, then put it in `dst`'s place in one step
    (an atomic exchange where the system has one), so that at any instant `dst` is the old folder, the new
    one, or, for an instant without the exchange, absent; never a mix. Yields the temporary folder."""
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent, f".{tag}-*-{name}")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{tag}-{os.getpid()}-", suffix=f"-{name}")
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(dst) and _exchange(tmp, dst):
            shutil.rmtree(tmp)  # tmp now holds the old folder
        else:
            if os.path.isdir(dst):
                old = tempfile.mkdtemp(dir=parent, prefix=f".{tag}-{os.getpid()}-old-", suffix=f"-{name}")
                os.rename(dst, os.path.join(old, name))
                os.rename(tmp, dst)
                shutil.rmtree(old)
            else:
                os.rename(tmp, dst)
        fsync_path(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0


def fsync_path(path: str) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and folder below `root` to disk."""
    for folder, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_path(folder)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; keeps three significant digits, SI-style suffixes up to T (then P, E)."""
    for suffix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"
