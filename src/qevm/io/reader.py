"""Reading a whole stream: the analysis consumer (sans-I/O) and the driver that feeds it.

``Analysis`` takes parser events and keeps what ``dump`` and ``info`` need: the section
table with byte sizes, per-block page counts, commands, passes over RAM, and the device
payloads (small) until the vmdesc arrives at the very end, when they are decoded into
named fields.  RAM pages are counted and streamed past (or applied to a ``RamImage``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qevm.codec.schema import Schema
from qevm.codec.vmsd import Struct, decode_vmsd
from qevm.codec.wire import Cursor
from qevm.errors import DecodeError, SchemaError, UsageError
from qevm.format.events import (
    Anomaly,
    CommandEvent,
    Configuration,
    DeviceState,
    EndOfFile,
    Event,
    FileHeader,
    Footer,
    LiveRecord,
    MappedRamBitmap,
    MappedRamData,
    MappedRamHeader,
    PassTracker,
    RamBlock,
    RamControl,
    RamFlag,
    RamMemSize,
    RamPage,
    RamTally,
    Section,
    SectionHeader,
    SectionKind,
    Trailing,
    VmDescription,
)
from qevm.format.live import decode_command
from qevm.format.memory import RamImage
from qevm.format.parser import DONE, NEED_DATA, Parser
from qevm.format.selfdesc import DEBUG_MIGRATION_IDSTR, decode_debug_payload
from qevm.io.sources import CHUNK, Input, find_vmdesc, open_input

__all__ = ["Analysis", "BlockStats", "SectionStats", "Device", "read_stream", "load_schema",
           "schema_from_vmdesc", "PAGE_KIND_NAMES"]

PAGE_KIND_NAMES = {
    RamFlag.ZERO: "zero",
    RamFlag.PAGE: "normal",
    RamFlag.XBZRLE: "xbzrle",
    RamFlag.COMPRESS_PAGE: "compressed",
}


_KIND_NAME = {int(k): v for k, v in PAGE_KIND_NAMES.items()}
_NOT_CONTINUE = ~int(RamFlag.CONTINUE) & 0x3FF  # a page record's kind: its flags without CONTINUE


@dataclass
class BlockStats:
    name: str
    used_length: int
    addr: int | None = None
    page_size: int | None = None
    mapped: MappedRamHeader | None = None
    pages: dict[str, int] = field(default_factory=lambda: {"normal": 0, "zero": 0, "xbzrle": 0, "compressed": 0})


@dataclass
class SectionStats:
    section: Section
    offset: int
    chunks: int = 0
    size: int = 0
    kinds: list[str] = field(default_factory=list)


@dataclass
class Device:
    section: Section
    offset: int
    data: bytes
    desc: dict[str, Any] | None = None
    struct: Struct | None = None
    error: str | None = None


def schema_from_vmdesc(vmdesc: Any) -> Schema:
    return Schema.from_vmdesc(vmdesc)


class Analysis:
    """Consumes events; holds the summary of one stream."""

    def __init__(self, schema: Schema | None = None, memory: RamImage | None = None,
                 on_page: Callable[[RamPage], None] | None = None,
                 page_size: int | Callable[[], int] = 4096) -> None:
        self.user_schema = schema
        self.memory = memory
        self.on_page = on_page
        self.header: FileHeader | None = None
        self.configuration: Configuration | None = None
        self.sections: dict[int, SectionStats] = {}
        self.order: list[SectionStats] = []  # first appearance order
        self.blocks: dict[str, BlockStats] = {}
        self.block_index: dict[str, int] = {}
        self.commands: list[CommandEvent] = []
        self.anomalies: list[Anomaly] = []  # what QEMU's loader tolerates but no source writes
        self.devices: list[Device] = []
        self.live_records: dict[int, dict[str, int]] = {}
        self.vmdesc_raw: bytes | None = None
        self.vmdesc: dict[str, Any] | None = None
        #: the vmdesc a debug-migration section carries (used when no trailer vmdesc exists)
        self.embedded_vmdesc: dict[str, Any] | None = None
        self.trailing = 0
        self.stream_page_size: int | None = None  # the page size the parser used
        self.eof_offset: int | None = None
        self.size = 0
        self.passes = 0
        self.ram_flushes = 0
        self.ram_chunks = 0
        self._tracker = PassTracker()
        self._page_size: Callable[[], int] = page_size if callable(page_size) else (lambda: page_size)
        self._open: SectionStats | None = None
        self._open_at = 0

    # -- events ------------------------------------------------------------------------------
    def handle(self, ev: Event) -> None:
        if type(ev) is RamPage:
            b = self.blocks.get(ev.block)
            if b is not None:
                b.pages[_KIND_NAME[ev.flags & _NOT_CONTINUE]] += 1
                self._tracker.see(ev.block, ev.addr // self._page_size())
                self.passes = self._tracker.passes
            if self.memory is not None:
                self.memory.apply(ev)
            if self.on_page is not None:
                self.on_page(ev)
            return
        t = type(ev)
        if t is SectionHeader:
            assert isinstance(ev, SectionHeader)
            self._close(ev.offset)
            st = self.sections.get(ev.section.section_id)
            if st is None or ev.kind in (SectionKind.START, SectionKind.FULL):
                if st is not None and st.section is not ev.section:
                    st = None
                if st is None:
                    st = SectionStats(ev.section, ev.offset)
                    self.sections[ev.section.section_id] = st
                    self.order.append(st)
            st.chunks += 1
            st.kinds.append(ev.kind.name)
            if ev.section.handler == "ram" and ev.kind == SectionKind.PART:
                self.ram_chunks += 1
            self._open, self._open_at = st, ev.offset
        elif t is Footer:
            assert isinstance(ev, Footer)
            self._close(ev.offset + 5)
        elif t is RamBlock:
            assert isinstance(ev, RamBlock)
            self.block_index.setdefault(ev.name, len(self.block_index))
            self.blocks[ev.name] = BlockStats(ev.name, ev.used_length, ev.addr, ev.page_size, ev.mapped)
            if self.memory is not None:
                if not self.memory.blocks():
                    self.memory.page_size = self._page_size()
                self.memory.add_block(ev.name, ev.used_length)
        elif t is DeviceState:
            assert isinstance(ev, DeviceState)
            self.devices.append(Device(ev.section, ev.offset, ev.data))
            if ev.section.idstr == DEBUG_MIGRATION_IDSTR and self.embedded_vmdesc is None:
                self._embedded(ev)
        elif t is CommandEvent:
            assert isinstance(ev, CommandEvent)
            self._close(ev.offset)
            self.commands.append(ev)
        elif t is RamTally:
            assert isinstance(ev, RamTally)
            for name, c in ev.counts.items():
                b = self.blocks.get(name)
                if b is not None:
                    p = b.pages
                    p["normal"] += c[0]
                    p["zero"] += c[1]
                    p["xbzrle"] += c[2]
                    p["compressed"] += c[3]
            self.passes = ev.passes
        elif t is RamControl:
            assert isinstance(ev, RamControl)
            if ev.flags == RamFlag.MULTIFD_FLUSH:
                self.ram_flushes += 1
        elif t is LiveRecord:
            assert isinstance(ev, LiveRecord) and self._open is not None
            counts = self.live_records.setdefault(self._open.section.section_id, {})
            counts[ev.kind] = counts.get(ev.kind, 0) + 1
        elif t is MappedRamBitmap:
            assert isinstance(ev, MappedRamBitmap)
            self._mapped_bitmap(ev)
        elif t is EndOfFile:
            self._close(ev.offset)
            self.eof_offset = ev.offset
        elif t is VmDescription:
            assert isinstance(ev, VmDescription)
            self.vmdesc_raw = ev.raw
            try:
                self.vmdesc = json.loads(ev.raw)
            except (ValueError, RecursionError) as e:
                raise DecodeError(f"vmdesc is not valid JSON: {e}", ev.offset + 5, "vmdesc") from None
            if not isinstance(self.vmdesc, dict):
                raise DecodeError("vmdesc JSON is not an object", ev.offset + 5, "vmdesc")
        elif t is Configuration:
            assert isinstance(ev, Configuration)
            self.configuration = ev
        elif t is FileHeader:
            assert isinstance(ev, FileHeader)
            self.header = ev
        elif t is Trailing:
            assert isinstance(ev, Trailing)
            self.trailing += len(ev.data)
        elif t is Anomaly:
            assert isinstance(ev, Anomaly)
            self.anomalies.append(ev)
        elif t in (RamMemSize, MappedRamData):
            pass

    def _embedded(self, ev: DeviceState) -> None:
        raw = decode_debug_payload(ev.data, ev.offset)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise DecodeError(f"debug-migration vmdesc is not valid JSON: {e}", ev.offset + 20,
                              DEBUG_MIGRATION_IDSTR) from None
        if not isinstance(doc, dict):
            raise DecodeError("debug-migration vmdesc is not an object", ev.offset + 20, DEBUG_MIGRATION_IDSTR)
        self.embedded_vmdesc = doc

    @property
    def vmdesc_source(self) -> str | None:
        """Where the device descriptions come from: "trailer", "debug-migration" or None."""
        if self.vmdesc is not None:
            return "trailer"
        return DEBUG_MIGRATION_IDSTR if self.embedded_vmdesc is not None else None

    def _close(self, offset: int) -> None:
        if self._open is not None:
            self._open.size += offset - self._open_at
            self._open = None

    def _mapped_bitmap(self, ev: MappedRamBitmap) -> None:
        b = self.blocks[ev.block]
        ps = b.mapped.page_size if b.mapped else 4096
        npages = b.used_length // ps
        full = int.from_bytes(ev.data, "little")
        present = (full & ((1 << npages) - 1)).bit_count()
        b.pages["normal"] += present
        b.pages["zero"] += npages - present

    # -- the end -------------------------------------------------------------------------------
    @property
    def schema(self) -> Schema:
        if self.user_schema is not None:
            return self.user_schema
        desc = self.vmdesc if self.vmdesc is not None else self.embedded_vmdesc
        return schema_from_vmdesc(desc) if desc is not None else Schema()

    def decode_devices(self, strict: bool = True) -> None:
        """Decode every held device payload with the vmdesc (or user) schema."""
        try:
            schema = self.schema
        except SchemaError as e:
            raise DecodeError(str(e), None, "vmdesc") from None
        for d in self.devices:
            sec = d.section
            d.desc, exact = schema.describe(sec.idstr, sec.instance_id, sec.version)
            if d.desc is None:
                continue
            if not exact:
                strict_here, strict = strict, False
            path = f"section {sec.idstr!r} (id {sec.section_id}, instance {sec.instance_id}, version {sec.version})"
            cur = Cursor(d.data, 0, len(d.data), d.offset, True, path)
            try:
                d.struct = decode_vmsd(cur, d.desc, path)
                if cur.pos != len(d.data):
                    raise DecodeError(f"vmdesc describes {cur.pos} bytes but the section holds {len(d.data)}",
                                      d.offset + cur.pos, path)
            except DecodeError as e:
                if not e.path:
                    e.path = path
                if strict:
                    raise
                d.struct, d.error = None, str(e)
            except SchemaError as e:
                if strict:
                    raise DecodeError(f"unusable vmdesc entry: {e}", d.offset, path) from None
                d.struct, d.error = None, str(e)
            finally:
                if not exact:
                    strict = strict_here
            if not exact and d.error:
                d.error = f"the -dump-vmstate description does not account for this section: {d.error}"

    @property
    def page_size(self) -> int | None:
        if self.vmdesc and isinstance(self.vmdesc.get("page_size"), int):
            return int(self.vmdesc["page_size"])
        return self.stream_page_size

    def command_list(self) -> list[dict[str, Any]]:
        return [{"offset": c.offset, "name": c.name, "cmd": c.cmd, "nested": c.depth > 0,
                 **decode_command(c.cmd, c.data)} for c in self.commands]


def load_schema(path: str) -> Schema:
    """A schema from a stream's vmdesc or from a vmdesc JSON file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head == b"QEVM":
                size = f.seek(0, 2)
                found = find_vmdesc(f, size)
                if found is None:
                    raise UsageError(f"schema stream {path} carries no vmdesc")
                return schema_from_vmdesc(json.loads(found[1]))
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read schema {path}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"schema {path} is not JSON: {e}") from None
    try:
        if isinstance(data, dict) and "devices" in data:
            return schema_from_vmdesc(data)
        return Schema.from_dump_vmstate(data)
    except SchemaError as e:
        raise UsageError(f"schema {path}: {e}") from None


