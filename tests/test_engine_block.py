"""Block migration (QEMU 7.2's ``block`` section, ``migrate -b``) and dirty-bitmap migration
(``dirty-bitmaps``) between two ``qevm vm`` processes driven with ``qemu.qmp``; the images are
checked with QEMU's ``qemu-img compare`` / ``check``, the streams with ``qevm dump``, and QEMU 7.2
itself loads a block-migration stream the engine wrote."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require_binary, require_fixture
from test_engine import MIB, VM, assert_continues, dump_doc, incoming_port, run, vms
from test_engine import work as work  # the fixture, shared

DISK = 16 * MIB


def _raw_disk(path: Path, size: int = DISK, seed: int = 7) -> None:
    """Random data, a run of zeros (zero blocks), random data again."""
    r = random.Random(seed)
    third = size // 3 // MIB * MIB
    path.write_bytes(r.randbytes(third) + bytes(third) + r.randbytes(size - 2 * third))


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    require_binary("qemu-img")
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def _identical(a: Path, b: Path) -> None:
    r = _qemu_img("compare", str(a), str(b))
    assert r.returncode == 0 and "Images are identical." in r.stdout, r.stdout + r.stderr


async def _bitmaps(vm: VM) -> list[dict[str, Any]]:
    blk = await vm.cmd("query-block")
    return blk[0]["inserted"]["dirty-bitmaps"]  # type: ignore[no-any-return]


async def _sha(vm: VM, node: str, name: str) -> str:
    return (await vm.cmd("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name}))["sha256"]  # type: ignore


# -- the disk: qcow2 guest writes ----------------------------------------------------------------------------

def test_qcow2_guest_writes_copy_on_write(work: Path) -> None:
    """``GuestWriter`` (the engine's qcow2 disk): random writes, partial and whole clusters, over data
    a snapshot shares; ``qemu-img check`` finds the image clean, ``qemu-img compare`` finds it equal
    to the same writes applied to a raw file, and the snapshot still holds its old content."""
    from qevm.io.qcow2write import GuestWriter

    img, raw, old = work / "a.qcow2", work / "b.raw", work / "s1.raw"
    size = 16 * MIB
    assert _qemu_img("create", "-f", "qcow2", str(img), "16M").returncode == 0
    assert subprocess.run(["qemu-io", "-c", "write -P 0x11 0 3M", str(img)], capture_output=True).returncode == 0
    assert _qemu_img("snapshot", "-c", "s1", str(img)).returncode == 0
    want = bytearray(size)
    want[:3 * MIB] = b"\x11" * (3 * MIB)
    r = random.Random(1)
    w = GuestWriter(str(img))
    try:
        for _ in range(150):
            off = r.randrange(size)
            n = min(r.choice([512, 4096, 70000, MIB]), size - off)
            data = bytes([r.randrange(256)]) * n
            w.write(off, data)
            want[off:off + n] = data
        assert w.read(0, size) == bytes(want)
    finally:
        w.close()
    raw.write_bytes(want)
    c = _qemu_img("check", str(img))
    assert c.returncode == 0 and "No errors were found on the image." in c.stdout, c.stdout
    _identical(img, raw)
    assert _qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", str(img), str(old)).returncode == 0
    assert old.read_bytes() == b"\x11" * (3 * MIB) + bytes(size - 3 * MIB)


# -- block migration ----------------------------------------------------------------------------------------

def test_block_migration_raw_over_tcp(work: Path) -> None:
    """``migrate`` with ``blk: true`` while the guest writes RAM and its disk: bulk, dirty blocks,
    completion; the destination's image equals the source's, RAM and CPU state too, the serial
    numbering goes on, and the block capability is off again afterwards (QEMU 7.2)."""
    src_img, dst_img = work / "src.raw", work / "dst.raw"
    _raw_disk(src_img)
    dst_img.write_bytes(bytes(DISK))

    async def main() -> None:
        api = ("--migration-api", "7.2")
        src = VM(work, "src", *api, "--drive", str(src_img), "--disk-every", "300", ram="16M", dirty_rate=3000)
        dst = VM(work, "dst", *api, "--drive", str(dst_img), "--incoming", "tcp:127.0.0.1:0", "-S", ram="16M")
        async with vms(src, dst):
            await src.enable_events()
            port = incoming_port(await dst.cmd("query-migrate"))
            await src.cmd("migrate-set-parameters", {"max-bandwidth": 32 * MIB, "downtime-limit": 100})
            # a bitmap goes along; on the destination its successor records block migration's writes
            await src.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": "b0", "granularity": 65536})
            await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "dirty-bitmaps",
                                                                         "state": True}]})
            await asyncio.sleep(0.5)
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}", "blk": True})
            caps = {c["capability"]: c["state"] for c in await src.cmd("query-migrate-capabilities")}
            assert caps["block"] is True
            mid = await src.wait_migration(want=("active",))
            assert mid["disk"]["total"] == DISK and 0 <= mid["disk"]["remaining"] <= DISK
            info = await src.wait_migration()
            assert info["status"] == "completed", info
            assert "disk" not in info  # QEMU drops its block state once the migration completed
            assert info["ram"]["transferred"] > DISK
            caps = {c["capability"]: c["state"] for c in await src.cmd("query-migrate-capabilities")}
            assert caps["block"] is False  # migrate -b sets it for this migration only
            assert (await dst.wait_migration())["status"] == "completed"
            a = await src.cmd("x-qevm-query-machine", {"digest": True})
            b = await dst.cmd("x-qevm-query-machine", {"digest": True})
            assert a["ram-sha256"] == b["ram-sha256"] and a["ops"] == b["ops"]
            assert a["ops"] > 300 * 4, "the guest wrote its disk during the migration"
            _identical(src_img, dst_img)
            (b0,) = await _bitmaps(dst)
            assert b0["name"] == "b0" and b0["count"] == DISK and b0["recording"] is True
            assert 0 < (await _bitmaps(src))[0]["count"] < DISK
            await dst.cmd("cont")
            await asyncio.sleep(0.6)
            assert_continues(src.lines(), dst.lines())

    run(main())


def test_block_migration_qcow2_through_a_file(work: Path) -> None:
    """HMP ``migrate -b`` of a qcow2 drive into a file: ``qevm dump`` reads the stream (block
    records, then ram, the device sections), a second engine loads it into its own qcow2 image,
    which ``qemu-img`` finds clean and equal to the source's (zero blocks included)."""
    src_img, dst_img = work / "src.qcow2", work / "dst.qcow2"
    assert _qemu_img("create", "-f", "qcow2", str(src_img), "8M").returncode == 0
    for cmd in ("write -P 0x5a 0 3M", "write -P 0x11 5M 1M", "write -z 5M 64k"):
        r = subprocess.run(["qemu-io", "-c", cmd, str(src_img)], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert _qemu_img("create", "-f", "qcow2", str(dst_img), "8M").returncode == 0
    mig = work / "blk.mig"

    async def main() -> None:
        api = ("--migration-api", "7.2")
        src = VM(work, "src", *api, "--drive", str(src_img), "--disk-every", "16", ram="8M")
        async with vms(src):
            await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "zero-blocks", "state": True}]})
            await asyncio.sleep(0.4)
            assert await src.hmp(f"migrate -b file:{mig}") == ""
            assert (await src.wait_migration())["status"] == "completed"
        dst = VM(work, "dst", *api, "--drive", str(dst_img), "--incoming", f"file:{mig}", "-S", ram="8M")
        async with vms(dst):
            assert (await dst.wait_migration())["status"] == "completed"
            blocks = (await dst.cmd("query-block"))
            assert blocks[0]["device"] == "drive0" and blocks[0]["inserted"]["image"]["virtual-size"] == 8 * MIB

    run(main())
    _identical(src_img, dst_img)
    r = _qemu_img("check", str(dst_img))
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout
    doc = dump_doc(mig)
    names = [s["name"] for s in doc["sections"]]
    assert names == ["block", "ram", "timer", "cpu", "serial", "globalstate"]
    block = doc["sections"][0]
    assert block["records"]["block"] >= 8 and block["records"]["progress"] >= 2
    assert block["version"] == 1 and block["kind"] == "live"


