"""XBZRLE page deltas (QEMU migration/xbzrle.c format, described in shared/format.md §3.5).

A delta is a list of (zrun, nzrun) pairs, each a ULEB128 of at most two bytes: ``zrun``
bytes stay as they are, then ``nzrun`` literal bytes replace the page content.
"""

from __future__ import annotations

from qevm.errors import DecodeError, EncodeError

__all__ = ["apply_delta", "make_delta"]


def _uleb(d: bytes, i: int, offset: int) -> tuple[int, int]:
    if i >= len(d):
        raise DecodeError("XBZRLE delta ends inside a run length", offset + i)
    b = d[i]
    if not b & 0x80:
        return b, i + 1
    if i + 1 >= len(d):
        raise DecodeError("XBZRLE delta ends inside a run length", offset + i)
    b2 = d[i + 1]
    if b2 & 0x80:
        raise DecodeError("XBZRLE run length longer than two bytes", offset + i)
    return (b & 0x7F) | (b2 << 7), i + 2


def apply_delta(page: bytearray, delta: bytes, offset: int = 0) -> None:
    """Apply ``delta`` to ``page`` in place.  ``offset`` locates the delta for error messages."""
    i = pos = 0
    n = len(delta)
    size = len(page)
    first = True
    while i < n:
        z, i = _uleb(delta, i, offset)
        if z == 0 and not first:
            raise DecodeError("XBZRLE zero run of length 0 after the first pair", offset + i)
        first = False
        pos += z
        nz, i = _uleb(delta, i, offset)
        if nz == 0:
            raise DecodeError("XBZRLE literal run of length 0", offset + i)
        if pos + nz > size or i + nz > n:
            raise DecodeError("XBZRLE delta runs past the end of the page or of its data", offset + i)
        page[pos:pos + nz] = delta[i:i + nz]
        pos += nz
        i += nz


def _put_uleb(out: bytearray, v: int) -> None:
    if v < 0x80:
        out.append(v)
    else:
        out.append((v & 0x7F) | 0x80)
        out.append(v >> 7)


def make_delta(old: bytes, new: bytes) -> bytes:
    """A delta that turns ``old`` into ``new`` (same length, at most 16 KiB pages)."""
    if len(old) != len(new):
        raise EncodeError("pages differ in length")
    out = bytearray()
    i, n = 0, len(new)
    while i < n:
        z = i
        while i < n and old[i] == new[i]:
            i += 1
        if i == n:
            break
        zrun = i - z
        s = i
        while i < n and old[i] != new[i]:
            i += 1
        _put_uleb(out, zrun)
        _put_uleb(out, i - s)
        out += new[s:i]
    return bytes(out)
