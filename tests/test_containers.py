"""Containers around a stream: qcow2 internal snapshots (savevm) and libvirt save images.

qcow2 images come from real QEMU 7.2 (``savevm`` over HMP, ``qemu-img``, ``qemu-io``); the guest
bytes read through the L1/L2 tables are compared with what ``qemu-img convert`` reads.  libvirt is
not installed here, so save images are built from the format facts around a real stream.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA, FIXTURES, missing, require_binary, require_file

from qevm.errors import DecodeError, QevmError, UsageError
from qevm.io import containers
from qevm.io.containers import (
    LibvirtSave,
    Qcow2Image,
    Qcow2VmState,
    list_snapshots,
    sniff,
)
from qevm.io.reader import read_stream
from qevm.io.sources import Input

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU = shutil.which("qemu-system-x86_64")
SAVEVM_FIXTURE = FIXTURES / "savevm-pc-7.2.qcow2"
SMALL_STREAM = DATA / "small-pc-7.2.mig.xz"
MiB = 1 << 20


def need(*tools: str | None) -> None:
    if not all(tools):
        missing("QEMU tools (qemu-img, qemu-io, qemu-system-x86_64)",
                "scripts/test.sh installs qemu-utils and qemu-system-x86")


def run(*args: str, stdin: bytes | None = None) -> str:
    r = subprocess.run(args, input=stdin, capture_output=True, timeout=300)
    if r.returncode:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r.stdout.decode(errors="replace")


def qemu_img_snapshots(path: Path) -> list[dict[str, Any]]:
    return json.loads(run(str(QEMU_IMG), "info", "--output=json", str(path))).get("snapshots", [])


def savevm(img: Path, names: list[str]) -> None:
    """Boot nothing (-S), take ``savevm`` snapshots over HMP on stdin, quit."""
    hmp = "".join(f"savevm {n}\n" for n in names) + "quit\n"
    r = subprocess.run([str(QEMU), "-M", "pc", "-m", "32", "-S", "-display", "none",
                        "-drive", f"file={img},format=qcow2,if=virtio", "-monitor", "stdio"],
                       input=hmp.encode(), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"Error" not in r.stdout and b"rror" not in r.stderr, (r.stdout + r.stderr).decode(errors="replace")


def small_stream() -> bytes:
    return lzma.decompress(SMALL_STREAM.read_bytes())


def check_stream(f: Any, size: int, name: str = "vmstate") -> Any:
    """The stream in ``f`` parses to its end: configuration, RAM, every device decoded by its vmdesc."""
    an = read_stream(Input(name, f, True, None, size))
    assert an.size == size
    assert an.trailing == 0
    assert an.configuration is not None and an.configuration.machine.startswith("pc-i440fx")
    assert an.vmdesc is not None
    assert an.blocks and sum(sum(b.pages.values()) for b in an.blocks.values()) > 0
    assert an.devices
    assert all(d.struct is not None and d.error is None for d in an.devices), [d.section.idstr for d in an.devices
                                                                               if d.struct is None]
    return an


def compare_with_qemu_img(snaps: list[dict[str, Any]], img: Path) -> None:
    ref = qemu_img_snapshots(img)
    assert len(snaps) == len(ref)
    for s, r in zip(snaps, ref, strict=True):
        assert s["id"] == r["id"]
        assert s["name"] == r["name"]
        assert s["vm_state_size"] == r["vm-state-size"]
        assert (s["date_sec"], s["date_nsec"]) == (r["date-sec"], r["date-nsec"])
        assert s["vm_clock_nsec"] == r["vm-clock-sec"] * 1_000_000_000 + r["vm-clock-nsec"]
        if "icount" in r:
            assert s["icount"] == r["icount"]


def chunked_read(f: Any, start: int, n: int, rng: random.Random) -> bytes:
    """The reference twin of a bulk read: odd-sized reads and readintos with seeks in between."""
    out = bytearray()
    f.seek(start)
    while len(out) < n:
        k = min(n - len(out), rng.choice([1, 7, 511, 512, 4096, 65535, 65536, 65537, 300_000]))
        if rng.random() < 0.5:
            buf = bytearray(k)
            got = f.readinto(buf)
            out += buf[:got]
        else:
            out += f.read(k)
        f.seek(start + len(out))
        assert f.tell() == start + len(out)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# sniff


def test_sniff() -> None:
    assert sniff(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert sniff(b"LibvirtQemudSave\x02\x00\x00\x00") == "libvirt"
    assert sniff(b"LibvirtQemudPart") == "libvirt"
    assert sniff(b"LibvirtQ") == "libvirt"  # the 8 bytes qevm.sources peeks
    assert sniff(b"LibvirtQemudXxxx") is None
    assert sniff(b"QEVM\x00\x00\x00\x03") is None
    assert sniff(b"\x1f\x8b\x08\x00") is None
    assert sniff(b"") is None
    assert sniff(b"QFI") is None


# --------------------------------------------------------------------------------------------
# the savevm fixture (scripts/fixtures/make.py: HMP savevm snap1 on a running Linux guest)


@pytest.fixture(scope="module")
def savevm_fixture() -> Path:
    return require_file(SAVEVM_FIXTURE, "python3 scripts/fixtures/make.py savevm-pc-7.2")


def test_fixture_snapshot_table(savevm_fixture: Path) -> None:
    need(QEMU_IMG)
    with open(savevm_fixture, "rb") as f:
        snaps = list_snapshots(f)
    compare_with_qemu_img(snaps, savevm_fixture)
    assert [s["name"] for s in snaps] == ["snap1"]
    meta = json.loads(savevm_fixture.with_suffix(".json").read_text())
    assert snaps[0]["name"] == meta["snapshot"]
    # qemu-img's table prints the same clock
    assert snaps[0]["vm_clock"] in run(str(QEMU_IMG), "snapshot", "-l", str(savevm_fixture))


def test_fixture_vmstate_parses(savevm_fixture: Path) -> None:
    with open(savevm_fixture, "rb", buffering=0) as f:
        vm = Qcow2VmState(f, name=str(savevm_fixture))
        assert vm.snapshot.name == "snap1"
        assert vm.vm_state_offset == 512 * MiB  # 64 KiB clusters, 32 MiB disk: the first L1 boundary
        assert vm.read(4) == b"QEVM"
        assert vm.seek(0) == 0
        an = check_stream(vm, vm.size, str(savevm_fixture))
        assert "pc.ram" in an.blocks
        meta = json.loads(savevm_fixture.with_suffix(".json").read_text())
        assert an.configuration.machine == meta["machine_resolved"]
        # by name, by id, and as an Input of its own give the same object
        assert Qcow2VmState(f, "snap1").snapshot == Qcow2VmState(f, "1").snapshot == Qcow2VmState(f, 1).snapshot
        inp = vm.to_input()
        assert inp.seekable and inp.size == vm.size and inp.name.endswith("@snap1")


def test_ownership_and_fileno(savevm_fixture: Path, tmp_path: Path) -> None:
    vm = Qcow2VmState.open(str(savevm_fixture))
    inp = vm.to_input()
    with pytest.raises(io.UnsupportedOperation):
        vm.fileno()  # a view has no descriptor of its own: os.fstat-based sniffing must not see the image's
    raw = vm.image.file
    inp.close()
    assert vm.closed and raw.closed
    img = tmp_path / "v.save"
    img.write_bytes(libvirt_image(small_stream()))
    sv = LibvirtSave.open(str(img))
    inp = sv.to_input()
    assert inp.file.read(4) == b"QEVM"
    inp.close()  # closing the stream closes the container and its file
    assert sv._f.closed
    with pytest.raises(ValueError):
        sv.stream()
    with open(img, "rb") as f:
        with LibvirtSave(f) as sv:
            sv.stream().read(4)
        assert not f.closed  # not ours


def test_large_state_size_field(savevm_fixture: Path) -> None:
    """Past 4 GiB QEMU writes 0 in the 32-bit field; the 64-bit one in the extra data wins."""
    data = bytearray(savevm_fixture.read_bytes()[:80 * MiB])
    image = Qcow2Image(io.BytesIO(bytes(data)))
    snap = image.snapshots[0]
    struct.pack_into(">I", data, snap.entry_offset + 32, 0)
    vm = Qcow2VmState(io.BytesIO(bytes(data)))
    assert vm.size == snap.vm_state_size and vm.read(4) == b"QEVM"


def test_fixture_reads_are_consistent(savevm_fixture: Path) -> None:
    """Bulk reads (runs of host clusters in one read) equal small unaligned reads and seeks."""
    rng = random.Random(7)
    with open(savevm_fixture, "rb") as f:
        vm = Qcow2VmState(f)
        size = vm.size
        for start, n in [(0, 3 * MiB), (size // 2 - 100_000, 2 * MiB), (size - 1_500_000, 1_500_000)]:
            vm.seek(start)
            bulk = vm.read(n)
            assert len(bulk) == n
            assert chunked_read(vm, start, n, rng) == bulk
        # the end of the state, and past it
        vm.seek(-10, io.SEEK_END)
        assert len(vm.read(100)) == 10
        assert vm.read(100) == b""
        vm.seek(size + 5)
        assert vm.read(1) == b"" and vm.readinto(bytearray(4)) == 0
        with pytest.raises(ValueError):
            vm.seek(-1)
        vm.close()
        assert vm.closed and not f.closed
        with pytest.raises(ValueError):
            vm.read(1)


# --------------------------------------------------------------------------------------------
# fresh images from QEMU 7.2: savevm s1, savevm s2 on several qcow2 layouts

LAYOUTS = {
    "default": [],
    "v2": ["-o", "compat=0.10"],
    "c512": ["-o", "cluster_size=512"],
    "c2M": ["-o", "cluster_size=2M"],
    "extl2-16k": ["-o", "extended_l2=on,cluster_size=16k"],
    "extl2-64k": ["-o", "extended_l2=on"],
    "extl2-2M": ["-o", "extended_l2=on,cluster_size=2M"],
}


@pytest.fixture(scope="module")
def fresh_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    need(QEMU_IMG, QEMU)
    d = tmp_path_factory.mktemp("savevm")
    out = {}
    for name, opts in LAYOUTS.items():
        img = d / f"{name}.qcow2"
        run(str(QEMU_IMG), "create", "-q", "-f", "qcow2", *opts, str(img), "64M")
        savevm(img, ["s1", "s2"])
        out[name] = img
    yield out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fresh_savevm(fresh_images: dict[str, Path], layout: str) -> None:
    img = fresh_images[layout]
    with open(img, "rb") as f:
        snaps = list_snapshots(f)
        compare_with_qemu_img(snaps, img)
        assert [s["name"] for s in snaps] == ["s1", "s2"]
        image = Qcow2Image(f)
        assert image.extended_l2 == layout.startswith("extl2")
        assert image.version == (2 if layout == "v2" else 3)
        for s in snaps:
            vm = Qcow2VmState(f, s["name"])
            assert vm.size == s["vm_state_size"] > 0
            assert vm.vm_state_offset % image.l1_span == 0 and vm.vm_state_offset >= 64 * MiB
            check_stream(vm, vm.size, f"{img.name}@{s['name']}")
        # no name: the newest of the two
        assert Qcow2VmState(f).snapshot.name == "s2"
        with pytest.raises(UsageError, match=r"no snapshot named 'nope'.*'s1'.*'s2'"):
            Qcow2VmState(f, "nope")


def _final_state(st: bytes) -> tuple[dict[tuple[str, int], bytes], dict[tuple[str, int], bytes]]:
    """The state a destination ends with: each RAM page's last copy and each device section's body.
    How many RAM iterations a savevm makes (and so which pages it sends twice) depends on timing."""
    import hashlib

    from qevm.format.events import DeviceState, RamFlag, RamPage
    from qevm.format.parser import Parser

    p = Parser()
    p.feed(st)
    p.close()
    ram: dict[tuple[str, int], bytes] = {}
    devices: dict[tuple[str, int], bytes] = {}
    for ev in p.events():
        if isinstance(ev, RamPage):
            kind = b"Z" if ev.flags & RamFlag.ZERO else b"P"
            ram[(ev.block, ev.addr)] = kind + hashlib.sha1(ev.payload).digest()
        elif isinstance(ev, DeviceState):
            devices[(ev.section.idstr, ev.section.instance_id)] = bytes(ev.data)
    return ram, devices


def test_fresh_savevm_state_matches_across_layouts(fresh_images: dict[str, Path]) -> None:
    """The same paused machine saved on seven layouts: the states read back hold the same RAM and device
    state but for a few host timestamps (a translation mistake would garble whole clusters or subclusters)."""
    states = {}
    for name, img in fresh_images.items():
        with open(img, "rb") as f:
            states[name] = _final_state(Qcow2VmState(f, "s1").read())
    ref_ram, ref_dev = states["default"]
    for name, (ram, dev) in states.items():
        assert ram == ref_ram, name
        assert dev.keys() == ref_dev.keys(), name
        differ = sum(1 for k in dev for a, b in zip(dev[k], ref_dev[k], strict=True) if a != b)
        assert differ < 64, (name, differ)


def test_disk_only_and_name_rules(fresh_images: dict[str, Path], tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    shutil.copy(fresh_images["default"], img)
    run(str(QEMU_IMG), "snapshot", "-c", "diskonly", str(img))
    with open(img, "rb") as f:
        snaps = list_snapshots(f)
        assert [(s["name"], s["vm_state_size"] > 0) for s in snaps] == [("s1", True), ("s2", True),
                                                                         ("diskonly", False)]
        with pytest.raises(UsageError, match="disk-only"):
            Qcow2VmState(f, "diskonly")
        # the newest snapshot is disk-only: the default is the newest one with a VM state
        assert Qcow2VmState(f).snapshot.name == "s2"
        with pytest.raises(UsageError, match="disk-only"):
            Qcow2VmState(f, snaps[2]["id"])
    empty = tmp_path / "empty.qcow2"
    run(str(QEMU_IMG), "create", "-q", "-f", "qcow2", str(empty), "1M")
    with open(empty, "rb") as f:
        assert list_snapshots(f) == []
        with pytest.raises(UsageError, match="no internal snapshots"):
            Qcow2VmState(f)
    only_disk = tmp_path / "only-disk.qcow2"
    run(str(QEMU_IMG), "create", "-q", "-f", "qcow2", str(only_disk), "1M")
    run(str(QEMU_IMG), "snapshot", "-c", "a", str(only_disk))
    with open(only_disk, "rb") as f, pytest.raises(UsageError, match="no snapshot holds a VM state"):
        Qcow2VmState(f)


def test_qemu_img_convert_drops_internal_snapshots(fresh_images: dict[str, Path], tmp_path: Path) -> None:
    """Why the compressed-cluster tests below build their image differently: ``convert -c`` keeps
    no internal snapshots."""
    out = tmp_path / "c.qcow2"
    run(str(QEMU_IMG), "convert", "-c", "-O", "qcow2", str(fresh_images["default"]), str(out))
    assert qemu_img_snapshots(out) == []
    with open(out, "rb") as f:
        assert list_snapshots(f) == []


# --------------------------------------------------------------------------------------------
# compressed clusters in the vmstate area: a real stream compressed by qemu-img convert -c,
# then a snapshot whose entry is pointed at it (size fields only; refcounts stay consistent)

VM_OFF = 512 * MiB


def patch_snapshot(img: Path, entry_offset: int, vm_state_size: int, disk_size: int) -> None:
    with open(img, "r+b") as f:
        f.seek(entry_offset + 32)
        f.write(struct.pack(">I", vm_state_size))
        f.seek(entry_offset + 40)
        f.write(struct.pack(">QQ", vm_state_size, disk_size))


def compressed_state_image(tmp: Path, stream: bytes, opts: str) -> tuple[Path, Qcow2Image]:
    raw = tmp / "raw.img"
    with open(raw, "wb") as f:
        f.truncate(VM_OFF)
        f.seek(VM_OFF)
        f.write(stream + bytes(-len(stream) % (64 << 10)))
    img = tmp / "c.qcow2"
    run(str(QEMU_IMG), "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(img))
    raw.unlink()
    run(str(QEMU_IMG), "snapshot", "-c", "packed", str(img))
    with open(img, "rb") as f:
        image = Qcow2Image(f)
        snap = image.snapshots[0]
        assert snap.extra_data_size >= 16
        # a disk size that rounds up to VM_OFF at the first L1 boundary
        patch_snapshot(img, snap.entry_offset, len(stream), VM_OFF - image.l1_span + 1)
    run(str(QEMU_IMG), "check", "-q", str(img))
    return img, image


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=4k", "cluster_size=512",
                                  "extended_l2=on,cluster_size=64k", "extended_l2=on,cluster_size=16k",
                                  "compression_type=zstd"])
def test_compressed_vmstate(tmp_path: Path, opts: str) -> None:
    need(QEMU_IMG)
    stream = small_stream()
    img, _ = compressed_state_image(tmp_path, stream, opts)
    assert qemu_img_snapshots(img)[0]["vm-state-size"] == len(stream)
    with open(img, "rb") as f:
        vm = Qcow2VmState(f, "packed")
        assert vm.vm_state_offset == VM_OFF
        kinds = {vm._extent(VM_OFF + i)[0] for i in range(0, len(stream), vm.image.cluster_size)}
        assert containers._COMPRESSED in kinds, "qemu-img stored no cluster compressed"
        if "zstd" in opts:
            try:
                import zstandard  # type: ignore[import-not-found]  # noqa: F401
            except ImportError:
                with pytest.raises(UsageError, match="zstandard"):
                    vm.read()
                return
        assert vm.read() == stream
        assert chunked_read(vm, 0, len(stream), random.Random(1)) == stream
        vm.seek(0)
        check_stream(vm, len(stream))


# --------------------------------------------------------------------------------------------
# the same L1/L2 translation on guest disk data, against qemu-img convert -O raw


def qemu_io(img: Path, cmds: list[str]) -> None:
    args = [str(QEMU_IO), "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, str(img))
    assert "error" not in out.lower() and "failed" not in out.lower(), out


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=4k", "cluster_size=512", "compat=0.10",
                                  "extended_l2=on,cluster_size=64k", "extended_l2=on,cluster_size=16k"])
def test_guest_reads_match_qemu(tmp_path: Path, opts: str) -> None:
    need(QEMU_IMG, QEMU_IO)
    img = tmp_path / "g.qcow2"
    size = 8 * MiB
    run(str(QEMU_IMG), "create", "-q", "-f", "qcow2", "-o", opts, str(img), str(size))
    with open(img, "rb") as f:
        cs = Qcow2Image(f).cluster_size
        span = Qcow2Image(f).l1_span
    ops = [
        f"write -P 0x11 0 {cs}",  # a whole cluster
        f"write -P 0x22 {cs + 512} 1024",  # part of one (COW, or subclusters with extended L2)
        f"write -c -P 0x33 {4 * cs} {cs}",  # compressed
        f"write -c -P 0x34 {5 * cs} {cs}",
        f"write -P 0x44 {6 * cs} {2 * cs}",
        f"write -z {6 * cs} {cs}",  # zero flag over data
        f"write -z {9 * cs} {cs}",  # zero on nothing
        f"write -P 0x66 {size - 3 * cs} {3 * cs}",  # the end of the disk
    ]
    if span < size:
        ops.append(f"write -P 0x55 {span - 700} 1400")  # across an L1 boundary
    qemu_io(img, ops)
    run(str(QEMU_IMG), "snapshot", "-c", "before", str(img))
    qemu_io(img, [f"write -P 0x77 0 {2 * cs}", f"write -z {4 * cs} {cs}", f"discard {6 * cs} {2 * cs}",
                  f"write -c -P 0x88 {10 * cs} {cs}"])

    def raw_of(*extra: str) -> bytes:
        out = tmp_path / "out.raw"
        run(str(QEMU_IMG), "convert", "-O", "raw", *extra, str(img), str(out))
        data = out.read_bytes()
        out.unlink()
        return data

    with open(img, "rb") as f:
        image = Qcow2Image(f)
        active = image.disk()
        assert active.size == size
        want = raw_of()
        assert active.read() == want
        assert chunked_read(active, 0, 12 * cs, random.Random(3)) == want[:12 * cs]
        snap = image.disk(image.find_snapshot("before"))
        want_snap = raw_of("-l", "snapshot.name=before")
        assert want_snap != want
        assert snap.read() == want_snap


# --------------------------------------------------------------------------------------------
# refusals and malformed images


def test_encrypted_image_is_refused(tmp_path: Path) -> None:
    need(QEMU_IMG)
    img = tmp_path / "e.qcow2"
    run(str(QEMU_IMG), "create", "-q", "--object", "secret,id=sec0,data=hunter2", "-f", "qcow2",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0", str(img), "1M")
    with open(img, "rb") as f:
        assert list_snapshots(f) == []
        with pytest.raises(DecodeError, match="encrypted \\(LUKS\\)") as e:
            Qcow2VmState(f)
        assert e.value.offset == 32


class _Pipe(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._b = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._b.readinto(b)


def test_pipe_is_refused_for_qcow2() -> None:
    with pytest.raises(UsageError, match="seekable"):
        Qcow2VmState(_Pipe(b"QFI\xfb" + bytes(4092)))


@pytest.fixture(scope="module")
def small_image(fresh_images: dict[str, Path]) -> bytes:
    return fresh_images["extl2-64k"].read_bytes()


def mutated(data: bytes, at: int, value: bytes) -> io.BytesIO:
    b = bytearray(data)
    b[at:at + len(value)] = value
    return io.BytesIO(bytes(b))


def test_malformed_headers(small_image: bytes) -> None:
    cases = [
        (io.BytesIO(small_image[:40]), "at least 72", 40),
        (mutated(small_image, 4, struct.pack(">I", 4)), "version 4", 4),
        (mutated(small_image, 20, struct.pack(">I", 30)), "cluster_bits 30", 20),
        (mutated(small_image, 72, struct.pack(">Q", 1 << 40)), "unknown incompatible features", 72),
        (mutated(small_image, 60, struct.pack(">I", 1 << 20)), "snapshots", 60),
        (mutated(small_image, 64, struct.pack(">Q", 12345)), "not cluster aligned", 64),
        (mutated(small_image, 64, struct.pack(">Q", 1 << 40)), "file ends inside snapshot entry 0", 1 << 40),
        (mutated(small_image, 72, struct.pack(">Q", 1 << 2)), "external data file", 72),
    ]
    for f, msg, off in cases:
        with pytest.raises(DecodeError, match=msg) as e:
            Qcow2VmState(f)
        assert e.value.offset == off, (msg, e.value)


def test_malformed_tables(small_image: bytes) -> None:
    image = Qcow2Image(io.BytesIO(small_image))
    snap = image.snapshots[0]
    # snapshot L1 too short to reach the state
    f = mutated(small_image, snap.entry_offset + 8, struct.pack(">I", 1))
    with pytest.raises(DecodeError, match="does not cover the VM state"):
        Qcow2VmState(f, "s1")
    # L1 entry pointing at an unaligned / absent L2 table
    l1_index = image.vm_state_offset(snap) // image.l1_span
    at = snap.l1_table_offset + 8 * l1_index
    for value, msg in [(0x8000000000000000 | 0x10200, "unaligned L2"), (1 << 40, "file ends inside the L2 table")]:
        vm = Qcow2VmState(mutated(small_image, at, struct.pack(">Q", value)), "s1")
        with pytest.raises(DecodeError, match=msg) as e:
            vm.read(100)
        assert e.value.offset is not None
    # a data cluster past the end of the file (an image cut short)
    cs = image.cluster_size
    first = l2_entry_offset(small_image, image, snap, 0)
    beyond = (len(small_image) + 10 * cs) // cs * cs
    vm = Qcow2VmState(mutated(small_image, first, struct.pack(">Q", beyond)), "s1")
    with pytest.raises(DecodeError, match="past the end of the file") as e:
        vm.read(100)
    assert e.value.offset == beyond
    # ... but the cluster holding the end of the file may be short: zeros after it, as QEMU reads
    last = len(small_image) // cs * cs
    assert len(small_image) % cs, "the image ends on a cluster boundary: pick another layout"
    vm = Qcow2VmState(mutated(small_image, first, struct.pack(">Q", last)), "s1")
    assert vm.read(cs) == small_image[last:] + bytes(cs - len(small_image) % cs)


def l2_entry_offset(data: bytes, image: Qcow2Image, snap: containers.Qcow2Snapshot, pos: int) -> int:
    """File offset of the L2 entry that maps byte ``pos`` of the snapshot's VM state."""
    g = image.vm_state_offset(snap) + pos
    (l1e,) = struct.unpack_from(">Q", data, snap.l1_table_offset + 8 * (g // image.l1_span))
    l2 = l1e & 0x00FFFFFFFFFFFE00
    return l2 + ((g // image.cluster_size) % image.l2_entries) * image.l2_entry_size


def test_mutations_never_escape(small_image: bytes) -> None:
    """Random damage to the metadata: a qevm error or bytes, nothing else, and quickly."""
    image = Qcow2Image(io.BytesIO(small_image))
    snap = image.snapshots[1]
    l1 = snap.l1_table_offset
    targets = [(0, 112), (image.snapshots_offset, 200), (l1, 8 * snap.l1_size)]
    l1e = struct.unpack_from(">Q", small_image, l1 + 8 * (image.vm_state_offset(snap) // image.l1_span))[0]
    l2 = l1e & 0x00FFFFFFFFFFFE00
    targets.append((l2, 256))
    rng = random.Random(11)
    for _ in range(300):
        start, length = rng.choice(targets)
        b = bytearray(small_image)
        for _ in range(rng.randint(1, 4)):
            b[min(len(b) - 1, start + rng.randrange(length))] = rng.randrange(256)
        try:
            vm = Qcow2VmState(io.BytesIO(bytes(b)))
            for _ in range(4):  # bounded: at most 4 MiB whatever the claimed size
                if not vm.read(MiB):
                    break
        except QevmError:
            pass


# --------------------------------------------------------------------------------------------
# libvirt save images

XML = "<domain type='kvm'>\n  <name>guest</name>\n  <memory unit='KiB'>131072</memory>\n</domain>\n"
COOKIE = "<qemuDomainSaveCookie>\n  <cpu mode='custom'/>\n</qemuDomainSaveCookie>\n"
FMT = {"raw": 0, "gzip": 1, "bzip2": 2, "xz": 3, "lzop": 4, "zstd": 5, "sparse": 6}


def libvirt_image(stream: bytes, fmt: str = "raw", magic: bytes = b"LibvirtQemudSave", order: str = "<",
                  version: int = 2, cookie: str | None = COOKIE, was_running: int = 1,
                  packed: bytes | None = None) -> bytes:
    """A save image as libvirt's qemuSaveImageCreate writes it (format facts in anchors.md §5)."""
    xml = XML.encode() + b"\0"
    ck = cookie.encode() + b"\0" if cookie is not None else b""
    data_len = len(xml) + len(ck) + 64 * 1024  # the 64 KiB left for editing the XML in place
    header = magic + struct.pack(order + "5I", version, data_len, was_running, FMT[fmt],
                                 len(xml) if cookie is not None else 0) + bytes(56)
    assert len(header) == 92
    body = {"raw": lambda s: s, "sparse": lambda s: s, "gzip": gzip.compress, "bzip2": bz2.compress,
            "xz": lzma.compress, "lzop": lambda s: b"\x89LZO\x00\r\n\x1a\n" + s,
            "zstd": lambda s: b"\x28\xb5\x2f\xfd" + s}[fmt](stream) if packed is None else packed
    return header + xml + ck + bytes(data_len - len(xml) - len(ck)) + body


def test_libvirt_damaged_compressed_stream() -> None:
    stream = small_stream()
    data = bytearray(libvirt_image(stream, "gzip"))
    data[-5000:-4000] = bytes(1000)
    sv = LibvirtSave(io.BytesIO(bytes(data)))
    with pytest.raises(DecodeError, match="gzip-compressed stream is damaged") as e:
        sv.stream().read()
    assert e.value.offset == sv.stream_offset


@pytest.mark.parametrize("fmt", ["raw", "gzip", "bzip2", "xz"])
def test_libvirt_save_image(fmt: str) -> None:
    stream = small_stream()
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream, fmt)), "guest.save")
    assert sv.complete and sv.version == 2 and sv.was_running and sv.byteorder == "little"
    assert sv.format_name == fmt and sv.compression == (None if fmt == "raw" else fmt)
    assert sv.xml == XML and sv.cookie == COOKIE
    assert sv.stream_offset == 92 + sv.data_len
    inp = sv.to_input()
    assert inp.seekable == (fmt == "raw")
    assert inp.size == (len(stream) if fmt == "raw" else None)
    an = read_stream(inp)
    assert an.size == len(stream) and an.vmdesc is not None
    assert all(d.struct is not None for d in an.devices)
    sv.close()


def test_libvirt_gzip_cli_compressed(tmp_path: Path) -> None:
    """libvirt pipes the stream through ``gzip -c``: use the real program when there is one."""
    gz = require_binary("gzip", "apt-get install gzip")
    stream = small_stream()
    packed = subprocess.run([gz, "-c"], input=stream, capture_output=True, check=True).stdout
    img = tmp_path / "g.save"
    img.write_bytes(libvirt_image(stream, "gzip", packed=packed))
    with LibvirtSave.open(str(img)) as sv:
        assert sv.compression == "gzip"
        assert sv.stream().read() == stream


def test_libvirt_variants() -> None:
    stream = small_stream()
    # big-endian host, no cookie, paused guest
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream, order=">", cookie=None, was_running=0)))
    assert sv.byteorder == "big" and sv.cookie is None and not sv.was_running
    assert sv.stream().read() == stream
    # version 1 images were never compressed: the format field is not applied
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream, "raw", version=1)))
    assert sv.compression is None and sv.stream().read(4) == b"QEVM"
    # sparse (mapped-ram): no compressor, stream offsets are file offsets
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream, "sparse")))
    assert sv.compression is None and sv.stream_seekable and sv.file_offset == sv.stream_offset
    # an incomplete image ("Part"): parsed, and reported
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream[:1000], magic=b"LibvirtQemudPart")))
    assert not sv.complete
    # from a pipe: read sequentially
    sv = LibvirtSave(_Pipe(libvirt_image(stream, "xz")))
    assert not sv.to_input().seekable
    assert read_stream(sv.to_input()).size == len(stream)
    sv = LibvirtSave(_Pipe(libvirt_image(stream, "raw")))
    assert read_stream(sv.to_input()).size == len(stream)


