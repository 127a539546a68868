"""``qevm redact``: real QEMU 7.2 loads the redacted stream and shows the same CPU registers and device
state as for the original, with the guest's memory gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import destination_args, fixture_meta, require_fixture

from qevm.analysis.extract import extract
from qevm.analysis.redact import redact
from qevm.io.reader import read_stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")
# HMP views of the loaded state: registers of every CPU and the devices qevm leaves untouched
VIEWS = ("info registers -a", "info pic", "info lapic", "info pci", "info irq", "info qtree", "info mtree")


def _load(fixture: Path, stream: Path, tmp: Path) -> tuple[dict[str, str], bytes]:
    meta = fixture_meta(fixture)
    with Qemu(meta.get("binary", "qemu-system-x86_64"), destination_args(meta) + ["-incoming", "defer", "-S"],
              tmp) as vm:
        caps = [{"capability": k, "state": v} for k, v in meta.get("capabilities", {}).items()]
        if caps:
            vm.qmp("migrate-set-capabilities", capabilities=caps)
        vm.qmp("migrate-incoming", uri=f"exec:cat {stream}")
        deadline = time.time() + 300
        while time.time() < deadline and vm.qmp("query-status")["status"] == "inmigrate":
            time.sleep(0.2)
        assert vm.qmp("query-migrate").get("status") == "completed"
        # address spaces are listed in hash order: compare them as a set of paragraphs
        views = {v: "\n\n".join(sorted(vm.hmp(v).split("\r\n\r\n"))) for v in VIEWS}
        out = tmp / "ram.bin"
        vm.qmp("pmemsave", val=0x100000, size=0x400000, filename=str(out))
        return views, out.read_bytes()


@pytest.mark.parametrize("name,fill", [("xbzrle-7.2", 0), ("compress-7.2", 0xCC), ("small-pc-7.2", 0)])
def test_qemu_loads_redacted_stream(name: str, fill: int, tmp_path: Path) -> None:
    fixture = require_fixture(name)
    out = tmp_path / "redacted.mig"
    # kvm-tpr-opt (kvmvapic) checks its option ROM, shadowed in RAM at 0xc0000-0xfffff, when it loads
    res = redact(str(fixture), str(out), fill=fill, keep_ranges=[(0xC0000, 0x100000)])
    assert res.pages_removed > 0 and res.pages_kept <= 64
    assert res.size_before == fixture.stat().st_size and res.size_after == out.stat().st_size
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    orig_views, orig_ram = _load(fixture, fixture, tmp_path / "a")
    red_views, red_ram = _load(fixture, out, tmp_path / "b")
    assert "RIP=" in orig_views["info registers -a"] or "EIP=" in orig_views["info registers -a"]
    for v in VIEWS:
        assert red_views[v] == orig_views[v], v
    assert red_ram == bytes((fill,)) * len(red_ram)
    if name != "small-pc-7.2":
        assert orig_ram != red_ram  # the guest's memory was there and is gone
    # device sections byte-identical, RAM pages all removed
    a, b = read_stream(str(fixture)), read_stream(str(out))
    assert [(d.section.idstr, d.data) for d in a.devices] == [(d.section.idstr, d.data) for d in b.devices]
    assert a.vmdesc_raw == b.vmdesc_raw
    total = {k: sum(blk.pages[k] for blk in b.blocks.values()) for k in ("normal", "zero", "xbzrle", "compressed")}
    assert total["normal"] + total["xbzrle"] + total["compressed"] - (res.pages_removed if fill else 0) \
        <= res.pages_kept


def test_keep_block_and_range(tmp_path: Path) -> None:
    fixture = require_fixture("xbzrle-7.2")
    out = tmp_path / "r.mig"
    res = redact(str(fixture), str(out), keep_blocks=["pc.bios"], keep_ranges=[(0x1000000, 0x1200000)])
    assert res.kept_ranges == {"pc.ram": [(0x1000000, 0x1200000)]}
    extract(str(fixture), str(tmp_path / "orig"))
    extract(str(out), str(tmp_path / "red"))
    o = (tmp_path / "orig" / "pc.ram.ram").read_bytes()
    r = (tmp_path / "red" / "pc.ram.ram").read_bytes()
    assert r[0x1000000:0x1200000] == o[0x1000000:0x1200000] != bytes(0x200000)
    assert r[:0x1000000] == bytes(0x1000000) and r[0x1200000:] == bytes(len(r) - 0x1200000)
    assert (tmp_path / "orig" / "pc.bios.ram").read_bytes() == (tmp_path / "red" / "pc.bios.ram").read_bytes()


def test_redact_mapped_ram(tmp_path: Path) -> None:
    fixture = require_fixture("mapped-ram-10.0")
    out = tmp_path / "r.mig"
    redact(str(fixture), str(out))
    assert os.stat(out).st_blocks * 512 < 8 << 20  # page regions are holes
    extract(str(out), str(tmp_path / "x"))
    assert all(p.read_bytes() == bytes(p.stat().st_size) for p in (tmp_path / "x").glob("*.ram"))


def test_redact_errors(tmp_path: Path) -> None:
    fixture = require_fixture("small-pc-7.2")
    env = {**os.environ, "PYTHONPATH": SRC}

    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qevm", "redact", *a], capture_output=True, text=True,
                              env=env, timeout=120)
    cut = tmp_path / "cut.mig"
    cut.write_bytes(fixture.read_bytes()[:50000])
    r = run(str(cut), str(tmp_path / "out.mig"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = run(str(fixture), str(tmp_path / "out.mig"), "--keep-range", "0x10-0x5")
    assert r.returncode == 2 and "empty range" in r.stderr
    r = run(str(fixture), str(tmp_path / "out.mig"), "--keep", "nope")
    assert r.returncode == 2 and "nope" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mig"]
    r = run(str(fixture), str(tmp_path / "out.mig"), "--fill", "0xcc")
    assert r.returncode == 0 and "pages removed: 4178" in r.stdout and "->" in r.stdout
