"""JSON-able views of an ``Analysis``: the ``dump`` document and the ``info`` summary."""

from __future__ import annotations

import re
from typing import Any

from qevm.codec.vmsd import to_json
from qevm.format.events import Command
from qevm.format.grammar import ODDITY_TEXT, Oddity
from qevm.io.reader import Analysis, Device

__all__ = ["dump_document", "info_document", "qemu_hints", "warnings"]

def _configuration(an: Analysis) -> dict[str, Any] | None:
    c = an.configuration
    if c is None:
        return None
    return {
        "machine": c.machine,
        "page_bits": c.page_bits,
        "capabilities": c.capabilities,
        "uuid": c.uuid,
        "subsections": [s.name for s in c.subsections],
    }

def _page_size(an: Analysis, fallback: int | None) -> int | None:
    return an.page_size or (1 << an.configuration.page_bits if an.configuration and an.configuration.page_bits
                            else fallback)

def _ram(an: Analysis) -> dict[str, Any]:
    blocks = []
    for b in an.blocks.values():
        d: dict[str, Any] = {"name": b.name, "size": b.used_length, "pages": dict(b.pages)}
        if b.addr is not None:
            d["addr"] = b.addr
        if b.page_size is not None:
            d["page_size"] = b.page_size
        if b.mapped is not None:
            d["mapped_ram"] = {"bitmap_offset": b.mapped.bitmap_offset, "pages_offset": b.mapped.pages_offset}
        blocks.append(d)
    total = {k: sum(b.pages[k] for b in an.blocks.values()) for k in ("normal", "zero", "xbzrle", "compressed")}
    return {"blocks": blocks, "pages": total, "passes": an.passes, "iterations": an.ram_chunks,
            "multifd_flushes": an.ram_flushes}

def _device(d: Device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if d.desc is not None and "vmsd_name" in d.desc:
        out["vmsd_name"] = d.desc["vmsd_name"]
    if d.struct is not None:
        out["fields"] = to_json(d.struct)
    else:
        out["data"] = d.data.hex()
        if d.error:
            out["error"] = d.error
        elif d.desc is None:
            out["note"] = "no vmdesc entry describes this section"
    return out

def dump_document(an: Analysis, page_size: int | None = None) -> dict[str, Any]:
    devices = {d.section.section_id: d for d in an.devices}
    sections = []
    for st in an.order:
        s = st.section
        entry: dict[str, Any] = {
            "section_id": s.section_id, "name": s.idstr, "instance_id": s.instance_id, "version": s.version,
            "kind": "device" if s.handler == "device" else "live", "offset": st.offset, "size": st.size,
        }
        if s.handler != "device":
            entry["handler"] = s.handler
            entry["chunks"] = st.chunks
        if s.handler == "ram":
            entry["ram"] = _ram(an)
        elif s.section_id in an.live_records:
            entry["records"] = an.live_records[s.section_id]
        d = devices.get(s.section_id)
        if d is not None:
            entry.update(_device(d))
        sections.append(entry)
    return {
        "file_version": an.header.version if an.header else None,
        "size": an.size,
        "configuration": _configuration(an),
        "page_size": _page_size(an, page_size),
        "sections": sections,
        "commands": an.command_list(),
        "vmdesc": an.vmdesc is not None,
        "vmdesc_source": an.vmdesc_source,
        "trailing_bytes": an.trailing,
    }

_MACHINE_VER = re.compile(r"-(\d+)\.(\d+)$")

def qemu_hints(an: Analysis) -> dict[str, Any]:
    """Bounds on the QEMU release that wrote the stream, with the reasons."""
    lo: tuple[int, int] = (0, 0)
    hi: tuple[int, int] | None = None
    why: list[str] = []

    def at_least(v: tuple[int, int], reason: str) -> None:
        nonlocal lo
        why.append(reason)
        lo = max(lo, v)

    def at_most(v: tuple[int, int], reason: str) -> None:
        nonlocal hi
        why.append(reason)
        hi = v if hi is None else min(hi, v)

    if an.configuration is not None:
        m = _MACHINE_VER.search(an.configuration.machine)
        if m:
            at_least((int(m.group(1)), int(m.group(2))), f"machine type {an.configuration.machine}")
        if "mapped-ram" in an.configuration.capabilities:
            at_least((9, 0), "mapped-ram capability")
    if any(c.cmd == Command.SWITCHOVER_START for c in an.commands):
        at_least((10, 0), "SWITCHOVER_START command")
    if an.vmdesc is not None and "configuration" in an.vmdesc:
        at_least((8, 2), "vmdesc describes the configuration")
    if an.vmdesc_raw is not None and b'"nullptr"' in an.vmdesc_raw:
        at_least((9, 1), "vmdesc uses the nullptr type")
    if an.ram_flushes:
        at_least((8, 1), "MULTIFD_FLUSH records")
    if any(b.pages["compressed"] for b in an.blocks.values()):
        at_most((9, 0), "COMPRESS_PAGE records (removed in 9.1)")
    if any(st.section.idstr == "block" for st in an.order):
        at_most((9, 0), "block migration section (removed in 9.1)")
    return {"min": f"{lo[0]}.{lo[1]}" if lo != (0, 0) else None,
            "max": f"{hi[0]}.{hi[1]}" if hi else None, "reasons": why}

def warnings(an: Analysis) -> list[dict[str, Any]]:
    """The stream's anomalies: what QEMU's loader goes along with but no correct source writes."""
    out = []
    for a in an.anomalies:
        try:
            what = ODDITY_TEXT[Oddity(a.code)]
        except ValueError:
            what = a.code
        out.append({"offset": a.offset, "code": a.code, "what": what, "detail": a.message})
    return out

def info_document(an: Analysis, page_size: int | None = None) -> dict[str, Any]:
    sections = []
    for st in an.order:
        s = st.section
        sections.append({"section_id": s.section_id, "name": s.idstr, "instance_id": s.instance_id,
                         "version": s.version, "kind": "device" if s.handler == "device" else "live",
                         "chunks": st.chunks, "offset": st.offset, "size": st.size})
    ram = _ram(an) if an.blocks else None
    counts: dict[str, int] = {}
    for c in an.commands:
        counts[c.name] = counts.get(c.name, 0) + 1
    return {
        "size": an.size,
        "machine": an.configuration.machine if an.configuration else None,
        "page_size": _page_size(an, page_size),
        "capabilities": an.configuration.capabilities if an.configuration else [],
        "uuid": an.configuration.uuid if an.configuration else None,
        "qemu": qemu_hints(an),
        "sections": sections,
        "ram": ram,
        "commands": counts,
        "vmdesc": an.vmdesc is not None,
        "vmdesc_size": len(an.vmdesc_raw) if an.vmdesc_raw is not None else None,
        "vmdesc_source": an.vmdesc_source,
        "eof_offset": an.eof_offset,
        "trailing_bytes": an.trailing,
        "device_sections": len(an.devices),
        "decoded_devices": sum(1 for d in an.devices if d.struct is not None),
        "warnings": warnings(an),
    }
