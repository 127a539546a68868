"""PCI config spaces and virtio state decoded into fields (qevm.codec.pci / virtio / blobs).

Every real stream: each ``pci config`` and ``virtio`` field decodes into a Struct whose encoding is
the recorded bytes; edits reach into them (a virtio-net MAC, a queue's last_avail_idx) and real QEMU
loads the edited stream.  Nonsense falls back to raw bytes.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import destination_args, fixture_meta, require_fixture, streams
from test_cli import qevm

from qevm.codec.blobs import BlobCodec
from qevm.codec.types import REGISTRY
from qevm.codec.vmsd import Field, Struct, encode_struct
from qevm.codec.wire import Cursor
from qevm.io.reader import read_stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402

BLOB_TYPES = ("pci config", "virtio", "virtio-gpu")


def _fields(st: Struct) -> Iterator[Field]:
    for f in st.fields:
        yield f
        vals = f.value if isinstance(f.value, list) else [f.value]
        for v in vals:
            if isinstance(v, Struct):
                yield from _fields(v)
    for s in st.subsections:
        yield from _fields(s.body)


def _raw_notes(st: Struct) -> list[str]:
    return [f"{f.name}: {f.desc['note']}" for f in _fields(st) if "note" in f.desc and f.type == "buffer"]


def blobs(path: Path) -> list[tuple[str, Field]]:
    an = read_stream(str(path))
    out = []
    for d in an.devices:
        if d.struct is None:
            continue
        assert encode_struct(d.struct) == d.data, d.section.idstr
        out += [(d.section.idstr, f) for f in _fields(d.struct) if f.type in BLOB_TYPES]
    return out


@pytest.mark.parametrize("path", streams())
def test_blobs_decode_and_reencode(path: Path, unpacked) -> None:
    """Every blob of every fixture decodes (x86: all of them) and encodes back to its bytes."""
    found = blobs(unpacked(path))
    for sec, f in found:
        if isinstance(f.value, Struct):
            assert len(encode_struct(f.value)) == f.size, (sec, f.name)
    if found and "x86_64" in str(fixture_meta_or_none(path).get("binary", "")):
        raw = [(sec, f.name) for sec, f in found if not isinstance(f.value, Struct)]
        assert not raw, raw


def fixture_meta_or_none(path: Path) -> dict[str, Any]:
    m = path.with_suffix(".json")
    return json.loads(m.read_text()) if m.exists() else {}


VIRTIO_FIXTURES = ("virtio-pc-7.2", "virtio-q35-7.2", "virtio-q35-10.0")


@pytest.mark.parametrize("name", VIRTIO_FIXTURES)
def test_virtio_devices_fully_decoded(name: str) -> None:
    """All seven virtio devices: transport, queues, device part and subsections, nothing left raw."""
    an = read_stream(str(require_fixture(name)))
    seen = {}
    for d in an.devices:
        f = d.struct.field("virtio") if d.struct else None
        if f is None:
            continue
        assert isinstance(f.value, Struct), d.section.idstr
        assert not _raw_notes(f.value), (d.section.idstr, _raw_notes(f.value))
        seen[d.section.idstr.rsplit("/", 1)[-1]] = f.value
    assert {"virtio-net", "virtio-blk", "virtio-scsi", "virtio-balloon", "virtio-rng", "virtio-console",
            "virtio-gpu"} <= set(seen), sorted(seen)
    net = seen["virtio-net"]
    assert net.field("device").value.field("mac").value == bytes.fromhex("525400123470")
    cfg = net.field("transport").value.field("config").value
    assert cfg.field("vendor_id").value == 0x1AF4 and cfg.field("device_id").value in (0x1000, 0x1041)
    assert any(f.name.startswith("virtio_common@") for f in cfg.fields)
    if "q35" in name:
        assert any(f.name.startswith("pcie@") for f in cfg.fields)
    gpu = next(d for d in an.devices if d.section.idstr.endswith("/virtio-gpu")).struct.field("virtio-gpu").value
    assert isinstance(gpu, Struct) and gpu.field("max_outputs").value == len(gpu.field("scanout").value) == 1
    # the guest's driver set the rings up: DRIVER_OK and a ring address on queue 0
    blk = seen["virtio-blk"]
    assert blk.field("status").value & 4 and blk.field("vq").value[0].field("desc").value


def test_dump_and_edit_paths(tmp_path: Path) -> None:
    f = require_fixture("virtio-q35-7.2")
    doc = json.loads(qevm("dump", str(f)).stdout)
    sec = next(s for s in doc["sections"] if s["name"].endswith("/virtio-net"))
    v = sec["fields"]["virtio"]
    assert v["device"]["mac"] == "525400123470"
    assert v["transport"]["config"]["vendor_id"] == 0x1AF4
    out = tmp_path / "e.mig"
    net = f'"{sec["name"]}":{sec["instance_id"]}/virtio'
    qevm("edit", str(f), str(out), "--set", f"{net}/device/mac=5254009abcde",
         "--set", f"{net}/vq[0]/last_avail_idx=7",
         "--set", f"{net}/transport/config/interrupt_line=9")
    a, b = f.read_bytes(), out.read_bytes()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) <= 6 + 2 + 1
    doc = json.loads(qevm("dump", str(out)).stdout)
    v = next(s for s in doc["sections"] if s["name"] == sec["name"])["fields"]["virtio"]
    assert v["device"]["mac"] == "5254009abcde" and v["vq"][0]["last_avail_idx"] == 7
    assert v["transport"]["config"]["interrupt_line"] == 9
    r = qevm("edit", str(f), str(tmp_path / "x.mig"), "--set", f"{net}/device/mac=00", check=False)
    assert r.returncode == 2 and "6 bytes" in r.stderr.decode()


def _load_edited_mac(name: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Change the virtio-net MAC of fixture ``name``, load the stream in the QEMU that wrote it (10.0:
    inside the trixie chroot), and return QMP's ``query-rx-filter``."""
    f = require_fixture(name)
    meta = fixture_meta(f)
    an = read_stream(str(f))
    sec = next(d.section for d in an.devices if d.section.idstr.endswith("/virtio-net"))
    root = None
    work = tmp_path
    if meta.get("chroot"):
        from gen_qemu10 import chroot_dir

        root = chroot_dir()
        work = Path(tempfile.mkdtemp(prefix="qevm-test-blobs-", dir=root / "tmp"))
    try:
        out = work / "mac.mig"
        qevm("edit", str(f), str(out), "--set",
             f'"{sec.idstr}":{sec.instance_id}/virtio/device/mac=5254009abcde')
        uri = f"exec:cat {'/' + str(out.relative_to(root)) if root else out}"
        vm = Qemu(meta.get("binary", "qemu-system-x86_64"),
                  destination_args(meta) + ["-incoming", "defer", "-S"], tmp_path,
                  chroot=str(root) if root else None)
        with vm:
            vm.qmp("migrate-incoming", uri=uri)
            deadline = time.time() + 120
            while vm.qmp("query-status")["status"] == "inmigrate" and time.time() < deadline:
                time.sleep(0.1)
            assert vm.qmp("query-migrate").get("status") == "completed", vm.qmp("query-migrate")
            filters: list[dict[str, Any]] = vm.qmp("query-rx-filter")
        return filters
    finally:
        if root:
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("name", ["virtio-pc-7.2", "virtio-q35-10.0"])
def test_edited_mac_loads_in_qemu(name: str, tmp_path: Path) -> None:
    """QEMU (7.2, and 10.0 in its chroot) loads a stream whose virtio-net MAC was changed inside the
    decoded ``virtio`` blob; QMP reports the new MAC."""
    filters = _load_edited_mac(name, tmp_path)
    assert [x["main-mac"] for x in filters] == ["52:54:00:9a:bc:de"], filters


