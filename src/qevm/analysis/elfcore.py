"""The ELF core file QEMU's ``dump-guest-memory`` (paging off) writes, built from a stream (``qevm core``).

Layout as QEMU 7.2's dump/dump.c writes it: ELF header, a null section header and the
``.shstrtab`` one, the program headers (one PT_NOTE, then one PT_LOAD per guest-physical RAM
range, p_vaddr = p_paddr), the notes, guest memory range after range, and the section-name string
table at the very end.  Notes per vCPU as target/i386/arch_dump.c writes them: NT_PRSTATUS ("CORE")
for every CPU, then the "QEMU" CPU-state note for every CPU, then the guest's VMCOREINFO note when the
vmcoreinfo device recorded one.  x86 only so far.

From a regular file (read through mmap windows, ``qevm.io.mapped.drive``): a counting pass gives the
memory map and the notes (one more pass keeps the pages of the guest's VMCOREINFO note, when there is one),
then every page goes straight to its final offset.  From a pipe: guest RAM is first written to a sparse
staging file next to the output (bounded memory), then the ranges are copied into place extent by extent,
holes staying holes.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qevm.analysis.extract import BlockSink, RamFiles, discard, output_directory
from qevm.analysis.guestmap import GuestMap, MapError, Range
from qevm.codec.vmsd import to_json
from qevm.errors import DecodeError, UsageError
from qevm.format.events import Event, RamBlock, RamFlag
from qevm.format.parser import Parser
from qevm.io.mapped import WINDOW, drive, map_window, mappable
from qevm.io.reader import Analysis, Device, trailer_schema
from qevm.io.sources import Input, open_input

__all__ = ["CoreResult", "write_core", "x86_notes"]

EM_386 = 3
EM_X86_64 = 62
NT_PRSTATUS = 1
HF_LMA = 1 << 14
PN_XNUM = 0xFFFF
_SHSTRTAB = b"\x00.shstrtab\x00"


@dataclass
class CoreResult:
    path: str
    machine: str
    elf_class: int
    e_machine: int
    loads: list[Range]
    cpus: int
    vmcoreinfo: bool
    size: int


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\x00"
    out = struct.pack("<III", len(n), len(desc), ntype) + n + bytes(-len(n) % 4) + desc + bytes(-len(desc) % 4)
    return out


def _u(v: Any) -> int:
    return int(v) & 0xFFFFFFFFFFFFFFFF


class _Cpu:
    """The x86 register file from a ``cpu`` section's fields (target/i386/machine.c)."""

    def __init__(self, f: dict[str, Any]) -> None:
        self.regs = [_u(r) for r in f["env.regs"]] + [0] * (16 - len(f["env.regs"]))
        self.eip = _u(f["env.eip"])
        self.eflags = _u(f["env.eflags"])
        self.hflags = _u(f.get("env.hflags", 0))
        self.segs = f["env.segs"]
        self.ldt, self.tr, self.gdt, self.idt = f["env.ldt"], f["env.tr"], f["env.gdt"], f["env.idt"]
        self.cr = [_u(f.get(f"env.cr[{i}]", 0)) for i in range(5)]
        self.kernel_gs_base = _u(f.get("env.kernelgsbase", 0))


_ES, _CS, _SS, _DS, _FS, _GS = range(6)
_EAX, _ECX, _EDX, _EBX, _ESP, _EBP, _ESI, _EDI = range(8)


def _prstatus64(c: _Cpu, pid: int) -> bytes:
    r = c.regs
    sel = [int(c.segs[i]["selector"]) for i in range(6)]
    regs = [r[15], r[14], r[13], r[12], r[_EBP], r[_EBX], r[11], r[10], r[9], r[8], r[_EAX], r[_ECX], r[_EDX],
            r[_ESI], r[_EDI], 0, c.eip, sel[_CS], c.eflags, r[_ESP], sel[_SS], _u(c.segs[_FS]["base"]),
            _u(c.segs[_GS]["base"]), sel[_DS], sel[_ES], sel[_FS], sel[_GS]]
    return bytes(32) + struct.pack("<I", pid) + bytes(76) + struct.pack("<27Q", *regs) + bytes(8)


