"""QEMU 7.2's compression threads: pages deflated by a pool of workers, sent as COMPRESS_PAGE records.

With the ``compress`` capability (``--migration-api 7.2``) the RAM saver hands every non-zero page
of the first pass (QEMU stops compressing once XBZRLE takes over, from the second pass on) to one of
``compress-threads`` workers.  A worker deflates the page into a complete zlib stream at
``compress-level`` (QEMU's per-thread ``deflateReset`` + ``deflate(Z_FINISH)``, the same bytes as
``zlib.compress``); the record is the page header with ``RAM_SAVE_FLAG_COMPRESS_PAGE`` (and
``CONTINUE``: QEMU sends the first page of a block uncompressed, so that the compressed ones never
carry the block name), a big-endian 32-bit length, and the zlib stream.  zlib releases the GIL,
so the workers do run in parallel.

Pages go to the workers in batches of ``BATCH`` (the records are the same as with one page per job).
Records are written in submission order (QEMU writes whichever thread finishes first; the order of
pages inside an iteration does not matter to the loader), and every record is out before the end
of the iteration and before a new pass starts over pages already sent.  A page that finds every
worker busy is counted in ``busy``; with ``compress-wait-thread`` off it is sent uncompressed, as
QEMU does, with it on it waits.

The counters are QEMU 7.2's ``compression`` object of ``query-migrate``: pages, busy, busy-rate,
compressed-size, compression-rate.
"""

from __future__ import annotations

import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["CompressPool", "CompressCounters"]

_B32 = struct.Struct(">I")


@dataclass
class CompressCounters:
    pages: int = 0
    busy: int = 0
    compressed_size: int = 0
    busy_rate: float = 0.0
    compression_rate: float = 0.0

    def info(self) -> dict[str, Any]:
        return {"pages": self.pages, "busy": self.busy, "busy-rate": self.busy_rate,
                "compressed-size": self.compressed_size, "compression-rate": self.compression_rate}


def _deflate_many(pages: list[bytes], level: int) -> list[bytes]:
    return [zlib.compress(p, level) for p in pages]


#: pages handed to a worker at a time: one Python job per page costs about a quarter of zlib level 1's
#: own time on this machine, which would leave a second worker nothing to gain
BATCH = 32


class CompressPool:
    """``threads`` workers compressing pages at ``level``; ``submit`` queues a page, ``drain`` /
    ``flush`` write the finished records, in order, with ``write``."""

    def __init__(self, threads: int, level: int, wait: bool, page_size: int) -> None:
        self.threads = threads
        self.level = level
        self.wait = wait
        self.page_size = page_size
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        self.queue: deque[tuple[list[bytes], Future[list[bytes]]]] = deque()
        self.batch: list[tuple[bytes, bytes]] = []
        self.c = CompressCounters()
        self._period_pages = 0
        self._period_busy = 0
        self._period_size = 0
        self._period_compressed = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, head: bytes, data: bytes, write: Callable[[bytes], None]) -> bool:
        """Queue one page whose record starts with ``head``; False when every worker is busy and
        ``compress-wait-thread`` is off (the caller sends the page uncompressed)."""
        self._period_pages += 1
        q = self.queue
        if len(q) >= self.threads and not q[0][1].done():  # no free worker
            self.c.busy += 1
            self._period_busy += 1
            if not self.wait:
                return False
        self.batch.append((head, data))
        if len(self.batch) >= BATCH:
            self._dispatch(write)
        return True

    def _dispatch(self, write: Callable[[bytes], None]) -> None:
        self.drain(write)
        while len(self.queue) >= self.threads:
            self._write_one(write)  # wait for the oldest worker
        heads = [h for h, _ in self.batch]
        pages = [d for _, d in self.batch]
        self.batch = []
        self.queue.append((heads, self.pool.submit(_deflate_many, pages, self.level)))

    def drain(self, write: Callable[[bytes], None]) -> None:
        """Write the records that are ready, in submission order."""
        q = self.queue
        while q and q[0][1].done():
            self._write_one(write)

    def flush(self, write: Callable[[bytes], None]) -> None:
        """Write every queued record (QEMU's flush_compressed_data)."""
        if self.batch:
            self._dispatch(write)
        while self.queue:
            self._write_one(write)

    def _write_one(self, write: Callable[[bytes], None]) -> None:
        heads, fut = self.queue.popleft()
        for head, body in zip(heads, fut.result(), strict=True):
            write(head + _B32.pack(len(body)) + body)
            self.c.pages += 1
            self.c.compressed_size += len(head) + 4 + len(body) - 8  # QEMU: the record less the 8-byte offset
            self._period_compressed += 1
            self._period_size += len(body)

    def update_rates(self) -> None:
        """At a dirty sync: busy-rate and compression-rate over the period since the last one."""
        if self._period_pages:
            self.c.busy_rate = self._period_busy / self._period_pages
        if self._period_size:
            self.c.compression_rate = self._period_compressed * self.page_size / self._period_size
        self._period_pages = self._period_busy = self._period_size = self._period_compressed = 0
