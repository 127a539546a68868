"""Move a VM state between the places QEMU keeps it (``qevm convert``).

Outputs:

* ``stream``: a plain sequential stream, optionally through gzip/xz/zstd.  From a plain stream, a
  compressed one, a qcow2 snapshot or a libvirt save image the bytes are copied unchanged (no
  parsing); from a ``mapped-ram`` file the RAM is put back into page records (``sequential_chunks``).
* ``mapped-ram``: the file layout QEMU >= 9.0 writes with the ``mapped-ram`` capability to a
  ``file:`` URI (format.md §4): every RAM block gets a header, a bitmap and a fixed region where page
  *i* lives at ``pages_offset + i * page_size``; zero pages are holes (a sparse file).
* ``qcow2``: an internal snapshot, written by ``qevm.io.qcow2write.add_snapshot``.

Every output is written to a temporary name in the destination's directory and renamed when
complete (the qcow2 image is changed in place, snapshot table last).  The input is only read.
"""

from __future__ import annotations

import array
import io
import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qevm.codec.schema import Schema
from qevm.codec.wire import be32, cstr
from qevm.errors import DecodeError, InvalidOperation, UsageError
from qevm.format.events import (
    ConfigSubsection,
    Configuration,
    Event,
    MappedRamBitmap,
    MappedRamData,
    MappedRamHeader,
    RamBlock,
    RamControl,
    RamPage,
    RamTally,
    SectionHeader,
    VmDescription,
)
from qevm.format.memory import RamImage
from qevm.format.multifd import mapped_ram_header
from qevm.format.pagebits import any_bits, set_bits
from qevm.format.parser import DONE, NEED_DATA, Parser
from qevm.format.records import MAGIC, Command, RamFlag, SectionKind, ram_record_head
from qevm.io.base import CHUNK, Input, atomic_output, pwritev_all
from qevm.io.compression import compressing
from qevm.io.mapped import drive
from qevm.io.reader import trailer_schema
from qevm.io.sources import open_input

__all__ = [
    "FORMATS",
    "COMPRESSIONS",
    "ConvertResult",
    "guess_format",
    "convert",
    "sequential_chunks",
    "write_mapped_ram",
    "stream_info",
    "vm_clock_of",
    "find_vm_clock",
    "with_caps",
    "vmdesc_with_caps",
    "bit_runs",
]

FORMATS = ("stream", "mapped-ram", "qcow2")
COMPRESSIONS = ("gzip", "xz", "zstd")

_CAPS = "configuration/capabilities"
_SUFFIXES = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}


@dataclass
class ConvertResult:
    output: str
    to: str
    source: str  # what IN was: stream, mapped-ram, qcow2 snapshot, ...
    size: int = 0  # bytes of the output (the VM state size for qcow2)
    compression: str | None = None
    pages: int = 0  # RAM pages carried (mapped-ram conversions)
    zero_pages: int = 0
    resolved: int = 0  # XBZRLE / compressed pages applied while building a mapped-ram file
    snapshot: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def guess_format(out: str) -> tuple[str | None, str | None]:
    """(format, compression) that ``out``'s name makes clear, None where it does not."""
    base = os.path.basename(out).lower()
    root, ext = os.path.splitext(base)
    if ext in _SUFFIXES:
        return "stream", _SUFFIXES[ext]
    if ext == ".qcow2":
        return "qcow2", None
    if "mapped-ram" in root or "mapped_ram" in root or ext == ".mapped":
        return "mapped-ram", None
    if ext in (".mig", ".stream", ".vmstate", ".sav"):
        return "stream", None
    return None, None


# --------------------------------------------------------------------------------------------
# output plumbing


Chunk = bytes | list[bytes | memoryview]  # a piece of output: bytes, or buffers to write in order


def _flat(chunks: Iterable[Chunk]) -> Iterator[bytes]:
    for c in chunks:
        yield c if isinstance(c, bytes) else b"".join(c)


def _write_chunks(chunks: Iterable[Chunk], out: Any, fd: int | None = None) -> int:
    """Write every chunk to ``out``; buffer lists go straight to ``fd`` with ``writev`` when given."""
    n = 0
    for c in chunks:
        if isinstance(c, bytes):
            if fd is not None:
                _writev(fd, [c])
            else:
                out.write(c)
            n += len(c)
        elif fd is not None:
            n += _writev(fd, c)
        else:
            data = b"".join(c)
            out.write(data)
            n += len(data)
    return n


def _writev(fd: int, bufs: list[bytes | memoryview]) -> int:
    total = 0
    for k in range(0, len(bufs), 1024):  # IOV_MAX
        part = bufs[k:k + 1024]
        want = sum(map(len, part))
        done = os.writev(fd, part)
        while done < want:  # a short write: finish the rest plainly
            rest = b"".join(part)[done:]
            done += os.write(fd, rest)
        total += want
    return total


# --------------------------------------------------------------------------------------------
# looking at the input


@dataclass
class StreamHead:
    """What the first bytes of a stream tell: its configuration and its first bytes (kept to be
    re-emitted when the input is a pipe)."""

    head: bytes
    configuration: Configuration | None

    @property
    def capabilities(self) -> list[str]:
        return self.configuration.capabilities if self.configuration else []

    @property
    def mapped_ram(self) -> bool:
        return "mapped-ram" in self.capabilities


