"""Codecs for the vmstate types QEMU writes by hand: ``pci config``, ``virtio``, ``virtio-gpu``.

QEMU's vmdesc stops at these fields (a PCI config space is a 256/4096-byte buffer, a virtio
device's ``virtio`` field is the output of ``virtio_save``).  Their layout depends on the bytes
themselves (the capability list, the number of queues, which subsections were sent), so each codec
first *reads the layout* from the bytes (``qevm.codec.pci``, ``qevm.codec.virtio``: declarative
descriptions naming the QEMU source they describe) and then decodes them with the same vmsd
machinery as any described section.  The decoded value is a ``Struct``: ``dump`` shows it, ``edit``
paths reach into it, and encoding it gives the bytes back.  Bytes a layout cannot explain stay raw
with a note; a layout that does not account for the whole blob falls back to raw bytes of the
recorded size, never an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from qevm.codec.types import REGISTRY, BytesCodec, TypeCodec
from qevm.codec.vmsd import Struct, decode_vmsd, encode_struct, to_json
from qevm.codec.wire import Cursor
from qevm.errors import EncodeError, QevmError

__all__ = ["BlobCodec", "Layout"]

log = logging.getLogger(__name__)

#: a function that reads a blob's layout: bytes -> vmsd description (raises on nonsense)
Layout = Callable[[bytes], dict[str, Any]]


class BlobCodec(TypeCodec):
    """A type QEMU saves by hand: decoded through a layout read from the bytes, raw when that fails."""

    def __init__(self, name: str, layout: Layout) -> None:
        self.name = name
        self.layout = layout
        self.raw = BytesCodec(name)

    def decode(self, cur: Cursor, size: int) -> Struct | bytes:
        cur.need(size)
        data = bytes(cur.buf[cur.pos:cur.pos + size])
        try:
            desc = self.layout(data)
            sub = Cursor(data, 0, size, base=cur.base + cur.pos)
            st = decode_vmsd(sub, desc, self.name)
            if sub.pos != size:
                raise ValueError(f"layout covers {sub.pos} of {size} bytes")
        except (QevmError, ValueError, IndexError, KeyError) as e:
            log.debug("%s at %d: kept raw (%s)", self.name, cur.offset, e)
            return cur.take(size)
        cur.pos += size
        return st

    def encode(self, value: Any, size: int) -> bytes:
        if isinstance(value, Struct):
            out = encode_struct(value)
            if len(out) != size:
                raise EncodeError(f"{self.name} encodes to {len(out)} bytes, the stream records {size}")
            return out
        return self.raw.encode(value, size)

    def to_json(self, value: Any) -> Any:
        if isinstance(value, Struct):
            return to_json(value)
        return self.raw.to_json(value)

    def from_json(self, value: Any, size: int) -> bytes:
        """A whole blob set at once: hex of the recorded size (kept raw until the next decode)."""
        return self.raw.from_json(value, size)


def _register() -> None:
    from qevm.codec.pci import pci_config_layout
    from qevm.codec.virtio import virtio_gpu_layout, virtio_layout

    REGISTRY["pci config"] = BlobCodec("pci config", pci_config_layout)
    REGISTRY["virtio"] = BlobCodec("virtio", virtio_layout)
    REGISTRY["virtio-gpu"] = BlobCodec("virtio-gpu", virtio_gpu_layout)


_register()
