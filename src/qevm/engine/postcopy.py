"""Postcopy RAM migration for the engine, both ends, as QEMU 10.0 runs it (migration/migration.c,
savevm.c, ram.c, postcopy-ram.c).

Source (``PostcopySource``, driven by ``qevm.engine.migration.MigrationState``):

1. with ``postcopy-ram`` on, the return path is opened (OPEN_RETURN_PATH, PING 1) and
   POSTCOPY_ADVISE carries the RAM page-size summary and the target page size (be64 each);
2. precopy passes run as usual until ``migrate-start-postcopy``; at the next iteration the switchover
   stops the VM (finish-migrate, status device), syncs the dirty log one last time, sends
   POSTCOPY_RAM_DISCARD commands for every dirty page (byte ranges, at most 12 per command),
   PING 2, then PACKAGED: a blob holding POSTCOPY_LISTEN, the device sections (no EOF, no vmdesc),
   PING 3 and POSTCOPY_RUN; then PING 4 and status postcopy-active (``downtime`` ends here);
3. the remaining dirty pages go out in PART sections at ``max-postcopy-bandwidth`` while the
   return-path thread queues the destination's page requests (REQ_PAGES_ID / REQ_PAGES): before
   each page of the scan the queue is served first, the requested pages are flushed at once and the
   scan goes on after them (QEMU's get_queued_page);
4. END ram (nothing left), EOF, and completed on the destination's SHUT(0); the VM stays stopped
   (postmigrate).  ``migrate_cancel`` is refused from postcopy-active on, as QEMU.  The destination
   lost (channel error, return path closed): failed, the VM stays stopped (QEMU would pause the
   migration, postcopy-paused, waiting for a recovery this engine does not implement).

Destination (``PostcopyIncoming``, driven by ``qevm.engine.load.StreamLoader`` on QEMU's postcopy
state machine none -> advise -> discard -> listening -> running, each command checked with QEMU's
words): every page loaded since ADVISE is marked received; POSTCOPY_RAM_DISCARD marks pages missing;
POSTCOPY_LISTEN makes the status postcopy-active and arms the machine's fault hook; POSTCOPY_RUN
starts the VM (or leaves it paused with ``-S``) while pages are still at the source.  A CPU access to
a missing page sends a page request on the return path and waits for the page; a page arriving for a
page already present is dropped (QEMU's atomic placement fails with EEXIST).  At EOF: completed and
SHUT(0).  If the stream breaks in postcopy the load fails and the process exits with status 1, as
QEMU's listen thread does (``exit-on-error`` does not apply: the guest cannot go on without its pages).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from qevm.codec.wire import be32, be64
from qevm.engine.machine import RAM_BLOCK, Machine
from qevm.engine.states import MigrationStatus, StatusCell
from qevm.engine.stream import Cancelled, SaveSession, StreamOut
from qevm.errors import DecodeError, QevmError
from qevm.format.events import CommandEvent, EndOfFile
from qevm.format.live import decode_command
from qevm.format.records import Command, SectionKind
from qevm.format.returnpath import RpMessage, RpType, req_pages
from qevm.migration.channels import Channel
from qevm.migration.ratelimit import RateLimiter
from qevm.migration.returnpath import PRECOPY_MESSAGES, ReturnPathReader


class Outgoing(Protocol):
    """What the source's postcopy needs of ``qevm.engine.migration.MigrationState``."""

    m: Machine
    cell: StatusCell
    params: dict[str, Any]
    start_time: float
    downtime: int
    downtime_bytes: int
    precopy_bytes: int
    _abort: threading.Event

    @property
    def status(self) -> MigrationStatus: ...
    def stop_for_switchover(self) -> tuple[bool, float]: ...

__all__ = ["PostcopySource", "PostcopyIncoming", "PageRequestReader", "postcopy_caps_error", "discard_commands",
           "POSTCOPY_MESSAGES", "MAX_DISCARDS_PER_COMMAND", "POSTCOPY_COMMANDS"]

log = logging.getLogger(__name__)
S = MigrationStatus

