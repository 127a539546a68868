"""Guest RAM out of a stream: one sparse file per RAMBlock (``qevm extract``).

Pages are written at their offsets as the stream delivers them (``pwrite``), so a page sent
several times ends with its last copy and an XBZRLE delta applies to what the file holds at that
moment.  Zero pages and pages never sent stay holes.  Memory stays bounded: per block only a
bitmap of the pages that may hold data (1 bit per page) and one coalescing write buffer.

Output names come from block names made safe (no separators, no leading dot, bounded length,
collisions numbered), and every file is written under a temporary directory inside the output's
parent and moved into place only when the whole stream was read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qevm.errors import DecodeError, UsageError
from qevm.format.events import (
    Configuration,
    Event,
    MappedRamBitmap,
    MappedRamData,
    RamBlock,
    RamFlag,
)
from qevm.format.pagebits import any_bits, set_bits
from qevm.format.parser import Parser
from qevm.format.xbzrle import apply_delta
from qevm.io.base import IOV_MAX, pwritev_all
from qevm.io.mapped import drive
from qevm.io.reader import Analysis, trailer_schema
from qevm.io.sources import CHUNK, Input, open_input

__all__ = ["BlockFile", "ExtractResult", "extract", "safe_names", "BlockSink", "RamFiles", "ram_records",
           "read_region", "output_directory", "discard"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
_FLUSH = 1 << 20
_B64 = struct.Struct(">Q").unpack_from
_CONT = int(RamFlag.CONTINUE)
_PAGE, _ZERO, _XBZRLE, _COMPRESS = int(RamFlag.PAGE), int(RamFlag.ZERO), int(RamFlag.XBZRLE), int(RamFlag.COMPRESS_PAGE)


def safe_names(names: list[str], suffix: str = ".ram", reserved: tuple[str, ...] = ("blocks.json",)) -> dict[str, str]:
    """A file name per block name that cannot leave the directory (no ``/``, no ``..``, no leading dot,
    at most 120 characters) and that no other block gets (compared case-insensitively)."""
    taken = {r.lower() for r in reserved}
    out: dict[str, str] = {}
    for name in names:
        base = _UNSAFE.sub("_", name).lstrip(".")[:120] or "block"
        cand, n = base + suffix, 1
        while cand.lower() in taken:
            n += 1
            cand = f"{base}-{n}{suffix}"
        taken.add(cand.lower())
        out[name] = cand
    return out


@dataclass
class BlockFile:
    name: str
    size: int
    file: str
    pages: dict[str, int] = field(default_factory=lambda: {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0})
    guest_physical: list[dict[str, int]] | None = None

    def as_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "size": self.size, "file": self.file, "pages": self.pages}
        if self.guest_physical is not None:
            d["guest_physical"] = [{"addr": r["addr"], "offset": r["offset"], "size": r["size"]}
                                   for r in self.guest_physical]
        return d


class BlockSink:
    """One block's bytes in a file: pages written in place, zero pages left (or made) holes.

    ``dirty`` has one bit per page that may hold non-zero bytes: a zero page over such a page is
    written as zeros, over any other page it costs nothing."""

    __slots__ = ("fd", "size", "page_size", "dirty", "_buf", "_buf_at", "base", "counts", "_views", "_views_at",
                 "_views_end")

    def __init__(self, fd: int, size: int, page_size: int, base: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.page_size = page_size
        self.base = base  # where the block starts in the file
        self.dirty = bytearray((size // page_size + 8) // 8)
        self._buf = bytearray()
        self._buf_at = -1
        self.counts = {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0}
        self._views: list[memoryview] = []
        self._views_at = self._views_end = -1

    def put_view(self, addr: int, view: memoryview) -> None:
        """Queue a page given as a view into a buffer that stays valid until ``flush_views()``; runs of
        contiguous pages go out in one ``pwritev``."""
        if self._views_end != addr or len(self._views) >= IOV_MAX:
            self.flush_views()
            if self._buf:
                self.flush()
            self._views_at = addr
        self._views.append(view)
        self._views_end = addr + len(view)
        i = addr // self.page_size
        self.dirty[i >> 3] |= 1 << (i & 7)

    def put_run(self, addr: int, views: list[memoryview]) -> None:
        """Write pages at consecutive addresses from ``addr`` now (views into a buffer valid only during
        the call), ``IOV_MAX`` pages per ``pwritev``."""
        if self._views or self._buf:
            self.flush()
        pwritev_all(self.fd, views, self.base + addr)
        set_bits(self.dirty, addr // self.page_size, len(views))

    def zero_run(self, addr: int, n: int) -> None:
        """``n`` zero pages (fill byte 0) from ``addr``: holes cost nothing, pages written before get zeros."""
        i = addr // self.page_size
        if any_bits(self.dirty, i, n):
            for k in range(n):
                self.zero(addr + k * self.page_size, 0)

    def flush_views(self) -> None:
        views = self._views
        if views:
            pwritev_all(self.fd, views, self.base + self._views_at)
            self._views = []
        self._views_at = self._views_end = -1

    def flush(self) -> None:
        self.flush_views()
        if self._buf:
            _pwrite_all(self.fd, self._buf, self.base + self._buf_at)
            self._buf = bytearray()
        self._buf_at = -1

    def _mark(self, addr: int, on: bool) -> None:
        i = addr // self.page_size
        if on:
            self.dirty[i >> 3] |= 1 << (i & 7)
        else:
            self.dirty[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def _is_dirty(self, addr: int) -> bool:
        i = addr // self.page_size
        return bool(self.dirty[i >> 3] >> (i & 7) & 1)

    def put(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if self._views:
            self.flush_views()
        if self._buf_at >= 0 and self._buf_at + len(self._buf) == addr and len(self._buf) < _FLUSH:
            self._buf += data
        else:
            self.flush()
            self._buf_at = addr
            self._buf = bytearray(data)
        ps = self.page_size
        for a in range(addr - addr % ps, addr + len(data), ps):
            self._mark(a, True)

    def zero(self, addr: int, fill: int) -> None:
        if fill:
            self.put(addr, bytes((fill,)) * self.page_size)
        elif self._is_dirty(addr):
            self.flush()
            _pwrite_all(self.fd, bytes(self.page_size), self.base + addr)
            self._mark(addr, False)

    def get(self, addr: int) -> bytes:
        self.flush()
        data = os.pread(self.fd, self.page_size, self.base + addr) if self._is_dirty(addr) else b""
        return data + bytes(self.page_size - len(data))

    def xbzrle(self, addr: int, delta: bytes | memoryview, offset: int) -> None:
        page = bytearray(self.get(addr))
        apply_delta(page, bytes(delta), offset)
        self.put(addr, page)

    def inflate(self, addr: int, data: bytes | memoryview, offset: int) -> None:
        try:
            page = zlib.decompress(data)
        except zlib.error as e:
            raise DecodeError(f"compressed page does not inflate: {e}", offset) from None
        if len(page) != self.page_size:
            raise DecodeError(f"compressed page inflates to {len(page)} bytes, not {self.page_size}", offset)
        self.put(addr, page)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view = view[n:]
        at += n


def ram_records(raw: memoryview, page: int, block: str | None) -> Iterator[tuple[int, int, int, str | None, int, int]]:
    """The records of a run of RAM page records the parser already checked (a ``RamTally``'s bytes):
    (start, flags, addr, block, payload start, end) each; ``block`` is the block CONTINUE records refer to
    when the run starts."""
    n = len(raw)
    mask = page - 1
    pos = 0
    while pos < n:
        w = _B64(raw, pos)[0]
        flags = w & mask
        p = pos + 8
        if not flags & _CONT:
            ln = raw[p]
            block = str(raw[p + 1:p + 1 + ln], "latin-1")
            p += 1 + ln
        kind = flags & ~_CONT
        if kind == _PAGE:
            end = p + page
        elif kind == _ZERO:
            end = p + 1
        elif kind == _XBZRLE:
            end = p + 3 + int.from_bytes(raw[p + 1:p + 3], "big")
        else:
            end = p + 4 + int.from_bytes(raw[p:p + 4], "big")
        yield pos, flags, w - flags, block, p, end
        pos = end


class RamFiles:
    """Event consumer that writes every RAM block's content through a ``BlockSink``.

    ``open_block(name, size)`` gives the sink for a block (None: the block is not wanted).
    Mapped-ram streams carry a bitmap and the pages at fixed file offsets: pages whose bit is set
    are copied from ``inp`` (read back when the reader seeked over them)."""

    def __init__(self, open_block: Callable[[str, int, int], BlockSink | None], inp: Input,
                 page_size: Callable[[], int]) -> None:
        self.open_block = open_block
        self.inp = inp
        self.page_size = page_size
        self.sinks: dict[str, BlockSink | None] = {}
        self.mapped: dict[str, tuple[int, int, int, bytes]] = {}  # block -> (pages start, page size, used, bitmap)

    def attach(self, parser: Parser) -> None:
        """Take every page record from ``parser``'s run sink (its counting lane, ``count_pages=True``): the
        only way pages reach this object (``handle`` takes the other events)."""
        parser.run_sink = self.run

    def run(self, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
            stride: int, offset: int) -> None:
        """A run of page records (``qevm.format.parser.RunSink``): data pages go out in one ``pwritev`` straight
        from the parser's buffer, zero pages stay holes."""
        sink = self.sinks.get(block)
        if sink is None:
            if block not in self.sinks:
                raise DecodeError(f"page for RAM block {block!r}, which the stream never announced", offset)
            return
        ps = sink.page_size
        if addr % ps or addr + count * ps > sink.size:
            raise DecodeError(f"page at 0x{addr:x} lies outside RAM block {block!r} (0x{sink.size:x} bytes)", offset)
        if kind == _PAGE:
            sink.counts["normal"] += count
            sink.put_run(addr, [view[p:p + ps] for p in range(pos, pos + count * stride, stride)] if count > 1
                         else [view[pos:pos + ps]])
        elif kind == _ZERO:
            sink.counts["zero"] += count
            if count == 1:
                sink.zero(addr, view[pos])
            else:
                sink.zero_run(addr, count)
        elif kind == _XBZRLE:
            sink.counts["xbzrle"] += 1
            sink.xbzrle(addr, view[pos + 3:pos + length], offset)
        else:
            sink.counts["compressed"] += 1
            sink.inflate(addr, view[pos + 4:pos + length], offset)

    def chain(self, other: Callable[[Event], None]) -> Callable[[Event], None]:
        """A handler giving every event to both ``other`` and this object (the pages come to ``run``, see
        ``attach``).  Page counts are then in each sink's ``counts``."""

        def handle(ev: Event) -> None:
            other(ev)
            self.handle(ev)
        return handle

    def handle(self, ev: Event) -> None:
        t = type(ev)
        if t is RamBlock:
            assert isinstance(ev, RamBlock)
            if ev.name in self.sinks:
                sink = self.sinks[ev.name]
                if sink is not None and sink.size != ev.used_length:
                    raise DecodeError(f"RAM block {ev.name!r} announced again with a different size", ev.offset)
                return
            ps = ev.mapped.page_size if ev.mapped is not None and ev.mapped.page_size else self.page_size()
            self.sinks[ev.name] = self.open_block(ev.name, ev.used_length, ps)
            if ev.mapped is not None and ev.mapped.pages_offset:
                start = ev.mapped.pages_offset - self.inp.file_offset
                self.mapped[ev.name] = (start, ps, ev.used_length, b"")
        elif t is MappedRamBitmap:
            assert isinstance(ev, MappedRamBitmap)
            start, ps, used, _ = self.mapped[ev.block]
            self.mapped[ev.block] = (start, ps, used, ev.data)
        elif t is MappedRamData:
            assert isinstance(ev, MappedRamData)
            self._mapped(ev)

    def _mapped(self, ev: MappedRamData) -> None:
        m = self.mapped.get(ev.block)
        sink = self.sinks.get(ev.block)
        if m is None or sink is None:
            return
        start, ps, used, bitmap = m
        if not bitmap:
            return
        lo = max(ev.offset, start)
        hi = min(ev.offset + ev.length, start + used)
        if lo >= hi:
            return
        first = (lo - start) // ps
        last = (hi - start + ps - 1) // ps
        i = first
        while i < last:  # runs of pages whose bit is set
            if not bitmap[i >> 3] >> (i & 7) & 1:
                i += 1
                continue
            j = i + 1
            while j < last and bitmap[j >> 3] >> (j & 7) & 1:
                j += 1
            a, b = max(start + i * ps, lo), min(start + j * ps, hi)
            self._copy_mapped(ev, sink, a, b - a, a - start)
            i = j

    def _copy_mapped(self, ev: MappedRamData, sink: BlockSink, at: int, n: int, addr: int) -> None:
        if ev.data is not None:
            rel = at - ev.offset
            data: bytes | memoryview = memoryview(ev.data)[rel:rel + n]
            sink.put(addr, data)
        else:
            pos = addr
            for chunk in read_region(self.inp, at, n):
                sink.put(pos, chunk)
                pos += len(chunk)


def read_region(inp: Input, at: int, n: int) -> Iterator[bytes]:
    """``n`` bytes of a seekable input from stream offset ``at`` (a mapped-ram region the reader seeked
    over), in chunks; the input's position is left where it was."""
    f = inp.file
    here = f.tell()
    try:
        f.seek(at)
        left = n
        while left:
            chunk = f.read(min(left, CHUNK))
            if not chunk:
                raise DecodeError("input ended inside a mapped-ram region", at + n - left)
            yield chunk
            left -= len(chunk)
    finally:
        f.seek(here)


def discard(path: str) -> None:
    """Remove a temporary output left by a failed write (nothing under the final name is touched)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def output_directory(out_path: str) -> str:
    """The directory a single output file goes to (its temporary name is made there), checked."""
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        why = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise UsageError(f"output directory {directory} {why}")
    if os.path.isdir(out_path):
        raise UsageError(f"{out_path} is a directory")
    return directory


@dataclass
class ExtractResult:
    directory: str
    machine: str | None
    blocks: list[BlockFile]
    stream_size: int


def _open_out(directory: str) -> tuple[str, str | None]:
    """(work directory, final directory to rename it to or None when files move one by one)."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist")
    try:
        if os.path.isdir(directory):
            return tempfile.mkdtemp(prefix=".qevm-extract-", dir=directory), None
        return tempfile.mkdtemp(prefix=".qevm-extract-", dir=parent), directory
    except OSError as e:
        raise UsageError(f"cannot write in {directory}: {e.strerror}") from None


