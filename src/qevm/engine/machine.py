"""The demo machine: RAM with dirty logging, a "CPU" running a deterministic workload, a 16550 UART
printing ``tick N`` every 100 ms of virtual time, QEMU's virtual clock, and the global state.

Every piece of state that has to survive a migration or a snapshot is described with
``qevm.vmstate`` and registered in one ``SaveStateRegistry`` (section ids in registration order,
as QEMU assigns them):

====  =============  =========================================================================
sid   idstr          description
====  =============  =========================================================================
0     ``timer``      QEMU 7.2 softmmu/cpu-timers.c ``vmstate_timers`` (v2): the virtual clock
1     ``ram``        the live RAM handler (version 4), sent as START/PART/END, never FULL
2     ``cpu``        this machine's CPU: workload seed and position, next line, tick timer
3     ``serial``     QEMU 7.2 hw/char/serial-isa.c ``vmstate_isa_serial`` (qevm.devices.serial)
4     ``globalstate``  QEMU 7.2 migration/global_state.c (v1): the run state to resume in
====  =============  =========================================================================

With ``devices=("debug-migration",)`` (``qevm vm --device debug-migration``) a sixth entry, sid 5
``debug-migration`` (v1), carries the stream's vmdesc inside the stream (``qevm.format.selfdesc``).
The live handlers ``block`` and ``dirty-bitmap`` (v1, no FULL section, ``qevm.engine.blockmig``)
come last; they only appear in a stream when block / dirty-bitmap migration is on.

**The disk.**  With a ``Disk`` attached (``--drive FILE``) and ``disk_every`` N > 0, every N-th
workload operation (operation numbers N, 2N, ...) also writes one 512-byte sector of the disk: sector
``splitmix64(~seed ^ k) % sectors`` for the k-th such write, 512 bytes derived from ``k`` and the
seed; so the disk's content, like RAM's, is a function of (seed, ops).

**The workload.**  Operation number ``n`` writes 64 bytes into one page at a 64-byte slot chosen by
``h >> 32``, where ``h = splitmix64(seed ^ n)``: three operations in four go to a hot set (the first
sixteenth of RAM, ``h % hot``), the others anywhere (``h % npages``), so that pages are written again
and again as a guest's working set is (what XBZRLE is for).  The bytes are ``n``, ``h``, ``seed`` and
the page index.  The content of RAM is therefore a function of (seed, fill, ops): two machines that
performed the same number of operations hold the same bytes, whatever their timing.  Operations
are paced by the virtual clock at ``dirty_rate`` per second.

**The serial line.**  Every 100 ms of virtual time the CPU writes ``tick N\\n`` to the UART (the
number and the timer's expiry are CPU state), so after a migration or ``loadvm`` the numbering
continues exactly where the saved state left it.

Locking: ``Machine.lock`` plays QEMU's big lock.  The CPU thread holds it while it runs a slice;
``vm_stop`` takes it, so once it returns no page is dirtied and no line is written until
``vm_start``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qevm.engine.blockdev import SECTOR, Disk
from qevm.engine.states import RUNSTATE_TRANSITIONS, IllegalTransition, RunState
from qevm.errors import QevmError, UsageError
from qevm.format.selfdesc import (
    DEBUG_MIGRATION_IDSTR,
    DEBUG_MIGRATION_VERSION,
    decode_debug_payload,
)
from qevm.vmstate import (
    TIMER_NOT_ARMED,
    HookError,
    LegacyHandler,
    SaveStateEntry,
    SaveStateRegistry,
    VMStateDescription,
    buffer,
    scalar,
    timer,
    unused,
)
from qevm.vmstate.devices.serial import VMSTATE_ISA_SERIAL, ISASerialState

__all__ = ["Machine", "DebugMigration", "CpuState", "TimersState", "GlobalState", "VirtualClock", "VMSTATE_TIMERS",
           "VMSTATE_CPU",
           "VMSTATE_GLOBALSTATE", "MACHINE_TYPE", "RAM_BLOCK", "TICK_NS", "splitmix64", "workload_op"]

log = logging.getLogger(__name__)

#: the machine type name sent in the configuration record
MACHINE_TYPE = "qevm-demo-1.0"
#: the one RAMBlock
RAM_BLOCK = "demo.ram"
#: serial tick period, virtual nanoseconds
TICK_NS = 100_000_000
_M64 = (1 << 64) - 1
_OP = struct.Struct(">QQQQQQQQ")  # 64 bytes per workload operation
_STAMP = struct.Struct(">QQ")


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def workload_op(seed: int, n: int, npages: int, page_size: int) -> tuple[int, int, bytes]:
    """Operation ``n``: (page index, byte offset within the page, the 64 bytes written)."""
    h = splitmix64(seed ^ n)
    page = h % (max(1, npages // 16) if h >> 62 != 3 else npages)
    slot = (h >> 32) % (page_size // 64)
    return page, slot * 64, _OP.pack(n, h, seed, page, n ^ h, ~n & _M64, h >> 1, (seed + n) & _M64)


# -- the virtual clock and QEMU's "timer" section ------------------------------------------------------

class VirtualClock:
    """QEMU_CLOCK_VIRTUAL: nanoseconds that advance only while the VM runs."""

    def __init__(self) -> None:
        self._offset = 0
        self._frozen = 0
        self.running = False

    def now(self) -> int:
        return time.monotonic_ns() + self._offset if self.running else self._frozen

    def start(self) -> None:
        if not self.running:
            self._offset = self._frozen - time.monotonic_ns()
            self.running = True

    def stop(self) -> None:
        if self.running:
            self._frozen = self.now()
            self.running = False

    def set(self, value: int) -> None:
        if self.running:
            raise UsageError("the virtual clock can only be set while the VM is stopped")
        self._frozen = value


@dataclass
class TimersState:
    """QEMU's TimersState, the part that migrates: both offsets hold the virtual clock while stopped."""

    clock: VirtualClock = field(default_factory=VirtualClock)
    cpu_ticks_offset: int = 0
    cpu_clock_offset: int = 0


