"""Loading a stream into the machine (QEMU's ``qemu_loadvm_state``), on the sans-I/O parser.

    ld = StreamLoader(machine)
    while not ld.finished:
        view = ld.get_buffer(1 << 20); n = read_into(view); del view
        replies = ld.buffer_updated(n)       # n == 0: the input ended
    ld.check_complete()

Every event is applied as it comes: RAM pages into the machine's RAM (PAGE, ZERO, XBZRLE applied in
place on the current page, zlib COMPRESS_PAGE), device sections into the registered objects with
QEMU's checks (entry exists, version not newer, vmsd hooks).  The errors use QEMU's words.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from qevm.engine.blockmig import BLOCK_IDSTR, DIRTY_BITMAP_IDSTR, LIVE_VERSION, LiveLoader
from qevm.engine.machine import MACHINE_TYPE, RAM_BLOCK, Machine
from qevm.errors import DecodeError, QevmError
from qevm.format.events import (
    CommandEvent,
    Configuration,
    DeviceState,
    EndOfFile,
    Event,
    FileHeader,
    LiveRecord,
    MappedRamBitmap,
    RamBlock,
    RamControl,
    RamPage,
    SectionHeader,
    VmDescription,
)
from qevm.format.records import Command, RamFlag, SectionKind
from qevm.format.xbzrle import apply_delta
from qevm.migration.pushparser import PushParser
from qevm.vmstate import load_state

__all__ = ["LoadError", "StreamLoader", "LoadStats"]


class LoadError(QevmError):
    """The incoming stream cannot be loaded into this machine."""


_PAGE, _ZERO, _XBZRLE, _COMPRESS = int(RamFlag.PAGE), int(RamFlag.ZERO), int(RamFlag.XBZRLE), int(RamFlag.COMPRESS_PAGE)
_NOT_CONT = ~int(RamFlag.CONTINUE)
#: the commands this engine takes (answered on the return path by the caller, or ignored)
_COMMANDS = (Command.OPEN_RETURN_PATH, Command.PING, Command.SWITCHOVER_START)


class PostcopyHooks(Protocol):
    """The destination's postcopy state (``qevm.engine.postcopy.PostcopyIncoming``) as the loader
    drives it: the postcopy commands, and around each page whether it is there already and that
    it was placed."""

    received: bytearray | None

    def command(self, ev: CommandEvent) -> None: ...
    def present(self, p: int) -> bool: ...
    def page_loaded(self, p: int) -> None: ...


_POSTCOPY_COMMANDS = (Command.POSTCOPY_ADVISE, Command.POSTCOPY_RAM_DISCARD, Command.POSTCOPY_LISTEN,
                      Command.POSTCOPY_RUN, Command.PACKAGED)


@dataclass
class LoadStats:
    pages: int = 0
    zero: int = 0
    xbzrle: int = 0
    sections: list[str] = field(default_factory=list)
    bytes: int = 0


class StreamLoader(PushParser):
    """Bytes in, machine state out (``qevm.migration.pushparser.PushParser`` applying each event).
    ``buffer_updated`` returns the commands that need an answer on the return path
    (OPEN_RETURN_PATH, PING); 0 bytes means the input ended."""

    def __init__(self, machine: Machine, bitmap_mapping: list[dict[str, Any]] | None = None, *,
                 capabilities: frozenset[str] = frozenset(), ram_hook: Callable[[Event], None] | None = None,
                 on_flush: Callable[[], None] | None = None, file_offset: int = 0) -> None:
        """``bitmap_mapping``: ``block-bitmap-mapping`` (dirty-bitmap migration);
        ``capabilities``: the destination's validated ones that are on (mapped-ram);
        ``ram_hook`` sees RamBlock and MappedRamBitmap events first (mapped-ram pages),
        ``on_flush`` is called at each MULTIFD_FLUSH (multifd: ``qevm.engine.multifd``)."""
        super().__init__(page_size=machine.page_size, file_offset=file_offset)
        self.m = machine
        self.lives = LiveLoader(machine, bitmap_mapping)
        self.capabilities = capabilities
        self.ram_hook = ram_hook
        self.on_flush = on_flush
        self.ps = machine.page_size
        self.zero = bytes(self.ps)
        self.stats = LoadStats()
        self.seen_config = False
        self.seen_eof = False
        self._finished = False
        self.pc: PostcopyHooks | None = None  # set by the incoming side

    @property
    def finished(self) -> bool:
        """Nothing more is to be read: the parser is done, the vmdesc came, or junk followed EOF."""
        return self._finished or self.done

    # -- input -------------------------------------------------------------------------------------------
    def buffer_updated(self, n: int) -> list[CommandEvent]:
        self.stats.bytes += n
        try:
            return super().buffer_updated(n)
        except DecodeError as e:
            return self._decode_error(e)

    def feed(self, data: bytes | bytearray | memoryview) -> list[CommandEvent]:
        if not data:
            return self.buffer_updated(0)
        self.stats.bytes += len(data)
        try:
            return super().feed(data)
        except DecodeError as e:
            return self._decode_error(e)

    def close(self) -> list[CommandEvent]:
        try:
            return super().close()
        except DecodeError as e:
            return self._decode_error(e)

    def _decode_error(self, e: DecodeError) -> list[CommandEvent]:
        if self.seen_eof:  # something after EOF that is not a vmdesc: QEMU only warns
            self._finished = True
            return self.take_commands()
        raise LoadError(str(e)) from e

    def check_complete(self) -> None:
        if not self.seen_eof:
            raise LoadError(f"the stream ended at offset {self.parser.offset} before its EOF record "
                            "(the source went away or the migration was cancelled)")

    # -- events ------------------------------------------------------------------------------------------
    def handle(self, ev: Event) -> None:
        if isinstance(ev, RamPage):
            pc = self.pc
            if pc is None or pc.received is None:
                self._page(ev)
                return
            p = ev.addr // self.ps
            if not pc.present(p):  # in postcopy a late copy never overwrites what the guest wrote since
                self._page(ev)
                pc.page_loaded(p)
            return
        if isinstance(ev, DeviceState):
            self._device(ev)
            return
        if isinstance(ev, LiveRecord):
            try:
                self.lives.record(ev)
            except QevmError as e:
                raise LoadError(f"{ev.handler}: {e}") from e
            return
        if isinstance(ev, FileHeader):
            return
        if self.ram_hook is not None and isinstance(ev, (RamBlock, MappedRamBitmap)):
            self.ram_hook(ev)
        if isinstance(ev, RamControl):
            if ev.flags == RamFlag.MULTIFD_FLUSH and self.on_flush is not None:
                self.on_flush()
            return
        if not self.seen_config and not isinstance(ev, Configuration):
            raise LoadError("Configuration section missing")
        if isinstance(ev, Configuration):
            self._configuration(ev)
        elif isinstance(ev, SectionHeader):
            self._section(ev)
        elif isinstance(ev, RamBlock):
            if ev.name != RAM_BLOCK:
                raise LoadError(f'Unknown ramblock "{ev.name}", cannot accept migration')
            if ev.used_length != self.m.ram_size:
                raise LoadError(f"Length mismatch: {ev.name}: 0x{ev.used_length:x} in != 0x{self.m.ram_size:x}: "
                                "Invalid argument")
        elif isinstance(ev, CommandEvent):
            if ev.cmd in _POSTCOPY_COMMANDS and self.pc is not None:
                try:
                    self.pc.command(ev)
                except LoadError:
                    raise
                except QevmError as e:
                    raise LoadError(str(e)) from e
            elif ev.cmd not in _COMMANDS:
                raise LoadError(f"qevm's engine does not support the {ev.name} command (postcopy, COLO)")
        elif isinstance(ev, EndOfFile):
            self.seen_eof = True
        elif isinstance(ev, VmDescription):
            self._finished = True

    def _configuration(self, ev: Configuration) -> None:
        self.seen_config = True
        # QEMU compares over the received length only (a received prefix of our name is accepted)
        if not MACHINE_TYPE.startswith(ev.machine) or not ev.machine:
            raise LoadError(f"Machine type received is '{ev.machine}' and local is '{MACHINE_TYPE}'")
        for cap in ev.capabilities:
            if cap not in self.capabilities:
                raise LoadError(f"Capability '{cap}' is enabled on the source and not on the destination")
        for cap in sorted(self.capabilities - set(ev.capabilities)):
            raise LoadError(f"Capability {cap} is on, but received capability is off")

    def _section(self, ev: SectionHeader) -> None:
        sec = ev.section
        if ev.kind not in (SectionKind.START, SectionKind.FULL):
            return
        self.stats.sections.append(sec.idstr)
        if sec.idstr == "ram":
            if sec.version != 4:
                raise LoadError(f"savevm: unsupported version {sec.version} for 'ram' v4")
            return
        if sec.idstr in (BLOCK_IDSTR, DIRTY_BITMAP_IDSTR) and ev.kind == SectionKind.START:
            if sec.version > LIVE_VERSION:
                raise LoadError(f"savevm: unsupported version {sec.version} for '{sec.idstr}' v{LIVE_VERSION}")
            return
        se = self.m.registry.find(sec.idstr, sec.instance_id)
        if se is None or se is self.m.ram_entry:
            raise LoadError(f"Unknown savevm section or instance '{sec.idstr}' {sec.instance_id}. Make sure that "
                            "your current VM setup matches your saved VM setup, including any hotplugged devices")
        if sec.version > se.version_id:
            raise LoadError(f"savevm: unsupported version {sec.version} for '{sec.idstr}' v{se.version_id}")

    def _device(self, ev: DeviceState) -> None:
        sec = ev.section
        se = self.m.registry.find(sec.idstr, sec.instance_id)
        handler = se.handler if se is not None else None
        if se is None or (se.vmsd is None and (handler is None or handler.load_state is None)):
            raise LoadError(f"section '{sec.idstr}' cannot be loaded here")
        try:
            if se.vmsd is not None:
                load_state(se.vmsd, se.opaque, ev.data, sec.version, name=sec.idstr, offset=ev.offset)
            elif handler is not None and handler.load_state is not None:
                handler.load_state(se.opaque, bytes(ev.data), sec.version)
        except QevmError as e:
            raise LoadError(f"error while loading state for instance 0x{sec.instance_id:x} of device "
                            f"'{sec.idstr}': {e}") from e

    def _page(self, ev: RamPage) -> None:
        ps = self.ps
        a = ev.addr
        ram = self.m.ram
        kind = ev.flags & _NOT_CONT
        if kind == _PAGE:
            ram[a:a + ps] = ev.payload
            self.stats.pages += 1
        elif kind == _ZERO:
            fill = ev.payload[0]
            ram[a:a + ps] = self.zero if fill == 0 else bytes((fill,)) * ps
            self.stats.zero += 1
        elif kind == _XBZRLE:
            pl = ev.payload
            if pl[0] != 1:
                raise LoadError(f"Failed to load XBZRLE page - wrong compression! (0x{pl[0]:02x})")
            n = int.from_bytes(pl[1:3], "big")
            if n > ps:
                raise LoadError(f"Failed to load XBZRLE page - len overflow! ({n})")
            page = bytearray(ram[a:a + ps])
            try:
                apply_delta(page, pl[3:3 + n], ev.offset)
            except DecodeError as e:
                raise LoadError(f"Failed to load XBZRLE page - decode error! ({e})") from e
            ram[a:a + ps] = bytes(page)
            self.stats.xbzrle += 1
        elif kind == _COMPRESS:
            n = int.from_bytes(ev.payload[:4], "big")
            try:
                data = zlib.decompress(ev.payload[4:4 + n])
            except zlib.error as e:
                raise LoadError(f"Failed to decompress page: {e}") from e
            if len(data) != ps:
                raise LoadError(f"Failed to decompress page: {len(data)} bytes, expected {ps}")
            ram[a:a + ps] = data
            self.stats.pages += 1