def test_incremental_block_migration_skips_unallocated(work: Path) -> None:
    """HMP ``migrate -i`` (block-incremental: a shared base) sends only the chunks the qcow2 image
    allocates (two of 32 here), and ``block-incremental`` is off again afterwards; the fresh
    destination image ends equal to the source's."""
    src_img, dst_img = work / "src.qcow2", work / "dst.qcow2"
    assert _qemu_img("create", "-f", "qcow2", str(src_img), "32M").returncode == 0
    for cmd in ("write -P 0x5a 2M 100k", "write -P 0x33 20M 1M"):
        assert subprocess.run(["qemu-io", "-c", cmd, str(src_img)], capture_output=True).returncode == 0
    assert _qemu_img("create", "-f", "qcow2", str(dst_img), "32M").returncode == 0
    mig = work / "inc.mig"

    async def main() -> None:
        api = ("--migration-api", "7.2")
        async with vms(VM(work, "src", *api, "--drive", str(src_img), ram="8M")) as (src,):
            assert await src.hmp(f"migrate -i file:{mig}") == ""
            assert (await src.wait_migration())["status"] == "completed"
            params = await src.cmd("query-migrate-parameters")
            assert params["block-incremental"] is False
        async with vms(VM(work, "dst", *api, "--drive", str(dst_img), "--incoming", f"file:{mig}", "-S",
                          ram="8M")) as (dst,):
            assert (await dst.wait_migration())["status"] == "completed"

    run(main())
    _identical(src_img, dst_img)
    block = dump_doc(mig)["sections"][0]
    assert block["name"] == "block" and block["records"]["block"] == 2


