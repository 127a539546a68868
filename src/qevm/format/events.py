"""Events: the lossless model of a stream.

The parser turns bytes into a sequence of events; ``encode()`` on each event gives back
exactly the bytes it was decoded from, so ``b"".join(e.encode() for e in events)`` is the
original stream.  Every event carries ``offset``, its absolute position in the stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qevm.codec.wire import be16, be32, be64, cstr
from qevm.errors import EncodeError
from qevm.format.records import MAGIC, VERSION, Command, RamFlag, RecordType, SectionKind, ram_record_head

__all__ = [
    "SectionKind", "RamFlag", "Command", "Section", "Event", "FileHeader", "ConfigSubsection",
    "Configuration", "SectionHeader", "RamMemSize", "MappedRamHeader", "RamBlock", "RamPage",
    "RamControl", "RamTally", "PassTracker", "MappedRamBitmap", "MappedRamData", "LiveRecord", "DeviceState", "Footer",
    "CommandEvent", "EndOfFile", "VmDescription", "Trailing", "Anomaly", "MAGIC", "VERSION", "RecordType",
]

_FOOTER = bytes((RecordType.FOOTER,))
_COMMAND = bytes((RecordType.COMMAND,))
_EOF = bytes((RecordType.EOF,))
_VMDESC = bytes((RecordType.VMDESCRIPTION,))


@dataclass(slots=True)
class Section:
    """Identity of a section, shared by its START/PART/END records."""

    section_id: int
    idstr: str
    instance_id: int
    version: int
    handler: str  # "ram", "spapr/htab", ..., "device" (vmsd/old-style), "opaque" (unknown live)


class Event:
    __slots__ = ()
    offset: int

    def encode(self) -> bytes:
        raise NotImplementedError


@dataclass(slots=True)
class FileHeader(Event):
    offset: int
    magic: int = MAGIC
    version: int = VERSION

    def encode(self) -> bytes:
        return be32(self.magic) + be32(self.version)


@dataclass(slots=True)
class ConfigSubsection:
    name: str
    version: int
    body: bytes


@dataclass(slots=True)
class Configuration(Event):
    """Record 0x07: machine type name and optional subsections (page bits, capabilities, uuid)."""

    offset: int
    machine: str
    subsections: list[ConfigSubsection] = field(default_factory=list)

    def sub(self, name: str) -> ConfigSubsection | None:
        for s in self.subsections:
            if s.name == name:
                return s
        return None

    @property
    def page_bits(self) -> int | None:
        s = self.sub("configuration/target-page-bits")
        return int.from_bytes(s.body[:4], "big") if s and len(s.body) >= 4 else None

    @property
    def capabilities(self) -> list[str]:
        s = self.sub("configuration/capabilities")
        if not s:
            return []
        out, b = [], s.body
        n, pos = int.from_bytes(b[:4], "big"), 4
        for _ in range(n):
            ln = b[pos]
            out.append(b[pos + 1:pos + 1 + ln].decode("latin-1"))
            pos += 1 + ln
        return out

    @property
    def uuid(self) -> str | None:
        s = self.sub("configuration/uuid")
        if not s:
            return None
        h = s.body.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def encode(self) -> bytes:
        name = self.machine.encode("latin-1")
        out = bytearray(bytes((RecordType.CONFIGURATION,)) + be32(len(name)) + name)
        for s in self.subsections:
            out += bytes((RecordType.SUBSECTION,)) + cstr(s.name) + be32(s.version) + s.body
        return bytes(out)


@dataclass(slots=True)
class SectionHeader(Event):
    offset: int
    kind: SectionKind
    section: Section

    def encode(self) -> bytes:
        s = self.section
        if self.kind in (SectionKind.START, SectionKind.FULL):
            return (bytes((self.kind,)) + be32(s.section_id) + cstr(s.idstr) + be32(s.instance_id)
                    + be32(s.version))
        return bytes((self.kind,)) + be32(s.section_id)


@dataclass(slots=True)
class RamMemSize(Event):
    """The MEM_SIZE record word; RamBlock events follow, one per block."""

    offset: int
    total: int
    flags: int = RamFlag.MEM_SIZE

    def encode(self) -> bytes:
        return be64(self.total | self.flags)


@dataclass(slots=True)
class MappedRamHeader:
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int

    def encode(self) -> bytes:
        return be32(self.version) + be64(self.page_size) + be64(self.bitmap_offset) + be64(self.pages_offset)


@dataclass(slots=True)
class RamBlock(Event):
    offset: int
    name: str
    used_length: int
    page_size: int | None = None  # postcopy: block host page size
    addr: int | None = None  # x-ignore-shared: guest physical address
    mapped: MappedRamHeader | None = None

    def encode(self) -> bytes:
        out = cstr(self.name) + be64(self.used_length)
        if self.page_size is not None:
            out += be64(self.page_size)
        if self.addr is not None:
            out += be64(self.addr)
        if self.mapped is not None:
            out += self.mapped.encode()
        return out


@dataclass(slots=True)
class RamPage(Event):
    """One page record.  ``payload`` is every byte after the word and the optional block name:
    ZERO: the fill byte; PAGE: the page; XBZRLE: 0x01, be16 length, delta; COMPRESS_PAGE: be32 length, zlib."""

    offset: int
    flags: int
    addr: int
    block: str
    payload: bytes

    @property
    def kind(self) -> int:
        return self.flags & ~RamFlag.CONTINUE

    @property
    def named(self) -> bool:
        return not self.flags & RamFlag.CONTINUE

    def encode(self) -> bytes:
        return ram_record_head(self.addr, self.flags, self.block) + self.payload


class PassTracker:
    """Counts passes over RAM: a pass ends when a page already sent in it is sent again.
    ``seen`` holds, per block, a bitmap of the pages sent in the current pass."""

    __slots__ = ("passes", "seen")

    def __init__(self) -> None:
        self.passes = 0
        self.seen: dict[str, bytearray] = {}

    def new_pass(self) -> None:
        self.passes += 1
        for bm in self.seen.values():
            bm[:] = bytes(len(bm))

    def see(self, block: str, index: int) -> None:
        seen = self.seen.get(block)
        if seen is None:
            seen = self.seen[block] = bytearray()
        j = index >> 3
        if j >= len(seen):
            seen.extend(bytes(j + 1 - len(seen)))
        bit = 1 << (index & 7)
        if seen[j] & bit or not self.passes:
            self.new_pass()
        seen[j] |= bit


@dataclass(slots=True)
class RamTally(Event):
    """A run of RAM page records, summarised: emitted instead of RamPage events when the parser
    runs in counting mode (``Parser(count_pages=True)``), the fast path for summaries and copies.
    ``counts`` maps a block to [normal, zero, xbzrle, compressed]; ``passes`` is the running number
    of passes over RAM; ``raw`` holds the records' exact bytes (None when the parser was told not
    to keep them, ``keep_raw=False``)."""

    offset: int
    counts: dict[str, list[int]]
    passes: int
    raw: bytes | memoryview | None

    def encode(self) -> bytes:
        if self.raw is None:
            raise EncodeError("this RAM tally was made without keeping the page bytes (keep_raw=False)")
        return bytes(self.raw)


@dataclass(slots=True)
class RamControl(Event):
    """EOS, MULTIFD_FLUSH or HOOK: a bare record word."""

    offset: int
    flags: int
    addr: int = 0

    def encode(self) -> bytes:
        return be64(self.addr | self.flags)


@dataclass(slots=True)
class MappedRamBitmap(Event):
    offset: int
    block: str
    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(slots=True)
class MappedRamData(Event):
    """Bytes of a mapped-ram region other than the bitmap (pages, holes).  ``data`` is None when
    the source skipped them (seekable input); ``length`` is always set."""

    offset: int
    block: str
    length: int
    data: bytes | None

    def encode(self) -> bytes:
        if self.data is None:
            raise EncodeError("mapped-ram region was skipped while reading; its bytes are not in the event")
        return self.data


@dataclass(slots=True)
class LiveRecord(Event):
    """One record of a special live section payload (spapr/htab, s390 storage attributes,
    dirty-bitmap, block).  ``info`` is the decoded view, ``raw`` the exact bytes."""

    offset: int
    handler: str
    kind: str
    info: dict[str, Any]
    raw: bytes

    def encode(self) -> bytes:
        return self.raw


@dataclass(slots=True)
class DeviceState(Event):
    """The payload of a FULL section (or of an opaque live section chunk), as raw bytes.
    Decode it into named fields with ``qevm.vmsd.decode_vmsd`` and the vmdesc entry."""

    offset: int
    section: Section
    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(slots=True)
class Footer(Event):
    offset: int
    section_id: int

    def encode(self) -> bytes:
        return _FOOTER + be32(self.section_id)


@dataclass(slots=True)
class CommandEvent(Event):
    offset: int
    cmd: int
    data: bytes
    depth: int = 0  # > 0 inside a PACKAGED blob

    @property
    def name(self) -> str:
        try:
            return Command(self.cmd).name
        except ValueError:
            return f"UNKNOWN_{self.cmd}"

    def encode(self) -> bytes:
        return _COMMAND + be16(self.cmd) + be16(len(self.data)) + self.data


@dataclass(slots=True)
class EndOfFile(Event):
    offset: int

    def encode(self) -> bytes:
        return _EOF


@dataclass(slots=True)
class VmDescription(Event):
    offset: int
    raw: bytes

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.raw)
        return doc

    def encode(self) -> bytes:
        return _VMDESC + be32(len(self.raw)) + self.raw


@dataclass(slots=True)
class Trailing(Event):
    """Bytes after the end of the stream that are not a vmdesc trailer (kept, reported)."""

    offset: int
    data: bytes

    def encode(self) -> bytes:
        return self.data


@dataclass(slots=True)
class Anomaly(Event):
    """Something QEMU's loader goes along with but no correct source writes: a PART after its section's
    END, a second START, trailing bytes, ... (``qevm.format.grammar.Oddity``).  It carries no bytes of its
    own (``encode()`` is empty), so a stream with anomalies still round-trips byte-identically."""

    offset: int
    code: str
    message: str

    def encode(self) -> bytes:
        return b""
