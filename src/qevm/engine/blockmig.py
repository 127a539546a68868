"""Block migration and dirty-bitmap migration: the ``block`` and ``dirty-bitmap`` live sections.

Facts from QEMU 7.2's migration/block.c and migration/block-dirty-bitmap.c; the records are
written and read with the one codec of each section (``qevm.format.live``: ``encode_block_record``
/ ``_block``, ``encode_dbitmap_record`` / ``_dbitmap``).

``block`` (QEMU 7.2, capability ``block`` / ``migrate -b``; removed in 9.1): the disk goes in 1 MiB
chunks (``value << 9 | flags``, the device name, 1 MiB of data or nothing for ZERO_BLOCK).  Setup
starts a 1 MiB-granularity dirty tracker on the disk and writes EOS; each iteration first sends the
bulk copy front to back, with a PROGRESS record whenever the percentage changes, then the chunks the
guest dirtied since they were sent; completion (VM stopped) sends every chunk still dirty, PROGRESS
100 and EOS.  The destination writes each chunk into its own ``--drive`` (the last chunk of a disk
whose size is not a multiple of 1 MiB carries padding that is not written).  With
``block-incremental`` (``migrate -i``: a shared base) the bulk phase moves over what the image
does not allocate (a qcow2's unallocated and zero clusters; a raw image allocates everything).

``dirty-bitmap`` (capability ``dirty-bitmaps``): setup sends a START record per named bitmap (device
or node alias, bitmap alias, granularity, enabled/persistent flags) and EOS; while the VM runs
nothing (QEMU only iterates it when stopped, in postcopy); completion sends the bits in chunks of
1 KiB of serialized bitmap (BITS, or BITS|ZEROES without a buffer), a COMPLETE per bitmap, EOS.
On the destination a bitmap is disabled while it loads; an enabled one gets a successor that records
the writes made meanwhile (block migration's, zeroes included) and is merged into it at COMPLETE,
as QEMU reclaims it.
Names are only written when they change from the previous record.  ``block-bitmap-mapping`` maps
node names and bitmap names to aliases on the source and back on the destination, with the
``persistent`` transform.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from qevm.engine.blockdev import SECTOR, DirtyBitmap, Disk
from qevm.engine.machine import Machine
from qevm.errors import QevmError
from qevm.format.events import LiveRecord
from qevm.format.live import (
    BLOCK_CHUNK,
    BlockFlag,
    DirtyBitmapFlag,
    DirtyBitmapStartFlag,
    encode_block_record,
    encode_dbitmap_record,
)

__all__ = ["BlockSaver", "DirtyBitmapSaver", "LiveLoader", "BLOCK_IDSTR", "DIRTY_BITMAP_IDSTR", "LIVE_VERSION"]

log = logging.getLogger(__name__)

BLOCK_IDSTR = "block"
DIRTY_BITMAP_IDSTR = "dirty-bitmap"
LIVE_VERSION = 1  # both register_savevm_live(..., 0, 1, ...)
CHUNK_SECTORS = BLOCK_CHUNK // SECTOR
_MAX_IS_ALLOCATED_SEARCH = 65536 * SECTOR
#: serialized bitmap bytes per BITS record (block-dirty-bitmap.c CHUNK_SIZE)
BITMAP_CHUNK = 1 << 10
_BITS_ALIGN = 32  # send_bitmap_bits pads buffers to 4 * sizeof(long)
_EOS = encode_block_record(BlockFlag.EOS)
_DBM_EOS = encode_dbitmap_record(DirtyBitmapFlag.EOS)


def _zero(data: bytes) -> bool:
    """All bytes zero (one C-level count instead of ``any``'s step per byte)."""
    return data.count(0) == len(data)


Write = Callable[[bytes], None]
#: QEMU 7.2's MigrationStats members, in its order
_DISK_STATS = ("transferred", "remaining", "total", "duplicate", "skipped", "normal", "normal-bytes",
               "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests", "page-size", "multifd-bytes",
               "pages-per-second", "precopy-bytes", "downtime-bytes", "postcopy-bytes",
               "dirty-sync-missed-zero-copy")


# -- block: the save side ----------------------------------------------------------------------------------

class BlockSaver:
    """QEMU 7.2's block migration for the machine's disk (none: the section carries only EOS and
    PROGRESS records, as QEMU with no writable drive)."""

    idstr = BLOCK_IDSTR
    before_ram = True  # blk_mig_init registers "block" before "ram"
    iterates = True

    def __init__(self, machine: Machine, *, zero_blocks: bool = False, shared_base: bool = False) -> None:
        self.m = machine
        self.disk: Disk | None = machine.disk
        self.zero_blocks = zero_blocks
        self.shared_base = shared_base  # block-incremental: skip what the top layer does not allocate
        self.total = self.disk.sectors if self.disk is not None else 0
        self.cur = 0  # next bulk sector
        self.completed = 0  # sectors the bulk phase has sent
        self.bulk_done = self.total == 0
        self.cursor = 0  # dirty-phase scan position (chunk index)
        self.prev_progress = -1
        self.tracker: DirtyBitmap | None = None
        self.blocks_sent = 0
        self.bytes_sent = 0

    # -- phases ----------------------------------------------------------------------------------------
    def setup(self, write: Write) -> None:
        if self.disk is not None:
            with self.m.lock:
                self.tracker = self.disk.add_tracker(BLOCK_CHUNK)
        write(_EOS)

    def iterate(self, write: Write, deadline: float | None) -> None:
        self.cursor = 0
        while True:
            if not self.bulk_done:
                self._bulk_one(write)
            elif not self._dirty_one(write):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        write(_EOS)

    def complete(self, write: Write) -> None:
        """With the VM stopped: every chunk still dirty, PROGRESS 100, EOS."""
        while not self.bulk_done:
            self._bulk_one(write)
        self.cursor = 0
        while self._dirty_one(write):
            pass
        write(encode_block_record(BlockFlag.PROGRESS, 100))
        write(_EOS)
        self.close()

    def close(self) -> None:
        if self.disk is not None and self.tracker is not None:
            with self.m.lock:
                self.disk.drop_tracker(self.tracker)
            self.tracker = None

    def pending(self) -> int:
        if self.disk is None:
            return 0
        dirty = self.tracker.dirty_bits if self.tracker is not None else 0
        return (self.total - self.cur) * SECTOR + dirty * BLOCK_CHUNK

    # -- records ---------------------------------------------------------------------------------------
    def _send(self, write: Write, sector: int, data: bytes) -> None:
        assert self.disk is not None
        flags = BlockFlag.DEVICE_BLOCK
        if self.zero_blocks and _zero(data):
            flags |= BlockFlag.ZERO_BLOCK
            rec = encode_block_record(flags, sector, self.disk.name)
        else:
            rec = encode_block_record(flags, sector, self.disk.name, data)
        write(rec)
        self.blocks_sent += 1
        self.bytes_sent += len(rec)

    def _read_chunk(self, sector: int) -> bytes:
        """Reset the tracker over the chunk and read it, atomically against guest writes."""
        disk = self.disk
        assert disk is not None and self.tracker is not None
        nr = min(CHUNK_SECTORS, self.total - sector)
        with self.m.lock:
            self.tracker.reset(sector * SECTOR, nr * SECTOR)
            return disk.read(sector * SECTOR, nr * SECTOR)

    def _bulk_one(self, write: Write) -> None:
        if self.disk is not None and self.shared_base:
            self._skip_unallocated(self.disk)
        if self.disk is None or self.cur >= self.total:
            self.bulk_done = True
            self.completed = self.cur = self.total
        else:
            sector = self.cur // CHUNK_SECTORS * CHUNK_SECTORS  # whole chunks, even partly unallocated
            data = self._read_chunk(sector)
            self.cur = min(self.total, sector + CHUNK_SECTORS)
            self.completed = self.cur
            self.bulk_done = self.cur >= self.total
            self._progress(write, sector)
            self._send(write, sector, data)
            return
        self._progress(write, self.completed)

    def _skip_unallocated(self, disk: Disk) -> None:
        """mig_save_device_bulk with a shared base: move over runs the image does not allocate
        (looked up 32 MiB at most at a time, as QEMU)."""
        while self.cur < self.total:
            with self.m.lock:
                allocated, run = disk.allocation(self.cur * SECTOR, _MAX_IS_ALLOCATED_SEARCH)
            if allocated or run < SECTOR:
                return
            self.cur += run // SECTOR

    def _progress(self, write: Write, done_sectors: int) -> None:
        progress = done_sectors * 100 // self.total if self.total else 100
        if progress != self.prev_progress:
            self.prev_progress = progress
            write(encode_block_record(BlockFlag.PROGRESS, progress))

    def _dirty_one(self, write: Write) -> bool:
        """Send the next dirty chunk at or after the cursor; False when none is left."""
        if self.tracker is None:
            return False
        i = self.tracker.bits.find(1, self.cursor)
        if i < 0:
            return False
        sector = i * CHUNK_SECTORS
        data = self._read_chunk(sector)
        self._send(write, sector, data)
        self.cursor = i + 1
        return True

    def info(self) -> dict[str, Any]:
        """query-migrate's ``disk`` (a MigrationStats: blk_mig_bytes_* filled in, the rest zero)."""
        total = self.total * SECTOR
        done = self.completed * SECTOR
        stats: dict[str, Any] = dict.fromkeys(_DISK_STATS, 0)
        stats.update({"transferred": done, "remaining": total - done, "total": total, "mbps": 0.0})
        return stats


# -- dirty bitmaps: the save side --------------------------------------------------------------------------

def _mapping_for(mapping: list[dict[str, Any]] | None, node_name: str) -> dict[str, Any] | None:
    for node in mapping or ():
        if node["node-name"] == node_name:
            return node
    return None


class DirtyBitmapSaver:
    """The named bitmaps of the machine's disk (see the module docstring)."""

    idstr = DIRTY_BITMAP_IDSTR
    before_ram = False  # dirty_bitmap_mig_init registers after ram
    iterates = False  # only iterated with the VM stopped (postcopy), which precopy never does

    def __init__(self, machine: Machine, mapping: list[dict[str, Any]] | None = None) -> None:
        self.m = machine
        self.entries: list[tuple[DirtyBitmap, str, str, int]] = []  # bitmap, node alias, bitmap alias, flags
        disk = machine.disk
        if disk is None:
            return
        if mapping is not None:
            node = _mapping_for(mapping, disk.node_name)
            if node is None:
                return
            node_alias = node["alias"]
            aliases = {b["name"]: b for b in node["bitmaps"]}
        else:
            node_alias = disk.name
            aliases = None
        for bm in disk.bitmaps:
            assert bm.name is not None
            persistent = bm.persistent
            if aliases is not None:
                a = aliases.get(bm.name)
                if a is None:
                    continue  # bitmaps without an alias are not migrated
                alias = a["alias"]
                persistent = a.get("transform", {}).get("persistent", persistent)
            else:
                alias = bm.name
                if len(alias.encode()) > 255:
                    raise QevmError(f"Cannot migrate bitmap '{bm.name}' on node '{disk.name}': Name is longer "
                                    "than 255 bytes")
            flags = (DirtyBitmapStartFlag.ENABLED if bm.enabled else 0) | (
                DirtyBitmapStartFlag.PERSISTENT if persistent else 0)
            self.entries.append((bm, node_alias, alias, int(flags)))
        self._prev: tuple[str | None, str | None] = (None, None)

    @property
    def active(self) -> bool:
        """dirty_bitmap_is_active: the capability is on and there is a bitmap to send."""
        return bool(self.entries)

    def _names(self, node: str, bitmap: str) -> tuple[str | None, str | None]:
        pn, pb = self._prev
        self._prev = (node, bitmap)
        return (node if node != pn else None), (bitmap if (node, bitmap) != (pn, pb) else None)

    def setup(self, write: Write) -> None:
        for bm, node, alias, flags in self.entries:
            bm.busy = True
            n, b = self._names(node, alias)
            write(encode_dbitmap_record(DirtyBitmapFlag.START, node=n, bitmap=b, granularity=bm.granularity,
                                        bitmap_flags=flags))
        write(_DBM_EOS)

    def iterate(self, write: Write, deadline: float | None) -> None:
        write(_DBM_EOS)

    def pending(self) -> int:
        return 0

    def complete(self, write: Write) -> None:
        for bm, node, alias, _ in self.entries:
            per_chunk = BITMAP_CHUNK * 8 * (bm.granularity // SECTOR)  # sectors per BITS record
            total = -(-bm.disk_size // SECTOR)
            for sector in range(0, total, per_chunk):
                nr = min(per_chunk, total - sector)
                bits = bm.serialize(sector * SECTOR, nr * SECTOR)
                bits += bytes(-len(bits) % _BITS_ALIGN)
                n, b = self._names(node, alias)
                if any(bits):
                    write(encode_dbitmap_record(DirtyBitmapFlag.BITS, node=n, bitmap=b, start_sector=sector,
                                                nr_sectors=nr, bits=bits))
                else:
                    write(encode_dbitmap_record(DirtyBitmapFlag.BITS | DirtyBitmapFlag.ZEROES, node=n, bitmap=b,
                                                start_sector=sector, nr_sectors=nr))
        for _bm, node, alias, _ in self.entries:
            n, b = self._names(node, alias)
            write(encode_dbitmap_record(DirtyBitmapFlag.COMPLETE, node=n, bitmap=b))
        write(_DBM_EOS)
        self.close()

    def close(self) -> None:
        for bm, *_ in self.entries:
            bm.busy = False


# -- the load side of both -------------------------------------------------------------------------------

class LiveLoader:
    """Applies ``block`` and ``dirty-bitmap`` records to the machine's disk as they are parsed."""

    def __init__(self, machine: Machine, mapping: list[dict[str, Any]] | None = None) -> None:
        self.m = machine
        self.mapping = mapping
        self.cancelled = False  # dirty-bitmap: QEMU drops the bitmaps but goes on loading
        #: bitmap name -> (bitmap, its successor: the writes made while it loads, when it is enabled)
        self.loading: dict[str, tuple[DirtyBitmap, DirtyBitmap | None]] = {}
        self.bitmap: DirtyBitmap | None = None
        self.blocks = 0
        self.progress = -1

    def record(self, rec: LiveRecord) -> None:
        if rec.handler == BLOCK_IDSTR:
            self._block(rec)
        else:
            self._dbitmap(rec)

    # -- block ---------------------------------------------------------------------------------------
    def _block(self, rec: LiveRecord) -> None:
        info = rec.info
        if rec.kind == "progress":
            self.progress = int(info["percent"])
            return
        if rec.kind != "block":
            return
        disk = self.m.disk
        if disk is None or info["device"] != disk.name:
            raise QevmError(f"Error unknown block device {info['device']}")
        sector = int(info["sector"])
        nr = min(CHUNK_SECTORS, disk.sectors - sector)
        if nr <= 0:
            raise QevmError(f"block migration: sector {sector} is beyond the end of {disk.name} "
                            f"({disk.sectors} sectors)")
        n = min(nr * SECTOR, disk.size - sector * SECTOR)
        data = memoryview(rec.raw)[len(rec.raw) - BLOCK_CHUNK:][:n] if not info.get("zero") else None
        self._write(disk, sector * SECTOR, data, n)
        self.blocks += 1

    def _write(self, disk: Disk, offset: int, data: memoryview | None, n: int) -> None:
        """Write a chunk; runs of zeros are only written where the disk does not read zero already
        (QEMU writes them as zeroes with MAY_UNMAP)."""
        step = max(disk.cluster_size, 64 << 10)
        with self.m.lock:
            for p in range(0, n, step):
                k = min(step, n - p)
                piece = data[p:p + k] if data is not None else None
                if piece is None or _zero(bytes(piece)):
                    if not _zero(disk.read(offset + p, k)):
                        disk.write(offset + p, bytes(k))
                    else:
                        disk.mark_dirty(offset + p, k)
                else:
                    disk.write(offset + p, piece)

    # -- dirty bitmaps ---------------------------------------------------------------------------------
    def _dbitmap(self, rec: LiveRecord) -> None:
        info = rec.info
        kind = rec.kind
        if kind == "eos" and not info["flags"] & ~DirtyBitmapFlag.EOS:
            return
        if self.cancelled:
            return
        disk = self.m.disk
        node_alias, alias = info.get("node"), info.get("bitmap")
        name = alias
        transform: dict[str, Any] = {}
        if self.mapping is not None:
            node = next((n for n in self.mapping if n["alias"] == node_alias), None)
            if node is None or disk is None or node["node-name"] != disk.node_name:
                self._cancel(f"Error: Unknown node alias '{node_alias}'" if node is None else
                             f"Cannot find device= nor node_name={node['node-name']}")
                return
            bmap = next((b for b in node["bitmaps"] if b["alias"] == alias), None)
            if bmap is None:
                self._cancel(f"Error: Unknown bitmap alias '{alias}' on node '{disk.node_name}' "
                             f"(alias '{node_alias}')")
                return
            name = bmap["name"]
            transform = bmap.get("transform", {})
        elif disk is None or node_alias not in (disk.name, disk.node_name):
            self._cancel(f"Cannot find device={node_alias} nor node_name={node_alias}")
            return
        assert disk is not None and name is not None
        if kind == "start":
            if disk.find_bitmap(name) is not None:
                raise QevmError(f"Bitmap with the same name ('{name}') already exists on destination")
            flags = int(info["bitmap_flags"])
            if flags & DirtyBitmapStartFlag.RESERVED:
                raise QevmError(f"Unknown flags in migrated dirty bitmap header: {flags:x}")
            persistent = transform.get("persistent", bool(flags & DirtyBitmapStartFlag.PERSISTENT))
            bm = DirtyBitmap(name, int(info["granularity"]), disk.size, persistent=persistent, enabled=False)
            bm.busy = True
            successor = None
            with self.m.lock:
                disk.bitmaps.append(bm)
                if flags & DirtyBitmapStartFlag.ENABLED:  # bdrv_dirty_bitmap_create_successor
                    successor = disk.add_tracker(bm.granularity)
            self.loading[name] = (bm, successor)
            return
        entry = self.loading.get(name)
        if entry is None:
            self._cancel(f"Error: unknown dirty bitmap '{name}' for block device '{disk.node_name}'")
            return
        bm = entry[0]
        if kind == "bits":
            first, nbytes = int(info["start_sector"]) * SECTOR, int(info["nr_sectors"]) * SECTOR
            if info.get("zeroes"):
                bm.deserialize(first, nbytes, b"")
                return
            size = int(info["buf_size"])
            lo, hi = bm.bit_range(first, nbytes)
            needed = -(-(hi - lo) // 64) * 8
            if needed > size or size > needed + (-needed % _BITS_ALIGN):
                self._cancel(f"Migrated bitmap granularity doesn't match the destination bitmap '{name}' "
                             "granularity")
                return
            bm.deserialize(first, nbytes, rec.raw[len(rec.raw) - size:])
        elif kind == "complete":
            successor = entry[1]
            with self.m.lock:
                bm.busy = False
                if successor is not None:  # bdrv_reclaim_dirty_bitmap: merge, then record again
                    disk.drop_tracker(successor)
                    bm.bits = bytearray(x | y for x, y in zip(bm.bits, successor.bits, strict=True))
                    bm.enabled = True
            del self.loading[name]

    def _cancel(self, why: str) -> None:
        """QEMU's cancel_incoming_locked: report, drop the unfinished bitmaps, read on."""
        log.error("%s", why)
        self.cancelled = True
        disk = self.m.disk
        if disk is not None:
            with self.m.lock:
                for bm, successor in self.loading.values():
                    if bm in disk.bitmaps:
                        disk.bitmaps.remove(bm)
                    if successor is not None:
                        disk.drop_tracker(successor)
        self.loading.clear()
