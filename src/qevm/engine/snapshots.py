"""savevm / loadvm / delvm / info snapshots, with the snapshots kept as stream files in a directory.

Each snapshot is ``DIR/<tag>.qevm``: a complete QEMU-format stream (header, configuration, ram
START/PART/END with every page, device sections, EOF, vmdesc) that ``qevm dump`` and QEMU's
analyze-migration.py read like any migration stream.  ``DIR/snapshots.json`` keeps what QEMU
keeps in its qcow2 snapshot table: id, tag, vmstate size, date, VM clock, icount.

The store only writes and reads files; stopping and restarting the VM around it, and the QMP
events, are the engine's job.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from qevm.engine.load import StreamLoader
from qevm.engine.machine import Machine
from qevm.engine.stream import SaveSession, StreamOut
from qevm.errors import UsageError
from qevm.units import format_size

__all__ = ["SnapshotInfo", "SnapshotStore", "load_from_file", "format_snapshot_table",
           "NO_SNAPSHOT_DEVICE"]

INDEX = "snapshots.json"
SUFFIX = ".qevm"
#: what QEMU says when no block device can hold a snapshot (here: no --snapshot-dir)
NO_SNAPSHOT_DEVICE = "no block device can store vmstate for snapshot"
_TAG = re.compile(r"^[^/\x00]{1,255}$")


@dataclass
class SnapshotInfo:
    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int = -1




def format_snapshot_table(snaps: list[SnapshotInfo]) -> str:
    """``info snapshots`` as QEMU 10.0 prints it (block/qapi.c bdrv_snapshot_dump, HMP lines)."""
    if not snaps:
        return "There is no snapshot available.\n"
    lines = ["List of snapshots present on all disks:",
             f"{'ID':<7} {'TAG':<16} {'VM_SIZE':>8} {'DATE':>19} {'VM_CLOCK':>15} {'ICOUNT':>10}"]
    for sn in snaps:
        date = datetime.datetime.fromtimestamp(sn.date_sec).strftime("%Y-%m-%d %H:%M:%S")
        secs = sn.vm_clock_nsec // 1_000_000_000
        clock = (f"{secs // 3600:04d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
                 f"{(sn.vm_clock_nsec // 1_000_000) % 1000:03d}")
        icount = str(sn.icount) if sn.icount != -1 else "--"
        lines.append(f"{'--':<7} {sn.name:<16} {format_size(sn.vm_state_size):>8} {date:>19} {clock:>15} "
                     f"{icount:>10}")
    return "\n".join(lines) + "\n"


def load_from_file(machine: Machine, f: Any) -> None:
    """Load the stream read from ``f`` (anything with ``readinto``) into ``machine``."""
    ld = StreamLoader(machine)
    while not ld.finished:
        view = ld.get_buffer(1 << 20)
        try:
            n = f.readinto(view)
        finally:
            view.release()
        ld.buffer_updated(n or 0)
        if not n:
            break
    ld.check_complete()


class SnapshotStore:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    # -- index ---------------------------------------------------------------------------------------
    def _index_path(self) -> str:
        return os.path.join(self.dir, INDEX)

    def entries(self) -> list[SnapshotInfo]:
        try:
            with open(self._index_path(), encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return []
        return [SnapshotInfo(**d) for d in raw.get("snapshots", [])]

    def _write_index(self, snaps: list[SnapshotInfo], next_id: int) -> None:
        doc: dict[str, Any] = {"next-id": next_id, "snapshots": [asdict(s) for s in snaps]}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".index.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self._index_path())

    def _next_id(self) -> int:
        try:
            with open(self._index_path(), encoding="utf-8") as f:
                return int(json.load(f).get("next-id", 1))
        except FileNotFoundError:
            return 1

    def path(self, name: str) -> str:
        if not _TAG.match(name) or name in (".", ".."):
            raise UsageError(f"'{name}' cannot be used as a snapshot name here")
        return os.path.join(self.dir, name + SUFFIX)

    def find(self, name: str) -> SnapshotInfo | None:
        for s in self.entries():
            if s.name == name or s.id == name:
                return s
        return None

    # -- operations (the VM is stopped by the caller) ------------------------------------------------------
    def save(self, machine: Machine, name: str | None, now: datetime.datetime | None = None,
             on_sync: Any = None) -> SnapshotInfo:
        """Write the machine's state as a stream; an existing snapshot of the same name is replaced."""
        now = now or datetime.datetime.now()
        if not name:
            name = now.strftime("vm-%Y%m%d%H%M%S")
        target = self.path(name)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".save.", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                out = StreamOut(f.write, chunk=1 << 20)
                sess = SaveSession(machine, out, on_sync=on_sync)
                sess.header()
                sess.setup()
                sess.iterate(None)
                sess.complete()
                size = out.total
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        snaps = [s for s in self.entries() if s.name != name]
        nid = self._next_id()
        info = SnapshotInfo(str(nid), name, size, int(now.timestamp()), now.microsecond * 1000,
                            machine.clock.now())
        snaps.append(info)
        self._write_index(snaps, nid + 1)
        return info

    def load(self, machine: Machine, name: str) -> SnapshotInfo:
        info = self.find(name)
        if info is None:
            raise UsageError(f"Snapshot '{name}' does not exist in one or more devices")
        with open(self.path(info.name), "rb") as f:
            load_from_file(machine, f)
        return info

    def delete(self, name: str) -> bool:
        snaps = self.entries()
        keep = [s for s in snaps if s.name != name and s.id != name]
        if len(keep) == len(snaps):
            return False
        for s in snaps:
            if s not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(self.path(s.name))
        self._write_index(keep, self._next_id())
        return True
