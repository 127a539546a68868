"""What differs between two VM states: configuration, sections, device fields, RAM.

Device fields are compared by name (not by position), so the result is stable when QEMU
reorders sections; every field difference carries the path ``qevm edit --set`` takes.
RAM is compared through a per-page table of 8-byte digests (64-bit SipHash) per side (8 bytes per
4 KiB page: 2 MiB per GiB of guest RAM), so neither stream is ever held whole and either
side can be a pipe.  A side that uses XBZRLE needs the previous content of a page to
apply a delta: such a side (a file, not a pipe) is read a second time into a sparse
temporary file (``RamImage``) and digested from there.

When a side is a plain file, its table holds where each page lies in the file instead of a digest
(``PageLocations``: still 8 bytes per page, no hashing while reading); two such sides are compared
with one ``memcmp`` per stretch of pages that lie back to back in both files, page by page only
where a stretch differs.  When only one side is a plain file, that side is read first (``read_order``)
and the other (a pipe, a compressed file, a qcow2 snapshot: read once) is compared with it as its
pages pass (``PageVerdicts``: the file side's bytes read by ``preadv``, one ``memcmp`` per stretch);
A stays the old side whichever is read first.  Only when neither side is a plain file (or a side's
pages are not stored as themselves: XBZRLE, compressed) are pages digested.
"""

from __future__ import annotations

import fnmatch
import io
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qevm.codec.paths import FieldPath
from qevm.codec.types import RAW, codec_for
from qevm.codec.vmsd import NULL, Opaque, Struct
from qevm.errors import DecodeError
from qevm.format.events import Event, PassTracker, RamBlock, RamFlag, RamPage
from qevm.format.memory import RamImage
from qevm.format.parser import Parser
from qevm.io.reader import Analysis, Device, drive, read_stream, trailer_schema
from qevm.io.sources import Input, open_input

__all__ = ["FieldDiff", "SectionDiff", "BlockDiff", "StateDiff", "PageTable", "PageLocations", "PageVerdicts",
           "diff_states", "diff_analyses", "read_side", "read_order", "plain_file", "add_side_notes", "Hooks"]

DIGEST = 8
#: byte fields up to this size show whole old and new values (what ``qevm edit --set`` takes);
#: longer ones the bytes of each differing range (up to 8 ranges)
WHOLE_BYTES = 64
_EMPTY = bytes(DIGEST)


_PACK_ONE = struct.Struct("<q").pack
_PAGE = int(RamFlag.PAGE)


def _digest(data: bytes | memoryview) -> bytes:
    """8 bytes per page: Python's own 64-bit SipHash of the bytes (randomised per process, which is
    fine: both sides are digested by the same process and digests are never stored); 0 is kept for
    "never sent".  Two different pages in one slot get the same digest with probability about 2**-64
    (the key is secret and random), so over the 2**19 slots of 2 GiB of RAM a difference is missed
    with probability below 10**-13.

    Measured per 4 KiB page in CPython 3.11 on this machine (2 CPUs shared, best of 5 x 20 x 512
    pages): ``hash(bytes(view[p:p + 4096]))`` 1.5-1.9 us, of which the copy is ~0.4 us;
    ``zlib.crc32`` + ``zlib.adler32`` of the view (no copy) 3.1 us; two ``crc32`` 2.7 us;
    ``hashlib.blake2b(view, digest_size=8)`` 6.5 us; ``sha1`` 4.7 us, ``md5`` 8.9 us.  Hashing a
    ``memoryview`` slice avoids the copy only when its exporter is read-only and hashable (not the
    parser's ``bytearray``); copying a run once into a read-only scratch mapping and hashing its slices
    measured 2.0 us.  So the copy stays: nothing in the standard library digests a page faster."""
    return _PACK_ONE(hash(bytes(data)) or 1)


