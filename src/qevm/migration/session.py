"""What the live verbs (``record``, ``tap``, ``send``) share around a session: the read size, the
progress snapshot they report, the sliding-window rate, and writing a chunk to a recording."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CHUNK", "Progress", "Rate", "write_all"]

#: bytes read from a channel or an input at a time
CHUNK = 1 << 20


@dataclass
class Progress:
    """A snapshot for a live display.  ``total``: bytes to go in all, when known (send)."""

    elapsed: float
    bytes: int
    pages: int
    passes: int
    section: str
    rate: float  # bytes/s over the last second or so
    total: int | None = None
    back_bytes: int = 0
    rp_messages: int = 0
    page_requests: int = 0
    phase: str = ""


class Rate:
    """Bytes per second over a sliding window of about a second."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def update(self, now: float, total: int) -> float:
        self.marks.append((now, total))
        while len(self.marks) > 2 and now - self.marks[1][0] >= 1.0:
            self.marks.pop(0)
        t0, b0 = self.marks[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd`` (a recording)."""
    while view:
        n = os.write(fd, view)
        view = view[n:]