def _prstatus32(c: _Cpu, pid: int) -> bytes:
    r = [x & 0xFFFFFFFF for x in c.regs]
    sel = [int(c.segs[i]["selector"]) & 0xFFFF for i in range(6)]
    regs = struct.pack("<7I8H2I2H2I2H", r[_EBX], r[_ECX], r[_EDX], r[_ESI], r[_EDI], r[_EBP], r[_EAX],
                       sel[_DS], 0, sel[_ES], 0, sel[_FS], 0, sel[_GS], 0, 0, c.eip & 0xFFFFFFFF, sel[_CS], 0,
                       c.eflags & 0xFFFFFFFF, r[_ESP], sel[_SS], 0)
    return bytes(24) + struct.pack("<I", pid) + bytes(44) + regs + bytes(4)


def _segment(s: dict[str, Any]) -> bytes:
    return struct.pack("<IIIIQ", int(s["selector"]) & 0xFFFFFFFF, int(s["limit"]) & 0xFFFFFFFF,
                       int(s["flags"]) & 0xFFFFFFFF, 0, _u(s["base"]))


def _qemu_cpu_state(c: _Cpu) -> bytes:
    r = c.regs
    body = struct.pack("<18Q", r[_EAX], r[_EBX], r[_ECX], r[_EDX], r[_ESI], r[_EDI], r[_ESP], r[_EBP],
                       r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15], c.eip, c.eflags)
    body += b"".join(_segment(c.segs[i]) for i in (_CS, _DS, _ES, _FS, _GS, _SS))
    body += b"".join(_segment(s) for s in (c.ldt, c.tr, c.gdt, c.idt))
    body += struct.pack("<5Q", *c.cr) + struct.pack("<Q", c.kernel_gs_base)
    return struct.pack("<II", 1, 8 + len(body)) + body


def _cpus(an: Analysis) -> list[_Cpu]:
    found: list[tuple[int, Device]] = []
    for d in an.devices:
        if d.section.idstr == "cpu" and d.struct is not None:
            found.append((d.section.instance_id, d))
    out = []
    for _, d in sorted(found, key=lambda t: t[0]):
        assert d.struct is not None
        f = to_json(d.struct)
        if "env.regs" not in f:
            raise UsageError(f"cpu section (instance {d.section.instance_id}) has no x86 registers")
        out.append(_Cpu(f))
    if not out:
        bad = [d for d in an.devices if d.section.idstr == "cpu"]
        why = " (its fields could not be decoded: no vmdesc?)" if bad else ""
        raise UsageError(f"the stream carries no CPU state{why}: a core file needs the vCPU registers")
    return out


EM_AARCH64 = 183
EM_RISCV = 243
NT_PRFPREG = 2


def _cpu_fields(an: Analysis) -> list[dict[str, Any]]:
    found = sorted(((d.section.instance_id, d) for d in an.devices if d.section.idstr == "cpu"),
                   key=lambda t: t[0])
    if not found:
        raise UsageError("the stream carries no CPU state: a core file needs the vCPU registers")
    out = []
    for _, d in found:
        if d.struct is None:
            raise UsageError(f"cpu section (instance {d.section.instance_id}) could not be decoded "
                             f"({d.error or 'no vmdesc describes it'}): its registers are unknown")
        out.append(to_json(d.struct))
    return out


def aarch64_notes(cpus: list[dict[str, Any]]) -> bytes:
    """NT_PRSTATUS and NT_PRFPREG per vCPU (target/arm/arch_dump.c), little-endian (SCTLR_EL1.EE clear)."""
    out = b""
    for i, f in enumerate(cpus):
        x = [_u(v) for v in f["env.xregs"]]
        pstate = _u(f["cpsr"])
        if pstate & 0x10:  # AArch32 state: QEMU reports the CPSR and no SP
            raise UsageError("vCPU in AArch32 state: qevm core does not build that note yet")
        regs = struct.pack("<34Q", *x[:31], x[31], _u(f["env.pc"]), pstate)
        out += _note(b"CORE", NT_PRSTATUS, bytes(32) + struct.pack("<I", i + 1) + bytes(76) + regs
                     + struct.pack("<I", 1) + bytes(4))
        vfp = f.get("cpu/vfp", {})
        vregs = []
        for n in range(32):
            q = vfp.get(f"env.vfp.zregs[{n}].d", [0, 0])
            vregs += [_u(q[0]), _u(q[1])]
        fpscr = int(vfp.get("fpscr", 0))
        out += _note(b"CORE", NT_PRFPREG, struct.pack("<64QII", *vregs, fpscr & 0xF800009F, fpscr & 0x07FF9F00)
                     + bytes(8))
    return out


EM_S390 = 22


def _flat(f: dict[str, Any]) -> dict[str, Any]:
    """Fields with the subsections' fields merged in (cpu/fpu, cpu/vregs, ...)."""
    out = dict(f)
    for k, v in f.items():
        if k.startswith("cpu/") and isinstance(v, dict):
            out.update(v)
    return out