def extract(source: str | Input, directory: str, *, block: str | None = None, snapshot: str | None = None,
            page_size: int | None = None) -> ExtractResult:
    """Write each RAM block of ``source`` to a sparse file in ``directory`` plus ``blocks.json``."""
    from qevm.analysis.guestmap import GuestMap, MapError

    inp = open_input(source, snapshot) if isinstance(source, str) else source
    work, final = _open_out(directory)
    fds: dict[str, int] = {}
    files: dict[str, BlockFile] = {}
    done = False
    try:
        schema, trailer_page = trailer_schema(inp)
        page_size = page_size or trailer_page
        parser = Parser(schema=schema, page_size=page_size, count_pages=True, keep_raw=False,
                        file_offset=inp.file_offset)
        an = Analysis(schema=schema, page_size=lambda: parser.page_size or 4096)
        names: list[str] = []

        def open_block(name: str, size: int, ps: int) -> BlockSink | None:
            if block is not None and name != block:
                return None
            names.append(name)
            fname = safe_names(names)[name]
            fd = os.open(fname, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                         dir_fd=dfd)
            fds[name] = fd
            os.ftruncate(fd, size)
            files[name] = BlockFile(name, size, fname)
            return BlockSink(fd, size, ps)

        dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
        try:
            rf = RamFiles(open_block, inp, lambda: parser.page_size or 4096)
            rf.attach(parser)

            drive(parser, inp, rf.chain(an.handle), skip_regions=inp.seekable)
            an.size = parser.offset
            an.stream_page_size = parser.page_size
            for sink in rf.sinks.values():
                if sink is not None:
                    sink.flush()
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        if not an.blocks:
            raise UsageError(f"{inp.name}: the stream carries no RAM (no RAM block announced)")
        if block is not None and block not in files:
            raise UsageError(f"no RAM block {block!r} in the stream (it has: {', '.join(an.blocks)})")
        try:
            an.decode_devices(strict=False)
            gmap: GuestMap | None = GuestMap.from_analysis(an)
        except (MapError, DecodeError):
            gmap = None
        for name, bf in files.items():
            bf.pages = dict(an.blocks[name].pages)
            if gmap is not None:
                bf.guest_physical = gmap.placement(name)
        machine = an.configuration.machine if isinstance(an.configuration, Configuration) else None
        doc = {"machine": machine, "page_size": an.page_size or 4096,
               "blocks": [bf.as_json() for bf in files.values()]}
        with open(os.path.join(work, "blocks.json"), "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        if final is not None:
            os.rename(work, final)
        else:
            for fn in [*(bf.file for bf in files.values()), "blocks.json"]:
                os.replace(os.path.join(work, fn), os.path.join(directory, fn))
            os.rmdir(work)
        done = True
        return ExtractResult(directory, machine, list(files.values()), an.size)
    except OSError as e:
        raise UsageError(f"cannot write {directory}: {e.strerror}") from None
    finally:
        if not done:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(source, str):
            inp.close()
