"""Page bitmaps (one bit per page, bit ``i & 7`` of byte ``i >> 3``, as QEMU's mapped-ram bitmaps and
the parser's pass tracking keep them), handled a run of pages at a time: one big-int operation per
run instead of a Python step per page."""

from __future__ import annotations

__all__ = ["any_bits", "set_bits", "claim_bits"]


def any_bits(bm: bytearray, i: int, n: int) -> bool:
    """Is any of bits i..i+n-1 set (``bm`` covers them)?"""
    j0, j1 = i >> 3, ((i + n - 1) >> 3) + 1
    return bool(int.from_bytes(bm[j0:j1], "little") >> (i & 7) & ((1 << n) - 1))


def set_bits(bm: bytearray, i: int, n: int) -> None:
    """Set bits i..i+n-1 (``bm`` covers them)."""
    j0, j1 = i >> 3, ((i + n - 1) >> 3) + 1
    v = int.from_bytes(bm[j0:j1], "little") | ((1 << n) - 1) << (i & 7)
    bm[j0:j1] = v.to_bytes(j1 - j0, "little")


def claim_bits(bm: bytearray, i: int, n: int) -> bool:
    """Set bits i..i+n-1 if none of them is set yet; False (nothing changed) otherwise."""
    j0, j1 = i >> 3, ((i + n - 1) >> 3) + 1
    v = int.from_bytes(bm[j0:j1], "little")
    m = ((1 << n) - 1) << (i & 7)
    if v & m:
        return False
    bm[j0:j1] = (v | m).to_bytes(j1 - j0, "little")
    return True
