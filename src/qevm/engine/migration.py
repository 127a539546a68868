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

With ``postcopy-ram`` the return path is always opened and POSTCOPY_ADVISE sent; after
``migrate-start-postcopy`` the iterations end early and ``qevm.engine.postcopy.PostcopySource`` does
the switchover and the postcopy phase (status postcopy-active; the VM is never restarted once the
package went out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from qevm.codec.wire import be32
from qevm.engine.blockmig import BlockSaver, DirtyBitmapSaver
from qevm.engine.compress import CompressCounters, CompressPool
from qevm.engine.machine import Machine
from qevm.engine.multifd import SendChannels, attach_source, uses_multifd
from qevm.engine.parameters import DEFAULT_PARAMETERS, default_parameters
from qevm.engine.postcopy import PostcopySource
from qevm.engine.states import MigrationStatus, RunState, StatusCell
from qevm.engine.stream import Cancelled, LiveSaver, RamSaver, SaveSession, StreamOut
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
                                    "compress", "postcopy-ram", "postcopy-blocktime", "block",
                                    "dirty-bitmaps", "multifd", "mapped-ram"})
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
        #: migrate blk/inc set block migration on for this migration only (must_remove_block_options)
        self.remove_block_options = False
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
        self.postcopy: PostcopySource | None = None
        self.start_postcopy = threading.Event()  # migrate-start-postcopy
        self.block: BlockSaver | None = None

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
        return self.status in (S.SETUP, S.ACTIVE, S.DEVICE, S.CANCELLING, S.POSTCOPY_ACTIVE)

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
        """migrate_cancel: active/setup/device -> cancelling; the thread finishes the job.  In
        postcopy-active (refused by the QMP command, as QEMU) only the engine's own shutdown calls
        it: the thread is stopped and ends in failed."""
        for old in (S.SETUP, S.ACTIVE, S.DEVICE):
            if self.cell.status is old and self.cell.transition(old, S.CANCELLING):
                self._abort.set()
                if self.channel is not None:
                    self.channel.abort()
                return
        if self.cell.status is S.POSTCOPY_ACTIVE:
            self._abort.set()
            if self.channel is not None:
                self.channel.abort()

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
        lives: list[LiveSaver] = []
        if self.caps.get("block"):
            self.block = BlockSaver(m, zero_blocks=self.caps["zero-blocks"],
                                    shared_base=bool(self.params.get("block-incremental")))
            lives.append(self.block)
        if self.caps["dirty-bitmaps"]:
            dbm = DirtyBitmapSaver(m, self.params.get("block-bitmap-mapping"))
            if dbm.active:
                lives.append(dbm)
        sess = SaveSession(m, out, xbzrle=self.caps["xbzrle"], cache_size=int(self.params["xbzrle-cache-size"]),
                           on_sync=self._pass, compress=pool, lives=lives)
        self.session = sess
        stopped_here = False
        was_running = m.running
        rp: ReturnPathReader | None = None
        pc = self.postcopy = PostcopySource(self) if self.caps["postcopy-ram"] else None
        try:
            if uses_multifd(self.caps):
                self.multifd = attach_source(self, sess, ch, limiter, self._abort)
            sess.header()
            if self.caps["return-path"] or pc is not None:
                if not ch.has_return_path:
                    raise QevmError("Unable to open return-path for postcopy")
                rp = pc.open(ch) if pc is not None else ReturnPathReader(ch, allowed=PRECOPY_MESSAGES,
                                                                        name="return-path")
                out.write(CommandEvent(0, Command.OPEN_RETURN_PATH, b"").encode())
                out.write(CommandEvent(0, Command.PING, be32(1)).encode())
            if pc is not None:
                out.write(pc.advise(m.page_size))
            sess.setup()
            out.flush()
            self.setup_time = int((time.monotonic() - self.start_time) * 1000)
            if not self.cell.transition(S.SETUP, S.ACTIVE):
                raise Cancelled()
            if self._iterate(sess, out, limiter) and pc is not None:
                self._complete_postcopy(pc, sess, out, limiter, ch, rp)
                return
            # -- stop and copy
            with m.lock:
                was_running, stop_t = self.stop_for_switchover()
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
            elif status in (S.SETUP, S.ACTIVE, S.DEVICE, S.POSTCOPY_ACTIVE):
                self.error = str(e) if not isinstance(e, Cancelled) else "cancelled"
                log.error("migration failed: %s", self.error)
                self.cell.transition(status, S.FAILED)
            if pc is not None and pc.stopped:
                stopped_here, was_running = True, pc.was_running
            if pc is not None and pc.active:
                # the destination runs the guest: the source must never start again (QEMU would
                # pause the migration for a recovery; the VM stays stopped either way)
                if m.runstate is RunState.FINISH_MIGRATE:
                    m.set_runstate(RunState.POSTMIGRATE)
            elif stopped_here:
                if was_running:
                    m.vm_start()
                elif m.runstate is RunState.FINISH_MIGRATE:
                    m.set_runstate(RunState.POSTMIGRATE)
        finally:
            if rp is not None:
                rp.stop()
            if pool is not None:
                pool.close()
            for lv in lives:
                lv.close()
            if self.remove_block_options:  # QEMU's migrate_fd_cleanup after migrate -b / -i
                self.remove_block_options = False
                self.caps["block"] = False
                self.params["block-incremental"] = False
            self.channel = None

    def stop_for_switchover(self) -> tuple[bool, float]:
        """With the machine lock held and the status active (else ``Cancelled``): store the global
        state, stop the VM (finish-migrate).  Returns whether it was running and when it stopped;
        the caller moves the status to device."""
        m = self.m
        if self.status is not S.ACTIVE:
            raise Cancelled()
        was_running = m.running
        m.globalstate.store(RunState.RUNNING if was_running else m.runstate)
        stop_t = time.monotonic()
        m.vm_stop(RunState.FINISH_MIGRATE)
        return was_running, stop_t

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

    def _complete_postcopy(self, pc: PostcopySource, sess: SaveSession, out: StreamOut, limiter: RateLimiter,
                           ch: Channel, rp: ReturnPathReader | None) -> None:
        """After migrate-start-postcopy: switch over, send the rest (``PostcopySource.run``), then
        wait for SHUT as every return-path migration does; completed, the VM stays postmigrate."""
        pc.run(sess, out, limiter, ch)
        if rp is not None:
            self._wait_shut(rp)
        ch.close()
        self.total_time = int((time.monotonic() - self.start_time) * 1000)
        transfer_ms = max(1, self.total_time - self.setup_time)
        self.mbps = out.total * 8.0 / transfer_ms / 1000.0
        self.pages_per_second = int(sess.ram.c.pages_sent * 1000 / transfer_ms)
        if not self.cell.transition(S.POSTCOPY_ACTIVE, S.COMPLETED):
            raise Cancelled()
        self.m.set_runstate(RunState.POSTMIGRATE)
        log.info("postcopy migration completed: %d bytes in %d ms, downtime %d ms, %d page requests", out.total,
                 self.total_time, self.downtime, pc.requests)

    def _iterate(self, sess: SaveSession, out: StreamOut, limiter: RateLimiter) -> bool:
        """Precopy passes; True when they stopped for migrate-start-postcopy, False when what is
        left fits the downtime (stop and copy)."""
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
            pending = ram.pending() + sess.live_pending()
            if pending < self.threshold or pending == 0:
                ram.sync()
                pending = ram.pending() + sess.live_pending()
            if pending and pending >= self.threshold:
                if self.start_postcopy.is_set() and self.postcopy is not None:
                    return True
                sess.iterate(time.monotonic() + MAX_WAIT)
                self.iterations += 1
                out.flush()
            else:
                return False
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
        if st in (S.ACTIVE, S.CANCELLING, S.DEVICE, S.COMPLETED, S.POSTCOPY_ACTIVE):
            info["setup-time"] = self.setup_time
            if st is S.COMPLETED:
                info["total-time"] = self.total_time
                info["downtime"] = self.downtime
            else:
                info["total-time"] = int((time.monotonic() - self.start_time) * 1000)
                if st is S.POSTCOPY_ACTIVE:
                    info["downtime"] = self.downtime
                else:
                    info["expected-downtime"] = self.expected_downtime
            info["ram"] = self._ram_info(st)
            if self.block is not None and st is not S.COMPLETED:
                info["disk"] = self.block.info()
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
        pc = self.postcopy
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
            "postcopy-requests": pc.requests if pc is not None else 0,
            "page-size": ps,
            "multifd-bytes": self.multifd.bytes if self.multifd is not None else 0,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes if st is S.COMPLETED or (pc is not None and pc.active) else transferred,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": pc.postcopy_bytes if pc is not None else 0,
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