def trailer_schema(inp: Input) -> tuple[Schema | None, int | None]:
    """The device descriptions and page size from a seekable input's vmdesc trailer, read up front
    (streams without footers can then be sized).  (None, None) for pipes, or when there is no usable
    trailer: a broken one is reported when the parser reaches it."""
    if not (inp.seekable and inp.size):
        return None, None
    found = find_vmdesc(inp.file, inp.size)
    if found is None:
        return None, None
    try:
        vm = json.loads(found[1])
        ps = vm.get("page_size")
        return schema_from_vmdesc(vm), ps if isinstance(ps, int) and ps >= 256 and not ps & (ps - 1) else None
    except (ValueError, SchemaError, AttributeError, RecursionError):
        return None, None


def read_stream(source: str | Input, *, schema: Schema | None = None, page_size: int | None = None,
                memory: RamImage | None = None, on_event: Callable[[Event], None] | None = None,
                strict: bool = True, pages: bool | None = None, tracker: PassTracker | None = None) -> Analysis:
    """Read a whole stream from a path, ``-`` or an ``Input`` into an ``Analysis``.

    ``pages``: deliver every RAM page as an event (needed by ``memory`` and ``on_event``
    consumers that look at pages); by default only when one of those is given, otherwise the
    parser counts pages without materialising them (the fast path).  ``tracker``: the pass tracker
    to use (a subclass sees each pass's page bitmap before it is cleared, in both modes)."""
    inp = open_input(source) if isinstance(source, str) else source
    try:
        parse_schema = schema
        if schema is None:
            parse_schema, trailer_page = trailer_schema(inp)
            page_size = page_size or trailer_page
        if pages is None:
            pages = memory is not None or on_event is not None
        parser = Parser(schema=parse_schema, page_size=page_size, count_pages=not pages, keep_raw=False,
                        file_offset=inp.file_offset)
        an = Analysis(schema=schema, memory=memory, page_size=lambda: parser.page_size or 4096)
        if tracker is not None:
            parser.passes = an._tracker = tracker
        drive(parser, inp, _chain(an.handle, on_event))
        an.size = parser.offset
        an.stream_page_size = parser.page_size
        an.decode_devices(strict=strict)
        return an
    finally:
        if isinstance(source, str):
            inp.close()