def _be_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\x00"
    return struct.pack(">III", len(n), len(desc), ntype) + n + bytes(-len(n) % 4) + desc + bytes(-len(desc) % 4)


def s390x_notes(cpus: list[dict[str, Any]]) -> bytes:
    """Per vCPU: CORE NT_PRSTATUS, NT_FPREGSET, then LINUX prefix, control registers, CPU timer, clock
    comparator, TOD programmable register, vector registers low/high halves, guarded-storage control block
    (target/s390x/arch_dump.c), big-endian; the prstatus pid stays in host (little-endian) order as QEMU
    writes it."""
    out = b""
    for i, raw in enumerate(cpus):
        f = _flat(raw)

        def vr(n: int, j: int, f: dict[str, Any] = f) -> int:
            return _u(f.get(f"env.vregs[{n}][{j}]", 0))
        regs = struct.pack(">18Q16I", _u(f["env.psw.mask"]), _u(f["env.psw.addr"]), *[_u(r) for r in f["env.regs"]],
                           *[int(a) & 0xFFFFFFFF for a in f["env.aregs"]])
        out += _be_note(b"CORE", NT_PRSTATUS, bytes(32) + struct.pack("<I", i + 1) + bytes(76) + regs + bytes(16))
        out += _be_note(b"CORE", NT_PRFPREG, struct.pack(">II16Q", int(f.get("env.fpc", 0)) & 0xFFFFFFFF, 0,
                                                         *[vr(n, 0) for n in range(16)]))
        gscb = f.get("env.gscb", [0, 0, 0, 0])
        out += _be_note(b"LINUX", 0x305, struct.pack(">I", int(f["env.psa"]) & 0xFFFFFFFF))
        out += _be_note(b"LINUX", 0x304, struct.pack(">16Q", *[_u(c) for c in f["env.cregs"]]))
        out += _be_note(b"LINUX", 0x301, struct.pack(">Q", _u(f["env.cputm"])))
        out += _be_note(b"LINUX", 0x302, struct.pack(">Q", _u(f["env.ckc"])))
        out += _be_note(b"LINUX", 0x303, struct.pack(">I", int(f["env.todpr"]) & 0xFFFFFFFF))
        out += _be_note(b"LINUX", 0x309, struct.pack(">16Q", *[vr(n, 1) for n in range(16)]))
        out += _be_note(b"LINUX", 0x30A, struct.pack(">32Q", *[vr(n, j) for n in range(16, 32) for j in (0, 1)]))
        out += _be_note(b"LINUX", 0x30B, struct.pack(">4Q", *[_u(g) for g in gscb]))
    return out


EM_PPC64 = 21
_LPCR_ILE = 1 << 25


def ppc64_endian(cpus: list[dict[str, Any]]) -> str:
    """Little-endian when the first vCPU takes interrupts little-endian (LPCR[ILE], pseries: no HV mode)."""
    spr = cpus[0].get("env.spr") or []
    return "<" if len(spr) > 318 and _u(spr[318]) & _LPCR_ILE else ">"


def ppc64_notes(cpus: list[dict[str, Any]], e: str) -> bytes:
    """Per vCPU: NT_PRSTATUS, NT_PRFPREG, NT_PPC_VMX, NT_PPC_VSX, NT_PPC_SPE (target/ppc/arch_dump.c)."""
    out = b""

    def note(ntype: int, desc: bytes) -> bytes:
        return struct.pack(e + "III", 5, len(desc), ntype) + b"CORE\x00\x00\x00\x00" + desc

    for raw in cpus:
        f = _flat(raw)
        spr = [_u(x) for x in f["env.spr"]]
        cr = 0
        for i, c in enumerate(f["env.crf"][:8]):
            cr |= (int(c) & 15) << (4 * (7 - i))
        regs = [*(_u(g) for g in f["env.gpr"]), _u(f["env.nip"]), _u(f["env.msr"]), 0, spr[9], spr[8], spr[1], cr,
                0, 0, 0, 0, 0]
        out += note(NT_PRSTATUS, bytes(112) + struct.pack(e + "44Q", *regs) + bytes(40))
        fpu = raw.get("cpu/fpu", {})
        fprs = [_u(x) for x in fpu.get("env.vsr", [0] * 32)]
        out += note(NT_PRFPREG, struct.pack(e + "33Q", *fprs, _u(fpu.get("env.fpscr", 0))))
        alt = raw.get("cpu/altivec", {})
        vmx = bytearray()
        for h in alt.get("env.vsr", ["00" * 16] * 32):
            # the stream holds be64(u64[0]) + be64(u64[1]); QEMU's note holds the two halves as the dump's
            # endianness makes them on a little-endian host
            b = bytes.fromhex(h) if isinstance(h, str) else bytes(16)
            vmx += b[8:] + b[:8] if e == ">" else b[:8][::-1] + b[8:][::-1]
        vscr = bytearray(16)
        vscr[12:16] = struct.pack(e + "I", int(alt.get("vscr", 0)) & 0xFFFFFFFF)
        out += note(0x100, bytes(vmx) + bytes(vscr) + bytes(16))
        vsx = raw.get("cpu/vsx", {}).get("env.vsr", ["00" * 8] * 32)
        out += note(0x102, b"".join(struct.pack(e + "Q", int(h, 16) if isinstance(h, str) else _u(h)) for h in vsx))
        out += note(0x101, bytes(128) + struct.pack(e + "QI", _u(f.get("env.spe_acc", 0)), 0))
    return out