#: QEMU's limit of ranges in one POSTCOPY_RAM_DISCARD command
MAX_DISCARDS_PER_COMMAND = 12
DISCARD_VERSION = 0
#: what a destination sends during a postcopy migration
POSTCOPY_MESSAGES = PRECOPY_MESSAGES | {RpType.REQ_PAGES_ID, RpType.REQ_PAGES}
#: the commands the destination's postcopy state machine takes
POSTCOPY_COMMANDS = frozenset({Command.POSTCOPY_ADVISE, Command.POSTCOPY_RAM_DISCARD, Command.POSTCOPY_LISTEN,
                               Command.POSTCOPY_RUN, Command.PACKAGED})
MAX_PACKAGED = 1 << 24  # QEMU's MAX_VM_CMD_PACKAGED_SIZE


def postcopy_caps_error(caps: dict[str, bool], api: str) -> str | None:
    """QEMU's migrate_caps_check for postcopy-ram, in its order (probed on 10.0; 7.2 takes postcopy
    with multifd or compress)."""
    if not caps.get("postcopy-ram"):
        if caps.get("postcopy-preempt"):
            return "Postcopy preempt requires postcopy-ram"
        return None
    if caps.get("x-ignore-shared"):
        return "Postcopy is not compatible with ignore-shared"
    if caps.get("multifd") and api != "7.2":
        return "Postcopy is not yet compatible with multifd"
    if caps.get("mapped-ram"):
        return "Mapped-ram migration is incompatible with postcopy"
    return None


def _command(cmd: Command, data: bytes = b"") -> bytes:
    return CommandEvent(0, cmd, data).encode()


def discard_commands(bitmap: bytearray | bytes, page_size: int, block: str = RAM_BLOCK) -> list[bytes]:
    """The POSTCOPY_RAM_DISCARD records for every run of dirty pages in ``bitmap`` (one byte per
    page): version 0, the block name (length byte, name, NUL), then be64 start / be64 length byte
    ranges, at most ``MAX_DISCARDS_PER_COMMAND`` per command."""
    name = block.encode("latin-1")
    head = bytes((DISCARD_VERSION, len(name))) + name + b"\x00"
    out: list[bytes] = []
    ranges: list[bytes] = []
    pos = 0
    n = len(bitmap)
    while True:
        p = bitmap.find(1, pos)
        if p < 0:
            break
        e = bitmap.find(0, p)
        if e < 0:
            e = n
        ranges.append(be64(p * page_size) + be64((e - p) * page_size))
        if len(ranges) == MAX_DISCARDS_PER_COMMAND:
            out.append(_command(Command.POSTCOPY_RAM_DISCARD, head + b"".join(ranges)))
            ranges = []
        pos = e
    if ranges:
        out.append(_command(Command.POSTCOPY_RAM_DISCARD, head + b"".join(ranges)))
    return out


# -- source ----------------------------------------------------------------------------------------------

class PageRequestReader(ReturnPathReader):
    """The source's return-path thread in postcopy: page requests are checked as QEMU does
    (migrate_handle_rp_req_pages, ram_save_queue_pages) and queued for the migration thread."""

    def __init__(self, chan: Channel, machine: Machine) -> None:
        self.queue: deque[tuple[int, int]] = deque()
        self.requests = 0
        self._size = machine.ram_size
        self._ps = machine.page_size
        super().__init__(chan, allowed=POSTCOPY_MESSAGES, name="return-path")

    def _message(self, m: RpMessage) -> None:
        super()._message(m)
        if m.type not in (RpType.REQ_PAGES_ID, RpType.REQ_PAGES):
            return
        start = int.from_bytes(m.data[:8], "big")
        length = int.from_bytes(m.data[8:12], "big")
        self.requests += 1
        if start % self._ps or length % self._ps:
            raise DecodeError(f"MIG_RP_MSG_REQ_PAGES: Misaligned page request, start: 0x{start:x} len: {length}",
                              m.offset)
        if m.block != RAM_BLOCK:
            raise DecodeError(f"MIG_RP_MSG_REQ_PAGES has no block '{m.block}'", m.offset)
        if not length or start + length > self._size:
            raise DecodeError(f"MIG_RP_MSG_REQ_PAGES request overrun, start=0x{start:x} len=0x{length:x} "
                              f"blocklen=0x{self._size:x}", m.offset)
        self.queue.append((start, length))


