"""Crash-safe file writes shared by checkpoints, gallery indexes and caches, and the glibc memory
controls used by the evaluation and the app."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path``: readers and a crash at any moment see the old file or the new one, never half.
    The file gets the usual permissions (0666 less the umask; mkstemp alone would give 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def glibc():
    """The C library as a ctypes handle when it is glibc on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc has both
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> bool:
    """Hand the heap memory that freed tensors left behind back to the OS (glibc ``malloc_trim``).

    Encoding a large split frees many mid-sized temporaries that glibc keeps mapped: without this a
    large evaluation holds far more than its live data (benchmarks/eval_memory.py measures the peak)."""
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
