"""Reading a regular file through mmap windows (``qevm.io.mapped.drive``, ``Parser.use_buffer``) against
reading it into the parser's own buffer (``qevm.io.reader.drive``), on every real stream: the same events and
the same page records through the run sink, with windows small enough to cut records and device sections
(a section longer than a window makes it grow).  What the consumers write from the windows is tested where
they live (test_extract, test_core, test_redact); here ``qevm core``'s replay of its counting pass."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_STREAMS, require_fixture, stream_id

import qevm.io.mapped as mapped_mod
from qevm.format.events import Event, MappedRamData, RamTally
from qevm.format.parser import Parser
from qevm.io.reader import drive as reader_drive
from qevm.io.reader import trailer_schema
from qevm.io.sources import Input, open_input


def _read(path: Path, mapped: bool) -> tuple[list[Any], list[tuple[Any, ...]]]:
    inp = open_input(str(path))
    try:
        schema, page = trailer_schema(inp)
        p = Parser(schema=schema, page_size=page, count_pages=True, keep_raw=False, file_offset=inp.file_offset)
        recs: list[tuple[Any, ...]] = []

        def sink(block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
                 stride: int, offset: int) -> None:
            ps = p.page_size or 4096
            for i in range(count):
                q = pos + i * stride
                recs.append((offset + i * stride, block, kind, addr + i * ps, bytes(view[q:q + length])))

        p.run_sink = sink
        events: list[Any] = []
        counts: dict[str, list[int]] = {}

        def handle(ev: Event) -> None:
            if type(ev) is RamTally:  # cut where the input was cut: compare the sums
                for b, c in ev.counts.items():
                    acc = counts.setdefault(b, [0, 0, 0, 0])
                    for k in range(4):
                        acc[k] += c[k]
            elif type(ev) is not MappedRamData:  # region bytes come in other chunks (or are seeked over)
                events.append(ev)
        if mapped:
            assert mapped_mod.mappable(inp)
            mapped_mod.drive(p, inp, handle)
        else:
            reader_drive(p, inp, handle)
        return [*events, counts, p.passes.passes, p.offset], recs
    finally:
        inp.close()


@pytest.mark.parametrize("fixture", [pytest.param(p, id=stream_id(p)) for p in ALL_STREAMS])
def test_mapped_windows_equal_reads(fixture: Path, unpacked, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    path = unpacked(fixture)
    want_events, want_recs = _read(path, False)
    for window in (64 << 10, 8 << 20):
        monkeypatch.setattr(mapped_mod, "WINDOW", window)
        events, recs = _read(path, True)
        assert recs == want_recs, window
        assert events == want_events, window


@pytest.mark.parametrize("name", ["memdump-pc-7.2", "xbzrle-7.2"])
def test_core_page_pass_replay_or_parse(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``qevm core``'s page pass replays the counting pass's log of page runs (no second parse) when the stream
    has data and zero pages only; with XBZRLE pages, or a log over its limit, it parses again.  Every way
    writes the same core as from a pipe (RAM staged, then copied into place)."""
    import qevm.analysis.elfcore as elfcore

    stream = require_fixture(name)
    replays: list[int] = []
    real = elfcore._replay

    def counted(*a: Any) -> None:
        replays.append(1)
        real(*a)
    monkeypatch.setattr(elfcore, "_replay", counted)
    elfcore.write_core(str(stream), str(tmp_path / "file.core"))
    assert len(replays) == (1 if name == "memdump-pc-7.2" else 0)
    monkeypatch.setattr(elfcore, "_LOG_MAX", 3)
    elfcore.write_core(str(stream), str(tmp_path / "parsed.core"))
    assert len(replays) == (1 if name == "memdump-pc-7.2" else 0)  # over the limit: parsed
    with open(stream, "rb", buffering=0) as f:  # as a pipe: not seekable
        elfcore.write_core(Input("pipe", f, False, None, None), str(tmp_path / "pipe.core"))
    for other in ("parsed.core", "pipe.core"):
        assert filecmp.cmp(tmp_path / "file.core", tmp_path / other, shallow=False), other
