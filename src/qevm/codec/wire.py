"""Byte-level primitives shared by every codec: a bounds-checked cursor and encoders.

All multi-byte integers in the stream are big-endian.  ``Cursor`` reads from a
buffer that may still be growing (the sans-I/O parser): when it runs out of bytes
and the input is not closed it raises ``Incomplete`` so the caller can retry the
whole record once more data has arrived; when the input is closed it raises
``TruncatedError`` with the absolute offset.
"""

from __future__ import annotations

import struct

from qevm.errors import DecodeError, EncodeError, QevmError, TruncatedError

__all__ = ["Cursor", "Incomplete", "cstr", "be16", "be32", "be64", "u8"]

_B16 = struct.Struct(">H")
_B32 = struct.Struct(">I")
_B64 = struct.Struct(">Q")


class Incomplete(QevmError):
    """More input is needed to finish the current record: a signal between the cursor and the
    push parser, which catches it and waits for data (it never reaches a caller)."""


class Cursor:
    """Reads big-endian values from ``buf[pos:end]``; ``base`` maps positions to stream offsets."""

    __slots__ = ("buf", "pos", "end", "base", "closed", "path")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None,
                 base: int = 0, closed: bool = True, path: str = "") -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end
        self.base = base
        self.closed = closed
        self.path = path

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            if not self.closed:
                raise Incomplete
            raise TruncatedError(f"need {n} bytes, {self.end - self.pos} left", self.offset, self.path)

    def error(self, msg: str, offset: int | None = None) -> DecodeError:
        return DecodeError(msg, self.offset if offset is None else offset, self.path)

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def peek8(self, ahead: int = 0) -> int:
        self.need(ahead + 1)
        return self.buf[self.pos + ahead]

    def be16(self) -> int:
        self.need(2)
        v: int = _B16.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def be32(self) -> int:
        self.need(4)
        v: int = _B32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def be64(self) -> int:
        self.need(8)
        v: int = _B64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def take(self, n: int) -> bytes:
        if n < 0:
            raise self.error(f"negative length {n}")
        self.need(n)
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return v

    def cstr(self) -> str:
        """A counted string: u8 length, then that many bytes (latin-1 keeps every byte)."""
        n = self.u8()
        return self.take(n).decode("latin-1")


def u8(v: int) -> bytes:
    return bytes((v,))


def be16(v: int) -> bytes:
    return _B16.pack(v)


def be32(v: int) -> bytes:
    return _B32.pack(v)


def be64(v: int) -> bytes:
    return _B64.pack(v)


def cstr(s: str) -> bytes:
    b = s.encode("latin-1")
    if len(b) > 255:
        raise EncodeError(f"counted string longer than 255 bytes: {s[:40]!r}...")
    return bytes((len(b),)) + b
