"""Multifd channels, sans I/O: the initial packet, the RAM packet, the device-state packet header,
and a push decoder for one channel's bytes (format.md §3.11, QEMU 10.0's migration/multifd.h).

    MultifdInit(channel=1).encode()                        # 64 bytes, once per channel
    MultifdPacket(flags, 0, block, normal, zero).encode(4096)   # header of packet_len(4096) bytes
    dec = ChannelDecoder(page_size=4096)
    for item in dec.feed(data): ...                        # MultifdInit, then (MultifdPacket, payload)

Every multi-byte field is big-endian.  A packet's page data follows its header: ``normal`` pages
of ``page_size`` bytes when no compression flag is set (only the count decides, as QEMU's
receiver: ``next_packet_size`` may be stale on an empty packet), ``next_packet_size`` bytes of
compressed data otherwise.

Also here: ``mapped_ram_header``, where a mapped-ram block's bitmap and pages go (format.md §4.1),
shared by the engine's writer and reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qevm.errors import DecodeError
from qevm.format.events import MappedRamHeader

__all__ = ["MULTIFD_MAGIC", "MULTIFD_VERSION", "FLAG_SYNC", "FLAG_COMPRESSION_MASK", "FLAG_DEVICE_STATE",
           "PACKET_BYTES", "INIT_SIZE", "page_count", "packet_len", "MultifdInit", "MultifdPacket",
           "DeviceStatePacket", "ChannelDecoder", "MAPPED_RAM_ALIGN", "mapped_ram_header", "bitmap_size"]

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
FLAG_SYNC = 0x01
#: compression method bits (10.0: zlib 0x02, zstd 0x04, qpl 0x08, uadk 0x10, qatzip 0x20)
FLAG_COMPRESSION_MASK = 0x3E
FLAG_DEVICE_STATE = 0x40
#: bytes of guest pages one packet can describe (MULTIFD_PACKET_SIZE)
PACKET_BYTES = 512 << 10
INIT_SIZE = 64
_FIXED = 320  # the RAM packet header before the offsets array

_INIT = struct.Struct(">II16sB7x32x")
_HDR = struct.Struct(">III")
_RAM = struct.Struct(">IIIIIIQII24x256s")
_DEV = struct.Struct(">256sII")


def page_count(page_size: int) -> int:
    """Offsets one packet has room for (``multifd_ram_page_count``): 128 for 4 KiB pages."""
    return PACKET_BYTES // page_size


def packet_len(page_size: int) -> int:
    """Size of a RAM packet header: 1344 bytes for 4 KiB pages."""
    return _FIXED + 8 * page_count(page_size)


@dataclass(slots=True)
class MultifdInit:
    """``MultiFDInit_t``: the first 64 bytes of every multifd channel."""

    channel: int
    uuid: bytes = bytes(16)
    magic: int = MULTIFD_MAGIC
    version: int = MULTIFD_VERSION

    def encode(self) -> bytes:
        return _INIT.pack(self.magic, self.version, self.uuid, self.channel)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> MultifdInit:
        if len(buf) < INIT_SIZE:
            raise DecodeError(f"multifd initial packet: {len(buf)} bytes, expected {INIT_SIZE}", offset, "multifd")
        magic, version, uuid, ch = _INIT.unpack_from(buf)
        if magic != MULTIFD_MAGIC:
            raise DecodeError(f"multifd: received packet magic {magic:x} expected {MULTIFD_MAGIC:x}", offset,
                              "multifd")
        if version != MULTIFD_VERSION:
            raise DecodeError(f"multifd: received packet version {version} expected {MULTIFD_VERSION}", offset,
                              "multifd")
        return cls(ch, bytes(uuid), magic, version)


@dataclass(slots=True)
class MultifdPacket:
    """``MultiFDPacket_t`` (QEMU >= 9.0 layout): a RAM packet or, with ``FLAG_SYNC`` and no pages, a
    sync packet.  ``offsets`` lists the normal pages then the zero pages, byte offsets in ``block``."""

    flags: int
    packet_num: int
    block: str = ""
    normal: int = 0
    zero: int = 0
    offsets: list[int] = field(default_factory=list)
    next_packet_size: int = 0
    # None: page_count(page_size) when pages are listed, else 0 (a sync packet), as QEMU fills it
    pages_alloc: int | None = field(default=None, compare=False)

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    def payload_size(self, page_size: int) -> int:
        """Bytes of page data after the header."""
        if not self.normal:
            return 0
        if self.flags & FLAG_COMPRESSION_MASK:
            return self.next_packet_size
        return self.normal * page_size

    def encode(self, page_size: int) -> bytes:
        n = page_count(page_size)
        if len(self.offsets) != self.normal + self.zero or len(self.offsets) > n:
            raise ValueError(f"multifd packet: {len(self.offsets)} offsets for {self.normal}+{self.zero} pages")
        alloc = self.pages_alloc if self.pages_alloc is not None else (n if self.offsets else 0)
        head = _RAM.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.flags, alloc, self.normal, self.next_packet_size,
                         self.packet_num, self.zero, 0, self.block.encode()[:255])
        return head + struct.pack(f">{len(self.offsets)}Q", *self.offsets) + bytes(8 * (n - len(self.offsets)))

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, page_size: int, offset: int = 0) -> MultifdPacket:
        """A whole header (``packet_len(page_size)`` bytes) with QEMU's receiver checks."""
        n = page_count(page_size)
        if len(buf) < _FIXED + 8 * n:
            raise DecodeError(f"multifd packet header: {len(buf)} bytes, expected {_FIXED + 8 * n}", offset,
                              "multifd")
        (magic, version, flags, alloc, normal, nps, num, zero, _u, name) = _RAM.unpack_from(buf)
        if magic != MULTIFD_MAGIC:
            raise DecodeError(f"multifd: received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}",
                              offset, "multifd")
        if version != MULTIFD_VERSION:
            raise DecodeError(f"multifd: received packet version {version} and expected version {MULTIFD_VERSION}",
                              offset, "multifd")
        if alloc > n:
            raise DecodeError(f"multifd: received packet with {alloc} pages, expected {n}", offset, "multifd")
        if normal > alloc:
            raise DecodeError(f"multifd: received packet with {normal} non-zero pages, which exceeds maximum "
                              f"expected pages {alloc}", offset, "multifd")
        if zero > alloc - normal:
            raise DecodeError(f"multifd: received packet with {zero} zero pages, expected maximum "
                              f"{alloc - normal}", offset, "multifd")
        offs = list(struct.unpack_from(f">{normal + zero}Q", buf, _FIXED))
        block = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return cls(flags, num, block, normal, zero, offs, nps, alloc)


