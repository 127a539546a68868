"""``send``: be the source of a migration: stream a recorded (or edited) stream into a real QEMU.

    res = send("guest.mig", "tcp:127.0.0.1:4444")          # a QEMU waiting with -incoming tcp:...

The file is decoded while it is sent (nothing undecodable leaves: a chunk goes out once the parser
has accepted it).  When the stream opens a return path (OPEN_RETURN_PATH), the destination's
answers are read and decoded, and, like a QEMU source, ``send`` waits for its SHUT: SHUT(0) means
the destination loaded everything.  Without a return path it half-closes and waits for the
destination to hang up.

``max_bandwidth`` limits the rate (``qevm.migration.ratelimit``).  ``live=True`` re-sends RAM the way a live
source does (``LiveResender``): the pages go out in many PART sections, then a subset of them again
in later passes, before the END and the device sections; each chunk is framed with EOS and a footer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qevm.codec.schema import Schema
from qevm.codec.wire import be32, be64
from qevm.errors import UsageError
from qevm.format.events import (
    CommandEvent,
    EndOfFile,
    Event,
    Footer,
    MappedRamBitmap,
    MappedRamData,
    RamControl,
    RamPage,
    RamTally,
    SectionHeader,
)
from qevm.format.parser import Parser
from qevm.format.records import Command, RamFlag, RecordType, SectionKind, ram_record_head
from qevm.format.returnpath import RpMessage
from qevm.io.reader import drive, trailer_schema
from qevm.io.sources import Input, open_input
from qevm.migration.channels import SEND_SCHEMES, Channel, SocketChannel, TransportError, open_outgoing, parse_uri
from qevm.migration.pushparser import StreamMonitor
from qevm.migration.ratelimit import RateLimiter
from qevm.migration.returnpath import ReturnPathReader
from qevm.migration.session import CHUNK, Progress, Rate

__all__ = ["SendResult", "LiveResender", "send"]

_EOS = be64(RamFlag.EOS)
_CONT = int(RamFlag.CONTINUE)
_FOOTER = bytes((RecordType.FOOTER,))


@dataclass
class SendResult:
    source: str
    target: str
    bytes: int
    input_bytes: int
    seconds: float
    live: bool
    return_path: bool
    rp_messages: list[RpMessage]
    shut_status: int | None
    resent_pages: int = 0
    notes: list[str] = field(default_factory=list)
    monitor: StreamMonitor | None = None

    def document(self) -> dict[str, Any]:
        return {
            "send": {
                "source": self.source, "target": self.target, "bytes": self.bytes, "input_bytes": self.input_bytes,
                "seconds": round(self.seconds, 3),
                "rate_bytes_per_s": round(self.bytes / self.seconds) if self.seconds > 0 else None,
                "live": self.live, "resent_pages": self.resent_pages, "return_path": self.return_path,
                "return_path_messages": [m.info() for m in self.rp_messages], "shut_status": self.shut_status,
                "notes": self.notes,
            },
            "stream": self.monitor.document() if self.monitor is not None else None,
        }


class LiveResender:
    """Re-frames the RAM of a precopy stream the way a live source sends it.

    Every page record of the input's RAM PART and END sections goes out, in input order, in PART
    sections of about ``chunk`` bytes (pass 1).  A subset of the pages (every ``stride``-th distinct
    page, up to ``budget`` bytes) is kept, always as its latest record, and sent again in the later
    passes: all of it in pass 2, a quarter in pass 3, and so on up to ``passes``; the last chunk is
    the END section.  Re-sending a page's latest record changes nothing in the destination's memory
    (ZERO and PAGE overwrite the page, an XBZRLE delta overwrites the same bytes again).  Everything
    else (header, configuration, commands, other sections, EOF, vmdesc) goes out unchanged.
    ``write`` receives the output bytes; ``parser`` is the input parser (for the footer setting)."""

    def __init__(self, write: Callable[[bytes], None], parser: Parser, *, chunk: int = 1 << 20,
                 budget: int = 32 << 20, stride: int = 16, passes: int = 3) -> None:
        if passes < 1:
            raise UsageError("--live needs at least one pass")
        self.write = write
        self.parser = parser
        self.chunk = chunk
        self.budget = budget
        self.stride = stride
        self.passes = passes
        self.sid: int | None = None
        self.state: str | None = None  # "payload": in an input RAM PART/END; "footer": its footer may follow
        self.in_end = False
        self.buf = bytearray()
        self.last_block: str | None = None
        self.cache: dict[tuple[str, int], tuple[int, bytes]] = {}
        self.cache_bytes = 0
        self.distinct = 0
        self.parts = 0
        self.resent = 0
        self.ram_done = False

    def _footer(self) -> bytes:
        assert self.sid is not None
        return _FOOTER + be32(self.sid) if self.parser.footers else b""

    def _record(self, block: str, addr: int, kind: int, payload: bytes) -> None:
        if block == self.last_block:
            self.buf += ram_record_head(addr, kind | _CONT, None)
        else:
            self.buf += ram_record_head(addr, kind, block)
            self.last_block = block
        self.buf += payload

    def _flush(self, kind: SectionKind = SectionKind.PART) -> None:
        if not self.buf and kind == SectionKind.PART:
            return
        assert self.sid is not None
        self.write(bytes((kind,)) + be32(self.sid) + bytes(self.buf) + _EOS + self._footer())
        self.buf.clear()
        self.parts += 1

    def _page(self, ev: RamPage) -> None:
        kind = ev.flags & ~_CONT
        self._record(ev.block, ev.addr, kind, ev.payload)
        if len(self.buf) >= self.chunk:
            self._flush()
        key = (ev.block, ev.addr)
        old = self.cache.get(key)
        if old is not None:
            self.cache[key] = (kind, ev.payload)
            self.cache_bytes += len(ev.payload) - len(old[1])
            return
        self.distinct += 1
        if self.distinct % self.stride == 0 and self.cache_bytes + len(ev.payload) <= self.budget:
            self.cache[key] = (kind, ev.payload)
            self.cache_bytes += len(ev.payload) + 16

    def _finish_ram(self) -> None:
        self._flush()  # the rest of pass 1
        keys = list(self.cache)
        for p in range(2, self.passes + 1):
            step = 4 ** (p - 2)
            for i in range(0, len(keys), step):
                block, addr = keys[i]
                kind, payload = self.cache[keys[i]]
                self._record(block, addr, kind, payload)
                self.resent += 1
                if len(self.buf) >= self.chunk:
                    self._flush()
        self._flush(SectionKind.END)  # the last chunk (maybe only EOS) completes the section
        self.ram_done = True

    def handle(self, ev: Event) -> None:
        t = type(ev)
        if self.state == "footer":
            self.state = None
            if t is Footer:
                return  # our own sections carry their footers
        if self.state == "payload":
            if t is RamPage:
                assert isinstance(ev, RamPage)
                self._page(ev)
                return
            if t is RamControl:
                assert isinstance(ev, RamControl)
                if ev.flags == RamFlag.EOS:
                    self.state = "footer"
                    if self.in_end:
                        self._finish_ram()
                else:
                    self.buf += ev.encode()  # MULTIFD_FLUSH / HOOK travel with the pages
                return
            if t is RamTally:
                raise UsageError("--live needs the parser to deliver pages (count_pages=False)")
        if t is SectionHeader:
            assert isinstance(ev, SectionHeader)
            if ev.section.handler == "ram":
                if ev.kind == SectionKind.START:
                    self.sid = ev.section.section_id
                elif ev.kind in (SectionKind.PART, SectionKind.END):
                    if self.ram_done:
                        raise UsageError(f"offset {ev.offset}: RAM section after its END")
                    self.state = "payload"
                    self.in_end = ev.kind == SectionKind.END
                    return
            self._flush()
        elif t is CommandEvent:
            assert isinstance(ev, CommandEvent)
            if ev.cmd in (Command.POSTCOPY_LISTEN, Command.POSTCOPY_RUN, Command.PACKAGED,
                          Command.POSTCOPY_RAM_DISCARD, Command.POSTCOPY_RESUME):
                raise UsageError(f"--live re-sends precopy streams; this one goes postcopy ({ev.name} at offset "
                                 f"{ev.offset})")
            self._flush()
        elif t in (MappedRamBitmap, MappedRamData):
            raise UsageError("--live does not apply to mapped-ram streams (they are files, not live migrations)")
        elif t is EndOfFile:
            self._flush()
        self.write(ev.encode())


class _Sender:
    """Writes to the channel in rate-limited slices and counts; optionally decodes what it sends."""

    def __init__(self, chan: Channel, bucket: RateLimiter | None, mon: StreamMonitor, decode: bool) -> None:
        self.chan = chan
        self.bucket = bucket
        self.mon = mon
        self.decode = decode
        self.sent = 0
        self.slice = bucket.burst if bucket else CHUNK

    def write(self, data: bytes | memoryview) -> None:
        if self.decode:
            self.mon.feed(data)
        view = memoryview(data)
        try:
            for i in range(0, len(view), self.slice):
                piece = view[i:i + self.slice]
                if self.bucket is not None:
                    self.bucket.take(len(piece))
                try:
                    self.chan.sendall(piece)
                except TransportError as e:
                    where = f", in {self.mon.section}" if self.mon.section else ""
                    raise TransportError(f"the destination stopped taking the stream after {self.sent} bytes"
                                         f"{where} (did it reject it? see its log): {e}") from None
                self.sent += len(piece)
        finally:
            view.release()


def send(path: str, uri: str, *, max_bandwidth: float | None = None, live: bool = False, timeout: float = 60.0,
         progress: Callable[[Progress], None] | None = None, interval: float = 0.2,
         live_options: dict[str, int] | None = None) -> SendResult:
    """Send the stream in ``path`` (a file, ``-``, gzip/xz/bzip2 ok) to ``uri`` as a migration source.

    Raises ``DecodeError`` when the file is not a complete stream (nothing past the bad record is
    sent), ``TransportError`` when the destination cannot be reached, drops, stalls for ``timeout``
    seconds or reports a failed load (SHUT 1)."""
    u = parse_uri(uri, SEND_SCHEMES)
    if max_bandwidth is not None and max_bandwidth <= 0:
        raise UsageError(f"bandwidth {max_bandwidth} must be positive")
    inp = open_input(path)
    try:
        schema, page_size = trailer_schema(inp)
        chan = open_outgoing(u, timeout=timeout)
        try:
            return _send(inp, chan, str(u), max_bandwidth, live, timeout, progress, interval, schema, page_size,
                         live_options or {})
        except BaseException:
            chan.abort()
            with contextlib.suppress(Exception):
                chan.close()
            raise
    finally:
        inp.close()


def _send(inp: Input, chan: Channel, target: str, max_bandwidth: float | None, live: bool, timeout: float,
          progress: Callable[[Progress], None] | None, interval: float, schema: Schema | None,
          page_size: int | None, live_options: dict[str, int]) -> SendResult:
    t0 = time.monotonic()
    if isinstance(chan, SocketChannel):
        chan.settimeout(timeout)
    rp = ReturnPathReader(chan, name="qevm-send-rp") if chan.has_return_path else None
    # bursts of 50 ms of traffic, at most one read
    bucket = RateLimiter(max_bandwidth, int(max(4096, min(CHUNK, max_bandwidth / 20)))) if max_bandwidth else None
    mon = StreamMonitor(schema=schema, page_size=page_size)
    out = _Sender(chan, bucket, mon, decode=live)
    rate = Rate()
    next_show = t0
    total = inp.size if not live else None
    input_bytes = 0
    notes: list[str] = []
    resent = 0

    def show(force: bool = False, phase: str = "") -> None:
        nonlocal next_show
        now = time.monotonic()
        if progress is not None and (force or now >= next_show):
            next_show = now + interval
            n = len(rp.messages) if rp else 0
            progress(Progress(now - t0, out.sent, mon.pages, mon.passes, mon.section, rate.update(now, out.sent),
                              total=total, rp_messages=n, phase=phase or ("live" if live else "")))

    def check_peer() -> None:
        if rp is not None and rp.error is not None:
            raise rp.error
        if rp is not None and rp.shut.is_set() and rp.shut_status:
            raise TransportError(f"the destination {target} failed to load the stream (SHUT {rp.shut_status}) "
                                 f"after {out.sent} bytes")

    try:
        if live:
            parser = Parser(schema=schema, page_size=page_size, count_pages=False)
            res = LiveResender(out.write, parser, **live_options)

            def handle(ev: Event) -> None:
                res.handle(ev)
                check_peer()
                show()

            drive(parser, inp, handle, skip_regions=False)
            resent = res.resent
            input_bytes = parser.offset
            if res.sid is None:
                notes.append("no RAM section: --live sent the stream as it is")
            mon.close()
        else:
            f = inp.file
            readinto = getattr(f, "readinto", None)
            while True:
                view = mon.get_buffer(CHUNK)
                try:
                    if readinto is not None:
                        k = readinto(view) or 0
                    else:
                        data = f.read(CHUNK)
                        k = len(data)
                        view[:k] = data
                    if k == 0:
                        break
                    mon.buffer_updated(k)  # decoded before it leaves
                    out.write(view[:k])
                finally:
                    view.release()
                check_peer()
                show()
            mon.close()
            input_bytes = mon.offset
        show(True, "sent")
        return _finish(chan, rp, mon, out, target, timeout, t0, live, resent, notes, inp.name, input_bytes)
    finally:
        if rp is not None:
            rp.stop()


def _finish(chan: Channel, rp: ReturnPathReader | None, mon: StreamMonitor, out: _Sender, target: str, timeout: float,
            t0: float, live: bool, resent: int, notes: list[str], name: str, input_bytes: int) -> SendResult:
    if rp is not None:
        if mon.return_path:
            # the source's rule: wait for the destination's SHUT before calling it completed
            end = time.monotonic() + timeout
            while not rp.shut.is_set() and not rp.eof.is_set() and time.monotonic() < end:
                rp.shut.wait(0.1)
            if rp.error is not None:
                raise rp.error
            if rp.shut_status is None:
                why = "closed the connection" if rp.eof.is_set() else f"sent nothing for {timeout:g}s"
                raise TransportError(f"the destination {target} {why} without SHUT: it did not load the stream")
            if rp.shut_status:
                raise TransportError(f"the destination {target} failed to load the stream (SHUT {rp.shut_status})")
        else:
            chan.shutdown_write()
            if not rp.eof.wait(timeout):
                notes.append(f"the destination did not hang up within {timeout:g}s")
            if rp.error is not None:
                raise rp.error
            if rp.messages:
                notes.append(f"the destination sent {len(rp.messages)} return-path message(s) though none was "
                             "opened")
    elif mon.return_path:
        notes.append("the stream opens a return path; this channel carries none (nothing is answered)")
    chan.close()
    seconds = time.monotonic() - t0
    return SendResult(name, target, out.sent, input_bytes, seconds, live, mon.return_path and rp is not None,
                      rp.messages if rp else [], rp.shut_status if rp else None, resent, notes, mon)
