"""Incoming migration: the destination side (QEMU's ``-incoming`` / ``migrate-incoming``).

``IncomingMigration.start()`` opens the source (listening socket, file, command, fd) and the status
becomes setup; a thread then waits for the stream (active), feeds it to ``StreamLoader`` through
the parser's own buffer, answers OPEN_RETURN_PATH/PING on the return path when the source asks,
and at the end either

* completed: the run state comes from the received ``globalstate`` ("running" and autostart: the
  VM starts, RESUME; otherwise it stays paused or takes the received state), SHUT(0) on the
  return path; or
* failed: "load of migration failed: ..." is logged, SHUT(1), and with ``exit_on_error`` (QEMU's
  default) the process is asked to exit with status 1, as QEMU does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qevm.engine.channels import IncomingSource
from qevm.engine.load import LoadError, StreamLoader
from qevm.engine.machine import Machine
from qevm.engine.states import MigrationStatus, RunState, StatusCell
from qevm.errors import QevmError
from qevm.format.events import Command
from qevm.format.returnpath import pong, shut

__all__ = ["IncomingMigration", "CHUNK"]

log = logging.getLogger(__name__)
CHUNK = 1 << 20
S = MigrationStatus


class IncomingMigration:
    def __init__(self, machine: Machine, source: IncomingSource, *, autostart: bool, exit_on_error: bool,
                 emit: Callable[[str, dict[str, Any] | None], None], events_on: Callable[[], bool],
                 on_exit: Callable[[int], None]) -> None:
        self.m = machine
        self.source = source
        self.autostart = autostart
        self.exit_on_error = exit_on_error
        self.emit = emit
        self.events_on = events_on
        self.on_exit = on_exit
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

    def start(self) -> None:
        self.cell.transition(S.NONE, S.SETUP)
        self.thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self.thread.start()

    def abort(self) -> None:
        self.source.abort()

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
        return info

    def _run(self) -> None:
        src = self.source
        m = self.m
        rp_open = False
        try:
            src.connect()
            self.cell.transition(S.SETUP, S.ACTIVE)
            ld = self.loader = StreamLoader(m)
            while not ld.finished:
                view = ld.get_buffer(CHUNK)
                try:
                    n = src.recv_into(view)
                finally:
                    view.release()
                for cmd in ld.buffer_updated(n):
                    if cmd.cmd == Command.OPEN_RETURN_PATH:
                        if not src.has_return_path:
                            raise LoadError("the source asked for a return path on a channel that has none")
                        rp_open = True
                    elif cmd.cmd == Command.PING:
                        if not rp_open:
                            raise LoadError("PING received without a return path")
                        src.send(pong(int.from_bytes(cmd.data[:4], "big")).encode())
                if n == 0:
                    break
            ld.check_complete()
            if rp_open:
                src.send(shut(0).encode())
            src.close()
            self._finish()
        except (QevmError, OSError) as e:
            self.error = str(e)
            if rp_open:
                src.send(shut(1).encode())
            src.close()
            log.error("load of migration failed: %s", self.error)
            st = self.status
            if st in (S.SETUP, S.ACTIVE):
                self.cell.transition(st, S.FAILED)
            if self.exit_on_error:
                self.on_exit(1)

    def _finish(self) -> None:
        """QEMU's process_incoming_migration_bh: choose the run state, then status completed."""
        m = self.m
        gs = m.globalstate.state if m.globalstate.received else None
        if gs is None or gs is RunState.RUNNING:
            if self.autostart:
                m.vm_start()
            else:
                m.set_runstate(RunState.PAUSED)
        else:
            m.set_runstate(gs)
        self.cell.transition(S.ACTIVE, S.COMPLETED)