def test_unknown_layouts_stay_raw() -> None:
    """Random bytes, truncated blobs and a foreign transport decode as raw bytes, never an error."""
    rng = random.Random(7)
    for codec in (REGISTRY["pci config"], REGISTRY["virtio"], REGISTRY["virtio-gpu"]):
        assert isinstance(codec, BlobCodec)
        for n in (0, 3, 63, 256, 4096, 5000):
            data = bytes(rng.getrandbits(8) for _ in range(n))
            cur = Cursor(data)
            v = codec.decode(cur, n)
            assert cur.pos == n
            assert codec.encode(v, n) == data


def test_virtio_blob_mutations_never_fail() -> None:
    """Flip bytes in a real virtio blob: it decodes (structured or raw) and re-encodes to the same bytes."""
    f = require_fixture("virtio-pc-7.2")
    an = read_stream(str(f))
    blob = next(d for d in an.devices if d.section.idstr.endswith("/virtio-net"))
    fld = blob.struct.field("virtio")
    data = encode_struct(fld.value)
    codec = REGISTRY["virtio"]
    rng = random.Random(11)
    for _ in range(200):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        v = codec.decode(Cursor(bytes(b)), len(b))
        assert codec.encode(v, len(b)) == bytes(b)


def test_virtio_mmio_decoded() -> None:
    """aarch64 virt: a virtio-mmio device (no PCI config, per-queue ring alignment) decodes too; the
    device part is recognised by its layout."""
    an = read_stream(str(require_fixture("aarch64-virt-7.2")))
    d = next(d for d in an.devices if d.section.idstr.startswith("virtio-mmio@"))
    v = d.struct.field("virtio").value
    assert isinstance(v, Struct) and not _raw_notes(v)
    assert v.field("transport").value.vmsd_name == "virtio-mmio"
    assert v.field("vq").value[0].field("align").value == 4096
    assert v.field("device").value.field("mac").value == bytes.fromhex("525400124002")
    assert encode_struct(d.struct) == d.data


def test_pci_capabilities_seen_on_q35() -> None:
    """q35-7.2 carries every capability family qevm describes; known ids and the MSI-X table size
    (control & 0x7ff, plus one) agree with what QEMU saved next to the config space."""
    import re

    an = read_stream(str(require_fixture("q35-7.2")))
    kinds: set[str] = set()
    configs: dict[str, Struct] = {}
    for d in an.devices:
        if d.struct is None:
            continue
        for f in _fields(d.struct):
            if f.type == "pci config":
                assert isinstance(f.value, Struct)
                configs.setdefault(d.section.idstr.rsplit("/", 1)[-1], f.value)
                kinds |= {m.group(1) for g in f.value.fields if (m := re.match(r"([a-z_]+)@0x", g.name))}
    assert {"pm", "msi", "msix", "pcie", "sata", "ssvid", "virtio_common", "virtio_notify", "aer", "acs",
            "dsn"} <= kinds, kinds
    e1000e = configs["e1000e"]
    assert (e1000e.field("vendor_id").value, e1000e.field("device_id").value) == (0x8086, 0x10D3)
    port = configs["pcie-root-port"]
    assert port.field("header_type").value & 0x7F == 1 and port.field("secondary_bus").value >= 1
    net = next(d for d in an.devices if d.section.idstr.endswith("/virtio-net")).struct.field("virtio").value
    tr = net.field("transport").value
    cfg = tr.field("config").value
    msix = next(f.value for f in cfg.fields if f.name.startswith("msix@"))
    assert (msix.field("control").value & 0x7FF) + 1 == len(tr.field("msix_table").value)
    assert cfg.field("device_id").value == 0x1041  # modern virtio-net behind a PCIe root port
