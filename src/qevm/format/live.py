"""Record codecs for the special live sections and the command table.

Live sections other than ``ram`` have no vmdesc entry; their payloads are lists of
self-delimiting records (facts from QEMU 7.2 hw/ppc/spapr.c, hw/s390x/s390-stattrib.c,
migration/block-dirty-bitmap.c, migration/block.c).  Each parser reads one record,
returns it with a flag telling whether the payload ended, and keeps the raw bytes so the
record encodes back exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

from qevm.codec.wire import Cursor, be32, be64, cstr
from qevm.format.events import Command, LiveRecord, SectionKind

__all__ = ["LiveState", "LIVE_HANDLERS", "parse_live_record", "decode_command", "COMMAND_LENGTHS",
           "HTAB_NO_HPT", "StattrFlag", "DirtyBitmapFlag", "BlockFlag", "BLOCK_CHUNK", "BLOCK_SECTOR_BITS",
           "DirtyBitmapStartFlag", "encode_block_record", "encode_dbitmap_record"]

#: spapr/htab START header value of a guest without a hash page table (hw/ppc/spapr.c)
HTAB_NO_HPT = 0xFFFFFFFF


class StattrFlag(IntEnum):
    """s390-storage_attributes record word flags (hw/s390x/s390-stattrib.c), below the page address."""

    EOS = 0x01
    MORE = 0x02
    ERROR = 0x04
    DONE = 0x08


class DirtyBitmapFlag(IntFlag):
    """dirty-bitmap record flags (migration/block-dirty-bitmap.c); EXTRA_FLAGS widens them to 16, then 32 bits."""

    EOS = 0x01
    ZEROES = 0x02
    BITMAP_NAME = 0x04
    DEVICE_NAME = 0x08
    START = 0x10
    COMPLETE = 0x20
    BITS = 0x40
    EXTRA_FLAGS = 0x80


class BlockFlag(IntFlag):
    """block-migration record word flags (migration/block.c), below the sector number (9 bits)."""

    DEVICE_BLOCK = 0x01
    EOS = 0x02
    PROGRESS = 0x04
    ZERO_BLOCK = 0x08


class DirtyBitmapStartFlag(IntFlag):
    """The bitmap flags byte of a dirty-bitmap START record (migration/block-dirty-bitmap.c)."""

    ENABLED = 0x01
    PERSISTENT = 0x02
    AUTOLOAD = 0x04  # older QEMUs; ignored on load
    RESERVED = 0xF8


#: block-migration records carry the sector number above the flags: sector << 9 | flags
BLOCK_SECTOR_BITS = 9


@dataclass(slots=True)
class LiveState:
    """Per-section parsing state that lives across chunks (names omitted when repeated, ...)."""

    handler: str
    page_size: int = 4096
    kind: SectionKind = SectionKind.START
    started: bool = False  # a chunk header was read in the current payload
    runs: bool = False  # spapr: runs follow the header
    names: dict[str, str] = field(default_factory=dict)


def _htab(cur: Cursor, st: LiveState) -> tuple[str, dict[str, Any], bool]:
    if not st.started:
        st.started = True
        hdr = cur.be32()
        if st.kind == SectionKind.START:
            info = {"htab_shift": hdr} if hdr != HTAB_NO_HPT else {"no_hpt": True}
            return "header", info, True
        if hdr == 0:
            st.runs = True
            return "header", {"value": 0}, False
        return "header", {"no_hpt": hdr == HTAB_NO_HPT, "value": hdr}, True
    index = cur.be32()
    n_valid = cur.be16()
    n_invalid = cur.be16()
    if index == 0 and n_valid == 0 and n_invalid == 0:
        return "end", {}, True
    cur.take(n_valid * 16)
    return "run", {"index": index, "n_valid": n_valid, "n_invalid": n_invalid}, False


def _stattr(cur: Cursor, st: LiveState) -> tuple[str, dict[str, Any], bool]:
    w = cur.be64()
    mask = st.page_size - 1
    flags, addr = w & mask, w & ~mask
    if flags == StattrFlag.EOS:
        return "eos", {}, True
    if flags == StattrFlag.MORE:
        count = cur.be64()
        if count > (1 << 28):
            raise cur.error(f"storage attribute count {count} is absurd", cur.offset - 8)
        cur.take(count)
        return "more", {"start_gfn": addr // st.page_size, "count": count}, False
    if flags == StattrFlag.ERROR:
        return "error", {}, False
    if flags == StattrFlag.DONE:
        return "done", {}, False
    raise cur.error(f"unknown storage-attribute flags 0x{flags:x}", cur.offset - 8)


def _dbitmap(cur: Cursor, st: LiveState) -> tuple[str, dict[str, Any], bool]:
    F = DirtyBitmapFlag
    flags = cur.u8()
    if flags & F.EXTRA_FLAGS:
        flags = (flags << 8) | cur.u8()
        if flags & F.EXTRA_FLAGS:
            flags = (flags << 16) | cur.be16()
    info: dict[str, Any] = {"flags": flags}
    if flags & F.DEVICE_NAME:
        st.names["node"] = cur.cstr()
    if flags & F.BITMAP_NAME:
        st.names["bitmap"] = cur.cstr()
    info["node"] = st.names.get("node")
    info["bitmap"] = st.names.get("bitmap")
    kind = "eos"
    if flags & F.START:
        kind = "start"
        info["granularity"] = cur.be32()
        info["bitmap_flags"] = cur.u8()
    elif flags & F.COMPLETE:
        kind = "complete"
    elif flags & F.BITS:
        kind = "bits"
        info["start_sector"] = cur.be64()
        info["nr_sectors"] = cur.be32()
        if not flags & F.ZEROES:
            size = cur.be64()
            if size > 10 * 1024 * 1024:
                raise cur.error(f"dirty-bitmap chunk of {size} bytes is absurd", cur.offset - 8)
            cur.take(size)
            info["buf_size"] = size
        else:
            info["zeroes"] = True
    return kind, info, bool(flags & F.EOS)


def encode_dbitmap_record(flags: int, *, node: str | None = None, bitmap: str | None = None,
                          granularity: int = 0, bitmap_flags: int = 0, start_sector: int = 0, nr_sectors: int = 0,
                          bits: bytes | None = None) -> bytes:
    """One dirty-bitmap record, the bytes ``_dbitmap`` reads: flags (one byte, as QEMU writes them),
    the node and bitmap names when ``node`` / ``bitmap`` are given (DEVICE_NAME / BITMAP_NAME are
    added), then START's granularity and bitmap flags, or BITS' range and buffer (ZEROES: none)."""
    F = DirtyBitmapFlag
    if node is not None:
        flags |= F.DEVICE_NAME
    if bitmap is not None:
        flags |= F.BITMAP_NAME
    out = bytearray((flags,))
    if node is not None:
        out += cstr(node)
    if bitmap is not None:
        out += cstr(bitmap)
    if flags & F.START:
        out += be32(granularity) + bytes((bitmap_flags,))
    elif flags & F.BITS:
        out += be64(start_sector) + be32(nr_sectors)
        if not flags & F.ZEROES:
            assert bits is not None
            out += be64(len(bits)) + bits
    return bytes(out)


BLOCK_CHUNK = 1 << 20


def encode_block_record(flags: int, value: int = 0, device: str | None = None,
                        data: bytes | bytearray | memoryview | None = None) -> bytes:
    """One block-migration record, the bytes ``_block`` reads: ``value << 9 | flags`` (the sector
    of a DEVICE_BLOCK, the percentage of a PROGRESS), then for DEVICE_BLOCK the device name and,
    unless ZERO_BLOCK, the BLOCK_CHUNK bytes (``data`` padded with zeros to the full chunk, as the
    wire always carries one)."""
    head = be64(value << BLOCK_SECTOR_BITS | flags)
    if not flags & BlockFlag.DEVICE_BLOCK:
        return head
    assert device is not None
    out = head + cstr(device)
    if flags & BlockFlag.ZERO_BLOCK:
        return out
    assert data is not None
    pad = BLOCK_CHUNK - len(data)
    return out + bytes(data) + (bytes(pad) if pad > 0 else b"")


def _block(cur: Cursor, st: LiveState) -> tuple[str, dict[str, Any], bool]:
    w = cur.be64()
    flags, sector = w & ((1 << BLOCK_SECTOR_BITS) - 1), w >> BLOCK_SECTOR_BITS
    kind = "eos"
    info: dict[str, Any] = {"flags": flags}
    if flags & BlockFlag.DEVICE_BLOCK:
        kind = "block"
        info["device"] = cur.cstr()
        info["sector"] = sector
        if flags & BlockFlag.ZERO_BLOCK:
            info["zero"] = True
        else:
            cur.take(BLOCK_CHUNK)
    elif flags & BlockFlag.PROGRESS:
        kind = "progress"
        info["percent"] = sector
    elif not flags & BlockFlag.EOS:
        raise cur.error(f"unknown block-migration flags 0x{flags:x}", cur.offset - 8)
    return kind, info, bool(flags & BlockFlag.EOS)


LIVE_HANDLERS: dict[str, Callable[[Cursor, LiveState], tuple[str, dict[str, Any], bool]]] = {
    "spapr/htab": _htab,
    "s390-storage_attributes": _stattr,
    "dirty-bitmap": _dbitmap,
    "block": _block,
}


def parse_live_record(cur: Cursor, st: LiveState) -> tuple[LiveRecord, bool]:
    """Parse one record at the cursor; returns the record and whether the payload ended."""
    start = cur.pos
    off = cur.offset
    kind, info, end = LIVE_HANDLERS[st.handler](cur, st)
    return LiveRecord(off, st.handler, kind, info, bytes(cur.buf[start:cur.pos])), end


#: fixed argument lengths (None = variable); commands absent here are unknown
COMMAND_LENGTHS: dict[int, int | None] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: None,  # 0 or 16
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: None,
    Command.SWITCHOVER_START: 0,
}


def decode_command(cmd: int, data: bytes) -> dict[str, Any]:
    """A readable view of a command's arguments."""
    b = data
    if cmd == Command.PING and len(b) == 4:
        return {"value": int.from_bytes(b, "big")}
    if cmd == Command.PACKAGED and len(b) == 4:
        return {"length": int.from_bytes(b, "big")}
    if cmd == Command.POSTCOPY_ADVISE and len(b) == 16:
        return {"page_size_summary": int.from_bytes(b[:8], "big"), "target_page_size": int.from_bytes(b[8:], "big")}
    if cmd == Command.POSTCOPY_RAM_DISCARD and len(b) >= 2:
        n = b[1]
        name = b[2:2 + n].decode("latin-1")
        ranges = []
        pos = 2 + n + 1  # a NUL follows the name
        while pos + 16 <= len(b):
            ranges.append([int.from_bytes(b[pos:pos + 8], "big"), int.from_bytes(b[pos + 8:pos + 16], "big")])
            pos += 16
        return {"version": b[0], "block": name, "ranges": ranges}
    if cmd == Command.RECV_BITMAP and len(b) >= 1:
        return {"block": b[1:1 + b[0]].decode("latin-1")}
    return {"data": b.hex()} if b else {}
