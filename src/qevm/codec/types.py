"""The vmstate type registry: one codec object per type name found in vmdesc.

Each codec decodes, encodes, converts to/from JSON, and knows its natural size,
so the reader and the writer cannot drift apart.  Type names are the ``"type"``
strings QEMU writes into the vmdesc JSON (``migration/vmstate-types.c`` and the
target/device files that define their own ``VMStateInfo``; facts from QEMU 7.2
and 10.0).  Names that are not registered decode as raw bytes of the recorded
size (``RAW``), which keeps unknown types lossless.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

from qevm.codec.wire import Cursor
from qevm.errors import EncodeError

__all__ = ["TypeCodec", "IntCodec", "BoolCodec", "BytesCodec", "StringCodec", "REGISTRY", "RAW", "codec_for"]


class TypeCodec:
    """Base class: a codec for one element of a vmstate type."""

    name: str = ""
    #: natural element size in bytes, or None when the vmdesc ``size`` decides
    natural_size: int | None = None
    #: a vmdesc size other than ``natural_size`` is an error (generic types), not raw bytes
    strict_size: bool = False

    def fits(self, size: int) -> bool:
        return self.natural_size is None or self.natural_size == size

    def decode(self, cur: Cursor, size: int) -> Any:
        raise NotImplementedError

    def decode_many(self, cur: Cursor, size: int, n: int) -> list[Any]:
        return [self.decode(cur, size) for _ in range(n)]

    def encode(self, value: Any, size: int) -> bytes:
        raise NotImplementedError

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, value: Any, size: int) -> Any:
        return value


class IntCodec(TypeCodec):
    """Two's complement or unsigned big-endian integers."""

    def __init__(self, name: str, nbytes: int, signed: bool, strict_size: bool = True,
                 order: str = "big") -> None:
        self.name = name
        self.nbytes = nbytes
        self.signed = signed
        self.natural_size = nbytes
        self.strict_size = strict_size
        self.order: Literal["big", "little"] = "little" if order == "little" else "big"

    def decode_many(self, cur: Cursor, size: int, n: int) -> list[Any]:
        cur.need(n * self.nbytes)
        code = {1: "b", 2: "h", 4: "i", 8: "q"}[self.nbytes]
        fmt = f"{'>' if self.order == 'big' else '<'}{n}{code if self.signed else code.upper()}"
        out = list(struct.unpack_from(fmt, cur.buf, cur.pos))
        cur.pos += n * self.nbytes
        return out

    def decode(self, cur: Cursor, size: int) -> int:
        cur.need(self.nbytes)
        v = int.from_bytes(cur.buf[cur.pos:cur.pos + self.nbytes], self.order, signed=self.signed)
        cur.pos += self.nbytes
        return v

    def encode(self, value: Any, size: int) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EncodeError(f"{self.name} needs an integer, got {value!r}")
        try:
            return value.to_bytes(self.nbytes, self.order, signed=self.signed)
        except OverflowError:
            bits = self.nbytes * 8
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)
            raise EncodeError(f"{value} is out of range for {self.name} ({lo}..{hi})") from None

    def from_json(self, value: Any, size: int) -> int:
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise EncodeError(f"{value!r} is not an integer") from None
        self.encode(value, size)
        return int(value)


class BoolCodec(TypeCodec):
    """``bool``: one byte.  Values other than 0/1 are kept as integers (lossless)."""

    name = "bool"
    natural_size = 1
    strict_size = True

    def decode(self, cur: Cursor, size: int) -> bool | int:
        v = cur.u8()
        return bool(v) if v <= 1 else v

    def encode(self, value: Any, size: int) -> bytes:
        if isinstance(value, bool):
            return b"\x01" if value else b"\x00"
        if isinstance(value, int) and 0 <= value <= 255:
            return bytes((value,))
        raise EncodeError(f"bool needs true/false, got {value!r}")

    def from_json(self, value: Any, size: int) -> bool | int:
        if isinstance(value, str):
            low = value.lower()
            if low in ("true", "1", "on", "yes"):
                return True
            if low in ("false", "0", "off", "no"):
                return False
            raise EncodeError(f"{value!r} is not a boolean")
        self.encode(value, size)
        return value if isinstance(value, bool) else int(value)


