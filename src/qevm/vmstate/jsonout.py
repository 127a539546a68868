"""QEMU's own JSON writer (``migration/qjson.c``): the exact text of a vmdesc, byte for byte."""

from __future__ import annotations

from typing import Any

from qevm.errors import EncodeError

# -- QEMU's JSON writer ------------------------------------------------------------------------------

def vmdesc_json(value: Any) -> str:
    """``value`` as QEMU's compact JSON writer prints it: ``", "`` and ``": "`` separators,
    ``\\uXXXX`` (upper case) for control and non-ASCII characters, '/' unescaped."""
    parts: list[str] = []
    _json(value, parts)
    return "".join(parts)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        cp = ord(ch)
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(v: Any, out: list[str]) -> None:
    if isinstance(v, dict):
        out.append("{")
        for k, (key, item) in enumerate(v.items()):
            if k:
                out.append(", ")
            out.append(_quote(str(key)))
            out.append(": ")
            _json(item, out)
        out.append("}")
    elif isinstance(v, list | tuple):
        out.append("[")
        for k, item in enumerate(v):
            if k:
                out.append(", ")
            _json(item, out)
        out.append("]")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, str):
        out.append(_quote(v))
    else:
        raise EncodeError(f"cannot write {type(v).__name__} into vmdesc JSON")
