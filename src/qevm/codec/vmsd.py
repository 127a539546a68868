"""Decoding and encoding of vmsd bodies (device sections) driven by a vmdesc description.

A *vmsd object* is the JSON QEMU writes into vmdesc for a device, a nested struct or a
subsection: ``{"vmsd_name", "version", "fields": [...], "subsections": [...]}``.  A field
object has ``name``, ``type``, ``size`` (bytes of one element) and optionally ``array_len``
(compressed array: the one description repeats), ``index`` (one entry of an indexed array),
``struct`` (nested vmsd object), or inline vmsd keys for ``vstruct``/``tmp``.

The decoded model is a tree of ``Struct``/``Field``/``Subsection`` nodes that keeps the
description it was decoded with, so encoding it again gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qevm.codec.types import RAW, REGISTRY, TypeCodec, codec_for
from qevm.codec.wire import Cursor, be32
from qevm.errors import DecodeError, EncodeError, SchemaError

__all__ = ["Field", "Struct", "Subsection", "NullPtr", "Opaque", "decode_vmsd", "encode_struct",
           "static_size", "to_json"]

SUBSECTION = 0x05
NULLPTR_MARKER = 0x30


class NullPtr:
    """A NULL entry of an array of pointers: the single byte 0x30 on the wire."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NULL"


NULL = NullPtr()


@dataclass(slots=True)
class Opaque:
    """Bytes the description could not explain (e.g. a non-NULL element QEMU 7.2 described as ``{}``)."""

    data: bytes


@dataclass(slots=True)
class Field:
    desc: dict[str, Any]
    value: Any  # element value, or a list of element values for ``array_len`` fields
    offset: int
    size: int

    @property
    def name(self) -> str:
        return str(self.desc.get("name", "?"))

    @property
    def type(self) -> str:
        return str(self.desc.get("type", "unknown"))


@dataclass(slots=True)
class Subsection:
    name: str
    version: int
    body: Struct
    offset: int
    size: int


@dataclass(slots=True)
class Struct:
    desc: dict[str, Any]
    fields: list[Field] = field(default_factory=list)
    subsections: list[Subsection] = field(default_factory=list)
    offset: int = 0
    size: int = 0

    @property
    def vmsd_name(self) -> str:
        return str(self.desc.get("vmsd_name", ""))

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


def _check_fields(desc: dict[str, Any], path: str) -> list[dict[str, Any]]:
    fields = desc.get("fields", [])
    if not isinstance(fields, list) or not all(isinstance(f, dict) for f in fields):
        raise SchemaError(f"{path}: vmdesc 'fields' is not a list of objects")
    return fields


def _size_of(f: dict[str, Any], path: str) -> int:
    size = f.get("size", 0)
    if not isinstance(size, int) or size < 0:
        raise SchemaError(f"{path}/{f.get('name')}: bad size {size!r}")
    return size


def decode_vmsd(cur: Cursor, desc: dict[str, Any], path: str, optional_subsections: bool = False) -> Struct:
    """Decode one vmsd body at the cursor following ``desc``.

    With ``optional_subsections`` the declared subsections are read only when present
    (the configuration record); vmdesc lists exactly the subsections that were sent.
    """
    start = cur.pos
    st = Struct(desc, offset=cur.offset)
    fields = _check_fields(desc, path)
    for i, fd in enumerate(fields):
        st.fields.append(_decode_field(cur, fd, path, fields, i))
    subs = desc.get("subsections", [])
    if not isinstance(subs, list):
        raise SchemaError(f"{path}: vmdesc 'subsections' is not a list")
    optional_subsections = optional_subsections or bool(desc.get("optional_subsections"))
    for sd in subs:
        name = str(sd.get("vmsd_name", ""))
        if optional_subsections:
            if cur.remaining() < 2 and cur.closed:
                continue
            if cur.peek8() != SUBSECTION:
                continue
            n = cur.peek8(1)
            cur.need(2 + n)
            if bytes(cur.buf[cur.pos + 2:cur.pos + 2 + n]).decode("latin-1") != name:
                continue
        st.subsections.append(_decode_subsection(cur, sd, name, path))
    st.size = cur.pos - start
    return st


def _decode_subsection(cur: Cursor, sd: dict[str, Any], name: str, path: str) -> Subsection:
    off = cur.offset
    p0 = cur.pos
    marker = cur.u8()
    if marker != SUBSECTION:
        raise DecodeError(f"expected subsection {name!r} (byte 0x05), found 0x{marker:02x}", off, path)
    got = cur.cstr()
    if got != name:
        raise DecodeError(f"expected subsection {name!r}, found {got!r}", off, path)
    version = cur.be32()
    body = decode_vmsd(cur, sd, f"{path}/{name}")
    return Subsection(name, version, body, off, cur.pos - p0)


def _decode_field(cur: Cursor, fd: dict[str, Any], path: str, fields: list[dict[str, Any]], i: int) -> Field:
    name = str(fd.get("name", "?"))
    fpath = f"{path}/{name}" if path else name
    size = _size_of(fd, fpath)
    off = cur.offset
    p0 = cur.pos
    n = fd.get("array_len")
    if n is not None:
        if not isinstance(n, int) or n < 0:
            raise SchemaError(f"{fpath}: bad array_len {n!r}")
        if (n * size if size else n) > cur.remaining() and n > 65536:
            raise DecodeError(f"array of {n} elements of {size} bytes cannot fit in the "
                              f"{cur.remaining()} bytes left", off, fpath)
        t = fd.get("type")
        known = REGISTRY.get(str(t))
        if known is not None and known.fits(size) and t not in ("struct", "vstruct", "tmp", "nullptr"):
            try:
                value: Any = known.decode_many(cur, size, n)
            except DecodeError as e:
                e.path = fpath
                raise
        else:
            value = [_decode_elem(cur, fd, size, f"{fpath}[{k}]", fields, i, n - k - 1) for k in range(n)]
    else:
        idx = fd.get("index")
        value = _decode_elem(cur, fd, size, fpath if idx is None else f"{fpath}[{idx}]", fields, i, 0)
    return Field(fd, value, off, cur.pos - p0)


