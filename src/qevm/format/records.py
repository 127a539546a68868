"""The stream's vocabulary: magic and version, top-level record types, section kinds, RAM record flags,
command numbers (QEMU's ``migration/savevm.c`` and ``migration/ram.c``), and the one encoder of a RAM
record's head that every writer uses."""

from __future__ import annotations

from enum import IntEnum

from qevm.codec.vmsd import SUBSECTION as _SUBSECTION_MARKER
from qevm.codec.wire import be64, cstr
from qevm.errors import EncodeError

__all__ = ["MAGIC", "VERSION", "RecordType", "SectionKind", "RamFlag", "Command", "XBZRLE_ENCODING",
           "ram_record_head"]

MAGIC = 0x5145564D
VERSION = 3


class RecordType(IntEnum):
    """The byte that starts each top-level record (and the subsection marker inside a section body)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = _SUBSECTION_MARKER  # defined once, in the vmsd codec below (it is the marker in device bodies)
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class SectionKind(IntEnum):
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04


class RamFlag(IntEnum):
    FULL = 0x001
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


#: the byte after an XBZRLE page record's head (migration/ram.c ENCODING_FLAG_XBZRLE)
XBZRLE_ENCODING = 0x01


class Command(IntEnum):
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


def ram_record_head(addr: int, flags: int, block: str | None) -> bytes:
    """A RAM record's head: the be64 word (page address | flags), then the block name as a counted
    string unless ``RamFlag.CONTINUE`` is set (``block`` is then ignored and may be None)."""
    w = be64(addr | flags)
    if flags & RamFlag.CONTINUE:
        return w
    if block is None:
        raise EncodeError("a RAM record without CONTINUE needs its block name")
    return w + cstr(block)
