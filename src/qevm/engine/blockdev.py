"""The machine's disk (``qevm vm --drive FILE``): a raw or qcow2 image file the guest reads and
writes, and its dirty bitmaps, as QEMU's block layer keeps them for one ``-drive``.

``Disk`` reads and writes guest bytes (raw: the file itself; qcow2: through
``qevm.io.qcow2write.GuestWriter``, clusters allocated as QEMU allocates them) and marks every
write in its enabled dirty bitmaps: the named ones (QMP ``block-dirty-bitmap-add``) and the
anonymous trackers block migration creates (granularity 1 MiB).  ``DirtyBitmap`` is QEMU's
BdrvDirtyBitmap reduced to what is observable: name, granularity, persistence, enabled/busy, the
bits, and the serialization QEMU uses on the wire and for ``x-debug-block-dirty-bitmap-sha256``
(hbitmap_serialize_part: bit ``i`` of the bitmap is bit ``i % 64`` of little-endian 64-bit word
``i // 64``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from qevm.errors import QevmError, UsageError
from qevm.io.containers import QCOW2_MAGIC, Qcow2Image
from qevm.io.qcow2write import GuestWriter

__all__ = ["Disk", "DirtyBitmap", "DRIVE_ID", "NODE_NAME", "SECTOR", "DEFAULT_GRANULARITY"]

#: the drive's device name (QEMU names an id-less ``-drive`` ``drive0`` in this engine's messages)
DRIVE_ID = "drive0"
#: the format node's name: QEMU generates one starting with '#' for a -drive without node-name
NODE_NAME = "#block100"
SECTOR = 512
#: bdrv_get_default_bitmap_granularity: the cluster size, at least 64 KiB
DEFAULT_GRANULARITY = 64 << 10
_TO01 = bytes.maketrans(b"\x00\x01", b"01")
_FROM01 = bytes.maketrans(b"01", b"\x00\x01")


class DirtyBitmap:
    """One dirty bitmap: one byte per bit in ``bits`` (1 = dirty)."""

    def __init__(self, name: str | None, granularity: int, disk_size: int, *, persistent: bool = False,
                 enabled: bool = True) -> None:
        self.name = name
        self.granularity = granularity
        self.disk_size = disk_size
        self.persistent = persistent
        self.enabled = enabled
        self.busy = False
        self.nbits = -(-disk_size // granularity)
        self.bits = bytearray(self.nbits)

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        g = self.granularity
        lo, hi = offset // g, min(self.nbits - 1, (offset + length - 1) // g)
        self.bits[lo:hi + 1] = b"\x01" * (hi - lo + 1)

    def reset(self, offset: int, length: int) -> None:
        g = self.granularity
        lo, hi = offset // g, min(self.nbits - 1, (offset + length - 1) // g)
        self.bits[lo:hi + 1] = bytes(hi - lo + 1)

    def get(self, offset: int) -> bool:
        return bool(self.bits[offset // self.granularity])

    @property
    def dirty_bits(self) -> int:
        return self.bits.count(1)

    @property
    def count(self) -> int:
        """Dirty bytes as QEMU counts them (bits times granularity)."""
        return self.dirty_bits * self.granularity

    # -- serialization (QEMU's hbitmap_serialize_part / deserialize_part) -------------------------------
    def bit_range(self, offset: int, length: int) -> tuple[int, int]:
        """The bits [lo, hi) that cover bytes [offset, offset + length)."""
        g = self.granularity
        return offset // g, min(self.nbits, -(-(offset + length) // g))

    def serialize(self, offset: int, length: int) -> bytes:
        """The bits covering [offset, offset + length), in whole little-endian 64-bit words."""
        lo, hi = self.bit_range(offset, length)
        words = -(-(hi - lo) // 64)
        chunk = bytes(self.bits[lo:hi])
        if not chunk:
            return bytes(words * 8)
        value = int(chunk[::-1].translate(_TO01), 2)
        return value.to_bytes(words * 8, "little")

    def deserialize(self, offset: int, length: int, buf: bytes) -> None:
        lo, hi = self.bit_range(offset, length)
        n = hi - lo
        if n <= 0:
            return
        value = int.from_bytes(buf, "little") & ((1 << n) - 1)
        self.bits[lo:hi] = format(value, f"0{n}b").encode()[::-1].translate(_FROM01)

    def sha256(self) -> str:
        """x-debug-block-dirty-bitmap-sha256: the digest of the whole serialized bitmap."""
        return hashlib.sha256(self.serialize(0, self.disk_size)).hexdigest()

    def info(self) -> dict[str, Any]:
        """One entry of query-block's ``dirty-bitmaps`` (QEMU 7.2's BlockDirtyInfo)."""
        return {"name": self.name, "recording": self.enabled, "persistent": self.persistent, "busy": self.busy,
                "granularity": self.granularity, "count": self.count}


class Disk:
    """A raw or qcow2 image as the guest's disk (see the module docstring).  Writes happen with
    the machine lock held; block migration reads with it held too (consistent chunks)."""

    def __init__(self, path: str, *, name: str = DRIVE_ID, node_name: str = NODE_NAME) -> None:
        self.path = path
        self.name = name
        self.node_name = node_name
        try:
            self.fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise UsageError(f"Could not open '{path}': {e.strerror}") from None
        self._qcow2: GuestWriter | None = None
        head = os.pread(self.fd, 4, 0)
        if head == QCOW2_MAGIC:
            self.format = "qcow2"
            with open(path, "rb") as f:
                img = Qcow2Image(f, path)
                self.size: int = int(img.size)
                self.cluster_size: int = int(img.cluster_size)
        else:
            self.format = "raw"
            self.size = os.fstat(self.fd).st_size
            self.cluster_size = 0
        self.sectors = -(-self.size // SECTOR)
        self.bitmaps: list[DirtyBitmap] = []  # named, in creation order
        self.trackers: list[DirtyBitmap] = []  # anonymous (block migration)

    def close(self) -> None:
        if self._qcow2 is not None:
            self._qcow2.close()
            self._qcow2 = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _writer(self) -> GuestWriter:
        if self._qcow2 is None:
            self._qcow2 = GuestWriter(self.path)
        return self._qcow2

    # -- guest I/O ------------------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if self.format == "qcow2":
            return self._writer().read(offset, length)
        out = os.pread(self.fd, length, offset)
        return out + bytes(length - len(out))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise QevmError(f"{self.name}: write of {len(data)} bytes at {offset} is beyond the end of the "
                            f"disk ({self.size} bytes)")
        if self.format == "qcow2":
            self._writer().write(offset, data)
        else:
            mv = memoryview(data)
            off = offset
            while len(mv):
                k = os.pwrite(self.fd, mv, off)
                mv = mv[k:]
                off += k
        self.mark_dirty(offset, len(data))

    def mark_dirty(self, offset: int, length: int) -> None:
        """A write happened (or counts as one, like QEMU's write of zeroes): every enabled bitmap
        and every tracker records it."""
        for bm in self.bitmaps:
            if bm.enabled:
                bm.mark(offset, length)
        for bm in self.trackers:
            bm.mark(offset, length)

    def allocation(self, offset: int, max_len: int) -> tuple[bool, int]:
        """bdrv_is_allocated of the top layer: whether ``offset`` is allocated and for how many
        bytes (up to ``max_len``) that holds.  A raw image allocates everything; a qcow2 image
        what its L2 tables map to data (zero clusters count as unallocated here: no backing
        file is ever opened, so both read as zeros)."""
        max_len = min(max_len, self.size - offset)
        if self.format != "qcow2":
            return True, max_len
        return self._writer().allocation(offset, max_len)

    def flush(self) -> None:
        if self._qcow2 is not None:
            self._qcow2.flush()
        os.fsync(self.fd)

    # -- bitmaps --------------------------------------------------------------------------------------
    def find_bitmap(self, name: str) -> DirtyBitmap | None:
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        return None

    def default_granularity(self) -> int:
        return max(self.cluster_size, DEFAULT_GRANULARITY)

    def add_tracker(self, granularity: int) -> DirtyBitmap:
        bm = DirtyBitmap(None, granularity, self.size)
        self.trackers.append(bm)
        return bm

    def drop_tracker(self, bm: DirtyBitmap) -> None:
        if bm in self.trackers:
            self.trackers.remove(bm)

    def info(self) -> dict[str, Any]:
        """query-block's entry for this drive (the members a management layer looks at)."""
        return {
            "device": self.name, "locked": False, "removable": False, "type": "unknown",
            "inserted": {
                "file": self.path, "node-name": self.node_name, "ro": False, "drv": self.format,
                "encrypted": False, "backing_file_depth": 0, "detect_zeroes": "off", "write_threshold": 0,
                "cache": {"writeback": True, "direct": False, "no-flush": False},
                "image": {"filename": self.path, "format": self.format, "virtual-size": self.size,
                          "dirty-flag": False},
                "dirty-bitmaps": [bm.info() for bm in self.bitmaps],
            },
        }
