"""Will this VM state load on that QEMU?  ``compat(source, destination)``.

The source is what will be sent: a stream's vmdesc (exactly the sections, field sizes and
subsections that were written) or a ``-dump-vmstate`` catalog (what a QEMU build can send).
The destination is described by its ``-dump-vmstate`` catalog (version ranges, field version
guards, conditional fields, every subsection it knows) and/or a stream saved by a QEMU set up
as the destination (exactly which sections, instances and RAM blocks it will have).

The core check replays the destination's loader over what the source wrote: for the section
version in the stream, the destination's field list (without fields guarded by a higher
version) is walked against the source's fields, element sizes compared, nested structs
followed (also when fields moved into or out of a struct), conditional fields taken only
when they line up; then every subsection the source sent must be known to the destination.
Findings are ``break`` (the load fails), ``risk`` (fails depending on guest state or
options) or ``note``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from qevm.errors import SchemaError, UsageError
from qevm.io.reader import read_stream
from qevm.io.sources import open_input

__all__ = ["Finding", "Side", "CompatResult", "side_from_stream", "side_from_dump", "compat", "load_side"]

BREAK, RISK, NOTE = "break", "risk", "note"
_IDX = re.compile(r"\[\d+\]$")

# Sections handled by live (iterative) handlers: not vmsd devices, present on every QEMU.
_LIVE = {"ram", "block", "dirty-bitmap", "spapr/htab", "s390-storage_attributes", "s390-skeys"}


@dataclass
class Finding:
    severity: str
    section: str
    reason: str
    fields: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "section": self.section, "reason": self.reason, "fields": self.fields}


@dataclass
class SectionInfo:
    idstr: str
    instance: int
    version: int
    vmsd_name: str
    desc: dict[str, Any] | None  # vmdesc entry (fields actually written), None for live sections


@dataclass
class Side:
    """One end of a migration as far as compatibility goes."""

    name: str
    machine: str | None = None
    page_bits: int | None = None
    sections: dict[tuple[str, int], SectionInfo] | None = None  # from a stream
    ram: dict[str, int] | None = None  # block -> used_length, from a stream
    catalog: dict[str, dict[str, Any]] | None = None  # vmsd name -> -dump-vmstate description
    types: dict[str, str] | None = None  # qdev type name -> vmsd name, from -dump-vmstate


@dataclass
class CompatResult:
    source: str
    destination: list[str]
    findings: list[Finding] = field(default_factory=list)
    checked: int = 0

    @property
    def compatible(self) -> bool:
        return not any(f.severity == BREAK for f in self.findings)

    def count(self, severity: str) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    def as_json(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "compatible": self.compatible,
                "sections_checked": self.checked,
                "counts": {s: self.count(s) for s in (BREAK, RISK, NOTE)},
                "findings": [f.as_json() for f in self.findings]}


# ---------------------------------------------------------------------------------------------- sides


def side_from_stream(name: str, an: Any) -> Side:
    """A side from a read ``Analysis`` (its vmdesc gives the written layout of every device)."""
    side = Side(name, sections={}, ram={b.name: b.used_length for b in an.blocks.values()})
    if an.configuration is not None:
        side.machine = an.configuration.machine
        side.page_bits = an.configuration.page_bits
    descs = {(d.section.idstr, d.section.instance_id): d.desc for d in an.devices}
    assert side.sections is not None
    for st in an.order:
        s = st.section
        key = (s.idstr, s.instance_id)
        desc = descs.get(key) if s.handler == "device" else None
        vmsd = str(desc.get("vmsd_name")) if desc and desc.get("vmsd_name") else s.idstr.rsplit("/", 1)[-1]
        side.sections[key] = SectionInfo(s.idstr, s.instance_id, s.version, vmsd, desc)
    return side


def side_from_dump(name: str, dump: Any) -> Side:
    """A side from ``qemu-system-* -M TYPE -dump-vmstate FILE`` JSON."""
    if not isinstance(dump, dict):
        raise SchemaError(f"{name}: -dump-vmstate JSON is not an object")
    side = Side(name, catalog={}, types={})
    assert side.catalog is not None and side.types is not None
    m = dump.get("vmschkmachine")
    if isinstance(m, dict) and m.get("Name"):
        side.machine = str(m["Name"])
    for key, entry in dump.items():
        if isinstance(entry, dict) and isinstance(entry.get("Description"), dict):
            d = entry["Description"]
            vname = str(d.get("name", key))
            side.catalog.setdefault(vname, d)
            side.types[str(key)] = vname
    if not side.catalog:
        raise SchemaError(f"{name}: no device descriptions in the -dump-vmstate JSON")
    return side


# ---------------------------------------------------------------------------------------------- layouts


@dataclass
class _F:
    """One field as a loader sees it."""

    name: str
    size: int  # element size on the wire (source) / as the dump states it (destination)
    sub: _Desc | None = None  # nested struct
    cond: bool = False  # has a field_exists test
    version: int = 0
    count: int = 1
    type: str = ""
    occ: int | None = None  # which of several same-named fields of one vmsd this is
    indexed: bool = False  # one element of an array QEMU described element by element
    raw_name: str = ""
    variants: list[_Desc] = field(default_factory=list)  # other element layouts of an array of structs


@dataclass
class _Desc:
    name: str
    version: int
    minimum: int | None
    fields: list[_F]
    subsections: dict[str, _Desc]
    all_subsections: bool  # True: every subsection the side knows (dump); False: only the ones sent


def _base(name: str) -> str:
    return _IDX.sub("", name)


def _from_vmdesc(d: dict[str, Any]) -> _Desc:
    fields: list[_F] = []
    for fd in d.get("fields", []):
        if not isinstance(fd, dict):
            continue
        t = str(fd.get("type", ""))
        sub = None
        if t == "struct" and isinstance(fd.get("struct"), dict):
            sub = _from_vmdesc(fd["struct"])
        elif t in ("vstruct", "tmp") and isinstance(fd.get("fields"), list):
            sub = _from_vmdesc(fd)
        n = fd.get("array_len")
        count = n if isinstance(n, int) else 1
        raw = str(fd.get("name", "?"))
        m = _IDX.search(raw)
        occ = int(m.group(0)[1:-1]) if m and fd.get("index") is None else None
        f = _F(raw, int(fd.get("size", 0) or 0), sub, count=count, type=t, occ=occ,
               indexed=fd.get("index") is not None, raw_name=raw)
        prev = fields[-1] if fields else None
        # one entry per element of an array whose elements QEMU could not compress into array_len (the
        # last element's entry carries no index)
        if (prev is not None and prev.indexed and prev.name == f.name and prev.type == f.type
                and (prev.size == f.size or sub is not None)
                and (prev.sub.name if prev.sub else None) == (sub.name if sub else None)):
            prev.count += count
            prev.indexed = f.indexed
            if sub is not None and f.size != prev.size and all(v.fields != sub.fields for v in prev.variants):
                prev.variants.append(sub)  # elements with conditional fields differ in layout
            continue
        fields.append(f)
    subs = {str(s.get("vmsd_name", "")): _from_vmdesc(s) for s in d.get("subsections", []) if isinstance(s, dict)}
    return _Desc(str(d.get("vmsd_name", "")), int(d.get("version", 0) or 0), None, fields, subs, False)


def _from_dump(d: dict[str, Any]) -> _Desc:
    fields = []
    seen: dict[str, int] = {}
    for fd in d.get("Fields", []):
        if not isinstance(fd, dict):
            continue
        sub = _from_dump(fd["Description"]) if isinstance(fd.get("Description"), dict) else None
        name = str(fd.get("field", "?"))
        occ = seen.get(name, 0)
        seen[name] = occ + 1
        fields.append(_F(name, int(fd.get("size", 0) or 0), sub, bool(fd.get("field_exists")),
                         int(fd.get("version_id", 0) or 0), occ=occ, raw_name=name))
    subs = {str(s.get("name", "")): _from_dump(s) for s in d.get("Subsections", []) if isinstance(s, dict)}
    return _Desc(str(d.get("name", "")), int(d.get("version_id", 0) or 0),
                 int(d.get("minimum_version_id", 0) or 0), fields, subs, True)


def _dump_as_source(d: _Desc, version: int) -> _Desc:
    """What a build described by a dump sends at its own version: every field it may write (conditional
    ones stay marked), nested structs at their own versions."""
    fields = [_F(f.name, f.size, _dump_as_source(f.sub, f.sub.version) if f.sub else None, f.cond, f.version,
                 occ=f.occ, raw_name=f.raw_name) for f in d.fields if f.version <= version]
    subs = {k: _dump_as_source(v, v.version) for k, v in d.subsections.items()}
    return _Desc(d.name, version, d.minimum, fields, subs, True)


# ---------------------------------------------------------------------------------------------- replay


class _Replay:
    def __init__(self, section: str, out: list[Finding], src_is_dump: bool,
                 dst_written: set[str] | None = None) -> None:
        self.section = section
        self.out = out
        self.src_is_dump = src_is_dump
        self.dst_written = dst_written  # field names the destination's own stream wrote for this section

    def add(self, sev: str, reason: str, *fields: str) -> None:
        self.out.append(Finding(sev, self.section, reason, list(fields)))

    def fail(self, src_field: _F | None, reason: str, *fields: str) -> None:
        # a conditional source field may simply not be sent: then the mismatch is a risk
        sev = RISK if (src_field is not None and src_field.cond) else BREAK
        self.add(sev, reason, *fields)

    def run(self, src: _Desc, dst: _Desc, version: int, where: str) -> None:
        """Walk ``dst``'s loader at ``version`` over ``src``'s fields, then the subsections."""
        if self.fields(list(src.fields), [f for f in dst.fields if f.version <= version], where, dst):
            self.subsections(src, dst, where)

    def _try(self, s_fields: list[_F], d_fields: list[_F], where: str, dst: _Desc) -> tuple[bool, list[Finding]]:
        saved, self.out = self.out, []
        try:
            ok = self.fields(s_fields, d_fields, where, dst)
            return ok and not any(f.severity == BREAK for f in self.out), self.out
        finally:
            self.out = saved

    def fields(self, s_fields: list[_F], d_fields: list[_F], where: str, dst: _Desc) -> bool:
        """The field walk of one level; False when it stopped at a break."""
        i = j = 0
        while j < len(d_fields):
            d = d_fields[j]
            s = s_fields[i] if i < len(s_fields) else None
            fname = f"{where}{d.name}"
            if (s is not None and _same(s, d) and s.occ is not None and d.occ is not None and d.occ != s.occ
                    and any(x.name == d.name and x.occ == s.occ for x in d_fields[j + 1:])):
                j += 1  # the source wrote another of the same-named fields (e.g. the unconditional one)
                continue
            if (s is not None and d.sub is not None and not _same(s, d) and j + 1 < len(d_fields)
                    and _same(s, d_fields[j + 1]) and not any(_same(x, d) for x in s_fields[i:])):
                self.add(NOTE, f"the destination reads {d.name!r} (struct {d.sub.name}) where the source wrote "
                               "nothing: taken as a variable-length array with no element here", fname)
                j += 1
                continue
            if s is None:
                if d.cond:
                    j += 1
                    continue
                if d.sub is not None and self.dst_written is not None and d.name not in self.dst_written:
                    self.add(NOTE, f"the destination reads {d.name!r} (struct {d.sub.name}) after the last field the "
                                   "source wrote; its own stream has no such field either: a variable-length array "
                                   "with no element in both", fname)
                    j += 1
                    continue
                if d.sub is not None:
                    self.add(RISK, f"the destination reads {d.name!r} (struct {d.sub.name}) after the last field the "
                                   "source wrote: fine when it is a variable-length array that holds no element "
                                   "here (QEMU's vmdesc omits those), a break otherwise", fname)
                    j += 1
                    continue
                self.add(BREAK, f"the destination reads {d.name!r} ({_sz(d)}) after the last field the source "
                                f"wrote for {dst.name or 'this section'}: it would consume the bytes that follow",
                         fname)
                return False
            if d.sub is not None and s.sub is not None:
                if d.cond and not _same(s, d) and d.sub.name != s.sub.name:
                    j += 1
                    continue
                if d.sub.name != s.sub.name and not _same(s, d):
                    self.add(NOTE, f"struct {s.name!r} ({s.sub.name}) is read as {d.name!r} ({d.sub.name})", fname)
                for variant in [s.sub, *s.variants]:
                    self.run(variant, d.sub, d.sub.version, f"{fname}/")
                i += 1
                j += 1
                continue
            if d.sub is not None and s.sub is None:
                # the destination groups these fields into a struct: read the struct's fields in place
                if d.cond and not _same(s, d):
                    j += 1
                    continue
                d_fields[j:j + 1] = [f for f in d.sub.fields if f.version <= d.sub.version]
                self.add(NOTE, f"the destination reads {d.name!r} as a struct ({d.sub.name}) of fields the source "
                               "wrote one by one", fname)
                continue
            if s.sub is not None and d.sub is None:
                if d.cond and not _same(s, d):
                    j += 1
                    continue
                s_fields[i:i + 1] = list(s.sub.fields)
                self.add(NOTE, f"the source wrote {s.name!r} as a struct ({s.sub.name}); the destination reads its "
                               "fields one by one", fname)
                continue
            # two leaves
            pad = d.name == "unused" or _base(s.name) == "unused"
            if pad and not d.cond and d.size and s.size != d.size and s.size * s.count == d.size:
                s = _F(s.name, d.size, raw_name=s.raw_name)  # padding of the same total size
            elif pad and not d.cond and d.size and s.size and s.size != d.size and self.src_is_dump:
                self.add(RISK, f"{s.name!r} ({s.size} bytes an element) is padding {d.name!r} of {d.size} bytes at "
                               "the destination: a -dump-vmstate gives no array lengths, so whether the bytes line "
                               "up is not known (a stream as SRC tells)", fname)
                i += 1
                j += 1
                continue
            if d.cond and not _same(s, d) and any(_same(s, x) for x in d_fields[j + 1:]):
                # by name the destination's test skips this field (the source's comes later); but the
                # loader does not look at names: when skipping it does not line up, try reading it
                ok, found = self._try(s_fields[i:], d_fields[j + 1:], where, dst)
                if not ok and (d.size == s.size or not d.size or not s.size):
                    ok2, found2 = self._try(s_fields[i + 1:], d_fields[j + 1:], where, dst)
                    if ok2:
                        self.add(RISK, f"loads only because the destination's test for {d.name!r} accepts the "
                                       f"source's {s.name!r} in its place ({_sz(s)}): the bytes line up but the "
                                       "value lands in another field", fname)
                        self.out.extend(found2)
                        return True
                self.out.extend(found)
                return ok
            if d.size == 0 or s.size == 0 or d.size == s.size or (pad and s.size * s.count % d.size == 0):
                if d.cond and d.size and s.size and d.size != s.size and not pad:
                    j += 1
                    continue
                if not _same(s, d) and not pad:
                    self.add(NOTE, f"field {s.name!r} is named {d.name!r} at the destination (same position and "
                                   f"size {d.size or s.size}): not a break", fname)
                i += 1
                j += 1
                continue
            if d.cond:
                j += 1
                continue
            if not dst.all_subsections:
                # an exact (vmdesc) destination layout: fields split or merged still load when the bytes line up
                k = _realign(s_fields, i, d_fields, j)
                if k is not None:
                    self.add(NOTE, f"fields regrouped: the source's {', '.join(f.name for f in s_fields[i:k[0]])} "
                                   f"are the destination's {', '.join(f.name for f in d_fields[j:k[1]])} "
                                   "(same bytes)", fname)
                    i, j = k
                    continue
            self.fail(s, f"field {d.name!r}: the source wrote {_sz(s)} ({s.name!r}), the destination reads "
                         f"{_sz(d)}", fname)
            return s.cond
        if i < len(s_fields):
            rest = s_fields[i:]
            if any(f.size or f.sub for f in rest if not (self.src_is_dump and f.cond)):
                names = [f"{where}{f.name}" for f in rest]
                self.fail(rest[0] if all(f.cond for f in rest) else None,
                          f"the source wrote {len(rest)} field(s) after the last one the destination reads "
                          f"({', '.join(f.name for f in rest[:4])}{'...' if len(rest) > 4 else ''}): the destination "
                          "would take them for the next section", *names)
                return all(f.cond for f in rest)
        return True


    def subsections(self, src: _Desc, dst: _Desc, where: str) -> None:
        for name, sd in src.subsections.items():
            dd = dst.subsections.get(name)
            sev = RISK if self.src_is_dump else BREAK
            if dd is None:
                if not dst.all_subsections:
                    self.add(RISK, f"subsection {name!r} was sent; the destination's stream did not carry it, "
                                   "so whether it knows it is not certain (give its -dump-vmstate)", where + name)
                    continue
                why = ("the source sends it when its state needs it" if self.src_is_dump
                       else "it is in the stream")
                self.add(sev, f"subsection {name!r} is unknown to the destination ({why}): the load fails",
                         where + name)
                continue
            if dst.all_subsections and sd.version > dd.version:
                self.add(sev, f"subsection {name!r} version {sd.version} is newer than the destination's "
                              f"{dd.version}", where + name)
                continue
            if dst.all_subsections and dd.minimum is not None and sd.version < dd.minimum:
                self.add(sev, f"subsection {name!r} version {sd.version} is older than the destination's minimum "
                              f"{dd.minimum}", where + name)
                continue
            self.run(sd, dd, sd.version, f"{where}{name}/")


def _realign(sf: list[_F], i: int, df: list[_F], j: int, limit: int = 16) -> tuple[int, int] | None:
    """The next field boundaries (source index, destination index) where both sides have consumed the same
    number of bytes, looking at leaves only; None when they do not line up within ``limit`` fields."""
    a = b = 0
    i0, j0 = i, j
    while i - i0 < limit and j - j0 < limit:
        if a == b and (i, j) != (i0, j0):
            return i, j
        if a <= b:
            if i >= len(sf) or sf[i].sub is not None:
                return None
            a += sf[i].size * sf[i].count
            i += 1
        else:
            if j >= len(df) or df[j].sub is not None:
                return None
            b += df[j].size * df[j].count
            j += 1
    return (i, j) if a == b else None


def _names(d: _Desc) -> set[str]:
    out: set[str] = set()
    for f in d.fields:
        out.add(f.name)
        out.add(_base(f.name))
        for sub in ([f.sub] if f.sub else []) + f.variants:
            out |= _names(sub)
    for sub in d.subsections.values():
        out |= _names(sub)
    return out


def _same(s: _F, d: _F) -> bool:
    return s.name == d.name or _base(s.name) == d.name or s.name == _base(d.name)


def _sz(f: _F) -> str:
    if f.sub is not None:
        return f"struct {f.sub.name}"
    n = f"{f.size} bytes" if f.size != 1 else "1 byte"
    return n if f.count == 1 else f"{f.count} x {n}"


# ---------------------------------------------------------------------------------------------- compat


def compat(src: Side, dsts: list[Side], devices: set[str] | None = None) -> CompatResult:
    res = CompatResult(src.name, [d.name for d in dsts])
    out = res.findings
    dump = next((d for d in dsts if d.catalog is not None), None)
    stream = next((d for d in dsts if d.sections is not None), None)

    # configuration
    for d in dsts:
        if src.machine and d.machine and src.machine != d.machine:
            out.append(Finding(BREAK, "configuration", f"machine type {src.machine!r} is not the destination's "
                                                       f"{d.machine!r} ({d.name}): QEMU refuses the configuration",
                               ["configuration/name"]))
            break
    if stream is not None and src.page_bits and stream.page_bits and src.page_bits != stream.page_bits:
        out.append(Finding(BREAK, "configuration", f"target page bits {src.page_bits} vs {stream.page_bits}",
                           ["configuration/target-page-bits"]))

    # RAM blocks
    if src.ram is not None and stream is not None and stream.ram is not None:
        for name, size in src.ram.items():
            dsize = stream.ram.get(name)
            if dsize is None:
                out.append(Finding(BREAK, "ram", f"RAM block {name!r} ({size} bytes) does not exist at the "
                                                 "destination", [f"ram/{name}"]))
            elif dsize != size:
                resizable = name.startswith("/rom@etc/")
                out.append(Finding(NOTE if resizable else BREAK, "ram",
                                   f"RAM block {name!r} is {size} bytes in the source, {dsize} at the destination"
                                   + (" (a resizable firmware blob: QEMU resizes it)" if resizable else
                                      ": QEMU rejects the length mismatch"), [f"ram/{name}"]))
        for name in stream.ram:
            if name not in src.ram:
                out.append(Finding(NOTE, "ram", f"RAM block {name!r} exists only at the destination (left as is)",
                                   [f"ram/{name}"]))

    if src.sections is not None:
        _stream_sections(src, dump, stream, res)
    elif src.catalog is not None:
        _dump_sections(src, dump, stream, devices, res)
    return res


def _stream_sections(src: Side, dump: Side | None, stream: Side | None, res: CompatResult) -> None:
    out = res.findings
    assert src.sections is not None
    for key, sec in src.sections.items():
        label = f"{sec.idstr}:{sec.instance}"
        if sec.idstr in _LIVE:
            if stream is not None and stream.sections is not None and key not in stream.sections:
                out.append(Finding(BREAK, label, "live section missing at the destination"))
            continue
        res.checked += 1
        dsec = stream.sections.get(key) if stream is not None and stream.sections is not None else None
        if stream is not None and dsec is None:
            out.append(Finding(BREAK, label, "the destination has no such section or instance (a device missing, "
                                             "or at another address): QEMU fails with 'Unknown savevm section'"))
            continue
        ddesc: _Desc | None = None
        if dump is not None and dump.catalog is not None and sec.vmsd_name in dump.catalog:
            ddesc = _from_dump(dump.catalog[sec.vmsd_name])
        elif dsec is not None and dsec.desc is not None:
            ddesc = _from_vmdesc(dsec.desc)
            if dsec.version != sec.version:
                out.append(Finding(NOTE, label, f"version {sec.version} in the source, {dsec.version} at the "
                                                "destination (its range is not known without its -dump-vmstate)"))
                if dsec.version < sec.version:
                    out.append(Finding(RISK, label, f"the destination writes version {dsec.version}; it may not "
                                                    f"load version {sec.version}"))
                continue
        if ddesc is None:
            if dsec is None:
                out.append(Finding(NOTE, label, f"not described by the destination's -dump-vmstate ({sec.vmsd_name} "
                                                "is not a qdev device); give a destination stream to check it"))
            continue
        if ddesc.version and sec.version > ddesc.version:
            out.append(Finding(BREAK, label, f"section version {sec.version} is newer than the destination's "
                                             f"{ddesc.version} ({ddesc.name})", [f"{label}/version_id"]))
            continue
        if ddesc.minimum is not None and sec.version < ddesc.minimum:
            out.append(Finding(BREAK, label, f"section version {sec.version} is older than the destination's "
                                             f"minimum_version_id {ddesc.minimum} ({ddesc.name})",
                               [f"{label}/version_id"]))
            continue
        if sec.desc is None:
            out.append(Finding(NOTE, label, "the source stream carries no vmdesc entry for it: layout not checked"))
            continue
        written = _names(_from_vmdesc(dsec.desc)) if dsec is not None and dsec.desc is not None else None
        _Replay(label, out, False, written).run(_from_vmdesc(sec.desc), ddesc, sec.version, f"{label}/")
    if stream is not None and stream.sections is not None:
        for key, dsec in stream.sections.items():
            if key not in src.sections:
                out.append(Finding(NOTE, f"{dsec.idstr}:{dsec.instance}", "only the destination has this section: "
                                                                          "the device keeps its reset state"))


def _dump_sections(src: Side, dump: Side | None, stream: Side | None, devices: set[str] | None,
                   res: CompatResult) -> None:
    out = res.findings
    assert src.catalog is not None and src.types is not None
    if dump is None or dump.catalog is None:
        raise SchemaError("a -dump-vmstate source needs a -dump-vmstate destination")
    wanted: set[str] | None = None
    if devices:
        wanted = {src.types.get(t, t) for t in devices}
    elif stream is not None and stream.sections is not None:
        wanted = {s.vmsd_name for s in stream.sections.values()}
    for vname, d in src.catalog.items():
        if wanted is not None and vname not in wanted:
            continue
        res.checked += 1
        sd = _from_dump(d)
        dd_raw = dump.catalog.get(vname)
        if dd_raw is None:
            out.append(Finding(RISK if wanted is None else BREAK, vname,
                               "the destination has no description of this name (device removed or renamed): "
                               "a guest with it cannot migrate there"))
            continue
        dd = _from_dump(dd_raw)
        if sd.version > dd.version:
            out.append(Finding(BREAK, vname, f"version {sd.version} is newer than the destination's {dd.version}",
                               [f"{vname}/version_id"]))
            continue
        if dd.minimum is not None and sd.version < dd.minimum:
            out.append(Finding(BREAK, vname, f"version {sd.version} is older than the destination's "
                                             f"minimum_version_id {dd.minimum}", [f"{vname}/version_id"]))
            continue
        _Replay(vname, out, True).run(_dump_as_source(sd, sd.version), dd, sd.version, f"{vname}/")


#: how a stream, a container or a compressed stream starts (anything else is taken as a -dump-vmstate JSON)
_STREAM_MAGIC = (b"QEVM", b"QFI\xfb", b"Libv", b"\x1f\x8b\x08", b"\xfd7zX", b"BZh", b"\x28\xb5\x2f\xfd")


def _is_stream(path: str) -> bool:
    if path == "-":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) in _STREAM_MAGIC
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def load_side(path: str, snapshot: str | None = None) -> Side:
    """One side of a comparison from a path: a stream/image (its vmdesc and sections) or a -dump-vmstate JSON."""
    if _is_stream(path):
        inp = open_input(path, snapshot=snapshot)
        try:
            return side_from_stream(path, read_stream(inp, strict=False))
        finally:
            inp.close()
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: neither a stream nor a JSON file ({e})") from None
    try:
        return side_from_dump(path, doc)
    except SchemaError as e:
        raise UsageError(str(e)) from None
