"""A stream with the guest's memory removed (``qevm redact``), for shipping a broken snapshot.

Every RAM page record becomes a ZERO record (or, with ``fill``, a page of that byte: QEMU 9.0 and
later refuse zero records with a non-zero fill byte), whatever its kind (normal, XBZRLE, compressed);
mapped-ram page regions become holes (or the fill byte).  Everything else — device sections, RAM
block list, commands, vmdesc — is written back byte for byte.  Pages of ``keep_blocks`` and pages
inside ``keep_ranges`` (guest-physical, placed with ``qevm.analysis.guestmap``) stay as they are.
The output goes to a temporary name next to the target and is renamed when complete.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from qevm.analysis.extract import discard, output_directory, ram_records, read_region
from qevm.analysis.guestmap import GuestMap
from qevm.codec.wire import be64
from qevm.errors import UsageError
from qevm.format.events import Event, MappedRamData, RamBlock, RamFlag, RamTally
from qevm.format.parser import Parser
from qevm.io.mapped import drive
from qevm.io.reader import read_stream, trailer_schema
from qevm.io.sources import CHUNK, Input, open_input

__all__ = ["RedactResult", "redact", "parse_range"]




@dataclass
class RedactResult:
    size_before: int = 0
    size_after: int = 0
    pages_removed: int = 0
    pages_kept: int = 0
    mapped_bytes_removed: int = 0
    kept_blocks: list[str] = field(default_factory=list)
    kept_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # block -> [(offset, end)]


def parse_range(text: str) -> tuple[int, int]:
    """``START-END`` (END exclusive) or ``START+SIZE``, numbers in hex (0x...) or decimal."""
    try:
        if "+" in text:
            a, b = text.split("+", 1)
            start = int(a, 0)
            return start, start + int(b, 0)
        a, b = text.split("-", 1)
        start, end = int(a, 0), int(b, 0)
    except ValueError:
        raise UsageError(f"--keep-range {text!r}: expected START-END or START+SIZE (hex with 0x)") from None
    if end <= start:
        raise UsageError(f"--keep-range {text!r}: empty range")
    return start, end


class _Redactor:
    def __init__(self, out: IO[bytes], inp: Input, fill: int | None, keep_blocks: set[str],
                 keep: dict[str, list[tuple[int, int]]], page_size: Callable[[], int]) -> None:
        self.out = out
        self.inp = inp
        self.fill = fill
        self.keep_blocks = keep_blocks
        self.keep = keep
        self.page_size = page_size
        self.result = RedactResult()
        self._pattern = b""
        self._block: str | None = None

    def _kept(self, block: str, addr: int) -> bool:
        if block in self.keep_blocks:
            return True
        return any(a <= addr < b for a, b in self.keep.get(block, ()))

    def tally(self, ev: RamTally) -> None:
        """A run of page records (the parser counts pages: every page record comes in one; borrowed bytes)."""
        assert ev.raw is not None
        raw = memoryview(ev.raw)
        ps = self.page_size()
        out = bytearray()
        fill = self.fill
        if fill and len(self._pattern) != ps:
            self._pattern = bytes((fill,)) * ps
        kind_bits = RamFlag.PAGE if fill else RamFlag.ZERO
        tail = self._pattern if fill else b"\x00"
        keep = self.keep_blocks or self.keep
        block = self._block
        for start, flags, addr, name, p, end in ram_records(raw, ps, self._block):
            block = name
            if keep and block is not None and self._kept(block, addr):
                self.result.pages_kept += 1
                out += raw[start:end]
                continue
            self.result.pages_removed += 1
            cont = flags & RamFlag.CONTINUE
            out += be64(addr | kind_bits | cont)
            if not cont:
                out += raw[start + 8:p]  # the block name as it was
            out += tail
        self._block = block
        self.out.write(out)

    def handle(self, ev: Event) -> None:
        t = type(ev)
        if t is RamTally:
            assert isinstance(ev, RamTally)
            self.tally(ev)
            return
        if t is MappedRamData:
            assert isinstance(ev, MappedRamData)
            self._mapped(ev)
        elif t is RamBlock:
            assert isinstance(ev, RamBlock)
            if ev.mapped is not None and self.inp.file_offset:
                raise UsageError("a mapped-ram stream inside a container: its page offsets refer to the container "
                                 "file; extract the stream first")
            self.out.write(ev.encode())
        else:
            self.out.write(ev.encode())

    def _mapped(self, ev: MappedRamData) -> None:
        if ev.block in self.keep_blocks or self.keep.get(ev.block):
            self._copy(ev)
            return
        self.result.mapped_bytes_removed += ev.length
        if self.fill:
            left = ev.length
            chunk = bytes((self.fill,)) * min(left, CHUNK)
            while left:
                n = min(left, CHUNK)
                self.out.write(chunk[:n])
                left -= n
        else:
            self.out.seek(ev.length, os.SEEK_CUR)

    def _copy(self, ev: MappedRamData) -> None:
        if self.keep.get(ev.block) and ev.block not in self.keep_blocks:
            raise UsageError("--keep-range is not supported for mapped-ram streams (use --keep BLOCK)")
        if ev.data is not None:
            self.out.write(ev.data)
            return
        for chunk in read_region(self.inp, ev.offset, ev.length):
            self.out.write(chunk)


def _keep_offsets(source: str, snapshot: str | None, ranges: list[tuple[int, int]],
                  overrides: dict[str, int] | None) -> dict[str, list[tuple[int, int]]]:
    """Guest-physical ranges as (block, offset range) pairs, from a first read of the stream."""
    with open_input(source, snapshot) as inp:
        an = read_stream(inp, strict=False)
    gmap = GuestMap.from_analysis(an, overrides)
    out: dict[str, list[tuple[int, int]]] = {}
    for start, end in ranges:
        hit = False
        for r in gmap.ranges:
            lo, hi = max(start, r.addr), min(end, r.addr + r.size)
            if lo < hi:
                out.setdefault(r.block, []).append((r.offset + lo - r.addr, r.offset + hi - r.addr))
                hit = True
        if not hit:
            raise UsageError(f"--keep-range 0x{start:x}-0x{end:x}: no RAM there in this guest's memory map")
    return out


def redact(source: str, out_path: str, *, fill: int = 0, keep_blocks: list[str] | None = None,
           keep_ranges: list[tuple[int, int]] | None = None, snapshot: str | None = None,
           page_size: int | None = None, overrides: dict[str, int] | None = None) -> RedactResult:
    """Write ``source`` to ``out_path`` with every RAM page's content removed."""
    if not 0 <= fill <= 255:
        raise UsageError(f"--fill {fill}: a byte is 0..255")
    keep_blocks = keep_blocks or []
    keep: dict[str, list[tuple[int, int]]] = {}
    inp = open_input(source, snapshot)
    try:
        if keep_ranges:
            if not inp.seekable:
                raise UsageError("--keep-range needs a regular file: the memory map comes from device state "
                                 "at the end of the stream, read before the pages are rewritten")
            keep = _keep_offsets(source, snapshot, keep_ranges, overrides)
        directory = output_directory(out_path)
        fd, tmp = tempfile.mkstemp(prefix=".qevm-", suffix=".part", dir=directory)
        try:
            schema, trailer_page = trailer_schema(inp)
            parser = Parser(schema=schema, page_size=page_size or trailer_page, count_pages=True, keep_raw="borrow",
                            file_offset=inp.file_offset)
            with os.fdopen(fd, "wb") as out:
                rd = _Redactor(out, inp, fill, set(keep_blocks), keep, lambda: parser.page_size or 4096)
                drive(parser, inp, rd.handle, skip_regions=inp.seekable)
                out.truncate(out.tell())
                rd.result.size_after = out.tell()
            rd.result.size_before = parser.offset
            known = set(parser.ram_blocks)
            for b in keep_blocks:
                if known and b not in known:
                    raise UsageError(f"--keep {b!r}: no such RAM block in the stream")
            if not rd.result.pages_removed + rd.result.pages_kept and not rd.result.mapped_bytes_removed \
                    and not known:
                raise UsageError(f"{inp.name}: the stream carries no RAM: nothing to redact")
            rd.result.kept_blocks = keep_blocks
            rd.result.kept_ranges = keep
            os.replace(tmp, out_path)
            tmp = ""
            return rd.result
        except OSError as e:
            raise UsageError(f"cannot write {out_path}: {e.strerror}") from None
        finally:
            if tmp:
                discard(tmp)
    finally:
        inp.close()

