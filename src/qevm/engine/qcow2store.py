"""savevm / loadvm / delvm / info snapshots into the internal snapshots of a qcow2 drive, as QEMU
keeps them (``qevm vm --drive FILE.qcow2``).

The state is written with ``qevm.io.qcow2write.add_snapshot`` (the same writer as ``qevm convert``):
the stream in clusters past the end of the virtual disk, a new L1 table sharing the disk's clusters,
a snapshot table entry with the date, the VM clock and the VM-state size; ``qemu-img snapshot -l``
lists it and ``qemu-img check`` finds the image clean.  ``loadvm`` reads the state back through
``qevm.io.containers.Qcow2VmState``.  QEMU 10.0's behaviour is kept where it shows: ``savevm NAME``
replaces a snapshot of that name (deleted first, so the new one takes the lowest free id), ``loadvm``
and ``delvm`` look snapshots up by name, ``delvm`` of a missing name is silent.

Unless ``--disk-every`` makes the workload write its disk, the engine's guest never writes it, so
``loadvm`` has no disk content to revert; with it, ``loadvm`` leaves the disk as it is.  The image
is locked (QEMU's byte locks) while a snapshot is written or deleted, and for each guest write.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

from qevm.engine.machine import Machine
from qevm.engine.snapshots import SnapshotInfo, load_from_file
from qevm.engine.stream import SaveSession, StreamOut
from qevm.errors import UsageError
from qevm.io.containers import QCOW2_MAGIC, Qcow2Snapshot, Qcow2VmState
from qevm.io.qcow2write import add_snapshot, delete_snapshot, list_image_snapshots

__all__ = ["Qcow2SnapshotStore", "DRIVE_ID"]

#: the drive's id in messages (QEMU names a drive ``drive0`` ... or by its id=)
DRIVE_ID = "drive0"
_CHUNK = 1 << 20


def _info(s: Qcow2Snapshot) -> SnapshotInfo:
    return SnapshotInfo(s.id, s.name, s.vm_state_size, s.date_sec, s.date_nsec, s.vm_clock_nsec,
                        -1 if s.icount is None else s.icount)


class Qcow2SnapshotStore:
    """The snapshot store of one drive image (see the module docstring)."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UsageError(f"Could not open '{path}': {e.strerror}") from None
        self.path = path
        self.qcow2 = magic == QCOW2_MAGIC

    def check(self) -> None:
        """QEMU's bdrv_all_can_snapshot: refuse before anything changes."""
        if not self.qcow2:
            raise UsageError(f"Device '{DRIVE_ID}' is writable but does not support snapshots")

    def entries(self) -> list[SnapshotInfo]:
        if not self.qcow2:
            return []
        return [_info(s) for s in list_image_snapshots(self.path)]

    def find(self, name: str) -> SnapshotInfo | None:
        for s in self.entries():
            if s.name == name:
                return s
        return None

    def save(self, machine: Machine, name: str | None, now: datetime.datetime | None = None,
             on_sync: Any = None) -> SnapshotInfo:
        self.check()
        now = now or datetime.datetime.now()
        if not name:
            name = now.strftime("vm-%Y%m%d%H%M%S")
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(self.path))) as spool:
            out = StreamOut(spool.write, chunk=_CHUNK)
            sess = SaveSession(machine, out, on_sync=on_sync)
            sess.header()
            sess.setup()
            sess.iterate(None)
            sess.complete()
            spool.seek(0)
            if self.find(name) is not None:
                delete_snapshot(self.path, name)
            snap = add_snapshot(self.path, name, iter(lambda: spool.read(_CHUNK), b""),
                                vm_clock_ns=machine.clock.now(), date=now.timestamp())
        return _info(snap)

    def load(self, machine: Machine, name: str) -> SnapshotInfo:
        self.check()
        info = self.find(name)
        if info is None:
            raise UsageError(f"Snapshot '{name}' does not exist in one or more devices")
        with open(self.path, "rb") as f:
            state = Qcow2VmState(f, int(info.id) if info.id.isdigit() else info.id, name=self.path)
            load_from_file(machine, state)
        return info

    def delete(self, name: str) -> bool:
        self.check()
        info = self.find(name)
        if info is None:
            return False
        delete_snapshot(self.path, name)
        return True
