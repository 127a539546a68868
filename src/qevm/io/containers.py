"""Containers that hold a QEVM stream inside another file format.

* **qcow2 internal snapshots** (``savevm`` / ``snapshot-save``): the stream is stored like guest disk
  content at guest offsets past the end of the virtual disk, reachable through the *snapshot's* own
  L1/L2 tables (format.md §8).  ``Qcow2VmState`` exposes it as a read-only, seekable file object
  that translates every read through those tables on the fly, one cluster at a time, with a small
  cache of L2 tables: memory stays bounded whatever the size of the image or the state.
* **libvirt save images** (``virsh save``, ``managedsave``, external memory snapshots): a 92-byte
  host-endian header, the domain XML (and an optional cookie) padded to ``data_len``, then the
  stream, possibly piped through a compressor (anchors.md §5).  ``LibvirtSave`` parses the header
  and hands out the stream, decompressed where Python can do it.

``sniff(head)`` tells the two apart from a plain stream by their magic.  Nothing here knows the
stream grammar: the parser gets bytes as from any other file.
"""

from __future__ import annotations

import io
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from qevm.errors import DecodeError, InvalidOperation, UsageError
from qevm.io.base import Input
from qevm.io.compression import Decompressing, decompressing, deflate_frame, zstd_frame
from qevm.units import format_size

__all__ = [
    "sniff",
    "QCOW2_MAGIC",
    "LIBVIRT_MAGIC",
    "LIBVIRT_PARTIAL_MAGIC",
    "LIBVIRT_FORMATS",
    "Qcow2Image",
    "Qcow2Snapshot",
    "Qcow2View",
    "Qcow2VmState",
    "list_snapshots",
    "LibvirtSave",
]

QCOW2_MAGIC = b"QFI\xfb"
LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_PARTIAL_MAGIC = b"LibvirtQemudPart"


def sniff(head: bytes) -> str | None:
    """``"qcow2"``, ``"libvirt"`` or None for the first bytes of a file.

    ``head`` should hold at least 16 bytes; with 8 to 15 bytes a libvirt magic is recognised by
    its prefix (both libvirt magics share their first 12 bytes)."""
    head = bytes(head[:16])
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if len(head) >= 16:
        return "libvirt" if head in (LIBVIRT_MAGIC, LIBVIRT_PARTIAL_MAGIC) else None
    if len(head) >= 8 and (LIBVIRT_MAGIC.startswith(head) or LIBVIRT_PARTIAL_MAGIC.startswith(head)):
        return "libvirt"
    return None


# --------------------------------------------------------------------------------------------
# low-level file access


_MAX_OFFSET = 1 << 62  # no file is this big; larger offsets come from damaged tables


def _pread(f: Any, off: int, n: int) -> bytes:
    """Up to ``n`` bytes at ``off`` (fewer only at the end of the file)."""
    if not 0 <= off < _MAX_OFFSET:
        return b""
    f.seek(off)
    out = bytearray()
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


def _preadinto(f: Any, off: int, mv: memoryview) -> int:
    """Fill ``mv`` from ``off``; returns the count read (short only at the end of the file)."""
    if not 0 <= off < _MAX_OFFSET:
        return 0
    f.seek(off)
    readinto = getattr(f, "readinto", None)
    got = 0
    while got < len(mv):
        if readinto is not None:
            k = readinto(mv[got:])
        else:
            b = f.read(len(mv) - got)
            k = len(b)
            mv[got:got + k] = b
        if not k:
            break
        got += k
    return got


def _read_exact(f: Any, n: int, what: str, offset: int, path: str) -> bytes:
    """Exactly ``n`` bytes from a sequential file, else a ``DecodeError`` naming ``what``."""
    out = bytearray()
    while len(out) < n:
        b = f.read(n - len(out))
        if not b:
            raise DecodeError(f"file ends inside the {what} ({len(out)} of {n} bytes)", offset + len(out), path)
        out += b
    return bytes(out)


def _is_seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# qcow2

_QCOW2_MIN_CLUSTER_BITS = 9
_QCOW2_MAX_CLUSTER_BITS = 21
_QCOW2_MAX_SNAPSHOTS = 65536
_QCOW2_MAX_SNAPSHOTS_BYTES = 64 << 20
_QCOW2_MAX_EXTRA_DATA = 1024
_QCOW2_MAX_L1_BYTES = 32 << 20

_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION = 1 << 3
_INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = _INCOMPAT_DIRTY | _INCOMPAT_CORRUPT | _INCOMPAT_DATA_FILE | _INCOMPAT_COMPRESSION | _INCOMPAT_EXTL2

