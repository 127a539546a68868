"""The sans-I/O stream parser: bytes in, events out.

    p = Parser()
    p.feed(chunk) ...; p.close()          # close() when the input has ended
    for ev in p.events(): ...             # stops when more input is needed

``next_event()`` returns an event or ``NEED_DATA``; after ``close()`` it returns ``DONE``
at the end, or raises ``TruncatedError`` if the input ended inside a record.  Nothing here
does I/O, so the same parser serves files, pipes, sockets and the live engine.

Which record may come where, and each section's life (START -> PART* -> END, FULL alone), are the
tables of ``qevm.format.grammar``: a record QEMU's loader refuses raises ``IllegalRecord`` (a
``DecodeError``); one it goes along with although no correct source writes it (a PART after its
section's END, a second START, trailing bytes, ...) becomes an ``Anomaly`` event (no bytes of its
own) and is listed in ``Parser.anomalies``.

Delimiting device sections: nothing in the stream gives a payload's length.  When section
footers are on (every QEMU >= 2.4 machine type) the payload ends at the first
``0x7E + be32(section id)`` that is followed by a plausible record; otherwise the
vmdesc entry for the section (``schema``) is needed to size it.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator
from enum import Enum, auto
from typing import Any

from qevm.codec.schema import Schema
from qevm.codec.vmsd import decode_vmsd
from qevm.codec.wire import _B64, Cursor, Incomplete
from qevm.errors import DecodeError, InvalidOperation, TruncatedError
from qevm.format.events import (
    MAGIC,
    Anomaly,
    CommandEvent,
    ConfigSubsection,
    Configuration,
    DeviceState,
    EndOfFile,
    Event,
    FileHeader,
    Footer,
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
from qevm.format.grammar import Oddity, Place, RecordGrammar, Resolved, Sections
from qevm.format.live import COMMAND_LENGTHS, LIVE_HANDLERS, LiveState, parse_live_record
from qevm.format.pagebits import claim_bits
from qevm.format.records import VERSION, XBZRLE_ENCODING, Command, RecordType

__all__ = ["Parser", "RunSink", "Sentinel", "NEED_DATA", "DONE", "page_size_for_machine"]


class Sentinel:
    """The type of ``NEED_DATA`` and ``DONE``: what ``next_event()`` returns when it has no event."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``next_event()``: more input is needed (feed, or close at the end of the input)
NEED_DATA = Sentinel("NEED_DATA")
#: ``next_event()``: the stream is complete and every event was returned
DONE = Sentinel("DONE")


INITIAL_BUFFER = 4 << 20
MAX_DEVICE_SECTION = 128 << 20
MAX_VMDESC = 64 << 20
MAX_RAM_TOTAL = 1 << 44  # 16 TiB
MAX_BITMAP = 64 << 20
# plain ints bound from the enums: the RAM loop is the hot path and IntEnum arithmetic is slow
_ZERO, _MEM_SIZE, _PAGE, _EOS, _CONT, _XBZRLE, _COMPRESS = (
    int(f) for f in (RamFlag.ZERO, RamFlag.MEM_SIZE, RamFlag.PAGE, RamFlag.EOS, RamFlag.CONTINUE,
                     RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE))
_PAGE_KINDS = frozenset((_ZERO, _PAGE, _XBZRLE, _COMPRESS))
_KIND_INDEX = {_PAGE: 0, _ZERO: 1, _XBZRLE: 2, _COMPRESS: 3}
_CONTROL = frozenset((int(RamFlag.MULTIFD_FLUSH), int(RamFlag.HOOK)))
_T_EOF, _T_START, _T_PART, _T_END, _T_FULL, _T_SUB, _T_VMDESC, _T_CONFIG, _T_COMMAND, _T_FOOTER = (
    int(t) for t in (RecordType.EOF, RecordType.SECTION_START, RecordType.SECTION_PART, RecordType.SECTION_END,
                     RecordType.SECTION_FULL, RecordType.SUBSECTION, RecordType.VMDESCRIPTION,
                     RecordType.CONFIGURATION, RecordType.COMMAND, RecordType.FOOTER))
_CMD_ADVISE, _CMD_PACKAGED = int(Command.POSTCOPY_ADVISE), int(Command.PACKAGED)
_CONFIG_SUBSECTIONS = {
    "configuration/target-page-bits": 4,
    "configuration/uuid": 16,
    "configuration/capabilities": -1,
}


#: ``Parser.run_sink``: called as sink(block, kind, addr, count, view, pos, length, stride, offset) for each run
#: of ``count`` page records of one ``kind`` (RamFlag.PAGE / ZERO / XBZRLE / COMPRESS_PAGE value) in ``block``:
#: record i is the page at ``addr + i * page_size``, its payload (as ``RamPage.payload``) is
#: ``view[pos + i * stride : pos + i * stride + length]`` and the run starts at stream offset ``offset``.
#: Runs of more than one record are PAGE or ZERO (fill byte 0) records at consecutive addresses, every page
#: seen once in the current pass; XBZRLE and compressed pages come one at a time.  ``view`` borrows the
#: parser's buffer: it is valid only during the call.
RunSink = Callable[[str, int, int, int, memoryview, int, int, int, int], None]

_MAX_RUN = 512  # records per batch-lane struct call
_RUN_STRUCTS: dict[tuple[int, int, bool], struct.Struct] = {}


