"""``qevm compat`` judged against REAL migrations between QEMU 7.2 and QEMU 10.0.

scripts/compat_matrix.py builds the matrix (cached under ~/.cache/qevm/compat-matrix): every cell is a
real migration whose outcome (loaded / QEMU's error) is recorded; qevm compat must give the same verdict
in every cell, from the source stream and the destination's -dump-vmstate + its own saved stream.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _matrix_module() -> Any:
    spec = importlib.util.spec_from_file_location("compat_matrix", REPO / "scripts" / "compat_matrix.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def matrix() -> tuple[Any, Path, dict[str, Any]]:
    if shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the compat matrix needs qemu-system-x86_64 and root (chroot) in CI")
        pytest.skip("needs qemu-system-x86_64 and root")
    mod = _matrix_module()
    out = mod.cache_root()
    return mod, out, mod.build(out)


def qevm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], capture_output=True, timeout=300)


def test_every_cell_agrees_with_real_qemu(matrix: tuple[Any, Path, dict[str, Any]]) -> None:
    mod, out, doc = matrix
    cells = doc["cells"]
    # the matrix must hold both outcomes, both directions, and the mismatch kinds
    assert any(c["qemu"]["loaded"] for c in cells) and any(not c["qemu"]["loaded"] for c in cells)
    assert {(c["src"][0], c["dst"][0]) for c in cells} == {("7.2", "7.2"), ("7.2", "10.0"), ("10.0", "7.2"),
                                                           ("10.0", "10.0")}
    errors = " ".join(c["qemu"]["error"] for c in cells)
    assert "Machine type received" in errors and "Unknown ramblock" in errors
    wrong = []
    for c in cells:
        q = mod.qevm_verdict(out / c["source_stream"], out / c["destination_dump"], out / c["destination_stream"])
        if q["compatible"] != c["qemu"]["loaded"]:
            wrong.append((c["src"], c["dst"], c["qemu"], q["breaks"][:2]))
    assert not wrong, wrong


def test_cli_verdicts_exit_codes_and_json(matrix: tuple[Any, Path, dict[str, Any]]) -> None:
    _, out, _ = matrix
    good = qevm("compat", str(out / "stream-10.0-pc-q35-7.2-esp.mig"), str(out / "dump-7.2-pc-q35-7.2.json"),
                str(out / "stream-7.2-pc-q35-7.2-esp.mig"))
    assert good.returncode == 0, good.stdout.decode() + good.stderr.decode()
    assert b"compatible" in good.stdout
    bad = qevm("compat", "--json", str(out / "stream-7.2-pc-q35-7.2-esp.mig"), str(out / "dump-10.0-pc-q35-7.2.json"),
               str(out / "stream-10.0-pc-q35-7.2-esp.mig"))
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    brk = [f for f in doc["findings"] if f["severity"] == "break"]
    # QEMU 10.0 reads esp's drq_state, which 7.2 never wrote ("Missing section footer" in reality)
    assert any(f["fields"] and f["fields"][0].endswith("/esp/drq_state") for f in brk), brk
    missing = qevm("compat", str(out / "stream-7.2-pc-q35-7.2-e1000e.mig"), str(out / "stream-7.2-pc-q35-7.2-base.mig"))
    assert missing.returncode == 1 and b"e1000e.rom" in missing.stdout
    assert qevm("compat", str(out / "stream-7.2-pc-q35-7.2-base.mig")).returncode == 2
    assert qevm("compat", str(out / "nope.mig"), str(out / "dump-7.2-pc-q35-7.2.json")).returncode == 2


def test_dump_vs_dump(matrix: tuple[Any, Path, dict[str, Any]]) -> None:
    _, out, _ = matrix
    r = qevm("compat", "--json", "--devices", "am53c974,e1000e", str(out / "dump-7.2-pc-q35-7.2.json"),
             str(out / "dump-10.0-pc-q35-7.2.json"))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["sections_checked"] == 2
    breaks = [f for f in doc["findings"] if f["severity"] == "break"]
    assert [f["fields"] for f in breaks] == [["pciespscsi/esp/drq_state"]], breaks
    # e1000e's interrupt-pending array became padding in 10.0: unknowable from dumps alone -> a risk
    assert any(f["section"] == "e1000e" and f["severity"] == "risk" for f in doc["findings"])
    same = qevm("compat", str(out / "dump-7.2-pc-q35-7.2.json"), str(out / "dump-7.2-pc-q35-7.2.json"))
    assert same.returncode == 0, same.stdout.decode()


def test_qemu_probe_runs_the_destination(matrix: tuple[Any, Path, dict[str, Any]]) -> None:
    _, out, _ = matrix
    src = out / "stream-7.2-pc-i440fx-7.2-e1000e.mig"
    common = ["-m", "32", "-nodefaults", "-accel", "tcg", "-smp", "1", "-serial", "none"]
    ok = qevm("compat", str(src), "--qemu", "qemu-system-x86_64", "--", "-M", "pc-i440fx-7.2", *common,
              "-netdev", "user,id=n0,restrict=on", "-device", "e1000e,netdev=n0,mac=52:54:00:12:34:20,addr=0x5")
    # the matrix streams come from the fixture driver, which adds a serial port: without it -> missing section
    assert ok.returncode == 1 and b"serial" in ok.stdout, ok.stdout.decode() + ok.stderr.decode()
    common = common[:-2] + ["-serial", "null"]
    ok = qevm("compat", str(src), "--qemu", "qemu-system-x86_64", "--", "-M", "pc-i440fx-7.2", *common,
              "-netdev", "user,id=n0,restrict=on", "-device", "e1000e,netdev=n0,mac=52:54:00:12:34:20,addr=0x5")
    assert ok.returncode == 0, ok.stdout.decode() + ok.stderr.decode()
    bad = qevm("compat", str(src), "--qemu", "qemu-system-x86_64", "--", "-M", "pc-q35-7.2", *common)
    assert bad.returncode == 1 and b"machine type" in bad.stdout


def test_qemu_probe_through_a_chroot_wrapper(matrix: tuple[Any, Path, dict[str, Any]]) -> None:
    _, out, _ = matrix
    root = Path.home() / ".cache" / "qevm" / "trixie"
    if not root.is_dir():
        pytest.fail("the QEMU 10.0 chroot is missing (scripts/chroot.sh)")
    src = out / "stream-7.2-pc-q35-7.2-esp.mig"
    args = ["-M", "pc-q35-7.2", "-m", "32", "-nodefaults", "-accel", "tcg", "-smp", "1", "-serial", "null",
            "-device", "am53c974,addr=0x6"]
    r = qevm("compat", "--json", str(src), "--qemu", "chroot ~/.cache/qevm/trixie qemu-system-x86_64", "--", *args)
    assert r.returncode == 1, r.stdout.decode() + r.stderr.decode()
    doc = json.loads(r.stdout)
    assert [f["fields"] for f in doc["findings"] if f["severity"] == "break"] == [
        ["0000:00:06.0/pciespscsi:0/esp/drq_state"]]
