"""The one decompressor: outer gzip / xz / bzip2 / zstd wrappers around a stream, and the zstd
frames of compressed qcow2 clusters.

``sniff_compression`` names the wrapper from a file's first bytes; ``decompressing`` returns a
reader that inflates on the fly (memory bounded by the codec's window) and turns every codec error
into a ``DecodeError``; ``deflate_frame`` and ``zstd_frame`` inflate one
compressed qcow2 cluster; ``compressing`` is the other direction (``qevm convert --compress``).
``zstandard`` (optional, or
Python 3.14's ``compression.zstd``) is imported here and nowhere else.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Callable
from typing import Any

from qevm.errors import DecodeError, UsageError

__all__ = ["MAGICS", "KINDS", "sniff_compression", "decompressing", "Decompressing", "deflate_frame",
           "zstd_frame", "compressing"]

#: leading bytes of each wrapper Python can undo (with ``zstandard`` for zstd)
MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
KINDS = tuple(kind for _, kind in MAGICS)

_STDLIB: dict[str, Callable[[Any], Any]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bzip2": lambda f: bz2.BZ2File(f, "rb"),
    "xz": lambda f: lzma.LZMAFile(f, "rb"),
}


def sniff_compression(head: bytes) -> str | None:
    """``"gzip"``, ``"xz"``, ``"bzip2"``, ``"zstd"`` or None for the first bytes of a file."""
    for magic, kind in MAGICS:
        if head.startswith(magic):
            return kind
    return None


def _zstandard() -> Any:
    """The ``zstandard`` module, or None when it is not installed."""
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return zstandard


class Decompressing(io.RawIOBase):
    """A read-only file that inflates ``src`` as it is read.  A damaged or cut compressed stream
    raises ``DecodeError`` at ``offset`` (where the compressed data starts) with ``path``.
    Closing it closes ``src`` and then runs ``on_close`` once."""

    on_close: Callable[[], None] | None = None

    def __init__(self, inner: Any, src: Any, kind: str, offset: int | None = None, path: str = "") -> None:
        super().__init__()
        self._inner = inner
        self._src = src
        self.kind = kind
        self._offset = offset
        self._path = path

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            n = self._inner.readinto(b)
        except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as e:
            raise DecodeError(f"the {self.kind}-compressed stream is damaged: {e}", self._offset,
                              self._path) from e
        except Exception as e:  # zstandard.ZstdError derives from Exception only
            if type(e).__module__.split(".")[0] != "zstandard":
                raise
            raise DecodeError(f"the {self.kind}-compressed stream is damaged: {e}", self._offset,
                              self._path) from e
        return int(n or 0)

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                if self._src is not None:
                    self._src.close()
                super().close()
                cb, self.on_close = self.on_close, None
                if cb is not None:
                    cb()


def decompressing(kind: str, src: Any, *, offset: int | None = None, path: str = "", missing: str = "",
                  close_src: bool = True) -> Decompressing:
    """A reader that yields ``src`` inflated with ``kind`` (one of ``KINDS``); closing it closes
    ``src`` when ``close_src``.

    ``missing`` is the message of the ``UsageError`` raised when ``kind`` is zstd and no zstd
    module is installed (a default names the package)."""
    owned = src if close_src else None
    if kind in _STDLIB:
        return Decompressing(_STDLIB[kind](src), owned, kind, offset, path)
    if kind == "zstd":
        zstandard = _zstandard()
        if zstandard is None:
            raise UsageError(missing or "zstd-compressed input needs the 'zstandard' package (pip install zstandard)")
        return Decompressing(zstandard.ZstdDecompressor().stream_reader(src, closefd=False), owned, kind, offset, path)
    raise UsageError(f"no decompressor for {kind!r} (known: {', '.join(KINDS)})")


def deflate_frame(raw: bytes, size: int) -> bytes:
    """At most ``size`` bytes inflated from the raw deflate data (no zlib header) at the start of
    ``raw``, as qcow2 stores a compressed cluster.  QEMU deflates with a 4 KiB window; a 32 KiB-window
    inflater reads those and the streams of writers that used a bigger window."""
    try:
        return zlib.decompressobj(-15).decompress(raw, size)
    except zlib.error as e:
        raise DecodeError(f"deflate error: {e}") from e


def zstd_frame(raw: bytes, size: int, *, missing: str = "") -> bytes:
    """The first ``size`` bytes of the zstd frame at the start of ``raw`` (anything after the frame,
    such as sector padding, is ignored), with ``zstandard`` or Python 3.14's ``compression.zstd``.
    ``missing`` is the message of the ``UsageError`` raised when neither is installed."""
    dobj: Any
    zstandard = _zstandard()
    if zstandard is not None:
        dobj = zstandard.ZstdDecompressor().decompressobj()
    else:
        try:
            from compression import zstd  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise UsageError(missing or "zstd-compressed data needs the 'zstandard' package "
                             "(pip install zstandard)") from None
        dobj = zstd.ZstdDecompressor()
    try:
        out = dobj.decompress(raw)
    except Exception as e:  # each zstd module has its own error type
        raise DecodeError(f"zstd error: {e}") from e
    return bytes(out[:size])


def compressing(kind: str, out: Any) -> Any:
    """A writable file object that compresses into ``out`` with ``kind`` (one of ``KINDS``);
    closing it finishes the compressed stream but leaves ``out`` open.  Levels favour speed on
    VM states (mostly pages): gzip 6, xz preset 1, zstd 3."""
    if kind == "gzip":
        return gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
    if kind == "xz":
        return lzma.LZMAFile(out, "wb", preset=1)
    if kind == "bzip2":
        return bz2.BZ2File(out, "wb")
    if kind == "zstd":
        zstandard = _zstandard()
        if zstandard is None:
            raise UsageError("zstd compression needs the 'zstandard' package (pip install zstandard)")
        return zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
    raise UsageError(f"no compressor for {kind!r} (known: {', '.join(KINDS)})")