def _run_length(buf: bytearray, pos: int, w: int, page: int, k: int, data: bool) -> int:
    """How many of the ``k`` records from ``pos`` on continue the run that record word ``w`` starts
    (same flags, consecutive addresses; zero pages with fill byte 0); all ``k`` must be in ``buf``."""
    key = (page, k, data)
    st = _RUN_STRUCTS.get(key)
    if st is None:
        st = _RUN_STRUCTS[key] = struct.Struct(">" + (f"Q{page}x" if data else "QB") * k)
    got = st.unpack_from(buf, pos)
    if data:
        words = got
    else:
        words = got[0::2]
        fills = got[1::2]
        if fills.count(0) != k:
            k = fills.index(next(x for x in fills if x))
            words = words[:k]
    if words == tuple(range(w, w + k * page, page)):
        return k
    lo, hi = 1, k  # words[:lo] is a run, words[:hi] is not
    while hi - lo > 1:
        m = (lo + hi) // 2
        if words[:m] == tuple(range(w, w + m * page, page)):
            lo = m
        else:
            hi = m
    return lo


def page_size_for_machine(machine: str) -> int:
    """The minimum target page size implied by a machine type name (QEMU target-page-bits rules)."""
    m = machine.lower()
    for prefix, size in (("sun4u", 8192), ("sun4v", 8192), ("niagara", 8192), ("clipper", 8192),
                         ("loongarch", 16384), ("virt-loongarch", 16384), ("arduino", 256)):
        if m.startswith(prefix):
            return size
    return 4096


class _St(Enum):
    HEADER = auto()
    CONFIG = auto()
    TOP = auto()
    RAM = auto()
    RAM_BLOCKS = auto()
    MAPPED = auto()
    LIVE = auto()
    DEVICE = auto()
    FOOTER = auto()
    TRAILER = auto()
    AFTER = auto()
    PKG_REST = auto()
    DONE = auto()


