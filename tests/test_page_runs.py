"""The parser's page-run fast path (``Parser.run_sink``, the counting lane's batch lane) against its
reference twin, one ``RamPage`` event per record, on every real stream: the same records (offset, block,
kind, address, payload bytes) in the same order, the same page counts and passes, whole files read in
4 MiB chunks and in odd small chunks (runs cut at buffer ends).  The consumers' twins are tested where
they live: ``qevm extract`` against the rebuilt RAM image (test_extract), ``qevm diff`` (test_diff),
``qevm convert`` to mapped-ram against the per-event path below."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_STREAMS, require_fixture, stream_id

from qevm.format.events import Event, PassTracker, RamPage, RamTally
from qevm.format.pagebits import any_bits, claim_bits, set_bits
from qevm.format.parser import DONE, NEED_DATA, Parser, _run_length
from qevm.format.records import RamFlag
from qevm.io.reader import trailer_schema
from qevm.io.sources import open_input

Record = tuple[int, str, int, int, int]  # offset, block, kind, addr, hash of the payload


def _events(parser: Parser, path: Path, chunk: int) -> Iterator[Event]:
    with open(path, "rb") as f:
        while True:
            ev = parser.next_event()
            if ev is NEED_DATA:
                data = f.read(chunk)
                if data:
                    parser.feed(data)
                else:
                    parser.close()
            elif ev is DONE:
                return
            else:
                assert isinstance(ev, Event)
                yield ev


def _parser(path: Path, **kw: Any) -> Parser:
    inp = open_input(str(path))
    try:
        schema, page = trailer_schema(inp)
    finally:
        inp.close()
    return Parser(schema=schema, page_size=page, **kw)


def _reference(path: Path) -> tuple[list[Record], dict[str, list[int]], int]:
    p = _parser(path, count_pages=False)
    recs: list[Record] = []
    counts: dict[str, list[int]] = {}
    tracker = PassTracker()
    index = {int(RamFlag.PAGE): 0, int(RamFlag.ZERO): 1, int(RamFlag.XBZRLE): 2, int(RamFlag.COMPRESS_PAGE): 3}
    for ev in _events(p, path, 4 << 20):
        if type(ev) is RamPage:
            recs.append((ev.offset, ev.block, ev.kind, ev.addr, hash(ev.payload)))
            counts.setdefault(ev.block, [0, 0, 0, 0])[index[ev.kind]] += 1
            tracker.see(ev.block, ev.addr // (p.page_size or 4096))
    return recs, counts, tracker.passes


def _fast(path: Path, chunk: int) -> tuple[list[Record], dict[str, list[int]], int, int]:
    p = _parser(path, count_pages=True, keep_raw=False)
    recs: list[Record] = []
    longest = 0

    def sink(block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
             stride: int, offset: int) -> None:
        nonlocal longest
        longest = max(longest, count)
        ps = p.page_size or 4096
        if count > 1:
            assert kind in (RamFlag.PAGE, RamFlag.ZERO) and stride == length + 8
        for i in range(count):
            q = pos + i * stride
            recs.append((offset + i * stride, block, kind, addr + i * ps, hash(bytes(view[q:q + length]))))

    p.run_sink = sink
    counts: dict[str, list[int]] = {}
    passes = 0
    for ev in _events(p, path, chunk):
        if type(ev) is RamTally:
            for b, c in ev.counts.items():
                acc = counts.setdefault(b, [0, 0, 0, 0])
                for k in range(4):
                    acc[k] += c[k]
            passes = ev.passes
    return recs, counts, passes, longest


@pytest.mark.parametrize("fixture", [pytest.param(p, id=stream_id(p)) for p in ALL_STREAMS])
def test_runs_equal_page_events(fixture: Path, unpacked) -> None:  # type: ignore[no-untyped-def]
    path = unpacked(fixture)
    want, counts, passes = _reference(path)
    for chunk in (4 << 20, 65_537):
        got, got_counts, got_passes, longest = _fast(path, chunk)
        assert got == want, chunk
        assert got_counts == {b: c for b, c in counts.items() if any(c)}
        assert got_passes == passes
        if len(want) > 10_000 and chunk == 4 << 20:
            assert longest >= 64  # the batch lane ran


def test_run_length() -> None:
    ps = 4096
    pc, zc = int(RamFlag.PAGE | RamFlag.CONTINUE), int(RamFlag.ZERO | RamFlag.CONTINUE)

    def pages(*addrs: int) -> bytearray:
        return bytearray(b"".join(struct.pack(">Q", a | pc) + bytes(ps) for a in addrs))

    def zeros(*items: tuple[int, int]) -> bytearray:
        return bytearray(b"".join(struct.pack(">QB", a | zc, fill) for a, fill in items))

    assert _run_length(pages(0, ps, 2 * ps, 3 * ps), 0, pc, ps, 4, True) == 4
    assert _run_length(pages(0, ps, 5 * ps, 6 * ps), 0, pc, ps, 4, True) == 2
    assert _run_length(pages(8 * ps, 9 * ps, 10 * ps, 0), 0, 8 * ps | pc, ps, 4, True) == 3
    buf = pages(0, ps) + zeros((2 * ps, 0))
    assert _run_length(buf + bytes(ps), 0, pc, ps, 3, True) == 2  # a zero record ends a data run
    assert _run_length(zeros((0, 0), (ps, 0), (2 * ps, 1), (3 * ps, 0)), 0, zc, ps, 4, False) == 2
    assert _run_length(zeros((0, 1), (ps, 0)), 0, zc, ps, 2, False) == 0  # a fill byte: one at a time
    assert _run_length(zeros((0, 0), (ps, 0), (2 * ps, 0), (3 * ps, 0)), 0, zc, ps, 4, False) == 4


def test_page_bits() -> None:
    bm = bytearray(8)
    assert claim_bits(bm, 3, 10)
    assert bm[:2] == bytes((0xF8, 0x1F))
    assert not claim_bits(bm, 12, 4)  # bit 12 is taken: nothing changes
    assert bm[:2] == bytes((0xF8, 0x1F))
    assert any_bits(bm, 0, 4) and not any_bits(bm, 0, 3) and not any_bits(bm, 13, 40)
    set_bits(bm, 60, 4)
    assert bm[7] == 0xF0


def test_mapped_ram_runs_equal_page_events(tmp_path: Path) -> None:
    """``convert`` to mapped-ram through the run sink gives the bytes the per-event path gives (XBZRLE,
    compressed and multi-pass streams included)."""
    from qevm.io import convert as conv

    for name in ("xbzrle-7.2", "compress-7.2", "pc-7.2", "small-pc-7.2"):
        src = require_fixture(name)
        if src.suffix == ".xz":
            import lzma
            plain = tmp_path / f"{name}.mig"
            plain.write_bytes(lzma.decompress(src.read_bytes()))
            src = plain
        outs = []
        for fast in (True, False):
            out = tmp_path / f"{name}-{fast}.mapped"
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            inp = open_input(str(src))
            try:
                if fast:
                    conv.write_mapped_ram(inp, fd)
                else:
                    run = conv._MappedRam.run
                    try:
                        conv._MappedRam.run = _per_record  # type: ignore[method-assign]
                        conv.write_mapped_ram(inp, fd)
                    finally:
                        conv._MappedRam.run = run  # type: ignore[method-assign]
            finally:
                inp.close()
                os.close(fd)
            outs.append(out.read_bytes())
        assert outs[0] == outs[1], name


def _per_record(self: Any, block: str, kind: int, addr: int, count: int, view: memoryview, pos: int,
                length: int, stride: int, offset: int) -> None:
    """The simple twin of ``_MappedRam.run``: one ``RamPage`` event per record through ``apply``."""
    for i in range(count):
        q = pos + i * stride
        self.apply(RamPage(offset + i * stride, kind, addr + i * self.page_size, block, bytes(view[q:q + length])))


def test_runs_in_a_crafted_multipass_stream(tmp_path: Path, unpacked) -> None:  # type: ignore[no-untyped-def]
    """Runs that re-send pages of the current pass (a new pass starts inside what would be one run),
    zero pages with a fill byte, gaps and a block switch: a real stream whose first RAM pages are replaced
    by crafted records; fast and reference paths must agree record for record."""
    import lzma

    from qevm.format.events import RamBlock, RamControl
    from qevm.format.records import ram_record_head

    src = require_fixture("small-pc-7.2")
    data = lzma.decompress(src.read_bytes()) if src.suffix == ".xz" else src.read_bytes()
    plain = tmp_path / "orig.mig"
    plain.write_bytes(data)
    first = eos = None
    blocks: dict[str, int] = {}
    for ev in _events(_parser(plain, count_pages=False), plain, 4 << 20):
        if type(ev) is RamPage and first is None:
            first = ev
        elif isinstance(ev, RamControl) and ev.flags == RamFlag.EOS and first is not None:
            eos = ev
            break
        elif isinstance(ev, RamBlock):
            blocks[ev.name] = ev.used_length
    assert first is not None and eos is not None and len(blocks) >= 2
    ps = 4096
    main = max(blocks, key=lambda b: blocks[b])
    assert blocks[main] >= 340 * ps
    other = next(b for b in blocks if b != main and blocks[b] >= 8 * ps)
    pc, zc = RamFlag.PAGE | RamFlag.CONTINUE, RamFlag.ZERO | RamFlag.CONTINUE
    recs = [ram_record_head(0, RamFlag.PAGE, main) + bytes([1]) * ps]
    recs += [ram_record_head(a * ps, pc, None) + bytes([a]) * ps for a in range(1, 40)]
    recs += [ram_record_head(a * ps, pc, None) + bytes([a + 1]) * ps for a in range(20, 70)]  # pass 2 from 20
    recs += [ram_record_head(a * ps, zc, None) + b"\0" for a in range(70, 90)]
    recs += [ram_record_head(a * ps, zc, None) + (b"\x07" if a == 95 else b"\0") for a in range(90, 120)]
    recs += [ram_record_head(a * ps, pc, None) + bytes(ps) for a in range(200, 260, 2)]  # gaps: no runs
    recs += [ram_record_head(0, RamFlag.ZERO, other) + b"\0"]
    recs += [ram_record_head(a * ps, zc, None) + b"\0" for a in range(1, 8)]
    recs += [ram_record_head(a * ps, RamFlag.PAGE, main) + bytes(ps) for a in range(300, 301)]
    recs += [ram_record_head(a * ps, pc, None) + bytes([9]) * ps for a in range(301, 340)]
    crafted = tmp_path / "crafted.mig"
    crafted.write_bytes(data[:first.offset] + b"".join(recs) + data[eos.offset:])
    want, counts, passes = _reference(crafted)
    assert passes >= 2
    for chunk in (4 << 20, 20_000, 4105):
        got, got_counts, got_passes, longest = _fast(crafted, chunk)
        assert got == want, chunk
        assert got_counts == {b: c for b, c in counts.items() if any(c)}
        assert got_passes == passes
        if chunk == 4 << 20:
            assert longest >= 16  # the batch lane took runs
