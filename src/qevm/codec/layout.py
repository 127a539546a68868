"""Building blocks for the vmsd descriptions qevm writes itself (blobs QEMU saves by hand).

The descriptions use the vmdesc dialect (``name``, ``type``, ``size``, ``array_len``, ``struct``,
``subsections``) so ``qevm.codec.vmsd`` decodes and encodes them like any described section.
``Peek`` reads the few values a layout depends on (counts, capability pointers) straight from the
bytes; it raises ``ValueError`` past the end, which the blob codecs turn into raw bytes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Peek", "uint", "le", "buf", "arr", "struct", "subsection", "size_of", "rows"]

Desc = dict[str, Any]


class Peek:
    """Read-only view over a blob with a moving position."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def left(self) -> int:
        return len(self.data) - self.pos

    def _get(self, off: int, n: int, order: str) -> int:
        if off < 0 or off + n > len(self.data):
            raise ValueError(f"layout reads past the end ({off}+{n} > {len(self.data)})")
        return int.from_bytes(self.data[off:off + n], order)  # type: ignore[arg-type]

    def be(self, n: int, at: int = 0) -> int:
        return self._get(self.pos + at, n, "big")

    def le_at(self, off: int, n: int) -> int:
        return self._get(off, n, "little")

    def subsection_at(self, at: int = 0) -> str | None:
        """The name of the subsection starting at pos+at (``0x05``, length, name), else None."""
        p = self.pos + at
        if p + 2 > len(self.data) or self.data[p] != 0x05:
            return None
        n = self.data[p + 1]
        if p + 2 + n + 4 > len(self.data):
            return None
        return self.data[p + 2:p + 2 + n].decode("latin-1")


def uint(name: str, n: int) -> Desc:
    """A big-endian unsigned integer of ``n`` bytes (how ``qemu_put_be*`` writes)."""
    return {"name": name, "type": f"uint{n * 8}", "size": n}


def le(name: str, n: int) -> Desc:
    """A little-endian unsigned integer (PCI config space, virtio config, host-endian x86 structs)."""
    return {"name": name, "type": "uint8" if n == 1 else f"uint{n * 8}_le", "size": n}


def buf(name: str, n: int, note: str | None = None) -> Desc:
    d: Desc = {"name": name, "type": "buffer", "size": n}
    if note:
        d["note"] = note
    return d


def arr(elem: Desc, n: int) -> Desc:
    return dict(elem, array_len=n)


def size_of(d: Desc) -> int:
    """Bytes a field (or a vmsd body, with its subsections) occupies."""
    if "fields" in d and "type" not in d:
        total = sum(size_of(f) for f in d["fields"])
        for s in d.get("subsections", []):
            total += 2 + len(s["vmsd_name"]) + 4 + size_of(s)
        return total
    return int(d["size"]) * int(d.get("array_len", 1))


def struct(name: str, vmsd_name: str, fields: list[Desc], subsections: list[Desc] | None = None,
           **extra: Any) -> Desc:
    body: Desc = {"vmsd_name": vmsd_name, "version": 1, "fields": fields, **extra}
    if subsections:
        body["subsections"] = subsections
    return {"name": name, "type": "struct", "size": size_of(body), "struct": body}


def subsection(name: str, fields: list[Desc], subsections: list[Desc] | None = None) -> Desc:
    d: Desc = {"vmsd_name": name, "version": 1, "fields": fields}
    if subsections:
        d["subsections"] = subsections
    return d


def rows(table: tuple[tuple[str, int], ...], limit: int | None = None, little: bool = True) -> list[Desc]:
    """Fields from a ``(name, bytes)`` table; with ``limit`` only the leading ones that fit, the rest raw.

    A name starting with ``_`` is padding or an array of bytes (kept as a buffer); an ``n`` other
    than 1, 2, 4 or 8 is a buffer too.
    """
    out: list[Desc] = []
    used = 0
    for name, n in table:
        if limit is not None and used + n > limit:
            break
        if name.startswith("_") or n not in (1, 2, 4, 8):
            out.append(buf(name.lstrip("_"), n))
        else:
            out.append(le(name, n) if little else uint(name, n))
        used += n
    if limit is not None and used < limit:
        out.append(buf(f"raw_{used:#x}", limit - used, note="not described by qevm"))
    return out
