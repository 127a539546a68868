"""Layout of a PCI config space as QEMU saves it (vmstate type ``pci config``).

Describes: QEMU 7.2 and 10.0 ``hw/pci/pci.c`` (``put_pci_config_device`` writes the device's
``config`` array as is, 256 bytes for PCI, 4096 for PCI Express), whose registers follow
``include/standard-headers/linux/pci_regs.h`` (type 0/1 headers, capabilities, extended
capabilities) and ``include/standard-headers/linux/virtio_pci.h`` (the virtio vendor capabilities).
Everything is little-endian.  Capabilities are found by walking the list from the header's pointer;
what is not described (unknown capabilities, the space between them) stays raw, named by offset.
"""

from __future__ import annotations

from typing import Any

from qevm.codec.layout import arr, buf, le, rows, struct

__all__ = ["pci_config_layout", "capabilities", "VIRTIO_VENDOR"]

Desc = dict[str, Any]
VIRTIO_VENDOR = 0x1AF4

_COMMON = (("vendor_id", 2), ("device_id", 2), ("command", 2), ("status", 2), ("revision_id", 1),
           ("prog_if", 1), ("subclass", 1), ("class", 1), ("cache_line_size", 1), ("latency_timer", 1),
           ("header_type", 1), ("bist", 1))
_TYPE0 = (("cardbus_cis", 4), ("subsystem_vendor_id", 2), ("subsystem_id", 2), ("rom_address", 4),
          ("capabilities", 1), ("_reserved", 7), ("interrupt_line", 1), ("interrupt_pin", 1),
          ("min_gnt", 1), ("max_lat", 1))
_TYPE1 = (("primary_bus", 1), ("secondary_bus", 1), ("subordinate_bus", 1), ("secondary_latency_timer", 1),
          ("io_base", 1), ("io_limit", 1), ("secondary_status", 2), ("memory_base", 2), ("memory_limit", 2),
          ("prefetchable_base", 2), ("prefetchable_limit", 2), ("prefetchable_base_upper32", 4),
          ("prefetchable_limit_upper32", 4), ("io_base_upper16", 2), ("io_limit_upper16", 2),
          ("capabilities", 1), ("_reserved", 3), ("rom_address", 4), ("interrupt_line", 1),
          ("interrupt_pin", 1), ("bridge_control", 2))

# capability bodies after the id and next bytes (pci_regs.h PCI_PM_*, PCI_MSIX_*, PCI_EXP_*, ...)
_PM = (("pmc", 2), ("pmcsr", 2), ("bridge_ext", 1), ("data", 1))
_MSIX = (("control", 2), ("table", 4), ("pba", 4))
_PCIE = (("flags", 2), ("devcap", 4), ("devctl", 2), ("devsta", 2), ("lnkcap", 4), ("lnkctl", 2),
         ("lnksta", 2), ("sltcap", 4), ("sltctl", 2), ("sltsta", 2), ("rtctl", 2), ("rtcap", 2),
         ("rtsta", 4), ("devcap2", 4), ("devctl2", 2), ("devsta2", 2), ("lnkcap2", 4), ("lnkctl2", 2),
         ("lnksta2", 2), ("sltcap2", 4), ("sltctl2", 2), ("sltsta2", 2))
_PCIE_V1_BODY = 0x14 - 2  # PCI_EXP_VER1_SIZEOF
_SSVID = (("_reserved", 2), ("subsystem_vendor_id", 2), ("subsystem_id", 2))
_SLOTID = (("slot_expansion", 1), ("chassis", 1))
_SATA = (("revision", 2), ("bar_offset", 4))
_AF = (("af_cap", 1), ("af_ctrl", 1), ("af_status", 1), ("_reserved", 1))
# virtio_pci.h struct virtio_pci_cap after cap_vndr/cap_next/cap_len
_VIRTIO_CAP = (("cfg_type", 1), ("bar", 1), ("cap_id", 1), ("_padding", 2), ("offset", 4), ("length", 4))
_VIRTIO_CFG_TYPES = {1: "common", 2: "notify", 3: "isr", 4: "device", 5: "pci", 8: "shared_memory"}

_CAP_NAMES = {0x01: "pm", 0x05: "msi", 0x09: "vendor", 0x10: "pcie", 0x11: "msix", 0x0D: "ssvid",
              0x04: "slotid", 0x12: "sata", 0x13: "af"}
# extended capabilities (PCI_EXT_CAP_ID_*), bodies after the 4-byte header
_EXT_AER = (("uncor_status", 4), ("uncor_mask", 4), ("uncor_severity", 4), ("cor_status", 4),
            ("cor_mask", 4), ("cap_control", 4), ("_header_log", 16), ("root_command", 4),
            ("root_status", 4), ("cor_error_source", 2), ("uncor_error_source", 2), ("_tlp_prefix_log", 16))
_EXT: dict[int, tuple[str, tuple[tuple[str, int], ...]]] = {
    0x0001: ("aer", _EXT_AER),
    0x0003: ("dsn", (("serial_lo", 4), ("serial_hi", 4))),
    0x000D: ("acs", (("cap", 2), ("ctrl", 2))),
    0x000E: ("ari", (("cap", 2), ("ctrl", 2))),
    0x0010: ("sriov", ()),
    0x0023: ("dvsec", ()),
}


def capabilities(data: bytes) -> list[tuple[int, int]]:
    """``(offset, id)`` of each capability in list order (loops and bad pointers end the walk)."""
    out: list[tuple[int, int]] = []
    if len(data) < 0x40 or not data[0x06] & 0x10:
        return out
    ptr = data[0x34] & 0xFC
    seen: set[int] = set()
    while 0x40 <= ptr <= min(len(data), 256) - 2 and ptr not in seen and len(out) < 48:
        seen.add(ptr)
        out.append((ptr, data[ptr]))
        ptr = data[ptr + 1] & 0xFC
    return out