def _qemu72_load(work: Path, stream: Path, disk: Path,
                 queries: list[tuple[str, dict[str, Any]]]) -> tuple[list[Any], bytes]:
    """Load ``stream`` into QEMU 7.2 (pc-i440fx-7.2, an IDE disk on ``drive0``, -S), run ``queries``;
    returns query-migrate then their answers, and QEMU's stdout."""
    require_binary("qemu-system-x86_64")
    from qemu.qmp import QMPClient

    sock = work / "q72.qmp"
    proc = subprocess.Popen(["qemu-system-x86_64", "-M", "pc-i440fx-7.2", "-accel", "tcg", "-m", "16", "-nodefaults",
                             "-display", "none", "-S", "-drive", f"file={disk},format=raw,if=none,id=drive0",
                             "-device", "ide-hd,drive=drive0", "-incoming", f"exec:cat {stream}",
                             "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def main() -> list[Any]:
        c = QMPClient("qemu72")
        deadline = time.monotonic() + 30
        while True:
            try:
                await c.connect(str(sock))
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        while True:
            info: dict[str, Any] = await c.execute("query-migrate")  # type: ignore[assignment]
            if info.get("status") in ("completed", "failed") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        out: list[Any] = [info]
        for name, args in queries:
            out.append(await c.execute(name, args))
        with contextlib.suppress(Exception):  # QEMU may close before the reply is read (EOFError)
            await c.execute("quit")
        with contextlib.suppress(Exception):
            await c.disconnect()
        return out

    try:
        got = run(main())
        stdout, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got[0]["status"] == "completed", (got[0], err)
    return got, stdout


def test_qemu_72_loads_an_engine_block_stream(work: Path) -> None:
    """The strongest check of the format: QEMU 7.2 (``-incoming``, an IDE disk on ``drive0`` of the
    same size) loads a stream whose block section the engine's saver wrote (bulk, a dirty pass,
    completion), and its image then equals the engine's."""
    from qevm.engine.blockdev import Disk
    from qevm.engine.blockmig import BlockSaver
    from qevm.engine.machine import Machine
    from qevm.format.events import Configuration, EndOfFile, FileHeader, Footer, Section, SectionHeader
    from qevm.format.records import SectionKind

    src_img, dst_img = work / "src.raw", work / "dst.raw"
    _raw_disk(src_img, 8 * MIB)
    dst_img.write_bytes(bytes(8 * MIB))
    m = Machine(1 * MIB, seed=3, disk_every=1)
    m.disk = Disk(str(src_img))
    saver = BlockSaver(m, zero_blocks=True)
    sec = Section(3, "block", 0, 1, "block")
    out = bytearray()
    w = out.extend
    w(FileHeader(0).encode() + Configuration(0, "pc-i440fx-7.2", []).encode())
    phases = ((SectionKind.START, lambda: saver.setup(w)), (SectionKind.PART, lambda: saver.iterate(w, None)),
              (SectionKind.PART, lambda: saver.iterate(w, None)), (SectionKind.END, lambda: saver.complete(w)))
    for kind, body in phases:
        w(SectionHeader(0, kind, sec).encode())
        body()
        w(Footer(0, 3).encode())
        if kind != SectionKind.END:
            m.run_ops(300)  # the guest writes between the iterations: dirty chunks go again
    w(EndOfFile(0).encode())
    m.close()
    mig = work / "blk.mig"
    mig.write_bytes(out)
    assert saver.blocks_sent > 8, "the dirty pass sent blocks again"
    assert [s["name"] for s in dump_doc(mig)["sections"]] == ["block"]

    _, stdout = _qemu72_load(work, mig, dst_img, [])
    assert b"Completed 100 %" in stdout
    _identical(src_img, dst_img)


# -- real QEMU 7.2 streams: one codec each way, and the engine's loader ----------------------------------------

def _live_records(name: str) -> list[Any]:
    from qevm.format.events import LiveRecord
    from qevm.io.reader import iter_events

    return [ev for ev in iter_events(str(require_fixture(name))) if isinstance(ev, LiveRecord)
            and ev.handler in ("block", "dirty-bitmap")]


def test_qemu_72_block_stream_reencodes_and_loads(work: Path) -> None:
    """QEMU 7.2's own block-migration stream (fixture block-7.2: an 8 MiB raw disk with three
    writes): every record re-encodes byte for byte with ``encode_block_record``, and the engine's
    loader, fed its records, rebuilds the disk QEMU migrated."""
    from qevm.engine.blockdev import Disk
    from qevm.engine.blockmig import LiveLoader
    from qevm.engine.machine import Machine
    from qevm.errors import QevmError
    from qevm.format.live import BLOCK_CHUNK, BlockFlag, encode_block_record

    recs = _live_records("block-7.2")
    assert {r.kind for r in recs} == {"block", "progress", "eos"}
    for r in recs:
        info = r.info
        if r.kind == "block":
            data = None if info.get("zero") else r.raw[-BLOCK_CHUNK:]
            again = encode_block_record(info["flags"], info["sector"], info["device"], data)
        else:
            again = encode_block_record(info["flags"], info.get("percent", 0))
        assert again == r.raw, (r.offset, r.kind)
    assert any(r.info["flags"] & BlockFlag.PROGRESS and r.info["percent"] == 100 for r in recs)
    img = work / "dst.raw"
    img.write_bytes(b"\xee" * (8 * MIB))  # garbage: every chunk must be overwritten
    m = Machine(1 * MIB)
    m.disk = Disk(str(img))
    ld = LiveLoader(m)
    for r in recs:
        ld.record(r)
    m.close()
    want = bytearray(8 * MIB)
    want[0:MIB] = b"\xab" * MIB
    want[3 * MIB:3 * MIB + (512 << 10)] = b"\xcd" * (512 << 10)
    want[7 * MIB:7 * MIB + 4096] = b"\x01" * 4096
    assert img.read_bytes() == bytes(want)
    assert ld.blocks == 8 and ld.progress == 100
    with pytest.raises(QevmError, match="Error unknown block device drive0"):  # no --drive here
        LiveLoader(Machine(1 * MIB)).record(next(r for r in recs if r.kind == "block"))


def test_qemu_72_dirty_bitmap_stream_reencodes_and_loads(work: Path) -> None:
    """QEMU 7.2's dirty-bitmap stream (fixture dirty-bitmap-7.2: node disk0, 64 MiB, three bitmaps
    after writes at 0 (64k), 1M (200k), 40M (3M); bitmap2 disabled after the first): the records
    re-encode byte for byte, and the engine's loader ends with QEMU's bitmaps: names, granularity,
    flags and the counts QEMU reported, which depend on the bit layout of the serialized chunks."""
    from qevm.engine.blockdev import Disk
    from qevm.engine.blockmig import LiveLoader
    from qevm.engine.machine import Machine
    from qevm.format.live import DirtyBitmapFlag as F
    from qevm.format.live import encode_dbitmap_record

    recs = _live_records("dirty-bitmap-7.2")
    for r in recs:
        i = r.info
        fl = i["flags"] & ~(F.DEVICE_NAME | F.BITMAP_NAME)
        node = i["node"] if i["flags"] & F.DEVICE_NAME else None
        bitmap = i["bitmap"] if i["flags"] & F.BITMAP_NAME else None
        size = i.get("buf_size")
        again = encode_dbitmap_record(fl, node=node, bitmap=bitmap, granularity=i.get("granularity", 0),
                                      bitmap_flags=i.get("bitmap_flags", 0), start_sector=i.get("start_sector", 0),
                                      nr_sectors=i.get("nr_sectors", 0), bits=r.raw[-size:] if size else None)
        assert again == r.raw, (r.offset, r.kind)
    img = work / "d.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MIB)
    m = Machine(1 * MIB)
    m.disk = Disk(str(img), node_name="disk0")
    ld = LiveLoader(m)
    for r in recs:
        ld.record(r)
    got = {b.name: b.info() for b in m.disk.bitmaps}
    m.close()
    k64, m1 = 64 << 10, 1 << 20
    assert got == {
        "bitmap0": {"name": "bitmap0", "recording": True, "persistent": False, "busy": False, "granularity": k64,
                    "count": (1 + 4 + 48) * k64},
        "bitmap1": {"name": "bitmap1", "recording": True, "persistent": True, "busy": False, "granularity": m1,
                    "count": 5 * m1},
        "bitmap2": {"name": "bitmap2", "recording": False, "persistent": False, "busy": False, "granularity": k64,
                    "count": k64},
    }


def test_qemu_72_loads_an_engine_dirty_bitmap_stream(work: Path) -> None:
    """QEMU 7.2 loads the engine's dirty-bitmap section (START, BITS in chunks, COMPLETE) into its
    ``drive0``: the same bitmaps, granularities and counts in its ``query-block``, and its own
    ``x-debug-block-dirty-bitmap-sha256`` gives the engine's digests."""
    from qevm.engine.blockdev import DirtyBitmap, Disk
    from qevm.engine.blockmig import DirtyBitmapSaver
    from qevm.engine.machine import Machine
    from qevm.format.events import Configuration, EndOfFile, FileHeader, Footer, Section, SectionHeader
    from qevm.format.records import SectionKind

    img = work / "d.raw"
    img.write_bytes(bytes(64 * MIB))
    m = Machine(1 * MIB, seed=5, disk_every=1)
    m.disk = Disk(str(img))
    for name, g, on in (("fine", 4096, True), ("coarse", 1 << 20, True), ("gran64k", 65536, True),
                        ("idle", 65536, False)):
        m.disk.bitmaps.append(DirtyBitmap(name, g, m.disk.size, enabled=on))
    m.run_ops(3000)
    saver = DirtyBitmapSaver(m)
    sec = Section(4, "dirty-bitmap", 0, 1, "dirty-bitmap")
    out = bytearray()
    w = out.extend
    w(FileHeader(0).encode() + Configuration(0, "pc-i440fx-7.2", []).encode())
    for kind, body in ((SectionKind.START, lambda: saver.setup(w)), (SectionKind.END, lambda: saver.complete(w))):
        w(SectionHeader(0, kind, sec).encode())
        body()
        w(Footer(0, 4).encode())
    w(EndOfFile(0).encode())
    want = {b.name: (b.granularity, b.count, b.sha256()) for b in m.disk.bitmaps}
    m.close()
    mig = work / "dbm.mig"
    mig.write_bytes(out)
    assert [s["name"] for s in dump_doc(mig)["sections"]] == ["dirty-bitmap"]
    qemu_disk = work / "q.raw"
    qemu_disk.write_bytes(bytes(64 * MIB))
    names = sorted(want)
    got, _ = _qemu72_load(work, mig, qemu_disk, [("query-block", {}), *[
        ("x-debug-block-dirty-bitmap-sha256", {"node": "drive0", "name": n}) for n in names]])
    blk = next(b for b in got[1] if b["device"] == "drive0")
    have = {b["name"]: (b["granularity"], b["count"]) for b in blk["inserted"]["dirty-bitmaps"]}
    assert have == {n: v[:2] for n, v in want.items()}
    assert want["fine"][1] > 0 and want["idle"][1] == 0
    assert [r["sha256"] for r in got[2:]] == [want[n][2] for n in names]


# -- dirty bitmaps ------------------------------------------------------------------------------------------

def test_dirty_bitmap_migration(work: Path) -> None:
    """Named bitmaps of the drive (QMP ``block-dirty-bitmap-add``) recording the guest's disk writes
    go with ``dirty-bitmaps`` (no block migration: the images are shared storage): the destination
    has the same bitmaps, granularity, counts, flags and bits (``x-debug-block-dirty-bitmap-sha256``)."""
    img = work / "disk.qcow2"
    assert _qemu_img("create", "-f", "qcow2", str(img), "32M").returncode == 0

    async def main() -> None:
        from qemu.qmp import ExecuteError

        src = VM(work, "src", "--drive", str(img), "--disk-every", "40", ram="8M", dirty_rate=4000)
        dst = VM(work, "dst", "--drive", str(img), "--incoming", "defer", "-S", ram="8M")
        async with vms(src, dst):
            await src.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"})
            await src.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": "fine", "granularity": 4096,
                                                     "persistent": True})
            await src.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": "off", "disabled": True})
            for args, why in (({"node": "drive0", "name": "b0"}, "Bitmap already exists: b0"),
                              ({"node": "nope", "name": "x"}, "Cannot find device=nope nor node_name=nope"),
                              ({"node": "drive0", "name": "g", "granularity": 1000},
                               "Granularity must be power of 2, and at least 512")):
                with pytest.raises(ExecuteError) as ei:
                    await src.cmd("block-dirty-bitmap-add", args)
                assert ei.value.error.error.desc == why
            await asyncio.sleep(0.8)
            for cap in ("dirty-bitmaps", "events"):
                await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": True}]})
            await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = incoming_port(await dst.cmd("query-migrate"))
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            assert (await src.wait_migration())["status"] == "completed"
            assert (await dst.wait_migration())["status"] == "completed"
            before = await _bitmaps(src)
            after = await _bitmaps(dst)
            assert [b["name"] for b in before] == ["b0", "fine", "off"]
            assert after == before
            by = {b["name"]: b for b in after}
            assert by["b0"]["count"] > 0 and by["fine"]["count"] > 0 and by["off"]["count"] == 0
            assert by["fine"]["granularity"] == 4096 and by["fine"]["persistent"] is True
            assert by["b0"]["granularity"] == 64 << 10 and by["off"]["recording"] is False
            for b in before:
                assert await _sha(src, "drive0", b["name"]) == await _sha(dst, "drive0", b["name"])
            await dst.cmd("block-dirty-bitmap-remove", {"node": "drive0", "name": "off"})
            assert [b["name"] for b in await _bitmaps(dst)] == ["b0", "fine"]

    run(main())


