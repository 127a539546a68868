"""What every opener in ``qevm.io`` hands to the reader and the writer: an ``Input``."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from qevm.errors import UsageError

__all__ = ["Input", "CHUNK", "atomic_output", "pwritev_all"]

#: how much the reader asks a file for at a time
CHUNK = 1 << 20


@dataclass
class Input:
    """An opened stream: ``file`` yields the stream's bytes from its first one (``QEVM``)."""

    name: str
    file: Any  # a binary reader: read(n), and readinto/seek/tell when it has them
    seekable: bool  # a regular file read raw: random access to the stream's own offsets
    compression: str | None
    size: int | None
    file_offset: int = 0  # where the stream starts in its file (mapped-ram offsets are file offsets)

    def close(self) -> None:
        """Close the file (standard input is left open)."""
        if self.file not in (sys.stdin.buffer, getattr(sys.stdin.buffer, "raw", None)):
            self.file.close()

    def __enter__(self) -> Input:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


IOV_MAX = 1024  # buffers one pwritev takes (Linux)


def pwritev_all(fd: int, views: list[Any], at: int) -> None:
    """Write the bytes-like ``views`` one after the other from offset ``at`` of ``fd``: ``IOV_MAX`` of them per
    ``pwritev``, the rest of a short write by ``pwrite``."""
    for k in range(0, len(views), IOV_MAX):
        part = views[k:k + IOV_MAX]
        total = sum(map(len, part))
        n = os.pwritev(fd, part, at)
        if n != total:
            rest = memoryview(b"".join(part))[n:]
            while rest:
                w = os.pwrite(fd, rest, at + n)
                rest = rest[w:]
                n += w
        at += total


class atomic_output:  # noqa: N801 - used as a context manager like open()
    """A file written under a temporary name next to ``path`` and renamed to ``path`` only when the
    ``with`` block completes; removed on any error.  ``-`` is standard output (written directly)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = ""
        self.file: Any = None

    def __enter__(self) -> Any:
        if self.path == "-":
            self.file = sys.stdout.buffer
            return self.file
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist")
        fd, self.tmp = tempfile.mkstemp(prefix=f".qevm-{os.path.basename(self.path)}.", suffix=".part", dir=directory)
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # like open(): mkstemp's 0600 is for the temporary name only
        self.file = os.fdopen(fd, "w+b")
        return self.file

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if self.path == "-":
            self.file.flush()
            return
        try:
            self.file.close()
            if et is None:
                os.replace(self.tmp, self.path)
                self.tmp = ""
        finally:
            if self.tmp:
                try:
                    os.unlink(self.tmp)
                except OSError:
                    pass
