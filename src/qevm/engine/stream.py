"""Writing a stream: QEMU's ``qemu_savevm_state_*`` phases for this machine, the RAM handler's
save side (dirty bitmap, page scan, zero pages, XBZRLE with a cache), and the output buffer that
counts every byte put on the wire (through ``qevm.migration.ratelimit.RateLimiter``).

    out = StreamOut(channel.sendall, limiter=RateLimiter(32 << 20))
    s = SaveSession(machine, out)
    s.header(); s.setup()             # header + configuration, START ram (MEM_SIZE list)
    while s.ram.pending() > ...:      # PART ram sections while the guest runs
        s.iterate(deadline)
    s.complete()                      # END ram, FULL device sections, EOF, vmdesc

Records are written with the exact layout of ``qevm.format.events`` (``SectionHeader``, ``Footer``...);
page records start with ``qevm.format.records.ram_record_head`` (the one RAM record encoder), the
device sections and the vmdesc trailer come from the machine's ``SaveStateRegistry.events``.
"""

from __future__ import annotations

import json
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from qevm.engine.compress import CompressPool
from qevm.engine.machine import MACHINE_TYPE, RAM_BLOCK, Machine
from qevm.errors import QevmError
from qevm.format.events import (
    Configuration,
    DeviceState,
    EndOfFile,
    FileHeader,
    Footer,
    RamBlock,
    RamControl,
    RamMemSize,
    Section,
    SectionHeader,
    VmDescription,
)
from qevm.format.records import RamFlag, SectionKind, ram_record_head
from qevm.format.selfdesc import DEBUG_MIGRATION_IDSTR, encode_debug_payload
from qevm.io.convert import vmdesc_with_caps, with_caps
from qevm.migration.ratelimit import RateLimiter
from qevm.vmstate.jsonout import vmdesc_json

__all__ = ["Cancelled", "StreamOut", "LiveSaver", "RamCounters", "RamSaver", "SaveSession", "xor_delta",
           "XBZRLE_DEFAULT_CACHE", "embed_vmdesc"]

XBZRLE_DEFAULT_CACHE = 64 << 20
_B16 = struct.Struct(">H")
_XBZRLE_ENCODING = b"\x01"  # ENCODING_FLAG_XBZRLE
_NONZERO = re.compile(rb"[^\x00]+")
_ZERO, _PAGE, _EOS, _CONT, _XBZRLE = (int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.EOS), int(RamFlag.CONTINUE),
                                     int(RamFlag.XBZRLE))
_COMPRESS = int(RamFlag.COMPRESS_PAGE)

_EOS_RECORD = RamControl(0, _EOS).encode()


class Cancelled(QevmError):
    """The writer was told to stop (migrate_cancel)."""


# -- output --------------------------------------------------------------------------------------------

class StreamOut:
    """Buffers records and hands them to ``sink`` in chunks, through the rate limiter; ``total`` is
    every byte handed over (``transferred`` in query-migrate)."""

    def __init__(self, sink: Callable[[bytes | bytearray], object], *, limiter: RateLimiter | None = None,
                 abort: threading.Event | None = None, chunk: int = 64 << 10) -> None:
        self.sink = sink
        self.limiter = limiter
        self.abort = abort
        self.chunk = chunk
        self.buf = bytearray()
        self.total = 0
        self.limited = True  # False during the stop-and-copy phase, as QEMU

    def write(self, data: bytes | bytearray) -> None:
        self.buf += data
        if len(self.buf) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        if self.abort is not None and self.abort.is_set():
            raise Cancelled()
        buf, self.buf = self.buf, bytearray()
        if self.limiter is not None and self.limited and not self.limiter.take(len(buf), self.abort):
            raise Cancelled()
        self.sink(buf)
        self.total += len(buf)


# -- XBZRLE ------------------------------------------------------------------------------------------------

def _uleb(out: bytearray, v: int) -> None:
    if v < 0x80:
        out.append(v)
    else:
        out.append((v & 0x7F) | 0x80)
        out.append(v >> 7)


def xor_delta(old: bytes, new: bytes) -> bytes | None:
    """The XBZRLE delta turning ``old`` into ``new`` (same bytes as ``qevm.xbzrle.make_delta``: runs of
    differing bytes are the non-zero runs of ``old ^ new``, found by the regex engine instead of a
    Python loop).  None when the delta would be longer than the page (QEMU's overflow)."""
    n = len(new)
    x = (int.from_bytes(old, "big") ^ int.from_bytes(new, "big")).to_bytes(n, "big")
    out = bytearray()
    prev = 0
    for m in _NONZERO.finditer(x):
        s, e = m.span()
        _uleb(out, s - prev)
        _uleb(out, e - s)
        out += new[s:e]
        prev = e
        if len(out) > n:
            return None
    return bytes(out)


