"""The I/O edge: open a path or standard input, undo an outer compression, find the vmdesc.

Nothing in the core reads files; these helpers hand bytes to the parser.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from typing import IO, Any

from qevm.errors import UsageError
from qevm.io.base import CHUNK, Input
from qevm.io.compression import decompressing, sniff_compression
from qevm.io.containers import LibvirtSave, Qcow2VmState, sniff

__all__ = ["Input", "open_input", "find_vmdesc", "CHUNK"]


def open_input(path: str, snapshot: str | None = None) -> Input:
    """Open ``path`` (``-`` = standard input).  gzip/xz/bzip2/zstd wrappers are undone on the fly
    (``qevm.io.compression``).

    A qcow2 image yields the VM state of its internal snapshot ``snapshot`` (a name or id; default:
    the newest with a VM state); a libvirt save image yields the stream after its header and XML."""
    if path == "-":
        raw: Any = getattr(sys.stdin.buffer, "raw", sys.stdin.buffer)  # unbuffered: one read() per chunk
        name = "<stdin>"
        _grow_pipe(raw)
    else:
        name = path
        try:
            raw = open(path, "rb", buffering=0)  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(raw.fileno())
        regular = stat.S_ISREG(st.st_mode)
    except (OSError, ValueError):
        regular = False
        st = None
    head = _peek(raw, regular)
    container = sniff(head)
    if snapshot is not None and container != "qcow2":
        if path != "-":
            raw.close()
        raise UsageError(f"--snapshot is for qcow2 images; {name} is not one")
    if container == "qcow2":
        if not regular:
            raise UsageError(f"{name}: a qcow2 image is read at random offsets; give its path, not a pipe")
        try:
            return Qcow2VmState(raw, snapshot, name=name, close_file=True).to_input(name)
        except BaseException:
            raw.close()
            raise
    if container == "libvirt":
        src: Any = raw if regular else _Prefixed(head, raw, owns=path != "-")
        try:
            save = LibvirtSave(src, name, close_file=True)
        except BaseException:
            src.close()
            raise
        if not save.complete:
            logging.getLogger(__name__).warning("%s: the libvirt save image is incomplete (LibvirtQemudPart)", name)
        return save.to_input(name)
    kind = sniff_compression(head)
    if kind is not None:
        src = raw if regular else _Prefixed(head, raw, owns=path != "-")
        missing = (f"{name} is zstd-compressed; install the 'zstandard' package or decompress it first "
                   "(zstd -dc FILE | qevm ... -)")
        try:
            return Input(name, decompressing(kind, src, offset=0, missing=missing,
                                                 close_src=path != "-"), False, kind, None)
        except BaseException:
            if path != "-":
                src.close()
            raise
    if not regular:
        return Input(name, _Prefixed(head, raw, owns=path != "-"), False, None, None)
    return Input(name, raw, True, None, st.st_size if st else None)


def _grow_pipe(f: Any) -> None:
    """Ask Linux for a 1 MiB pipe buffer (fewer, larger reads); harmless where unsupported."""
    try:
        import fcntl

        fcntl.fcntl(f.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
    except (OSError, ValueError, AttributeError, ImportError):
        pass


def _peek(raw: Any, regular: bool) -> bytes:
    if regular:
        head = bytes(raw.read(16))
        raw.seek(0)
        return head
    head = b""
    while len(head) < 16:
        b = bytes(raw.read(16 - len(head)))
        if not b:
            break
        head += b
    return head


class _Prefixed:
    """A non-seekable file whose first bytes were already read."""

    def __init__(self, head: bytes, raw: Any, owns: bool = True) -> None:
        self._head = head
        self._raw = raw
        self._owns = owns  # standard input is left open

    def read(self, n: int = -1) -> bytes:
        if self._head:
            h, self._head = self._head, b""
            if n < 0:
                return h + bytes(self._raw.read())
            if len(h) >= n:  # never more than asked: gzip reads its header 2 and 8 bytes at a time
                self._head = h[n:]
                return h[:n]
            return h + bytes(self._raw.read(n - len(h)) or b"")
        return bytes(self._raw.read(n))

    def readinto(self, b: Any) -> int:
        if not self._head:
            return self._raw.readinto(b) or 0
        h, self._head = self._head, b""
        n = min(len(h), len(b))
        b[:n] = h[:n]
        self._head = h[n:]
        return n

    def close(self) -> None:
        if self._owns:
            self._raw.close()


def find_vmdesc(f: IO[bytes], size: int, limit: int = 64 << 20) -> tuple[int, bytes] | None:
    """Locate a vmdesc trailer that ends exactly at the end of a seekable file.

    Returns (offset of the 0x06 byte, JSON bytes), or None.  Scans backwards in 1 MiB
    steps (at most ``limit`` bytes) for ``00 06 be32(N)`` whose N reaches exactly the end
    of the file and whose JSON starts with ``{``; memory stays bounded by the chunk size.
    """
    try:
        lo_limit = max(0, size - limit)
        end = size
        while end > lo_limit:
            start = max(lo_limit, end - CHUNK)
            f.seek(start)
            chunk = f.read(end - start + 1)  # one byte of overlap with the previous chunk
            i = len(chunk)
            while True:
                i = chunk.rfind(b"\x00\x06", 0, i + 1)
                if i < 0:
                    break
                j = start + i + 1  # offset of the 0x06 byte
                if j + 5 < size:
                    f.seek(j + 1)
                    head = f.read(5)
                    n = int.from_bytes(head[:4], "big")
                    if j + 5 + n == size and head[4:5] == b"{":
                        f.seek(j + 5)
                        return j, f.read(n)
                i -= 1
                if i < 0:
                    break
            end = start
        return None
    finally:
        f.seek(0)
