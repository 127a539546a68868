"""``record``: be the destination a real QEMU migrates to, keeping the stream exactly as received.

    res = record("tcp:127.0.0.1:4444", "guest.mig")      # returns when the migration has ended

The bytes are written to ``FILE.part`` as they arrive and decoded on the fly by the sans-I/O
parser in counting mode (``StreamMonitor``); ``FILE.part`` becomes ``FILE`` only when the stream
reached its EOF record (and its vmdesc, when one follows) and the source hung up.  Otherwise the
``.part`` file stays, and the error says so: a recording that did not reach EOF never looks complete.

What is answered, as a QEMU 7.2 destination does (``DestinationResponder``): OPEN_RETURN_PATH opens
the return path on the same connection, PING gets PONG, and once the stream has been read to the
end SHUT(0) goes back, which is what the source waits for before it reports ``completed``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qevm.analysis.document import info_document
from qevm.errors import DecodeError, QevmError, TruncatedError, UsageError
from qevm.format.events import Command, CommandEvent, EndOfFile, RamTally, SectionHeader, VmDescription
from qevm.format.parser import DONE, NEED_DATA, Parser
from qevm.format.returnpath import RpMessage, pong, shut, switchover_ack
from qevm.io.reader import Analysis
from qevm.migration.channels import LISTEN_SCHEMES, Listener, SocketChannel, TransportError, listen, parse_uri

__all__ = ["Progress", "StreamMonitor", "DestinationResponder", "RecordResult", "record", "CHUNK"]

CHUNK = 1 << 20
#: after EOF, how long to wait for a vmdesc that may not come (suppress-vmdesc machines) before SHUT
VMDESC_GRACE = 1.0
#: after the stream is complete, how long to wait for the source to hang up
CLOSE_WAIT = 10.0


@dataclass
class Progress:
    """A snapshot for a live display.  ``total``: bytes to go in all, when known (send)."""

    elapsed: float
    bytes: int
    pages: int
    passes: int
    section: str
    rate: float  # bytes/s over the last second or so
    total: int | None = None
    back_bytes: int = 0
    rp_messages: int = 0
    page_requests: int = 0
    phase: str = ""


class StreamMonitor:
    """Decodes a stream while it flows (sans-I/O): read into ``get_buffer(n)``, then call
    ``buffer_updated(k)``, which returns the commands met (some need an answer); ``close()`` at the
    end of input.  Keeps an ``Analysis`` (the ``qevm info`` summary) and live counters."""

    def __init__(self, **parser_args: Any) -> None:
        parser_args.setdefault("count_pages", True)
        parser_args.setdefault("keep_raw", False)
        self.parser = Parser(**parser_args)
        self.analysis = Analysis(page_size=lambda: self.parser.page_size or 4096)
        self.pages = 0
        self.section = ""
        self.eof = False
        self.vmdesc = False
        self.postcopy = False  # POSTCOPY_LISTEN/RUN seen: no vmdesc will follow the EOF
        self.return_path = False  # OPEN_RETURN_PATH seen
        self.done = False

    @property
    def offset(self) -> int:
        return self.parser.offset

    @property
    def passes(self) -> int:
        return self.parser.passes.passes

    @property
    def complete(self) -> bool:
        """The stream reached its end: EOF record, and the vmdesc too if it had begun."""
        return self.done and self.eof

    def get_buffer(self, n: int) -> memoryview:
        return self.parser.get_buffer(n)

    def buffer_updated(self, k: int) -> list[CommandEvent]:
        self.parser.buffer_updated(k)
        return self._drain()

    def feed(self, data: bytes | bytearray | memoryview) -> list[CommandEvent]:
        self.parser.feed(data)
        return self._drain()

    def close(self) -> list[CommandEvent]:
        self.parser.close()
        return self._drain()

    def _drain(self) -> list[CommandEvent]:
        cmds: list[CommandEvent] = []
        p = self.parser
        handle = self.analysis.handle
        while True:
            ev = p.next_event()
            if ev is NEED_DATA:
                return cmds
            if ev is DONE:
                self.done = True
                return cmds
            handle(ev)  # type: ignore[arg-type]
            t = type(ev)
            if t is RamTally:
                for c in ev.counts.values():  # type: ignore[union-attr]
                    self.pages += c[0] + c[1] + c[2] + c[3]
            elif t is SectionHeader:
                self.section = f"{ev.section.idstr} {ev.kind.name}"  # type: ignore[union-attr]
            elif t is CommandEvent:
                assert isinstance(ev, CommandEvent)
                cmds.append(ev)
                if ev.cmd == Command.OPEN_RETURN_PATH:
                    self.return_path = True
                elif ev.cmd in (Command.POSTCOPY_LISTEN, Command.POSTCOPY_RUN):
                    self.postcopy = True
            elif t is EndOfFile:
                self.eof = True
                self.section = "EOF"
            elif t is VmDescription:
                self.vmdesc = True
                self.section = "vmdesc"

    def document(self) -> dict[str, Any]:
        """The ``qevm info --json`` document of what was seen so far."""
        an = self.analysis
        an.size = self.parser.offset
        an.stream_page_size = self.parser.page_size
        an.decode_devices(strict=False)
        return info_document(an)


class DestinationResponder:
    """What a migration destination answers on the return path (sans-I/O): commands in, bytes out."""

    def __init__(self, switchover_ack: bool = False) -> None:
        self.switchover_ack = switchover_ack
        self.open = False
        self.shut_sent = False
        self.sent: list[RpMessage] = []
        self.notes: list[str] = []

    def _out(self, msg: RpMessage, offset: int) -> bytes:
        b = msg.encode()
        msg.offset = offset
        self.sent.append(msg)
        return b

    def on_command(self, ev: CommandEvent, rp_offset: int) -> bytes:
        """The bytes to send back for ``ev`` (often none).  ``rp_offset``: return-path bytes so far."""
        if ev.cmd == Command.OPEN_RETURN_PATH:
            if self.open:
                self.notes.append(f"offset {ev.offset}: OPEN_RETURN_PATH again (ignored, as QEMU does)")
                return b""
            self.open = True
            return self._out(switchover_ack(), rp_offset) if self.switchover_ack else b""
        if ev.cmd == Command.PING:
            value = int.from_bytes(ev.data, "big")
            if not self.open:
                raise DecodeError(f"PING 0x{value:x} with no return path open (a QEMU destination fails here)",
                                  ev.offset)
            return self._out(pong(value), rp_offset)
        if ev.cmd == Command.POSTCOPY_RESUME:
            self.notes.append(f"offset {ev.offset}: POSTCOPY_RESUME ignored: this is not a paused postcopy "
                              "destination (QEMU ignores it too)")
        elif ev.cmd == Command.RECV_BITMAP:
            raise DecodeError("RECV_BITMAP outside postcopy recovery (a QEMU destination fails here)", ev.offset)
        elif ev.cmd == Command.ENABLE_COLO:
            self.notes.append(f"offset {ev.offset}: ENABLE_COLO: COLO checkpoints are not answered")
        return b""

    def finish(self, ok: bool, rp_offset: int) -> bytes:
        """SHUT(0) after a complete load, SHUT(1) after a failed one; nothing if no return path."""
        if not self.open or self.shut_sent:
            return b""
        self.shut_sent = True
        return self._out(shut(0 if ok else 1), rp_offset)


@dataclass
class RecordResult:
    output: str
    complete: bool
    bytes: int
    seconds: float
    listen: str
    source: str
    return_path: bool
    sent: list[RpMessage]
    notes: list[str] = field(default_factory=list)
    monitor: StreamMonitor | None = None

    def document(self) -> dict[str, Any]:
        return {
            "record": {
                "output": self.output, "complete": self.complete, "bytes": self.bytes,
                "seconds": round(self.seconds, 3),
                "rate_bytes_per_s": round(self.bytes / self.seconds) if self.seconds > 0 else None,
                "listen": self.listen, "source": self.source, "return_path": self.return_path,
                "return_path_sent": [m.info() for m in self.sent], "notes": self.notes,
            },
            "stream": self.monitor.document() if self.monitor is not None else None,
        }


class _Rate:
    """Bytes per second over a sliding window of about a second."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def update(self, now: float, total: int) -> float:
        self.marks.append((now, total))
        while len(self.marks) > 2 and now - self.marks[1][0] >= 1.0:
            self.marks.pop(0)
        t0, b0 = self.marks[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _where(mon: StreamMonitor) -> str:
    return f"offset {mon.offset}" + (f", in {mon.section}" if mon.section else "")


def record(uri: str, output: str, *, timeout: float = 60.0, accept_timeout: float | None = None,
           progress: Callable[[Progress], None] | None = None, interval: float = 0.2,
           switchover_ack: bool = False, on_listen: Callable[[str], None] | None = None) -> RecordResult:
    """Listen on ``uri`` (tcp/unix/vsock), take one incoming migration, write it to ``output``.

    ``timeout``: seconds without a byte from the source before giving up (stall);
    ``accept_timeout``: seconds to wait for the source to connect (None: forever).
    Raises ``TransportError`` (no connection, drop, stall), ``DecodeError`` (garbage) or
    ``UsageError``; in every such case ``output`` is not created and ``output.part`` is kept."""
    u = parse_uri(uri, LISTEN_SCHEMES)
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory {directory} does not exist")
    part = output + ".part"
    with listen(u) as lst:
        if on_listen is not None:
            on_listen(lst.address)
        conn = lst.accept(accept_timeout)
        try:
            return _record(conn, lst, output, part, timeout, progress, interval, switchover_ack)
        finally:
            conn.close()


def _record(conn: SocketChannel, lst: Listener, output: str, part: str, timeout: float,
            progress: Callable[[Progress], None] | None, interval: float, switchover_ack: bool) -> RecordResult:
    t0 = time.monotonic()
    mon = StreamMonitor()
    resp = DestinationResponder(switchover_ack)
    rp_bytes = 0
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kept = f"; the partial recording is kept in {part}"
    sock = conn.sock
    sock.settimeout(0.2)
    last_data = t0
    eof_at: float | None = None
    complete_at: float | None = None
    next_show = t0
    rate = _Rate()
    bytes_in = 0
    closed_by_peer = False

    def send_back(b: bytes) -> None:
        nonlocal rp_bytes
        if b:
            conn.sendall(b)
            rp_bytes += len(b)

    def show(now: float, phase: str) -> None:
        nonlocal next_show
        if progress is not None and now >= next_show:
            next_show = now + interval
            progress(Progress(now - t0, bytes_in, mon.pages, mon.passes, mon.section, rate.update(now, bytes_in),
                              back_bytes=rp_bytes, rp_messages=len(resp.sent), phase=phase))

    try:
        while True:
            view = mon.get_buffer(CHUNK)
            try:
                k = sock.recv_into(view, CHUNK)
            except TimeoutError:
                k = -1
            except OSError as e:
                view.release()
                raise TransportError(f"connection from {conn.peer} lost at {_where(mon)}: "
                                     f"{e.strerror or e}" + kept) from None
            if k < 0:  # nothing for a moment
                view.release()
                now = time.monotonic()
                extra = lst.poll_accept()
                if extra is not None:
                    extra.close()
                    raise TransportError("the source opened a second connection (multifd or postcopy-preempt "
                                         "channels): qevm record takes a single channel; use qevm tap"
                                         + kept)
                if (eof_at is not None and not resp.shut_sent and now - last_data >= VMDESC_GRACE
                        and not mon.parser.buffered()):
                    send_back(resp.finish(True, rp_bytes))  # no vmdesc came: this machine suppresses it
                    complete_at = now
                if complete_at is not None and now - complete_at >= min(timeout, CLOSE_WAIT):
                    break  # the stream is complete; the source keeps the connection open: done anyway
                if now - last_data >= timeout:
                    raise TransportError(f"no data from the source {conn.peer} for {timeout:g}s "
                                         f"(stalled at {_where(mon)})" + kept)
                show(now, "waiting")
                continue
            if k == 0:
                view.release()
                closed_by_peer = True
                break
            chunk = view[:k]
            _write_all(fd, chunk)
            chunk.release()
            view.release()
            bytes_in += k
            now = last_data = time.monotonic()
            try:
                for ev in mon.buffer_updated(k):
                    send_back(resp.on_command(ev, rp_bytes))
            except DecodeError as e:
                e.msg += kept
                raise
            if mon.eof and eof_at is None:
                eof_at = now
            if eof_at is not None and not resp.shut_sent and (mon.vmdesc or mon.postcopy):
                send_back(resp.finish(True, rp_bytes))
                complete_at = now
            show(now, "postcopy" if mon.postcopy else "precopy")
        try:
            mon.close()
        except TruncatedError as e:
            what = "closed the connection" if closed_by_peer else "kept the connection open but stopped"
            raise TransportError(f"the source {conn.peer} {what} before the end of the stream: {e}" + kept) from None
        except DecodeError as e:
            e.msg += kept
            raise
        if not mon.complete:  # pragma: no cover - close() raises when the stream is incomplete
            raise TransportError(f"the stream from {conn.peer} ended without an EOF record" + kept)
        try:
            send_back(resp.finish(True, rp_bytes))  # if not sent yet (the source hung up right after EOF)
        except TransportError:
            resp.notes.append("SHUT(0) could not be sent: the source had already hung up")
        os.close(fd)
        fd = -1
        os.replace(part, output)
    except QevmError:
        with contextlib.suppress(TransportError):
            send_back(resp.finish(False, rp_bytes))
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    now = time.monotonic()
    if progress is not None:
        next_show = 0.0
        show(now, "complete")
    return RecordResult(output, True, bytes_in, now - t0, lst.address, conn.peer, resp.open, resp.sent,
                        resp.notes, mon)
