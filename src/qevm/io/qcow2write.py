"""Write and delete internal snapshots of qcow2 images, as QEMU's ``savevm`` / ``delvm`` leave them.

``add_snapshot(path, name, vmstate, vm_clock_ns=...)`` stores a VM-state stream as a new internal
snapshot: the stream goes into new clusters mapped at guest offsets past the virtual disk (format.md
§8.3) through new L2 tables, the snapshot gets its own L1 table (a copy of the active one plus the
vmstate entries), every cluster the active L1 reaches gets its refcount raised (the ``COPIED`` flags
of the active tables cleared accordingly), and only then is the new snapshot table written and the
header switched to it with one 12-byte write.  A crash before that write leaves leaked clusters at
most; the old table is released after it.

The image is locked the way QEMU locks it (open-file-description locks on bytes 100+perm and
200+perm, block/file-posix.c), so an image a running QEMU holds open is refused, and QEMU cannot
open it while we write.  Images that are dirty (lazy refcounts), marked corrupt, encrypted or with
an external data file are refused.

The parsing of the header, snapshot table and L2 entries is ``qevm.io.containers.Qcow2Image``'s.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from qevm.errors import DecodeError, UsageError
from qevm.io.containers import (
    _INCOMPAT_CORRUPT,
    _INCOMPAT_DATA_FILE,
    _INCOMPAT_DIRTY,
    _L2_COMPRESSED,
    _L2_ZERO,
    _OFFSET_MASK,
    _QCOW2_MAX_SNAPSHOTS,
    _QCOW2_MAX_SNAPSHOTS_BYTES,
    _SNAP_ENTRY,
    _ZERO,
    Qcow2Image,
    Qcow2Snapshot,
    _pread,
)

__all__ = ["add_snapshot", "delete_snapshot", "list_image_snapshots", "create_image", "ImageLock", "GuestWriter",
           "VmStateCopier", "start_writeback", "WRITEBACK_STEP"]

#: bytes of VM state written between two ``start_writeback`` calls
WRITEBACK_STEP = 64 << 20


class VmStateCopier(Protocol):
    """A VM state that puts itself into the image (e.g. with ``copy_file_range``) instead of being
    handed over in chunks: ``copy_to(fd, offset)`` writes it all at ``offset`` of ``fd`` and returns
    its size; it should call ``start_writeback`` as it goes."""

    def copy_to(self, fd: int, offset: int) -> int: ...


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing [offset, offset + length) of ``fd`` to disk now, without waiting
    (Linux starts the writeback of dirty pages on POSIX_FADV_DONTNEED), so that the flush before the
    snapshot table switch finds little left to write.  Harmless where unsupported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None and length > 0:
        try:
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

_COPIED = 1 << 63
_MAX_L1_BYTES = 32 << 20

# QEMU's image locking (block/file-posix.c): one byte per permission at 100 + bit ("I use it") and at
# 200 + bit ("I do not let others use it"); permission bits as in include/block/block-common.h
_LOCK_PERM_BASE = 100
_LOCK_SHARED_BASE = 200
_PERM_CONSISTENT_READ, _PERM_WRITE, _PERM_WRITE_UNCHANGED, _PERM_RESIZE = 0, 1, 2, 3
_PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
_FLOCK = struct.Struct("@hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class ImageLock:
    """QEMU-compatible locks on an open image: we use consistent-read, write and resize, and share
    only consistent-read and write-unchanged (what ``qemu-img snapshot`` takes).  Raises
    ``UsageError`` naming the permission when another process (a running QEMU) holds a conflicting
    lock."""

    USE = (_PERM_CONSISTENT_READ, _PERM_WRITE, _PERM_RESIZE)
    DENY = (_PERM_WRITE, _PERM_RESIZE)

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        for perm in self.USE:
            self._lock(_LOCK_PERM_BASE + perm)
        for perm in self.DENY:
            self._lock(_LOCK_SHARED_BASE + perm)
        for perm in self.USE:
            if self._taken(_LOCK_SHARED_BASE + perm):
                raise UsageError(f"{label} is in use: another process (QEMU?) does not share the "
                                 f"'{_PERM_NAMES[perm]}' permission (lock byte {_LOCK_SHARED_BASE + perm})")
        for perm in self.DENY:
            if self._taken(_LOCK_PERM_BASE + perm):
                raise UsageError(f"{label} is in use: another process (QEMU?) holds the "
                                 f"'{_PERM_NAMES[perm]}' permission (lock byte {_LOCK_PERM_BASE + perm})")

    def _lock(self, byte: int) -> None:
        try:
            fcntl.fcntl(self.fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))
        except OSError as e:
            raise UsageError(f"image is in use: cannot lock byte {byte} ({e.strerror})") from None

    def _taken(self, byte: int) -> bool:
        res = fcntl.fcntl(self.fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)


class _Image:
    """An open, locked, writable image: refcount access and cluster allocation."""

    REFBLOCK_CACHE = 32

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.f = open(path, "r+b", buffering=0)  # noqa: SIM115
        except OSError as e:
            raise UsageError(f"cannot open {path} for writing: {e.strerror}") from None
        try:
            self.fd = self.f.fileno()
            self.lock = ImageLock(self.fd, path)
            self.img = Qcow2Image(self.f, path)
            self._check()
            self._load_refcounts()
        except BaseException:
            self.f.close()
            raise
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_dirty: set[int] = set()

    def close(self) -> None:
        self.f.close()  # releases the OFD locks

    # -- checks ------------------------------------------------------------------------------
    def _check(self) -> None:
        img = self.img
        p = self.path
        img.check_readable()
        if img.incompatible_features & _INCOMPAT_CORRUPT:
            raise UsageError(f"{p} is marked corrupt by QEMU; repair it first (qemu-img check -r all)")
        if img.incompatible_features & _INCOMPAT_DIRTY:
            raise UsageError(f"{p} was not closed cleanly (dirty bit, lazy refcounts): its refcounts are stale; "
                             "run qemu-img check -r all first")
        if img.incompatible_features & _INCOMPAT_DATA_FILE:
            raise UsageError(f"{p} keeps its data in an external file: no internal snapshots possible")

    def _load_refcounts(self) -> None:
        img = self.img
        cs = img.cluster_size
        head = self._pread(0, 104)
        (self.rt_offset, self.rt_clusters) = struct.unpack_from(">QI", head, 48)
        self.refcount_order = struct.unpack_from(">I", head, 96)[0] if img.version >= 3 else 4
        if self.refcount_order > 6:
            raise DecodeError(f"refcount_order {self.refcount_order} > 6", 96, "qcow2")
        self.rbits = 1 << self.refcount_order
        self.rb_entries = cs * 8 // self.rbits
        if not self.rt_offset or self.rt_offset % cs:
            raise DecodeError(f"refcount table offset 0x{self.rt_offset:x} is not cluster aligned", 48, "qcow2")
        if self.rt_clusters * cs > (64 << 20):
            raise DecodeError(f"refcount table of {self.rt_clusters} clusters is absurd", 56, "qcow2")
        raw = self._pread(self.rt_offset, self.rt_clusters * cs)
        if len(raw) < self.rt_clusters * cs:
            raise DecodeError("file ends inside the refcount table", self.rt_offset + len(raw), "qcow2")
        n = len(raw) // 8
        self.rt = list(struct.unpack(f">{n}Q", raw))
        for i, e in enumerate(self.rt):
            if e & 0x1FF:
                raise DecodeError(f"refcount table entry {i} is not cluster aligned (0x{e:x})",
                                  self.rt_offset + 8 * i, "qcow2")
        size = os.fstat(self.fd).st_size
        self.end_cluster = -(-size // cs)  # first cluster past the end of the file

    # -- raw I/O -----------------------------------------------------------------------------
    def _pread(self, off: int, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = os.pread(self.fd, n - len(out), off + len(out))
            if not b:
                break
            out += b
        return bytes(out)

    def pwrite(self, off: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        while len(mv):
            k = os.pwrite(self.fd, mv, off)
            mv = mv[k:]
            off += k

    def sync(self) -> None:
        os.fsync(self.fd)

    # -- refcounts ---------------------------------------------------------------------------
    def _refblock(self, index: int) -> tuple[bytearray, int] | None:
        if index >= len(self.rt) or not self.rt[index]:
            return None
        off = self.rt[index]
        b = self._rb_cache.get(off)
        if b is None:
            cs = self.img.cluster_size
            b = bytearray(self._pread(off, cs))
            if len(b) < cs:
                raise DecodeError(f"file ends inside refcount block {index}", off + len(b), "qcow2")
            self._rb_cache[off] = b
            while len(self._rb_cache) > self.REFBLOCK_CACHE:
                old, data = next(iter(self._rb_cache.items()))
                if old in self._rb_dirty:
                    self.pwrite(old, data)
                    self._rb_dirty.discard(old)
                del self._rb_cache[old]
        else:
            self._rb_cache.move_to_end(off)
        return b, off

    def _get(self, block: bytearray, i: int) -> int:
        bits = self.rbits
        if bits >= 8:
            w = bits // 8
            return int.from_bytes(block[i * w:(i + 1) * w], "big")
        byte, shift = divmod(i * bits, 8)
        return block[byte] >> shift & ((1 << bits) - 1)

    def _set(self, block: bytearray, i: int, v: int) -> None:
        bits = self.rbits
        if bits >= 8:
            w = bits // 8
            block[i * w:(i + 1) * w] = v.to_bytes(w, "big")
            return
        byte, shift = divmod(i * bits, 8)
        mask = ((1 << bits) - 1) << shift
        block[byte] = (block[byte] & ~mask & 0xFF) | (v << shift)

    def refcount(self, cluster: int) -> int:
        rb = self._refblock(cluster // self.rb_entries)
        return 0 if rb is None else self._get(rb[0], cluster % self.rb_entries)

    def add_ref(self, cluster: int, delta: int) -> int:
        rb = self._refblock(cluster // self.rb_entries)
        if rb is None:
            raise DecodeError(f"cluster {cluster} (host offset 0x{cluster * self.img.cluster_size:x}) is in use but "
                              "no refcount block covers it", None, "qcow2")
        block, off = rb
        i = cluster % self.rb_entries
        v = self._get(block, i) + delta
        if v < 0:
            raise DecodeError(f"refcount of cluster {cluster} would drop below 0 (inconsistent image)", None,
                              "qcow2")
        if v >= 1 << self.rbits:
            raise UsageError(f"{self.path}: refcount of cluster {cluster} would overflow its {self.rbits} bits "
                             "(too many snapshots share it)")
        self._set(block, i, v)
        self._rb_dirty.add(off)
        return v

    def flush_refcounts(self) -> None:
        for off in sorted(self._rb_dirty):
            self.pwrite(off, self._rb_cache[off])
        self._rb_dirty.clear()

    def claim(self, first: int, end: int, sync: bool = True) -> None:
        """Give clusters [first, end) (new, past the old end of the file) refcount 1, creating the
        refcount blocks they need after ``end`` (those count themselves).  Afterwards
        ``self.end_cluster`` is past everything allocated.  ``sync=False``: no flush in between
        (the caller flushes once at the end of its update)."""
        rbe = self.rb_entries
        new_blocks: dict[int, int] = {}  # refblock index -> cluster
        while True:
            need = [k for k in range(first // rbe, (end - 1) // rbe + 1)
                    if (k >= len(self.rt) or not self.rt[k]) and k not in new_blocks]
            if not need:
                break
            for k in need:
                if k >= len(self.rt):
                    raise UsageError(f"{self.path}: no room: the refcount table ({self.rt_clusters} cluster(s)) "
                                     "cannot cover the new clusters; enlarging it is not supported "
                                     "(qemu-img convert the image to a fresh one first)")
                new_blocks[k] = end
                end += 1
        cs = self.img.cluster_size
        for k, c in sorted(new_blocks.items()):
            block = bytearray(cs)
            lo, hi = max(first, k * rbe), min(end, (k + 1) * rbe)
            for cl in range(lo, hi):
                self._set(block, cl - k * rbe, 1)
            self.pwrite(c * cs, block)
        placed = set(new_blocks.values())
        for k in range(first // rbe, (end - 1) // rbe + 1):
            if k in new_blocks:
                continue
            lo, hi = max(first, k * rbe), min(end, (k + 1) * rbe)
            if self.rbits >= 8 and not any(lo <= c < hi for c in placed):
                # the common case, whole byte-sized counts: check and set the range in one go
                rb = self._refblock(k)
                assert rb is not None
                block, off = rb
                w = self.rbits // 8
                a, b = (lo - k * rbe) * w, (hi - k * rbe) * w
                if any(block[a:b]):
                    raise DecodeError(f"a cluster in [{lo}, {hi}) past the end of the file already has a refcount "
                                      "(inconsistent image; run qemu-img check)", None, "qcow2")
                block[a:b] = (1).to_bytes(w, "big") * (hi - lo)
                self._rb_dirty.add(off)
                continue
            for cl in range(lo, hi):
                if cl in placed:
                    continue
                if self.refcount(cl) != 0:
                    raise DecodeError(f"cluster {cl} past the end of the file already has a refcount "
                                      "(inconsistent image; run qemu-img check)", None, "qcow2")
                self.add_ref(cl, 1)
        self.flush_refcounts()
        if sync:
            self.sync()
        for k, c in sorted(new_blocks.items()):
            self.rt[k] = c * cs
            self.pwrite(self.rt_offset + 8 * k, struct.pack(">Q", c * cs))
        self.end_cluster = max(self.end_cluster, end)

    # -- tables -------------------------------------------------------------------------------
    def l1(self, offset: int, size: int) -> list[int]:
        if size * 8 > _MAX_L1_BYTES:
            raise DecodeError(f"L1 table of {size} entries is too large", offset, "qcow2")
        raw = self._pread(offset, size * 8)
        if len(raw) < size * 8:
            raise DecodeError("file ends inside an L1 table", offset + len(raw), "qcow2")
        return list(struct.unpack(f">{size}Q", raw))

    def clusters_of_l2_entry(self, entry: int) -> range:
        """Host clusters an L2 entry holds (compressed data may span two)."""
        img = self.img
        cs_bits = img.cluster_bits
        if entry & _L2_COMPRESSED:
            x = 62 - (cs_bits - 8)
            host = entry & ((1 << x) - 1)
            sectors = ((entry >> x) & ((1 << (cs_bits - 8)) - 1)) + 1
            size = sectors * 512 - (host & 511)
            return range(host >> cs_bits, ((host + size - 1) >> cs_bits) + 1)
        host = entry & _OFFSET_MASK
        if not host:
            return range(0)
        return range(host >> cs_bits, (host >> cs_bits) + 1)

    def update_l1_refcounts(self, l1: list[int], delta: int) -> None:
        """Add ``delta`` to the refcount of every L2 table and data cluster reachable from ``l1``."""
        cs = self.img.cluster_size
        es = self.img.l2_entry_size
        n = self.img.l2_entries
        for e in l1:
            l2 = e & _OFFSET_MASK
            if not l2:
                continue
            table = self._pread(l2, cs)
            if len(table) < cs:
                raise DecodeError("file ends inside an L2 table", l2 + len(table), "qcow2")
            for i in range(n):
                (entry,) = struct.unpack_from(">Q", table, i * es)
                for c in self.clusters_of_l2_entry(entry):
                    self.add_ref(c, delta)
            self.add_ref(l2 // cs, delta)

    def fix_copied(self) -> None:
        """Set the active tables' COPIED flags as QEMU keeps them: set exactly when refcount is 1."""
        img = self.img
        cs = img.cluster_size
        es = img.l2_entry_size
        l1 = self.l1(img.l1_table_offset, img.l1_size)
        new_l1 = []
        for e in l1:
            l2 = e & _OFFSET_MASK
            if not l2:
                new_l1.append(e)
                continue
            table = bytearray(self._pread(l2, cs))
            changed = False
            for i in range(img.l2_entries):
                (entry,) = struct.unpack_from(">Q", table, i * es)
                if entry & _L2_COMPRESSED or not entry & _OFFSET_MASK:
                    continue
                want = _COPIED if self.refcount((entry & _OFFSET_MASK) // cs) == 1 else 0
                if entry & _COPIED != want:
                    struct.pack_into(">Q", table, i * es, (entry & ~_COPIED) | want)
                    changed = True
            if changed:
                self.pwrite(l2, table)
            want = _COPIED if self.refcount(l2 // cs) == 1 else 0
            new_l1.append((e & ~_COPIED) | want)
        if new_l1 != l1:
            self.pwrite(img.l1_table_offset, struct.pack(f">{len(new_l1)}Q", *new_l1))

    def snapshot_entries(self) -> list[tuple[Qcow2Snapshot, bytes]]:
        out = []
        for s in self.img.snapshots:
            ln = _SNAP_ENTRY.size + s.extra_data_size + len(s.id.encode()) + len(s.name.encode())
            out.append((s, self._pread(s.entry_offset, ln)))
        return out

    def write_table(self, entries: list[bytes]) -> tuple[int, int, int]:
        """Write a snapshot table into new clusters; returns (offset, clusters, count).  The
        clusters get refcount 1; the header is not touched."""
        cs = self.img.cluster_size
        data = bytearray()
        for e in entries:
            data += e
            data += bytes(-len(data) % 8)
        if len(data) > _QCOW2_MAX_SNAPSHOTS_BYTES:
            raise UsageError(f"{self.path}: the snapshot table would exceed QEMU's limit of "
                             f"{_QCOW2_MAX_SNAPSHOTS_BYTES} bytes")
        if not entries:
            return 0, 0, 0
        n = -(-len(data) // cs)
        first = self.end_cluster
        data += bytes(n * cs - len(data))
        self.pwrite(first * cs, data)
        self.claim(first, first + n)
        return first * cs, n, len(entries)

    def commit_table(self, offset: int, count: int) -> None:
        """Switch the header to a new snapshot table: one 12-byte write (nb_snapshots,
        snapshots_offset), between two flushes."""
        self.flush_refcounts()
        self.sync()
        self.pwrite(60, struct.pack(">IQ", count, offset))
        self.sync()

    def release_table(self, offset: int, count: int, entries_len: int) -> None:
        if not count or not offset:
            return
        cs = self.img.cluster_size
        for c in range(offset // cs, (offset + entries_len + cs - 1) // cs):
            self.add_ref(c, -1)


def _entry(sid: str, name: str, l1_offset: int, l1_size: int, date_sec: int, date_nsec: int, vm_clock: int,
           vm_state_size: int, disk_size: int, icount: int) -> bytes:
    extra = struct.pack(">QQq", vm_state_size, disk_size, icount)
    sidb, nameb = sid.encode(), name.encode()
    vm32 = vm_state_size if vm_state_size <= 0xFFFFFFFF else 0
    head = _SNAP_ENTRY.pack(l1_offset, l1_size, len(sidb), len(nameb), date_sec, date_nsec, vm_clock, vm32,
                            len(extra))
    return head + extra + sidb + nameb


def _table_len(entries: list[bytes]) -> int:
    n = 0
    for e in entries:
        n += len(e)
        n += -n % 8
    return n


def _new_id(snaps: list[Qcow2Snapshot]) -> str:
    best = 0
    for s in snaps:
        try:
            best = max(best, int(s.id))
        except ValueError:
            pass
    return str(best + 1)


def add_snapshot(image_path: str, name: str, vmstate: Iterable[bytes | bytearray | memoryview] | VmStateCopier,
                 vm_clock_ns: int | Callable[[], int] = 0, *, date: float | None = None, icount: int | None = None,
                 replace: bool = False) -> Qcow2Snapshot:
    """Store the stream ``vmstate`` (an iterable of byte chunks, or a ``VmStateCopier``) as internal
    snapshot ``name`` of ``image_path``.  ``vm_clock_ns`` may be a callable, asked after the stream was
    consumed.
    ``replace`` overwrites a snapshot of that name (else ``UsageError``).  Returns the new entry."""
    if not name or len(name.encode()) > 0xFFFF:
        raise UsageError("a snapshot needs a name of 1..65535 bytes")
    im = _Image(image_path)
    try:
        img = im.img
        cs = img.cluster_size
        olds = im.snapshot_entries()
        same = [(s, raw) for s, raw in olds if s.name == name]
        if same and not replace:
            raise UsageError(f"{image_path} already has a snapshot named {name!r} ({same[0][0].label()}); "
                             "give --replace to overwrite it")
        if len(olds) - len(same) + 1 > _QCOW2_MAX_SNAPSHOTS:
            raise UsageError(f"{image_path} already has {len(olds)} snapshots (QEMU's limit)")
        disk_size = img.size
        vm_off = -(-disk_size // img.l1_span) * img.l1_span
        # 1. the VM state, cluster by cluster, past the end of the file
        first = im.end_cluster
        pos = first * cs
        size = 0
        old_size = os.fstat(im.fd).st_size
        try:
            if isinstance(vmstate, Iterable):
                kicked = 0
                for chunk in vmstate:  # the data clusters are contiguous: the stream goes in as it comes
                    im.pwrite(pos + size, chunk)
                    size += len(chunk)
                    if size - kicked >= WRITEBACK_STEP:
                        start_writeback(im.fd, pos + kicked, size - kicked)
                        kicked = size
            else:
                size = vmstate.copy_to(im.fd, pos)
            if size % cs:
                im.pwrite(pos + size, bytes(-size % cs))
            if size == 0:
                raise UsageError("the VM state is empty")
        except BaseException:
            os.ftruncate(im.fd, old_size)  # nothing refers to those clusters yet: give the space back
            raise
        nvm = -(-size // cs)
        # 2. L2 tables mapping it at vm_off
        l1_first = vm_off // img.l1_span
        nl2 = -(-nvm // img.l2_entries)
        l2_first = first + nvm
        es = img.l2_entry_size
        for k in range(nl2):
            table = bytearray(cs)
            for i in range(min(img.l2_entries, nvm - k * img.l2_entries)):
                host = (first + k * img.l2_entries + i) * cs
                struct.pack_into(">Q", table, i * es, host)
                if es == 16:
                    struct.pack_into(">Q", table, i * es + 8, 0xFFFFFFFF)  # all 32 subclusters allocated
            im.pwrite((l2_first + k) * cs, table)
        # 3. the snapshot's L1: the active one (COPIED cleared: shared now) plus the vmstate entries
        active = im.l1(img.l1_table_offset, img.l1_size)
        l1_size = max(img.l1_size, l1_first + nl2)
        if l1_size * 8 > _MAX_L1_BYTES:
            raise UsageError(f"{image_path}: no room: an L1 table of {l1_size} entries exceeds QEMU's limit")
        l1 = [e & ~_COPIED for e in active] + [0] * (l1_size - img.l1_size)
        for k in range(nl2):
            l1[l1_first + k] = (l2_first + k) * cs
        l1_at = l2_first + nl2
        nl1 = -(-l1_size * 8 // cs)
        raw_l1 = struct.pack(f">{l1_size}Q", *l1)
        im.pwrite(l1_at * cs, raw_l1 + bytes(nl1 * cs - len(raw_l1)))
        im.end_cluster = l1_at + nl1
        im.claim(first, im.end_cluster)
        # 4. everything the active L1 reaches is now shared with the snapshot
        im.update_l1_refcounts([0 if l1_first <= i < l1_first + nl2 else e for i, e in enumerate(active)], +1)
        im.flush_refcounts()
        im.fix_copied()
        # 5. the table with the new entry, then the header
        now = time.time() if date is None else date
        clock = vm_clock_ns() if callable(vm_clock_ns) else vm_clock_ns
        keep = [(s, raw) for s, raw in olds if s.name != name or not replace]
        sid = _new_id([s for s, _ in olds])
        entry = _entry(sid, name, l1_at * cs, l1_size, int(now), int(now % 1 * 1_000_000) * 1000, clock, size,
                       disk_size, -1 if icount is None else icount)
        entries = [raw for _, raw in keep] + [entry]
        old_len = _table_len([raw for _, raw in olds])
        t_off, _, t_count = im.write_table(entries)
        im.commit_table(t_off, t_count)
        # 6. after the switch: release the old table and a replaced snapshot (leaks at most on a crash)
        im.release_table(img.snapshots_offset, img.nb_snapshots, old_len)
        for s, _ in same:
            _drop(im, s)
        if same:
            im.fix_copied()
        im.flush_refcounts()
        im.sync()
        return Qcow2Image(im.f, image_path).find_snapshot(sid)
    finally:
        im.close()


def _drop(im: _Image, s: Qcow2Snapshot) -> None:
    """Release what only snapshot ``s`` held (it is already out of the table)."""
    cs = im.img.cluster_size
    l1 = im.l1(s.l1_table_offset, s.l1_size)
    im.update_l1_refcounts(l1, -1)
    for c in range(s.l1_table_offset // cs, (s.l1_table_offset + s.l1_size * 8 + cs - 1) // cs):
        im.add_ref(c, -1)
    im.flush_refcounts()


def delete_snapshot(image_path: str, which: str) -> Qcow2Snapshot:
    """Delete the snapshot named (or with id) ``which``; returns its old entry."""
    im = _Image(image_path)
    try:
        img = im.img
        snap = img.find_snapshot(which)
        olds = im.snapshot_entries()
        entries = [raw for s, raw in olds if s.index != snap.index]
        old_len = _table_len([raw for _, raw in olds])
        t_off, _, t_count = im.write_table(entries)
        im.commit_table(t_off, t_count)
        im.release_table(img.snapshots_offset, img.nb_snapshots, old_len)
        _drop(im, snap)
        im.fix_copied()
        im.flush_refcounts()
        im.sync()
        return snap
    finally:
        im.close()


class GuestWriter:
    """Guest reads and writes in the active layer of a qcow2 image, as QEMU's qcow2 driver does
    them: a data cluster with refcount 1 is written in place; any other (unallocated, zero,
    compressed, or shared with an internal snapshot) is copied into a new cluster first, and so is
    a shared L2 table (data refcounts already count every L1 that reaches them, as QEMU keeps them).  The image is
    opened and locked per write (``_Image``), so ``savevm`` into the same image can take it in
    between; reads go through ``Qcow2Image.disk`` (zeros where nothing is allocated).  Images with
    extended L2 entries are refused."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.f = open(path, "rb")  # noqa: SIM115 - kept for reads, closed by close()
        img = Qcow2Image(self.f, path)
        if img.extended_l2:
            self.f.close()
            raise UsageError(f"{path}: qcow2 images with extended L2 entries cannot be written here")

    def close(self) -> None:
        self.f.close()

    def flush(self) -> None:
        os.fsync(self.f.fileno())

    def read(self, offset: int, length: int) -> bytes:
        out = _pread(Qcow2Image(self.f, self.path).disk(), offset, length)
        return out + bytes(length - len(out))

    def allocation(self, offset: int, max_len: int) -> tuple[bool, int]:
        """Whether guest ``offset`` is mapped to data (plain or compressed) and for how many bytes
        (at most ``max_len``) that stays so; zero and unallocated clusters are not data."""
        view = Qcow2Image(self.f, self.path).disk()
        kind, _, run = view._extent(offset)
        first = kind != _ZERO
        while run < max_len:
            k, _, r = view._extent(offset + run)
            if (k != _ZERO) != first:
                break
            run += r
        return first, min(run, max_len)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        im = _Image(self.path)
        try:
            img = im.img
            cs = img.cluster_size
            l1 = im.l1(img.l1_table_offset, img.l1_size)
            pos = 0
            while pos < len(mv):
                g = offset + pos
                inside = g % cs
                n = min(cs - inside, len(mv) - pos)
                host = self._cluster(im, l1, g - inside, partial=n < cs)
                im.pwrite(host + inside, mv[pos:pos + n])
                pos += n
            im.flush_refcounts()  # no fsync: like a guest write in QEMU, durable at the next flush
        finally:
            im.close()

    def _alloc(self, im: _Image, content: bytes) -> int:
        c = im.end_cluster
        im.pwrite(c * im.img.cluster_size, content)
        im.claim(c, c + 1, sync=False)
        return int(c * im.img.cluster_size)

    def _cluster(self, im: _Image, l1: list[int], g: int, *, partial: bool) -> int:
        """The host offset of a cluster the guest cluster at ``g`` may be written in (refcount 1)."""
        img = im.img
        cs = img.cluster_size
        i1, i2 = divmod(g // cs, img.l2_entries)
        e1 = l1[i1]
        l2 = e1 & _OFFSET_MASK
        if not l2 or im.refcount(l2 // cs) != 1:
            table = bytearray(im._pread(l2, cs)) if l2 else bytearray(cs)
            if l2:  # copy-on-write of a shared L2 table: data refcounts already count every L1 (snapshot)
                im.add_ref(l2 // cs, -1)
            l2 = self._alloc(im, bytes(table))
            l1[i1] = l2 | _COPIED
            im.pwrite(img.l1_table_offset + 8 * i1, struct.pack(">Q", l1[i1]))
        (entry,) = struct.unpack(">Q", im._pread(l2 + 8 * i2, 8))
        host = entry & _OFFSET_MASK
        compressed = bool(entry & _L2_COMPRESSED)
        zero = bool(entry & _L2_ZERO) and img.version >= 3
        if host and not compressed and not zero and im.refcount(host // cs) == 1:
            return int(host)
        content = self.read(g, cs) if partial and (host or compressed) and not zero else bytes(cs)
        new = self._alloc(im, content)
        for c in im.clusters_of_l2_entry(entry):
            im.add_ref(c, -1)
        im.pwrite(l2 + 8 * i2, struct.pack(">Q", new | _COPIED))
        return new


def list_image_snapshots(image_path: str) -> list[Qcow2Snapshot]:
    """The snapshot table of an image (read-only, no lock)."""
    with open(image_path, "rb") as f:
        return list(Qcow2Image(f, image_path).snapshots)


def create_image(path: str, size: int, cluster_bits: int = 16) -> None:
    """A new, empty qcow2 v3 image of ``size`` bytes (16-bit refcounts, zlib, no extensions), as
    ``qemu-img create -f qcow2`` lays it out: header, refcount table, one refcount block, L1."""
    if size <= 0 or size % 512:
        raise UsageError(f"image size {size} must be a positive multiple of 512")
    cs = 1 << cluster_bits
    l1_span = cs * (cs // 8)
    l1_size = -(-size // l1_span)
    nl1 = max(1, -(-l1_size * 8 // cs))
    rt_off, rb_off, l1_off = cs, 2 * cs, 3 * cs
    nclusters = 3 + nl1
    if nclusters > cs // 2:
        raise UsageError(f"image size {size} is too large for a single refcount block here")
    header = bytearray(cs)
    struct.pack_into(">4sIQIIQIIQQIIQQQQII", header, 0, b"QFI\xfb", 3, 0, 0, cluster_bits, size, 0, l1_size,
                     l1_off, rt_off, 1, 0, 0, 0, 0, 0, 4, 104)
    # header extensions: end marker only (8 zero bytes at 104)
    rt = bytearray(cs)
    struct.pack_into(">Q", rt, 0, rb_off)
    rb = bytearray(cs)
    for c in range(nclusters):
        struct.pack_into(">H", rb, 2 * c, 1)
    l1 = bytes(nl1 * cs)
    directory = os.path.dirname(os.path.abspath(path))
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(header) + bytes(rt) + bytes(rb) + l1)
        os.replace(tmp, path)
        tmp = ""
    finally:
        if tmp:
            os.unlink(tmp)