def stream_info(inp: Input, limit: int = 1 << 16) -> StreamHead:
    """Read the file header and configuration record of ``inp`` (up to ``limit`` bytes).  A seekable
    input is rewound; for others the bytes read are in ``head`` and must be re-emitted."""
    head = bytearray()
    while len(head) < limit:
        b = inp.file.read(min(4096, limit - len(head)))
        if not b:
            break
        head += b
        if len(head) >= 8 and int.from_bytes(head[:4], "big") != MAGIC:
            break
        cfg = _parse_config(bytes(head))
        if cfg is not False:
            break
    if inp.seekable:
        inp.file.seek(0)
    data = bytes(head)
    if len(data) < 8 or int.from_bytes(data[:4], "big") != MAGIC:
        raise DecodeError(f"{inp.name} is not a QEVM stream (magic {data[:4]!r}), nor a qcow2 image or a libvirt "
                          "save image", 0)
    cfg = _parse_config(data)
    return StreamHead(data, cfg if isinstance(cfg, Configuration) else None)


def _parse_config(data: bytes) -> Configuration | None | bool:
    """The configuration record, None when the stream has none, False when more bytes are needed."""
    p = Parser()
    p.feed(data)
    while True:
        try:
            ev = p.next_event()
        except DecodeError:
            return False
        if ev is NEED_DATA or ev is DONE:
            return False
        if isinstance(ev, Configuration):
            return ev
        if isinstance(ev, SectionHeader):
            return None


def _raw_chunks(inp: Input, head: bytes) -> Iterator[bytes]:
    """The input's bytes unchanged (``head`` first when the input is not seekable)."""
    if not inp.seekable and head:
        yield head
    f = inp.file
    buf = bytearray(CHUNK * 4)
    mv = memoryview(buf)
    readinto = getattr(f, "readinto", None)
    while True:
        if readinto is not None:
            k = readinto(mv) or 0
            if not k:
                return
            yield bytes(mv[:k])
        else:
            b = f.read(len(buf))
            if not b:
                return
            yield b


def _schema_and_page(inp: Input) -> tuple[Schema | None, int | None]:
    if inp.seekable:
        return trailer_schema(inp)
    return None, None


def _caps_body(caps: list[str]) -> bytes:
    return be32(len(caps)) + b"".join(cstr(c) for c in caps)


def with_caps(cfg: Configuration, caps: list[str]) -> Configuration:
    """``cfg`` with its capabilities subsection replaced (dropped when ``caps`` is empty); a new
    subsection goes where QEMU puts it (after target-page-bits, before uuid)."""
    subs = [s for s in cfg.subsections if s.name != _CAPS]
    if caps:
        old = cfg.sub(_CAPS)
        sub = ConfigSubsection(_CAPS, old.version if old else 1, _caps_body(caps))
        at = next((i + 1 for i, s in enumerate(subs) if s.name == "configuration/target-page-bits"), 0)
        subs.insert(at, sub)
    return Configuration(cfg.offset, cfg.machine, subs)


def vmdesc_with_caps(ev: VmDescription, caps: list[str]) -> VmDescription:
    """The vmdesc trailer with its description of the configuration's capabilities subsection
    matching ``caps`` (readers such as analyze-migration.py parse the configuration by it).  QEMU
    7.2 does not describe the configuration at all: then nothing changes."""
    try:
        doc = json.loads(ev.raw)
    except ValueError:
        return ev
    cfg = doc.get("configuration") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        return ev
    subs = [s for s in cfg.get("subsections", []) if not (isinstance(s, dict) and s.get("vmsd_name") == _CAPS)]
    if caps:
        elem: dict[str, Any] = {"name": "capabilities", "type": "capability", "size": len(caps[0]) + 1}
        if len(caps) > 1:
            elem = {"name": "capabilities", "array_len": len(caps), "type": "capability", "size": len(caps[0]) + 1}
        desc = {"vmsd_name": _CAPS, "version": 1,
                "fields": [{"name": "caps_count", "type": "uint32", "size": 4}, elem]}
        at = next((i + 1 for i, s in enumerate(subs)
                   if isinstance(s, dict) and s.get("vmsd_name") == "configuration/target-page-bits"), 0)
        subs.insert(at, desc)
    if subs:
        cfg["subsections"] = subs
    else:
        cfg.pop("subsections", None)
    return VmDescription(ev.offset, json.dumps(doc).encode())


# --------------------------------------------------------------------------------------------
# mapped-ram -> sequential


@dataclass
class _MappedBlock:
    name: str
    used: int
    header: MappedRamHeader
    bitmap: bytes = b""