class PageTable:
    """Per RAM block, one digest per page slot (all-zero bytes: never sent, i.e. zero on load).

    The slot size is ``granule`` (the target page size when known, else 4 KiB); pages are
    applied in stream order, so the last copy of a page wins, as on a real destination."""

    def __init__(self, granule: int = 4096) -> None:
        self.granule = granule
        self.sizes: dict[str, int] = {}
        self.tables: dict[str, bytearray] = {}
        self._zero: dict[tuple[int, int], bytes] = {}
        self.page_size = granule

    def zero_digest(self, size: int, fill: int = 0) -> bytes:
        key = (size, fill)
        d = self._zero.get(key)
        if d is None:
            d = self._zero[key] = _digest(bytes((fill,)) * size)
        return d

    def add_block(self, name: str, size: int) -> None:
        if name not in self.tables:
            self.sizes[name] = size
            self.tables[name] = bytearray((size + self.granule - 1) // self.granule * DIGEST)

    def put(self, block: str, addr: int, digest: bytes) -> None:
        t = self.tables.get(block)
        if t is None:
            raise DecodeError(f"page for RAM block {block!r}, which the stream never announced")
        i = addr // self.granule * DIGEST
        if i + DIGEST > len(t):
            raise DecodeError(f"page at 0x{addr:x} is beyond the end of RAM block {block!r}")
        t[i:i + DIGEST] = digest

    def _slots(self, block: str, addr: int, count: int, offset: int) -> tuple[bytearray, int]:
        """The table of ``block`` and the byte index of ``addr``'s slot, checked for ``count`` slots."""
        t = self.tables.get(block)
        if t is None:
            raise DecodeError(f"page for RAM block {block!r}, which the stream never announced", offset)
        i = addr // self.page_size * DIGEST
        if i + count * DIGEST > len(t):
            raise DecodeError(f"page at 0x{addr:x} is beyond the end of RAM block {block!r}", offset)
        return t, i

    def sink(self, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
             stride: int, offset: int) -> None:
        """The parser's run sink (``Parser.run_sink``): digest a run of page records straight from the
        parser's buffer."""
        ps = self.page_size
        if kind == _PAGE:
            t = self.tables.get(block)
            if t is None or count == 1 or self.granule != ps:
                for k in range(count):
                    p = pos + k * stride
                    self.put(block, addr + k * ps, _PACK_ONE(hash(bytes(view[p:p + ps])) or 1))
                return
            i = addr // ps * DIGEST
            if i + count * DIGEST > len(t):
                raise DecodeError(f"page at 0x{addr:x} is beyond the end of RAM block {block!r}", offset)
            _pack_many(count)(t, i, *[hash(bytes(view[p:p + ps])) or 1
                                      for p in range(pos, pos + count * stride, stride)])
        elif kind == RamFlag.ZERO:
            if count == 1:
                self.put(block, addr, self.zero_digest(ps, view[pos]))
                return
            t = self.tables.get(block)
            if t is None or self.granule != ps:
                for k in range(count):
                    self.put(block, addr + k * ps, self.zero_digest(ps, view[pos + k * stride]))
                return
            i = addr // ps * DIGEST
            if i + count * DIGEST > len(t):
                raise DecodeError(f"page at 0x{addr:x} is beyond the end of RAM block {block!r}", offset)
            t[i:i + count * DIGEST] = self.zero_digest(ps) * count  # runs are of fill byte 0
        elif kind == RamFlag.COMPRESS_PAGE:
            self.put(block, addr, _digest(_inflate(view, pos, offset)))
        else:
            raise _NeedContent()


#: ``PageLocations`` slot values: 0 never sent, 1..256 a ZERO record of fill byte value - 1, above that a
#: page whose payload starts at file offset ``value - _BIAS + index * (page_size + 8)`` (``index``: the
#: page's slot), so every page of a run of back-to-back records holds the same value
_BIAS = 1 << 62
_FILLS = 256
_WINDOW = 1 << 18  # bytes per memcmp when comparing two files' stretches (a cache-sized window)
_UNMAP_SPAN = 4 << 20  # mapped file bytes dropped from the process's memory at a time
_STRETCH_CHUNK = 4096  # slots looked at together for stretches of one value on both sides


def _inflate(view: memoryview, pos: int, offset: int) -> bytes:
    """The page of a COMPRESS_PAGE record whose length word is at ``view[pos]``."""
    n = int.from_bytes(view[pos:pos + 4], "big")
    try:
        return zlib.decompress(view[pos + 4:pos + 4 + n])
    except zlib.error as e:
        raise DecodeError(f"compressed page does not inflate: {e}", offset) from None


def _zero_slots(t: bytearray, i: int, count: int, view: memoryview, pos: int) -> None:
    """``PageLocations``/``PageVerdicts`` slots of a run of ZERO records: fill byte + 1."""
    if count == 1:
        t[i:i + DIGEST] = _PACK_ONE(view[pos] + 1)
    else:
        t[i:i + count * DIGEST] = _ONE * count  # runs are of fill byte 0


class _NotLocatable(Exception):
    """A page record whose bytes are not the page (XBZRLE, compressed), or slots of another size."""


class PageLocations(PageTable):
    """A ``PageTable`` for a side that is a plain file: each slot says where the page lies in the
    file (see ``_BIAS``), not what it hashes to; ``parser`` must be the parser feeding ``sink``."""

    def __init__(self, path: str, file_offset: int, st: os.stat_result, granule: int = 4096,
                 against: PageLocations | None = None) -> None:
        super().__init__(granule)
        self.path = path
        self.file_offset = file_offset
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.parser: Parser | None = None
        #: the other side, read before this one: a run whose bytes equal its pages is marked ``_SAME``
        #: while this side is read (one memcmp against the parser's buffer), not located
        self.against = against
        self._map: _Mapped | None = None  # ``against``'s file, mapped when first needed

    def release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _same_as_against(self, block: str, idx: int, count: int, view: memoryview, pos: int, stride: int) -> bool:
        a = self.against
        assert a is not None
        t = a.tables.get(block)
        i, n = idx * DIGEST, count * DIGEST
        if t is None or a.granule != self.granule or i + n > len(t):
            return False
        head = t[i:i + DIGEST]
        if t[i:i + n] != head * count:
            return False
        va = _unpack_one(head)[0]
        if va <= _FILLS:
            return False
        if self._map is None:
            self._map = _Mapped(a)
        length = (count - 1) * stride + self.granule
        off = va - _BIAS + idx * stride
        return _whole(view).startswith(self._map.view(off, length), pos)  # one memcmp

    def sink(self, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
             stride: int, offset: int) -> None:
        ps = self.page_size
        if self.granule != ps or kind not in (_PAGE, _ZERO):
            raise _NotLocatable()
        t, i = self._slots(block, addr, count, offset)
        idx = addr // ps
        if kind == _ZERO:
            _zero_slots(t, i, count, view, pos)
            return
        assert self.parser is not None
        key = ps + 8
        if count > 1 and stride == key and self.against is not None and self._same_as_against(
                block, idx, count, view, pos, stride):
            t[i:i + count * DIGEST] = _SAME_SLOT * count
            return
        first = self.parser.buffer_offset + self.file_offset + pos + _BIAS - idx * key
        if count == 1 or stride == key:
            t[i:i + count * DIGEST] = _PACK_ONE(first) * count
        else:
            _pack_many(count)(t, i, *[first + k * (stride - key) for k in range(count)])

    def check_unchanged(self, fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.ident:
            raise DecodeError(f"{self.path} changed while it was compared")

    def digests(self) -> PageTable:
        """The digest table of this side (to compare it with a side that was digested), read from the file."""
        out = PageTable(self.granule)
        out.page_size = self.page_size
        ps, key = self.granule, self.granule + 8
        with open(self.path, "rb") as f:
            self.check_unchanged(f.fileno())
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.ident[2] else None
            mv = memoryview(mm) if mm is not None else memoryview(b"")
            lo, hi = 1 << 63, 0  # the file range mapped in since the last _unmap
            try:
                for name, t in self.tables.items():
                    out.add_block(name, self.sizes[name])
                    o = out.tables[name]
                    for idx, v in enumerate(memoryview(t).cast("q")):
                        if v > _FILLS:
                            off = v - _BIAS + idx * key
                            page = mv[off:off + ps]  # a read-only view of an mmap: hashed without a copy
                            if len(page) != ps:
                                raise DecodeError(f"{self.path} changed while it was compared")
                            o[idx * DIGEST:(idx + 1) * DIGEST] = _PACK_ONE(hash(page) or 1)
                            page.release()
                            lo, hi = min(lo, off), max(hi, off + ps)
                            if hi - lo >= _UNMAP_SPAN:
                                _unmap(mm, lo, hi)
                                lo, hi = 1 << 63, 0
                        elif v:
                            o[idx * DIGEST:(idx + 1) * DIGEST] = out.zero_digest(ps, v - 1)
            finally:
                mv.release()
                if mm is not None:
                    mm.close()
        return out


class _Mapped:
    """A located side's file, to compare the other side's pages with its own as they are read.

    ``view`` gives a range from a window of the file mapped with ``MAP_POPULATE`` (``_MAP_WINDOW``
    bytes, the next one mapped when a range leaves it: the kernel maps the page cache's pages in one
    call, and the memcmp reads them in place).  Measured on the 1.79 GB stream: 0.16-0.22 s to map it
    all that way, against 0.45-0.57 s to ``preadv`` it into a buffer and 0.77-0.93 s to fault it in
    through one mapping of the whole file.  A short range outside the window (a page the other side
    sent out of order) is read with ``pread`` instead of moving the window."""

    def __init__(self, loc: PageLocations) -> None:
        self.path = loc.path
        self.fd = os.open(loc.path, os.O_RDONLY)
        try:
            loc.check_unchanged(self.fd)
        except BaseException:
            self.close()
            raise
        self.size = loc.ident[2]
        self.mm: mmap.mmap | None = None
        self.mv = memoryview(b"")
        self.lo = self.hi = 0  # the window's file range
        self.last = memoryview(b"")

    def view(self, off: int, length: int) -> memoryview:
        """The file's bytes [off, off + length) (valid until the next call)."""
        self.last.release()  # the window can be unmapped only when no view of it is left
        self.last = self._view(off, length)
        return self.last

    def _view(self, off: int, length: int) -> memoryview:
        if off < 0 or off + length > self.size:
            raise DecodeError(f"{self.path} changed while it was compared")
        if not (self.lo <= off and off + length <= self.hi):
            if length <= _SHORT_READ:
                data = os.pread(self.fd, length, off)
                if len(data) != length:
                    raise DecodeError(f"{self.path} changed while it was compared")
                return memoryview(data)
            self._unmap()
            lo = off - off % mmap.ALLOCATIONGRANULARITY
            hi = min(self.size, max(lo + _MAP_WINDOW, off + length))
            try:
                self.mm = mmap.mmap(self.fd, hi - lo, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ,
                                    offset=lo)
            except (OSError, ValueError) as e:
                raise DecodeError(f"{self.path}: cannot map it to compare: {e}") from None
            self.mv = memoryview(self.mm)
            self.lo, self.hi = lo, hi
        return self.mv[off - self.lo:off - self.lo + length]

    def _unmap(self) -> None:
        self.last.release()
        self.mv.release()
        self.mv = memoryview(b"")
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.lo = self.hi = 0

    def close(self) -> None:
        self._unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_MAP_WINDOW = 8 << 20
_SHORT_READ = 64 << 10
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _whole(view: memoryview) -> bytes | bytearray:
    """The object ``view`` shows (the parser's buffer), to memcmp at an offset with ``startswith``."""
    whole = view.obj
    if not isinstance(whole, bytes | bytearray) or len(view) != len(whole):
        whole = view.tobytes()
    return whole


def _unmap(mm: mmap.mmap | None, lo: int, hi: int) -> None:
    """Drop the pages of [lo, hi) from this process's mapping (the page cache keeps them), so what was
    read through the mapping does not count as this process's memory."""
    if mm is not None and hi > lo:
        start = lo - lo % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, min(hi, len(mm)) - start)


_ZERO = int(RamFlag.ZERO)
_ONE = _PACK_ONE(1)
_SAME = -1  # a PageLocations slot whose page equals the ``against`` side's
_SAME_SLOT = _PACK_ONE(_SAME)
_PACKERS: dict[int, Any] = {}


def _pack_many(n: int) -> Any:
    f = _PACKERS.get(n)
    if f is None:
        f = _PACKERS[n] = struct.Struct(f"<{n}q").pack_into
    return f


class _NeedContent(Exception):
    pass


#: ``PageVerdicts`` slot values of a data page, besides ``_SAME`` (equal to the located side's page, or
#: zero on both): it differs, with data on both sides / data on this side only / data on the other only
_V_CHANGED, _V_MINE, _V_THEIRS = -2, -3, -4
_V_SLOTS = {v: _PACK_ONE(v) for v in (_SAME, _V_CHANGED, _V_MINE, _V_THEIRS)}


class PageVerdicts(PageTable):
    """A ``PageTable`` for a side that is read once and cannot be mapped (a pipe, a compressed file, a
    qcow2 snapshot), compared with a side that is a plain file (``against``, read before it): each of
    its data pages is compared with the file side's page as it passes (one memcmp per run of pages
    that lie back to back in both streams, against a read-only mapping of that file; page by page
    where a run differs), and its slot keeps the verdict (``_SAME``, ``_V_*``), not a digest.  ZERO
    records keep their fill byte (``PageLocations``' values 0..256), compared at the end.  Pages are
    applied in stream order, so the last copy decides, as on a real destination; nothing is hashed."""

    def __init__(self, against: PageLocations) -> None:
        super().__init__(against.granule)
        if against.against is not None:
            raise ValueError("the located side must have been read on its own")
        self.against = against
        self._map: _Mapped | None = None
        self._fills: dict[int, bytes] = {}

    def release(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _fill(self, value: int) -> bytes:
        """The page a ZERO record of fill byte ``value`` stands for."""
        page = self._fills.get(value)
        if page is None:
            page = self._fills[value] = bytes((value,)) * self.page_size
        return page

    def sink(self, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
             stride: int, offset: int) -> None:
        ps = self.page_size
        a = self.against
        if self.granule != ps or a.granule != ps:
            raise DecodeError(f"RAM block {block!r}: page sizes differ ({a.granule} and {ps}); cannot compare pages",
                              offset)
        t, i = self._slots(block, addr, count, offset)
        idx = addr // ps
        if kind == _PAGE:
            self._pages(block, t, idx, count, _whole(view), pos, stride)
        elif kind == _ZERO:
            _zero_slots(t, i, count, view, pos)
        elif kind == RamFlag.COMPRESS_PAGE:
            page = _inflate(view, pos, offset)
            if len(page) != ps:
                raise DecodeError(f"compressed page inflates to {len(page)} bytes, not {ps}", offset)
            self._pages(block, t, idx, 1, page, 0, ps + 8)
        else:
            raise _NeedContent()

    def _pages(self, block: str, t: bytearray, idx: int, count: int, whole: bytes | bytearray, pos: int,
               stride: int) -> None:
        """Verdicts for ``count`` data pages at ``whole[pos + k * stride:][:page_size]``."""
        ps = self.page_size
        key = ps + 8
        i, n = idx * DIGEST, count * DIGEST
        theirs = self.against.tables.get(block, bytearray())[i:i + n]
        if len(theirs) < n:  # beyond the other side's block (or a block it does not have): zero there
            theirs += bytes(n - len(theirs))
        if self._map is None:
            self._map = _Mapped(self.against)
        m = self._map
        head = theirs[:DIGEST]
        va = _unpack_one(head)[0]
        if va > _FILLS and count > 1 and stride == key and theirs == head * count and whole.startswith(
                m.view(va - _BIAS + idx * key, (count - 1) * key + ps), pos):
            t[i:i + n] = _SAME_SLOT * count  # the common case: one memcmp for the run
            return
        zero = self._fill(0)
        out: list[int] = []
        vals = memoryview(theirs).cast("q").tolist()
        s = 0
        while s < count:
            va = vals[s]
            e = s + 1
            while e < count and vals[e] == va:
                e += 1
            if va > _FILLS and e - s > 1 and stride == key:
                # back to back on both sides: one memcmp for the stretch (the 8-byte record words between
                # the pages are compared too: equal when addresses and flags are), page by page if it differs
                off = va - _BIAS + (idx + s) * key
                if whole.startswith(m.view(off, (e - s - 1) * key + ps), pos + s * stride):
                    out += [_SAME] * (e - s)
                    s = e
                    continue
            for k in range(s, e):
                p = pos + k * stride
                if va > _FILLS:
                    other = m.view(va - _BIAS + (idx + k) * key, ps)
                    if whole.startswith(other, p):
                        out.append(_SAME)
                    else:
                        mine0, theirs0 = whole.startswith(zero, p), other == zero
                        out.append(_V_THEIRS if mine0 else _V_MINE if theirs0 else _V_CHANGED)
                else:
                    fill = va - 1 if va else 0
                    if whole.startswith(self._fill(fill), p):
                        out.append(_SAME)
                    else:
                        mine0 = whole.startswith(zero, p)
                        out.append(_V_THEIRS if mine0 else _V_MINE if fill == 0 else _V_CHANGED)
            s = e
        _pack_many(count)(t, i, *out)


@dataclass
class FieldDiff:
    path: str
    type: str
    old: Any = None
    new: Any = None
    change: str = "value"  # value | only-a | only-b | bytes | length | type
    ranges: list[tuple[int, int]] = field(default_factory=list)  # for ``bytes``: [start, end) offsets

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type, "change": self.change}
        if self.change == "bytes":
            d["ranges"] = [list(r) for r in self.ranges]
            d["old"] = self.old
            d["new"] = self.new
        else:
            d["old"] = self.old
            d["new"] = self.new
        return d


@dataclass
class SectionDiff:
    name: str  # SECTION:INSTANCE as in a field path
    idstr: str
    instance: int
    presence: str = "both"  # both | only-a | only-b
    version: tuple[int | None, int | None] = (None, None)
    fields: list[FieldDiff] = field(default_factory=list)
    subsections: list[tuple[str, str]] = field(default_factory=list)  # (name, only-a|only-b)

    @property
    def differs(self) -> bool:
        return (self.presence != "both" or self.version[0] != self.version[1] or bool(self.fields)
                or bool(self.subsections))

    def as_json(self) -> dict[str, Any]:
        return {"section": self.name, "idstr": self.idstr, "instance_id": self.instance, "presence": self.presence,
                "version": list(self.version), "fields": [f.as_json() for f in self.fields],
                "subsections": [{"name": n, "presence": p} for n, p in self.subsections]}


@dataclass
class BlockDiff:
    name: str
    size: tuple[int | None, int | None]
    changed: int = 0  # data on both sides, different
    appeared: int = 0  # zero (or not sent) in A, data in B
    disappeared: int = 0  # data in A, zero in B
    ranges: list[tuple[int, int, str]] = field(default_factory=list)  # [start, end) byte offsets, kind
    lowmem: int | None = None  # x86 pc.ram: bytes mapped below 4 GiB (guest-physical = offset below it)

    def gpa(self, offset: int) -> int | None:
        """Guest-physical address of a block offset, where the layout is known (x86 ``pc.ram``)."""
        if self.lowmem is None:
            return None
        return offset if offset < self.lowmem else (1 << 32) + offset - self.lowmem

    @property
    def differs(self) -> bool:
        return self.size[0] != self.size[1] or bool(self.changed or self.appeared or self.disappeared)

    def as_json(self) -> dict[str, Any]:
        return {"block": self.name, "size": list(self.size), "pages_changed": self.changed,
                "pages_appeared": self.appeared, "pages_disappeared": self.disappeared,
                "ranges": [{"start": s, "end": e, "change": k,
                            **({"gpa": self.gpa(s)} if self.lowmem is not None else {})}
                           for s, e, k in self.ranges]}


@dataclass
class StateDiff:
    a: str
    b: str
    configuration: list[tuple[str, Any, Any]] = field(default_factory=list)
    sections: list[SectionDiff] = field(default_factory=list)
    ram: list[BlockDiff] | None = None
    page_size: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.configuration or any(s.differs for s in self.sections)
                    or any(b.differs for b in self.ram or ()))

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "equal": self.equal,
            "configuration": [{"key": k, "a": x, "b": y} for k, x, y in self.configuration],
            "sections": [s.as_json() for s in self.sections if s.differs],
            "ram": None if self.ram is None else {"page_size": self.page_size,
                                                  "blocks": [b.as_json() for b in self.ram if b.differs]},
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------- reading


