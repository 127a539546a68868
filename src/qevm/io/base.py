"""What every opener in ``qevm.io`` hands to the reader and the writer: an ``Input``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Input", "CHUNK"]

#: how much the reader asks a file for at a time
CHUNK = 1 << 20


@dataclass
class Input:
    """An opened stream: ``file`` yields the stream's bytes from its first one (``QEVM``)."""

    name: str
    file: Any  # a binary reader: read(n), and readinto/seek/tell when it has them
    seekable: bool  # a regular file read raw: random access to the stream's own offsets
    compression: str | None
    size: int | None
    file_offset: int = 0  # where the stream starts in its file (mapped-ram offsets are file offsets)

    def close(self) -> None:
        """Close the file (standard input is left open)."""
        if self.file not in (sys.stdin.buffer, getattr(sys.stdin.buffer, "raw", None)):
            self.file.close()

    def __enter__(self) -> Input:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
