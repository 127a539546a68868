"""The parser against real QEMU streams: round trips and incremental feeding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import require_fixture, streams

from qevm.errors import DecodeError
from qevm.format.events import DeviceState, MappedRamData, RamPage, VmDescription
from qevm.format.parser import DONE, NEED_DATA, Parser
from qevm.io.reader import iter_events, read_stream


def _events_whole(data: bytes, **kw) -> list:
    p = Parser(**kw)
    p.feed(data)
    p.close()
    return list(p.events())


def _events_chunked(data: bytes, sizes, **kw) -> list:
    p = Parser(**kw)
    out = []
    pos = 0
    for n in sizes:
        if pos >= len(data):
            break
        p.feed(data[pos:pos + n])
        pos += n
        out += list(p.events())
    if pos < len(data):
        p.feed(data[pos:])
    p.close()
    out += list(p.events())
    return out


@pytest.mark.parametrize("path", streams())
def test_round_trip_is_byte_identical(path: Path, unpacked) -> None:
    """Every event encodes back to the exact bytes it was decoded from (cmp on the whole stream)."""
    f = unpacked(path)
    data_iter = open(f, "rb")
    try:
        pos = 0
        for ev in iter_events(str(f)):
            assert ev.offset == pos, f"event {type(ev).__name__} at {ev.offset}, expected {pos}"
            b = ev.encode()
            assert data_iter.read(len(b)) == b, f"{type(ev).__name__} at offset {pos} does not re-encode"
            pos += len(b)
        assert data_iter.read(1) == b""
    finally:
        data_iter.close()


@pytest.mark.parametrize("path", streams())
def test_counting_mode_round_trip_and_counts(path: Path, unpacked) -> None:
    """The counting fast path (RamTally events) is lossless too, and counts what the page events show."""
    from collections import Counter

    from qevm.format.events import RamTally

    f = unpacked(path)
    data_iter = open(f, "rb")
    tallies: Counter = Counter()
    try:
        pos = 0
        for ev in iter_events(str(f), count_pages=True):
            assert ev.offset == pos, f"{type(ev).__name__} at {ev.offset}, expected {pos}"
            b = ev.encode()
            assert data_iter.read(len(b)) == b, f"{type(ev).__name__} at offset {pos} does not re-encode"
            pos += len(b)
            if isinstance(ev, RamTally):
                for block, c in ev.counts.items():
                    for k, n in zip(("normal", "zero", "xbzrle", "compressed"), c, strict=True):
                        tallies[block, k] += n
        assert data_iter.read(1) == b""
    finally:
        data_iter.close()
    pages: Counter = Counter()
    kinds = {0x08: "normal", 0x02: "zero", 0x40: "xbzrle", 0x100: "compressed"}
    for ev in iter_events(str(f)):
        if isinstance(ev, RamPage):
            pages[ev.block, kinds[ev.kind]] += 1
    assert +tallies == +pages


@pytest.mark.parametrize("path", streams(small=True))
def test_byte_at_a_time_equals_whole(path: Path, unpacked) -> None:
    data = unpacked(path).read_bytes()
    whole = _events_whole(data)
    assert _events_chunked(data, [1] * len(data)) == whole


@pytest.mark.parametrize("path", streams(small=True))
def test_random_chunks_equal_whole(path: Path, unpacked) -> None:
    data = unpacked(path).read_bytes()
    whole = _events_whole(data)
    rng = random.Random(len(data))
    sizes = [rng.choice((1, 2, 3, 7, 100, 4095, 4097, 65536)) for _ in range(len(data) // 50 + 10)]
    assert _events_chunked(data, sizes) == whole


@pytest.mark.parametrize("path", streams())
def test_every_device_section_decodes_and_reencodes(path: Path, unpacked) -> None:
    from qevm.codec.vmsd import encode_struct

    an = read_stream(str(unpacked(path)))
    if an.vmdesc is None:
        pytest.skip("stream carries no vmdesc")
    assert an.devices, "no device sections"
    for d in an.devices:
        assert d.struct is not None, f"{d.section.idstr}: not decoded ({d.error})"
        assert encode_struct(d.struct) == d.data, d.section.idstr


def test_trailing_bytes_are_kept(unpacked) -> None:
    data = unpacked(require_fixture("pc-10.0-small")).read_bytes()
    evs = _events_whole(data + b"junk")
    assert b"".join(e.encode() for e in evs) == data + b"junk"
    assert type(evs[-1]).__name__ == "Trailing"


def test_need_data_then_done() -> None:
    p = Parser()
    assert p.next_event() is NEED_DATA
    p.feed(b"QEVM\x00\x00\x00\x03")
    assert type(p.next_event()).__name__ == "FileHeader"
    assert p.next_event() is NEED_DATA
    p.feed(b"\x00")
    p.close()
    assert type(p.next_event()).__name__ == "EndOfFile"
    assert p.next_event() is DONE


def test_truncated_after_close_names_offset() -> None:
    p = Parser()
    p.feed(b"QEVM\x00\x00\x00\x03\x04\x00\x00")
    p.close()
    list_ = []
    with pytest.raises(DecodeError) as ei:
        for ev in p.events():
            list_.append(ev)
    assert ei.value.offset == 9


def test_mapped_ram_skip_matches_reading_everything(unpacked) -> None:
    """The seekable fast path (skip the page regions) sees the same records as a pipe reading them."""
    path = unpacked(require_fixture("mapped-ram-10.0"))
    fast = [e for e in iter_events(str(path), skip_regions=True) if not isinstance(e, MappedRamData)]
    import qevm.io.sources as src

    inp = src.open_input(str(path))
    inp.seekable = False
    slow = [e for e in iter_events(inp, skip_regions=True) if not isinstance(e, MappedRamData)]
    inp.close()
    assert [(type(e), e.offset) for e in fast] == [(type(e), e.offset) for e in slow]
    assert any(isinstance(e, VmDescription) for e in fast)
    assert any(isinstance(e, DeviceState) for e in fast)
    assert not any(isinstance(e, RamPage) for e in fast)


def test_device_first_stream_without_configuration(unpacked) -> None:
    """No configuration record and a device section first (as xen-save-devices-state writes): footers
    are detected from the bytes, with or without a description of the section."""
    import json

    from qevm.format.events import Footer, SectionHeader

    data = unpacked(require_fixture("pc-10.0-small")).read_bytes()
    evs = _events_whole(data)
    hdr = next(e for e in evs if isinstance(e, SectionHeader) and e.section.idstr == "timer")
    dev = next(e for e in evs if isinstance(e, DeviceState) and e.section.idstr == "timer")
    foot = next(e for e in evs if isinstance(e, Footer) and e.offset > dev.offset)
    vm = next(e for e in evs if isinstance(e, VmDescription)).json()
    timer_desc = [d for d in vm["devices"] if d["name"] == "timer"]
    section = data[hdr.offset:foot.offset + 5]
    trailer = json.dumps({"page_size": 4096, "devices": timer_desc}).encode()
    stream = data[:8] + section + b"\x00" + b"\x06" + len(trailer).to_bytes(4, "big") + trailer
    for kw in ({}, {"schema": read_stream_schema(timer_desc)}):
        out = _events_whole(stream, **kw)
        assert b"".join(e.encode() for e in out) == stream
        assert [type(e).__name__ for e in out][:4] == ["FileHeader", "SectionHeader", "DeviceState", "Footer"]


def read_stream_schema(devices: list) -> object:
    from qevm.codec.schema import Schema

    return Schema.from_vmdesc({"devices": devices})