def sequential_chunks(inp: Input, stats: ConvertResult | None = None) -> Iterator[Chunk]:
    """A mapped-ram stream (a seekable file) as a plain sequential stream, in chunks.

    The configuration loses the ``mapped-ram`` capability, the block list its mapped-ram headers;
    the pages the bitmaps mark present become PAGE records and the others ZERO records, all in the
    RAM END section (before its EOS), as a completed precopy would have sent them at the end.
    Everything else is copied unchanged."""
    if not inp.seekable:
        raise UsageError(f"{inp.name}: a mapped-ram file is read at the offsets its headers give; give the "
                         "uncompressed file itself, not a pipe or a compressed copy")
    schema, page_size = trailer_schema(inp)
    parser = Parser(schema=schema, page_size=page_size, file_offset=inp.file_offset, count_pages=True,
                    keep_raw=True)
    blocks: list[_MappedBlock] = []
    by_name: dict[str, _MappedBlock] = {}
    ram_sid: int | None = None
    caps: list[str] = []
    in_end = False
    emitted = False
    out: list[bytes] = []
    while True:
        ev = parser.next_event()
        if ev is NEED_DATA:
            if out:
                yield b"".join(out)
                out.clear()
            from qevm.io.reader import _fill  # the reader's one way of answering NEED_DATA

            _fill(parser, inp, True)
            continue
        if ev is DONE:
            break
        assert isinstance(ev, Event)
        if isinstance(ev, Configuration):
            caps = [c for c in ev.capabilities if c != "mapped-ram"]
            out.append(with_caps(ev, caps).encode())
        elif isinstance(ev, RamBlock):
            if ev.mapped is not None:
                mb = _MappedBlock(ev.name, ev.used_length, ev.mapped)
                if ev.mapped.pages_offset:
                    blocks.append(mb)
                    by_name[ev.name] = mb
            out.append(RamBlock(ev.offset, ev.name, ev.used_length, ev.page_size, ev.addr, None).encode())
        elif isinstance(ev, MappedRamBitmap):
            by_name[ev.block].bitmap = bytes(ev.data)
        elif isinstance(ev, MappedRamData):
            pass
        elif isinstance(ev, VmDescription):
            out.append(vmdesc_with_caps(ev, caps).encode())
        elif isinstance(ev, SectionHeader):
            if ev.section.handler == "ram":
                ram_sid = ev.section.section_id
                in_end = ev.kind == SectionKind.END
            else:
                in_end = False
            out.append(ev.encode())
        elif isinstance(ev, (RamPage, RamTally)):
            raise DecodeError("a mapped-ram stream carries RAM page records in its main stream; qevm does not "
                              "know how to merge them with the mapped pages", ev.offset, "ram")
        elif isinstance(ev, RamControl) and ev.flags == RamFlag.EOS and in_end and not emitted:
            emitted = True
            if out:
                yield b"".join(out)
                out.clear()
            here = inp.file.tell()
            yield from _mapped_pages(inp, blocks, parser.page_size or 4096, stats)
            inp.file.seek(here)
            out.append(ev.encode())
        elif isinstance(ev, RamControl) and ev.flags == RamFlag.MULTIFD_FLUSH:
            pass  # no multifd channels in a sequential stream
        else:
            out.append(ev.encode())
    if out:
        yield b"".join(out)
    if ram_sid is not None and not emitted:
        raise DecodeError("the mapped-ram stream has no RAM END section (an incomplete migration?): its pages "
                          "cannot be placed", parser.offset, "ram")


def bit_runs(bm: bytes, npages: int, run_max: int) -> Iterator[tuple[int, int, bool]]:
    """(first page, end page, present) runs of a little-endian bitmap, at most ``run_max`` long."""
    # bit i of the little-endian integer is page i: its binary digits reversed, page 0 first
    bits = bin(int.from_bytes(bm, "little"))[:1:-1].ljust(len(bm) * 8, "0")[:npages].ljust(npages, "0")
    for m in re.finditer(r"1+|0+", bits):
        a, e = m.span()
        present = bits[a] == "1"
        while a < e:
            b = min(e, a + run_max)
            yield a, b, present
            a = b


