"""The return path (destination -> source), sans-I/O: one object per message builds and decodes it.

Each message is ``be16 type, be16 len, len bytes``; RECV_BITMAP alone carries more bytes after its
``len``: be64 size, ``size`` bitmap bytes, be64 end marker 0x0123456789ABCDEF (format.md §2.3).

    dec = RpDecoder()
    dec.feed(data) ...; dec.close()
    for msg in dec.messages(): ...            # stops when more input is needed
    sock.sendall(pong(7).encode())

When a QEMU 7.2 destination sends what (migration/savevm.c, migration/migration.c):

* ``OPEN_RETURN_PATH`` opens the return path; nothing is sent for it (``[>=8.1]`` SWITCHOVER_ACK
  follows at once when the switchover-ack capability is on and no device needs to approve).
* ``PING(v)`` is answered by ``PONG(v)``; a PING with no return path open fails the load.
* Page requests (REQ_PAGES_ID, then REQ_PAGES for the same block) come from the postcopy fault
  thread while the destination runs in postcopy.
* ``SHUT(status)`` is sent when the incoming side is torn down, that is after the whole stream was
  loaded (status 0) or the load failed (status 1): the source waits for it before it reports
  ``completed`` whenever it opened a return path.
* ``POSTCOPY_RESUME`` -> ``RESUME_ACK(1)``; ``RECV_BITMAP`` command -> RECV_BITMAP message (recovery).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from qevm.codec.wire import be16, be32, be64, cstr
from qevm.errors import DecodeError, InvalidOperation, TruncatedError
from qevm.format.parser import DONE, NEED_DATA, Sentinel

__all__ = ["RpType", "RpMessage", "RpDecoder", "RECV_BITMAP_END", "shut", "pong", "req_pages", "recv_bitmap",
           "resume_ack", "switchover_ack", "NEED_DATA", "DONE"]

RECV_BITMAP_END = 0x0123456789ABCDEF
MAX_BITMAP = 1 << 32  # bytes: a bitmap for 128 TiB of 4 KiB pages


class RpType(IntEnum):
    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7  # [>= 8.1]


#: fixed data lengths; None = variable (checked per type)
RP_LENGTHS: dict[int, int | None] = {
    RpType.SHUT: 4, RpType.PONG: 4, RpType.REQ_PAGES_ID: None, RpType.REQ_PAGES: 12,
    RpType.RECV_BITMAP: None, RpType.RESUME_ACK: 4, RpType.SWITCHOVER_ACK: 0,
}


@dataclass(slots=True)
class RpMessage:
    """One return-path message.  ``data`` is the counted part; ``extra`` the RECV_BITMAP tail.
    ``block`` is the RAMBlock a page request or bitmap is about (for REQ_PAGES: the block of the
    previous REQ_PAGES_ID, as the source resolves it)."""

    offset: int
    type: int
    data: bytes
    extra: bytes = b""
    block: str | None = None

    @property
    def name(self) -> str:
        try:
            return RpType(self.type).name
        except ValueError:
            return f"UNKNOWN_{self.type}"

    def encode(self) -> bytes:
        return be16(self.type) + be16(len(self.data)) + self.data + self.extra

    def info(self) -> dict[str, Any]:
        """The decoded arguments, JSON-able."""
        d, t = self.data, self.type
        out: dict[str, Any] = {"offset": self.offset, "type": self.name}
        if t == RpType.SHUT:
            out["status"] = int.from_bytes(d, "big")
        elif t in (RpType.PONG, RpType.RESUME_ACK):
            out["value"] = int.from_bytes(d, "big")
        elif t in (RpType.REQ_PAGES_ID, RpType.REQ_PAGES):
            out["block"] = self.block
            out["start"] = int.from_bytes(d[:8], "big")
            out["length"] = int.from_bytes(d[8:12], "big")
        elif t == RpType.RECV_BITMAP:
            out["block"] = self.block
            size = int.from_bytes(self.extra[:8], "big")
            bitmap = self.extra[8:8 + size]
            out["bitmap_bytes"] = size
            out["pages_received"] = int.from_bytes(bitmap, "little").bit_count()
        return out


# -- builders ---------------------------------------------------------------------------------------


def shut(status: int = 0) -> RpMessage:
    return RpMessage(0, RpType.SHUT, be32(status))


def pong(value: int) -> RpMessage:
    return RpMessage(0, RpType.PONG, be32(value))


def req_pages(start: int, length: int, block: str | None = None) -> RpMessage:
    """REQ_PAGES_ID when ``block`` is given, REQ_PAGES (same block as before) otherwise."""
    if block is None:
        return RpMessage(0, RpType.REQ_PAGES, be64(start) + be32(length))
    return RpMessage(0, RpType.REQ_PAGES_ID, be64(start) + be32(length) + cstr(block), block=block)


def recv_bitmap(block: str, bitmap: bytes) -> RpMessage:
    """The received-pages bitmap of ``block`` (bit i = target page i, little-endian bit order);
    padded to a multiple of 8 bytes as QEMU sends it."""
    padded = bitmap + bytes(-len(bitmap) % 8)
    return RpMessage(0, RpType.RECV_BITMAP, cstr(block), be64(len(padded)) + padded + be64(RECV_BITMAP_END),
                     block=block)


def resume_ack(value: int = 1) -> RpMessage:
    return RpMessage(0, RpType.RESUME_ACK, be32(value))


def switchover_ack() -> RpMessage:
    return RpMessage(0, RpType.SWITCHOVER_ACK, b"")


# -- incremental decoder ----------------------------------------------------------------------------------


class RpDecoder:
    """Bytes in, ``RpMessage`` out.  ``next_message()`` returns a message, ``NEED_DATA``, or after
    ``close()`` ``DONE`` (``TruncatedError`` if the input ended inside a message).  SHUT ends the
    return path: bytes after it are an error, as they are for QEMU's source."""

    PATH = "return path"

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._closed = False
        self._shut = False
        self._block: str | None = None
        self._queue: deque[RpMessage] = deque()

    @property
    def offset(self) -> int:
        return self._base

    @property
    def shut(self) -> bool:
        return self._shut

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise InvalidOperation("feed() after close()")
        self._buf += data

    def close(self) -> None:
        self._closed = True

    def _err(self, msg: str, offset: int | None = None) -> DecodeError:
        return DecodeError(msg, self._base if offset is None else offset, self.PATH)

    def next_message(self) -> RpMessage | Sentinel:
        if self._queue:
            return self._queue.popleft()
        buf = self._buf
        if not buf:
            return DONE if self._closed else NEED_DATA
        if self._shut:
            raise self._err(f"{len(buf)} byte(s) after SHUT")
        if len(buf) < 4:
            return self._short()
        t = int.from_bytes(buf[0:2], "big")
        ln = int.from_bytes(buf[2:4], "big")
        if t == RpType.INVALID or t not in RP_LENGTHS:
            raise self._err(f"invalid return-path message type {t}")
        fixed = RP_LENGTHS[t]
        if fixed is not None and ln != fixed:
            raise self._err(f"{RpType(t).name} with length {ln}, expected {fixed}")
        if len(buf) < 4 + ln:
            return self._short()
        data = bytes(buf[4:4 + ln])
        block = None
        extra = b""
        if t == RpType.REQ_PAGES_ID:
            if ln < 13 or data[12] + 13 != ln:
                raise self._err(f"REQ_PAGES_ID with length {ln} does not match its block name")
            block = self._block = data[13:].decode("latin-1")
        elif t == RpType.REQ_PAGES:
            if self._block is None:
                raise self._err("REQ_PAGES before any REQ_PAGES_ID named a block")
            block = self._block
        elif t == RpType.RECV_BITMAP:
            if ln < 1 or data[0] + 1 != ln:
                raise self._err(f"RECV_BITMAP with length {ln} does not match its block name")
            block = data[1:].decode("latin-1")
            if len(buf) < 4 + ln + 8:
                return self._short()
            size = int.from_bytes(buf[4 + ln:12 + ln], "big")
            if size > MAX_BITMAP or size % 8:
                raise self._err(f"RECV_BITMAP of {size} bytes is absurd", self._base + 4 + ln)
            total = 4 + ln + 8 + size + 8
            if len(buf) < total:
                return self._short()
            end = int.from_bytes(buf[total - 8:total], "big")
            if end != RECV_BITMAP_END:
                raise self._err(f"RECV_BITMAP end marker 0x{end:016x}, expected 0x{RECV_BITMAP_END:016x}",
                                self._base + total - 8)
            extra = bytes(buf[4 + ln:total])
        n = 4 + ln + len(extra)
        msg = RpMessage(self._base, t, data, extra, block)
        del buf[:n]
        self._base += n
        if t == RpType.SHUT:
            self._shut = True
        return msg

    def _short(self) -> Sentinel:
        if self._closed:
            raise TruncatedError("input ended inside a return-path message", self._base, self.PATH)
        return NEED_DATA

    def messages(self) -> Iterator[RpMessage]:
        while True:
            m = self.next_message()
            if isinstance(m, Sentinel):
                return
            yield m
