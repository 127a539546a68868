"""``tap``: sit between a source QEMU and a destination QEMU, pass every byte through, decode on the way.

    res = tap("tcp:127.0.0.1:4444", "tcp:127.0.0.1:5555", output="seen.mig")

The source connects to the listening address (or the stream is read from any other ``-incoming``
URI: ``exec:``, ``fd:``, ``file:``); the tap opens the destination (a QEMU started with
``-incoming``, or any ``migrate`` URI) and pumps both directions unchanged, each in its own thread
(the return path only when both ends are sockets): the migration
stream forward, decoded as it passes by a ``StreamMonitor`` (and optionally recorded), and the
return path backward, decoded by ``RpDecoder`` (PONGs, postcopy page requests, SHUT).  Further
connections from the source (multifd channels, the postcopy-preempt channel) are paired with new
connections to the destination, in the same order, and forwarded as they are; a multifd channel is
decoded on the way (``qevm.format.multifd.ChannelDecoder``: packets, pages, syncs).

Decoding never changes what is forwarded: if the stream does not decode, the bytes still go
through, and the error is reported when the migration has ended.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qevm.errors import DecodeError, QevmError, UsageError
from qevm.format.multifd import MULTIFD_MAGIC, ChannelDecoder, MultifdInit, MultifdPacket
from qevm.format.returnpath import RpDecoder, RpMessage, RpType
from qevm.migration.channels import (
    SEND_SCHEMES,
    Channel,
    Incoming,
    MigrationURI,
    SocketChannel,
    TransportError,
    open_incoming,
    open_outgoing,
    parse_uri,
)
from qevm.migration.pushparser import StreamMonitor
from qevm.migration.session import CHUNK, Progress, Rate, write_all

__all__ = ["TapResult", "tap"]

#: return-path messages kept for the summary (all are counted)
KEEP_RP = 10000


@dataclass
class SideChannel:
    source: str
    forward: int = 0
    back: int = 0
    kind: str = "?"  # "multifd" (decoded: packets, pages, syncs) or "?" (postcopy preempt, unknown)
    channel: int | None = None  # the multifd channel id of its initial packet
    packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    syncs: int = 0


@dataclass
class TapResult:
    output: str | None
    complete: bool
    forward_bytes: int
    back_bytes: int
    seconds: float
    listen: str
    source: str
    target: str
    rp_messages: list[RpMessage]
    rp_counts: dict[str, int]
    side_channels: list[SideChannel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    monitor: StreamMonitor | None = None

    @property
    def page_requests(self) -> int:
        return self.rp_counts.get("REQ_PAGES", 0) + self.rp_counts.get("REQ_PAGES_ID", 0)

    def document(self) -> dict[str, Any]:
        return {
            "tap": {
                "output": self.output, "complete": self.complete, "seconds": round(self.seconds, 3),
                "forward_bytes": self.forward_bytes, "back_bytes": self.back_bytes,
                "rate_bytes_per_s": round(self.forward_bytes / self.seconds) if self.seconds > 0 else None,
                "listen": self.listen, "source": self.source, "target": self.target,
                "return_path": {"messages": self.rp_counts, "page_requests": self.page_requests,
                                "list": [m.info() for m in self.rp_messages]},
                "side_channels": [vars(s) for s in self.side_channels], "notes": self.notes,
            },
            "stream": self.monitor.document() if self.monitor is not None else None,
        }


def tap(listen_uri: str, target_uri: str, *, output: str | None = None, rp_output: str | None = None,
        timeout: float = 60.0, accept_timeout: float | None = None,
        progress: Callable[[Progress], None] | None = None, interval: float = 0.2,
        on_listen: Callable[[str], None] | None = None) -> TapResult:
    """Forward one migration from ``listen_uri`` (any ``-incoming`` URI) to ``target_uri`` (any
    ``migrate`` URI), decoding it.

    ``output``: record the forward stream there (``output.part`` until it is complete);
    ``rp_output``: record the return-path bytes.  ``timeout``: seconds with no byte in either
    direction before giving up.  Raises ``TransportError`` / ``DecodeError`` after the migration
    has ended when it did not end well."""
    tu = parse_uri(target_uri, SEND_SCHEMES)
    for path in (output, rp_output):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f"output directory of {path} does not exist")
    inc = open_incoming(listen_uri)
    try:
        if on_listen is not None and inc.listener is not None:
            on_listen(inc.address)
        src = inc.accept(accept_timeout, keep_listening=True)
        dst = open_outgoing(tu, timeout=timeout)
        if isinstance(dst, SocketChannel):
            dst.settimeout(None)
        s = _Session(inc, tu, src, dst, output, rp_output, timeout, progress, interval)
        try:
            return s.run()
        finally:
            s.cleanup()
    finally:
        inc.close()


class _Session:
    def __init__(self, inc: Incoming, target: MigrationURI, src: Channel, dst: Channel,
                 output: str | None, rp_output: str | None, timeout: float,
                 progress: Callable[[Progress], None] | None, interval: float) -> None:
        self.inc = inc
        self.target = target
        self.src = src
        self.dst = dst
        self.output = output
        self.part = output + ".part" if output else None
        self.timeout = timeout
        self.progress = progress
        self.interval = interval
        self.mon = StreamMonitor()
        self.rp = RpDecoder()
        self.rp_msgs: list[RpMessage] = []
        self.rp_counts: dict[str, int] = {}
        self.fwd = 0
        self.back = 0
        self.activity = time.monotonic()
        self.errors: list[QevmError] = []
        self.decode_error: DecodeError | None = None
        self.rp_error: DecodeError | None = None
        self.notes: list[str] = []
        self.stop = threading.Event()
        self.side: list[SideChannel] = []
        self.side_socks: list[Channel] = []
        self.side_threads: list[threading.Thread] = []
        self.out_fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if self.part else -1
        self.rp_fd = os.open(rp_output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if rp_output else -1
        if isinstance(src, SocketChannel):
            src.settimeout(None)

    def _error(self, e: QevmError) -> None:
        self.errors.append(e)

    # -- the two pumps of the main channel --------------------------------------------------------
    def _forward(self) -> None:
        mon, src, dst = self.mon, self.src, self.dst
        decoding = True
        try:
            while True:
                view = mon.get_buffer(CHUNK)
                try:
                    k = src.recv_into(view, CHUNK)
                except (OSError, TransportError) as e:
                    view.release()
                    if not self.stop.is_set():
                        why = e.strerror if isinstance(e, OSError) and e.strerror else e
                        self._error(TransportError(f"connection from the source {self.src.peer} lost at offset "
                                                   f"{self.fwd}: {why}"))
                    return
                if k == 0:
                    view.release()
                    break
                chunk = view[:k]
                try:
                    dst.sendall(chunk)
                except TransportError as e:
                    chunk.release()
                    view.release()
                    if not self.stop.is_set():
                        self._error(TransportError(f"the destination {self.target} closed the connection while "
                                                   f"the stream was at offset {self.fwd}: {e}"))
                    self.src.abort()  # the source must not believe it is being heard
                    return
                if self.out_fd >= 0:
                    write_all(self.out_fd, chunk)
                chunk.release()
                view.release()
                self.fwd += k
                self.activity = time.monotonic()
                if decoding:
                    try:
                        mon.buffer_updated(k)
                    except DecodeError as e:
                        self.decode_error = e
                        decoding = False  # keep forwarding; reported at the end
            if decoding:
                try:
                    mon.close()
                except DecodeError as e:
                    self.decode_error = e
        finally:
            self.dst.shutdown_write()

    def _backward(self) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        src, dst = self.src, self.dst
        try:
            while True:
                try:
                    k = dst.recv_into(view)
                except (OSError, TransportError) as e:
                    if not self.stop.is_set() and not self.mon.complete:
                        self._error(TransportError(f"connection to the destination {self.target} lost: "
                                                   f"{e}"))
                    return
                if k == 0:
                    break
                try:
                    src.sendall(view[:k])
                except TransportError as e:
                    if not self.stop.is_set():
                        self._error(TransportError(f"the source {self.src.peer} closed its return path while "
                                                   f"the destination was answering: {e}"))
                    return
                if self.rp_fd >= 0:
                    write_all(self.rp_fd, view[:k])
                self.back += k
                self.activity = time.monotonic()
                if self.rp_error is None:
                    try:
                        self.rp.feed(view[:k])
                        for m in self.rp.messages():
                            self.rp_counts[m.name] = self.rp_counts.get(m.name, 0) + 1
                            if len(self.rp_msgs) < KEEP_RP:
                                self.rp_msgs.append(m)
                    except DecodeError as e:
                        self.rp_error = e
        finally:
            view.release()
            self.src.shutdown_write()

    # -- further channels (multifd, postcopy preempt): forwarded, not decoded -----------------------
    def _acceptor(self) -> None:
        lst = self.inc.listener
        if lst is None:
            return
        while not self.stop.is_set():
            try:
                conn = lst.accept(0.2, self.stop)
            except TransportError:
                if lst.sock is None:
                    return
                continue
            try:
                dst = open_outgoing(self.target, timeout=self.timeout)
            except TransportError as e:
                conn.close()
                self._error(e)
                continue
            sc = SideChannel(conn.peer)
            self.side.append(sc)
            self.side_socks += [conn, dst]
            for a, b, key in ((conn, dst, "forward"), (dst, conn, "back")):
                t = threading.Thread(target=self._raw, args=(a, b, sc, key), daemon=True)
                t.start()
                self.side_threads.append(t)

    def _raw(self, a: Channel, b: Channel, sc: SideChannel, key: str) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        dec: ChannelDecoder | None = None
        try:
            while True:
                k = a.recv_into(view)
                if k == 0:
                    break
                b.sendall(view[:k])
                if key == "forward" and sc.forward == 0 and int.from_bytes(view[:4], "big") == MULTIFD_MAGIC:
                    sc.kind = "multifd"
                    dec = ChannelDecoder(self.mon.parser.page_size or 4096)
                setattr(sc, key, getattr(sc, key) + k)
                self.activity = time.monotonic()
                if dec is not None:
                    dec = self._decode_side(dec, sc, view[:k])
        except (OSError, TransportError) as e:
            if not self.stop.is_set():
                self.notes.append(f"side channel from {sc.source}: {key} direction ended with {e}")
        finally:
            view.release()
            b.shutdown_write()

    def _decode_side(self, dec: ChannelDecoder, sc: SideChannel, data: memoryview) -> ChannelDecoder | None:
        """Count what a multifd channel carries; None (stop decoding) when it does not decode."""
        try:
            for item in dec.feed(data):
                if isinstance(item, MultifdInit):
                    sc.channel = item.channel
                    continue
                pkt = item[0]  # type: ignore[index]
                sc.packets += 1
                if isinstance(pkt, MultifdPacket):
                    sc.pages += pkt.normal
                    sc.zero_pages += pkt.zero
                    sc.syncs += pkt.is_sync
        except DecodeError as e:
            self.notes.append(f"side channel from {sc.source} (multifd) did not decode: {e}")
            return None
        return dec

    # -- the session ---------------------------------------------------------------------------------
    def run(self) -> TapResult:
        t0 = time.monotonic()
        pumps = [threading.Thread(target=self._forward, name="qevm-tap-forward", daemon=True)]
        if self.src.has_return_path and self.dst.has_return_path:
            pumps.append(threading.Thread(target=self._backward, name="qevm-tap-back", daemon=True))
        acceptor = threading.Thread(target=self._acceptor, name="qevm-tap-accept", daemon=True)
        for t in pumps:
            t.start()
        acceptor.start()
        rate = Rate()
        while any(t.is_alive() for t in pumps):
            pumps[0].join(self.interval)
            now = time.monotonic()
            if self.progress is not None:
                self.progress(self._snapshot(now - t0, rate.update(now, self.fwd)))
            if now - self.activity > self.timeout and any(t.is_alive() for t in pumps):
                self._error(TransportError(f"nothing crossed the tap for {self.timeout:g}s (forward stream at "
                                           f"offset {self.fwd}, in {self.mon.section or 'the header'})"))
                self.stop.set()
                self.src.abort()
                self.dst.abort()
        # the main channel is over; give the side channels their time, then stop taking new ones
        deadline = time.monotonic() + self.timeout
        for t in self.side_threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()
        acceptor.join(2)
        for s in self.side_socks:
            s.abort()
        now = time.monotonic()
        if self.progress is not None:
            self.progress(self._snapshot(now - t0, 0.0, "complete" if self.mon.complete else "ended"))
        self._finish_files()
        if self.rp_error is not None:
            self.notes.append(f"the return path did not decode: {self.rp_error}")
        if self.mon.return_path and len(pumps) == 1:
            self.notes.append("the stream opens a return path; one end of the tap carries none")
        return TapResult(self.output, True, self.fwd, self.back, now - t0, self.inc.address, self.src.peer,
                         str(self.target), self.rp_msgs, self.rp_counts, self.side, self.notes, self.mon)

    def _snapshot(self, elapsed: float, rate: float, phase: str | None = None) -> Progress:
        req = self.rp_counts.get("REQ_PAGES", 0) + self.rp_counts.get("REQ_PAGES_ID", 0)
        if phase is None:
            phase = "postcopy" if self.mon.postcopy else "precopy"
            if self.side:
                phase += f" +{len(self.side)} ch"
        return Progress(elapsed, self.fwd, self.mon.pages, self.mon.passes, self.mon.section, rate,
                        back_bytes=self.back, rp_messages=sum(self.rp_counts.values()), page_requests=req,
                        phase=phase)

    def _finish_files(self) -> None:
        kept = f"; the partial recording is kept in {self.part}" if self.part else ""
        for fd in (self.out_fd, self.rp_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.rp_fd = -1
        if self.decode_error is not None:
            e = self.decode_error
            e.msg += " (the bytes were forwarded unchanged)" + kept
            raise e
        if self.errors:
            e0 = self.errors[0]
            if kept and isinstance(e0, TransportError):
                raise TransportError(str(e0) + kept)
            raise e0
        if not self.mon.complete:  # pragma: no cover - close() raised already
            raise TransportError("the stream ended without an EOF record" + kept)
        if self.part and self.output:
            os.replace(self.part, self.output)
        s = self.rp_counts.get(RpType.SHUT.name)
        if self.mon.return_path and not s:
            self.notes.append("the return path was opened but the destination sent no SHUT")

    def cleanup(self) -> None:
        self.stop.set()
        for fd in (self.out_fd, self.rp_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for c in (self.src, self.dst, *self.side_socks):
            with contextlib.suppress(QevmError):
                c.close()
