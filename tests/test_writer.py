"""rewrite and edit: byte-identical re-encoding of every real stream, and edits real QEMU loads."""

from __future__ import annotations

import filecmp
import json
import re
import sys
import time
from pathlib import Path

import pytest
from conftest import destination_args, fixture_meta, require_fixture, streams
from test_cli import qevm

from qevm.codec.paths import parse_assignment, parse_path
from qevm.errors import EncodeError, UsageError
from qevm.io.reader import read_stream
from qevm.io.writer import Edit, rewrite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402


@pytest.mark.parametrize("path", streams())
def test_rewrite_is_byte_identical(path: Path, unpacked, tmp_path: Path) -> None:
    f = unpacked(path)
    out = tmp_path / "out.mig"
    res = rewrite(str(f), str(out))
    assert filecmp.cmp(f, out, shallow=False)
    an = read_stream(str(f))
    if an.vmdesc is not None:
        assert res.devices_reencoded == len(an.devices) and res.devices_raw == 0


def test_rewrite_from_a_pipe(unpacked, tmp_path: Path) -> None:
    f = unpacked(require_fixture("xbzrle-7.2"))
    out = tmp_path / "out.mig"
    qevm("rewrite", "-", str(out), stdin=f.read_bytes())
    assert filecmp.cmp(f, out, shallow=False)


def test_paths() -> None:
    p = parse_path('"0000:00:02.0/e1000":0/mac_reg[5]')
    assert (p.section, p.instance, p.fields) == ("0000:00:02.0/e1000", 0, ("mac_reg[5]",))
    p, v = parse_assignment("cpu:1/env.regs[3]=0x1234abcd5678")
    assert (p.section, p.instance, p.fields, v) == ("cpu", 1, ("env.regs[3]",), "0x1234abcd5678")
    p = parse_path("pckbd/kbd/pckbd/extended_state/obsrc")
    assert p.fields == ("kbd", "pckbd", "extended_state", "obsrc")
    for bad in ("cpu", '"cpu/x', "cpu:x/a", "cpu:0"):
        with pytest.raises(UsageError):
            parse_path(bad)


def _load(meta: dict, stream: Path, tmp_path: Path, extra: list[str]) -> Qemu:
    args = destination_args(meta)
    vm = Qemu(meta.get("binary", "qemu-system-x86_64"), args + ["-incoming", "defer"] + extra, tmp_path)
    caps = [{"capability": k, "state": v} for k, v in meta.get("capabilities", {}).items()]
    if caps:
        vm.qmp("migrate-set-capabilities", capabilities=caps)
    vm.qmp("migrate-incoming", uri=f"exec:cat {stream}")
    deadline = time.time() + 120
    while vm.qmp("query-status")["status"] == "inmigrate" and time.time() < deadline:
        time.sleep(0.1)
    assert vm.qmp("query-migrate").get("status") == "completed", vm.qmp("query-migrate")
    return vm


def test_edited_register_loads_in_qemu(tmp_path: Path) -> None:
    f = require_fixture("small-pc-7.2")
    out = tmp_path / "edited.mig"
    qevm("edit", str(f), str(out), "--set", "cpu:0/env.regs[3]=0x1234abcd", "--set", "cpu/env.regs[1]=42")
    a, b = f.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b, strict=True)) <= 16  # only the edited fields' bytes
    with _load(fixture_meta(f), out, tmp_path, ["-S"]) as vm:
        regs = vm.hmp("info registers")
    # the paused CPU is in real mode, so QEMU shows the 32-bit register names
    assert re.search(r"EBX=1234abcd", regs), regs
    assert re.search(r"ECX=0000002a", regs), regs


def test_patch_and_invalid_edits(tmp_path: Path) -> None:
    f = require_fixture("small-pc-7.2")
    out = tmp_path / "out.mig"
    patch = tmp_path / "p.json"
    patch.write_text(json.dumps({"cpu:0/env.regs[0]": 7, "mc146818rtc/cmos_index": 3}))
    qevm("edit", str(f), str(out), "--patch", str(patch))
    an = read_stream(str(out))
    cpu = next(d for d in an.devices if d.section.idstr == "cpu")
    assert cpu.struct.field("env.regs").value[0] == 7
    rtc = next(d for d in an.devices if d.section.idstr == "mc146818rtc")
    assert rtc.struct.field("cmos_index").value == 3
    for bad, why in (("cpu:0/env.eip=-1", "out of range"), ("cpu:0/env.nope=1", "no field"),
                     ("nosuch:0/x=1", "no such section"), ("mc146818rtc/cmos_data=00", "128 bytes"),
                     ("cpu:0/env.regs[99]=1", "out of range")):
        gone = tmp_path / "never.mig"
        r = qevm("edit", str(f), str(gone), "--set", bad, check=False)
        assert r.returncode == 2 and why in r.stderr.decode(), (bad, r.stderr)
        assert not gone.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qevm-")]


def test_edit_library_errors(tmp_path: Path) -> None:
    f = require_fixture("small-pc-7.2")
    with pytest.raises(EncodeError):
        rewrite(str(f), str(tmp_path / "x.mig"), edits=[Edit(parse_path("cpu:0/env.eip"), 1 << 64)])
    assert not (tmp_path / "x.mig").exists()


def test_set_page_loads_in_qemu(tmp_path: Path) -> None:
    f = require_fixture("small-pc-7.2")
    page = bytes(range(256)) * 16
    src = tmp_path / "page.bin"
    src.write_bytes(page)
    out = tmp_path / "paged.mig"
    # one page QEMU sent (first page of pc.ram) and one it never sent (zero in the source)
    qevm("edit", str(f), str(out), "--set-page", f"pc.ram:0x0=@{src}", "--set-page", f"pc.ram:0x200000=@{src}")
    with _load(fixture_meta(f), out, tmp_path, ["-S"]) as vm:
        for addr in (0x0, 0x200000):
            dump = tmp_path / f"m{addr:x}.bin"
            vm.qmp("pmemsave", val=addr, size=4096, filename=str(dump))
            assert dump.read_bytes() == page, hex(addr)


def test_rewritten_running_guest_keeps_running(tmp_path: Path) -> None:
    f = require_fixture("compress-7.2")  # a running Linux guest printing "tick N" every 100 ms
    out = tmp_path / "rw.mig"
    qevm("rewrite", str(f), str(out))
    serial = tmp_path / "serial.log"
    with _load(fixture_meta(f), out, tmp_path, ["-serial", f"file:{serial}"]) as vm:
        # A TCG guest resumed long after it was saved may first print a soft-lockup/RCU-stall report
        # on its serial port (its clock jumped); the ticks come after it.
        deadline = time.time() + 150
        ticks: list[int] = []
        while time.time() < deadline:
            ticks = [int(x) for x in re.findall(r"tick (\d+)", serial.read_text(errors="replace"))]
            if len(ticks) >= 3:
                break
            time.sleep(0.5)
        assert vm.qmp("query-status")["status"] == "running"
    assert len(ticks) >= 3, serial.read_text(errors="replace")[-500:]
    assert ticks == sorted(ticks) and ticks[0] > 1  # the numbering continues from the source guest