#: called at the start of each pass over one side (an XBZRLE side is read twice): an event hook and a
#: pass tracker to use for that pass, e.g. ``qevm report``'s RAM map; either may be None
Hooks = Callable[[], tuple[Callable[[Event], None] | None, PassTracker | None]]


def read_side(source: str | Input, *, ram: bool = True, hooks: Hooks | None = None, pages: bool = False,
              strict: bool = False, locate: bool = False, against: PageTable | None = None,
              **kw: Any) -> tuple[Analysis, PageTable | None]:
    """One pass over a stream; with ``ram`` a page table is filled on the way (the parser's counting
    fast path hands every page record to ``PageTable.sink`` without building an event per page;
    with ``pages`` every page is an event, given to ``hooks``' event hook too, and digested from it).
    With ``locate``, a side given by the path of a plain file gets a ``PageLocations`` table (read
    again to be digested, without ``locate``, if it has pages that are not stored as themselves);
    ``against``: the other side's table, when it is a ``PageLocations`` (runs equal to its pages
    are marked as such while this side is read).
    ``kw``: ``schema``, ``page_size`` as ``read_stream`` takes them."""
    on_event, tracker = hooks() if hooks is not None else (None, None)
    if not ram:
        return read_stream(source, strict=strict, on_event=on_event, tracker=tracker, pages=pages, **kw), None
    inp = open_input(source) if isinstance(source, str) else source
    try:
        schema = kw.get("schema")
        page_size = kw.get("page_size")
        parse_schema = schema
        if schema is None:
            parse_schema, trailer_page = trailer_schema(inp)
            page_size = page_size or trailer_page
        parser = Parser(schema=parse_schema, page_size=page_size, count_pages=not pages, keep_raw=False,
                        file_offset=inp.file_offset)
        table = PageTable()
        if locate and not pages and isinstance(source, str) and _locatable(source, inp):
            table = PageLocations(source, inp.file_offset, os.fstat(inp.file.fileno()),
                                  against=against if isinstance(against, PageLocations) else None)
            table.parser = parser
        elif isinstance(against, PageLocations) and against.against is None:
            table = PageVerdicts(against)  # compared with the file side's pages as they pass
        an = Analysis(schema=schema, page_size=lambda: parser.page_size or 4096)
        if tracker is not None:
            parser.passes = an._tracker = tracker

        def handle(ev: Event) -> None:
            an.handle(ev)
            t = type(ev)
            if t is RamPage:
                assert isinstance(ev, RamPage)
                # the per-event path (``--pages``): the same sink, one record at a time
                table.sink(ev.block, ev.kind, ev.addr, 1, memoryview(ev.payload), 0, len(ev.payload), 0, ev.offset)
            elif t is RamBlock:
                assert isinstance(ev, RamBlock)
                if not table.tables:  # one slot per target page (1 KiB on some Arm machines)
                    table.granule = table.page_size = parser.page_size or 4096
                table.add_block(ev.name, ev.used_length)
            if on_event is not None:
                on_event(ev)

        parser.run_sink = table.sink
        try:
            drive(parser, inp, handle)
        except _NotLocatable:
            inp.close()
            return read_side(source, ram=True, hooks=hooks, pages=pages, strict=strict, **kw)
        except _NeedContent:
            if not isinstance(source, str) or source == "-":
                raise DecodeError("a stream with XBZRLE pages must be a file (not a pipe) for the RAM "
                                  "comparison; or use --no-ram") from None
            return _read_with_image(source, kw, hooks, strict)
        finally:
            if isinstance(table, PageLocations | PageVerdicts):
                table.release()
        an.size = parser.offset
        an.stream_page_size = parser.page_size
        an.decode_devices(strict=strict)
        return an, table
    finally:
        if isinstance(source, str):
            inp.close()


