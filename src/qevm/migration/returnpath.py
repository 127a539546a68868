"""Both ends of the return path (destination -> source) of a live migration; the messages
themselves are built and decoded by ``qevm.format.returnpath``.

* ``DestinationResponder`` (sans-I/O): what a migration destination answers, command in, bytes
  out; ``record`` and the engine's incoming side use it.
* ``ReturnPathReader``: the source's end, a thread that reads and decodes what the destination
  sends (PONG, SHUT, page requests...) until SHUT, EOF or ``stop()``; ``send`` and the engine's
  outgoing migration use it.
"""

from __future__ import annotations

import select
import threading
import time

from qevm.errors import DecodeError, QevmError
from qevm.format.events import CommandEvent
from qevm.format.records import Command
from qevm.format.returnpath import RpDecoder, RpMessage, RpType, pong, shut, switchover_ack
from qevm.migration.channels import Channel, TransportError

__all__ = ["DestinationResponder", "ReturnPathReader", "PRECOPY_MESSAGES"]

#: what a destination sends during a precopy migration
PRECOPY_MESSAGES = frozenset({RpType.PONG, RpType.SHUT, RpType.SWITCHOVER_ACK})


class DestinationResponder:
    """What a migration destination answers on the return path (sans-I/O), as a QEMU 7.2 one does:
    OPEN_RETURN_PATH opens it (SWITCHOVER_ACK at once with ``switchover_ack``, as QEMU >= 8.1),
    PING gets PONG (a PING with no return path open fails the load), and ``finish`` gives SHUT(0)
    after a complete load, SHUT(1) after a failed one.  ``sent`` keeps every message sent."""

    def __init__(self, switchover_ack: bool = False, *, channel_has_return_path: bool = True) -> None:
        self.switchover_ack = switchover_ack
        self.channel_has_return_path = channel_has_return_path
        self.open = False
        self.shut_sent = False
        self.sent: list[RpMessage] = []
        self.notes: list[str] = []

    def _out(self, msg: RpMessage, offset: int) -> bytes:
        b = msg.encode()
        msg.offset = offset
        self.sent.append(msg)
        return b

    def on_command(self, ev: CommandEvent, rp_offset: int = 0) -> bytes:
        """The bytes to send back for ``ev`` (often none).  ``rp_offset``: return-path bytes so far."""
        if ev.cmd == Command.OPEN_RETURN_PATH:
            if not self.channel_has_return_path:
                raise DecodeError("the source asked for a return path on a channel that has none", ev.offset)
            if self.open:
                self.notes.append(f"offset {ev.offset}: OPEN_RETURN_PATH again (ignored, as QEMU does)")
                return b""
            self.open = True
            return self._out(switchover_ack(), rp_offset) if self.switchover_ack else b""
        if ev.cmd == Command.PING:
            value = int.from_bytes(ev.data[:4], "big")
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

    def finish(self, ok: bool, rp_offset: int = 0) -> bytes:
        """SHUT(0) after a complete load, SHUT(1) after a failed one; nothing if no return path."""
        if not self.open or self.shut_sent:
            return b""
        self.shut_sent = True
        return self._out(shut(0 if ok else 1), rp_offset)


class ReturnPathReader:
    """Reads and decodes what the destination sends back, in a thread, until SHUT, the end of the
    channel or ``stop()``.  ``allowed``: the message types expected (others are an error, e.g.
    ``PRECOPY_MESSAGES``); None takes every message."""

    def __init__(self, chan: Channel, *, allowed: frozenset[RpType] | None = None, name: str = "qevm-return-path"
                 ) -> None:
        self.chan = chan
        self.allowed = allowed
        self.dec = RpDecoder()
        self.messages: list[RpMessage] = []
        self.pongs: list[int] = []
        self.shut_status: int | None = None
        self.error: QevmError | None = None
        self.eof = threading.Event()  # the reader has ended (SHUT, end of channel, error or stop)
        self.shut = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            while not self._stop.is_set():
                try:
                    r, _, _ = select.select([self.chan.fileno()], [], [], 0.2)
                    if not r:
                        continue
                    k = self.chan.recv_into(view)
                except (BlockingIOError, TimeoutError, InterruptedError):
                    continue
                except (OSError, ValueError, QevmError) as e:
                    if not self._stop.is_set():
                        self.error = TransportError(f"{self.chan.peer}: return path lost: {e}")
                        self.error.__cause__ = e
                    return
                if k == 0:
                    return
                try:
                    self.dec.feed(view[:k])
                    for m in self.dec.messages():
                        self._message(m)
                        if self.shut.is_set():
                            return
                except QevmError as e:
                    self.error = e
                    return
        finally:
            view.release()
            self.eof.set()

    def _message(self, m: RpMessage) -> None:
        if self.allowed is not None and m.type not in self.allowed:
            raise DecodeError(f"unexpected {m.name} message on the return path", m.offset)
        self.messages.append(m)
        if m.type == RpType.PONG:
            self.pongs.append(int.from_bytes(m.data, "big"))
        elif m.type == RpType.SHUT:
            self.shut_status = int.from_bytes(m.data, "big")
            self.shut.set()

    def wait_shut(self, timeout: float, abort: threading.Event | None = None) -> int | None:
        """Wait for the destination's SHUT; its status, or None when the reader ended without one
        (the channel closed, or ``abort`` was set).  Raises the reader's error, or
        ``TransportError`` when nothing came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.eof.wait(0.05):
            if abort is not None and abort.is_set():
                return None
            if time.monotonic() > deadline:
                raise TransportError(f"no SHUT on the return path within {timeout:g}s")
        if self.error is not None:
            raise self.error
        return self.shut_status

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