def test_dirty_bitmaps_with_mapping_through_a_file(work: Path) -> None:
    """``block-bitmap-mapping`` on both ends renames a bitmap (node and bitmap aliases on the wire),
    drops the unmapped one, and its ``persistent`` transform applies; ``qevm dump`` reads the
    dirty-bitmap section (START, BITS, COMPLETE records); without the capability nothing is sent."""
    img = work / "disk.raw"
    img.write_bytes(bytes(8 * MIB))
    mig = work / "dbm.mig"
    node = "#block100"

    async def main() -> None:
        src = VM(work, "src", "--drive", str(img), "--disk-every", "2", ram="8M", dirty_rate=4000)
        async with vms(src):
            for name in ("keep", "drop"):
                await src.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": name, "granularity": 8192})
            await asyncio.sleep(0.6)
            await src.cmd("migrate-set-capabilities",
                          {"capabilities": [{"capability": "dirty-bitmaps", "state": True}]})
            await src.cmd("migrate-set-parameters", {"block-bitmap-mapping": [
                {"node-name": node, "alias": "n0", "bitmaps": [
                    {"name": "keep", "alias": "a0", "transform": {"persistent": True}}]}]})
            await src.cmd("migrate", {"uri": f"file:{mig}"})
            assert (await src.wait_migration())["status"] == "completed"
            state["src"] = {b["name"]: b for b in await _bitmaps(src)}
            state["sha"] = await _sha(src, "drive0", "keep")
        dst = VM(work, "dst", "--drive", str(img), "--incoming", "defer", "-S", ram="8M")
        async with vms(dst):
            await dst.cmd("migrate-set-parameters", {"block-bitmap-mapping": [
                {"node-name": node, "alias": "n0", "bitmaps": [{"name": "renamed", "alias": "a0"}]}]})
            await dst.cmd("migrate-incoming", {"uri": f"file:{mig}"})
            assert (await dst.wait_migration())["status"] == "completed"
            got = await _bitmaps(dst)
            assert [b["name"] for b in got] == ["renamed"]
            keep = state["src"]["keep"]
            assert got[0]["count"] == keep["count"] > 0 and got[0]["granularity"] == 8192
            assert got[0]["persistent"] is True  # the source's transform
            assert await _sha(dst, node, "renamed") == state["sha"]

    state: dict[str, Any] = {}
    run(main())
    doc = dump_doc(mig)
    dbm = [s for s in doc["sections"] if s["name"] == "dirty-bitmap"]
    assert len(dbm) == 1 and dbm[0]["records"]["start"] == 1 and dbm[0]["records"]["complete"] == 1
    assert dbm[0]["records"]["bits"] >= 1
    assert [s["name"] for s in doc["sections"]][:2] == ["ram", "dirty-bitmap"]


def test_block_capability_only_in_72_api(work: Path) -> None:
    async def main() -> None:
        from qemu.qmp import ExecuteError

        async with vms(VM(work, "a", ram="8M")) as (a,):
            with pytest.raises(ExecuteError, match="Parameter 'blk' is unexpected"):
                await a.cmd("migrate", {"uri": "exec:cat > /dev/null", "blk": True})
            assert await a.cmd("query-block") == []

    run(main())