def riscv64_notes(cpus: list[dict[str, Any]]) -> bytes:
    """NT_PRSTATUS per vCPU (target/riscv/arch_dump.c): pc, then x1..x31."""
    out = b""
    for i, f in enumerate(cpus):
        gpr = [_u(v) for v in f["env.gpr"]]
        regs = struct.pack("<32Q", _u(f["env.pc"]), *gpr[1:32])
        out += _note(b"CORE", NT_PRSTATUS, bytes(32) + struct.pack("<I", i + 1) + bytes(76) + regs + bytes(8))
    return out


def x86_notes(cpus: list[_Cpu], lma: bool) -> bytes:
    prs = [_note(b"CORE", NT_PRSTATUS, (_prstatus64 if lma else _prstatus32)(c, i + 1)) for i, c in enumerate(cpus)]
    qemu = [_note(b"QEMU", 0, _qemu_cpu_state(c)) for c in cpus]
    return b"".join(prs + qemu)


class _Staging:
    """All RAM blocks in one sparse temporary file, each at a 2 MiB aligned base."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.base: dict[str, int] = {}
        self.end = 0

    def open_block(self, name: str, size: int, page_size: int) -> BlockSink:
        self.base[name] = self.end
        self.end += (size + (2 << 20) - 1) // (2 << 20) * (2 << 20)
        os.ftruncate(self.fd, self.end)
        return BlockSink(self.fd, size, page_size, self.base[name])


def _extents(fd: int, start: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data (non-hole) parts of fd[start:start+length]."""
    end = start + length
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole up to the end of the file
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def _copy(src: int, dst: int, at: int, n: int, to: int) -> None:
    while n:
        try:
            k = os.copy_file_range(src, dst, n, at, to)
        except OSError:
            k = 0
        if k <= 0:
            chunk = os.pread(src, min(n, 1 << 20), at)
            if not chunk:
                raise DecodeError("staging file ended early")
            k = os.pwrite(dst, chunk, to)
        at += k
        to += k
        n -= k


def _vmcoreinfo(an: Analysis, read: Any) -> bytes | None:
    """The guest's VMCOREINFO ELF note, read from guest memory where the vmcoreinfo device says it is."""
    for d in an.devices:
        if d.section.idstr == "vmcoreinfo" and d.struct is not None:
            f = to_json(d.struct)
            if not f.get("has_vmcoreinfo") or f.get("vmcoreinfo.guest_format") != 1:
                return None
            size, paddr = int(f.get("vmcoreinfo.size", 0)), int(f.get("vmcoreinfo.paddr", 0))
            if size < 12 or size > 1 << 20:
                return None
            raw = read(paddr, size)
            if raw is None:
                return None
            namesz, descsz, _ = struct.unpack("<III", raw[:12])
            n = 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
            if n > size:
                return None
            return bytes(raw[:n])
    return None


