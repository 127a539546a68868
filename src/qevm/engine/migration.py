"""Outgoing migration: QEMU's migration thread for a precopy migration of the demo machine.

``MigrationState`` is the one per-process migration object (QEMU's ``current_migration``): its
status cell, parameters, capabilities, counters and the thread.  ``start(channel)`` runs, in a
thread, what migration/migration.c does:

1. setup: header, configuration, START ram (every page dirty); status setup -> active;
2. iterations: while the pending bytes are at least ``threshold`` (bandwidth measured over 100 ms
   windows x ``downtime-limit``), send PART sections of dirty pages, limited to ``max-bandwidth``;
   when pending drops below the threshold, sync the dirty log (a new pass) and check again;
3. stop-and-copy: store the global state, stop the VM (STOP, status device), END ram with every
   page left, the device sections, EOF, vmdesc; close the channel; status completed, run state
   postmigrate.

``cancel()`` moves the status to cancelling and wakes the thread, which ends in cancelled; a channel
error (the destination died) ends in failed.  In both cases a VM stopped for the device stage is
started again, as QEMU does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from qevm.codec.wire import be32
from qevm.engine.compress import CompressCounters, CompressPool
from qevm.engine.machine import Machine
from qevm.engine.multifd import SendChannels, attach_source, uses_multifd
from qevm.engine.parameters import DEFAULT_PARAMETERS, default_parameters
from qevm.engine.states import MigrationStatus, RunState, StatusCell
from qevm.engine.stream import Cancelled, RamSaver, SaveSession, StreamOut
from qevm.errors import QevmError
from qevm.format.events import CommandEvent
from qevm.format.records import Command
from qevm.migration.channels import Channel
from qevm.migration.ratelimit import RateLimiter
from qevm.migration.returnpath import PRECOPY_MESSAGES, ReturnPathReader

__all__ = ["MigrationState", "DEFAULT_PARAMETERS", "CAPABILITIES", "CAPABILITIES_72", "CAPABILITIES_OF",
           "SUPPORTED_CAPABILITIES",
           "BUFFER_DELAY"]

log = logging.getLogger(__name__)

BUFFER_DELAY = 0.1  # seconds: the bandwidth measurement window
MAX_WAIT = 0.05  # seconds: longest PART section

S = MigrationStatus

#: QEMU 10.0's capabilities, in query-migrate-capabilities order
CAPABILITIES = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
                "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
                "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
                "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
                "mapped-ram")
#: QEMU 7.2's capabilities, in its query-migrate-capabilities order (compress and block were removed in 9.1)
CAPABILITIES_72 = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events", "postcopy-ram",
                   "x-colo", "release-ram", "block", "return-path", "pause-before-switchover", "multifd",
                   "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
                   "background-snapshot", "zero-copy-send", "postcopy-preempt")
CAPABILITIES_OF = {"10.0": CAPABILITIES, "7.2": CAPABILITIES_72}
#: the ones this engine implements (setting another one on is refused, rather than ignored)
SUPPORTED_CAPABILITIES = frozenset({"xbzrle", "events", "return-path", "zero-blocks", "late-block-activate",
                                    "compress", "multifd", "mapped-ram"})
#: how long the source waits for the destination's SHUT on the return path
RP_SHUT_TIMEOUT = 30.0


class MigrationState:
    """The source side of migration: status, parameters, capabilities, counters, thread."""

    def __init__(self, machine: Machine, emit: Callable[[str, dict[str, Any] | None], None],
                 api: str = "10.0") -> None:
        self.m = machine
        self.emit = emit
        self.api = api
        self.params: dict[str, Any] = default_parameters(api)
        self.capabilities = CAPABILITIES_OF[api]
        self.caps: dict[str, bool] = {c: False for c in self.capabilities}
        self.cell = StatusCell(self._on_status)
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        self.channel: Channel | None = None
        self.uri = ""
        self._abort = threading.Event()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.start_time = 0.0
        self.setup_time = 0
        self.total_time = 0
        self.downtime = 0
        self.expected_downtime = int(self.params["downtime-limit"])
        self.mbps = 0.0
        self.pages_per_second = 0
        self.threshold = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.session: SaveSession | None = None
        self.out: StreamOut | None = None
        self.pool: CompressPool | None = None
        self.multifd: SendChannels | None = None
        self.iterations = 0

    def transferred(self) -> int:
        """Every byte sent: the main stream and the multifd channels (migration_transferred_bytes)."""
        return (self.out.total if self.out is not None else 0) + (self.multifd.bytes if self.multifd else 0)

    # -- status ----------------------------------------------------------------------------------------
    @property
    def status(self) -> MigrationStatus:
        return self.cell.status

    def _on_status(self, new: MigrationStatus) -> None:
        if self.caps["events"]:
            self.emit("MIGRATION", {"status": new.value})

    def _pass(self, n: int) -> None:
        if self.caps["events"]:
            self.emit("MIGRATION_PASS", {"pass": n})

    @property
    def running(self) -> bool:
        return self.status in (S.SETUP, S.ACTIVE, S.DEVICE, S.CANCELLING)

    # -- commands ----------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """QEMU's migrate_init: a fresh state; the status becomes setup (MIGRATION event)."""
        self.cell.reset()
        self.error = None
        self._abort = threading.Event()
        self._reset_stats()
        self.start_time = time.monotonic()
        self.cell.transition(S.NONE, S.SETUP)

    def fail_setup(self, why: str) -> None:
        """The channel could not be opened: setup -> failed."""
        if self.cell.status is S.CANCELLING:
            self.cell.transition(S.CANCELLING, S.CANCELLED)
            return
        self.error = why
        self.cell.transition(S.SETUP, S.FAILED)

    def start(self, opener: Callable[[], Channel], uri: str) -> None:
        """Run the migration in its thread; ``opener`` makes the channel there (a connect that fails
        ends in failed, as QEMU's asynchronous socket connect)."""
        self._opener = opener
        self.uri = uri
        self.thread = threading.Thread(target=self._thread, name="live_migration", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """migrate_cancel: active/setup/device -> cancelling; the thread finishes the job."""
        for old in (S.SETUP, S.ACTIVE, S.DEVICE):
            if self.cell.status is old and self.cell.transition(old, S.CANCELLING):
                self._abort.set()
                if self.channel is not None:
                    self.channel.abort()
                return

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the migration thread -------------------------------------------------------------------------------
    def _thread(self) -> None:
        try:
            ch = self._opener()
        except (QevmError, OSError) as e:
            log.error("%s", e)
            self.fail_setup(str(e))
            return
        self.channel = ch
        if self._abort.is_set():  # cancelled while connecting
            ch.abort()
            ch.close()
            self.cell.transition(S.CANCELLING, S.CANCELLED)
            self.channel = None
            return
        self._migrate(ch)

    def _migrate(self, ch: Channel) -> None:
        m = self.m
        limiter = RateLimiter(self.params["max-bandwidth"], initial=0)
        self._rate_param = self.params["max-bandwidth"]
        out = StreamOut(ch.sendall, limiter=limiter, abort=self._abort)
        self.out = out
        pool = None
        if self.caps.get("compress"):
            pool = CompressPool(int(self.params["compress-threads"]), int(self.params["compress-level"]),
                                bool(self.params["compress-wait-thread"]), m.page_size)
        self.pool = pool
        sess = SaveSession(m, out, xbzrle=self.caps["xbzrle"], cache_size=int(self.params["xbzrle-cache-size"]),
                           on_sync=self._pass, compress=pool)
        self.session = sess
        stopped_here = False
        was_running = m.running
        rp: ReturnPathReader | None = None
        try:
            if uses_multifd(self.caps):
                self.multifd = attach_source(self, sess, ch, limiter, self._abort)
            sess.header()
            if self.caps["return-path"]:
                if not ch.has_return_path:
                    raise QevmError("Unable to open return-path for postcopy")
                rp = ReturnPathReader(ch, allowed=PRECOPY_MESSAGES, name="return-path")
                out.write(CommandEvent(0, Command.OPEN_RETURN_PATH, b"").encode())
                out.write(CommandEvent(0, Command.PING, be32(1)).encode())
            sess.setup()
            out.flush()
            self.setup_time = int((time.monotonic() - self.start_time) * 1000)
            if not self.cell.transition(S.SETUP, S.ACTIVE):
                raise Cancelled()
            self._iterate(sess, out, limiter)
            # -- stop and copy
            with m.lock:
                if self.status is not S.ACTIVE:
                    raise Cancelled()
                was_running = m.running
                m.globalstate.store(RunState.RUNNING if was_running else m.runstate)
                stop_t = time.monotonic()
                m.vm_stop(RunState.FINISH_MIGRATE)
                stopped_here = True
                if not self.cell.transition(S.ACTIVE, S.DEVICE):
                    raise Cancelled()
                before = self.transferred()
                out.limited = False
                sess.complete()
                if self.multifd is not None:
                    self.multifd.close()
                ch.shutdown_write()
                if rp is not None:
                    self._wait_shut(rp)
                ch.close()
                end_t = time.monotonic()
                self.downtime = max(0, int((end_t - stop_t) * 1000))
                self.downtime_bytes = self.transferred() - before
                self.precopy_bytes = before
                self.total_time = int((end_t - self.start_time) * 1000)
                transfer_ms = max(1, self.total_time - self.setup_time)
                self.mbps = self.transferred() * 8.0 / transfer_ms / 1000.0
                self.pages_per_second = int(sess.ram.c.pages_sent * 1000 / transfer_ms)
                if not self.cell.transition(S.DEVICE, S.COMPLETED):
                    raise Cancelled()
                m.set_runstate(RunState.POSTMIGRATE)
            log.info("migration completed: %d bytes in %d ms, downtime %d ms", out.total, self.total_time,
                     self.downtime)
        except (Cancelled, QevmError, OSError) as e:
            if self.multifd is not None:
                self.multifd.kill()
            ch.abort()
            try:
                ch.close()
            except Exception:  # noqa: BLE001 - the channel is being torn down after an error anyway
                pass
            self.total_time = int((time.monotonic() - self.start_time) * 1000)
            status = self.status
            if status is S.CANCELLING:
                self.cell.transition(S.CANCELLING, S.CANCELLED)
            elif status in (S.SETUP, S.ACTIVE, S.DEVICE):
                self.error = str(e) if not isinstance(e, Cancelled) else "cancelled"
                log.error("migration failed: %s", self.error)
                self.cell.transition(status, S.FAILED)
            if stopped_here:
                if was_running:
                    m.vm_start()
                elif m.runstate is RunState.FINISH_MIGRATE:
                    m.set_runstate(RunState.POSTMIGRATE)
        finally:
            if rp is not None:
                rp.stop()
            if pool is not None:
                pool.close()
            self.channel = None

    def _wait_shut(self, rp: ReturnPathReader) -> None:
        """The source's rule with a return path: completed only on the destination's SHUT(0)."""
        try:
            status = rp.wait_shut(RP_SHUT_TIMEOUT, self._abort)
        except QevmError as e:
            raise QevmError(f"return path: {e}") from e
        if self._abort.is_set():
            raise Cancelled()
        if status is None:
            raise QevmError("return path: the return path closed without SHUT")
        if status:
            raise QevmError(f"the destination failed to load the stream (SHUT {status} on the return path)")

    def _iterate(self, sess: SaveSession, out: StreamOut, limiter: RateLimiter) -> None:
        ram: RamSaver = sess.ram
        win_t = time.monotonic()
        win_bytes = self.transferred()
        while True:
            if self._abort.is_set() or self.status is not S.ACTIVE:
                raise Cancelled()
            rate = self.params["max-bandwidth"]
            if rate != self._rate_param:
                self._rate_param = rate
                limiter.set_rate(rate)
            pending = ram.pending()
            if pending < self.threshold or pending == 0:
                ram.sync()
                pending = ram.pending()
            if pending and pending >= self.threshold:
                sess.iterate(time.monotonic() + MAX_WAIT)
                self.iterations += 1
                out.flush()
            else:
                return
            now = time.monotonic()
            if now - win_t >= BUFFER_DELAY:
                sent = self.transferred() - win_bytes
                ms = (now - win_t) * 1000.0
                bandwidth = sent / ms  # bytes per ms
                self.threshold = int(bandwidth * self.params["downtime-limit"])
                self.mbps = sent * 8.0 / ms / 1000.0
                if ram.c.dirty_pages_rate and sent > 10000 and bandwidth > 0:
                    self.expected_downtime = int(ram.pending() / bandwidth)
                win_t, win_bytes = now, self.transferred()

    # -- query-migrate ---------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        st = self.status
        if st is S.NONE:
            return {}
        info: dict[str, Any] = {"status": st.value}
        if st in (S.ACTIVE, S.CANCELLING, S.DEVICE, S.COMPLETED):
            info["setup-time"] = self.setup_time
            if st is S.COMPLETED:
                info["total-time"] = self.total_time
                info["downtime"] = self.downtime
            else:
                info["total-time"] = int((time.monotonic() - self.start_time) * 1000)
                info["expected-downtime"] = self.expected_downtime
            info["ram"] = self._ram_info(st)
            if self.caps["xbzrle"]:
                info["xbzrle-cache"] = self._xbzrle_info()
            if self.caps.get("compress"):
                info["compression"] = self.pool.c.info() if self.pool is not None else CompressCounters().info()
        elif st is S.FAILED and self.error:
            info["error-desc"] = self.error
        return info

    def _ram_info(self, st: MigrationStatus) -> dict[str, Any]:
        sess = self.session
        c = sess.ram.c if sess is not None else None
        ps = self.m.page_size
        transferred = self.transferred()
        ram: dict[str, Any] = {
            "transferred": transferred,
            "remaining": 0 if st is S.COMPLETED or sess is None else sess.ram.pending(),
            "total": self.m.ram_size,
            "duplicate": c.duplicate if c else 0,
            "normal": c.normal if c else 0,
            "normal-bytes": (c.normal if c else 0) * ps,
            "dirty-pages-rate": 0 if st is S.COMPLETED or not c else c.dirty_pages_rate,
            "mbps": self.mbps,
            "dirty-sync-count": c.dirty_sync_count if c else 0,
            "postcopy-requests": 0,
            "page-size": ps,
            "multifd-bytes": self.multifd.bytes if self.multifd is not None else 0,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes if st is S.COMPLETED else transferred,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
        return ram

    def _xbzrle_info(self) -> dict[str, Any]:
        sess = self.session
        c = sess.ram.c if sess is not None else None
        return {
            "cache-size": int(self.params["xbzrle-cache-size"]),
            "bytes": c.xbzrle_bytes if c else 0,
            "pages": c.xbzrle_pages if c else 0,
            "cache-miss": c.xbzrle_cache_miss if c else 0,
            "cache-miss-rate": c.xbzrle_cache_miss_rate if c else 0,
            "encoding-rate": c.xbzrle_encoding_rate if c else 0,
            "overflow": c.xbzrle_overflow if c else 0,
        }