class PostcopySource:
    """The postcopy part of one outgoing migration (see the module docstring)."""

    def __init__(self, mig: Outgoing) -> None:
        self.mig = mig
        self.m = mig.m
        self.reader: PageRequestReader | None = None
        self.stopped = False  # the VM was stopped for the switchover ...
        self.was_running = False  # ... and was running before
        self.active = False  # the package was sent: the destination owns the guest
        self.postcopy_bytes = 0
        self.requested_pages = 0  # pages sent because they were asked for
        self._bytes_at_start = 0
        self._sess: SaveSession | None = None

    @property
    def requests(self) -> int:
        return self.reader.requests if self.reader is not None else 0

    def open(self, ch: Channel) -> PageRequestReader:
        self.reader = PageRequestReader(ch, self.m)
        return self.reader

    @staticmethod
    def advise(page_size: int) -> bytes:
        """POSTCOPY_ADVISE: the OR of the blocks' page sizes (one block here) and the target page size."""
        return _command(Command.POSTCOPY_ADVISE, be64(page_size) + be64(page_size))

    def run(self, sess: SaveSession, out: StreamOut, limiter: RateLimiter, ch: Channel) -> None:
        """Switch over, send the rest, end the stream.  ``stopped``/``was_running`` tell the caller
        whether to restart the VM after a failure before the package went out (as QEMU does)."""
        mig, m = self.mig, self.m
        self._sess = sess
        ram = sess.ram
        ps = m.page_size
        with m.lock:
            was_running, stop_t = mig.stop_for_switchover()
            self.stopped, self.was_running = True, was_running
            if not mig.cell.transition(S.ACTIVE, S.DEVICE):
                raise Cancelled()
            before = out.total + len(out.buf)
            out.limited = False
            ram.sync()
            # QEMU sends no XBZRLE page in postcopy; and every discarded page must go, even one the
            # cache says is unchanged
            ram.xbzrle = ram.xbzrle_active = False
            for rec in discard_commands(ram.bitmap, ps):
                out.write(rec)
            out.write(_command(Command.PING, be32(2)))
            pkg = bytearray()
            pout = StreamOut(pkg.extend)
            pout.write(_command(Command.POSTCOPY_LISTEN))
            sess.write_devices(pout, in_postcopy=True)
            pout.write(_command(Command.PING, be32(3)))
            pout.write(_command(Command.POSTCOPY_RUN))
            pout.flush()
            if len(pkg) > MAX_PACKAGED:
                raise QevmError(f"Unreasonably large packaged state: {len(pkg)}")
            out.write(_command(Command.PACKAGED, be32(len(pkg))) + bytes(pkg))
            out.flush()
            end_t = time.monotonic()
            mig.downtime = max(0, int((end_t - stop_t) * 1000))
            mig.downtime_bytes = out.total - before
            mig.precopy_bytes = before
            self.active = True
            out.write(_command(Command.PING, be32(4)))
            rate = mig.params["max-postcopy-bandwidth"]
            limiter.set_rate(rate)
            out.limited = True
            self._bytes_at_start = out.total
            mig.cell.transition(S.DEVICE, S.POSTCOPY_ACTIVE)
        log.info("postcopy: switched over after %d ms with %d dirty pages, downtime %d ms",
                 int((end_t - mig.start_time) * 1000), ram.dirty_count, mig.downtime)
        while ram.dirty_count:
            self._check()
            if mig.params["max-postcopy-bandwidth"] != rate:
                rate = mig.params["max-postcopy-bandwidth"]
                limiter.set_rate(rate)
            sess._ram_chunk(SectionKind.PART, lambda: ram.iterate(out, time.monotonic() + 0.05, self._urgent))
            out.flush()
            self.postcopy_bytes = out.total - self._bytes_at_start
        self._check()
        sess._ram_chunk(SectionKind.END, lambda: ram.iterate(out, None, self._urgent))
        out.write(EndOfFile(0).encode())  # no vmdesc follows a postcopy stream
        out.flush()
        self.postcopy_bytes = out.total - self._bytes_at_start
        log.info("postcopy: %d page requests, %d pages sent on request", self.requests, self.requested_pages)
        ch.shutdown_write()

    def _check(self) -> None:
        mig = self.mig
        if mig._abort.is_set():
            raise Cancelled()
        r = self.reader
        if r is not None and r.eof.is_set():  # no SHUT(0) can come before the source's EOF
            if r.error is not None:
                raise r.error
            if r.shut_status:
                raise QevmError(f"the destination failed to load the stream (SHUT {r.shut_status} on the "
                                "return path)")
            raise QevmError("the return path closed: the destination is gone")

    def _urgent(self, out: StreamOut) -> int | None:
        """Serve the queued page requests before the next page of the scan."""
        r = self.reader
        if r is None or not r.queue:
            return None
        if self._sess is None:
            return None
        ram = self._sess.ram
        ps = self.m.page_size
        nxt = None
        while r.queue:
            start, length = r.queue.popleft()
            for p in range(start // ps, (start + length) // ps):
                if ram.send_page(out, p):
                    self.requested_pages += 1
            nxt = (start + length) // ps
        ram._compress_out_flush()  # 7.2's compression threads: the page must not wait in a worker
        out.flush()  # a vCPU waits for it
        return nxt


# -- destination -----------------------------------------------------------------------------------------

_STATES = ("none", "advise", "discard", "listening", "running", "end")


class PostcopyIncoming:
    """The destination's postcopy state (see the module docstring).  ``send`` writes bytes on the
    return path (thread-safe); ``enabled`` says whether postcopy-ram is on here; ``on_listen`` and
    ``on_run`` are the incoming side's status move and VM start."""

    def __init__(self, machine: Machine, *, caps: Callable[[], dict[str, bool]], send: Callable[[bytes], None],
                 on_listen: Callable[[], None], on_run: Callable[[], None]) -> None:
        self.m = machine
        self.caps = caps
        self.send = send
        self.on_listen = on_listen
        self.on_run = on_run
        self.state = 0  # index in _STATES
        self.received: bytearray | None = None
        self.cond = threading.Condition()
        self.requested: set[int] = set()
        self.requests = 0
        self.blocktime_on = False  # postcopy-blocktime was on at ADVISE (QEMU decides there too)
        self._blocked_ns = 0
        self.failed = False
        self.released = threading.Event()
        self._last_block: str | None = None

    @property
    def listening(self) -> bool:
        return self.state >= 3

    def _wrong(self, what: str) -> QevmError:
        return QevmError(f"{what} in wrong postcopy state ({self.state})")

    # -- commands (from the loader, in stream order) ------------------------------------------------------
    def command(self, ev: CommandEvent) -> None:
        cmd = ev.cmd
        if cmd == Command.POSTCOPY_ADVISE:
            self._advise(ev.data)
        elif cmd == Command.POSTCOPY_RAM_DISCARD:
            self._discard(ev.data)
        elif cmd == Command.POSTCOPY_LISTEN:
            if self.state not in (1, 2):
                raise self._wrong("CMD_POSTCOPY_LISTEN")
            self.state = 3
            self.m.received = self.received
            self.m.fault = self.fault
            self.on_listen()
        elif cmd == Command.POSTCOPY_RUN:
            if self.state != 3:
                raise self._wrong("CMD_POSTCOPY_RUN")
            self.state = 4
            self.on_run()
        elif cmd == Command.PACKAGED:
            length = int.from_bytes(ev.data[:4], "big")
            if length > MAX_PACKAGED:
                raise QevmError(f"Unreasonably large packaged state: {length}")

    def _advise(self, data: bytes) -> None:
        if self.state != 0:
            raise self._wrong("CMD_POSTCOPY_ADVISE")
        self.state = 1
        caps = self.caps()
        enabled = bool(caps.get("postcopy-ram"))
        if len(data) == 0:
            if enabled:
                raise QevmError("RAM postcopy is enabled but have 0 byte advise")
            return
        if len(data) != 16:
            raise QevmError(f"CMD_POSTCOPY_ADVISE invalid length ({len(data)})")
        if not enabled:
            raise QevmError("RAM postcopy is disabled but have 16 byte advise")
        ps = self.m.page_size
        summary, tps = int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big")
        if summary != ps:
            raise QevmError(f"Postcopy needs matching RAM page sizes (s={summary:x} d={ps:x})")
        if tps != ps:
            raise QevmError(f"Postcopy needs matching target page sizes (s={tps} d={ps})")
        self.received = bytearray(self.m.npages)
        self.blocktime_on = bool(caps.get("postcopy-blocktime"))

    def _discard(self, data: bytes) -> None:
        if self.state not in (1, 2):
            raise self._wrong("CMD_POSTCOPY_RAM_DISCARD")
        self.state = 2
        n = len(data)
        if n < 1 + 1 + 1 + 1 + 2 * 8:
            raise QevmError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({n})")
        if data[0] != DISCARD_VERSION:
            raise QevmError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({data[0]})")
        name_len = data[1]
        if 2 + name_len >= n:
            raise QevmError("CMD_POSTCOPY_RAM_DISCARD Failed to read RAMBlock ID")
        if data[2 + name_len] != 0:
            raise QevmError(f"CMD_POSTCOPY_RAM_DISCARD missing nil ({data[2 + name_len]})")
        if (n - 3 - name_len) % 16:
            raise QevmError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({n - 3 - name_len})")
        info: dict[str, Any] = decode_command(Command.POSTCOPY_RAM_DISCARD, data)
        block = info["block"]
        if block != RAM_BLOCK or self.received is None:
            raise QevmError(f"ram_discard_range: Failed to find block '{block}'")
        ps = self.m.page_size
        rx = self.received
        for start, length in info["ranges"]:
            if start % ps or length % ps or start + length > self.m.ram_size:
                raise QevmError(f"ram_discard_range: Bad range in block '{block}': start 0x{start:x} "
                                f"length 0x{length:x}")
            a, b = start // ps, (start + length) // ps
            rx[a:b] = bytes(b - a)

    # -- pages ----------------------------------------------------------------------------------------
    def page_loaded(self, p: int) -> None:
        """A page was placed (called after the loader wrote it)."""
        rx = self.received
        if rx is None:
            return
        if self.state < 3:
            rx[p] = 1
            return
        with self.cond:
            rx[p] = 1
            if p in self.requested:
                self.requested.discard(p)
                self.cond.notify_all()

    def present(self, p: int) -> bool:
        """In postcopy: the page is there already (a late copy of it must not overwrite the guest's writes)."""
        return self.received is not None and self.state >= 3 and bool(self.received[p])

    # -- the CPU side ---------------------------------------------------------------------------------
    def fault(self, p: int) -> None:
        """The CPU touches page ``p``, still at the source: request it and wait for it.  If the
        migration failed meanwhile the CPU stays blocked until the process ends."""
        rx = self.received
        assert rx is not None
        with self.cond:
            if rx[p]:
                return
            if p not in self.requested:
                self.requested.add(p)
                self.requests += 1
                ps = self.m.page_size
                first = self._last_block != RAM_BLOCK
                self._last_block = RAM_BLOCK
                msg = req_pages(p * ps, ps, RAM_BLOCK if first else None)
                try:
                    self.send(msg.encode())
                except (OSError, QevmError) as e:
                    log.error("postcopy: page request failed: %s", e)
            t0 = time.monotonic_ns()
            while not rx[p] and not self.released.is_set():
                self.cond.wait(0.5)
                # failed: the guest cannot go on, the vCPU stays here until the process ends
            self._blocked_ns += time.monotonic_ns() - t0

    @property
    def blocktime_ms(self) -> int:
        """How long the (one) vCPU waited for pages, in ms: QEMU's postcopy-blocktime."""
        return self._blocked_ns // 1_000_000

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def release(self) -> None:
        """The process is ending: let a waiting vCPU go."""
        self.fail()
        self.released.set()

    def finish(self) -> None:
        """EOF came: every page must be there; the machine stops checking."""
        rx = self.received
        if rx is not None and self.state >= 3:
            missing = rx.count(0)
            if missing:
                raise QevmError(f"postcopy: the stream ended with {missing} page(s) never received")
        self.state = 5
        self.m.fault = None
        self.m.received = None