def _locatable(source: str | Input, inp: Input) -> bool:
    """Whether a side's pages can be located in its file: a plain file given by its path."""
    return (isinstance(source, str) and source != "-" and inp.seekable and inp.compression is None
            and isinstance(inp.file, io.FileIO))


def plain_file(source: str | Input, **open_kw: Any) -> bool:
    """Whether ``source`` is a plain stream file given by its path (its pages can be located, compared
    by memcmp); a pipe, a compressed file, a qcow2 or libvirt image or an opened ``Input`` is not."""
    if not isinstance(source, str) or source == "-":
        return False
    with open_input(source, **open_kw) as inp:
        return _locatable(source, inp)


def read_order(a: str | Input, b: str | Input, *, ram: bool = True, pages_a: bool = False,
               pages_b: bool = False) -> tuple[bool, bool, bool]:
    """How to read two sides for a comparison: (locate A, locate B, read B first).

    Plain files are located (``PageLocations``; not a side read with ``pages``, one event per page);
    when only B is, B is read first, so that A is compared with B's pages as it is read
    (``PageVerdicts``), just as B is compared with A's when only A is a file or both are.  A pipe is
    read once either way; A stays the old side of the result."""
    if not ram:
        return False, False, False
    la, lb = not pages_a and plain_file(a), not pages_b and plain_file(b)
    return la, lb, lb and not la


