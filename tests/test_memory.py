"""Guest RAM rebuilt by qevm (XBZRLE deltas, compressed pages) equals what real QEMU holds after
loading the same stream as a migration destination."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import destination_args, fixture_meta, require_fixture

from qevm.format.memory import RamImage
from qevm.io.reader import read_stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402

# pc.ram offsets are guest-physical below 4 GiB except for the legacy VGA/ROM window
HOLE = (0xA0000, 0x100000)


def _destination_memory(fixture: Path, tmp_path: Path, size: int) -> bytes:
    meta = fixture_meta(fixture)
    args = destination_args(meta)
    with Qemu(meta.get("binary", "qemu-system-x86_64"), args + ["-incoming", "defer", "-S"], tmp_path) as vm:
        caps = [{"capability": k, "state": v} for k, v in meta.get("capabilities", {}).items()]
        if caps:
            vm.qmp("migrate-set-capabilities", capabilities=caps)
        vm.qmp("migrate-incoming", uri=f"exec:cat {fixture}")
        deadline = time.time() + 300
        while time.time() < deadline:
            st = vm.qmp("query-status")["status"]
            if st != "inmigrate":
                break
            time.sleep(0.2)
        assert vm.qmp("query-migrate").get("status") == "completed"
        out = tmp_path / "ram.bin"
        vm.qmp("pmemsave", val=0, size=size, filename=str(out))
        return out.read_bytes()


@pytest.mark.parametrize("name", ["xbzrle-7.2", "compress-7.2"])
def test_rebuilt_ram_equals_qemu_destination(name: str, tmp_path: Path) -> None:
    fixture = require_fixture(name)
    meta = fixture_meta(fixture)
    assert not meta.get("chroot"), "the destination is the host's QEMU 7.2: compare 7.2 fixtures only"
    image = RamImage(4096, str(tmp_path))
    an = read_stream(str(fixture), memory=image)
    size = an.blocks["pc.ram"].used_length
    pages = an.blocks["pc.ram"].pages
    assert pages["xbzrle"] + pages["compressed"] > 0
    ours = image.read("pc.ram", 0, size)
    image.close()
    theirs = _destination_memory(fixture, tmp_path, size)
    assert len(theirs) == size
    lo, hi = HOLE
    assert ours[:lo] == theirs[:lo]
    # compare page by page to report where a difference is
    bad = [a for a in range(hi, size, 4096) if ours[a:a + 4096] != theirs[a:a + 4096]]
    assert not bad, f"{len(bad)} pages differ, first at 0x{bad[0]:x}"