_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # host offset bits 9-55 of L1 and standard L2 entries
_L2_COMPRESSED = 1 << 62
_L2_ZERO = 1

_CRYPT_NAMES = {1: "AES", 2: "LUKS"}
_COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

_SNAP_ENTRY = struct.Struct(">QIHHIIQII")  # 40 bytes, format.md §8.2

#: extent kinds of a guest range
_ZERO, _DATA, _COMPRESSED = 0, 1, 2


@dataclass(frozen=True)
class Qcow2Snapshot:
    """One entry of the qcow2 snapshot table."""

    index: int  # position in the table
    entry_offset: int  # file offset of the entry
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int  # the 64-bit extra field when present, else the 32-bit one
    disk_size: int  # virtual disk size when taken (the header's size for entries without it)
    icount: int | None  # record/replay instruction count; None when absent or -1
    extra_data_size: int

    @property
    def date(self) -> str:
        return datetime.fromtimestamp(self.date_sec, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def vm_clock(self) -> str:
        """The guest clock as ``qemu-img snapshot -l`` prints it (HH:MM:SS.mmm)."""
        ms = self.vm_clock_nsec // 1_000_000
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"

    def label(self) -> str:
        what = f"{format_size(self.vm_state_size)} VM state" if self.vm_state_size else "disk only"
        return f"id {self.id} {self.name!r} ({what}, {self.date})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "vm_state_size": self.vm_state_size,
            "date": self.date,
            "date_sec": self.date_sec,
            "date_nsec": self.date_nsec,
            "vm_clock": self.vm_clock,
            "vm_clock_nsec": self.vm_clock_nsec,
            "disk_size": self.disk_size,
            "icount": self.icount,
            "l1_table_offset": self.l1_table_offset,
            "l1_size": self.l1_size,
        }