@dataclass(slots=True)
class DeviceStatePacket:
    """``MultiFDPacketDeviceState_t`` (10.0, VFIO): 12-byte header, idstr, instance, payload size."""

    flags: int
    idstr: str
    instance_id: int
    next_packet_size: int

    SIZE = _HDR.size + _DEV.size

    def encode(self) -> bytes:
        return (_HDR.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.flags)
                + _DEV.pack(self.idstr.encode()[:255], self.instance_id, self.next_packet_size))


class ChannelDecoder:
    """One multifd channel's bytes in, items out: first the ``MultifdInit``, then one
    ``(packet, payload)`` per packet (``DeviceStatePacket`` or ``MultifdPacket``; ``payload`` is the
    page data or device state as bytes).  ``offset`` is the channel offset of the next byte."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.plen = packet_len(page_size)
        self.buf = bytearray()
        self.offset = 0
        self.init: MultifdInit | None = None
        self.packets = 0

    def need(self) -> int:
        """Bytes still needed before the next item can be decoded (a hint for readers)."""
        if self.init is None:
            return max(0, INIT_SIZE - len(self.buf))
        if len(self.buf) < _HDR.size:
            return _HDR.size - len(self.buf)
        return 1

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        self.buf += data
        out: list[object] = []
        while True:
            item = self._next()
            if item is None:
                return out
            out.append(item)

    def close(self) -> None:
        """The channel ended: an error unless it ended between two packets."""
        if self.buf:
            raise DecodeError(f"multifd channel ended inside a packet ({len(self.buf)} bytes left over)",
                              self.offset, "multifd")

    def _take(self, n: int) -> bytes:
        b = bytes(self.buf[:n])
        del self.buf[:n]
        self.offset += n
        return b

    def _next(self) -> object | None:
        buf = self.buf
        if self.init is None:
            if len(buf) < INIT_SIZE:
                return None
            self.init = MultifdInit.decode(buf, self.offset)
            self._take(INIT_SIZE)
            return self.init
        if len(buf) < _HDR.size:
            return None
        flags = _HDR.unpack_from(buf)[2]
        if flags & FLAG_DEVICE_STATE:
            if len(buf) < DeviceStatePacket.SIZE:
                return None
            name, inst, size = _DEV.unpack_from(buf, _HDR.size)
            if len(buf) < DeviceStatePacket.SIZE + size:
                return None
            dev = DeviceStatePacket(flags, bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace"), inst, size)
            self._take(DeviceStatePacket.SIZE)
            self.packets += 1
            return dev, self._take(size)
        if len(buf) < self.plen:
            return None
        pkt = MultifdPacket.decode(buf, self.page_size, self.offset)
        size = pkt.payload_size(self.page_size)
        if len(buf) < self.plen + size:
            return None
        self._take(self.plen)
        self.packets += 1
        return pkt, self._take(size)


# -- mapped-ram (format.md §4.1) -------------------------------------------------------------------

#: pages_offset is rounded up to this (QEMU's MAPPED_RAM_FILE_OFFSET_ALIGNMENT)
MAPPED_RAM_ALIGN = 0x100000


def bitmap_size(used_length: int, page_size: int) -> int:
    """Bytes of a block's file bitmap: one bit per page, in 64-bit host longs."""
    return (used_length // page_size + 63) // 64 * 8


def mapped_ram_header(at: int, used_length: int, page_size: int) -> MappedRamHeader:
    """The header written at file offset ``at`` for a block of ``used_length`` bytes."""
    bm = at + 28
    pages = -(-(bm + bitmap_size(used_length, page_size)) // MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
    return MappedRamHeader(1, page_size, bm, pages)