def _chain(a: Callable[[Event], None], b: Callable[[Event], None] | None) -> Callable[[Event], None]:
    if b is None:
        return a

    def both(ev: Event) -> None:
        a(ev)
        b(ev)
    return both


def _fill(parser: Parser, inp: Input, skip_regions: bool) -> None:
    """Answer one NEED_DATA: seek over a skippable region, read into the parser's buffer, or close it."""
    f = inp.file
    n = parser.skippable() if inp.seekable and skip_regions else 0
    if n:
        f.seek(n, 1)
        parser.skip(n)
        return
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        view = parser.get_buffer(CHUNK)
        try:
            k = readinto(view) or 0
        finally:
            view.release()
        if k:
            parser.buffer_updated(k)
        else:
            parser.close()
        return
    data = f.read(CHUNK)
    if data:
        parser.feed(data)
    else:
        parser.close()


def drive(parser: Parser, inp: Input, handle: Callable[[Event], None], skip_regions: bool = True) -> None:
    """Feed ``inp`` to ``parser`` until the stream ends, passing every event to ``handle``.

    With ``skip_regions`` a seekable input seeks over mapped-ram page regions instead of
    reading them (their events then carry no data)."""
    while True:
        ev = parser.next_event()
        if ev is NEED_DATA:
            _fill(parser, inp, skip_regions)
        elif ev is DONE:
            return
        else:
            handle(ev)  # type: ignore[arg-type]


def iter_events(source: str | Input, skip_regions: bool = False, **kw: Any) -> Iterator[Event]:
    """Every event of a stream, lazily (the input is read as the iterator advances)."""
    inp = open_input(source) if isinstance(source, str) else source
    parser = Parser(**{"file_offset": inp.file_offset, **kw})
    try:
        while True:
            ev = parser.next_event()
            if ev is NEED_DATA:
                _fill(parser, inp, skip_regions)
            elif ev is DONE:
                return
            else:
                yield ev  # type: ignore[misc]
    finally:
        if isinstance(source, str):
            inp.close()
