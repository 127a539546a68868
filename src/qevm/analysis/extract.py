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
import tempfile
import zlib
from collections.abc import Callable
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
    RamPage,
)
from qevm.format.parser import Parser
from qevm.format.xbzrle import apply_delta
from qevm.io.reader import Analysis, drive, trailer_schema
from qevm.io.sources import CHUNK, Input, open_input

__all__ = ["BlockFile", "ExtractResult", "extract", "safe_names", "BlockSink", "RamFiles"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
_FLUSH = 1 << 20


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

    __slots__ = ("fd", "size", "page_size", "dirty", "_buf", "_buf_at", "base", "counts")

    def __init__(self, fd: int, size: int, page_size: int, base: int = 0) -> None:
        self.fd = fd
        self.size = size
        self.page_size = page_size
        self.base = base  # where the block starts in the file
        self.dirty = bytearray((size // page_size + 8) // 8)
        self._buf = bytearray()
        self._buf_at = -1
        self.counts = {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0}

    def flush(self) -> None:
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

    def apply(self, ev: RamPage) -> None:
        ps = self.page_size
        addr = ev.addr
        if addr % ps or addr + ps > self.size:
            raise DecodeError(f"page at 0x{addr:x} lies outside RAM block {ev.block!r} "
                              f"(0x{self.size:x} bytes)", ev.offset)
        kind = ev.flags & ~RamFlag.CONTINUE
        if kind == RamFlag.PAGE:
            self.counts["normal"] += 1
            buf = self._buf
            if self._buf_at >= 0 and self._buf_at + len(buf) == addr and len(buf) < _FLUSH:
                buf += ev.payload
                i = addr // ps
                self.dirty[i >> 3] |= 1 << (i & 7)
            else:
                self.put(addr, ev.payload)
        elif kind == RamFlag.ZERO:
            self.counts["zero"] += 1
            self.zero(addr, ev.payload[0])
        elif kind == RamFlag.XBZRLE:
            self.counts["xbzrle"] += 1
            page = bytearray(self.get(addr))
            apply_delta(page, ev.payload[3:], ev.offset)
            self.put(addr, page)
        elif kind == RamFlag.COMPRESS_PAGE:
            self.counts["compressed"] += 1
            try:
                data = zlib.decompress(ev.payload[4:])
            except zlib.error as e:
                raise DecodeError(f"compressed page does not inflate: {e}", ev.offset) from None
            if len(data) != ps:
                raise DecodeError(f"compressed page inflates to {len(data)} bytes, not {ps}", ev.offset)
            self.put(addr, data)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view = view[n:]
        at += n


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

    def chain(self, other: Callable[[Event], None]) -> Callable[[Event], None]:
        """A handler giving RAM pages to this object only (the hot path) and every other event to both
        ``other`` and this object.  Page counts are then in each sink's ``counts``."""
        sinks = self.sinks

        def handle(ev: Event) -> None:
            if type(ev) is RamPage:
                page = ev
                sink = sinks.get(page.block)
                if sink is not None:
                    sink.apply(page)
                elif page.block not in sinks:
                    raise DecodeError(f"page for RAM block {page.block!r}, which the stream never announced",
                                      page.offset)
                return
            other(ev)
            self.handle(ev)
        return handle

    def handle(self, ev: Event) -> None:
        t = type(ev)
        if t is RamPage:
            assert isinstance(ev, RamPage)
            sink = self.sinks.get(ev.block)
            if sink is not None:
                sink.apply(ev)
            elif ev.block not in self.sinks:
                raise DecodeError(f"page for RAM block {ev.block!r}, which the stream never announced", ev.offset)
        elif t is RamBlock:
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
            f = self.inp.file
            here = f.tell()
            f.seek(at)
            left, pos = n, addr
            while left:
                chunk = f.read(min(left, CHUNK))
                if not chunk:
                    raise DecodeError("input ended inside a mapped-ram region", at + n - left)
                sink.put(pos, chunk)
                left -= len(chunk)
                pos += len(chunk)
            f.seek(here)


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
        parser = Parser(schema=schema, page_size=page_size, count_pages=False, keep_raw=False,
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
            sink = rf.sinks[name]
            bf.pages = dict(an.blocks[name].pages) if rf.mapped.get(name) or sink is None else dict(sink.counts)
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