def _read_with_image(source: str, kw: dict[str, Any], hooks: Hooks | None,
                     strict: bool) -> tuple[Analysis, PageTable]:
    """Second pass for an XBZRLE stream: apply every page to a sparse image and digest it at the end."""
    on_event, tracker = hooks() if hooks is not None else (None, None)
    image = RamImage(4096)
    try:
        an = read_stream(source, strict=strict, memory=image, on_event=on_event, tracker=tracker, pages=True, **kw)
        ps = an.page_size or 4096
        table = PageTable(ps)
        for name, size in image.blocks().items():
            table.add_block(name, size)
            for addr in image.sent_pages(name):
                table.put(name, addr, _digest(image.read(name, addr, ps)))
        return an, table
    finally:
        image.close()


# ---------------------------------------------------------------------------------------------- comparing


def _config(an: Analysis) -> dict[str, Any]:
    c = an.configuration
    out: dict[str, Any] = {"file_version": an.header.version if an.header else None, "page_size": an.page_size}
    if c is not None:
        out.update(machine=c.machine, page_bits=c.page_bits, capabilities=c.capabilities, uuid=c.uuid)
    return out


def _section_name(idstr: str, instance: int) -> str:
    return str(FieldPath(idstr, instance, ("",)))[:-1].rstrip("/")


def _fmt(fd: dict[str, Any], v: Any) -> Any:
    if v is NULL:
        return None
    if isinstance(v, Opaque):
        return v.data.hex()
    codec = codec_for(str(fd.get("type")), int(fd.get("size", 0)))
    if codec is RAW or isinstance(v, bytes | bytearray):
        return bytes(v).hex()
    return codec.to_json(v)


