"""``qevm core``: the ELF core file built from a stream equals the one QEMU's own dump-guest-memory
(paging off) wrote of the same paused guest (scripts/fixtures/gen_memdump.py): same ELF and program
headers, every page at the same guest-physical address, every note byte; volatility3 finds the same
Linux banners in both."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import FIXTURES, fixture_meta, require_fixture

from qevm.analysis.elfcore import write_core
from qevm.analysis.guestmap import parse_map_options

SRC = str(Path(__file__).resolve().parent.parent / "src")
CASES = ["memdump-pc-7.2", "memdump-pc-big-7.2", "memdump-q35-big-7.2", "memdump-pc-10.0", "memdump-aarch64-7.2",
         "memdump-riscv64-7.2", "memdump-s390x-7.2", "memdump-ppc64-7.2", "memdump-pc-lowmem-7.2",
         "memdump-pc-reset-7.2"]


def _elf(path: Path) -> tuple[bytes, list[tuple[int, ...]], bytes]:
    with open(path, "rb") as f:
        eh = f.read(64)
        assert eh[:4] == b"\x7fELF" and eh[4] == 2
        e = "<" if eh[5] == 1 else ">"
        phoff, = struct.unpack_from(e + "Q", eh, 32)
        phnum, = struct.unpack_from(e + "H", eh, 56)
        f.seek(phoff)
        ph = [struct.unpack(e + "IIQQQQQQ", f.read(56)) for _ in range(phnum)]
        assert ph[0][0] == 4  # PT_NOTE first
        f.seek(ph[0][2])
        notes = f.read(ph[0][5])
        return eh, ph, notes


def _notes(blob: bytes, e: str = "<") -> list[tuple[bytes, int, bytes]]:
    out, pos = [], 0
    while pos < len(blob):
        nsz, dsz, typ = struct.unpack_from(e + "III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + (nsz + 3) // 4 * 4
        out.append((blob[name_at:name_at + nsz], typ, blob[desc_at:desc_at + dsz]))
        pos = desc_at + (dsz + 3) // 4 * 4
    return out


def _all_zero_from(fd: int, at: int, n: int) -> bool:
    try:
        return os.lseek(fd, at, os.SEEK_DATA) >= at + n
    except OSError:
        return True


def _same_range(a: Path, b: Path, off_a: int, off_b: int, size: int, paddr: int) -> None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < size:
            n = min(4 << 20, size - pos)
            if _all_zero_from(fa.fileno(), off_a + pos, n) and _all_zero_from(fb.fileno(), off_b + pos, n):
                pos += n
                continue
            x = os.pread(fa.fileno(), n, off_a + pos)
            y = os.pread(fb.fileno(), n, off_b + pos)
            if x != y:
                bad = next(i for i in range(0, n, 4096) if x[i:i + 4096] != y[i:i + 4096])
                pytest.fail(f"guest-physical page 0x{paddr + pos + bad:x} differs")
            pos += n


@pytest.mark.parametrize("name", CASES)
def test_core_equals_qemu_dump(name: str, tmp_path: Path) -> None:
    stream = require_fixture(name)
    theirs = FIXTURES / f"{name}.core"
    ours = tmp_path / "ours.core"
    meta = fixture_meta(stream)  # what the stream cannot tell (max-ram-below-4g) comes as --map would give it
    res = write_core(str(stream), str(ours), overrides=parse_map_options(meta.get("map", [])))
    eh_a, ph_a, notes_a = _elf(ours)
    eh_b, ph_b, notes_b = _elf(theirs)
    assert eh_a == eh_b
    assert ph_a == ph_b
    e = "<" if eh_b[5] == 1 else ">"
    na, nb = _notes(notes_a, e), _notes(notes_b, e)
    assert [(n, t) for n, t, _ in na] == [(n, t) for n, t, _ in nb]
    for (n, t, da), (_, _, db) in zip(na, nb, strict=True):
        assert da == db, f"note {n!r} type {t} differs"
    assert notes_a == notes_b
    for p in ph_a[1:]:
        _same_range(ours, theirs, p[2], p[2], p[5], p[3])
    assert ours.stat().st_size == theirs.stat().st_size
    with open(ours, "rb") as f, open(theirs, "rb") as g:  # the trailing .shstrtab
        f.seek(-64, 2)
        g.seek(-64, 2)
        assert f.read() == g.read()
    assert res.cpus == (2 if name in ("memdump-pc-7.2", "memdump-pc-10.0", "memdump-aarch64-7.2") else 1)
    assert ours.stat().st_blocks * 512 < 512 << 20  # zero pages stay holes


@pytest.mark.parametrize("name", ["memdump-pc-7.2", "memdump-q35-big-7.2"])
def test_staging_path_equals_direct_path(name: str, tmp_path: Path) -> None:
    """From a pipe (one pass: RAM staged in a sparse file, then copied into place) qevm writes the same
    core as from the file (two passes: pages written straight to their offsets)."""
    stream = require_fixture(name)
    env = {**os.environ, "PYTHONPATH": SRC}
    with open(stream, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "qevm", "core", "-", "-o", str(tmp_path / "pipe.core")], stdin=f,
                           capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    write_core(str(stream), str(tmp_path / "file.core"))
    assert _elf(tmp_path / "pipe.core") == _elf(tmp_path / "file.core")
    _, ph, _ = _elf(tmp_path / "file.core")
    for p in ph[1:]:
        _same_range(tmp_path / "pipe.core", tmp_path / "file.core", p[2], p[2], p[5], p[3])


def test_core_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qevm", "core", *a], capture_output=True, text=True, env=env,
                              timeout=300)
    nocpu = tmp_path / "nocpu.mig"  # the stream without its cpu sections' fields: no registers
    nocpu.write_bytes(require_fixture("small-pc-7.2").read_bytes().replace(b'"env.regs"', b'"env.rogs"'))
    r = run(str(nocpu), "-o", str(tmp_path / "a.core"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "registers" in r.stderr, r.stderr
    small = require_fixture("small-pc-7.2")
    cut = tmp_path / "cut.mig"
    cut.write_bytes(small.read_bytes()[:70000])
    r = run(str(cut), "-o", str(tmp_path / "b.core"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run(str(small), "-o", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr
    r = run(str(small), "-o", str(tmp_path / "c.core"), "--map", "max-ram-below-4g=banana")
    assert r.returncode == 2 and "not a size" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mig", "nocpu.mig"]


def test_max_ram_below_4g_from_map(tmp_path: Path) -> None:
    """The stream cannot tell max-ram-below-4g: --map gives it and moves the split."""
    stream = require_fixture("memdump-pc-big-7.2")
    res = write_core(str(stream), str(tmp_path / "c.core"), overrides={"max-ram-below-4g": 2 << 30})
    ram = [(r.addr, r.size) for r in res.loads if r.block == "pc.ram"]
    assert ram[-1] == (4 << 30, 3712 * (1 << 20) - (2 << 30))


def test_volatility_banners_match(tmp_path: Path) -> None:
    if not os.environ.get("CI"):
        pytest.importorskip("volatility3")
    name = "memdump-pc-7.2"
    stream = require_fixture(name)
    ours = tmp_path / "ours.core"
    write_core(str(stream), str(ours))
    theirs = FIXTURES / f"{name}.core"

    def banners(path: Path) -> list[str]:
        vol = Path(sysconfig.get_path("scripts")) / "vol"
        r = subprocess.run([str(vol), "-q", "-r", "csv", "-f", str(path), "banners.Banners"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return [line for line in r.stdout.splitlines() if "Linux version" in line]
    a, b = banners(ours), banners(theirs)
    assert a and a == b  # same banners at the same physical offsets
    assert any("Linux version 6." in line for line in a)


def test_vmcoreinfo_note_against_qemu(tmp_path: Path) -> None:
    """The guest's VMCOREINFO note: the test guest's kernel does not fill the vmcoreinfo device, so qevm edit
    does what the kernel would (device fields + the note in a RAM page); QEMU 7.2 loads that stream and
    writes its dump-guest-memory, qevm core writes its core from the same stream: equal, note included."""
    import time

    from conftest import destination_args

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
    from qemu_driver import Qemu

    stream = require_fixture("memdump-pc-7.2")
    name = b"VMCOREINFO\0"
    desc = b"OSRELEASE=6.1.0-qevm\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a11480\n"
    note = struct.pack("<III", len(name), len(desc), 0) + name + bytes(-len(name) % 4) + desc + bytes(-len(desc) % 4)
    (tmp_path / "note.bin").write_bytes(note + bytes(4096 - len(note)))
    edited = tmp_path / "edited.mig"
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "qevm", "edit", str(stream), str(edited),
                        "--set", "vmcoreinfo/has_vmcoreinfo=true", "--set", "vmcoreinfo/vmcoreinfo.guest_format=1",
                        "--set", "vmcoreinfo/vmcoreinfo.size=100", "--set", "vmcoreinfo/vmcoreinfo.paddr=0x9f000",
                        "--set-page", f"pc.ram:0x9f000=@{tmp_path / 'note.bin'}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    theirs = tmp_path / "qemu.core"
    meta = fixture_meta(stream)
    with Qemu(meta.get("binary", "qemu-system-x86_64"), destination_args(meta) + ["-incoming", "defer", "-S"],
              tmp_path) as vm:
        vm.qmp("migrate-incoming", uri=f"exec:cat {edited}")
        deadline = time.time() + 300
        while time.time() < deadline and vm.qmp("query-status")["status"] == "inmigrate":
            time.sleep(0.2)
        assert vm.qmp("query-migrate").get("status") == "completed"
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{theirs}")
    ours = tmp_path / "ours.core"
    res = write_core(str(edited), str(ours))
    assert res.vmcoreinfo
    eh_a, ph_a, notes_a = _elf(ours)
    eh_b, ph_b, notes_b = _elf(theirs)
    assert (eh_a, ph_a) == (eh_b, ph_b)
    assert notes_a == notes_b and notes_a.endswith(note)
    for p in ph_a[1:]:
        _same_range(ours, theirs, p[2], p[2], p[5], p[3])