def _decode_elem(cur: Cursor, fd: dict[str, Any], size: int, path: str,
                 fields: list[dict[str, Any]], i: int, elems_after: int) -> Any:
    t = fd.get("type")
    p0 = cur.pos
    if t == "nullptr":
        b = _u8(cur, path)
        if b != NULLPTR_MARKER:
            raise DecodeError(f"nullptr marker expected (0x30), found 0x{b:02x}", cur.offset - 1, path)
        return NULL
    if t == "struct":
        sd = fd.get("struct")
        if not isinstance(sd, dict):
            raise SchemaError(f"{path}: struct field without 'struct' description")
        if not sd.get("fields") and not sd.get("subsections") and size == 1:
            # QEMU < 10.0 describes a NULL pointer element as an empty struct of size 1.
            b = _u8(cur, path)
            cur.pos -= 1
            if b == NULLPTR_MARKER:
                cur.pos += 1
                return NULL
            return Opaque(cur.take(_opaque_len(cur, fields, i, elems_after, path)))
        value: Any = decode_vmsd(cur, sd, path)
    elif t in ("vstruct", "tmp") and "fields" in fd:
        value = decode_vmsd(cur, fd, path)
    else:
        known = REGISTRY.get(str(t))
        if known is not None and known.strict_size and not known.fits(size):
            raise DecodeError(f"vmdesc gives type {t!r} a size of {size} bytes; it has {known.natural_size}",
                              cur.offset, path)
        codec = codec_for(str(t), size)
        try:
            value = codec.decode(cur, size)
        except DecodeError as e:
            e.path = path
            raise
    used = cur.pos - p0
    if used != size and not fd.get("unsized"):
        raise DecodeError(f"vmdesc says {size} bytes, the data decodes to {used}", cur.base + p0, path)
    return value


def _u8(cur: Cursor, path: str) -> int:
    try:
        return cur.u8()
    except DecodeError as e:
        e.path = path
        raise


def _opaque_len(cur: Cursor, fields: list[dict[str, Any]], i: int, elems_after: int, path: str) -> int:
    """Length of an element the description cannot explain: what is left once the fixed-size
    rest of the body (later elements assumed NULL, later fields at their recorded sizes) is set aside."""
    rest = elems_after
    for fd in fields[i + 1:]:
        s = static_size(fd)
        if s is None:
            raise DecodeError("a non-NULL pointer element described as an empty struct, and the rest of "
                              "the section has no fixed size to resynchronise on", cur.offset, path)
        rest += s
    n = cur.remaining() - rest
    if n <= 0:
        raise DecodeError("a non-NULL pointer element described as an empty struct", cur.offset, path)
    return n


def static_size(fd: dict[str, Any]) -> int | None:
    """Bytes a field description occupies if that does not depend on data, else None."""
    size = fd.get("size")
    if not isinstance(size, int):
        return None
    n = fd.get("array_len", 1)
    return size * n if isinstance(n, int) else None


def encode_struct(st: Struct) -> bytes:
    out = bytearray()
    _encode_into(out, st)
    return bytes(out)


def _encode_into(out: bytearray, st: Struct) -> None:
    for f in st.fields:
        fd = f.desc
        size = fd.get("size", 0)
        if fd.get("array_len") is not None:
            for v in f.value:
                _encode_elem(out, fd, size, v)
        else:
            _encode_elem(out, fd, size, f.value)
    for sub in st.subsections:
        name = sub.name.encode("latin-1")
        out += bytes((SUBSECTION, len(name))) + name + be32(sub.version)
        _encode_into(out, sub.body)


def _encode_elem(out: bytearray, fd: dict[str, Any], size: int, v: Any) -> None:
    if v is NULL:
        out.append(NULLPTR_MARKER)
    elif isinstance(v, Opaque):
        out += v.data
    elif isinstance(v, Struct):
        _encode_into(out, v)
    else:
        codec: TypeCodec = codec_for(str(fd.get("type")), size)
        try:
            out += codec.encode(v, size)
        except EncodeError as e:
            raise EncodeError(f"{fd.get('name')}: {e}") from None


def to_json(st: Struct) -> dict[str, Any]:
    """Plain JSON view: field name -> value (ints as numbers, buffers as hex); subsections by name."""
    out: dict[str, Any] = {}
    for f in st.fields:
        key = f.name
        if f.desc.get("index") is not None:
            key = f"{key}[{f.desc['index']}]"
        if f.desc.get("array_len") is not None:
            out[key] = [_elem_json(f.desc, v) for v in f.value]
        else:
            out[key] = _elem_json(f.desc, f.value)
    for sub in st.subsections:
        out[sub.name] = to_json(sub.body)
    return out


def _elem_json(fd: dict[str, Any], v: Any) -> Any:
    if v is NULL:
        return None
    if isinstance(v, Opaque):
        return {"opaque": v.data.hex()}
    if isinstance(v, Struct):
        return to_json(v)
    codec = codec_for(str(fd.get("type")), int(fd.get("size", 0)))
    return codec.to_json(v) if codec is not RAW else bytes(v).hex()


# The codecs of the types QEMU saves by hand (``pci config``, ``virtio``) decode through this module;
# importing them here registers them whenever vmsd decoding is available.
from qevm.codec import blobs as _blobs  # noqa: E402,F401