def _timers_pre_save(s: TimersState) -> None:
    s.cpu_clock_offset = s.clock.now()
    s.cpu_ticks_offset = s.cpu_clock_offset


def _timers_post_load(s: TimersState, version_id: int) -> None:
    s.clock.set(s.cpu_clock_offset)


VMSTATE_TIMERS = VMStateDescription(
    "timer", 2, 1,
    fields=[scalar("cpu_ticks_offset", "int64"), unused(8), scalar("cpu_clock_offset", "int64", 2)],
    pre_save=_timers_pre_save, post_load=_timers_post_load,
)


# -- the CPU ----------------------------------------------------------------------------------------------

@dataclass
class CpuState:
    seed: int = 1
    ops: int = 0  # workload position: operations performed
    line: int = 1  # number of the next serial line
    dirty_rate: int = 0  # operations (page writes) per second of virtual time
    tick_timer: int = TIMER_NOT_ARMED  # virtual-clock expiry of the next serial line


VMSTATE_CPU = VMStateDescription(
    "cpu", 1, 1,
    fields=[scalar("seed", "uint64"), scalar("ops", "uint64"), scalar("line", "uint32"),
            scalar("dirty_rate", "uint32"), timer("tick_timer")],
)


# -- global state ------------------------------------------------------------------------------------------

@dataclass
class GlobalState:
    size: int = 0
    runstate: bytes = bytes(100)
    received: bool = False

    def store(self, state: RunState) -> None:
        name = state.value.encode()
        self.runstate = name + bytes(100 - len(name))

    @property
    def state(self) -> RunState | None:
        raw = self.runstate[:99].split(b"\0", 1)[0].decode("latin-1")
        try:
            return RunState(raw)
        except ValueError:
            return None


def _gs_pre_save(s: GlobalState) -> None:
    s.size = len(s.runstate.split(b"\0", 1)[0]) + 1


def _gs_post_load(s: GlobalState, version_id: int) -> None:
    s.received = True
    raw = s.runstate[:99].split(b"\0", 1)[0].decode("latin-1")
    if raw not in {r.value for r in RunState} | {"suspended", "guest-panicked", "internal-error", "io-error",
                                                  "watchdog", "colo", "debug"}:
        raise HookError("globalstate", "post_load", f"'{raw}' is not a run state")


VMSTATE_GLOBALSTATE = VMStateDescription(
    "globalstate", 1, 1,
    fields=[scalar("size", "uint32"), buffer("runstate", 100)],
    pre_save=_gs_pre_save, post_load=_gs_post_load,
)


class DebugMigration:
    """The debug-migration device (``--device debug-migration``): its section carries the stream's
    vmdesc (``qevm.format.selfdesc``).  ``payload`` is set by the writer just before the device
    sections are produced; on load the section is checked and its JSON kept in ``received``."""

    def __init__(self) -> None:
        self.payload = b""
        self.received: bytes | None = None

    @staticmethod
    def save(dev: DebugMigration) -> bytes:
        return dev.payload

    @staticmethod
    def load(dev: DebugMigration, data: bytes, version_id: int) -> None:
        dev.received = decode_debug_payload(data)