def _arch_notes(an: Analysis, gmap: GuestMap, loads: list[Range]) -> tuple[bytes, int, bool, str, int]:
    """(CPU notes, e_machine, ELF64?, endianness, vCPU count) as QEMU picks them for this target."""
    ncpu = 0
    endian = "<"
    if gmap.arch == "x86_64":
        cpus = _cpus(an)
        ncpu = len(cpus)
        lma = bool(cpus[0].hflags & HF_LMA)
        notes = x86_notes(cpus, lma)
        e_machine = EM_X86_64 if lma else EM_386
        elf64 = lma or any(r.addr + r.size > 0xFFFFFFFF for r in loads)  # QEMU compares the exclusive end
    elif gmap.arch == "ppc64":
        fields = _cpu_fields(an)
        ncpu = len(fields)
        endian = ppc64_endian(fields)
        notes, e_machine, elf64 = ppc64_notes(fields, endian), EM_PPC64, True
    elif gmap.arch in ("aarch64", "riscv64", "s390x"):
        fields = _cpu_fields(an)
        ncpu = len(fields)
        build, e_machine = {"aarch64": (aarch64_notes, EM_AARCH64), "riscv64": (riscv64_notes, EM_RISCV),
                            "s390x": (s390x_notes, EM_S390)}[gmap.arch]
        notes = build(fields)
        elf64 = True
        endian = ">" if gmap.arch == "s390x" else "<"
    else:
        raise MapError(f"machine {gmap.machine!r} ({gmap.arch}): qevm core does not write its CPU notes yet "
                       "(x86, aarch64, riscv64, s390x and ppc64 only)")
    return notes, e_machine, elf64, endian, ncpu


def write_core(source: str | Input, out_path: str, *, overrides: dict[str, int] | None = None,
               snapshot: str | None = None, page_size: int | None = None) -> CoreResult:
    """Write the ELF core of ``source``'s guest to ``out_path`` (temp name, renamed when complete)."""
    directory = output_directory(out_path)
    if isinstance(source, str):
        done = _write_core_direct(source, out_path, directory, overrides, snapshot, page_size)
        if done is not None:
            return done
    inp = open_input(source, snapshot) if isinstance(source, str) else source
    sfd, stage_path = tempfile.mkstemp(prefix=".qevm-core-", suffix=".stage", dir=directory)
    os.unlink(stage_path)
    ofd, tmp = tempfile.mkstemp(prefix=".qevm-", suffix=".part", dir=directory)
    try:
        schema, trailer_page = trailer_schema(inp)
        parser = Parser(schema=schema, page_size=page_size or trailer_page, count_pages=True, keep_raw=False,
                        file_offset=inp.file_offset)
        an = Analysis(schema=schema, page_size=lambda: parser.page_size or 4096)
        staging = _Staging(sfd)
        rf = RamFiles(staging.open_block, inp, lambda: parser.page_size or 4096)
        rf.attach(parser)

        drive(parser, inp, rf.chain(an.handle), skip_regions=inp.seekable)
        for sink in rf.sinks.values():
            if sink is not None:
                sink.flush()
        if not an.blocks:
            raise UsageError(f"{inp.name}: the stream carries no RAM: nothing to put in a core file")
        an.decode_devices(strict=False)
        gmap = GuestMap.from_analysis(an, overrides)
        loads = [r for r in gmap.ranges if r.size]
        notes, e_machine, elf64, endian, ncpu = _arch_notes(an, gmap, loads)

        def read_phys(addr: int, n: int) -> bytes | None:
            for r in loads:
                if r.addr <= addr and addr + n <= r.addr + r.size:
                    data = os.pread(sfd, n, staging.base[r.block] + r.offset + addr - r.addr)
                    return data + bytes(n - len(data))
            return None

        guest_note = _vmcoreinfo(an, read_phys)
        if guest_note:
            notes += guest_note
        size = _write_elf(ofd, sfd, staging, loads, notes, elf64, e_machine, endian)
        os.fsync(ofd)
        os.close(ofd)
        ofd = -1
        os.replace(tmp, out_path)
        tmp = ""
        return CoreResult(out_path, gmap.machine, 2 if elf64 else 1, e_machine, loads, ncpu,
                          guest_note is not None, size)
    except OSError as e:
        raise UsageError(f"cannot write {out_path}: {e.strerror}") from None
    finally:
        os.close(sfd)
        if ofd >= 0:
            os.close(ofd)
        if tmp:
            discard(tmp)
        if isinstance(source, str):
            inp.close()


