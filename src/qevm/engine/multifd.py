"""Multifd and mapped-ram in the engine, as QEMU 10.0 does them (migration/multifd.c,
multifd-nocomp.c, multifd-zero-page.c, ram.c, file.c), on the packet codec of
``qevm.format.multifd``.

Source (``MultifdRamSaver`` + ``SendChannels``): with the ``multifd`` capability the migration
thread queues dirty pages instead of writing PAGE records; every 128 pages (512 KiB) make a packet
handed to the next free channel thread, which reads the pages then, finds the zero ones
(``zero-page-detection`` ``multifd``) and sends header + data on its own connection (it sent the
64-byte initial packet first).  A *sync* (``multifd_ram_flush_and_sync``) sends the partial packet,
asks every channel for one SYNC packet, waits until each has sent it, then writes
RAM_SAVE_FLAG_MULTIFD_FLUSH on the main stream: once in the START section and each time the RAM
scan passes the end of RAM (the per-round mode, QEMU >= 8.1 machine types), which includes the
last scan in the END section.

With ``mapped-ram`` on a ``file:`` URI the channels write pages at their place in the file
(``pwrite``), keeping the block's file bitmap (normal pages set, zero pages cleared); syncs are
local (no MULTIFD_FLUSH); the bitmap is written before the END section's EOS.  Without multifd one
channel thread does it (same file).

Destination (``RecvChannels``): all connections come on the one listener; each is told apart by
its first four bytes ("QEVM" main, 0x11223344 multifd).  Each channel thread checks the initial
packet, then applies packets to RAM; after a SYNC packet it waits until the main stream reaches its
MULTIFD_FLUSH (``sync_main``), so no page of a later epoch is applied before the flush.  A file
with mapped-ram is loaded by ``MappedRamLoad``: the pages of each block's bitmap read in parallel
(``preadv`` by ``multifd-channels`` threads) when the bitmap is met, the page region skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from qevm.engine.errors import QMPError
from qevm.engine.machine import RAM_BLOCK, Machine
from qevm.engine.stream import Cancelled, RamSaver, StreamOut
from qevm.errors import DecodeError, QevmError
from qevm.format.events import Event, MappedRamBitmap, RamBlock, RamControl, RamMemSize
from qevm.format.multifd import (
    FLAG_COMPRESSION_MASK,
    FLAG_DEVICE_STATE,
    FLAG_SYNC,
    INIT_SIZE,
    MULTIFD_MAGIC,
    MultifdInit,
    MultifdPacket,
    bitmap_size,
    mapped_ram_header,
    packet_len,
    page_count,
)
from qevm.format.pagebits import set_bits
from qevm.format.records import RamFlag
from qevm.io.convert import bit_runs
from qevm.migration.channels import Channel, FdChannel, Incoming, SocketChannel, TransportError, open_outgoing
from qevm.migration.ratelimit import RateLimiter

__all__ = ["check_capabilities", "check_transport", "SendChannels", "MultifdRamSaver", "RecvChannels",
           "MappedRamLoad", "uses_multifd"]

log = logging.getLogger(__name__)

_FLUSH_RECORD = RamControl(0, int(RamFlag.MULTIFD_FLUSH)).encode()
_EOS_RECORD = RamControl(0, int(RamFlag.EOS)).encode()
_QEVM_MAGIC = b"QEVM"
_WAIT = 0.1  # seconds between checks while waiting for a channel


# -- capability and transport checks (QEMU 10.0's options.c / migration.c texts) ----------------------------

def check_capabilities(new: dict[str, bool], *, incoming_started: bool, multifd_was: bool, api: str) -> None:
    """The combined state ``new`` after migrate-set-capabilities: QEMU's refusals for multifd and
    mapped-ram (those involving postcopy are ``qevm.engine.postcopy.postcopy_caps_error``'s)."""
    if new.get("multifd"):
        if api != "10.0":
            raise QMPError("qevm's engine sends multifd as QEMU 10.0 does: use --migration-api 10.0")
        if not multifd_was and incoming_started:
            raise QMPError("Multifd must be set before incoming starts")
        if new.get("xbzrle"):
            raise QMPError("Multifd is not compatible with xbzrle")
    if new.get("mapped-ram"):
        if new.get("xbzrle"):
            raise QMPError("Mapped-ram migration is incompatible with xbzrle")


def check_transport(caps: dict[str, bool], params: dict[str, Any], uri: str) -> None:
    """``migration_channels_and_transport_compatible`` and the mapped-ram parameter checks."""
    scheme = uri.partition(":")[0]
    if caps.get("mapped-ram"):
        if scheme != "file":
            raise QMPError("Migration requires seekable transport (e.g. file)")
        if params.get("multifd-compression", "none") != "none":
            raise QMPError("Cannot use compression with mapped-ram")
    if caps.get("multifd"):
        if scheme not in ("tcp", "unix", "vsock") and not (scheme == "file" and caps.get("mapped-ram")):
            raise QMPError("Migration requires multi-channel URIs (e.g. tcp)")
        if params.get("multifd-compression", "none") != "none":
            raise QMPError(f"qevm's engine does not implement multifd-compression="
                           f"{params['multifd-compression']!r}; set it back to none")


def uses_multifd(caps: dict[str, bool]) -> bool:
    return bool(caps.get("multifd") or caps.get("mapped-ram"))


# -- source --------------------------------------------------------------------------------------------

class _Mapped:
    """A mapped-ram file being written: where the block's pages go and its file bitmap."""

    def __init__(self, fd: int, pages_offset: int, bitmap_offset: int, used: int, page_size: int) -> None:
        self.fd = fd
        self.pages_offset = pages_offset
        self.bitmap_offset = bitmap_offset
        self.bitmap = bytearray(bitmap_size(used, page_size))
        self.lock = threading.Lock()


class SendChannels:
    """The channel threads of the source (QEMU's ``multifd_send_state``).  ``channels``: the
    connections (one per thread), or None for mapped-ram, where ``count`` threads write the file."""

    def __init__(self, machine: Machine, *, count: int, channels: list[Channel] | None, zero_detect: bool,
                 limiter: RateLimiter | None, out: StreamOut, abort: threading.Event,
                 on_pages: Callable[[int, int], None]) -> None:
        self.m = machine
        self.ps = machine.page_size
        self.zero = bytes(self.ps)
        self.per_packet = page_count(self.ps)
        self.channels = channels
        self.count = len(channels) if channels is not None else count
        self.zero_detect = zero_detect
        self.limiter = limiter
        self.out = out  # its ``limited`` flag: off in the stop-and-copy phase, as the main stream
        self.abort = abort
        self.on_pages = on_pages  # (normal, zero) counted by the caller's counters
        self.mapped: _Mapped | None = None
        self.bytes = 0  # multifd-bytes
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._limit_lock = threading.Lock()
        self._num = itertools.count()
        self._batch: list[int] = []
        self._next = 0
        self._queues: list[queue.Queue[object]] = [queue.Queue(maxsize=1) for _ in range(self.count)]
        self._synced = [threading.Semaphore(0) for _ in range(self.count)]
        self._remote_sync = channels is not None
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"mig/src/send_{i}", daemon=True)
                         for i in range(self.count)]
        for t in self._threads:
            t.start()

    # -- main thread side ------------------------------------------------------------------------------
    def queue_page(self, offset: int) -> None:
        """``multifd_queue_page`` for the one RAM block: a full batch goes to a channel."""
        self._batch.append(offset)
        if len(self._batch) >= self.per_packet:
            self._send_batch()

    def _check(self) -> None:
        if self.error is not None:
            if isinstance(self.error, QevmError):
                raise QevmError(f"multifd: {self.error}") from self.error
            raise QevmError(f"multifd: {self.error}")
        if self.abort.is_set():
            raise Cancelled()

    def _put(self, i: int, job: object, block: bool) -> bool:
        q = self._queues[i]
        while True:
            self._check()
            try:
                q.put(job, block=block, timeout=_WAIT if block else None)
                return True
            except queue.Full:
                if not block:
                    return False

    def _send_batch(self) -> None:
        """``multifd_send``: the first free channel from the next one on takes the batch."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        n = self.count
        for k in range(n):
            i = (self._next + k) % n
            if self._put(i, batch, block=False):
                self._next = (i + 1) % n
                return
        i = self._next
        self._put(i, batch, block=True)
        self._next = (i + 1) % n

    def sync(self) -> None:
        """``multifd_ram_flush_and_sync`` minus the main-stream record (the caller writes it)."""
        self._send_batch()
        for i in range(self.count):
            self._put(i, _SYNC, block=True)
        for sem in self._synced:
            while not sem.acquire(timeout=_WAIT):
                self._check()
        self._check()

    def close(self) -> None:
        """End the threads (after the last sync) and the connections: the receivers see EOF."""
        for i, q in enumerate(self._queues):
            if self._threads[i].is_alive():
                with contextlib.suppress(queue.Full):
                    q.put(None, timeout=1.0)
        for t in self._threads:
            t.join(5.0)
        for ch in self.channels or ():
            ch.shutdown_write()
            ch.close()

    def kill(self) -> None:
        """After an error or a cancel: wake every thread and drop the connections."""
        if self.error is None:
            self.error = Cancelled()
        for ch in self.channels or ():
            ch.abort()
        for q in self._queues:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)
        for t in self._threads:
            t.join(2.0)
        for ch in self.channels or ():
            ch.close()

    # -- channel threads ------------------------------------------------------------------------------
    def _run(self, i: int) -> None:
        ch = self.channels[i] if self.channels is not None else None
        q = self._queues[i]
        try:
            if ch is not None:
                init = MultifdInit(i).encode()
                ch.sendall(init)
                self._add_bytes(len(init))
            while True:
                job = q.get()
                if job is None:
                    return
                if job is _SYNC:
                    if ch is not None:
                        pkt = MultifdPacket(FLAG_SYNC, next(self._num)).encode(self.ps)
                        ch.sendall(pkt)
                        self._add_bytes(len(pkt))
                    self._synced[i].release()
                    continue
                assert isinstance(job, list)
                self._pages(ch, job)
        except (QevmError, OSError) as e:
            if self.error is None:
                self.error = e
                log.error("multifd channel %d: %s", i, e)
            for c in self.channels or ():
                c.abort()

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def _take(self, n: int) -> None:
        lim = self.limiter
        if lim is None or not self.out.limited:
            return
        with self._limit_lock:
            if not lim.take(n, self.abort):
                raise Cancelled()

    def _pages(self, ch: Channel | None, offsets: list[int]) -> None:
        ram, ps, zero = memoryview(self.m.ram), self.ps, self.zero
        normal: list[int] = []
        zeros: list[int] = []
        data: list[memoryview] = []  # the guest's pages themselves, read as they are sent (QEMU's iovs)
        for off in offsets:
            page = ram[off:off + ps]
            if self.zero_detect and page == zero:
                zeros.append(off)
            else:
                normal.append(off)
                data.append(page)
        self.on_pages(len(normal), len(zeros))
        if ch is None:
            self._write_mapped(normal, data, zeros)
            return
        pkt = MultifdPacket(0, next(self._num), RAM_BLOCK, len(normal), len(zeros), normal + zeros,
                            len(normal) * ps).encode(ps)
        n = len(pkt) + len(normal) * ps
        self._take(n)
        _sendv(ch, [pkt, *data])
        self._add_bytes(n)

    def _write_mapped(self, normal: list[int], data: list[memoryview], zeros: list[int]) -> None:
        mp = self.mapped
        assert mp is not None
        ps = self.ps
        n = len(normal) * ps
        self._take(n)
        runs = list(_runs(normal, ps))
        for start, end in runs:
            os.pwritev(mp.fd, data[start:end], mp.pages_offset + normal[start])
        bm = mp.bitmap
        with mp.lock:
            for start, end in runs:
                set_bits(bm, normal[start] // ps, end - start)
            for off in zeros:
                p = off // ps
                bm[p >> 3] &= ~(1 << (p & 7)) & 0xFF
        self._add_bytes(n)


_SYNC = object()


def _runs(offsets: list[int], ps: int) -> Iterator[tuple[int, int]]:
    """Index ranges [start, end) of ``offsets`` that are consecutive pages."""
    start = 0
    for k in range(1, len(offsets) + 1):
        if k == len(offsets) or offsets[k] != offsets[k - 1] + ps:
            yield start, k
            start = k


class MultifdRamSaver(RamSaver):
    """The ``ram`` handler's save side with multifd and/or mapped-ram (see the module docstring)."""

    def __init__(self, machine: Machine, pool: SendChannels, *, mapped_fd: int | None, legacy_zero: bool,
                 on_sync: Callable[[int], None] | None = None) -> None:
        super().__init__(machine, on_sync=on_sync)
        self.pool = pool
        self.mapped_fd = mapped_fd
        self.legacy_zero = legacy_zero and mapped_fd is None
        self._base = 0  # file offset of out.total (mapped-ram)
        if mapped_fd is not None:
            self._base = os.lseek(mapped_fd, 0, os.SEEK_CUR)

    def setup(self, out: StreamOut) -> None:
        if self.mapped_fd is None:
            super().setup(out)
            return
        # the START payload with the block's mapped-ram header, then the main stream goes on after
        # the block's page region (mapped_ram_setup_ramblock)
        self.all_dirty()
        size, ps = self.m.ram_size, self.ps
        head = RamMemSize(0, size).encode() + RamBlock(0, RAM_BLOCK, size).encode()
        at = self._base + out.total + len(out.buf) + len(head)
        hdr = mapped_ram_header(at, size, ps)
        out.write(head + hdr.encode())
        out.flush()
        resume = hdr.pages_offset + size
        os.lseek(self.mapped_fd, resume, os.SEEK_SET)
        self._base = resume - out.total
        self.pool.mapped = _Mapped(self.mapped_fd, hdr.pages_offset, hdr.bitmap_offset, size, ps)
        self._before_eos(out, None)
        out.write(_EOS_RECORD)

    def _save_page(self, out: StreamOut, p: int) -> None:
        if self.legacy_zero:
            off = p * self.ps
            if self.m.ram[off:off + self.ps] == self.zero:
                super()._save_page(out, p)  # a ZERO record on the main stream
                return
        self.c.pages_sent += 1
        self.pool.queue_page(p * self.ps)

    def _round_done(self) -> None:
        """The scan passed the end of RAM: a per-round sync."""
        super()._round_done()
        if self._out is not None:
            self._flush_and_sync(self._out)

    def _flush_and_sync(self, out: StreamOut) -> None:
        self.pool.sync()
        if self.mapped_fd is None:
            # out at once (qemu_fflush): the destination's channels wait for it before reading on
            out.write(_FLUSH_RECORD)
            out.flush()

    def _before_eos(self, out: StreamOut, deadline: float | None) -> None:
        """START: the setup sync.  END (no deadline) with mapped-ram: the file bitmap."""
        if deadline is None and self._out is None:  # setup
            self._flush_and_sync(out)
            self._out = out
            return
        if deadline is None and self.mapped_fd is not None and self.pool.mapped is not None:
            self.pool.sync()
            mp = self.pool.mapped
            os.pwrite(mp.fd, bytes(mp.bitmap), mp.bitmap_offset)