def _byte_ranges(a: bytes, b: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    n = min(len(a), len(b))
    i = 0
    while i < n:
        if a[i] != b[i]:
            j = i
            while j < n and a[j] != b[j]:
                j += 1
            if out and i - out[-1][1] <= 4:
                out[-1] = (out[-1][0], j)
            else:
                out.append((i, j))
            i = j
        else:
            i += 1
    if len(a) != len(b):
        out.append((n, max(len(a), len(b))))
    return out


def _keyed(st: Struct) -> dict[str, Any]:
    """Fields by the path segment that names them (``name`` or ``name[index]``); a repeated name
    (``unused`` padding) gets ``#2``, ``#3`` suffixes so the pairing stays stable."""
    out: dict[str, Any] = {}
    for f in st.fields:
        key = f.name if f.desc.get("index") is None else f"{f.name}[{f.desc['index']}]"
        k, n = key, 1
        while k in out:
            n += 1
            k = f"{key}#{n}"
        out[k] = f
    return out


class _Walker:
    def __init__(self, section: str) -> None:
        self.section = section
        self.out: list[FieldDiff] = []
        self.subs: list[tuple[str, str]] = []

    def path(self, segs: list[str]) -> str:
        return f"{self.section}/" + "/".join(segs)

    def struct(self, a: Struct, b: Struct, segs: list[str]) -> None:
        fa, fb = _keyed(a), _keyed(b)
        for k, x in fa.items():
            y = fb.get(k)
            if y is None:
                self.out.append(FieldDiff(self.path(segs + [k]), x.type, _val(x), None, "only-a"))
                continue
            if x.type != y.type and not (isinstance(x.value, Struct) and isinstance(y.value, Struct)):
                self.out.append(FieldDiff(self.path(segs + [k]), f"{x.type} -> {y.type}", _val(x), _val(y), "type"))
                continue
            if x.desc.get("array_len") is not None or y.desc.get("array_len") is not None:
                self.array(x, y, segs + [k])
            else:
                self.value(x.desc, x.value, y.value, segs + [k])
        for k, y in fb.items():
            if k not in fa:
                self.out.append(FieldDiff(self.path(segs + [k]), y.type, None, _val(y), "only-b"))
        sa = {s.name: s for s in a.subsections}
        sb = {s.name: s for s in b.subsections}
        for name, s in sa.items():
            if name not in sb:
                self.subs.append(("/".join(segs + [name]), "only-a"))
            else:
                self.struct(s.body, sb[name].body, segs + [name])
        for name in sb:
            if name not in sa:
                self.subs.append(("/".join(segs + [name]), "only-b"))

    def array(self, x: Any, y: Any, segs: list[str]) -> None:
        va = x.value if isinstance(x.value, list) else [x.value]
        vb = y.value if isinstance(y.value, list) else [y.value]
        base = segs[-1]
        if len(va) != len(vb):
            self.out.append(FieldDiff(self.path(segs), x.type, len(va), len(vb), "length"))
        for k in range(min(len(va), len(vb))):
            self.value(x.desc, va[k], vb[k], segs[:-1] + [f"{base}[{k}]"])

    def value(self, fd: dict[str, Any], a: Any, b: Any, segs: list[str]) -> None:
        if isinstance(a, Struct) and isinstance(b, Struct):
            self.struct(a, b, segs)
            return
        if a == b if not (isinstance(a, Opaque) and isinstance(b, Opaque)) else a.data == b.data:
            return
        t = str(fd.get("type", "?"))
        if isinstance(a, bytes | bytearray) and isinstance(b, bytes | bytearray):
            ranges = _byte_ranges(bytes(a), bytes(b))
            if max(len(a), len(b)) <= WHOLE_BYTES:  # short (a MAC, a PCI header word): the values --set takes
                old, new = bytes(a).hex(), bytes(b).hex()
            else:
                old = ";".join(bytes(a[s:e]).hex() for s, e in ranges[:8])
                new = ";".join(bytes(b[s:e]).hex() for s, e in ranges[:8])
            self.out.append(FieldDiff(self.path(segs), t, old, new, "bytes", ranges))
            return
        self.out.append(FieldDiff(self.path(segs), t, _fmt(fd, a), _fmt(fd, b)))


def _val(f: Any) -> Any:
    if isinstance(f.value, list):
        return [_fmt(f.desc, v) if not isinstance(v, Struct) else "{...}" for v in f.value]
    if isinstance(f.value, Struct):
        return "{...}"
    return _fmt(f.desc, f.value)


def _device_diff(name: str, a: Device, b: Device) -> tuple[list[FieldDiff], list[tuple[str, str]]]:
    w = _Walker(name)
    if a.struct is not None and b.struct is not None:
        w.struct(a.struct, b.struct, [])
    elif a.data != b.data:
        ranges = _byte_ranges(a.data, b.data)
        w.out.append(FieldDiff(name, "raw section", None, None, "bytes", ranges))
    return w.out, w.subs


def _ram_diff(ta: PageTable, tb: PageTable, page_size: int) -> list[BlockDiff]:
    out: list[BlockDiff] = []
    verdicts: _Verdicts | None = None
    if isinstance(tb, PageVerdicts) and tb.against is ta:
        verdicts = _Verdicts(tb, mine_is_b=True)
    elif isinstance(ta, PageVerdicts) and ta.against is tb:
        verdicts = _Verdicts(ta, mine_is_b=False)
    elif isinstance(ta, PageLocations) != isinstance(tb, PageLocations):
        ta, tb = (t.digests() if isinstance(t, PageLocations) else t for t in (ta, tb))
    if verdicts is None and (isinstance(ta, PageVerdicts) or isinstance(tb, PageVerdicts)):
        raise ValueError("a PageVerdicts table compares only with the table it was read against")
    ga, gb = ta.granule, tb.granule
    names = list(ta.tables) + [n for n in tb.tables if n not in ta.tables]
    files = (_Files(ta, tb) if isinstance(ta, PageLocations) and isinstance(tb, PageLocations) else None)
    try:
        for name in names:
            bd = BlockDiff(name, (ta.sizes.get(name), tb.sizes.get(name)))
            xa = ta.tables.get(name, bytearray())
            xb = tb.tables.get(name, bytearray())
            if ga != gb:
                raise DecodeError(f"RAM block {name!r}: page sizes differ ({ga} and {gb}); cannot compare pages")
            n = max(len(xa), len(xb))
            if len(xa) < n:
                xa = xa + bytes(n - len(xa))
            if len(xb) < n:
                xb = xb + bytes(n - len(xb))
            changes = (files.changes(xa, xb, ga) if files is not None
                       else verdicts.changes(xa, xb, ga) if verdicts is not None
                       else _digest_changes(xa, xb, {ta.zero_digest(ga), _EMPTY}, {tb.zero_digest(gb), _EMPTY}))
            cur: list[Any] = []  # open range [start, end, kind]
            for idx, kind in changes:
                setattr(bd, kind, getattr(bd, kind) + 1)
                start = idx * ga
                if cur and cur[2] == kind and cur[1] == start:
                    cur[1] = start + ga
                else:
                    if cur:
                        bd.ranges.append((cur[0], cur[1], cur[2]))
                    cur = [start, start + ga, kind]
            if cur:
                bd.ranges.append((cur[0], cur[1], cur[2]))
            out.append(bd)
    finally:
        if files is not None:
            files.close()
        if verdicts is not None:
            verdicts.close()
    return out


def _digest_changes(xa: bytes | bytearray, xb: bytes | bytearray, za: set[bytes],
                    zb: set[bytes]) -> Iterator[tuple[int, str]]:
    """Slots whose digests differ, in order, with their kind (both zero: not a difference)."""
    ma, mb = memoryview(xa), memoryview(xb)
    n = len(xa)
    step = 64 * DIGEST
    for pos in range(0, n, step):
        end = min(n, pos + step)
        if ma[pos:end] == mb[pos:end]:
            continue
        for i in range(pos, end, DIGEST):
            da, db = bytes(ma[i:i + DIGEST]), bytes(mb[i:i + DIGEST])
            if da == db:
                continue
            a0, b0 = da in za, db in zb
            if a0 and b0:
                continue
            yield i // DIGEST, "appeared" if a0 else "disappeared" if b0 else "changed"


class _Files:
    """Both sides' files, to compare two ``PageLocations`` tables by the pages' bytes."""

    def __init__(self, ta: PageLocations, tb: PageLocations) -> None:
        self.fa = os.open(ta.path, os.O_RDONLY)
        self.fb = os.open(tb.path, os.O_RDONLY)
        self.mm: mmap.mmap | None = None
        self.mvb = memoryview(b"")
        try:
            ta.check_unchanged(self.fa)
            tb.check_unchanged(self.fb)
            if tb.ident[2]:
                self.mm = mmap.mmap(self.fb, 0, access=mmap.ACCESS_READ)
                self.mvb = memoryview(self.mm)
        except BaseException:
            self.close()
            raise
        self.window = bytearray(_WINDOW)
        self.lo, self.hi = 1 << 63, 0  # B's file range mapped in since the last _unmap

    def close(self) -> None:
        self.mvb.release()
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        for fd in (self.fa, self.fb):
            if fd >= 0:
                os.close(fd)
        self.fa = self.fb = -1

    def changes(self, xa: bytes | bytearray, xb: bytes | bytearray, ps: int) -> Iterator[tuple[int, str]]:
        """Pages that differ, in order: stretches of slots with one value on each side are compared
        with one memcmp per window (back-to-back records: the 8-byte record words between the pages
        are equal when the addresses and flags are), page by page only when a stretch differs."""
        n = len(xa) // DIGEST
        c = _STRETCH_CHUNK
        for c0 in range(0, n, c):
            m = min(c, n - c0)
            sa, sb = bytes(xa[c0 * DIGEST:(c0 + m) * DIGEST]), bytes(xb[c0 * DIGEST:(c0 + m) * DIGEST])
            if sb == _SAME_SLOT * m or (sa == sb and sa == sa[:DIGEST] * m and sa[:DIGEST] in (_EMPTY, _ONE)):
                continue  # B equal to A (found while B was read), or both zero
            if sa == sa[:DIGEST] * m and sb == sb[:DIGEST] * m:
                yield from self.stretch(c0, c0 + m, _unpack_one(sa)[0], _unpack_one(sb)[0], ps)
                continue
            la = memoryview(sa).cast("q").tolist()
            lb = memoryview(sb).cast("q").tolist()
            s = 0
            for k in range(1, m + 1):
                if k == m or la[k] != la[s] or lb[k] != lb[s]:
                    yield from self.stretch(c0 + s, c0 + k, la[s], lb[s], ps)
                    s = k

    def stretch(self, i: int, j: int, va: int, vb: int, ps: int) -> Iterator[tuple[int, str]]:
        if vb == _SAME or (0 <= va <= 1 and 0 <= vb <= 1):
            return  # equal (found so while B was read), or zero or never sent on both sides
        key = ps + 8
        if va > _FILLS and vb > _FILLS and self.equal(va - _BIAS + i * key, vb - _BIAS + i * key, (j - i) * key - 8):
            return
        zero = bytes(ps)
        for k in range(i, j):
            pa, pb = self.page(self.fa, va, k, ps), self.page(self.fb, vb, k, ps)
            if pa == pb:
                continue
            a0, b0 = pa == zero, pb == zero
            if not (a0 and b0):
                yield k, "appeared" if a0 else "disappeared" if b0 else "changed"

    def page(self, fd: int, v: int, k: int, ps: int) -> bytes:
        if v <= _FILLS:
            return bytes((v - 1,)) * ps if v else bytes(ps)
        data = os.pread(fd, ps, v - _BIAS + k * (ps + 8))
        if len(data) != ps:
            raise DecodeError("an input file changed while it was compared")
        return data

    def equal(self, oa: int, ob: int, length: int) -> bool:
        """memcmp of A's bytes [oa, oa + length) and B's [ob, ob + length): A read into a buffer, B mapped."""
        done = 0
        while done < length:
            w = min(_WINDOW, length - done)
            buf = self.window if w == _WINDOW else bytearray(w)
            if os.preadv(self.fa, [buf], oa + done) != w:
                raise DecodeError("an input file changed while it was compared")
            same = buf == self.mvb[ob + done:ob + done + w]  # bytearray == buffer: one memcmp
            self.lo, self.hi = min(self.lo, ob + done), max(self.hi, ob + done + w)
            if self.hi - self.lo >= _UNMAP_SPAN:
                _unmap(self.mm, self.lo, self.hi)
                self.lo, self.hi = 1 << 63, 0
            if not same:
                return False
            done += w
        return True


class _Verdicts:
    """A ``PageVerdicts`` side against its located side: the data pages were decided while it was read;
    its ZERO records (and pages it never sent) are compared here, with the located side's pages read
    from its file where that side has data."""

    def __init__(self, mine: PageVerdicts, mine_is_b: bool) -> None:
        self.loc = mine.against
        self.fd = os.open(self.loc.path, os.O_RDONLY)
        try:
            self.loc.check_unchanged(self.fd)
        except BaseException:
            self.close()
            raise
        # a verdict names this side's data against the other's; A is the old side
        self.kind = {_V_CHANGED: "changed", _V_MINE: "appeared" if mine_is_b else "disappeared",
                     _V_THEIRS: "disappeared" if mine_is_b else "appeared"}
        self.mine_is_b = mine_is_b

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def changes(self, xa: bytes | bytearray, xb: bytes | bytearray, ps: int) -> Iterator[tuple[int, str]]:
        xm, xl = (xb, xa) if self.mine_is_b else (xa, xb)
        n = len(xm) // DIGEST
        c = _STRETCH_CHUNK
        key = ps + 8
        for c0 in range(0, n, c):
            m = min(c, n - c0)
            sm, sl = bytes(xm[c0 * DIGEST:(c0 + m) * DIGEST]), bytes(xl[c0 * DIGEST:(c0 + m) * DIGEST])
            if sm == _SAME_SLOT * m or (sm == sl and sm == sm[:DIGEST] * m and sm[:DIGEST] in (_EMPTY, _ONE)):
                continue  # equal (decided while read), or both zero
            lm = memoryview(sm).cast("q").tolist()
            ll = memoryview(sl).cast("q").tolist()
            for k in range(m):
                vm = lm[k]
                if vm == _SAME:
                    continue
                if vm < 0:
                    yield c0 + k, self.kind[vm]
                    continue
                # a ZERO record of fill byte vm - 1 on this side (0: never sent, zero)
                vl = ll[k]
                mine0 = vm <= 1
                if vl <= _FILLS:
                    if vl == vm or (mine0 and vl <= 1):
                        continue
                    theirs0 = vl <= 1
                else:
                    page = os.pread(self.fd, ps, vl - _BIAS + (c0 + k) * key)
                    if len(page) != ps:
                        raise DecodeError(f"{self.loc.path} changed while it was compared")
                    if page == bytes((vm - 1 if vm else 0,)) * ps:
                        continue
                    theirs0 = page == bytes(ps)
                yield c0 + k, self.kind[_V_THEIRS if mine0 else _V_MINE if theirs0 else _V_CHANGED]


_unpack_one = struct.Struct("<q").unpack_from


def diff_analyses(an_a: Analysis, an_b: Analysis, name_a: str = "A", name_b: str = "B",
                  tables: tuple[PageTable, PageTable] | None = None,
                  ignore: tuple[str, ...] = ()) -> StateDiff:
    res = StateDiff(name_a, name_b)
    ca, cb = _config(an_a), _config(an_b)
    for k in dict.fromkeys(list(ca) + list(cb)):
        if ca.get(k) != cb.get(k) and not _ignored(f"configuration/{k}", ignore):
            res.configuration.append((k, ca.get(k), cb.get(k)))
    da = {(d.section.idstr, d.section.instance_id): d for d in an_a.devices}
    db = {(d.section.idstr, d.section.instance_id): d for d in an_b.devices}
    live_a = {(s.section.idstr, s.section.instance_id): s.section for s in an_a.order}
    live_b = {(s.section.idstr, s.section.instance_id): s.section for s in an_b.order}
    keys = list(live_a) + [k for k in live_b if k not in live_a]
    for key in keys:
        idstr, inst = key
        name = _section_name(idstr, inst)
        if _ignored(name, ignore):
            continue
        sa, sb = live_a.get(key), live_b.get(key)
        sd = SectionDiff(name, idstr, inst, version=(sa.version if sa else None, sb.version if sb else None))
        if sa is None or sb is None:
            sd.presence = "only-b" if sa is None else "only-a"
        elif key in da and key in db:
            fields, subs = _device_diff(name, da[key], db[key])
            sd.fields = [f for f in fields if not _ignored(f.path, ignore)]
            sd.subsections = [(n, p) for n, p in subs if not _ignored(f"{name}/{n}", ignore)]
        res.sections.append(sd)
    if tables is not None:
        ps = an_a.page_size or an_b.page_size or tables[0].granule
        res.page_size = ps
        res.ram = [b for b in _ram_diff(tables[0], tables[1], ps) if not _ignored(f"ram/{b.name}", ignore)]
        machine = an_a.configuration.machine if an_a.configuration else None
        for b in res.ram:
            if b.name == "pc.ram" and b.size[0] == b.size[1] and b.size[0] is not None and machine:
                b.lowmem = _x86_lowmem(machine, b.size[0])
                if b.lowmem is not None and b.lowmem < b.size[0]:
                    _split_at(b, b.lowmem)
    return res


def _x86_lowmem(machine: str, size: int) -> int | None:
    """RAM below 4 GiB on QEMU's PC machines with the default ``max-ram-below-4g`` (QEMU's rule:
    q35 keeps 2 GiB low once RAM reaches 2.75 GiB; i440fx 3 GiB once it reaches 3.5 GiB)."""
    if machine.startswith("pc-q35"):
        return 0x80000000 if size >= 0xB0000000 else size
    if machine.startswith("pc-i440fx"):
        return 0xC0000000 if size >= 0xE0000000 else size
    return None


def _split_at(b: BlockDiff, cut: int) -> None:
    out: list[tuple[int, int, str]] = []
    for s, e, k in b.ranges:
        if s < cut < e:
            out += [(s, cut, k), (cut, e, k)]
        else:
            out.append((s, e, k))
    b.ranges = out


def _ignored(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path.replace('"', ""), p) for p in patterns)