class BytesCodec(TypeCodec):
    """Opaque bytes of the vmdesc-recorded size (buffers, config spaces, virtio blobs...)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, cur: Cursor, size: int) -> bytes:
        return cur.take(size)

    def encode(self, value: Any, size: int) -> bytes:
        if not isinstance(value, bytes | bytearray):
            raise EncodeError(f"{self.name} needs bytes, got {type(value).__name__}")
        if len(value) != size:
            raise EncodeError(f"{self.name} needs exactly {size} bytes, got {len(value)}")
        return bytes(value)

    def to_json(self, value: Any) -> str:
        return bytes(value).hex()

    def from_json(self, value: Any, size: int) -> bytes:
        if isinstance(value, bytes | bytearray):
            b = bytes(value)
        elif isinstance(value, str):
            s = value[2:] if value.startswith("0x") else value
            try:
                b = bytes.fromhex(s)
            except ValueError:
                raise EncodeError(f"{value[:40]!r} is not a hex string") from None
        else:
            raise EncodeError(f"{self.name} needs a hex string")
        self.encode(b, size)
        return b


class StringCodec(TypeCodec):
    """``capability``: a counted string (u8 length + bytes)."""

    name = "capability"

    def fits(self, size: int) -> bool:
        return True

    def decode(self, cur: Cursor, size: int) -> str:
        return cur.cstr()

    def encode(self, value: Any, size: int) -> bytes:
        b = str(value).encode("latin-1")
        if len(b) > 255:
            raise EncodeError("capability name longer than 255 bytes")
        return bytes((len(b),)) + b


def _ints() -> list[TypeCodec]:
    out: list[TypeCodec] = []
    for bits in (8, 16, 32, 64):
        out.append(IntCodec(f"int{bits}", bits // 8, True))
        out.append(IntCodec(f"uint{bits}", bits // 8, False))
    out += [
        IntCodec("int32 equal", 4, True),
        IntCodec("int32 le", 4, True),  # "le" = less-or-equal check on load; still big-endian
        IntCodec("uint8 equal", 1, False),
        IntCodec("uint16 equal", 2, False),
        IntCodec("uint32 equal", 4, False),
        IntCodec("int64 equal", 8, False),  # QEMU compares it as uint64
        IntCodec("uint64 equal", 8, False),
        IntCodec("timer", 8, False),
        IntCodec("CPU_Double_U", 8, False),
        IntCodec("float64", 8, False),
        IntCodec("int32_as_uint16", 2, False),
        IntCodec("uint16_from_uint8", 1, False),
        # target-specific VMStateInfo types (target/*/machine.c)
        IntCodec("cpsr", 4, False, strict_size=False),
        IntCodec("fpscr", 4, False, strict_size=False),
        IntCodec("powered_off", 1, False, strict_size=False),
        IntCodec("fpr", 8, False, strict_size=False),
        IntCodec("cpu/altivec/vscr", 4, False, strict_size=False),
        IntCodec("psr", 4, False, strict_size=False),
        IntCodec("fpcr", 8, False, strict_size=False),
    ]
    # little-endian integers inside blobs qevm describes itself (PCI config space, virtio device
    # config); QEMU never writes these names into a vmdesc
    out += [IntCodec(f"uint{bits}_le", bits // 8, False, order="little") for bits in (16, 32, 64)]
    return out


REGISTRY: dict[str, TypeCodec] = {c.name: c for c in _ints()}
REGISTRY["bool"] = BoolCodec()
REGISTRY["capability"] = StringCodec()
for _n in ("buffer", "unused_buffer", "bitmap", "pci config", "pci irq state", "msix state", "virtio",
           "virtqueue_extra_state", "shpc", "scsi-requests", "qtailq", "qlist", "gtree", "avr", "vsr",
           "slbe", "usb-redir-parser", "usb-redir-bufpq", "usb-redir-packet-id-q", "tlb_entry",
           "tlb entry", "unknown"):
    REGISTRY[_n] = BytesCodec(_n)

#: fallback for type names we do not know: raw bytes of the recorded size
RAW = BytesCodec("raw")


def codec_for(type_name: str, size: int) -> TypeCodec:
    """The codec for ``type_name``; raw bytes when unknown or when the size does not fit."""
    c = REGISTRY.get(type_name)
    if c is None or not c.fits(size):
        return RAW
    return c


_F64 = struct.Struct(">d")


def float64_value(bits: int) -> float:
    """IEEE double from the 64-bit pattern (for display of ``float64``/``CPU_Double_U``)."""
    v: float = _F64.unpack(bits.to_bytes(8, "big"))[0]
    return v
