"""Byte sizes for people: the one formatter every qevm message and table uses.

A foundation module (bottom layer, beside ``qevm.errors``): no qevm imports.
"""

from __future__ import annotations

import math

__all__ = ["format_size"]

_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def format_size(n: float) -> str:
    """``n`` bytes as QEMU's ``size_to_str`` prints them (``info snapshots``, qemu-img): three
    significant digits and a binary prefix chosen so the number stays below 1000.

    >>> [format_size(n) for n in (0, 512, 1000, 666_000, 1536 << 10, 128 << 20, 3 << 40)]
    ['0 B', '512 B', '0.977 KiB', '650 KiB', '1.5 MiB', '128 MiB', '3 TiB']
    """
    mag = abs(n)
    if mag <= 0 or not math.isfinite(mag):
        i = 0
    else:
        _, e = math.frexp(mag / (1000.0 / 1024.0))
        i = min(max(0, (e - 1) // 10), len(_PREFIXES) - 1)
    return f"{n / (1 << (10 * i)):.3g} {_PREFIXES[i]}B"