# -- destination ----------------------------------------------------------------------------------------

class RecvChannels:
    """The destination's multifd channels (QEMU's ``multifd_recv_state``)."""

    def __init__(self, machine: Machine, count: int) -> None:
        self.m = machine
        self.count = count
        self.ps = machine.page_size
        self.plen = packet_len(self.ps)
        self.channels: list[SocketChannel] = []
        self.threads: list[threading.Thread] = []
        self.error: str | None = None
        self.stop = threading.Event()
        self.main: Channel | None = None
        self.pages = 0
        self.packets = 0
        self._synced = threading.Semaphore(0)
        self._release: list[threading.Semaphore] = []
        self._ids: set[int] = set()
        self._lock = threading.Lock()

    def accept(self, inc: Incoming) -> Channel:
        """Take the main connection and ``count`` multifd ones, in any order (told apart by their
        first bytes); return the main one, the channel threads running."""
        first = inc.accept(keep_listening=True)
        conns = [first]
        while len(conns) < self.count + 1:
            conns.append(inc.accept_extra())
        inc.stop_listening()
        main = None
        for ch in conns:
            if not isinstance(ch, SocketChannel):
                raise TransportError("multifd needs socket connections")
            magic = _peek(ch, 4)
            if magic == _QEVM_MAGIC and main is None:
                main = ch
            elif int.from_bytes(magic, "big") == MULTIFD_MAGIC:
                self.channels.append(ch)
            else:
                raise TransportError(f"a connection to {inc.address} begins with {magic.hex()}: neither the "
                                     "migration stream nor a multifd channel")
        if main is None:
            raise TransportError(f"{self.count + 1} connections came to {inc.address} but none carries the "
                                 "migration stream")
        inc.set_main(main)
        self.main = main
        for i, ch in enumerate(self.channels):
            self._release.append(threading.Semaphore(0))
            t = threading.Thread(target=self._run, args=(i, ch), name=f"mig/dst/recv_{i}", daemon=True)
            self.threads.append(t)
            t.start()
        return main

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = why
        self.stop.set()
        if self.main is not None:
            self.main.abort()  # the main load stops too, and reports ``error``
        for ch in self.channels:
            ch.abort()

    def _run(self, i: int, ch: SocketChannel) -> None:
        try:
            self._receive(i, ch)
        except (QevmError, OSError) as e:
            if not self.stop.is_set():
                self._fail(str(e))

    def _receive(self, i: int, ch: SocketChannel) -> None:
        first = _read(ch, INIT_SIZE)
        assert first is not None
        init = MultifdInit.decode(first, 0)
        if init.uuid != bytes(16):
            raise DecodeError(f"multifd: received uuid '{_uuid(init.uuid)}' and expected uuid "
                              f"'{_uuid(bytes(16))}' for channel {init.channel}")
        if init.channel > self.count:
            raise DecodeError(f"multifd: received channel id {init.channel} is greater than number of channels "
                              f"{self.count}")
        with self._lock:
            if init.channel in self._ids:
                raise DecodeError(f"multifd: channel id {init.channel} received twice")
            self._ids.add(init.channel)
        ram = memoryview(self.m.ram)
        ps, size = self.ps, self.m.ram_size
        zero = bytes(ps)
        pos = INIT_SIZE
        while True:
            head = _read(ch, self.plen, eof_ok=True)
            if head is None:
                return  # the source closed the channel between packets
            pkt = MultifdPacket.decode(head, ps, pos)
            pos += self.plen
            if pkt.flags & FLAG_DEVICE_STATE:
                raise DecodeError("multifd: a device-state packet (VFIO); qevm's engine has no such device", pos)
            comp = pkt.flags & FLAG_COMPRESSION_MASK
            if comp and pkt.normal:
                raise DecodeError(f"multifd {init.channel}: flags received {comp:x} flags expected 0", pos)
            if pkt.normal or pkt.zero:
                if pkt.block != RAM_BLOCK:
                    raise DecodeError(f"multifd: unknown ram block {pkt.block}", pos)
                for off in pkt.offsets:
                    if off > size - ps or off % ps:
                        raise DecodeError(f"multifd: offset too long {off} (max 0x{size:x})", pos)
                for off in pkt.offsets[pkt.normal:]:
                    ram[off:off + ps] = zero
                _recvv(ch, [ram[off:off + ps] for off in pkt.offsets[:pkt.normal]])
                pos += pkt.normal * ps
                with self._lock:
                    self.pages += pkt.normal + pkt.zero
                    self.packets += 1
            if pkt.flags & FLAG_SYNC:
                self._synced.release()
                while not self._release[i].acquire(timeout=_WAIT):
                    if self.stop.is_set():
                        return

    def sync_main(self) -> None:
        """``multifd_recv_sync_main``: every channel reached its SYNC packet; then let them go on."""
        for _ in self.channels:
            while not self._synced.acquire(timeout=_WAIT):
                if self.error is not None:
                    raise QevmError(self.error)
                if self.stop.is_set():
                    raise TransportError("incoming migration aborted")
                dead = [i for i, t in enumerate(self.threads) if not t.is_alive()]
                if dead:  # ended at a packet boundary, but the stream still expects its SYNC
                    self._fail(f"multifd channel {dead[0]} was closed before its sync packet")
        for sem in self._release:
            sem.release()

    def finish(self) -> None:
        """The main stream is loaded: the channels end (EOF from the source, or cut after a while)."""
        for t in self.threads:
            t.join(5.0)
        self.close()

    def close(self) -> None:
        self.stop.set()
        for ch in self.channels:
            ch.abort()
            ch.close()