def _put_words(mv: memoryview, stride: int, words: range) -> None:
    """The big-endian 64-bit ``words`` at offsets 0, ``stride``, 2 * ``stride``... of ``mv``, leaving the
    bytes between them alone (one strided copy; ``stride`` a multiple of 8)."""
    if stride % 8 or len(mv) < len(words) * stride:
        raise InvalidOperation("record words do not fit their slots")
    a = array.array("Q", words)
    if sys.byteorder == "little":
        a.byteswap()
    with mv[:len(words) * stride].cast("Q") as q:
        q[::stride // 8] = memoryview(a)


def _read_slots(f: Any, slots: list[memoryview], at: int) -> int:
    """Fill ``slots`` with the bytes of ``f`` from offset ``at`` on; the bytes read (fewer only at the end
    of the file).  A plain file is read with ``preadv`` (IOV_MAX slots a call), anything else with seek and
    read."""
    if not isinstance(f, (io.BufferedReader, io.FileIO)):
        f.seek(at)
        done = 0
        for s in slots:
            data = f.read(len(s))
            s[:len(data)] = data
            done += len(data)
            if len(data) < len(s):
                break
        return done
    fd = f.fileno()
    done = 0
    for k in range(0, len(slots), 1024):
        part = slots[k:k + 1024]
        need = sum(map(len, part))
        got = os.preadv(fd, part, at + done)
        while 0 < got < need:  # a short read: go on from where it stopped
            rest: list[memoryview] = []
            skip = got
            for s in part:
                if skip >= len(s):
                    skip -= len(s)
                else:
                    rest.append(s[skip:])
                    skip = 0
            more = os.preadv(fd, rest, at + done + got)
            if not more:
                break
            got += more
        done += got
        if got < need:
            break
    return done


def _mapped_pages(inp: Input, blocks: list[_MappedBlock], ps: int,
                  stats: ConvertResult | None) -> Iterator[list[bytes | memoryview]]:
    """PAGE records for the set bits of every block's bitmap, ZERO records for the others, as lists
    of buffers for ``writev``; a list is valid only until the next one is asked for (its buffer is reused).

    The pages are read (``preadv``) into the slots between their heads in one buffer of about 1 MiB, then
    written with one ``write``: two copies, the second from the CPU's cache, and less CPU than one ``writev``
    of views of the page cache (``mmap``) between the 8-byte heads (measured on the 1.79 GB benchmark stream:
    two iovecs per page, misaligning every destination page, cost the kernel more than the copy they save)."""
    f = inp.file
    # 1 MiB runs: the buffer is still in the CPU's cache when it is written out (measured on the 1.79 GB
    # benchmark stream: 512 KiB-2 MiB alike, 4 MiB runs 1.5x slower)
    run_max = max(1, (1 << 20) // ps)
    cont_page = int(RamFlag.PAGE | RamFlag.CONTINUE)
    cont_zero = int(RamFlag.ZERO | RamFlag.CONTINUE)
    # the records of a run laid out in one reused buffer: heads packed, the pages read into their slots with one
    # preadv (one contiguous write per run, no per-page buffers); the named first record's page after them
    stride = ps + 8
    scratch = memoryview(bytearray(run_max * stride + ps))
    slots = [scratch[p:p + ps] for p in range(8, run_max * stride, stride)]
    first_page = scratch[run_max * stride:]
    for b in blocks:
        npages = b.used // ps
        base = b.header.pages_offset - inp.file_offset
        first = True
        pages = zeros = 0
        for i, j, present in bit_runs(b.bitmap, npages, run_max):
            vec: list[bytes | memoryview] = []
            k0 = i
            if first:  # the block's first record names it
                flag = RamFlag.PAGE if present else RamFlag.ZERO
                vec.append(ram_record_head(i * ps, flag, b.name))
                if not present:
                    vec.append(b"\x00")
                k0 = i + 1
                first = False
            if present:
                n = j - k0
                at = base + i * ps
                into = [first_page, *slots[:n]] if k0 > i else slots[:n]
                if k0 > i:
                    vec.append(first_page)
                if n:
                    _put_words(scratch[:n * stride], stride, range(k0 * ps | cont_page, j * ps, ps))
                    vec.append(scratch[:n * stride])
                got = _read_slots(f, into, at)
                if got < (j - i) * ps:
                    raise DecodeError(f"mapped-ram block {b.name!r}: the file ends inside page "
                                      f"0x{(i + got // ps) * ps:x}", at + got, f"ram/{b.name}")
                pages += j - i
            else:
                vec.append(struct.pack(">" + "QB" * (j - k0),
                                       *[x for a in range(k0 * ps | cont_zero, j * ps, ps) for x in (a, 0)]))
                zeros += j - i
            yield vec
        if stats is not None:
            stats.pages += pages
            stats.zero_pages += zeros


# --------------------------------------------------------------------------------------------
# sequential -> mapped-ram


_PAGE = int(RamFlag.PAGE)


class _MappedRam(RamImage):
    """RAM pages applied straight into the page regions of a mapped-ram file being written: the
    ``RamImage`` page logic (ZERO, PAGE, XBZRLE against the current content, COMPRESS_PAGE), with
    writes coalesced into runs and a per-block bitmap of the non-zero pages."""

    def __init__(self, fd: int, page_size: int) -> None:  # noqa: D107 - no temporary file here
        self.page_size = page_size
        self._fd = fd
        self._base: dict[str, int] = {}
        self._size: dict[str, int] = {}
        self._sent: dict[str, bytearray] = {}
        self._zero = bytes(page_size)
        self._run_block = ""
        self._run_addr = 0
        self._run: list[bytes] = []
        self.resolved = 0

    def close(self) -> None:
        self.flush()

    def add_region(self, name: str, used: int, pages_offset: int) -> None:
        self._base[name] = pages_offset
        self._size[name] = used
        self._sent[name] = bytearray((used // self.page_size + 63) // 64 * 8)

    def flush(self) -> None:
        if self._run:
            pwritev_all(self._fd, self._run, self._base[self._run_block] + self._run_addr)
            self._run = []

    def read(self, block: str, addr: int, length: int | None = None) -> bytes:
        self.flush()
        i = addr // self.page_size
        if not self._sent[block][i >> 3] >> (i & 7) & 1:
            return self._zero
        return super().read(block, addr, length)

    def write(self, block: str, addr: int, data: bytes) -> None:
        ps = self.page_size
        size = self._size.get(block)
        if size is None:
            raise DecodeError(f"page for RAM block {block!r}, which the stream's block list does not name "
                              "(or which has no mapped-ram region)")
        if addr + len(data) > size or addr % ps or len(data) != ps:
            raise DecodeError(f"page at 0x{addr:x} lies outside RAM block {block!r} ({size} bytes)")
        i = addr // ps
        bm = self._sent[block]
        if data == self._zero:
            if bm[i >> 3] >> (i & 7) & 1:  # an earlier copy is on disk: zero it (no stale data)
                bm[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                self.flush()
                os.pwrite(self._fd, data, self._base[block] + addr)
            return
        bm[i >> 3] |= 1 << (i & 7)
        run = self._run
        if run and (block != self._run_block or addr != self._run_addr + len(run) * ps or len(run) >= 1024):
            self.flush()
            run = self._run
        if not run:
            self._run_block, self._run_addr = block, addr
        run.append(data)

    def apply(self, ev: RamPage) -> None:
        if ev.kind in (RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE):
            self.resolved += 1
        super().apply(ev)

    def run(self, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
            stride: int, offset: int) -> None:
        """A run of page records from the parser's counting lane (``qevm.format.parser.RunSink``): the fast
        twin of ``apply`` for each of its ``RamPage`` events.  Data pages go out in one ``pwritev`` straight
        from the parser's buffer; zero pages over never-written pages cost nothing."""
        ps = self.page_size
        size = self._size.get(block)
        if count > 1 and size is not None and addr % ps == 0 and addr + count * ps <= size:
            i = addr // ps
            bm = self._sent[block]
            if kind == _PAGE:
                views = [view[p:p + ps] for p in range(pos, pos + count * stride, stride)]
                if self._zero not in views:  # a data page of zeros stays a hole: one at a time below
                    self.flush()
                    pwritev_all(self._fd, views, self._base[block] + addr)
                    set_bits(bm, i, count)
                    return
            elif not any_bits(bm, i, count):  # zero pages (fill 0) where nothing was written: holes
                return
        for k in range(count):
            p = pos + k * stride
            self.apply(RamPage(offset + k * stride, kind, addr + k * ps, block, bytes(view[p:p + length])))

    def bitmaps(self) -> dict[str, bytearray]:
        return self._sent


def write_mapped_ram(inp: Input, fd: int, stats: ConvertResult | None = None) -> int:
    """Write the plain stream ``inp`` as a mapped-ram file to ``fd`` (a regular file, empty, at
    offset 0); returns the file size.  Pages sent more than once end with their last copy; XBZRLE
    and compressed pages are applied; zero pages stay holes."""
    schema, page_size = _schema_and_page(inp)
    parser = Parser(schema=schema, page_size=page_size, count_pages=True, keep_raw=False,
                    file_offset=inp.file_offset)
    pos = 0
    ram: _MappedRam | None = None
    regions: dict[str, tuple[int, int]] = {}  # block -> (bitmap offset, pages offset)
    order: list[str] = []
    new_caps: list[str] = []
    in_ram = False
    pending: list[bytes] = []

    def put(b: bytes) -> None:
        nonlocal pos
        pending.append(b)
        pos += len(b)

    def flush() -> None:
        if pending:
            data = b"".join(pending)
            os.pwrite(fd, data, pos - len(data))
            pending.clear()

    page_kinds = (int(RamFlag.PAGE), int(RamFlag.PAGE | RamFlag.CONTINUE))

    def handle(ev: Event) -> None:
        nonlocal pos, ram, in_ram
        if type(ev) is RamPage:
            if ram is None:
                raise DecodeError("RAM page before the block list", ev.offset, "ram")
            if ev.flags in page_kinds:
                ram.write(ev.block, ev.addr, ev.payload)
            else:
                ram.apply(ev)
            return
        if isinstance(ev, Configuration):
            caps = ev.capabilities
            if "mapped-ram" in caps:
                raise UsageError(f"{inp.name} is already a mapped-ram stream")
            new_caps[:] = [*caps, "mapped-ram"]
            put(with_caps(ev, new_caps).encode())
            return
        if isinstance(ev, VmDescription):
            put(vmdesc_with_caps(ev, new_caps).encode())
            return
        if isinstance(ev, SectionHeader):
            in_ram = ev.section.handler == "ram"
            put(ev.encode())
            return
        if isinstance(ev, RamBlock):
            if ev.page_size is not None:
                raise UsageError("the stream was sent with postcopy and blocks of another page size; QEMU does not "
                                 "allow mapped-ram with postcopy")
            ps = parser.page_size or 4096
            if ram is None:
                ram = _MappedRam(fd, ps)
                parser.run_sink = ram.run  # every page record from now on (the fast twin of RamPage events)
            entry = RamBlock(ev.offset, ev.name, ev.used_length, None, ev.addr, None).encode()
            hdr = mapped_ram_header(pos + len(entry), ev.used_length, ps)
            bitmap_at, pages_at = hdr.bitmap_offset, hdr.pages_offset
            put(entry + hdr.encode())
            flush()
            pos = pages_at + ev.used_length
            if ev.name in regions:
                raise DecodeError(f"RAM block {ev.name!r} listed twice", ev.offset, "ram")
            regions[ev.name] = (bitmap_at, pages_at)
            order.append(ev.name)
            ram.add_region(ev.name, ev.used_length, pages_at)
            return
        if isinstance(ev, RamControl) and in_ram:
            if ev.flags == RamFlag.MULTIFD_FLUSH:
                return  # QEMU writes none with mapped-ram
            if ev.flags == RamFlag.HOOK:
                raise UsageError("the stream was sent over RDMA (RAM_SAVE_FLAG_HOOK): its pages are not in it")
        if type(ev) is RamTally:
            if ram is None:
                raise DecodeError("RAM page before the block list", ev.offset, "ram")
            return  # its pages went to ram.run
        if isinstance(ev, (MappedRamBitmap, MappedRamData)):
            raise DecodeError(f"unexpected {type(ev).__name__} in a plain stream", ev.offset)
        from qevm.format.events import CommandEvent

        if isinstance(ev, CommandEvent) and ev.cmd in (Command.POSTCOPY_ADVISE, Command.POSTCOPY_LISTEN,
                                                       Command.POSTCOPY_RUN, Command.PACKAGED):
            raise UsageError(f"the stream is a postcopy migration ({ev.name} at offset {ev.offset}); QEMU does "
                             "not allow mapped-ram with postcopy")
        put(ev.encode())
        if sum(map(len, pending)) > CHUNK:
            flush()

    drive(parser, inp, handle)  # a plain file through mmap windows: pages written from the page cache
    flush()
    if ram is not None:
        ram.flush()
        for name, bm in ram.bitmaps().items():
            os.pwrite(fd, bytes(bm), regions[name][0])
            if stats is not None:
                stats.zero_pages += (ram._size[name] // ram.page_size) - int.from_bytes(bm, "little").bit_count()
        if stats is not None:
            stats.resolved = ram.resolved
            stats.pages = sum(int.from_bytes(bm, "little").bit_count() for bm in ram.bitmaps().values())
    os.ftruncate(fd, pos)
    return pos


# --------------------------------------------------------------------------------------------
# VM clock (for qcow2 snapshot entries)


def vm_clock_of(data: bytes) -> int | None:
    """The guest clock QEMU stores in a snapshot entry (``vm_clock_nsec``), from the body of the
    stream's ``timer`` section: with the VM stopped the virtual clock is ``cpu_clock_offset``
    (QEMU's ``vmstate_timers``, system/cpu-timers.c: int64 cpu_ticks_offset, 8 unused bytes, int64
    cpu_clock_offset).  None when the body is too short."""
    if len(data) < 24:
        return None
    v = int.from_bytes(data[16:24], "big", signed=True)
    return max(0, v)


_TIMER_HEAD = re.compile(rb"\x04(....)\x05timer\x00\x00\x00\x00\x00\x00\x00\x02", re.DOTALL)


def find_vm_clock(f: Any, size: int, limit: int = 64 << 20) -> int | None:
    """The VM clock of a seekable plain stream without parsing its RAM: the ``timer`` device section
    (FULL, instance 0, version 2, 24-byte body) sits among the device sections after the RAM, near the
    end.  Scans backwards (at most ``limit`` bytes) for its header and accepts a match only when its
    footer (0x7E and the same section id) follows the body.  None when not found."""
    end = size
    lo = max(0, size - limit)
    overlap = 64
    try:
        while end > lo:
            start = max(lo, end - (4 << 20))
            f.seek(start)
            data = f.read(min(size, end + overlap) - start)
            for m in reversed(list(_TIMER_HEAD.finditer(data))):
                body = m.end()
                foot = data[body + 24:body + 29]
                if len(foot) == 5 and foot[0] == 0x7E and foot[1:] == m.group(1):
                    return vm_clock_of(data[body:body + 24])
            end = start
    finally:
        f.seek(0)
    return None


class _LoadvmCheck:
    """Chunks passed through unchanged while a counting parser checks that ``loadvm`` can read the
    stream (QEMU's loadvm sets up no XBZRLE cache and no decompression threads, and cannot run a
    postcopy) and picks up the VM clock from the ``timer`` section.  Raises ``UsageError`` at the
    first record loadvm cannot take."""

    def __init__(self, chunks: Iterable[bytes], schema: Schema | None, page_size: int | None,
                 inp: Input | None = None) -> None:
        self._chunks = chunks
        self._parser: Parser | None = Parser(schema=schema, page_size=page_size, count_pages=True, keep_raw=False)
        self.vm_clock: int | None = None
        # a seekable plain input (``_raw_chunks`` of it as ``chunks``): read straight into the parser's buffer
        # and hand out views of it, one copy fewer per byte
        self._inp = inp if inp is not None and inp.seekable and hasattr(inp.file, "readinto") else None

    def _look(self, ev: Event) -> None:
        from qevm.format.events import CommandEvent, DeviceState

        if isinstance(ev, RamTally):
            for block, (_, _, xbzrle, compressed) in ev.counts.items():
                if xbzrle or compressed:
                    kind = "XBZRLE" if xbzrle else "compressed (COMPRESS_PAGE)"
                    raise UsageError(f"the stream has {kind} pages (block {block!r}, near offset {ev.offset}), which "
                                     "QEMU's loadvm cannot decode; resolve them first: qevm convert IN tmp.mapped "
                                     "--to mapped-ram && qevm convert tmp.mapped plain.mig --to stream")
        elif isinstance(ev, CommandEvent) and ev.cmd in (Command.POSTCOPY_ADVISE, Command.POSTCOPY_LISTEN,
                                                         Command.POSTCOPY_RUN, Command.PACKAGED):
            raise UsageError(f"the stream is a postcopy migration ({ev.name} at offset {ev.offset}); loadvm "
                             "cannot replay it")
        elif isinstance(ev, DeviceState) and ev.section.idstr == "timer" and ev.section.instance_id == 0:
            self.vm_clock = vm_clock_of(ev.data)

    def _parse(self) -> None:
        p = self._parser
        if p is None:
            return
        try:
            while True:
                ev = p.next_event()
                if ev is NEED_DATA or ev is DONE:
                    break
                assert isinstance(ev, Event)
                self._look(ev)
        except DecodeError:
            self._parser = None  # QEMU will judge the rest; the copy goes on

    def __iter__(self) -> Iterator[bytes | memoryview]:
        if self._inp is not None:
            yield from self._direct(self._inp)
            return
        for c in self._chunks:
            if self._parser is not None:
                self._parser.feed(c)
                self._parse()
            yield c

    def _direct(self, inp: Input) -> Iterator[memoryview]:
        """Each chunk read into the parser's buffer, parsed there, then handed out as a view of it (valid
        until the next chunk is asked for)."""
        readinto = inp.file.readinto
        n = CHUNK * 4
        plain: memoryview | None = None
        while True:
            p = self._parser
            if p is None:  # the check gave up: the rest through a plain buffer
                plain = plain if plain is not None else memoryview(bytearray(n))
                k = readinto(plain) or 0
                if not k:
                    return
                yield plain[:k]
                continue
            with p.get_buffer(n) as free, free[:n] as into:
                k = readinto(into) or 0
            if not k:
                return
            p.buffer_updated(k)
            self._parse()
            chunk = p.last_fed(k)
            try:
                yield chunk
            finally:
                chunk.release()


class _CopyingCheck:
    """A plain stream file going into a qcow2 image (``qcow2write.VmStateCopier``): the kernel copies
    it (``copy_file_range``, as ``cp`` does: no pass through this process) in a thread while this one
    reads it for the ``_LoadvmCheck``; the copy is flushed to disk as it goes.  A refusal of the check
    stops the copy."""

    def __init__(self, check: _LoadvmCheck, inp: Input) -> None:
        self.check = check
        self.inp = inp

    @staticmethod
    def usable(inp: Input) -> bool:
        return (inp.seekable and inp.compression is None and inp.file_offset == 0
                and isinstance(inp.file, io.FileIO) and hasattr(os, "copy_file_range"))

    def copy_to(self, fd: int, offset: int) -> int:
        import threading

        src = self.inp.file.fileno()
        size = os.fstat(src).st_size
        stop = threading.Event()
        failed: list[BaseException] = []

        def copy() -> None:
            try:
                _copy_range(src, fd, offset, size, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failed.append(e)

        t = threading.Thread(target=copy, name="qevm-convert-copy", daemon=True)
        t.start()
        try:
            for _ in self.check._direct(self.inp):
                if self.check._parser is None:
                    break  # the check gave up (QEMU will judge); the copy goes on
        except BaseException:
            stop.set()
            raise
        finally:
            t.join()
        if failed:
            raise failed[0]
        return size


def _copy_range(src: int, dst: int, at: int, size: int, stop: Any) -> None:
    """Bytes [0, size) of ``src`` to ``dst`` at ``at``: ``copy_file_range`` (pread/pwrite where the
    kernel cannot), in steps that each start their writeback."""
    from qevm.io.qcow2write import WRITEBACK_STEP, start_writeback

    done = 0
    kernel = True
    buf = memoryview(b"")
    while done < size and not stop.is_set():
        n = min(WRITEBACK_STEP, size - done)
        k = 0
        if kernel:
            try:
                k = os.copy_file_range(src, dst, n, done, at + done)
            except OSError:  # e.g. EXDEV before Linux 5.3: through a buffer of our own
                kernel = False
                buf = memoryview(bytearray(CHUNK * 4))
        if not kernel:
            k = os.preadv(src, [buf[:min(n, len(buf))]], done)
            w = 0
            while w < k:
                w += os.pwrite(dst, buf[w:k], at + done + w)
        if k == 0:
            raise DecodeError(f"the input ended at {done} bytes, before its size of {size} (was it changed?)", done)
        start_writeback(dst, at + done, k)
        done += k


# --------------------------------------------------------------------------------------------
# the verb


def convert(src: str, out: str, *, to: str | None = None, compress: str | None = None,
            snapshot: str | None = None, name: str | None = None, size: int | None = None,
            replace: bool = False, vm_clock_ns: int | None = None,
            progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Convert ``src`` (a stream, compressed stream, mapped-ram file, qcow2 image with ``snapshot``,
    libvirt save image; ``-`` = stdin) into ``out`` as ``to`` (guessed from ``out``'s name when
    None)."""
    guessed, gcomp = guess_format(out)
    if to is None:
        to = guessed
        if to is None:
            raise UsageError(f"cannot tell the output format from the name {out!r}; give --to "
                             f"{'|'.join(FORMATS)}")
    if to not in FORMATS:
        raise UsageError(f"unknown output format {to!r} (choose from {', '.join(FORMATS)})")
    if guessed is not None and guessed != to and not (guessed == "stream" and to == "mapped-ram"
                                                      and gcomp is None):
        raise UsageError(f"--to {to} but {out!r} is named like a {gcomp or guessed} file")
    if compress is None and to == "stream":
        compress = gcomp
    if compress is not None:
        if compress not in COMPRESSIONS:
            raise UsageError(f"unknown compression {compress!r} (choose from {', '.join(COMPRESSIONS)})")
        if to != "stream":
            raise UsageError(f"--compress is for stream outputs; a {to} output cannot be compressed")
    if to != "qcow2" and (name is not None or size is not None or replace):
        raise UsageError("--name, --size and --replace are for --to qcow2")
    if to == "qcow2" and not name:
        raise UsageError("--to qcow2 needs --name NAME for the new snapshot")
    if out != "-" and src != "-" and os.path.exists(out) and os.path.samefile(src, out):
        raise UsageError("IN and OUT are the same file; IN is never modified")

    inp = open_input(src, snapshot)
    try:
        kind = "stream"
        if inp.compression:
            kind = f"{inp.compression}-compressed stream"
        if inp.name != src and "@" in inp.name:
            kind = f"qcow2 snapshot {inp.name.rsplit('@', 1)[1]}"
        head = stream_info(inp)
        if head.mapped_ram:
            kind = "mapped-ram"
        res = ConvertResult(out, to, kind, compression=compress)
        if to == "stream":
            chunks: Iterable[Chunk] = sequential_chunks(inp, res) if head.mapped_ram else _raw_chunks(inp, head.head)
            with atomic_output(out) as f:
                if compress:
                    z = compressing(compress, f)
                    res.size = _write_chunks(chunks, z)
                    z.close()
                else:
                    f.flush()
                    res.size = _write_chunks(chunks, f, f.fileno())
            return res
        if to == "mapped-ram":
            if out == "-":
                raise UsageError("a mapped-ram file is written at fixed offsets: give a file name, not -")
            if head.mapped_ram:
                raise UsageError(f"{src} is already a mapped-ram stream")
            if not inp.seekable:
                inp = _Replayed(inp, head.head)
            with atomic_output(out) as f:
                res.size = write_mapped_ram(inp, f.fileno(), res)
            return res
        # qcow2
        from qevm.io.qcow2write import add_snapshot, create_image

        if out == "-":
            raise UsageError("a qcow2 output must be a file")
        schema, page_size = _schema_and_page(inp)
        base: Iterable[bytes] = _flat(sequential_chunks(inp)) if head.mapped_ram else _raw_chunks(inp, head.head)
        if vm_clock_ns is None and inp.seekable and inp.size:
            vm_clock_ns = find_vm_clock(inp.file, inp.size)
        tap = _LoadvmCheck(base, schema, page_size, None if head.mapped_ram else inp)
        stream: Iterable[bytes | memoryview] | _CopyingCheck = tap
        if not head.mapped_ram and tap._inp is not None and _CopyingCheck.usable(inp):
            stream = _CopyingCheck(tap, inp)
        target = out
        if not os.path.exists(out):
            if size is None:
                raise UsageError(f"{out} does not exist: give --size to create a new image")
            # a new image is built under a temporary name and renamed once it holds the snapshot
            fd, target = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".part",
                                          dir=os.path.dirname(os.path.abspath(out)))
            os.close(fd)
            create_image(target, size)
        elif size is not None:
            raise UsageError(f"{out} exists; --size is only for a new image")

        def clock() -> int:
            if vm_clock_ns is not None:
                return vm_clock_ns
            return tap.vm_clock if tap.vm_clock is not None else 0

        try:
            snap = add_snapshot(target, name or "", stream, vm_clock_ns=clock, replace=replace)
            if target != out:
                os.replace(target, out)
        finally:
            if target != out and os.path.exists(target):
                os.unlink(target)
        res.size = snap.vm_state_size
        res.snapshot = snap.as_dict()
        if vm_clock_ns is None and tap.vm_clock is None:
            res.notes.append("no timer section found: VM clock stored as 0")
        return res
    finally:
        inp.close()


class _Replayed(Input):
    """A non-seekable input whose first bytes (already read) are given back first."""

    def __init__(self, inp: Input, head: bytes) -> None:
        from qevm.io.sources import _Prefixed

        super().__init__(inp.name, _Prefixed(head, inp.file, owns=True), False, inp.compression, inp.size,
                         inp.file_offset)
        self._inner = inp

    def close(self) -> None:
        self._inner.close()
