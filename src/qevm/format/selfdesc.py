"""The debug-migration device: a device section that carries the stream's own vmdesc.

QEMU writes the JSON description of every device section (the vmdesc) after the EOF record, where
a reader can use it to name the fields.  On transports where nothing follows EOF (postcopy, a
stream cut short) it is lost.  The debug-migration device, proposed upstream for self-describing
streams, puts the same JSON inside the stream, as the payload of an ordinary FULL device section
(idstr ``debug-migration``, instance 0, version 1):

    offset  size  field
    0       16    magic: ASCII ``QEVM-DEBUG-MIG`` followed by two NUL bytes
    16      4     N, big-endian: the length of the JSON
    20      N     the vmdesc JSON, UTF-8, byte for byte what the trailer carries

The vmdesc describes this section too (one ``data`` buffer of ``20 + N`` bytes, as for any
handler without a VMStateDescription), so the embedded description is complete: the writer finds
the fixed point where the size written inside the JSON equals the payload length.
"""

from __future__ import annotations

import struct

from qevm.errors import DecodeError

__all__ = ["DEBUG_MIGRATION_IDSTR", "DEBUG_MIGRATION_VERSION", "DEBUG_MIGRATION_MAGIC", "encode_debug_payload",
           "decode_debug_payload"]

DEBUG_MIGRATION_IDSTR = "debug-migration"
DEBUG_MIGRATION_VERSION = 1
DEBUG_MIGRATION_MAGIC = b"QEVM-DEBUG-MIG\x00\x00"
_LEN = struct.Struct(">I")
HEAD = len(DEBUG_MIGRATION_MAGIC) + _LEN.size


def encode_debug_payload(vmdesc_json: bytes) -> bytes:
    return DEBUG_MIGRATION_MAGIC + _LEN.pack(len(vmdesc_json)) + vmdesc_json


def decode_debug_payload(data: bytes, offset: int = 0) -> bytes:
    """The vmdesc JSON bytes a debug-migration payload carries; ``offset`` is the payload's
    position in the stream (for the error message)."""
    if data[:len(DEBUG_MIGRATION_MAGIC)] != DEBUG_MIGRATION_MAGIC:
        raise DecodeError(f"debug-migration section without its magic (found {data[:16]!r})", offset,
                          DEBUG_MIGRATION_IDSTR)
    if len(data) < HEAD:
        raise DecodeError("debug-migration section ends inside its length", offset + len(data),
                          DEBUG_MIGRATION_IDSTR)
    (n,) = _LEN.unpack_from(data, len(DEBUG_MIGRATION_MAGIC))
    if HEAD + n != len(data):
        raise DecodeError(f"debug-migration section says {n} bytes of vmdesc but holds {len(data) - HEAD}",
                          offset + len(DEBUG_MIGRATION_MAGIC), DEBUG_MIGRATION_IDSTR)
    return data[HEAD:]
