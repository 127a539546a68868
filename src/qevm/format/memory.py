"""Guest RAM rebuilt from a stream, kept in a sparse temporary file (bounded memory).

Pages are applied in stream order, so a page sent several times ends with its last copy,
and XBZRLE deltas apply to the content the destination would hold at that moment.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from typing import IO

from qevm.errors import DecodeError
from qevm.format.events import RamFlag, RamPage
from qevm.format.xbzrle import apply_delta

__all__ = ["RamImage"]


class RamImage:
    def __init__(self, page_size: int, directory: str | None = None) -> None:
        self.page_size = page_size
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=directory)
        self._fd = self._file.fileno()
        self._base: dict[str, int] = {}
        self._size: dict[str, int] = {}
        self._sent: dict[str, bytearray] = {}
        self._end = 0

    def close(self) -> None:
        self._file.close()

    def add_block(self, name: str, used_length: int) -> None:
        if name in self._base:
            if used_length != self._size[name]:
                raise DecodeError(f"RAM block {name!r} announced again with a different size")
            return
        align = 1 << 20
        self._base[name] = self._end
        self._size[name] = used_length
        self._sent[name] = bytearray()  # grows with the highest page written
        self._end += (used_length + align - 1) // align * align

    def blocks(self) -> dict[str, int]:
        return dict(self._size)

    def read(self, block: str, addr: int, length: int | None = None) -> bytes:
        n = self.page_size if length is None else length
        data = os.pread(self._fd, n, self._base[block] + addr)
        return data + bytes(n - len(data))

    def write(self, block: str, addr: int, data: bytes) -> None:
        if block not in self._base:
            raise DecodeError(f"page for unknown RAM block {block!r}")
        os.pwrite(self._fd, data, self._base[block] + addr)
        i = addr // self.page_size
        bm = self._sent[block]
        if (i >> 3) >= len(bm):
            bm.extend(bytes((i >> 3) + 1 - len(bm)))
        bm[i >> 3] |= 1 << (i & 7)

    def apply(self, ev: RamPage) -> None:
        kind = ev.kind
        ps = self.page_size
        if kind == RamFlag.PAGE:
            self.write(ev.block, ev.addr, ev.payload)
        elif kind == RamFlag.ZERO:
            self.write(ev.block, ev.addr, bytes((ev.payload[0],)) * ps)
        elif kind == RamFlag.XBZRLE:
            page = bytearray(self.read(ev.block, ev.addr))
            apply_delta(page, ev.payload[3:], ev.offset)
            self.write(ev.block, ev.addr, bytes(page))
        elif kind == RamFlag.COMPRESS_PAGE:
            try:
                data = zlib.decompress(ev.payload[4:])
            except zlib.error as e:
                raise DecodeError(f"compressed page does not inflate: {e}", ev.offset) from None
            if len(data) != ps:
                raise DecodeError(f"compressed page inflates to {len(data)} bytes, not {ps}", ev.offset)
            self.write(ev.block, ev.addr, data)

    def sent_pages(self, block: str) -> Iterator[int]:
        """Offsets of the pages of ``block`` that the stream carried, ascending."""
        bm = self._sent[block]
        ps = self.page_size
        for byte_i, b in enumerate(bm):
            if b:
                for bit in range(8):
                    if b >> bit & 1:
                        yield ((byte_i << 3) | bit) * ps

    def copy_block_to(self, block: str, out: IO[bytes]) -> None:
        """Write the block's whole content (zeros where nothing was sent) to ``out``."""
        size = self._size[block]
        pos = 0
        while pos < size:
            n = min(1 << 20, size - pos)
            out.write(self.read(block, pos, n))
            pos += n