def test_libvirt_external_compressors() -> None:
    stream = small_stream()
    sv = LibvirtSave(io.BytesIO(libvirt_image(stream, "lzop")), "vm.save")
    with pytest.raises(UsageError, match=r"lzop -dc --ignore-warn") as e:
        sv.stream()
    assert f"tail -c +{sv.stream_offset + 1} vm.save" in str(e.value)
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        sv = LibvirtSave(io.BytesIO(libvirt_image(stream, "zstd")), "vm.save")
        with pytest.raises(UsageError, match=r"zstd -dc"):
            sv.stream()
    else:
        packed = zstandard.ZstdCompressor().compress(stream)
        sv = LibvirtSave(io.BytesIO(libvirt_image(stream, "zstd", packed=packed)))
        assert read_stream(sv.to_input()).size == len(stream)


def test_libvirt_malformed() -> None:
    good = libvirt_image(small_stream()[:2000])
    cases = [
        (b"LibvirtQemudNope" + good[16:], "not a libvirt save image", 0),
        (good[:50], "file ends inside the libvirt save header", 50),
        (good[:16] + struct.pack("<I", 3) + good[20:], "version 3", 16),
        (good[:28] + struct.pack("<I", 9) + good[32:], "unknown libvirt save image format 9", 28),
        (good[:20] + struct.pack("<I", 0) + good[24:], "data_len 0", 20),
        (good[:20] + struct.pack("<I", 0x7FFFFFF0) + good[24:], "not a save image", 20),
        (good[:32] + struct.pack("<I", 0x7FFFF) + good[36:], "cookie offset", 32),
        (good[:92 + 100], "file ends inside the domain XML area", 192),
    ]
    for data, msg, off in cases:
        with pytest.raises(DecodeError, match=msg) as e:
            LibvirtSave(io.BytesIO(data))
        assert e.value.offset == off, (msg, e.value)
