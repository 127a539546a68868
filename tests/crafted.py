"""Crafted streams for the lifecycle tests: a real stream cut into its top-level records with qevm's own
parser, records spliced in or out, new records made with qevm's own event encoders, and a verdict from a
real QEMU destination loading the result.  Test code only: nothing here belongs in the library."""

from __future__ import annotations

import lzma
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import destination_args

from qevm.errors import DecodeError
from qevm.format.events import (
    Anomaly,
    CommandEvent,
    EndOfFile,
    Footer,
    RamControl,
    Section,
    SectionHeader,
    Trailing,
    VmDescription,
)
from qevm.format.parser import Parser
from qevm.format.records import Command, RamFlag, SectionKind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
from qemu_driver import Qemu, QemuError  # noqa: E402


@dataclass
class Rec:
    """One top-level record: a section (header, payload, footer), a command, or EOF."""

    what: str  # "START", "PART", "END", "FULL", "COMMAND", "EOF"
    section: Section | None
    data: bytes


@dataclass
class Cut:
    head: bytes  # file header + configuration
    records: list[Rec]
    tail: bytes  # vmdesc and anything after it

    def join(self, records: list[Rec] | None = None, tail: bytes | None = None) -> bytes:
        recs = self.records if records is None else records
        return self.head + b"".join(r.data for r in recs) + (self.tail if tail is None else tail)

    def find(self, what: str, idstr: str | None = None) -> int:
        for i, r in enumerate(self.records):
            if r.what == what and (idstr is None or (r.section is not None and r.section.idstr == idstr)):
                return i
        raise LookupError(f"no {what} record of {idstr!r}")


def read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def cut(data: bytes) -> Cut:
    p = Parser(count_pages=True)
    p.feed(data)
    p.close()
    head = bytearray()
    recs: list[Rec] = []
    tail = bytearray()
    cur: bytearray | None = None
    for ev in p.events():
        if isinstance(ev, Anomaly):
            raise AssertionError(f"the base stream already has an anomaly: {ev}")
        if isinstance(ev, SectionHeader):
            recs.append(Rec(ev.kind.name, ev.section, b""))
            cur = bytearray()
        elif isinstance(ev, CommandEvent | EndOfFile):
            recs.append(Rec("COMMAND" if isinstance(ev, CommandEvent) else "EOF", None, b""))
            cur = bytearray()
        elif isinstance(ev, VmDescription | Trailing):
            cur = tail
        elif not recs:
            cur = head
        assert cur is not None
        cur += ev.encode()
        if cur is not head and cur is not tail:
            recs[-1].data = bytes(cur)
    return Cut(bytes(head), recs, bytes(tail))


def section(kind: SectionKind, sid: int, payload: bytes, idstr: str = "", instance: int = 0,
            version: int = 0, footer_id: int | None = None) -> Rec:
    """A section record made by qevm's encoders: header, payload, footer (repeating ``sid`` unless told)."""
    sec = Section(sid, idstr, instance, version, "")
    data = SectionHeader(0, kind, sec).encode() + payload + Footer(0, sid if footer_id is None else footer_id).encode()
    return Rec(kind.name, sec, data)


EOS = RamControl(0, RamFlag.EOS).encode()  # an empty RAM payload


def command(cmd: Command, arg: bytes) -> Rec:
    return Rec("COMMAND", None, CommandEvent(0, int(cmd), arg).encode())


def with_footer_id(rec: Rec, sid: int) -> Rec:
    """The same section record with its footer naming ``sid``."""
    assert rec.data[-5] == 0x7E
    return Rec(rec.what, rec.section, rec.data[:-4] + sid.to_bytes(4, "big"))


def with_section_id(rec: Rec, sid: int) -> Rec:
    """A START/FULL record moved to another section id (header and footer)."""
    assert rec.what in ("START", "FULL") and rec.data[-5] == 0x7E
    return Rec(rec.what, rec.section, rec.data[:1] + sid.to_bytes(4, "big") + rec.data[5:-4] + sid.to_bytes(4, "big"))


# -- verdicts --------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    accepted: bool
    why: str
    anomalies: list[str]


def qevm_verdict(data: bytes, chunk: int | None = None) -> Verdict:
    """qevm's parser on the stream (whole, or fed ``chunk`` bytes at a time)."""
    p = Parser(count_pages=True)
    out = bytearray()
    codes: list[str] = []
    try:
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            p.feed(data[i:i + step])
            for ev in p.events():
                out += ev.encode()
                if isinstance(ev, Anomaly):
                    codes.append(ev.code)
        p.close()
        for ev in p.events():
            out += ev.encode()
            if isinstance(ev, Anomaly):
                codes.append(ev.code)
    except DecodeError as e:
        return Verdict(False, str(e), codes)
    assert bytes(out) == data, "accepted stream does not round-trip"
    return Verdict(True, "", codes)


def qemu_verdict(data: bytes, meta: dict, tmp: Path, timeout: float = 60) -> Verdict:
    """Does a real QEMU destination (the fixture's command line, ``-incoming defer``) load the stream?"""
    stream = tmp / "crafted.mig"
    stream.write_bytes(data)
    args = destination_args(meta) + ["-incoming", "defer"]
    try:
        with Qemu(meta.get("binary", "qemu-system-x86_64"), args, tmp) as vm:
            vm.qmp("migrate-incoming", uri=f"exec:cat {stream}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not vm.alive():
                    break
                status = vm.qmp("query-migrate").get("status")
                if status == "completed":
                    return Verdict(True, _log(vm.log_path), [])
                if status == "failed":
                    return Verdict(False, _log(vm.log_path), [])
                time.sleep(0.05)
            else:
                raise AssertionError(f"QEMU neither loaded nor refused the stream in {timeout}s")
            log = _log(vm.log_path)
    except QemuError as e:  # QEMU 7.2 exits when an incoming migration fails
        return Verdict(False, str(e), [])
    return Verdict(False, log, [])


def _log(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[1:])[-1500:]
