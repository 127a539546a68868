"""The SaveStateEntry list (``migration/savevm.c``): section and instance ids, priorities, and whole
streams written from or loaded into the registered objects."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qevm.errors import DecodeError, EncodeError, UsageError
from qevm.format.events import (
    Configuration,
    DeviceState,
    EndOfFile,
    Event,
    FileHeader,
    Footer,
    Section,
    SectionHeader,
    SectionKind,
    VmDescription,
)
from qevm.format.parser import Parser
from qevm.vmstate.description import CONFIGURATION, MIG_PRI_DEFAULT, State, VersionError, VMStateDescription, call_hook
from qevm.vmstate.jsonout import vmdesc_json
from qevm.vmstate.saveload import load_state, save_state

# -- SaveStateEntry registry ---------------------------------------------------------------------------

@dataclass(eq=False)
class LegacyHandler:
    """An old-style handler (``register_savevm_live`` with ``save_state``/``load_state``): its
    payload is free-form bytes; vmdesc describes it as one ``data`` buffer."""

    idstr: str
    version_id: int
    save_state: Callable[[Any], bytes] | None = None
    load_state: Callable[[Any, bytes, int], Any] | None = None


@dataclass(eq=False)
class SaveStateEntry:
    idstr: str
    instance_id: int
    section_id: int
    version_id: int
    opaque: Any
    vmsd: VMStateDescription | None = None
    handler: LegacyHandler | None = None
    alias_id: int = -1
    compat_idstr: str | None = None  # the bare vmsd name of a device with a qdev path
    compat_instance_id: int = 0

    @property
    def priority(self) -> int:
        return self.vmsd.priority if self.vmsd is not None else MIG_PRI_DEFAULT

    def describe(self) -> str:
        return f"{self.idstr!r} instance {self.instance_id} (section id {self.section_id})"


@dataclass
class LoadReport:
    """What ``SaveStateRegistry.load`` did: entries loaded (in stream order) and sections skipped."""

    loaded: list[tuple[SaveStateEntry, Section]] = field(default_factory=list)
    skipped: list[Section] = field(default_factory=list)
    configuration: Configuration | None = None


class SaveStateRegistry:
    """QEMU's ``savevm_state.handlers``: entries ordered by priority (higher first, then registration
    order), each with a section id from a counter global to the registry and an instance id."""

    def __init__(self) -> None:
        self.handlers: list[SaveStateEntry] = []
        self.global_section_id = 0

    # -- registration ---------------------------------------------------------------------------------
    def register(self, what: VMStateDescription | LegacyHandler, opaque: Any = None, *,
                 instance_id: int | None = None, path: str | None = None, alias_id: int = -1) -> SaveStateEntry:
        """Register a vmsd (``vmstate_register_with_alias_id``) or an old-style handler
        (``register_savevm_live``).  ``instance_id=None`` picks one like QEMU: one more than the
        highest instance already registered under the same idstr (0 for the first).  ``path`` is
        the qdev path: the idstr becomes ``path/name`` and a compat entry (bare name) is kept."""
        if opaque is None:
            opaque = State()
        if isinstance(what, VMStateDescription):
            vmsd, handler, name, version = what, None, what.name, what.version_id
        elif isinstance(what, LegacyHandler):
            if path is not None:
                raise UsageError("old-style handlers have no qdev path")
            vmsd, handler, name, version = None, what, what.idstr, what.version_id
        else:
            raise UsageError(f"cannot register {type(what).__name__}: a VMStateDescription or LegacyHandler")
        se = SaveStateEntry("", 0, self.global_section_id, version, opaque, vmsd, handler, alias_id)
        self.global_section_id += 1
        if path:
            idstr = f"{path}/{name}"
            se.compat_idstr = name
            se.compat_instance_id = (self._next_compat_instance(name) if instance_id is None else instance_id)
            instance_id = None
        else:
            idstr = name
        if len(idstr.encode("latin-1", "replace")) > 255:
            raise UsageError(f"idstr longer than 255 bytes: {idstr[:40]!r}...")
        se.idstr = idstr
        se.instance_id = self._next_instance(idstr) if instance_id is None else instance_id
        self._insert(se)
        return se

    def _next_instance(self, idstr: str) -> int:
        n = 0
        for se in self.handlers:
            if se.idstr == idstr and n <= se.instance_id:
                n = se.instance_id + 1
        return n

    def _next_compat_instance(self, name: str) -> int:
        n = 0
        for se in self.handlers:
            if se.compat_idstr == name and n <= se.compat_instance_id:
                n = se.compat_instance_id + 1
        return n

    def _insert(self, se: SaveStateEntry) -> None:
        for k, other in enumerate(self.handlers):
            if other.priority < se.priority:
                self.handlers.insert(k, se)
                return
        self.handlers.append(se)

    def unregister(self, se: SaveStateEntry) -> None:
        self.handlers.remove(se)

    def find(self, idstr: str, instance_id: int) -> SaveStateEntry | None:
        """The entry a stream section ``(idstr, instance_id)`` loads into (QEMU's ``find_se``)."""
        for se in self.handlers:
            if se.idstr == idstr and instance_id in (se.instance_id, se.alias_id):
                return se
            if (se.compat_idstr is not None and idstr in se.idstr and se.compat_idstr == idstr
                    and instance_id in (se.compat_instance_id, se.alias_id)):
                return se
        return None

    # -- saving ---------------------------------------------------------------------------------------
    def save_entry(self, se: SaveStateEntry) -> tuple[bytes, dict[str, Any]] | None:
        """One entry's FULL payload and vmdesc device object, or None when it is not sent."""
        head: dict[str, Any] = {"name": se.idstr, "instance_id": se.instance_id}
        if se.vmsd is not None:
            if not se.vmsd.is_needed(se.opaque):
                return None
            saved = save_state(se.vmsd, se.opaque)
            head.update(saved.desc)
            return saved.data, head
        assert se.handler is not None
        if se.handler.save_state is None:
            return None
        data = call_hook(se.idstr, "save_state", se.handler.save_state, se.opaque, value=True)
        if not isinstance(data, bytes | bytearray):
            raise EncodeError(f"{se.idstr}: save_state returned {type(data).__name__}, not bytes")
        head["size"] = len(data)
        head["fields"] = [{"name": "data", "size": len(data), "type": "buffer"}]
        return bytes(data), head

    def events(self, *, machine: str | None = "pc-i440fx-7.2", page_size: int = 4096, footers: bool = True,
               vmdesc: bool = True, describe_configuration: bool = False, header: bool = True,
               offset: int = 0) -> list[Event]:
        """A complete stream as events: header, configuration (when ``machine`` is given), one FULL
        section (+ footer) per entry in list order, EOF, and the vmdesc trailer.  With
        ``describe_configuration`` the vmdesc also describes the configuration (QEMU >= 8.2).
        ``header=False``: only the device sections, EOF and the trailer, the end of a stream whose
        beginning (header, configuration, live sections) the caller wrote; ``offset`` is where they
        start in it."""
        evs: list[Event] = []
        off = offset

        def add(ev: Event) -> None:
            nonlocal off
            evs.append(ev)
            off += len(ev.encode())

        if header:
            add(FileHeader(off))
        top: dict[str, Any] = {}
        if machine is not None:
            if header:
                add(Configuration(off, machine, []))
            if describe_configuration:
                name = machine.encode("latin-1")
                top["configuration"] = save_state(CONFIGURATION, State(len=len(name), name=name)).desc
        top["page_size"] = page_size
        devices: list[dict[str, Any]] = []
        top["devices"] = devices
        for se in self.handlers:
            saved = self.save_entry(se)
            if saved is None:
                continue
            data, entry = saved
            sec = Section(se.section_id, se.idstr, se.instance_id, se.version_id, "device")
            add(SectionHeader(off, SectionKind.FULL, sec))
            add(DeviceState(off, sec, data))
            if footers:
                add(Footer(off, se.section_id))
            devices.append(entry)
        add(EndOfFile(off))
        if vmdesc:
            add(VmDescription(off, vmdesc_json(top).encode("utf-8")))
        return evs

    def encode(self, **kw: Any) -> bytes:
        """The stream ``events(**kw)`` describes, as bytes."""
        return b"".join(ev.encode() for ev in self.events(**kw))

    def write(self, path: str, **kw: Any) -> int:
        """Write the stream to ``path``; returns its length."""
        data = self.encode(**kw)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    # -- loading --------------------------------------------------------------------------------------
    def load(self, source: str | bytes | bytearray | Iterable[Event], *, strict: bool = True) -> LoadReport:
        """Load every FULL device section of a stream into the registered objects, in stream order,
        like QEMU's loader: find the entry by (idstr, instance), refuse a version above ours, load the
        body with its hooks.  ``source`` is the stream's bytes, a path to a plain stream file, or the
        events of a stream (e.g. ``qevm.iter_events(path)`` for compressed files and containers).
        ``strict=False`` skips sections no entry claims (e.g. the devices of a real machine we did
        not declare) instead of failing.  Live sections (``ram``...) are always skipped."""
        report = LoadReport()
        pairs: list[tuple[Section, int, bytes]] = []
        for ev in _events_of(source):
            if isinstance(ev, DeviceState):
                pairs.append((ev.section, ev.offset, bytes(ev.data)))
            elif isinstance(ev, Configuration):
                report.configuration = ev
        for sec, off, data in pairs:
            if sec.handler != "device":
                report.skipped.append(sec)
                continue
            se = self.find(sec.idstr, sec.instance_id)
            where = f"section {sec.idstr!r} (id {sec.section_id}, instance {sec.instance_id})"
            if se is None:
                if strict:
                    raise DecodeError(f"unknown savevm section or instance {sec.idstr!r} {sec.instance_id}",
                                      off, where)
                report.skipped.append(sec)
                continue
            if sec.version > se.version_id:
                raise VersionError(sec.idstr, sec.version, se.version_id, True, off)
            if se.vmsd is not None:
                load_state(se.vmsd, se.opaque, data, sec.version, name=sec.idstr, offset=off)
            else:
                assert se.handler is not None
                if se.handler.load_state is None:
                    raise DecodeError(f"{sec.idstr}: this old-style handler cannot load", off, where)
                call_hook(sec.idstr, "load_state", se.handler.load_state, se.opaque, data, sec.version)
            report.loaded.append((se, sec))
        return report


#: the process-wide registry, like QEMU's ``savevm_state`` (tests and tools usually make their own)
savevm_state = SaveStateRegistry()


def _events_of(source: str | bytes | bytearray | Iterable[Event]) -> Iterator[Event]:
    """The events of ``source``: parsed from bytes or a plain file (read in chunks), or passed through."""
    if not isinstance(source, str | bytes | bytearray):
        yield from source
        return
    p = Parser(count_pages=True)
    if isinstance(source, str):
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                p.feed(chunk)
                yield from p.events()
    else:
        p.feed(bytes(source))
    p.close()
    yield from p.events()