def _peek(ch: SocketChannel, n: int) -> bytes:
    try:
        return ch.sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError as e:
        raise TransportError(f"{ch.peer}: {e.strerror or e}") from e


def _read(ch: Channel, n: int, eof_ok: bool = False) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = ch.recv_into(view[got:])
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise DecodeError(f"multifd channel ended after {got} of {n} bytes of a packet")
        got += k
    return bytes(buf)


def _sendv(ch: Channel, bufs: list[Any]) -> None:
    """``qio_channel_writev_full_all``: a header and the pages in one ``sendmsg`` where it can."""
    if not isinstance(ch, SocketChannel):
        ch.sendall(b"".join(bufs))
        return
    views = [memoryview(b) for b in bufs]
    try:
        while views:
            n = ch.sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
    except OSError as e:
        raise TransportError(f"{ch.peer}: connection lost while sending: {e.strerror or e}") from e


def _recvv(ch: SocketChannel, views: list[memoryview]) -> None:
    """Read straight into the pages (``qio_channel_readv_all``), one ``recvmsg_into`` per round."""
    while views:
        n = ch.sock.recvmsg_into(views)[0]
        if n == 0:
            raise DecodeError("multifd channel ended inside the pages of a packet")
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _uuid(b: bytes) -> str:
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class MappedRamLoad:
    """Load the pages of a mapped-ram file as its blocks' bitmaps are met (``parse_ramblock_mapped_ram``
    with ``read_ramblock_mapped_ram`` handing the page runs to ``threads`` readers)."""

    def __init__(self, machine: Machine, fd: int, threads: int) -> None:
        self.m = machine
        self.fd = fd
        self.threads = max(1, threads)
        self.header: dict[str, Any] = {}
        self.pages = 0

    def hook(self, ev: Event) -> None:
        if isinstance(ev, RamBlock) and ev.mapped is not None:
            if ev.mapped.page_size != self.m.page_size:
                raise DecodeError(f"mapped-ram: page size {ev.mapped.page_size} in the file, "
                                  f"{self.m.page_size} here", ev.offset, "ram")
            if ev.mapped.pages_offset % self.m.page_size:
                raise DecodeError("Pages offset unaligned", ev.offset, "ram")
            self.header[ev.name] = ev.mapped
        elif isinstance(ev, MappedRamBitmap):
            self._load(ev.block, ev.data)

    def _load(self, block: str, bitmap: bytes) -> None:
        hdr = self.header.get(block)
        if hdr is None or block != RAM_BLOCK:
            return  # the loader refuses unknown blocks on its own
        ps = self.m.page_size
        npages = self.m.npages
        runs = [(a, e - a) for a, e, present in bit_runs(bitmap, npages, 256) if present]
        self.pages += sum(n for _, n in runs)
        ram = memoryview(self.m.ram)
        err: list[BaseException] = []

        def reader(k: int) -> None:
            try:
                for start, n in runs[k::self.threads]:
                    view = ram[start * ps:(start + n) * ps]
                    at = hdr.pages_offset + start * ps
                    while len(view):
                        got = os.preadv(self.fd, [view], at)
                        if got <= 0:
                            raise DecodeError(f"mapped-ram: the file ends inside the pages of block {block!r}",
                                              at)
                        view, at = view[got:], at + got
            except (OSError, QevmError) as e:
                err.append(e)

        ts = [threading.Thread(target=reader, args=(k,), name=f"mig/dst/recv_{k}") for k in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if err:
            raise QevmError(f"mapped-ram: {err[0]}")


def open_channels(uri: str, count: int, timeout: float = 30.0) -> list[Channel]:
    """``count`` more connections to the destination the main channel went to."""
    out: list[Channel] = []
    try:
        for _ in range(count):
            ch = open_outgoing(uri, timeout=timeout)
            if isinstance(ch, SocketChannel):
                ch.settimeout(None)
            out.append(ch)
    except QevmError:
        for ch in out:
            ch.close()
        raise
    return out


def attach_source(state: Any, sess: Any, ch: Channel, limiter: RateLimiter, abort: threading.Event) -> SendChannels:
    """Give the migration's save session a multifd/mapped-ram RAM handler (``state``: the engine's
    ``MigrationState``; its capabilities, parameters and URI)."""
    caps, params = state.caps, state.params
    m = sess.m
    count = int(params["multifd-channels"]) if caps.get("multifd") else 1
    mapped_fd: int | None = None
    channels: list[Channel] | None = None
    if caps.get("mapped-ram"):
        if not isinstance(ch, FdChannel):
            raise QevmError("Migration requires seekable transport (e.g. file)")
        mapped_fd = ch.fileno()
        sess.capabilities = ["mapped-ram"]
    else:
        channels = open_channels(state.uri, count)
    zd = params.get("zero-page-detection", "multifd")
    c = sess.ram.c
    lock = threading.Lock()

    def on_pages(normal: int, zero: int) -> None:
        with lock:
            c.normal += normal
            c.duplicate += zero

    pool = SendChannels(m, count=count, channels=channels, zero_detect=zd == "multifd" or (
        mapped_fd is not None and zd != "none"), limiter=limiter, out=sess.out, abort=abort, on_pages=on_pages)
    saver = MultifdRamSaver(m, pool, mapped_fd=mapped_fd, legacy_zero=zd == "legacy", on_sync=sess.ram.on_sync)
    saver.c = c
    sess.ram = saver
    return pool