def diff_states(a: str | Input, b: str | Input, *, ram: bool = True, ignore: tuple[str, ...] = (),
                name_a: str | None = None, name_b: str | None = None, **kw: Any) -> StateDiff:
    """Read ``a`` and ``b`` (one pass each; either may be a pipe) and compare them (``read_order``:
    a side that is a plain file is read first and the other compared with its pages by memcmp)."""
    la, lb, b_first = read_order(a, b, ram=ram)
    if b_first:
        an_b, tb = read_side(b, ram=ram, locate=lb, **kw)
        an_a, ta = read_side(a, ram=ram, locate=la, against=tb, **kw)
    else:
        an_a, ta = read_side(a, ram=ram, locate=la, **kw)
        an_b, tb = read_side(b, ram=ram, locate=lb, against=ta, **kw)
    na = name_a or (a if isinstance(a, str) else a.name)
    nb = name_b or (b if isinstance(b, str) else b.name)
    res = diff_analyses(an_a, an_b, na, nb, (ta, tb) if ta is not None and tb is not None else None, ignore)
    add_side_notes(res, ((an_a, na), (an_b, nb)))
    return res


def add_side_notes(res: StateDiff, sides: tuple[tuple[Analysis, str], ...]) -> None:
    """What the comparison could not look at on each side: mapped-ram pages, undecoded sections."""
    for an, n in sides:
        if res.ram is not None and any(blk.mapped is not None for blk in an.blocks.values()):
            res.notes.append(f"{n}: mapped-ram stream: RAM pages are not compared")
        for d in an.devices:
            if d.error:
                res.notes.append(f"{n}: section {d.section.idstr!r} compared as raw bytes: {d.error}")