def _cap_body(data: bytes, off: int, cid: int, room: int) -> tuple[str, list[Desc]]:
    """Name and fields (after id/next) of the capability at ``off`` with ``room`` bytes to spend."""
    kind = _CAP_NAMES.get(cid, f"cap_{cid:#04x}")
    if cid == 0x05:
        ctrl = int.from_bytes(data[off + 2:off + 4], "little")
        t: tuple[tuple[str, int], ...] = (("control", 2), ("address", 4))
        if ctrl & 0x80:
            t += (("address_hi", 4),)
        t += (("data", 2),)
        if ctrl & 0x100:
            t += (("_reserved", 2), ("mask_bits", 4), ("pending_bits", 4))
        return kind, rows(t, min(room, sum(n for _, n in t)))
    if cid == 0x10:
        body = sum(n for _, n in _PCIE) if (data[off + 2] & 0x0F) >= 2 else _PCIE_V1_BODY
        return kind, rows(_PCIE, min(room, body))
    if cid == 0x09:
        length = data[off + 2]
        vendor = int.from_bytes(data[0:2], "little")
        n = max(0, min(room, length - 2))
        if vendor == VIRTIO_VENDOR and length >= 16 and n == length - 2:
            cfg = data[off + 3]
            kind = f"virtio_{_VIRTIO_CFG_TYPES.get(cfg, f'cfg{cfg}')}"
            extra: tuple[tuple[str, int], ...] = ()
            if cfg == 2 and length - 16 == 4:
                extra = (("notify_off_multiplier", 4),)
            elif cfg == 5 and length - 16 == 4:
                extra = (("_pci_cfg_data", 4),)
            elif cfg == 8 and length - 16 == 8:
                extra = (("offset_hi", 4), ("length_hi", 4))
            return kind, rows((("cap_len", 1), *_VIRTIO_CAP, *extra), n)
        return kind, rows((("cap_len", 1),), n)
    table = {0x01: _PM, 0x11: _MSIX, 0x0D: _SSVID, 0x04: _SLOTID, 0x12: _SATA, 0x13: _AF}.get(cid)
    if table is None:
        return kind, [buf("body", room, note=f"capability {cid:#04x} not described by qevm")] if room else []
    return kind, rows(table, min(room, sum(n for _, n in table)))


def _regions(data: bytes) -> list[tuple[int, int, Desc]]:
    """``(offset, length, field)`` for the header and each capability, in offset order."""
    htype = data[0x0E] & 0x7F
    head = [*rows(_COMMON)]
    if htype == 0:
        head += [arr(le("bar", 4), 6), *rows(_TYPE0)]
    elif htype == 1:
        head += [arr(le("bar", 4), 2), *rows(_TYPE1)]
    else:
        head.append(buf("header_rest", 0x30, note=f"header type {htype} not described by qevm"))
    regions: list[tuple[int, int, Desc]] = [(0, 0x40, {"fields": head})]
    std_end = min(len(data), 256)
    caps = sorted(capabilities(data))
    for k, (off, cid) in enumerate(caps):
        if off < regions[-1][0] + regions[-1][1]:
            break  # overlapping capabilities: keep the rest raw
        limit = caps[k + 1][0] if k + 1 < len(caps) else std_end
        kind, body = _cap_body(data, off, cid, limit - off - 2)
        fields = [le("id", 1), le("next", 1), *body]
        f = struct(f"{kind}@{off:#x}", f"pci capability {cid:#04x}", fields)
        regions.append((off, f["size"], f))
    if len(data) > 256:
        regions += _ext_regions(data)
    return regions


def _ext_regions(data: bytes) -> list[tuple[int, int, Desc]]:
    found: list[tuple[int, int]] = []
    ptr, seen = 0x100, set()
    while 0x100 <= ptr <= len(data) - 4 and ptr not in seen and len(found) < 64:
        seen.add(ptr)
        h = int.from_bytes(data[ptr:ptr + 4], "little")
        if h in (0, 0xFFFFFFFF):
            break
        found.append((ptr, h & 0xFFFF))
        ptr = (h >> 20) & 0xFFC
    found.sort()
    out: list[tuple[int, int, Desc]] = []
    for k, (off, cid) in enumerate(found):
        if k and off < found[k - 1][0] + 4:
            break
        limit = found[k + 1][0] if k + 1 < len(found) else len(data)
        name, table = _EXT.get(cid, (f"ext_{cid:#06x}", ()))
        room = limit - off - 4
        body = rows(table, min(room, sum(n for _, n in table))) if table else []
        fields = [le("cap_id", 2), le("version_next", 2), *body]
        out.append((off, 4 + sum(int(f["size"]) * int(f.get("array_len", 1)) for f in body),
                    struct(f"{name}@{off:#x}", f"pcie extended capability {cid:#06x}", fields)))
    return out


def pci_config_layout(data: bytes) -> Desc:
    """The vmsd description of one saved config space (any size; at least the 64-byte header)."""
    if len(data) < 0x40:
        raise ValueError("shorter than a PCI header")
    fields: list[Desc] = []
    pos = 0
    for off, length, f in _regions(data):
        if off > pos:
            fields.append(buf(f"raw@{pos:#x}", off - pos))
        if "fields" in f:
            fields += f["fields"]
        else:
            fields.append(f)
        pos = off + length
    if pos < len(data):
        fields.append(buf(f"raw@{pos:#x}", len(data) - pos))
    return {"vmsd_name": "pci config", "version": 1, "fields": fields}
