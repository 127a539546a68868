"""``record``: be the destination a real QEMU migrates to, keeping the stream exactly as received.

    res = record("tcp:127.0.0.1:4444", "guest.mig")      # returns when the migration has ended
    res = record("exec:cat saved.mig", "copy.mig")        # or any URI QEMU's -incoming takes

The bytes are written to ``FILE.part`` as they arrive and decoded on the fly by the sans-I/O
parser in counting mode (``StreamMonitor``); ``FILE.part`` becomes ``FILE`` only when the stream
reached its EOF record (and its vmdesc, when one follows) and the source hung up.  Otherwise the
``.part`` file stays, and the error says so: a recording that did not reach EOF never looks complete.

What is answered on a socket, as a QEMU 7.2 destination does (``DestinationResponder``):
OPEN_RETURN_PATH opens the return path on the same connection, PING gets PONG, and once the stream
has been read to the end SHUT(0) goes back, which is what the source waits for before it reports
``completed``.  ``exec:``, ``file:`` and non-socket ``fd:`` channels carry no return path: the
commands are noted, not answered.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qevm.errors import DecodeError, QevmError, TruncatedError, UsageError
from qevm.format.returnpath import RpMessage
from qevm.migration.channels import Channel, Incoming, TransportError, open_incoming
from qevm.migration.pushparser import StreamMonitor
from qevm.migration.returnpath import DestinationResponder
from qevm.migration.session import CHUNK, Progress, Rate, write_all

__all__ = ["RecordResult", "record", "VMDESC_GRACE", "CLOSE_WAIT"]

#: after EOF, how long to wait for a vmdesc that may not come (suppress-vmdesc machines) before SHUT
VMDESC_GRACE = 1.0
#: after the stream is complete, how long to wait for the source to hang up
CLOSE_WAIT = 10.0


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


def _where(mon: StreamMonitor) -> str:
    return f"offset {mon.offset}" + (f", in {mon.section}" if mon.section else "")


def record(uri: str, output: str, *, timeout: float = 60.0, accept_timeout: float | None = None,
           progress: Callable[[Progress], None] | None = None, interval: float = 0.2,
           switchover_ack: bool = False, on_listen: Callable[[str], None] | None = None) -> RecordResult:
    """Take one incoming migration from ``uri`` (every scheme of QEMU's ``-incoming``: listen on
    tcp/unix/vsock, read from ``exec:CMD``'s output, ``fd:N`` or ``file:PATH``), write it to ``output``.

    ``timeout``: seconds without a byte from the source before giving up (stall);
    ``accept_timeout``: seconds to wait for the source to connect (None: forever).
    Raises ``TransportError`` (no connection, drop, stall), ``DecodeError`` (garbage) or
    ``UsageError``; in every such case ``output`` is not created and ``output.part`` is kept."""
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory {directory} does not exist")
    part = output + ".part"
    inc = open_incoming(uri)
    try:
        if on_listen is not None and inc.listener is not None:
            on_listen(inc.address)
        conn = inc.accept(accept_timeout, keep_listening=True)
        return _record(conn, inc, output, part, timeout, progress, interval, switchover_ack)
    finally:
        inc.close()


def _record(conn: Channel, inc: Incoming, output: str, part: str, timeout: float,
            progress: Callable[[Progress], None] | None, interval: float, switchover_ack: bool) -> RecordResult:
    t0 = time.monotonic()
    mon = StreamMonitor()
    resp = DestinationResponder(switchover_ack)
    two_way = conn.has_return_path
    rp_bytes = 0
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kept = f"; the partial recording is kept in {part}"
    last_data = t0
    eof_at: float | None = None
    complete_at: float | None = None
    next_show = t0
    rate = Rate()
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
                k = conn.recv_into(view, CHUNK) if conn.readable(0.2) else -1
            except (OSError, TransportError) as e:
                view.release()
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise TransportError(f"connection from {conn.peer} lost at {_where(mon)}: {why}" + kept) from e
            if k < 0:  # nothing for a moment
                view.release()
                now = time.monotonic()
                extra = inc.listener.poll_accept() if inc.listener is not None else None
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
            write_all(fd, chunk)
            chunk.release()
            view.release()
            bytes_in += k
            now = last_data = time.monotonic()
            try:
                for ev in mon.buffer_updated(k):
                    if two_way:
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
        if mon.return_path and not two_way:
            resp.notes.append(f"the stream opens a return path; {conn.name} carries none (nothing was answered)")
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
    return RecordResult(output, True, bytes_in, now - t0, inc.address, conn.peer, resp.open, resp.sent,
                        resp.notes, mon)
