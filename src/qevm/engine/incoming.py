"""Incoming migration: the destination side (QEMU's ``-incoming`` / ``migrate-incoming``).

``IncomingMigration.start()`` opens the source (listening socket, file, command, fd) and the status
becomes setup; a thread then waits for the stream (active), feeds it to ``StreamLoader`` through
the parser's own buffer, answers OPEN_RETURN_PATH/PING on the return path when the source asks
(``qevm.migration.returnpath.DestinationResponder``, the one ``qevm record`` uses), and at the end
either

* completed: the run state comes from the received ``globalstate`` ("running" and autostart: the
  VM starts, RESUME; otherwise it stays paused or takes the received state), SHUT(0) on the
  return path; or
* failed: "load of migration failed: ..." is logged, SHUT(1), and with ``exit_on_error`` (QEMU's
  default) the process is asked to exit with status 1, as QEMU does.

With postcopy (``qevm.engine.postcopy.PostcopyIncoming``) the status becomes postcopy-active at
POSTCOPY_LISTEN and the VM starts at POSTCOPY_RUN, before the last pages came; a failure from then
on always ends the process with status 1.  With multifd (``qevm.engine.multifd``) the extra
channels come on the same listener; with mapped-ram the pages are read from their file offsets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from qevm.engine.load import StreamLoader
from qevm.engine.machine import Machine
from qevm.engine.multifd import MappedRamLoad, RecvChannels
from qevm.engine.postcopy import PostcopyIncoming
from qevm.engine.states import MigrationStatus, RunState, StatusCell
from qevm.errors import QevmError
from qevm.migration.channels import Channel, Incoming, TransportError
from qevm.migration.returnpath import DestinationResponder
from qevm.migration.session import CHUNK

__all__ = ["IncomingMigration", "CHUNK"]

log = logging.getLogger(__name__)
S = MigrationStatus


class IncomingMigration:
    def __init__(self, machine: Machine, source: Incoming, *, autostart: bool, exit_on_error: bool,
                 emit: Callable[[str, dict[str, Any] | None], None], events_on: Callable[[], bool],
                 on_exit: Callable[[int], None], caps: Callable[[], dict[str, bool]] = dict,
                 params: dict[str, Any] | None = None) -> None:
        self.m = machine
        self.source = source
        self.autostart = autostart
        self.exit_on_error = exit_on_error
        self.emit = emit
        self.events_on = events_on
        self.on_exit = on_exit
        self.caps = caps
        self.postcopy: PostcopyIncoming | None = None
        self.multifd: RecvChannels | None = None
        self.params = params if params is not None else {}
        self.cell = StatusCell(self._on_status)
        self.error: str | None = None
        self.loader: StreamLoader | None = None
        self.thread: threading.Thread | None = None

    def _on_status(self, new: MigrationStatus) -> None:
        if self.events_on():
            self.emit("MIGRATION", {"status": new.value})

    @property
    def status(self) -> MigrationStatus:
        return self.cell.status

    @property
    def running(self) -> bool:
        """Listening or loading (QEMU's ``migrate_incoming_started``: transport data present)."""
        return self.status in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE)

    def start(self) -> None:
        self.cell.transition(S.NONE, S.SETUP)
        self.thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self.thread.start()

    def abort(self) -> None:
        self.source.abort()
        if self.postcopy is not None:
            self.postcopy.release()

    def info(self) -> dict[str, Any]:
        st = self.status
        if st is S.NONE:
            return {}
        info: dict[str, Any] = {"status": st.value}
        if st is S.SETUP:
            addr = self.source.socket_address()
            if addr is not None:
                info["socket-address"] = addr
        if st is S.FAILED and self.error:
            info["error-desc"] = self.error
        pc = self.postcopy
        if st is S.COMPLETED and pc is not None and pc.blocktime_on:
            # QEMU's fill_destination_postcopy_migration_info (ms; all vCPUs blocked, then each one)
            info["postcopy-blocktime"] = pc.blocktime_ms
            info["postcopy-vcpu-blocktime"] = [pc.blocktime_ms]
        return info

    def _run(self) -> None:
        src = self.source
        m = self.m
        resp = DestinationResponder()
        ch: Channel | None = None
        send_lock = threading.Lock()  # postcopy: the vCPU's page requests share the return path

        def answer(data: bytes) -> None:
            if data and ch is not None:
                with send_lock, contextlib.suppress(TransportError):  # the source went away: the load decides
                    ch.sendall(data)

        try:
            ld, ch = self._open(src)
            mapped_ram = bool(self.caps().get("mapped-ram"))
            resp.channel_has_return_path = ch.has_return_path
            self.cell.transition(S.SETUP, S.ACTIVE)
            pc = self.postcopy = PostcopyIncoming(m, caps=self.caps, send=answer,
                                                  on_listen=self._postcopy_listen, on_run=self._postcopy_run)
            ld.pc = pc
            while not ld.finished:
                if src.aborted:
                    raise TransportError("incoming migration aborted")
                gap = ld.parser.skippable() if mapped_ram else 0
                if gap:  # a mapped-ram page region: its pages were read by MappedRamLoad
                    os.lseek(ch.fileno(), gap, os.SEEK_CUR)
                    ld.parser.skip(gap)
                view = ld.get_buffer(CHUNK)
                try:
                    n = ch.recv_into(view)
                except OSError as e:
                    raise TransportError(f"{src.uri}: read failed: {e.strerror or e}") from e
                finally:
                    view.release()
                for cmd in ld.buffer_updated(n):
                    answer(resp.on_command(cmd))
                if n == 0:
                    break
            ld.check_complete()
            if pc.listening:
                pc.finish()
            if self.multifd is not None:
                self.multifd.finish()
            answer(resp.finish(True))
            src.close()
            self._finish()
        except (QevmError, OSError) as e:
            self.error = str(e)
            if self.multifd is not None:
                if self.multifd.error is not None:
                    self.error = f"multifd: {self.multifd.error}"
                self.multifd.close()
            answer(resp.finish(False))
            src.close()
            log.error("load of migration failed: %s", self.error)
            st = self.status
            if st in (S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE):
                self.cell.transition(st, S.FAILED)
            if self.postcopy is not None:
                self.postcopy.fail()
            if self.exit_on_error or st is S.POSTCOPY_ACTIVE:  # postcopy: QEMU's listen thread exits
                self.on_exit(1)

    def _open(self, src: Incoming) -> tuple[StreamLoader, Channel]:
        """Wait for the stream (and the multifd channels); a loader set up for the capabilities."""
        caps = self.caps()
        if caps.get("multifd") and src.listener is not None:
            self.multifd = RecvChannels(self.m, int(self.params.get("multifd-channels", 2)))
            ch = self.multifd.accept(src)
        else:
            ch = src.accept()
        hook = None
        if caps.get("mapped-ram"):
            threads = int(self.params.get("multifd-channels", 2)) if caps.get("multifd") else 1
            hook = MappedRamLoad(self.m, ch.fileno(), threads).hook
        mf = self.multifd
        self.loader = StreamLoader(self.m, self.params.get("block-bitmap-mapping"),
                                   capabilities=frozenset(c for c in ("mapped-ram",) if caps.get(c)),
                                   ram_hook=hook, on_flush=mf.sync_main if mf is not None else None,
                                   file_offset=getattr(src.uri, "offset", 0) or 0)
        return self.loader, ch

    def _postcopy_listen(self) -> None:
        """POSTCOPY_LISTEN: from now on pages may be requested (QEMU's listen thread starts)."""
        self.cell.transition(S.ACTIVE, S.POSTCOPY_ACTIVE)

    def _postcopy_run(self) -> None:
        """POSTCOPY_RUN: the device state is loaded; the VM runs while pages are still missing
        (QEMU's loadvm_postcopy_handle_run_bh: started with autostart, paused otherwise)."""
        if self.autostart:
            self.m.vm_start()
        else:
            self.m.set_runstate(RunState.PAUSED)

    def _finish(self) -> None:
        """QEMU's process_incoming_migration_bh: choose the run state, then status completed.  After
        postcopy the VM was already started at POSTCOPY_RUN."""
        m = self.m
        if self.status is S.POSTCOPY_ACTIVE:
            self.cell.transition(S.POSTCOPY_ACTIVE, S.COMPLETED)
            return
        gs = m.globalstate.state if m.globalstate.received else None
        if gs is None or gs is RunState.RUNNING:
            if self.autostart:
                m.vm_start()
            else:
                m.set_runstate(RunState.PAUSED)
        else:
            m.set_runstate(gs)
        self.cell.transition(S.ACTIVE, S.COMPLETED)