# -- RAM -------------------------------------------------------------------------------------------------

@dataclass
class RamCounters:
    """QEMU's ram_counters / xbzrle_counters (what query-migrate shows under "ram" / "xbzrle-cache")."""

    duplicate: int = 0
    normal: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    xbzrle_bytes: int = 0
    xbzrle_pages: int = 0
    xbzrle_cache_miss: int = 0
    xbzrle_overflow: int = 0
    xbzrle_cache_miss_rate: float = 0.0
    xbzrle_encoding_rate: float = 0.0
    pages_sent: int = 0  # pages of every kind (pages-per-second)


class RamSaver:
    """The save side of the ``ram`` live handler for one RAMBlock."""

    def __init__(self, machine: Machine, *, xbzrle: bool = False, cache_size: int = XBZRLE_DEFAULT_CACHE,
                 on_sync: Callable[[int], None] | None = None, compress: CompressPool | None = None) -> None:
        self.m = machine
        self.compress = compress
        self._out: StreamOut | None = None
        self.ps = machine.page_size
        self.zero = bytes(self.ps)
        self.bitmap = bytearray(machine.npages)
        self.dirty_count = 0
        self.pos = 0
        self.last_block: str | None = None
        self.xbzrle = xbzrle
        self.xbzrle_active = False  # from the second round on, as QEMU
        self.cache: dict[int, bytes] = {}
        self.cache_pages = max(1, cache_size // self.ps)
        self.c = RamCounters()
        self.on_sync = on_sync
        self._rate_t = time.monotonic()
        self._rate_pages = 0
        self._period_visits = 0
        self._period_misses = 0
        self._period_xbz_pages = 0
        self._period_xbz_bytes = 0

    def pending(self) -> int:
        return self.dirty_count * self.ps

    def sync(self) -> None:
        """Merge the machine's dirty log into the bitmap (QEMU's migration_bitmap_sync); the caller
        holds the machine lock or the machine is stopped."""
        with self.m.lock:
            log = self.m.take_dirty()
        n = len(self.bitmap)
        merged = (int.from_bytes(self.bitmap, "little") | int.from_bytes(log, "little")).to_bytes(n, "little")
        self.bitmap = bytearray(merged)
        self.dirty_count = self.bitmap.count(1)
        self._rate_pages += log.count(1)
        now = time.monotonic()
        if now - self._rate_t >= 1.0:
            self.c.dirty_pages_rate = int(self._rate_pages / (now - self._rate_t))
            self._rate_t = now
            self._rate_pages = 0
        if self.compress is not None:
            self.compress.update_rates()
        if self.xbzrle and self._period_visits:
            self.c.xbzrle_cache_miss_rate = self._period_misses / self._period_visits
            if self._period_xbz_bytes:
                self.c.xbzrle_encoding_rate = self._period_xbz_pages * self.ps / self._period_xbz_bytes
            self._period_visits = self._period_misses = self._period_xbz_pages = self._period_xbz_bytes = 0
        self.c.dirty_sync_count += 1
        if self.on_sync is not None:
            self.on_sync(self.c.dirty_sync_count)

    # -- payloads ------------------------------------------------------------------------------------
    def setup(self, out: StreamOut) -> None:
        """The START payload: MEM_SIZE with the block list, EOS.  Every page starts dirty."""
        self.all_dirty()
        size = self.m.ram_size
        out.write(RamMemSize(0, size).encode() + RamBlock(0, RAM_BLOCK, size).encode())
        self._before_eos(out, None)
        out.write(_EOS_RECORD)

    def all_dirty(self) -> None:
        """Setup's first sync: every page dirty, the machine's log emptied."""
        self.bitmap = bytearray(b"\x01" * self.m.npages)
        with self.m.lock:
            self.m.take_dirty()
        self.dirty_count = self.m.npages
        self.c.dirty_sync_count += 1
        if self.on_sync is not None:
            self.on_sync(self.c.dirty_sync_count)

    def iterate(self, out: StreamOut, deadline: float | None,
                urgent: Callable[[StreamOut], int | None] | None = None) -> int:
        """Send dirty pages, scanning on from where the last call stopped, until none are left or
        ``deadline`` (monotonic) has passed; then EOS.  Returns the pages visited.  ``urgent`` runs
        before each page (postcopy: it sends the requested pages with ``send_page`` and returns the
        page after the last one, where the scan goes on, or None)."""
        self._out = out
        bm = self.bitmap
        pos = self.pos
        visited = 0
        while True:
            if urgent is not None:
                q = urgent(out)
                if q is not None:
                    pos = q
            p = bm.find(1, pos)
            if p < 0:
                self._round_done()
                if pos == 0 or not self.dirty_count:
                    pos = 0
                    break
                pos = 0
                continue
            bm[p] = 0
            self.dirty_count -= 1
            self._save_page(out, p)
            visited += 1
            pos = p + 1
            if deadline is not None and not visited & 63 and time.monotonic() >= deadline:
                break
        self.pos = pos
        if self.compress is not None:
            self.compress.flush(out.write)
        self._before_eos(out, deadline)
        out.write(_EOS_RECORD)
        return visited

    def send_page(self, out: StreamOut, p: int) -> bool:
        """Send page ``p`` now if it is still dirty (a postcopy page request); False when it was
        sent already (by the scan, or for an earlier request)."""
        if not self.bitmap[p]:
            return False
        self.bitmap[p] = 0
        self.dirty_count -= 1
        self._save_page(out, p)
        return True

    def _before_eos(self, out: StreamOut, deadline: float | None) -> None:
        """Hook before a section's EOS (multifd syncs, the mapped-ram bitmap: ``qevm.engine.multifd``)."""

    def _round_done(self) -> None:
        if self.xbzrle:
            self.xbzrle_active = True
        self._compress_out_flush()

    def _compress_out_flush(self) -> None:
        if self.compress is not None and self._out is not None:
            self.compress.flush(self._out.write)

    def _save_page(self, out: StreamOut, p: int) -> None:
        ps = self.ps
        off = p * ps
        data = self.m.ram[off:off + ps]
        c = self.c
        c.pages_sent += 1
        if self.last_block == RAM_BLOCK:
            cont = _CONT
        else:
            cont = 0
            self.last_block = RAM_BLOCK
        if data == self.zero:
            out.write(ram_record_head(off, _ZERO | cont, RAM_BLOCK) + b"\x00")
            c.duplicate += 1
            if self.xbzrle and p in self.cache:
                self.cache[p] = self.zero
            return
        pool = self.compress
        if pool is not None and cont and not self.xbzrle_active:
            if pool.submit(ram_record_head(off, _COMPRESS | cont, RAM_BLOCK), data, out.write):
                return
            pool.drain(out.write)
        if self.xbzrle_active:
            self._period_visits += 1
            old = self.cache.get(p)
            if old is None:
                c.xbzrle_cache_miss += 1
                self._period_misses += 1
                self._cache_insert(p, data)
            else:
                delta = xor_delta(old, data)
                if delta is not None and not delta:
                    c.pages_sent -= 1
                    return  # unchanged since it was sent: nothing to send
                self.cache[p] = data
                if delta is None:
                    c.xbzrle_overflow += 1
                else:
                    out.write(ram_record_head(off, _XBZRLE | cont, RAM_BLOCK) + _XBZRLE_ENCODING
                              + _B16.pack(len(delta)) + delta)
                    c.xbzrle_pages += 1
                    c.xbzrle_bytes += len(delta) + 3
                    self._period_xbz_pages += 1
                    self._period_xbz_bytes += len(delta) + 3
                    return
        out.write(ram_record_head(off, _PAGE | cont, RAM_BLOCK) + data)
        c.normal += 1

    def _cache_insert(self, p: int, data: bytes) -> None:
        cache = self.cache
        if len(cache) >= self.cache_pages:
            del cache[next(iter(cache))]
        cache[p] = data


# -- the whole stream ----------------------------------------------------------------------------------

class LiveSaver(Protocol):
    """A live section other than ram (``qevm.engine.blockmig``): its payload of each phase."""

    idstr: str
    before_ram: bool  # its handler is registered before ram's in QEMU (the order sections go out)
    iterates: bool  # sends PART sections while the VM runs

    def setup(self, write: Callable[[bytes], None]) -> None: ...
    def iterate(self, write: Callable[[bytes], None], deadline: float | None) -> None: ...
    def complete(self, write: Callable[[bytes], None]) -> None: ...
    def pending(self) -> int: ...
    def close(self) -> None: ...


class SaveSession:
    """One outgoing stream of this machine (migration or savevm): QEMU's savevm phases."""

    def __init__(self, machine: Machine, out: StreamOut, *, xbzrle: bool = False,
                 cache_size: int = XBZRLE_DEFAULT_CACHE, on_sync: Callable[[int], None] | None = None,
                 compress: CompressPool | None = None, lives: list[LiveSaver] | None = None) -> None:
        self.m = machine
        self.out = out
        self.ram = RamSaver(machine, xbzrle=xbzrle, cache_size=cache_size, on_sync=on_sync, compress=compress)
        ram = machine.ram_entry
        self._ram_section = Section(ram.section_id, ram.idstr, ram.instance_id, ram.version_id, "ram")
        self.capabilities: list[str] = []  # validated ones, listed in the configuration (mapped-ram)
        self.lives = lives or []
        self._live_sections: dict[str, Section] = {}
        for lv in self.lives:
            se = machine.registry.find(lv.idstr, 0)
            assert se is not None, lv.idstr
            self._live_sections[lv.idstr] = Section(se.section_id, se.idstr, se.instance_id, se.version_id, se.idstr)

    def _live_chunk(self, kind: SectionKind, before_ram: bool, body: Callable[[LiveSaver], None]) -> None:
        for lv in self.lives:
            if lv.before_ram != before_ram or (kind == SectionKind.PART and not lv.iterates):
                continue
            sec = self._live_sections[lv.idstr]
            self.out.write(SectionHeader(0, kind, sec).encode())
            body(lv)
            self.out.write(Footer(0, sec.section_id).encode())

    def live_pending(self) -> int:
        return sum(lv.pending() for lv in self.lives)

    def header(self) -> None:
        cfg = Configuration(0, MACHINE_TYPE, [])
        if self.capabilities:
            cfg = with_caps(cfg, self.capabilities)
        self.out.write(FileHeader(0).encode() + cfg.encode())

    def _ram_chunk(self, kind: SectionKind, body: Callable[[], Any]) -> None:
        self.out.write(SectionHeader(0, kind, self._ram_section).encode())
        body()
        self.out.write(Footer(0, self._ram_section.section_id).encode())

    def setup(self) -> None:
        w = self.out.write
        self._live_chunk(SectionKind.START, True, lambda lv: lv.setup(w))
        self._ram_chunk(SectionKind.START, lambda: self.ram.setup(self.out))
        self._live_chunk(SectionKind.START, False, lambda lv: lv.setup(w))

    def iterate(self, deadline: float | None) -> None:
        w = self.out.write
        self._live_chunk(SectionKind.PART, True, lambda lv: lv.iterate(w, deadline))
        self._ram_chunk(SectionKind.PART, lambda: self.ram.iterate(self.out, deadline))
        self._live_chunk(SectionKind.PART, False, lambda lv: lv.iterate(w, deadline))

    def complete(self) -> None:
        """With the machine stopped: last sync, END ram with every remaining page, the device
        sections in handler order, EOF and the vmdesc trailer; then flush."""
        if self.m.globalstate.state is None:  # callers normally store it before stopping the VM
            self.m.globalstate.store(self.m.runstate)
        self.ram.sync()
        w = self.out.write
        self._live_chunk(SectionKind.END, True, lambda lv: lv.complete(w))
        self._ram_chunk(SectionKind.END, lambda: self.ram.iterate(self.out, None))
        self._live_chunk(SectionKind.END, False, lambda lv: lv.complete(w))
        self.write_devices()
        self.out.flush()

    def write_devices(self, out: StreamOut | None = None, *, in_postcopy: bool = False) -> None:
        """The FULL device sections, EOF and the vmdesc trailer: the machine registry's own
        (``SaveStateRegistry.events``, the ``ram`` entry has no FULL section).  ``in_postcopy``:
        the sections alone, into ``out`` (the postcopy package: the stream goes on after it, QEMU
        writes neither EOF nor vmdesc there)."""
        out = out or self.out
        evs = self.m.registry.events(machine=MACHINE_TYPE, page_size=self.m.page_size, header=False,
                                     describe_configuration=True, offset=out.total + len(out.buf))
        if self.m.debug_migration is not None:
            embed_vmdesc(evs)
        if self.capabilities and isinstance(evs[-1], VmDescription):
            evs[-1] = vmdesc_with_caps(evs[-1], self.capabilities)
        for ev in evs:
            if in_postcopy and isinstance(ev, (EndOfFile, VmDescription)):
                continue
            out.write(ev.encode())


def embed_vmdesc(evs: list[Any]) -> None:
    """Put the vmdesc into the debug-migration section of ``evs`` (device sections, EOF, vmdesc):
    the JSON describes that section as a buffer of ``20 + len(JSON)`` bytes, so the size is
    iterated to its fixed point (the number's digit count converges in two or three rounds)."""
    i_dev = next(i for i, ev in enumerate(evs)
                 if isinstance(ev, DeviceState) and ev.section.idstr == DEBUG_MIGRATION_IDSTR)
    i_desc = next(i for i, ev in enumerate(evs) if isinstance(ev, VmDescription))
    top = json.loads(evs[i_desc].raw)
    entry = next(d for d in top["devices"] if d["name"] == DEBUG_MIGRATION_IDSTR)
    size = -1
    payload = b""
    raw = b""
    while len(payload) != size:
        size = len(payload)
        entry["size"] = entry["fields"][0]["size"] = size
        raw = vmdesc_json(top).encode("utf-8")
        payload = encode_debug_payload(raw)
    dev = evs[i_dev]
    evs[i_dev] = DeviceState(dev.offset, dev.section, payload)
    evs[i_desc] = VmDescription(evs[i_desc].offset, raw)