def _serial_defaults() -> ISASerialState:
    """The UART after the machine's firmware set it up: 115200 baud, 8N1, DTR/RTS/OUT2."""
    s = ISASerialState()
    s.state.divider = 1
    s.state.lcr = 0x03
    s.state.mcr = 0x0B
    return s


# -- the machine ---------------------------------------------------------------------------------------------

EventSink = Callable[[str, dict[str, Any] | None], None]


class Machine:
    """RAM + CPU thread + UART + clock, and the SaveStateRegistry describing them.

    ``emit(name, data)`` is called for STOP / RESUME (the QMP layer turns it into events)."""

    page_size = 4096

    def __init__(self, ram_size: int, *, dirty_rate: int = 0, serial_path: str | None = None, seed: int = 1,
                 fill: float = 1.0, emit: EventSink | None = None, devices: tuple[str, ...] = (),
                 disk_every: int = 0) -> None:
        if ram_size <= 0 or ram_size % self.page_size:
            raise UsageError(f"RAM size {ram_size} is not a positive multiple of {self.page_size}")
        if not 0.0 <= fill <= 1.0:
            raise UsageError(f"fill {fill} is not between 0 and 1")
        self.ram_size = ram_size
        self.npages = ram_size // self.page_size
        self.ram = mmap.mmap(-1, ram_size)
        self.dirty = bytearray(self.npages)  # the dirty log: 1 = written since the last take_dirty()
        self.lock = threading.RLock()
        self.emit: EventSink = emit or (lambda name, data: None)
        self.runstate = RunState.PRELAUNCH
        self.clock = VirtualClock()
        self.timers = TimersState(self.clock)
        self.cpu = CpuState(seed=seed & _M64, dirty_rate=dirty_rate)
        self.serial = _serial_defaults()
        self.globalstate = GlobalState()
        self.fill = fill
        self._serial_fd: int | None = None
        if serial_path is not None:
            self._serial_fd = os.open(serial_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self.registry = SaveStateRegistry()
        self.registry.register(VMSTATE_TIMERS, self.timers)
        self.ram_entry: SaveStateEntry = self.registry.register(LegacyHandler("ram", 4))
        self.registry.register(VMSTATE_CPU, self.cpu)
        self.registry.register(VMSTATE_ISA_SERIAL, self.serial)
        self.registry.register(VMSTATE_GLOBALSTATE, self.globalstate)
        self.debug_migration: DebugMigration | None = None
        for dev in devices:
            if dev != DEBUG_MIGRATION_IDSTR:
                raise UsageError(f"'{dev}' is not a valid device model name (this machine offers "
                                 f"{DEBUG_MIGRATION_IDSTR})")
            self.debug_migration = DebugMigration()
            self.registry.register(LegacyHandler(DEBUG_MIGRATION_IDSTR, DEBUG_MIGRATION_VERSION,
                                                 save_state=DebugMigration.save, load_state=DebugMigration.load),
                                   self.debug_migration)
        # live handlers registered last, so the sections above keep their ids
        self.registry.register(LegacyHandler("block", 1))
        self.registry.register(LegacyHandler("dirty-bitmap", 1))
        self.disk: Disk | None = None
        if disk_every < 0:
            raise UsageError(f"disk write period {disk_every} is negative")
        self.disk_every = disk_every
        self._pace_clock = 0
        self._pace_debt = 0.0
        #: postcopy destination: pages present (1) or still at the source (0), and what the CPU
        #: calls before it touches a missing page (``qevm.engine.postcopy.PostcopyIncoming.fault``)
        self.received: bytearray | None = None
        self.fault: Callable[[int], None] | None = None
        self._quit = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- boot ------------------------------------------------------------------------------------------
    def boot(self) -> None:
        """Firmware: fill the first ``fill`` fraction of RAM with deterministic data and arm the tick
        timer (not done on a machine that waits for an incoming migration)."""
        npages = int(self.npages * self.fill)
        if npages:
            block = random.Random(self.cpu.seed).randbytes(1 << 20)
            end = npages * self.page_size
            for a in range(0, end, len(block)):
                n = min(len(block), end - a)
                self.ram[a:a + n] = block[:n]
            for p in range(npages):
                _STAMP.pack_into(self.ram, p * self.page_size, p, self.cpu.seed)
        self.cpu.tick_timer = self.clock.now() + TICK_NS

    def start_cpu_thread(self) -> None:
        self._thread = threading.Thread(target=self._cpu_loop, name="cpu", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._quit.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.disk is not None:
            self.disk.close()
        if self._serial_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._serial_fd)
            self._serial_fd = None

    # -- run state ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.runstate is RunState.RUNNING

    def set_runstate(self, new: RunState) -> None:
        if new is self.runstate:
            return
        if new not in RUNSTATE_TRANSITIONS[self.runstate]:
            raise IllegalTransition(f"run state {self.runstate} -> {new} is not allowed")
        self.runstate = new

    def vm_start(self) -> bool:
        """Resume the CPU (RESUME event); False if it was already running."""
        with self.lock:
            if self.running:
                return False
            self.set_runstate(RunState.RUNNING)
            self.clock.start()
            self._pace_clock = self.clock.now()
            self._pace_debt = 0.0
        self.emit("RESUME", None)
        self._wake.set()
        return True

    def vm_stop(self, state: RunState = RunState.PAUSED) -> bool:
        """Stop the CPU (STOP event) and enter ``state``; when already stopped only the state changes."""
        with self.lock:
            was = self.running
            if was:
                self.clock.stop()
            self.set_runstate(state)
        if was:
            self.emit("STOP", None)
        return was

    # -- the CPU -------------------------------------------------------------------------------------------
    def _cpu_loop(self) -> None:
        while not self._quit.is_set():
            with self.lock:
                if self.running:
                    self._run_slice()
            self._wake.wait(0.005)
            self._wake.clear()

    def _run_slice(self) -> None:
        cpu = self.cpu
        now = self.clock.now()
        while cpu.tick_timer != TIMER_NOT_ARMED and now >= cpu.tick_timer:
            self._serial_write(f"tick {cpu.line}\n".encode())
            cpu.line += 1
            cpu.tick_timer += TICK_NS
        elapsed = now - self._pace_clock
        self._pace_clock = now
        if cpu.dirty_rate and elapsed > 0:
            self._pace_debt += elapsed * cpu.dirty_rate / 1e9
            n = int(self._pace_debt)
            if n:
                self._pace_debt -= n
                self.run_ops(n)

    def run_ops(self, n: int) -> None:
        """Perform the next ``n`` workload operations (writes + dirty log)."""
        ram, dirty, ps, npages = self.ram, self.dirty, self.page_size, self.npages
        seed = self.cpu.seed
        start = self.cpu.ops
        slots = ps // 64
        hot = max(1, npages // 16)
        pack = _OP.pack_into
        received = self.received
        for i in range(start, start + n):
            z = ((seed ^ i) + 0x9E3779B97F4A7C15) & _M64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
            h = z ^ (z >> 31)
            page = h % (hot if h >> 62 != 3 else npages)
            if received is not None and not received[page] and self.fault is not None:
                self.fault(page)  # postcopy: the page is still at the source; wait for it
            pack(ram, page * ps + ((h >> 32) % slots) * 64, i, h, seed, page, i ^ h, ~i & _M64, h >> 1,
                 (seed + i) & _M64)
            dirty[page] = 1
        self.cpu.ops = start + n
        if self.disk is not None and self.disk_every:
            for k in range(start // self.disk_every + 1, (start + n) // self.disk_every + 1):
                self._disk_op(k)

    def _disk_op(self, k: int) -> None:
        """The k-th disk write of the workload (see the module docstring)."""
        disk = self.disk
        assert disk is not None
        seed = self.cpu.seed
        h = splitmix64(~seed & _M64 ^ k)
        sector = h % disk.sectors
        data = _OP.pack(k, h, seed, sector, k ^ h, ~k & _M64, h >> 1, (seed + k) & _M64) * (SECTOR // _OP.size)
        try:
            disk.write(sector * SECTOR, data[:min(SECTOR, disk.size - sector * SECTOR)])
        except (QevmError, OSError) as e:  # an I/O error: reported, the guest goes on (QEMU's werror=report)
            log.warning("disk write failed: %s", e)

    def _serial_write(self, data: bytes) -> None:
        """The CPU writes bytes to the UART's THR; the UART sends them to its chardev at once, so the
        registers stay at THR/TSR empty."""
        s = self.serial.state
        for b in data:
            s.thr = b
            s.tsr = b
        if self._serial_fd is not None:
            try:
                os.write(self._serial_fd, data)
            except OSError as e:  # the chardev went away: the guest does not notice
                log.warning("serial write failed: %s", e)

    # -- dirty log -----------------------------------------------------------------------------------------
    def take_dirty(self) -> bytearray:
        """The dirty log since the last call, cleared (QEMU's bitmap sync).  Call with ``lock`` held."""
        d = self.dirty
        self.dirty = bytearray(self.npages)
        return d

    def ram_digest(self) -> str:
        with self.lock:
            return hashlib.sha256(self.ram).hexdigest()