class Parser:
    """Incremental parser of one QEVM stream."""

    def __init__(self, *, schema: Schema | None = None, page_size: int | None = None,
                 file_offset: int = 0, count_pages: bool = False, keep_raw: bool | str = True) -> None:
        self.schema: Schema = schema if schema is not None else Schema()
        self.page_size: int | None = page_size
        self._page_size_fixed = page_size is not None
        self.file_offset = file_offset
        # A buffer that is filled in place and compacted, never shrunk: bytes live in
        # _buf[_pos:_end].  (Growing and shrinking a bytearray per read makes the allocator hand
        # memory back to the kernel and fault it in again, which dominated the run time.)
        self._buf = bytearray(INITIAL_BUFFER)
        self._end = 0
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._closed = False
        self._state = _St.HEADER
        self._queue: deque[Event] = deque()
        self.sections: dict[int, Section] = {}  # section id -> the section last named with it
        self.anomalies: list[Anomaly] = []  # what QEMU's loader goes along with but no source writes
        self._grammar = RecordGrammar()  # the top-level record machine (qevm.format.grammar)
        self._lives = Sections()  # each section's life, and which section holds each id
        self._named: dict[tuple[str, int], Section] = {}  # (idstr, instance) -> its latest Section
        self._trailing_seen = False
        self.configuration: Configuration | None = None
        self.footers: bool | None = None
        self.capabilities: set[str] = set()
        self.postcopy_advise: tuple[int, int] | None = None
        self.ram_blocks: dict[str, int] = {}  # name -> used_length
        self._cur: Section | None = None  # section whose payload is being parsed
        self._kind: SectionKind = SectionKind.FULL
        self._ram_block: str | None = None  # CONTINUE context (main channel)
        self._ram_left = 0  # MEM_SIZE bytes not yet covered by block entries
        self._mapped: list[tuple[int, str, str]] = []  # pending region marks: (end offset, block, what)
        self._live: dict[int, LiveState] = {}
        self._scan = 0  # footer scan resume position (relative to payload start)
        self._rejected: int | None = None  # first footer candidate followed by an implausible record
        self._pkg_end: list[int] = []  # stream offsets where PACKAGED blobs end
        # counting mode: RAM page records become per-payload RamTally events (fast path for summaries)
        self.count_pages = count_pages
        # counting mode: keep the bytes of the page runs (False: counts only; "borrow": a memoryview into
        # the parser's buffer, valid only until the parser is fed again: zero-copy for writers)
        self.keep_raw = keep_raw
        self.passes = PassTracker()
        # counting mode: the shared fast path for every verb that handles page contents (extract, core,
        # diff, convert): called once per run of page records, see ``RunSink``
        self.run_sink: RunSink | None = None
        self._want = 2  # batch lane: records to try next (grows while runs are long)

    # -- input ---------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise InvalidOperation("feed() after close()")
        n = len(data)
        self._reserve(n)
        self._buf[self._end:self._end + n] = data
        self._end += n

    def get_buffer(self, size: int) -> memoryview:
        """A writable view of at least ``size`` free bytes to read input into directly (as
        asyncio's BufferedProtocol); call ``buffer_updated(n)`` with the bytes written, after
        releasing the view."""
        if self._closed:
            raise InvalidOperation("get_buffer() after close()")
        self._reserve(size)
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, n: int) -> None:
        if n < 0 or self._end + n > len(self._buf):
            raise InvalidOperation("buffer_updated() beyond the buffer")
        self._end += n

    def last_fed(self, n: int) -> memoryview:
        """A view of the last ``n`` bytes given to the parser (``feed`` / ``buffer_updated``), valid until it is
        fed again: a copier that reads into ``get_buffer`` writes its output from here, with no copy of its own."""
        if not 0 <= n <= self._end:
            raise InvalidOperation("last_fed() beyond what is buffered")
        return memoryview(self._buf)[self._end - n:self._end]

    def use_buffer(self, buf: Any, base: int) -> None:
        """Parse from ``buf`` instead of the parser's own buffer: any object with bytearray's read side
        (indexing, slicing, ``find``, the buffer protocol), such as an ``mmap`` window of the input file,
        whose first byte is stream offset ``base`` and which holds the stream's bytes from there on.  Parsing
        resumes at ``self.offset`` (which must lie in it) with no copy: the run sink's views then point into
        ``buf``.  Give the next window the same way when the parser asks for data; do not mix with ``feed``
        and ``get_buffer``."""
        off = self.offset
        if not base <= off <= base + len(buf):
            raise InvalidOperation(f"use_buffer(): offset {off} is not inside the buffer given ({base}+{len(buf)})")
        self._buf = buf
        self._base = base
        self._pos = off - base
        self._end = len(buf)

    def _reserve(self, n: int) -> None:
        buf = self._buf
        if self._end + n <= len(buf):
            return
        rem = self._end - self._pos
        if self._pos:
            buf[:rem] = buf[self._pos:self._end]
            self._base += self._pos
            self._pos = 0
            self._end = rem
        if rem + n > len(buf):
            try:
                buf.extend(bytes(rem + n - len(buf)))
            except BufferError:  # a borrowed view (keep_raw="borrow") is still alive: move to a new buffer
                new = bytearray(max(2 * len(buf), rem + n))
                new[:rem] = buf[:rem]
                self._buf = new

    def close(self) -> None:
        self._closed = True

    @property
    def offset(self) -> int:
        """Stream offset of the next unparsed byte."""
        return self._base + self._pos

    @property
    def buffer_offset(self) -> int:
        """Stream offset of the buffer's first byte: in a run sink, ``view[pos]`` is stream offset
        ``buffer_offset + pos``."""
        return self._base

    def buffered(self) -> int:
        return self._end - self._pos

    def skippable(self) -> int:
        """Bytes the parser would pass over unread (inside a mapped-ram region).  A seekable
        source may call ``skip(n)`` for up to this many instead of feeding them."""
        if self._state is not _St.MAPPED or self.buffered() or not self._mapped or self._mapped[0][2] != "gap":
            return 0
        return max(0, self._mapped[0][0] - self.offset)

    def skip(self, n: int) -> None:
        if n > self.skippable():
            raise InvalidOperation("skip() beyond what the parser can pass over")
        if n:
            block = self._mapped[0][1]
            self._queue.append(MappedRamData(self.offset, block, n, None))
            self._base += n

    # -- output --------------------------------------------------------------------------
    def next_event(self) -> Event | Sentinel:
        while not self._queue:
            if self._state is _St.DONE:
                return DONE
            try:
                self._step()
            except Incomplete:
                if self._closed:  # pragma: no cover - Cursor raises TruncatedError when closed
                    raise TruncatedError("input ended inside a record", self.offset) from None
                return NEED_DATA
        return self._queue.popleft()

    def events(self) -> Iterator[Event]:
        while True:
            ev = self.next_event()
            if isinstance(ev, Sentinel):
                return
            yield ev

    # -- helpers -------------------------------------------------------------------------
    def _cursor(self) -> Cursor:
        return Cursor(self._buf, self._pos, self._end, self._base, self._closed, self._path())

    def _path(self) -> str:
        s = self._cur
        if s is None:
            return ""
        return f"section {s.idstr!r} (id {s.section_id}, instance {s.instance_id}, version {s.version})"

    def _err(self, msg: str, offset: int | None = None) -> DecodeError:
        return DecodeError(msg, self.offset if offset is None else offset, self._path())

    def _emit(self, ev: Event, cur: Cursor) -> None:
        self._queue.append(ev)
        self._pos = cur.pos

    def _page(self) -> int:
        if self.page_size is None:
            self.page_size = page_size_for_machine(self.configuration.machine if self.configuration else "")
        return self.page_size

    # -- the state machine ---------------------------------------------------------------
    def _step(self) -> None:
        st = self._state
        if st is _St.RAM:
            self._step_ram()
        elif st is _St.TOP:
            self._step_top()
        elif st is _St.FOOTER:
            self._step_footer()
        elif st is _St.DEVICE:
            self._step_device()
        elif st is _St.RAM_BLOCKS:
            self._step_ram_block()
        elif st is _St.MAPPED:
            self._step_mapped()
        elif st is _St.LIVE:
            self._step_live()
        elif st is _St.HEADER:
            self._step_header()
        elif st is _St.CONFIG:
            self._step_config()
        elif st is _St.TRAILER:
            self._step_trailer()
        elif st is _St.AFTER:
            self._step_after()
        elif st is _St.PKG_REST:
            self._step_pkg_rest()

    def _step_header(self) -> None:
        cur = self._cursor()
        magic = cur.be32()
        if magic != MAGIC:
            raise self._err(f"not a QEMU VM-state stream: magic 0x{magic:08x}, expected 0x{MAGIC:08x} ('QEVM')", 0)
        version = cur.be32()
        if version != VERSION:
            raise self._err(f"unsupported stream version {version} (only 3 exists since QEMU 2.x)", 4)
        self._emit(FileHeader(0, magic, version), cur)
        self._state = _St.CONFIG

    def _step_config(self) -> None:
        cur = self._cursor()
        if cur.peek8() != _T_CONFIG:
            self._state = _St.TOP
            return
        off = cur.offset
        cur.pos += 1
        n = cur.be32()
        if n > 255:
            raise self._err(f"machine type name of {n} bytes is absurd", off + 1)
        machine = cur.take(n).decode("latin-1")
        subs: list[ConfigSubsection] = []
        while True:
            if cur.remaining() == 0 and cur.closed:
                break
            if cur.peek8() != _T_SUB:
                break
            ln = cur.peek8(1)
            cur.need(2 + ln)
            name = bytes(cur.buf[cur.pos + 2:cur.pos + 2 + ln]).decode("latin-1")
            if not name.startswith("configuration/"):
                break
            sub_off = cur.offset
            cur.pos += 2 + ln
            version = cur.be32()
            body_start = cur.pos
            size = _CONFIG_SUBSECTIONS.get(name)
            if size is None:
                desc = self._config_schema_sub(name)
                if desc is None:
                    raise self._err(f"unknown configuration subsection {name!r} (no vmdesc to size it)", sub_off)
                decode_vmsd(cur, desc, name)
            elif size >= 0:
                cur.take(size)
            else:
                count = cur.be32()
                if count > 1024:
                    raise self._err(f"{count} capabilities is absurd", cur.offset - 4)
                for _ in range(count):
                    cur.cstr()
            subs.append(ConfigSubsection(name, version, bytes(cur.buf[body_start:cur.pos])))
        conf = Configuration(off, machine, subs)
        self.configuration = conf
        self.capabilities = set(conf.capabilities)
        if not self._page_size_fixed:
            bits = conf.page_bits
            if bits is not None:
                if not 8 <= bits <= 30:
                    raise self._err(f"target page bits {bits} is absurd", off)
                self.page_size = 1 << bits
        self._emit(conf, cur)
        self._state = _St.TOP

    def _config_schema_sub(self, name: str) -> dict[str, Any] | None:
        desc = self.schema.get(("configuration", 0))
        for sd in (desc or {}).get("subsections", []):
            if isinstance(sd, dict) and sd.get("vmsd_name") == name:
                return dict(sd)
        return None

    def _step_top(self) -> None:
        g = self._grammar
        if self._pkg_end and self.offset >= self._pkg_end[-1]:
            if self.offset > self._pkg_end[-1]:
                raise self._err(f"a record crosses the end of the PACKAGED blob at {self._pkg_end[-1]}")
            g.leave_package(self.offset)  # IllegalRecord if the blob's nested loader had not ended
            self._pkg_end.pop()
        cur = self._cursor()
        off = cur.offset
        t = cur.u8()
        cmd = cur.be16() if t == _T_COMMAND else None
        nxt = g.after(t, off, cmd)  # IllegalRecord unless the grammar table allows the record here
        if t == _T_START or t == _T_FULL:
            self._section_open(cur, off, t)
        elif t == _T_PART or t == _T_END:
            self._section_more(cur, off, t)
        elif cmd is not None:
            self._command(cur, off, cmd)
        else:  # EOF: the only other record the grammar allows among the records
            self._emit(EndOfFile(off), cur)
        if cmd is not None:
            need = g.missing(cmd)
            if need is not None:
                self._anomaly(off, Oddity.COMMAND_TOO_EARLY, f"{Command(cmd).name} before any {need.name}")
        g.go(nxt, cmd)  # the record was whole (Incomplete leaves the machine where it was)
        if nxt is Place.AFTER_EOF:
            self._state = _St.TRAILER
        elif nxt is Place.PACKAGE_DONE:
            if t == _T_EOF:
                self._anomaly(off, Oddity.EOF_IN_PACKAGE, "EOF inside a PACKAGED blob")
            self._state = _St.PKG_REST

    def _step_pkg_rest(self) -> None:
        """The bytes of a PACKAGED blob after its nested loader ended: QEMU never reads them."""
        cur = self._cursor()
        n = min(self._pkg_end[-1] - cur.offset, cur.remaining(), 1 << 20)
        if n <= 0:
            if self._pkg_end[-1] == cur.offset:
                self._state = _St.TOP
                return
            cur.need(1)
        off = cur.offset
        if not self._trailing_seen:
            self._trailing_seen = True
            self._anomaly(off, Oddity.TRAILING, f"bytes from offset {off} to the end of the PACKAGED blob at "
                                                f"{self._pkg_end[-1]} are never read")
        self._emit(Trailing(off, cur.take(n)), cur)

    def _section_open(self, cur: Cursor, off: int, t: int) -> None:
        """START or FULL: the header names the section; the handler follows its name (as QEMU's loader)."""
        sid = cur.be32()
        idstr = cur.cstr()
        instance = cur.be32()
        version = cur.be32()
        kind = SectionKind(t)
        if idstr == "ram":
            handler = "ram"
        elif idstr in LIVE_HANDLERS:
            handler = idstr
        else:
            handler = "opaque" if kind == SectionKind.START else "device"
        sec = Section(sid, idstr, instance, version, handler)
        res = self._lives.open(kind, sid, idstr, instance, off)
        self.sections[sid] = sec
        self._named[(idstr, instance)] = sec
        self._note(res, off)
        self._emit(SectionHeader(off, kind, sec), cur)
        self._begin_payload(sec, kind)

    def _section_more(self, cur: Cursor, off: int, t: int) -> None:
        """PART or END: the id names the section that holds it now (QEMU: load_section_id)."""
        sid = cur.be32()
        kind = SectionKind(t)
        res = self._lives.resolve(kind, sid, off)
        sec = self._named[(res.entry.idstr, res.entry.instance_id)]
        self._note(res, off)
        self._emit(SectionHeader(off, kind, sec), cur)
        self._begin_payload(sec, kind)

    def _note(self, res: Resolved, off: int) -> None:
        for oddity, what in res.oddities:
            self._anomaly(off, oddity, what)

    def _anomaly(self, off: int, oddity: Oddity, what: str) -> None:
        a = Anomaly(off, oddity.value, what)
        self.anomalies.append(a)
        self._queue.append(a)

    def _command(self, cur: Cursor, off: int, cmd: int) -> None:
        ln = cur.be16()
        fixed = COMMAND_LENGTHS.get(cmd, -1)
        if fixed == -1:
            raise self._err(f"unknown command {cmd}", off)
        if fixed is not None and ln != fixed:
            raise self._err(f"command {cmd} with argument length {ln}, expected {fixed}", off)
        data = cur.take(ln)
        ev = CommandEvent(off, cmd, data, len(self._pkg_end))
        if cmd == _CMD_ADVISE and ln == 16:
            self.postcopy_advise = (int.from_bytes(data[:8], "big"), int.from_bytes(data[8:], "big"))
        elif cmd == _CMD_ADVISE and ln not in (0, 16):
            raise self._err(f"POSTCOPY_ADVISE with argument length {ln}, expected 0 or 16", off)
        self._emit(ev, cur)
        if cmd == _CMD_PACKAGED:
            self._pkg_end.append(self.offset + int.from_bytes(data, "big"))

    def _begin_payload(self, sec: Section, kind: SectionKind) -> None:
        self._cur = sec
        self._kind = kind
        self._scan = 0
        self._rejected = None
        if sec.handler == "ram":
            if sec.version != 4:
                raise self._err(f"RAM section version {sec.version}, only 4 exists")
            self._state = _St.RAM
        elif sec.handler in LIVE_HANDLERS:
            ls = self._live.get(sec.section_id)
            if ls is None:
                ls = self._live[sec.section_id] = LiveState(sec.handler)
            ls.page_size = self._page()
            ls.kind = kind
            ls.started = False
            ls.runs = False
            self._state = _St.LIVE
        else:
            self._state = _St.DEVICE

    def _end_payload(self) -> None:
        self._state = _St.FOOTER

    def _step_footer(self) -> None:
        sec = self._cur
        assert sec is not None
        cur = self._cursor()
        if self.footers is None:
            if cur.remaining() < 5 and not cur.closed:
                raise Incomplete
            self.footers = (cur.remaining() >= 5 and cur.buf[cur.pos] == _T_FOOTER
                            and int.from_bytes(cur.buf[cur.pos + 1:cur.pos + 5], "big") == sec.section_id)
        if self.footers:
            off = cur.offset
            b = cur.u8()
            sid = cur.be32()
            if b != _T_FOOTER:
                raise self._err(f"section footer expected (0x{_T_FOOTER:02x}), found 0x{b:02x}", off)
            if sid != sec.section_id:
                raise self._err(f"footer names section id {sid}, expected {sec.section_id}", off)
            self._emit(Footer(off, sid), cur)
        self._cur = None
        self._state = _St.TOP

    # -- RAM -------------------------------------------------------------------------------
    def _step_ram(self) -> None:
        # The hot path: one iteration per RAM record.  State for the current block (its length,
        # its tally, its pass bitmap) is cached in locals and refreshed when the block changes.
        buf = self._buf
        page = self._page()
        mask = page - 1
        shift = page.bit_length() - 1
        end = self._end
        pos = self._pos
        base = self._base
        q = self._queue
        blocks = self.ram_blocks
        counting = self.count_pages
        tally: dict[str, list[int]] = {}
        span = pos  # counting mode: start of the page records not yet covered by a RamTally
        tracker = self.passes
        seen_all = tracker.seen
        unpack = _B64.unpack_from
        block = self._ram_block
        used = blocks.get(block) if block is not None else None
        c = seen = None
        if counting and block is not None:
            c = tally.setdefault(block, [0, 0, 0, 0])
            seen = seen_all.setdefault(block, bytearray())
        made = 0
        limit = 1 << 62 if counting else 256
        page_cont = _PAGE | _CONT
        zero_cont = _ZERO | _CONT
        sink = self.run_sink if counting else None
        view = memoryview(buf) if sink is not None else None
        page_stride = page + 8
        try:
            while made < limit:
                if pos + 8 > end:
                    break
                if counting and seen is not None and c is not None:
                    # Fast lane: runs of PAGE|CONTINUE and ZERO|CONTINUE records of the current block,
                    # the bulk of every stream; same checks and counts as the general path below.
                    n_page = n_zero = 0
                    seen_len = len(seen)
                    passes = tracker.passes
                    lim = used if used is not None else 1 << 64
                    while True:
                        w = unpack(buf, pos)[0]
                        f = w & mask
                        if passes and (f == page_cont or f == zero_cont):
                            # Batch lane: up to ``want`` records with one C call (struct), taken as a run
                            # when their words are consecutive addresses of one kind, the run is inside the
                            # block and none of its pages was seen in this pass; else one record below.
                            data = f == page_cont
                            stride = page_stride if data else 9
                            k = min(self._want, (end - pos) // stride)
                            if k >= 2:
                                k = 1 << (k.bit_length() - 1)
                                r = _run_length(buf, pos, w, page, k, data)
                                addr = w - f
                                i = addr >> shift
                                if r >= 2 and addr + r * page <= lim:
                                    j = (i + r - 1) >> 3
                                    if j >= seen_len:
                                        seen.extend(bytes(max(j + 1 - seen_len, 4096)))
                                        seen_len = len(seen)
                                    if claim_bits(seen, i, r):
                                        self._want = min(_MAX_RUN, 2 * k) if r == k else max(2, r)
                                        if data:
                                            n_page += r
                                        else:
                                            n_zero += r
                                        if sink is not None:
                                            assert view is not None and block is not None
                                            sink(block, f & ~_CONT, addr, r, view, pos + 8, page if data else 1,
                                                 stride, base + pos)
                                        pos += r * stride
                                        if pos + 8 > end:
                                            break
                                        continue
                                self._want = 2
                        if f == page_cont:
                            nxt = pos + 8 + page
                            if nxt > end:
                                break
                            n_page += 1
                        elif f == zero_cont:
                            nxt = pos + 9
                            if nxt > end:
                                break
                            n_zero += 1
                        else:
                            break
                        addr = w - f
                        if addr + page > lim:
                            if f == page_cont:
                                n_page -= 1
                            else:
                                n_zero -= 1
                            break  # the general path reports it
                        i = addr >> shift
                        j = i >> 3
                        if j >= seen_len:
                            seen.extend(bytes(max(j + 1 - seen_len, 4096)))
                            seen_len = len(seen)
                        bit = 1 << (i & 7)
                        if seen[j] & bit or not passes:
                            tracker.new_pass()
                            passes = tracker.passes
                        seen[j] |= bit
                        if sink is not None:
                            assert view is not None and block is not None
                            sink(block, f & ~_CONT, addr, 1, view, pos + 8, page if f == page_cont else 1,
                                 0, base + pos)
                        pos = nxt
                        if pos + 8 > end:
                            break
                    c[0] += n_page
                    c[1] += n_zero
                    made += n_page + n_zero
                    if pos + 8 > end:
                        break
                w = unpack(buf, pos)[0]
                flags = w & mask
                kind = flags & ~_CONT
                if kind in _PAGE_KINDS:
                    addr = w & ~mask
                    p = pos + 8
                    if flags & _CONT:
                        if block is None:
                            raise self._err("RAM page with CONTINUE but no previous block", base + pos)
                    else:
                        if p >= end:
                            break
                        n = buf[p]
                        if p + 1 + n > end:
                            break
                        name = buf[p + 1:p + 1 + n].decode("latin-1")
                        p += 1 + n
                        if name != block:
                            used = blocks.get(name)
                            if used is None and blocks:
                                raise self._err(f"RAM page for unknown block {name!r}", base + pos)
                            block = name
                            if counting:
                                c = tally.setdefault(block, [0, 0, 0, 0])
                                seen = seen_all.setdefault(block, bytearray())
                    if kind == _PAGE:
                        ln = page
                    elif kind == _ZERO:
                        ln = 1
                    elif kind == _XBZRLE:
                        if p + 3 > end:
                            break
                        if buf[p] != XBZRLE_ENCODING:
                            raise self._err(f"XBZRLE page with encoding byte 0x{buf[p]:02x}, expected "
                                            f"0x{XBZRLE_ENCODING:02x}", base + p)
                        dl = int.from_bytes(buf[p + 1:p + 3], "big")
                        if dl > page:
                            raise self._err(f"XBZRLE delta of {dl} bytes exceeds the page size {page}",
                                            base + p + 1)
                        ln = 3 + dl
                    else:
                        if p + 4 > end:
                            break
                        cl = int.from_bytes(buf[p:p + 4], "big")
                        if cl > 2 * page + 64:
                            raise self._err(f"compressed page of {cl} bytes is absurd (page size {page})",
                                            base + p)
                        ln = 4 + cl
                    if p + ln > end:
                        break
                    if used is not None and addr + page > used:
                        raise self._err(f"RAM page at 0x{addr:x} beyond the end of block {block!r} "
                                        f"(0x{used:x} bytes)", base + pos)
                    if counting:
                        assert c is not None and seen is not None
                        c[_KIND_INDEX[kind]] += 1
                        i = addr >> shift
                        j = i >> 3
                        if j >= len(seen):
                            seen.extend(bytes(max(j + 1 - len(seen), 4096)))
                        bit = 1 << (i & 7)
                        if seen[j] & bit or not tracker.passes:
                            tracker.new_pass()
                        seen[j] |= bit
                        if sink is not None:
                            assert view is not None and block is not None
                            sink(block, kind, addr, 1, view, p, ln, 0, base + pos)
                    else:
                        q.append(RamPage(base + pos, flags, addr, block, bytes(buf[p:p + ln])))
                    pos = p + ln
                    made += 1
                elif flags == _EOS:
                    if counting and pos > span:
                        q.append(self._tally(span, pos, tally))
                    q.append(RamControl(base + pos, flags, w & ~mask))
                    pos += 8
                    span = pos
                    self._end_payload()
                    return
                elif flags in _CONTROL:
                    if counting and pos > span:
                        q.append(self._tally(span, pos, tally))
                        tally = {}
                        if block is not None:
                            c = tally.setdefault(block, [0, 0, 0, 0])
                    q.append(RamControl(base + pos, flags, w & ~mask))
                    pos += 8
                    span = pos
                    made += 1
                elif flags == _MEM_SIZE:
                    total = w & ~mask
                    if total > MAX_RAM_TOTAL:
                        raise self._err(f"MEM_SIZE total of 0x{total:x} bytes is absurd", base + pos)
                    if counting and pos > span:
                        q.append(self._tally(span, pos, tally))
                    q.append(RamMemSize(base + pos, total))
                    pos += 8
                    span = pos
                    self._ram_left = total
                    self.ram_blocks = {}
                    self._state = _St.RAM_BLOCKS
                    return
                else:
                    raise self._err(f"unknown combination of RAM flags 0x{flags:x}", base + pos)
        finally:
            if view is not None:
                view.release()
            if counting and pos > span:
                q.append(self._tally(span, pos, tally))
            self._pos = pos
            self._ram_block = block
        if not made:
            if self._closed:
                raise TruncatedError("input ended inside a RAM record", base + pos, self._path())
            raise Incomplete

    def _tally(self, start: int, end: int, counts: dict[str, list[int]]) -> RamTally:
        raw: bytes | memoryview | None = None
        if self.keep_raw == "borrow":
            raw = memoryview(self._buf)[start:end]
        elif self.keep_raw:
            raw = bytes(self._buf[start:end])
        return RamTally(self._base + start, {k: v for k, v in counts.items() if any(v)}, self.passes.passes, raw)

    def _step_ram_block(self) -> None:
        if self._ram_left == 0:
            self._state = _St.RAM
            return
        cur = self._cursor()
        off = cur.offset
        name = cur.cstr()
        if not name:
            raise self._err("RAM block with an empty name", off)
        used = cur.be64()
        if used > self._ram_left:
            raise self._err(f"RAM block {name!r} of 0x{used:x} bytes exceeds the 0x{self._ram_left:x} "
                            "left of the MEM_SIZE total", off)
        left = self._ram_left - used
        page_size = addr = None
        if self.postcopy_advise is not None:
            if left:
                if cur.peek8() == 0:
                    page_size = cur.be64()
            else:
                cur.need(8)
                v = int.from_bytes(cur.buf[cur.pos:cur.pos + 8], "big")
                if v >= self._page() and v & (v - 1) == 0:
                    page_size = cur.be64()
        if "x-ignore-shared" in self.capabilities:
            addr = cur.be64()
        mapped = None
        if "mapped-ram" in self.capabilities:
            hoff = cur.offset
            mapped = MappedRamHeader(cur.be32(), cur.be64(), cur.be64(), cur.be64())
            if mapped.version != 1:
                raise self._err(f"mapped-ram header version {mapped.version}, only 1 exists", hoff)
        self.ram_blocks[name] = used
        self._ram_left = left
        self._emit(RamBlock(off, name, used, page_size, addr, mapped), cur)
        if mapped is not None and mapped.pages_offset:
            self._start_mapped(name, used, mapped, cur.offset)

    def _start_mapped(self, name: str, used: int, h: MappedRamHeader, here: int) -> None:
        fo = self.file_offset
        page = h.page_size or self._page()
        npages = used // page
        bmsize = (npages + 63) // 64 * 8
        if bmsize > MAX_BITMAP or page < 256 or page & (page - 1):
            raise self._err(f"mapped-ram block {name!r}: page size {page} / bitmap of {bmsize} bytes is absurd",
                            here - 28)
        bm = h.bitmap_offset - fo
        pages = h.pages_offset - fo
        region_end = pages + used
        if not here <= bm <= bm + bmsize <= pages or pages % page:
            raise self._err(f"mapped-ram header of block {name!r} has an impossible layout "
                            f"(bitmap at 0x{h.bitmap_offset:x}, pages at 0x{h.pages_offset:x})", here - 28)
        self._mapped = [(bm, name, "gap"), (bm + bmsize, name, "bitmap"), (region_end, name, "gap")]
        self._state = _St.MAPPED

    def _step_mapped(self) -> None:
        while self._mapped and self._mapped[0][0] <= self.offset and self._mapped[0][2] == "gap":
            self._mapped.pop(0)
        if not self._mapped:
            self._state = _St.RAM_BLOCKS
            return
        mark, name, what = self._mapped[0]
        cur = self._cursor()
        if what == "bitmap":
            n = mark - cur.offset
            off = cur.offset
            data = cur.take(n)
            self._mapped.pop(0)
            self._emit(MappedRamBitmap(off, name, data), cur)
            return
        n = min(mark - cur.offset, cur.remaining(), 1 << 20)
        if n <= 0:
            cur.need(1)
        off = cur.offset
        self._emit(MappedRamData(off, name, n, cur.take(n)), cur)

    # -- special live sections ---------------------------------------------------------------
    def _step_live(self) -> None:
        sec = self._cur
        assert sec is not None
        ls = self._live[sec.section_id]
        cur = self._cursor()
        rec, end = parse_live_record(cur, ls)
        self._emit(rec, cur)
        if end:
            self._end_payload()

    # -- device sections -------------------------------------------------------------------------
    def _step_device(self) -> None:
        sec = self._cur
        assert sec is not None
        start = self._pos
        desc = self.schema.get((sec.idstr, sec.instance_id))
        if self.footers is None and desc is not None:
            # No self-delimiting section came first: size this one from its description and
            # see whether a footer follows it.
            cur = self._cursor()
            try:
                decode_vmsd(cur, desc, self._path())
                cur.need(5)
                self.footers = (cur.buf[cur.pos] == _T_FOOTER
                                and int.from_bytes(cur.buf[cur.pos + 1:cur.pos + 5], "big") == sec.section_id)
            except DecodeError:
                pass  # the description does not fit: look for a footer instead
        if self.footers is not False:
            n = self._find_footer(sec)
        else:
            if desc is None:
                raise self._err(f"cannot find the end of section {sec.idstr!r}: the stream has no section "
                                "footers and no vmdesc entry describes it (pass a schema)")
            cur = self._cursor()
            decode_vmsd(cur, desc, self._path())
            n = cur.pos - start
        data = bytes(self._buf[start:start + n])
        self._queue.append(DeviceState(self._base + start, sec, data))
        self._pos = start + n
        self._end_payload()

    def _find_footer(self, sec: Section) -> int:
        buf = self._buf
        start = self._pos
        end = self._end
        pat = bytes((_T_FOOTER,)) + sec.section_id.to_bytes(4, "big")
        i = start + self._scan
        while True:
            j = buf.find(pat, i, end)
            if j < 0:
                self._scan = max(0, end - start - 4)
                if end - start > MAX_DEVICE_SECTION:
                    raise self._err(f"no section footer within {MAX_DEVICE_SECTION} bytes", self._base + start)
                if self._closed:
                    if self._rejected is not None and self._rejected - self._base + 5 >= end:
                        raise TruncatedError("input ended right after this section's footer (no EOF record)",
                                             self._rejected + 5, self._path())
                    if self._rejected is not None:
                        r = self._rejected
                        raise DecodeError(f"the footer of this section at offset {r} is followed by an "
                                          f"invalid record (type byte 0x{buf[r - self._base + 5]:02x})",
                                          r + 5, self._path())
                    raise TruncatedError("input ended before the section footer", self._base + end,
                                         self._path())
                raise Incomplete
            verdict = self._plausible_next(j + 5)
            if verdict is None:
                self._scan = j - start
                raise Incomplete
            if verdict:
                self._rejected = None
                self.footers = True
                return j - start
            if self._rejected is None:
                self._rejected = self._base + j
            i = j + 1

    def _plausible_next(self, p: int) -> bool | None:
        """Is there a plausible record at buffer position p?  None = cannot tell yet."""
        if p >= self._end:
            return False if self._closed else None
        if not self._grammar.allows(self._buf[p]):
            return False
        return self._looks_like_record(p, True)

    def _looks_like_record(self, p: int, top: bool) -> bool | None:
        buf = self._buf
        end = self._end
        if p >= end:
            return False if self._closed else None
        t = buf[p]
        if t == _T_EOF:
            if not top:
                return False
            if p + 1 == end:
                return True if self._closed else None
            if self._grammar.place is Place.PACKAGED or buf[p + 1] == _T_VMDESC:
                return True
            # QEMU reads only a vmdesc after EOF and ignores the rest: plausible if a record follows
            return self._looks_like_record(p + 1, False)
        if t == _T_START or t == _T_FULL:
            if p + 6 > end:
                return False if self._closed else None
            n = buf[p + 5]
            if n == 0 or p + 6 + n + 8 > end:
                return False if (self._closed or n == 0) else None
            name = buf[p + 6:p + 6 + n]
            return all(0x20 <= c < 0x7F for c in name)
        if t == _T_PART or t == _T_END:
            if p + 5 > end:
                return False if self._closed else None
            return self._lives.holds(int.from_bytes(buf[p + 1:p + 5], "big"))
        if t == _T_COMMAND:
            if p + 5 > end:
                return False if self._closed else None
            cmd = int.from_bytes(buf[p + 1:p + 3], "big")
            return cmd in COMMAND_LENGTHS
        return False

    # -- the end ---------------------------------------------------------------------------------
    def _step_trailer(self) -> None:
        cur = self._cursor()
        if cur.remaining() == 0:
            if cur.closed:
                self._state = _St.DONE
                return
            raise Incomplete
        off = cur.offset
        if cur.peek8() != _T_VMDESC:
            self._state = _St.AFTER
            return
        nxt = self._grammar.after(_T_VMDESC, off)
        cur.pos += 1
        n = cur.be32()
        if n > MAX_VMDESC:
            raise self._err(f"vmdesc of {n} bytes is absurd", off + 1)
        raw = cur.take(n)
        self._emit(VmDescription(off, raw), cur)
        self._grammar.go(nxt)
        self._state = _St.AFTER

    def _step_after(self) -> None:
        cur = self._cursor()
        n = cur.remaining()
        if n == 0:
            if cur.closed:
                self._state = _St.DONE
                return
            raise Incomplete
        n = min(n, 1 << 20)
        off = cur.offset
        if not self._trailing_seen:
            self._trailing_seen = True
            self._grammar.trailing()
            self._anomaly(off, Oddity.TRAILING, f"bytes from offset {off} on are neither a record nor a vmdesc")
        self._emit(Trailing(off, cur.take(n)), cur)
