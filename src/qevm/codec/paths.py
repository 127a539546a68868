"""Field paths: ``SECTION[:INSTANCE]/FIELD[/FIELD...]`` naming one device field in a stream.

SECTION is the section name as in the stream, in double quotes when it contains ``/`` or ``:``
(``"0000:00:02.0/e1000":0/mac_reg[5]``); INSTANCE defaults to 0.  FIELD is a vmdesc field name
(``env.regs``) with ``[N]`` for an array element; nested structs and subsections (whose names
contain ``/``, e.g. ``cpu/xsave``) continue after ``/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qevm.codec.types import codec_for
from qevm.codec.vmsd import NULL, Field, Opaque, Struct
from qevm.errors import EncodeError, UsageError

__all__ = ["FieldPath", "parse_path", "parse_assignment", "assign", "lookup"]

_INDEX = re.compile(r"^(.*)\[(\d+)\]$")


@dataclass(frozen=True)
class FieldPath:
    section: str
    instance: int
    fields: tuple[str, ...]

    def matches(self, idstr: str, instance: int) -> bool:
        return idstr == self.section and instance == self.instance

    def __str__(self) -> str:
        sec = f'"{self.section}"' if ("/" in self.section or ":" in self.section) else self.section
        return f"{sec}:{self.instance}/" + "/".join(self.fields)


def parse_path(text: str) -> FieldPath:
    s = text.strip()
    if s.startswith('"'):
        end = s.find('"', 1)
        if end < 0:
            raise UsageError(f"{text!r}: unterminated quote in the section name")
        section, rest = s[1:end], s[end + 1:]
    else:
        cut = min((i for i in (s.find("/"), s.find(":")) if i >= 0), default=-1)
        if cut < 0:
            raise UsageError(f"{text!r}: a path is SECTION[:INSTANCE]/FIELD")
        section, rest = s[:cut], s[cut:]
    instance = 0
    if rest.startswith(":"):
        m = re.match(r":(\d+)", rest)
        if not m:
            raise UsageError(f"{text!r}: the instance after ':' must be a number")
        instance = int(m.group(1))
        rest = rest[m.end():]
    if not rest.startswith("/") or len(rest) < 2:
        raise UsageError(f"{text!r}: a path is SECTION[:INSTANCE]/FIELD")
    return FieldPath(section, instance, tuple(rest[1:].split("/")))


def parse_assignment(text: str) -> tuple[FieldPath, str]:
    """``PATH=VALUE`` (the value is everything after the first ``=`` that follows the section name)."""
    start = text.find('"', 1) + 1 if text.startswith('"') else 0
    eq = text.find("=", start)
    if eq < 0:
        raise UsageError(f"{text!r}: expected PATH=VALUE")
    return parse_path(text[:eq]), text[eq + 1:]


def _field(st: Struct, seg: str) -> tuple[Field, int | None]:
    for f in st.fields:
        idx = f.desc.get("index")
        if f.name == seg and idx is None:
            return f, None
        if idx is not None and f"{f.name}[{idx}]" == seg:
            return f, None
    m = _INDEX.match(seg)
    if m:
        name, k = m.group(1), int(m.group(2))
        for f in st.fields:
            if f.name == name and f.desc.get("array_len") is not None:
                if k >= len(f.value):
                    raise UsageError(f"{seg}: index out of range (the array has {len(f.value)} elements)")
                return f, k
    names = ", ".join(dict.fromkeys(f.name for f in st.fields))
    subs = ", ".join(s.name for s in st.subsections)
    raise UsageError(f"no field {seg!r} in {st.vmsd_name or 'the section'} (fields: {names}"
                     + (f"; subsections: {subs}" if subs else "") + ")")


def _walk(st: Struct, segs: tuple[str, ...], where: str) -> tuple[Field, int | None, Struct]:
    node = st
    i = 0
    while True:
        for k in range(len(segs) - i, 0, -1):
            name = "/".join(segs[i:i + k])
            sub = next((s for s in node.subsections if s.name == name), None)
            if sub is not None:
                node = sub.body
                i += k
                break
        else:
            if i >= len(segs):
                raise UsageError(f"{where}: names a subsection, not a field")
            f, idx = _field(node, segs[i])
            i += 1
            v = f.value if idx is None else f.value[idx]
            if i == len(segs):
                return f, idx, node
            if not isinstance(v, Struct):
                raise UsageError(f"{where}: {segs[i - 1]!r} is not a struct")
            node = v
            continue
        if i >= len(segs):
            raise UsageError(f"{where}: names a subsection, not a field")


def lookup(st: Struct, path: FieldPath) -> Any:
    f, idx, _ = _walk(st, path.fields, str(path))
    return f.value if idx is None else f.value[idx]


def assign(st: Struct, path: FieldPath, value: Any) -> None:
    """Set the field ``path`` names to ``value`` (text or JSON), checked against its type and size."""
    f, idx, _ = _walk(st, path.fields, str(path))
    size = int(f.desc.get("size", 0))
    codec = codec_for(str(f.desc.get("type")), size)
    cur = f.value if idx is None else f.value[idx]
    try:
        if isinstance(cur, Struct | Opaque) or cur is NULL:
            raise UsageError(f"{path}: is a {f.type}; name a field inside it")
        if isinstance(cur, list):
            if not isinstance(value, list) or len(value) != len(cur):
                raise UsageError(f"{path}: is an array of {len(cur)}; give an index, or a JSON list of "
                                 f"{len(cur)} values")
            new: Any = [codec.from_json(v, size) for v in value]
        else:
            new = codec.from_json(value, size)
    except EncodeError as e:
        raise EncodeError(f"{path}: {e}") from None
    if idx is None:
        f.value = new
    else:
        f.value[idx] = new
