"""Where RAM blocks sit in guest-physical memory, rebuilt from what a stream records.

x86 ``pc`` (i440FX) and ``q35`` (MCH) follow the rules of QEMU's hw/i386/pc_piix.c and pc_q35.c
(QEMU 7.2 and 10.0): the RAM size and machine type give the below/above-4G split, the host bridge's
PAM registers say whether each 16 KiB segment of 0xc0000-0xfffff reads RAM or the PCI space (where
``pc.rom`` and the ISA BIOS alias live), its SMRAM register whether 0xa0000-0xbffff shows RAM, and
the BIOS ROM sits right below 4 GiB.  aarch64 virt, riscv64 virt, s390x ccw and ppc64 pseries have
their RAM at a fixed base.  What the stream cannot tell (``max-ram-below-4g`` given on QEMU's command
line) comes from ``overrides``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qevm.codec.vmsd import Struct, encode_struct, to_json
from qevm.errors import QevmError
from qevm.io.reader import Analysis

__all__ = ["GuestMap", "MapError", "Range", "parse_map_options"]

GiB = 1 << 30
_PAM_SEG = 0x4000
_SMRAM_D_OPEN = 0x40

# machines whose memory is a few blocks at fixed addresses, told apart by their main RAM block's name:
# main block -> (arch, [(block, guest-physical base)])
_FIXED = {
    "mach-virt.ram": ("aarch64", [("mach-virt.ram", 0x40000000)]),  # hw/arm/virt.c VIRT_MEM
    "riscv_virt_board.ram": ("riscv64", [("riscv_virt_board.mrom", 0x1000),  # hw/riscv/virt.c VIRT_MROM
                                         ("riscv_virt_board.ram", 0x80000000)]),  # VIRT_DRAM
    "s390.ram": ("s390x", [("s390.ram", 0)]),
    "ppc_spapr.ram": ("ppc64", [("ppc_spapr.ram", 0)]),
}


class MapError(QevmError):
    """The guest-physical layout cannot be rebuilt from the stream (and no --map said it)."""


@dataclass(frozen=True)
class Range:
    addr: int  # guest-physical
    size: int
    block: str
    offset: int  # in the block


def parse_map_options(items: list[str]) -> dict[str, int]:
    """``--map KEY=VALUE`` options: ``max-ram-below-4g=3G`` (sizes with K/M/G suffixes or 0x...)."""
    out: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("max-ram-below-4g",):
            raise MapError(f"--map {item!r}: expected max-ram-below-4g=SIZE")
        m = re.fullmatch(r"(0x[0-9a-fA-F]+|\d+)([KMGkmg]?)", value.strip())
        if not m:
            raise MapError(f"--map {item!r}: {value!r} is not a size")
        n = int(m.group(1), 0) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
        out[key] = n
    return out


def _version(machine: str) -> tuple[int, int] | None:
    m = re.search(r"-(\d+)\.(\d+)$", machine)
    return (int(m.group(1)), int(m.group(2))) if m else None


class GuestMap:
    def __init__(self, machine: str, ranges: list[Range], arch: str) -> None:
        self.machine = machine
        self.arch = arch
        self.ranges = ranges

    def placement(self, block: str) -> list[dict[str, int]]:
        return [{"addr": r.addr, "offset": r.offset, "size": r.size} for r in self.ranges if r.block == block]

    @classmethod
    def from_analysis(cls, an: Analysis, overrides: dict[str, int] | None = None) -> GuestMap:
        overrides = overrides or {}
        if an.configuration is None:
            raise MapError("the stream names no machine type (no configuration record): its memory layout is unknown")
        machine = an.configuration.machine
        sizes = {name: b.used_length for name, b in an.blocks.items()}
        if machine.startswith(("pc-i440fx-", "pc-q35-", "pc-")) or machine in ("pc", "q35"):
            return cls(machine, _x86(an, machine, sizes, overrides), "x86_64")
        for main, (arch, placed) in _FIXED.items():
            if main in sizes:
                return cls(machine, [Range(base, sizes[b], b, 0) for b, base in placed if b in sizes], arch)
        raise MapError(f"machine type {machine!r}: qevm does not know its guest-physical memory layout")


def _device_struct(an: Analysis, vmsd: str) -> Struct | None:
    for d in an.devices:
        if d.struct is not None and d.struct.vmsd_name == vmsd:
            return d.struct
    return None


def _config_bytes(st: Struct) -> bytes | None:
    """The bytes of the first ``pci config`` field in a decoded device (raw or decoded by its blob codec)."""
    for f in st.fields:
        vals = f.value if isinstance(f.value, list) else [f.value]
        if f.type == "pci config" or (f.name.startswith("config") and f.size in (256, 4096)):
            v = vals[0] if vals else None
            if isinstance(v, Struct):
                return encode_struct(v)
            if isinstance(v, bytes | bytearray):
                return bytes(v)
        for v in vals:
            if isinstance(v, Struct):
                found = _config_bytes(v)
                if found is not None:
                    return found
    return None


def _x86(an: Analysis, machine: str, sizes: dict[str, int], overrides: dict[str, int]) -> list[Range]:
    q35 = "q35" in machine
    ram = sizes.get("pc.ram")
    if ram is None:
        raise MapError(f"{machine}: no 'pc.ram' block (memory backends are not mapped yet)")
    ver = _version(machine)
    below_override = overrides.get("max-ram-below-4g")
    if q35:
        lowmem = 0x80000000 if ram >= 0xB0000000 else 0xB0000000
        limit = below_override or 4 * GiB
        lowmem = min(lowmem, limit)
    else:
        limit = below_override or 0xE0000000
        lowmem = limit
        gigabyte_align = ver is None or ver >= (1, 7)
        if ram >= limit and gigabyte_align:
            lowmem = min(lowmem, 0xC0000000)
    below = min(ram, lowmem)
    above = ram - below

    host = _device_struct(an, "mch" if q35 else "I440FX")
    if host is None:
        raise MapError(f"{machine}: no {'MCH' if q35 else 'I440FX'} host bridge state in the stream "
                       "(its PAM registers place 0xc0000-0xfffff)")
    cfg = _config_bytes(host)
    if cfg is None:
        raise MapError("host bridge state carries no PCI configuration space")
    pam_base, smram_reg = (0x90, 0x9D) if q35 else (0x59, 0x72)
    if q35 and cfg[0x9E] & 0x01:
        raise MapError(f"{machine}: TSEG is enabled (ESMRAMC T_EN); its size is not mapped yet")

    # the PCI address space is transparent where no device region sits: RAM below shows through
    pieces: list[Range] = [Range(0, min(below, 0xA0000), "pc.ram", 0)]
    if below > 0xA0000:
        if cfg[smram_reg] & _SMRAM_D_OPEN and not (q35 and cfg[0x9E] & 0x80):
            pieces.append(Range(0xA0000, 0x20000, "pc.ram", 0xA0000))
        elif _has_legacy_vga(an):
            pieces += _vga_chain4(an, sizes)
        else:
            pieces.append(Range(0xA0000, 0x20000, "pc.ram", 0xA0000))
    bios = sizes.get("pc.bios", 0)
    isa = min(bios, 128 << 10)
    for i in range(13):
        start, size = (0xF0000, 0x10000) if i == 0 else (0xC0000 + _PAM_SEG * (i - 1), _PAM_SEG)
        reg = cfg[pam_base + (i + 1) // 2]
        mode = (reg >> (0 if i & 1 else 4)) & 3
        if mode in (1, 3):  # reads go to RAM
            if start + size <= below:
                pieces.append(Range(start, size, "pc.ram", start))
        elif mode == 0:  # the PCI space: pc.rom, the ISA BIOS alias, RAM where neither sits
            for a in range(start, start + size, 0x1000):
                if isa and 0x100000 - isa <= a:
                    pieces.append(Range(a, 0x1000, "pc.bios", bios - 0x100000 + a))
                elif "pc.rom" in sizes and 0xC0000 <= a < 0xC0000 + sizes["pc.rom"]:
                    pieces.append(Range(a, 0x1000, "pc.rom", a - 0xC0000))
                elif a + 0x1000 <= below:
                    pieces.append(Range(a, 0x1000, "pc.ram", a))
    if below > 0x100000:
        pieces.append(Range(0x100000, below - 0x100000, "pc.ram", 0x100000))
    if bios:
        pieces.append(Range(4 * GiB - bios, bios, "pc.bios", 0))
    if above:
        pieces.append(Range(4 * GiB, above, "pc.ram", below))
    pieces += _pci_ram(an, sizes)
    return _merge(sorted(pieces, key=lambda r: r.addr))


# RAM blocks of PCI devices that sit in a memory BAR: block name suffix -> BAR index
# (hw/display/vga-pci.c: the std VGA and bochs-display put their framebuffer in BAR 0)
_BAR_RAM = {"vga.vram": 0}
_PCI_CMD_MEMORY = 0x2


def _bar(cfg: bytes, index: int) -> int | None:
    off = 0x10 + 4 * index
    lo = int.from_bytes(cfg[off:off + 4], "little")
    if lo & 1:  # I/O BAR
        return None
    addr = lo & ~0xF
    if (lo >> 1) & 3 == 2:
        addr |= int.from_bytes(cfg[off + 4:off + 8], "little") << 32
    return addr or None


def _pci_ram(an: Analysis, sizes: dict[str, int]) -> list[Range]:
    """Device RAM in PCI BARs (framebuffers) and enabled expansion-ROM BARs, where the device state puts them."""
    configs: dict[str, bytes] = {}
    for d in an.devices:
        head, sep, _ = d.section.idstr.partition("/")
        if sep and d.struct is not None and head not in configs:
            cfg = _config_bytes(d.struct)
            if cfg is not None:
                configs[head] = cfg
    out: list[Range] = []
    for name, size in sizes.items():
        head, sep, tail = name.partition("/")
        if not sep or head not in configs:
            continue
        cfg = configs[head]
        if not int.from_bytes(cfg[4:6], "little") & _PCI_CMD_MEMORY:
            continue
        if tail.endswith(".rom"):
            rom = int.from_bytes(cfg[0x30:0x34], "little")
            if rom & 1 and rom & ~0x7FF:
                out.append(Range(rom & ~0x7FF, size, name, 0))
        elif tail in _BAR_RAM:
            addr = _bar(cfg, _BAR_RAM[tail])
            if addr is not None and addr + size <= 1 << 52:
                out.append(Range(addr, size, name, 0))
        else:
            raise MapError(f"RAM block {name!r}: qevm does not know which BAR of its device holds it")
    return out


_LEGACY_VGA = ("/vga", "/cirrus_vga", "/virtio-vga", "/qxl-vga")


def _has_legacy_vga(an: Analysis) -> bool:
    """A VGA device decodes 0xa0000-0xbffff (its MMIO window or chain-4 framebuffer alias)."""
    return any(d.section.idstr.endswith(_LEGACY_VGA) or d.section.idstr in ("vga", "cirrus_vga")
               for d in an.devices)


def _vga_chain4(an: Analysis, sizes: dict[str, int]) -> list[Range]:
    """The VGA framebuffer window at 0xa0000 in chain-4 mode (hw/display/vga.c vga_update_memory_access)."""
    for d in an.devices:
        if d.struct is None or not d.section.idstr.endswith("/vga"):
            continue
        doc = to_json(d.struct)
        vga = doc.get("vga", doc)
        sr, gr = vga.get("sr"), vga.get("gr")
        if not (isinstance(sr, str) and isinstance(gr, str)):
            continue
        srb, grb = bytes.fromhex(sr), bytes.fromhex(gr)
        if (srb[2] & 0x0F) != 0x0F or not srb[4] & 0x08:
            return []
        block = d.section.idstr.rsplit("/", 1)[0] + "/vga.vram"
        if block not in sizes:
            raise MapError(f"VGA in chain-4 mode but no {block!r} RAM block")
        mode = (grb[6] >> 2) & 3
        base, size, offset = {0: (0xA0000, 0x20000, 0), 1: (0xA0000, 0x10000, int(vga.get("bank_offset", 0))),
                              2: (0xB0000, 0x8000, 0), 3: (0xB8000, 0x8000, 0)}[mode]
        return [Range(base, size, block, offset)]
    return []


def _merge(pieces: list[Range]) -> list[Range]:
    out: list[Range] = []
    for r in pieces:
        if out:
            p = out[-1]
            if p.block == r.block and p.addr + p.size == r.addr and p.offset + p.size == r.offset:
                out[-1] = Range(p.addr, p.size + r.size, p.block, p.offset)
                continue
        out.append(r)
    return out