class Qcow2Image:
    """The parts of a qcow2 image needed to find and read a snapshot's vmstate.

    ``file`` is a seekable binary file; it is not closed here.  The header and the snapshot table
    are read once; the L1/L2 tables only when a view reads through them."""

    def __init__(self, file: IO[bytes] | Any, name: str = "") -> None:
        if not _is_seekable(file):
            raise UsageError(f"{name or 'the qcow2 image'}: a qcow2 image must be a seekable file, not a pipe")
        self.file = file
        self.name = name
        p = "qcow2"
        head = _pread(file, 0, 112)
        if len(head) < 72:
            raise DecodeError(f"qcow2 header is {len(head)} bytes, at least 72 are needed", len(head), p)
        if head[:4] != QCOW2_MAGIC:
            raise DecodeError(f"not a qcow2 image (magic {head[:4]!r})", 0, p)
        (self.version,) = struct.unpack_from(">I", head, 4)
        if self.version not in (2, 3):
            raise DecodeError(f"qcow2 version {self.version} (only 2 and 3 exist)", 4, p)
        (self.cluster_bits,) = struct.unpack_from(">I", head, 20)
        if not _QCOW2_MIN_CLUSTER_BITS <= self.cluster_bits <= _QCOW2_MAX_CLUSTER_BITS:
            raise DecodeError(f"qcow2 cluster_bits {self.cluster_bits} outside 9..21", 20, p)
        self.cluster_size = 1 << self.cluster_bits
        (self.size, self.crypt_method, self.l1_size, self.l1_table_offset) = struct.unpack_from(">QIIQ", head, 24)
        (self.nb_snapshots, self.snapshots_offset) = struct.unpack_from(">IQ", head, 60)
        self.incompatible_features = 0
        self.header_length = 72
        self.compression_type = 0
        if self.version >= 3:
            if len(head) < 104:
                raise DecodeError(f"qcow2 v3 header is {len(head)} bytes, at least 104 are needed", len(head), p)
            (self.incompatible_features,) = struct.unpack_from(">Q", head, 72)
            (self.header_length,) = struct.unpack_from(">I", head, 100)
            if self.header_length < 104:
                raise DecodeError(f"qcow2 v3 header_length {self.header_length} < 104", 100, p)
            if self.incompatible_features & _INCOMPAT_COMPRESSION and self.header_length > 104:
                self.compression_type = head[104]
        unknown = self.incompatible_features & ~_INCOMPAT_KNOWN
        if unknown:
            raise DecodeError(f"qcow2 image uses unknown incompatible features 0x{unknown:x}; refusing to guess", 72, p)
        self.extended_l2 = bool(self.incompatible_features & _INCOMPAT_EXTL2)
        if self.extended_l2 and self.cluster_bits < 14:
            raise DecodeError(f"qcow2 extended L2 entries with {self.cluster_size}-byte clusters (minimum 16 KiB)",
                              20, p)
        self.l2_entry_size = 16 if self.extended_l2 else 8
        self.l2_bits = self.cluster_bits - (4 if self.extended_l2 else 3)
        self.l2_entries = 1 << self.l2_bits
        self.l1_span = 1 << (self.cluster_bits + self.l2_bits)  # guest bytes covered by one L1 entry
        self.snapshots = self._read_snapshots()

    # -- properties -------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return bool(self.crypt_method != 0)

    @property
    def corrupt(self) -> bool:
        """QEMU marked the image corrupt (incompatible feature bit 1): reads may return garbage."""
        return bool(self.incompatible_features & _INCOMPAT_CORRUPT)

    @property
    def compression(self) -> str:
        return _COMPRESSION_NAMES.get(self.compression_type, f"unknown ({self.compression_type})")

    # -- snapshot table ---------------------------------------------------------------------
    def _read_snapshots(self) -> list[Qcow2Snapshot]:
        p = "qcow2/snapshots"
        n = self.nb_snapshots
        if n == 0:
            return []
        if n > _QCOW2_MAX_SNAPSHOTS:
            raise DecodeError(f"qcow2 header claims {n} snapshots (QEMU allows at most {_QCOW2_MAX_SNAPSHOTS})", 60, p)
        if self.snapshots_offset % self.cluster_size or self.snapshots_offset == 0:
            raise DecodeError(f"qcow2 snapshot table offset 0x{self.snapshots_offset:x} is not cluster aligned",
                              64, p)
        out: list[Qcow2Snapshot] = []
        off = self.snapshots_offset
        for i in range(n):
            if off - self.snapshots_offset > _QCOW2_MAX_SNAPSHOTS_BYTES:
                raise DecodeError(f"qcow2 snapshot table exceeds {_QCOW2_MAX_SNAPSHOTS_BYTES} bytes", off, p)
            ep = f"{p}[{i}]"
            raw = _pread(self.file, off, _SNAP_ENTRY.size)
            if len(raw) < _SNAP_ENTRY.size:
                raise DecodeError(f"file ends inside snapshot entry {i}", off + len(raw), ep)
            (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vm32, extra_len) = _SNAP_ENTRY.unpack(raw)
            if extra_len > _QCOW2_MAX_EXTRA_DATA:
                raise DecodeError(f"snapshot entry {i} has {extra_len} bytes of extra data "
                                  f"(QEMU allows at most {_QCOW2_MAX_EXTRA_DATA})", off + 36, ep)
            rest_len = extra_len + id_len + name_len
            rest = _pread(self.file, off + _SNAP_ENTRY.size, rest_len)
            if len(rest) < rest_len:
                raise DecodeError(f"file ends inside snapshot entry {i}", off + _SNAP_ENTRY.size + len(rest), ep)
            extra = rest[:extra_len]
            vm_size = vm32
            disk_size = self.size
            icount: int | None = None
            if extra_len >= 8:
                (vm_size,) = struct.unpack_from(">Q", extra, 0)
            if extra_len >= 16:
                (disk_size,) = struct.unpack_from(">Q", extra, 8)
            if extra_len >= 24:
                (ic,) = struct.unpack_from(">q", extra, 16)
                icount = None if ic == -1 else ic
            sid = rest[extra_len:extra_len + id_len].decode("utf-8", "replace")
            sname = rest[extra_len + id_len:].decode("utf-8", "replace")
            out.append(Qcow2Snapshot(i, off, sid, sname, l1_off, l1_size, dsec, dnsec, clock, vm_size, disk_size,
                                     icount, extra_len))
            off += _SNAP_ENTRY.size + rest_len
            off = (off + 7) & ~7
        return out

    def find_snapshot(self, which: str | int | None = None) -> Qcow2Snapshot:
        """The snapshot whose VM state to read.

        ``which`` is a name or an id (a name match wins; an ``int`` is an id).  None picks the only
        snapshot with a VM state, or the newest of several."""
        label = self.name or "the qcow2 image"
        snaps = self.snapshots
        if not snaps:
            raise UsageError(f"{label} has no internal snapshots")
        if which is None:
            with_vm = [s for s in snaps if s.vm_state_size]
            if not with_vm:
                raise UsageError(f"{label}: no snapshot holds a VM state (disk-only snapshots: "
                                 f"{self._listing()})")
            return max(with_vm, key=lambda s: (s.date_sec, s.date_nsec, s.index))
        key = str(which)
        matches = [] if isinstance(which, int) else [s for s in snaps if s.name == key]
        if not matches:
            matches = [s for s in snaps if s.id == key]
        if not matches:
            raise UsageError(f"{label} has no snapshot named {key!r}; available: {self._listing()}")
        if len(matches) > 1:
            raise UsageError(f"{label}: snapshot {key!r} is ambiguous ({'; '.join(s.label() for s in matches)}); "
                             "give its id instead")
        return matches[0]

    def _listing(self, limit: int = 20) -> str:
        parts = [s.label() for s in self.snapshots[:limit]]
        if len(self.snapshots) > limit:
            parts.append(f"... and {len(self.snapshots) - limit} more")
        return "; ".join(parts)

    def vm_state_offset(self, snap: Qcow2Snapshot) -> int:
        """Guest offset of the vmstate: the first L1 boundary at or past the snapshot's disk size."""
        return int(-(-snap.disk_size // self.l1_span) * self.l1_span)

    # -- views ------------------------------------------------------------------------------
    def disk(self, snapshot: Qcow2Snapshot | None = None) -> Qcow2View:
        """The virtual disk of the active layer, or of ``snapshot``, as a read-only file."""
        if snapshot is None:
            return Qcow2View(self, self.l1_table_offset, self.l1_size, 0, self.size, "qcow2/active")
        return Qcow2View(self, snapshot.l1_table_offset, snapshot.l1_size, 0, snapshot.disk_size,
                         f"qcow2/snapshot {snapshot.id}")

    def check_readable(self) -> None:
        """Refuse images whose cluster contents cannot be read here."""
        label = self.name or "qcow2 image"
        if self.crypt_method:
            kind = _CRYPT_NAMES.get(self.crypt_method, f"method {self.crypt_method}")
            raise DecodeError(f"{label} is encrypted ({kind}): its clusters, the VM state included, cannot be "
                              "read without the key; let QEMU, given the key, load the snapshot (-loadvm NAME -S) "
                              "and migrate it to a file (migrate \"exec:cat > state.mig\"), then read that",
                              32, "qcow2")
        if self.incompatible_features & _INCOMPAT_DATA_FILE:
            raise DecodeError(f"{label} keeps its data in an external data file; internal snapshots are "
                              "impossible there", 72, "qcow2")
        if self.compression_type not in _COMPRESSION_NAMES:
            raise DecodeError(f"{label} uses unknown compression type {self.compression_type}", 104, "qcow2")


class Qcow2View(io.RawIOBase):
    """Guest bytes ``[start, start + length)`` read through one L1 table, as a seekable read-only file.

    Reads go cluster by cluster (runs of contiguous host clusters in one read).  Unallocated
    clusters and zero clusters/subclusters read as zeros (beyond any backing file, which this does
    not open); compressed clusters are inflated one at a time.  A few L1 chunks, L2 tables and the
    last inflated cluster are cached."""

    L2_CACHE = 4
    L1_CHUNK = 512  # entries per cached piece of the L1 table
    L1_CACHE = 4

    def __init__(self, image: Qcow2Image, l1_offset: int, l1_size: int, start: int, length: int,
                 path: str = "qcow2", close_file: bool = False) -> None:
        super().__init__()
        image.check_readable()
        self.image = image
        self.path = path
        self._f = image.file
        self._close_file = close_file
        if l1_size and l1_offset % image.cluster_size:
            raise DecodeError(f"L1 table offset 0x{l1_offset:x} is not cluster aligned", l1_offset, path)
        if l1_size * 8 > _QCOW2_MAX_L1_BYTES:
            raise DecodeError(f"L1 table of {l1_size} entries exceeds QEMU's limit of {_QCOW2_MAX_L1_BYTES} bytes",
                              l1_offset, path)
        self._l1_offset = l1_offset
        self._l1_size = l1_size
        self._start = start
        self._size = length
        self._pos = 0
        self._l1_cache: OrderedDict[int, bytes] = OrderedDict()
        self._l2_cache: OrderedDict[int, bytes] = OrderedDict()
        self._zc: tuple[int, bytes] | None = None  # (descriptor, inflated cluster)

    # -- io.RawIOBase -----------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def size(self) -> int:
        return self._size

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise InvalidOperation(f"invalid whence {whence}")
        if pos < 0:
            raise InvalidOperation(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        self._checkClosed()
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        done = 0
        g0 = self._start + self._pos
        while done < n:
            g = g0 + done
            kind, where, run = self._extent(g)
            run = min(run, n - done)
            if kind == _DATA:
                # merge the following clusters while they are contiguous on the host
                while done + run < n:
                    k2, w2, r2 = self._extent(g + run)
                    if k2 != _DATA or w2 != where + run:
                        break
                    run += min(r2, n - done - run)
                self._read_host(where, mv[done:done + run], g)
            elif kind == _ZERO:
                mv[done:done + run] = bytes(run)
            else:
                data = self._inflate(where, g)
                inside = g & (self.image.cluster_size - 1)
                mv[done:done + run] = data[inside:inside + run]
            done += run
        self._pos += n
        return n

    def readall(self) -> bytes:
        return self.read(max(0, self._size - self._pos))

    def close(self) -> None:
        if not self.closed:
            self._l1_cache.clear()
            self._l2_cache.clear()
            self._zc = None
            if self._close_file:
                self._f.close()
        super().close()

    # -- translation ------------------------------------------------------------------------
    def _extent(self, g: int) -> tuple[int, int, int]:
        """(kind, where, bytes) for guest offset ``g``: the mapping holds for ``bytes`` from ``g``.

        ``where`` is the host offset of ``g`` for data, the L2 descriptor for a compressed cluster."""
        img = self.image
        cs = img.cluster_size
        inside = g & (cs - 1)
        left = cs - inside
        l1_index = g // img.l1_span
        if l1_index >= self._l1_size:
            return _ZERO, 0, img.l1_span - g % img.l1_span
        l1e = self._l1_entry(l1_index)
        l2_off = l1e & _OFFSET_MASK
        if not l2_off:
            return _ZERO, 0, img.l1_span - g % img.l1_span
        if l2_off % cs:
            raise DecodeError(f"L1 entry {l1_index} points to an unaligned L2 table at 0x{l2_off:x}",
                              self._l1_offset + 8 * l1_index, self.path)
        l2_index = (g >> img.cluster_bits) & (img.l2_entries - 1)
        table = self._l2_table(l2_off, l1_index)
        at = l2_index * img.l2_entry_size
        (entry,) = struct.unpack_from(">Q", table, at)
        if entry & _L2_COMPRESSED:
            return _COMPRESSED, entry, left
        host = entry & _OFFSET_MASK
        if not img.extended_l2:
            if (entry & _L2_ZERO and img.version >= 3) or not host:
                return _ZERO, 0, left
            if host % cs:
                raise DecodeError(f"L2 entry {l2_index} points to an unaligned cluster at 0x{host:x}",
                                  l2_off + at, self.path)
            return _DATA, host + inside, left
        (bitmap,) = struct.unpack_from(">Q", table, at + 8)
        sc_size = cs // 32
        sc = inside // sc_size
        sc_left = sc_size - inside % sc_size
        alloc = bitmap >> sc & 1
        zero = bitmap >> (32 + sc) & 1
        if alloc and zero:
            raise DecodeError(f"extended L2 entry {l2_index}: subcluster {sc} is both allocated and zero",
                              l2_off + at + 8, self.path)
        if not alloc:
            return _ZERO, 0, sc_left
        if not host or host % cs:
            raise DecodeError(f"extended L2 entry {l2_index}: allocated subcluster {sc} but host offset 0x{host:x}",
                              l2_off + at, self.path)
        return _DATA, host + inside, sc_left

    def _l1_entry(self, index: int) -> int:
        chunk = index // self.L1_CHUNK
        data = self._l1_cache.get(chunk)
        if data is None:
            first = chunk * self.L1_CHUNK
            count = min(self.L1_CHUNK, self._l1_size - first)
            off = self._l1_offset + 8 * first
            data = _pread(self._f, off, 8 * count)
            if len(data) < 8 * count:
                raise DecodeError(f"file ends inside the L1 table ({self._l1_size} entries at "
                                  f"0x{self._l1_offset:x})", off + len(data), self.path)
            self._l1_cache[chunk] = data
            if len(self._l1_cache) > self.L1_CACHE:
                self._l1_cache.popitem(last=False)
        else:
            self._l1_cache.move_to_end(chunk)
        (e,) = struct.unpack_from(">Q", data, 8 * (index % self.L1_CHUNK))
        return int(e)

    def _l2_table(self, off: int, l1_index: int) -> bytes:
        t = self._l2_cache.get(off)
        if t is not None:
            self._l2_cache.move_to_end(off)
            return t
        cs = self.image.cluster_size
        t = _pread(self._f, off, cs)
        if len(t) < cs:
            raise DecodeError(f"file ends inside the L2 table of L1 entry {l1_index} (at 0x{off:x})",
                              off + len(t), self.path)
        self._l2_cache[off] = t
        if len(self._l2_cache) > self.L2_CACHE:
            self._l2_cache.popitem(last=False)
        return t

    def _read_host(self, host: int, mv: memoryview, g: int) -> None:
        got = _preadinto(self._f, host, mv)
        if got == len(mv):
            return
        # QEMU writes a newly allocated cluster at the end of the file only as far as the guest
        # wrote it, so the last cluster of an image may be cut short; like QEMU, read zeros past the
        # end of the file inside that cluster.  A cluster that starts at or past the end of the
        # file, though, means the image itself was cut short.
        cs = self.image.cluster_size
        eof = host + got
        last = eof - eof % cs  # start of the cluster holding the end of the file
        if eof == last or host + len(mv) > last + cs:
            bad = eof if eof == last else last + cs
            raise DecodeError(f"guest offset 0x{g + bad - host:x} maps to host offset 0x{bad:x}, past the end of "
                              "the file (truncated image?)", eof, self.path)
        mv[got:] = bytes(len(mv) - got)

    def _inflate(self, desc: int, g: int) -> bytes:
        if self._zc is not None and self._zc[0] == desc:
            return self._zc[1]
        img = self.image
        cs = img.cluster_size
        x = 62 - (img.cluster_bits - 8)
        host = desc & ((1 << x) - 1)
        sectors = ((desc >> x) & ((1 << (img.cluster_bits - 8)) - 1)) + 1
        csize = sectors * 512 - (host & 511)
        raw = _pread(self._f, host, csize)
        if not raw:
            raise DecodeError(f"compressed cluster for guest offset 0x{g:x} lies past the end of the file",
                              host, self.path)
        missing = (f"{self.image.name or 'the qcow2 image'} has zstd-compressed clusters, which need the "
                   "'zstandard' package (pip install zstandard)")
        try:
            if img.compression_type == 0:
                out = deflate_frame(raw, cs)
            else:
                out = zstd_frame(raw, cs, missing=missing)
        except DecodeError as e:
            raise DecodeError(f"compressed cluster for guest offset 0x{g:x}: {e.msg}", host, self.path) from e
        if len(out) != cs:
            raise DecodeError(f"compressed cluster for guest offset 0x{g:x} inflates to {len(out)} bytes, "
                              f"not {cs}", host, self.path)
        self._zc = (desc, out)
        return out


class Qcow2VmState(Qcow2View):
    """The VM state of one internal snapshot of a qcow2 image, as a seekable read-only file.

    ``file`` is a seekable binary file of the image (it is closed with this object only when
    ``close_file``); ``snapshot`` a name or id, or None for the only/newest one with a VM state.
    Raises ``UsageError`` for a missing/ambiguous snapshot or a disk-only one, ``DecodeError`` for
    a malformed or encrypted image."""

    def __init__(self, file: IO[bytes] | Any, snapshot: str | int | None = None, *, name: str = "",
                 close_file: bool = False) -> None:
        image = Qcow2Image(file, name)
        image.check_readable()
        snap = image.find_snapshot(snapshot)
        label = name or "the qcow2 image"
        if not snap.vm_state_size:
            raise UsageError(f"{label}: snapshot {snap.label()} has no VM state (a disk-only snapshot); "
                             f"snapshots: {image._listing()}")
        start = image.vm_state_offset(snap)
        path = f"qcow2/snapshot {snap.id} {snap.name!r}"
        if snap.l1_table_offset % image.cluster_size or not snap.l1_table_offset:
            raise DecodeError(f"snapshot {snap.label()}: L1 table offset 0x{snap.l1_table_offset:x} is not cluster "
                              "aligned", snap.entry_offset, path)
        if snap.l1_size * 8 > _QCOW2_MAX_L1_BYTES:
            raise DecodeError(f"snapshot {snap.label()}: L1 table of {snap.l1_size} entries exceeds QEMU's limit of "
                              f"{_QCOW2_MAX_L1_BYTES} bytes", snap.entry_offset + 8, path)
        covered = snap.l1_size * image.l1_span
        if start + snap.vm_state_size > covered:
            raise DecodeError(f"snapshot {snap.label()}: its L1 table ({snap.l1_size} entries, "
                              f"{format_size(covered)} of guest space) does not cover the VM state at guest offsets "
                              f"0x{start:x}..0x{start + snap.vm_state_size:x}", snap.entry_offset + 8, path)
        super().__init__(image, snap.l1_table_offset, snap.l1_size, start, snap.vm_state_size, path, close_file)
        self.snapshot = snap
        self.vm_state_offset = start

    @classmethod
    def open(cls, path: str, snapshot: str | int | None = None) -> Qcow2VmState:
        """Open an image by path; closing the result closes the file."""
        f = open(path, "rb")  # noqa: SIM115
        try:
            return cls(f, snapshot, name=path, close_file=True)
        except BaseException:
            f.close()
            raise

    def to_input(self, name: str | None = None) -> Input:
        """An ``Input`` for ``qevm.reader``: seekable, sized, so the vmdesc trailer is found up front."""
        label = name or self.image.name or "<qcow2>"
        return Input(f"{label}@{self.snapshot.name or self.snapshot.id}", self, True, None, self._size)


def list_snapshots(file: IO[bytes] | Any) -> list[dict[str, Any]]:
    """The snapshot table of a qcow2 image (id, name, vm_state_size, date, vm clock, ...)."""
    return [s.as_dict() for s in Qcow2Image(file).snapshots]


# --------------------------------------------------------------------------------------------
# libvirt save image

#: virQEMUSaveFormat: the on-disk ``format`` (formerly ``compressed``) field
LIBVIRT_FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
_LIBVIRT_VERSION = 2
_LIBVIRT_HEADER = struct.Struct("16s5I56x")  # 92 bytes; the byte order prefix is added when unpacking
_LIBVIRT_MAX_DATA = 64 << 20


class _Reader(io.RawIOBase):
    """Base of the stream objects ``LibvirtSave`` hands out: closing one runs ``on_close`` once
    (which releases the container, and its file when the container owns it)."""

    on_close: Callable[[], None] | None = None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            super().close()
            cb, self.on_close = self.on_close, None
            if cb is not None:
                cb()


class _Window(_Reader):
    """Bytes ``[start, end)`` of a seekable file as a file of its own (offsets relative to ``start``)."""

    def __init__(self, f: Any, start: int, end: int) -> None:
        super().__init__()
        self._f = f
        self._start = start
        self._size = max(0, end - start)
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise InvalidOperation(f"invalid whence {whence}")
        if base + offset < 0:
            raise InvalidOperation(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._size - self._pos)
        if n <= 0:
            return 0
        got = _preadinto(self._f, self._start + self._pos, mv[:n])
        self._pos += got
        return got


class _Sequential(_Reader):
    """The rest of a non-seekable file (a pipe), read as it comes."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self._f = f

    def readinto(self, b: Any) -> int:
        readinto = getattr(self._f, "readinto", None)
        if readinto is not None:
            return int(readinto(b) or 0)
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


class LibvirtSave:
    """A libvirt save image: header, domain XML, and the QEVM stream after them.

    ``file`` is a binary file positioned at the header (normally offset 0); it may be a pipe, then
    the stream is read sequentially.  ``file`` is closed by ``close()`` (or by closing the object
    ``stream()`` returned) only when ``close_file``."""

    HEADER_SIZE = _LIBVIRT_HEADER.size

    def __init__(self, file: IO[bytes] | Any, name: str = "", *, close_file: bool = False) -> None:
        self.name = name
        self._f = file
        self._close_file = close_file
        p = "libvirt"
        self._seekable = _is_seekable(file)
        base = file.tell() if self._seekable else 0
        raw = _read_exact(file, self.HEADER_SIZE, "libvirt save header", 0, p)
        magic = raw[:16]
        if magic not in (LIBVIRT_MAGIC, LIBVIRT_PARTIAL_MAGIC):
            raise DecodeError(f"not a libvirt save image (magic {magic!r})", 0, p)
        #: False for a "LibvirtQemudPart" image: libvirt was still writing it (or the save failed)
        self.complete = magic == LIBVIRT_MAGIC
        fields = struct.unpack("<" + _LIBVIRT_HEADER.format, raw)
        self.byteorder = "little"
        if fields[1] > _LIBVIRT_VERSION:  # written on a host of the other byte order
            fields = struct.unpack(">" + _LIBVIRT_HEADER.format, raw)
            self.byteorder = "big"
        _, self.version, self.data_len, was_running, self.format, self.cookie_offset = fields
        if self.version > _LIBVIRT_VERSION:
            (le,) = struct.unpack_from("<I", raw, 16)
            raise DecodeError(f"libvirt save image version {le} (0x{le:08x}, read little-endian; {self.version} "
                              f"big-endian) is not supported (max {_LIBVIRT_VERSION})", 16, p)
        self.was_running = bool(was_running)
        if self.format not in LIBVIRT_FORMATS:
            raise DecodeError(f"unknown libvirt save image format {self.format}", 28, p)
        if self.data_len == 0:
            raise DecodeError("libvirt save header has data_len 0 (no domain XML)", 20, p)
        if self.data_len > _LIBVIRT_MAX_DATA:
            raise DecodeError(f"libvirt save header claims {self.data_len} bytes of XML data "
                              f"(more than {_LIBVIRT_MAX_DATA}); not a save image?", 20, p)
        if self.cookie_offset > self.data_len:
            raise DecodeError(f"cookie offset {self.cookie_offset} lies past the data area ({self.data_len} bytes)",
                              32, p)
        data = _read_exact(file, self.data_len, "domain XML area", self.HEADER_SIZE, p)
        xml_area = data[:self.cookie_offset] if self.cookie_offset else data
        self.xml = xml_area.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.cookie: str | None = None
        if self.cookie_offset:
            self.cookie = data[self.cookie_offset:].split(b"\0", 1)[0].decode("utf-8", "replace")
        #: offset of the stream's first byte from the start of the header
        self.stream_offset = self.HEADER_SIZE + self.data_len
        self._base = base
        self._stream: _Reader | Decompressing | None = None
        self._closed = False

    @property
    def format_name(self) -> str:
        return LIBVIRT_FORMATS[self.format]

    @property
    def compression(self) -> str | None:
        """The compressor the stream went through (libvirt applies one only for version 2)."""
        if self.version != 2 or self.format_name in ("raw", "sparse"):
            return None
        return self.format_name

    @property
    def file_offset(self) -> int:
        """Absolute file offset of the stream.  In ``sparse`` (mapped-ram) images the RAM page and
        bitmap offsets inside the stream are absolute file offsets (QEMU takes them from the fd's
        position), so a parser needs this as its ``file_offset``."""
        return int(self._base + self.stream_offset)

    def stream(self) -> Any:
        """A file object that yields the QEVM stream (decompressed).  Seekable, with offsets relative
        to the stream's first byte, for uncompressed images in a seekable file.  The same object is
        returned on every call; closing it closes this container."""
        if self._closed:
            raise InvalidOperation("I/O operation on a closed libvirt save image")
        if self._stream is not None:
            return self._stream
        src: _Reader
        if self._seekable:
            end = self._f.seek(0, io.SEEK_END)
            src = _Window(self._f, self.file_offset, end)
        else:
            src = _Sequential(self._f)
        comp = self.compression
        out: _Reader | Decompressing
        if comp is None:
            out = src
        elif comp == "lzop":
            raise UsageError(self._tool_hint(comp, "lzop -dc --ignore-warn"))
        else:
            missing = self._tool_hint("zstd", "zstd -dc", "or install the 'zstandard' package")
            out = decompressing(comp, src, offset=self.file_offset, path="libvirt", missing=missing)
        out.on_close = self._release
        self._stream = out
        return out

    def _tool_hint(self, comp: str, cmd: str, extra: str = "") -> str:
        label = self.name or "FILE"
        return (f"{label}: the stream of this libvirt save image is {comp}-compressed (format {self.format}), "
                f"which Python cannot decompress; run: tail -c +{self.file_offset + 1} {label} | {cmd} | "
                f"qevm <verb> -{' (' + extra + ')' if extra else ''}")

    @property
    def stream_seekable(self) -> bool:
        return self._seekable and self.compression is None

    @property
    def stream_size(self) -> int | None:
        if not self.stream_seekable:
            return None
        end: int = self._f.seek(0, io.SEEK_END)
        return max(0, end - self.file_offset)

    def to_input(self, name: str | None = None) -> Input:
        """An ``Input`` for ``qevm.reader`` reading the embedded stream; closing it closes this."""
        # mapped-ram offsets are file offsets: hand the stream's own offset to the reader
        return Input(name or self.name or "<libvirt>", self.stream(), self.stream_seekable, self.compression,
                     self.stream_size, file_offset=self.file_offset)

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            if self._close_file:
                self._f.close()

    def close(self) -> None:
        if self._stream is not None and not self._stream.closed:
            self._stream.close()  # runs _release
        self._release()

    def __enter__(self) -> LibvirtSave:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def open(cls, path: str) -> LibvirtSave:
        """Open a save image by path; closing it (or its stream) closes the file."""
        f = open(path, "rb")  # noqa: SIM115
        try:
            return cls(f, path, close_file=True)
        except BaseException:
            f.close()
            raise