class _SegmentSink(BlockSink):
    """A RAM block whose pages go straight to their places in the core file: one inner sink per guest-physical
    range the block backs (a page in two ranges, such as the ISA BIOS alias, is written to both; a page in
    none, such as the VGA window hole, is dropped)."""

    def __init__(self, fd: int, size: int, page_size: int, segs: list[tuple[int, int, int]]) -> None:
        super().__init__(fd, size, page_size)
        self.segs = [(lo, hi, BlockSink(fd, size, page_size, base)) for lo, hi, base in segs]

    def _at(self, addr: int) -> list[BlockSink]:
        return [sk for lo, hi, sk in self.segs if lo <= addr < hi]

    def put_view(self, addr: int, view: memoryview) -> None:
        for sk in self._at(addr):
            sk.put_view(addr, view)

    def flush_views(self) -> None:
        for _, _, sk in self.segs:
            sk.flush_views()

    def _spans(self, addr: int, n: int) -> Iterator[tuple[BlockSink, int, int]]:
        """(sink, first, end) for each range: pages first..end-1 of the n from addr lie in it."""
        ps = self.page_size
        for lo, hi, sk in self.segs:
            first = max(0, -(-(lo - addr) // ps))
            end = min(n, -(-(hi - addr) // ps))
            if first < end:
                yield sk, first, end

    def put_run(self, addr: int, views: list[memoryview]) -> None:
        for sk, first, end in self._spans(addr, len(views)):
            sk.put_run(addr + first * self.page_size, views[first:end])

    def zero_run(self, addr: int, n: int) -> None:
        for sk, first, end in self._spans(addr, n):
            sk.zero_run(addr + first * self.page_size, end - first)

    def put(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        ps = self.page_size
        for sk, first, end in self._spans(addr, -(-len(data) // ps)):
            sk.put(addr + first * ps, data[first * ps:end * ps])

    def zero(self, addr: int, fill: int) -> None:
        for sk in self._at(addr):
            sk.zero(addr, fill)

    def get(self, addr: int) -> bytes:
        sks = self._at(addr)
        return sks[0].get(addr) if sks else bytes(self.page_size)

    def flush(self) -> None:
        for _, _, sk in self.segs:
            sk.flush()


_LOG_MAX = 1 << 16  # run-sink calls the counting pass logs for the page pass to replay (64 bytes each: 4 MiB)
_PAGE, _ZERO = int(RamFlag.PAGE), int(RamFlag.ZERO)


def _first_pass(inp: Input, page_size: int | None) -> tuple[Analysis, array[int] | None, list[str]]:
    """``read_stream(inp, page_size=page_size, strict=False)``, reading a regular file through ``mmap`` windows
    (``qevm.io.mapped.drive``): the pages are only counted, so this pass costs the parse alone.  It also
    logs the run sink's calls (kind, address, count, payload offset, length, stride, record offset, block
    index each) when they are runs of data and zero pages only, at most ``_LOG_MAX`` of them, and no block is
    mapped-ram or announced twice: the page pass then replays the log instead of parsing again (None: it
    cannot)."""
    schema, trailer_page = trailer_schema(inp)
    parser = Parser(schema=schema, page_size=page_size or trailer_page, count_pages=True, keep_raw=False,
                    file_offset=inp.file_offset)
    an = Analysis(page_size=lambda: parser.page_size or 4096)
    log: array[int] | None = array("q")
    names: list[str] = []
    index: dict[str, int] = {}

    def record(block: str, kind: int, addr: int, count: int, view: memoryview, pos: int, length: int,
               stride: int, offset: int) -> None:
        nonlocal log
        if log is None:
            return
        if kind not in (_PAGE, _ZERO) or len(log) >= 8 * _LOG_MAX:
            log = None
            parser.run_sink = None
            return
        i = index.get(block)
        if i is None:
            i = index[block] = len(names)
            names.append(block)
        log.extend((kind, addr, count, parser.buffer_offset + pos, length, stride, offset, i))

    def handle(ev: Event) -> None:
        nonlocal log
        if type(ev) is RamBlock:
            assert isinstance(ev, RamBlock)
            if ev.mapped is not None or (ev.name in an.blocks and an.blocks[ev.name].used_length != ev.used_length):
                log = None
                parser.run_sink = None
        an.handle(ev)
    parser.run_sink = record
    drive(parser, inp, handle)
    an.size = parser.offset
    an.stream_page_size = parser.page_size
    an.decode_devices(strict=False)
    return an, log, names


def _replay(inp: Input, log: array[int], names: list[str], sinks: dict[str, BlockSink | None]) -> None:
    """The page pass from the counting pass's log: each logged run goes to ``RamFiles.run`` with a view of the
    input mapped around it (``mmap`` windows as ``drive`` maps them), nothing is parsed again."""
    fd = inp.file.fileno()
    size = os.fstat(fd).st_size
    rf = RamFiles(lambda name, size, ps: None, inp, lambda: 4096)
    rf.sinks = sinks
    gran = mmap.ALLOCATIONGRANULARITY
    view = memoryview(b"")
    at = end = 0
    try:
        for k in range(0, len(log), 8):
            kind, addr, count, src, length, stride, offset, i = log[k:k + 8]
            last = src + (count - 1) * stride + length
            if src < at or last > end:
                view.release()
                at = src - src % gran
                end = min(size, max(at + WINDOW, last))
                view = memoryview(map_window(fd, at, end, size))
            rf.run(names[i], kind, addr, count, view, src - at, length, stride, offset)
    finally:
        view.release()


def _pages_pass(source: str, snapshot: str | None, page_size: int | None, fd: int,
                segs: dict[str, list[tuple[int, int, int]]], replay: tuple[array[int], list[str], int] | None = None,
                blocks: dict[str, int] | None = None) -> None:
    """One pass over the stream writing the pages of ``segs`` (block -> (start, end, file offset - start) each)
    to ``fd`` (``_SegmentSink``); every other page is only parsed.  ``replay``: the counting pass's log, its
    block names and page size, with ``blocks`` (name -> size): the pages are written from the log, with no
    parse."""
    inp = open_input(source, snapshot)
    try:
        if replay is not None and blocks is not None and mappable(inp):
            log, names, ps = replay
            sinks: dict[str, BlockSink | None] = {
                name: _SegmentSink(fd, size, ps, segs[name]) if name in segs else None for name, size in blocks.items()}
            _replay(inp, log, names, sinks)
        else:
            schema, trailer_page = trailer_schema(inp)
            parser = Parser(schema=schema, page_size=page_size or trailer_page, count_pages=True, keep_raw=False,
                            file_offset=inp.file_offset)

            def open_block(name: str, size: int, ps: int) -> BlockSink | None:
                return _SegmentSink(fd, size, ps, segs[name]) if name in segs else None
            rf = RamFiles(open_block, inp, lambda: parser.page_size or 4096)
            rf.attach(parser)
            drive(parser, inp, rf.chain(lambda ev: None), skip_regions=inp.seekable)
            sinks = rf.sinks
        for sink in sinks.values():
            if sink is not None:
                sink.flush()
    finally:
        inp.close()


def _read_guest(source: str, snapshot: str | None, page_size: int | None, loads: list[Range], directory: str,
                addr: int, n: int) -> bytes | None:
    """``n`` bytes of guest-physical memory from ``addr`` (None: not in one RAM range), by a pass that keeps only
    the pages holding them (in a small temporary file)."""
    for r in loads:
        if r.addr <= addr and addr + n <= r.addr + r.size:
            at = r.offset + addr - r.addr
            lo = at - at % (1 << 20)  # page-aligned whatever the page size
            try:
                fd, path = tempfile.mkstemp(prefix=".qevm-core-", suffix=".note", dir=directory)
                try:
                    os.unlink(path)
                    _pages_pass(source, snapshot, page_size, fd, {r.block: [(lo, at + n, -lo)]})
                    data = os.pread(fd, n, at - lo)
                finally:
                    os.close(fd)
            except OSError as e:
                raise UsageError(f"cannot write a temporary file in {directory}: {e.strerror}") from None
            return data + bytes(n - len(data))
    return None


def _write_core_direct(source: str, out_path: str, directory: str, overrides: dict[str, int] | None,
                       snapshot: str | None, page_size: int | None) -> CoreResult | None:
    """A seekable stream: a counting first pass gives the memory map and the notes (the guest's VMCOREINFO note,
    whose size is in guest memory, from one more pass keeping only its pages), the last writes every page
    straight to its final offset.  None: not seekable, use the staging path."""
    first = open_input(source, snapshot)
    try:
        if not first.seekable:
            return None
        an, log, names = _first_pass(first, page_size)
    finally:
        first.close()
    if not an.blocks:
        raise UsageError(f"{source}: the stream carries no RAM: nothing to put in a core file")
    gmap = GuestMap.from_analysis(an, overrides)
    loads = [r for r in gmap.ranges if r.size]
    notes, e_machine, elf64, endian, ncpu = _arch_notes(an, gmap, loads)
    guest_note = _vmcoreinfo(an, lambda addr, n: _read_guest(source, snapshot, page_size, loads, directory, addr, n))
    if guest_note:
        notes += guest_note
    head, mem_off, strtab_off = _elf_head(loads, notes, elf64, e_machine, endian)
    segs: dict[str, list[tuple[int, int, int]]] = {}
    off = mem_off
    for r in loads:
        segs.setdefault(r.block, []).append((r.offset, r.offset + r.size, off - r.offset))
        off += r.size
    ofd, tmp = tempfile.mkstemp(prefix=".qevm-", suffix=".part", dir=directory)
    try:
        os.ftruncate(ofd, strtab_off + len(_SHSTRTAB))
        os.pwrite(ofd, head, 0)
        replay = (log, names, an.stream_page_size or 4096) if log is not None else None
        _pages_pass(source, snapshot, page_size, ofd, segs, replay, {n: b.used_length for n, b in an.blocks.items()})
        os.pwrite(ofd, _SHSTRTAB, strtab_off)
        os.fsync(ofd)
        os.close(ofd)
        ofd = -1
        os.replace(tmp, out_path)
        tmp = ""
        return CoreResult(out_path, gmap.machine, 2 if elf64 else 1, e_machine, loads, ncpu, guest_note is not None,
                          strtab_off + len(_SHSTRTAB))
    except OSError as e:
        raise UsageError(f"cannot write {out_path}: {e.strerror}") from None
    finally:
        if ofd >= 0:
            os.close(ofd)
        if tmp:
            discard(tmp)


def _write_elf(ofd: int, sfd: int, staging: _Staging, loads: list[Range], notes: bytes, elf64: bool,
               e_machine: int, endian: str = "<") -> int:
    head, mem_off, strtab_off = _elf_head(loads, notes, elf64, e_machine, endian)
    os.ftruncate(ofd, strtab_off + len(_SHSTRTAB))
    os.pwrite(ofd, head, 0)
    off = mem_off
    for r in loads:
        start = staging.base[r.block] + r.offset
        for at, n in _extents(sfd, start, r.size):
            _copy(sfd, ofd, at, n, off + at - start)
        off += r.size
    os.pwrite(ofd, _SHSTRTAB, strtab_off)
    return strtab_off + len(_SHSTRTAB)


def _elf_head(loads: list[Range], notes: bytes, elf64: bool, e_machine: int,
              endian: str) -> tuple[bytes, int, int]:
    """ELF header, section headers, program headers and notes; (those bytes, memory offset, .shstrtab offset)."""
    nph = 1 + len(loads)
    if elf64:
        ehsize, shsize, phsize = 64, 64, 56
    else:
        ehsize, shsize, phsize = 52, 40, 32
    shoff = ehsize
    phoff = shoff + 2 * shsize
    note_off = phoff + nph * phsize
    mem_off = note_off + len(notes)
    total_mem = sum(r.size for r in loads)
    strtab_off = mem_off + total_mem
    ident = b"\x7fELF" + bytes((2 if elf64 else 1, 2 if endian == ">" else 1, 1)) + bytes(9)
    phnum = min(nph, PN_XNUM)
    # e_ehsize: QEMU 7.2 stores 8 here (the size of a pointer, not of the header)
    if elf64:
        eh = ident + struct.pack(endian + "HHIQQQIHHHHHH", 4, e_machine, 1, 0, phoff, shoff, 0, 8, phsize, phnum,
                                 shsize, 2, 1)
        sh0 = struct.pack(endian + "IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, nph if nph >= PN_XNUM else 0, 0, 0)
        # QEMU 7.2/10.0 fill the .shstrtab section header in host (little-endian) order whatever the target
        sh1 = struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, strtab_off, len(_SHSTRTAB), 0, 0, 0, 0)
        ph = [struct.pack(endian + "IIQQQQQQ", 4, 0, note_off, 0, 0, len(notes), len(notes), 0)]
    else:
        eh = ident + struct.pack(endian + "HHIIIIIHHHHHH", 4, e_machine, 1, 0, phoff, shoff, 0, 8, phsize, phnum,
                                 shsize, 2, 1)
        sh0 = struct.pack(endian + "10I", 0, 0, 0, 0, 0, 0, 0, nph if nph >= PN_XNUM else 0, 0, 0)
        sh1 = struct.pack("<10I", 1, 3, 0, 0, strtab_off, len(_SHSTRTAB), 0, 0, 0, 0)
        ph = [struct.pack(endian + "8I", 4, note_off, 0, 0, len(notes), len(notes), 0, 0)]
    off = mem_off
    for r in loads:
        if elf64:
            ph.append(struct.pack(endian + "IIQQQQQQ", 1, 0, off, r.addr, r.addr, r.size, r.size, 0))
        else:
            ph.append(struct.pack(endian + "8I", 1, off, r.addr, r.addr, r.size, r.size, 0, 0))
        off += r.size
    head = eh + sh0 + sh1 + b"".join(ph) + notes
    assert len(head) == mem_off
    return head, mem_off, strtab_off
