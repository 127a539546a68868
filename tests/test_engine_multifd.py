"""Multifd and mapped-ram in the engine (``qevm vm``): two engines driven with QEMU's QMP client,
extra connections carrying pages in QEMU 10.0's multifd packets, the main stream's MULTIFD_FLUSH,
``file:`` + ``mapped-ram`` written by the channel threads, ``qevm tap`` in between."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import require_peer  # noqa: E402
from test_engine import (  # noqa: E402
    ENV,
    MIB,
    VM,
    assert_continues,
    dump_doc,
    qevm_cli,
    run,
    vms,
)
from test_engine import work as work  # noqa: E402 - the fixture, shared

from qevm.format.multifd import (  # noqa: E402
    FLAG_SYNC,
    ChannelDecoder,
    MultifdInit,
    MultifdPacket,
    mapped_ram_header,
    packet_len,
)

# -- the codec ------------------------------------------------------------------------------------------------

def test_packet_codec_round_trip() -> None:
    """Header layout of format.md §3.11 (1344 bytes for 4 KiB pages), both directions, and the
    channel decoder fed whole and one byte at a time."""
    assert packet_len(4096) == 1344
    init = MultifdInit(1).encode()
    assert len(init) == 64 and init[:8] == bytes.fromhex("1122334400000001") and init[24] == 1
    pkt = MultifdPacket(0, 7, "demo.ram", 2, 1, [0x3000, 0x1000, 0x5000], 2 * 4096)
    raw = pkt.encode(4096)
    assert len(raw) == 1344
    magic, version, flags, alloc, normal, nps, num, zero = struct.unpack_from(">IIIIIIQI", raw)
    assert (magic, version, flags, alloc, normal, nps, num, zero) == (0x11223344, 1, 0, 128, 2, 8192, 7, 1)
    assert raw[64:72] == b"demo.ram" and raw[72] == 0
    assert struct.unpack_from(">3Q", raw, 320) == (0x3000, 0x1000, 0x5000)
    assert MultifdPacket.decode(raw, 4096) == pkt and MultifdPacket.decode(raw, 4096).encode(4096) == raw
    sync = MultifdPacket(FLAG_SYNC, 8).encode(4096)
    assert struct.unpack_from(">III", sync, 8) == (1, 0, 0)
    data = b"a" * 4096 + b"b" * 4096
    stream = init + raw + data + sync
    for step in (len(stream), 1):
        dec = ChannelDecoder(4096)
        items: list[Any] = []
        for i in range(0, len(stream), step):
            items += dec.feed(stream[i:i + step])
        dec.close()
        assert items[0] == MultifdInit(1)
        assert items[1] == (pkt, data) and items[2][0].is_sync and items[2][1] == b""
        assert items[2][0].encode(4096) == sync
    bad = bytearray(raw)
    bad[12:16] = struct.pack(">I", 129)
    with pytest.raises(Exception, match="received packet with 129 pages, expected 128"):
        MultifdPacket.decode(bytes(bad), 4096)
    h = mapped_ram_header(100, 32 * MIB, 4096)
    assert (h.bitmap_offset, h.pages_offset) == (128, 0x100000)


# -- helpers --------------------------------------------------------------------------------------------------

async def _multifd(vm: VM, channels: int, *caps: str) -> None:
    await vm.enable_events("multifd", *caps)
    await vm.cmd("migrate-set-parameters", {"multifd-channels": channels})


@contextlib.asynccontextmanager
async def _pair(work: Path) -> AsyncIterator[tuple[VM, VM]]:
    """A running source and a destination waiting (-incoming defer), both with multifd, 2 channels."""
    src = VM(work, "src", ram="32M", dirty_rate=1000)
    dst = VM(work, "dst", "--incoming", "defer", ram="32M")
    async with vms(src, dst):
        await _multifd(src, 2)
        await _multifd(dst, 2)
        yield src, dst


async def _migrate_multifd(work: Path, channels: int, *, via_tap: bool = False, bandwidth: int = 24 * MIB) -> None:
    ram = "32M" if bandwidth < 1 << 30 else "96M"
    fill = () if bandwidth < 1 << 30 else ("--fill", "1.0")
    src = VM(work, "src", *fill, ram=ram, dirty_rate=3000 if not fill else 30000)
    dst = VM(work, "dst", "--incoming", "defer", "-S", ram=ram)
    size = int(ram[:-1]) * MIB
    tap: subprocess.Popen[bytes] | None = None
    rec = work / "tapped.mig"
    async with vms(src, dst):
        rp = ("return-path",) if bandwidth > 1 << 30 else ()  # the unlimited run: with a return path too
        await _multifd(src, channels, *rp)
        await _multifd(dst, channels, *rp)
        await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = int((await dst.cmd("query-migrate"))["socket-address"][0]["port"])
        target = f"tcp:127.0.0.1:{port}"
        if via_tap:
            tsock = work / "tap.sock"
            tap = subprocess.Popen([sys.executable, "-m", "qevm.cli.main", "tap", f"unix:{tsock}", target, "-o",
                                    str(rec), "--json"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 20
            while not tsock.exists():  # listening (a probe connection would be taken for the source)
                assert time.monotonic() < deadline and tap.poll() is None, "the tap did not listen"
                await asyncio.sleep(0.05)
            target = f"unix:{tsock}"
        await src.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth, "downtime-limit": 100})
        await asyncio.sleep(0.5)
        await src.cmd("migrate", {"uri": target})
        info = await src.wait_migration()
        assert info["status"] == "completed", info
        ram = info["ram"]
        figures = info["ram"]
        assert figures["multifd-bytes"] > size // 2, figures  # the pages went over the channels
        assert figures["transferred"] > figures["multifd-bytes"]
        assert figures["normal"] + figures["duplicate"] >= size // 4096
        assert figures["dirty-sync-count"] >= 3, "expected at least two iterations after setup"
        dinfo = await dst.wait_migration()
        assert dinfo["status"] == "completed", dinfo
        a = await src.cmd("x-qevm-query-machine", {"digest": True})
        b = await dst.cmd("x-qevm-query-machine", {"digest": True})
        assert a["ram-sha256"] == b["ram-sha256"] and a["ops"] == b["ops"] and a["next-line"] == b["next-line"]
        await dst.cmd("cont")
        await asyncio.sleep(0.6)
        assert_continues(src.lines(), dst.lines())
    if tap is not None:
        out, err = tap.communicate(timeout=60)
        assert tap.returncode == 0, err.decode()
        doc = json.loads(out)
        side = doc["tap"]["side_channels"]
        assert len(side) == channels and all(s["forward"] > 1344 for s in side), side
        # each channel decoded on the way: its id, one SYNC packet per MULTIFD_FLUSH of the main stream
        assert sorted(s["channel"] for s in side) == list(range(channels)) and {s["kind"] for s in side} == {"multifd"}
        assert sum(s["pages"] + s["zero_pages"] for s in side) >= 32 * MIB // 4096
        dump = dump_doc(rec)
        assert [s["name"] for s in dump["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate"]
        pages = dump["sections"][0]["ram"]
        assert pages["multifd_flushes"] >= 3, pages  # START, and every pass over RAM, END included
        assert all(s["syncs"] == pages["multifd_flushes"] for s in side), (side, pages)
        assert not doc["tap"]["notes"], doc["tap"]["notes"]
        # QEMU 10.0's analyze-migration.py knows MULTIFD_FLUSH (7.2's stops at "Unknown RAM flags: 200")
        p = subprocess.run([sys.executable, str(require_peer("10.0")), "-f", str(rec)], capture_output=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert "ram (1)" in json.loads(p.stdout)


@pytest.mark.parametrize(("channels", "bandwidth"), [(1, 24 * MIB), (2, 24 * MIB), (2, 64 << 30)])
def test_multifd_tcp(work: Path, channels: int, bandwidth: int) -> None:
    """Pages over 1 or 2 multifd channels while the guest runs: several passes, identical RAM and
    machine state, serial numbering with no gap and no repeat across the switch.  The unlimited
    run has a return path (the source completes on the destination's SHUT, sent once the channels
    have ended) and a 96 MiB guest full of data."""
    run(_migrate_multifd(work, channels, bandwidth=bandwidth))


def test_multifd_through_tap(work: Path) -> None:
    """engine -> qevm tap -> engine with 2 channels: the tap pairs the extra connections, the
    recorded main stream parses with qevm dump and QEMU's analyze-migration.py."""
    run(_migrate_multifd(work, 2, via_tap=True))


def test_mapped_ram_file(work: Path) -> None:
    """file: + mapped-ram + multifd (2 channel threads writing pages at their offsets): a live
    migration into one file, loaded back by another engine with migrate-incoming (same RAM, serial
    continues); the file parses with qevm dump, and for a stopped VM it is byte for byte what
    ``qevm convert --to mapped-ram`` makes of the plain stream of the same state (format.md §4)."""

    async def main() -> None:
        live, plain, mapped = work / "live.mig", work / "plain.mig", work / "mapped.mig"
        src = VM(work, "src", ram="16M", dirty_rate=3000)
        async with vms(src):
            await _multifd(src, 2, "mapped-ram")
            with pytest.raises(ExecuteError, match=r"Migration requires seekable transport \(e.g. file\)"):
                await src.cmd("migrate", {"uri": f"unix:{work / 'x.sock'}"})
            await src.cmd("migrate-set-parameters", {"max-bandwidth": 16 * MIB, "downtime-limit": 50})
            await asyncio.sleep(0.4)
            await src.cmd("migrate", {"uri": f"file:{live}"})
            info = await src.wait_migration()
            assert info["status"] == "completed", info
            assert info["ram"]["multifd-bytes"] > 0 and info["ram"]["dirty-sync-count"] >= 2
            digest = (await src.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"]
        doc = dump_doc(live)
        assert doc["configuration"]["capabilities"] == ["mapped-ram"], doc["configuration"]
        assert [s["name"] for s in doc["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate"]

        dst = VM(work, "dst", "--incoming", "defer", "-S", ram="16M")
        async with vms(dst):
            with pytest.raises(ExecuteError, match="Migration requires seekable transport"):
                await _multifd(dst, 2, "mapped-ram")
                await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            await dst.cmd("migrate-incoming", {"uri": f"file:{live}"})
            assert (await dst.wait_migration())["status"] == "completed"
            assert (await dst.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"] == digest
            await dst.cmd("cont")
            await asyncio.sleep(0.5)
            assert_continues(src.lines(), dst.lines())

        # a stopped VM: its plain stream, loaded and sent again as mapped-ram, equals qevm convert's file
        s2 = VM(work, "s2", ram="16M", dirty_rate=3000)
        async with vms(s2):
            await asyncio.sleep(0.3)
            await s2.cmd("stop")
            await s2.cmd("migrate", {"uri": f"exec:cat > {plain}"})
            assert (await s2.wait_migration())["status"] == "completed"
        d2 = VM(work, "d2", "--incoming", f"file:{plain}", "-S", ram="16M")
        async with vms(d2):
            assert (await d2.wait_migration())["status"] == "completed"
            digest = (await d2.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"]
            await d2.enable_events("mapped-ram")  # without multifd: one thread writes the pages
            await d2.cmd("migrate", {"uri": f"file:{mapped}"})
            assert (await d2.wait_migration())["status"] == "completed"
        ref = work / "ref.mig"
        r = qevm_cli("convert", str(plain), str(ref), "--to", "mapped-ram")
        assert r.returncode == 0, r.stderr.decode()
        assert mapped.read_bytes() == ref.read_bytes()

        # loaded back without multifd, sent on with multifd into a file at an offset, loaded from there
        at = work / "at.mig"
        d3 = VM(work, "d3", "--incoming", "defer", "-S", ram="16M")
        async with vms(d3):
            await d3.enable_events("mapped-ram")
            await d3.cmd("migrate-incoming", {"uri": f"file:{mapped}"})
            assert (await d3.wait_migration())["status"] == "completed"
            assert (await d3.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"] == digest
            await _multifd(d3, 2, "mapped-ram")
            await d3.cmd("migrate", {"uri": f"file:{at},offset=8192"})
            assert (await d3.wait_migration())["status"] == "completed"
        assert at.read_bytes()[:8192] == bytes(8192)
        d4 = VM(work, "d4", "--incoming", "defer", "-S", ram="16M")
        async with vms(d4):
            await _multifd(d4, 2, "mapped-ram")
            await d4.cmd("migrate-incoming", {"uri": f"file:{at},offset=8192"})
            assert (await d4.wait_migration())["status"] == "completed"
            assert (await d4.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"] == digest

    run(main())


class CuttingProxy:
    """Forwards every connection to ``target_port``; the first multifd channel (it begins with
    0x11223344) is cut (RST both ways) after ``limit`` bytes."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.target = target_port
        self.limit = limit
        self.cut = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.lsock.settimeout(30)
        with contextlib.suppress(OSError):
            while True:
                a, _ = self.lsock.accept()
                b = socket.create_connection(("127.0.0.1", self.target))
                self.socks += [a, b]
                threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, forward: bool) -> None:
        n = 0
        victim = False
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if forward and n == 0 and data[:4] == bytes.fromhex("11223344") and not self.cut.is_set():
                    victim = True
                    self.cut.set()
                n += len(data)
                if victim and n > self.limit:
                    for s in (a, b):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    return
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.lsock.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def test_multifd_channel_dies(work: Path) -> None:
    """One multifd connection is cut mid-migration: the source ends in failed with the channel's
    error and keeps running, the destination fails its load; nothing hangs."""

    async def main() -> None:
        async with _pair(work) as (src, dst):
            with pytest.raises(ExecuteError, match=r"Migration requires multi-channel URIs \(e.g. tcp\)"):
                await src.cmd("migrate", {"uri": "exec:cat > /dev/null"})
            with pytest.raises(ExecuteError, match="Multifd is not compatible with xbzrle"):
                await src.enable_events("xbzrle")
            await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
            with pytest.raises(ExecuteError, match="Multifd must be set before incoming starts"):
                await _off_on(dst)
            port = int((await dst.cmd("query-migrate"))["socket-address"][0]["port"])
            proxy = CuttingProxy(port, 4 * MIB)
            try:
                await src.cmd("migrate-set-parameters", {"max-bandwidth": 16 * MIB})
                await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
                info = await src.wait_migration(timeout=30)
                assert info["status"] == "failed", info
                assert info.get("error-desc", "").startswith("multifd: "), info
                assert proxy.cut.is_set()
                dinfo = await dst.wait_migration(timeout=30)
                assert dinfo["status"] == "failed" and dinfo.get("error-desc"), dinfo
            finally:
                proxy.close()
            assert await src.status() == "running"
            assert not src.event_names("STOP")
            n = len(src.lines())
            await asyncio.sleep(0.4)
            assert len(src.lines()) > n

    run(main())


async def _off_on(vm: VM) -> None:
    """Switching multifd on while an incoming migration listens is refused."""
    await vm.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": False}]})
    await vm.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})


def test_flush_record_leaves_with_its_sync() -> None:
    """In process, over socket pairs: each MULTIFD_FLUSH record is handed to the main channel as
    soon as the sync is done (QEMU's qemu_fflush), never held in the buffer while the next epoch's
    pages fill the channels (the destination's channels wait for it: both ends would wait for
    ever); every channel carries one SYNC packet per MULTIFD_FLUSH, and the pages it carries are
    the machine's RAM."""
    from qevm.engine.machine import Machine
    from qevm.engine.multifd import MultifdRamSaver, SendChannels
    from qevm.engine.stream import StreamOut
    from qevm.migration.channels import SocketChannel

    m = Machine(2 * MIB, fill=0.5)
    m.run_ops(300)
    chunks: list[bytes] = []
    out = StreamOut(lambda b: chunks.append(bytes(b)))
    pairs = [socket.socketpair() for _ in range(2)]
    seen: list[list[Any]] = [[], []]
    image = bytearray(m.ram_size)

    def drain(k: int) -> None:
        dec = ChannelDecoder(4096)
        while data := pairs[k][1].recv(1 << 16):
            seen[k] += dec.feed(data)
        dec.close()

    drains = [threading.Thread(target=drain, args=(k,)) for k in range(2)]
    for t in drains:
        t.start()
    pool = SendChannels(m, count=2, channels=[SocketChannel(a, f"ch{k}") for k, (a, _) in enumerate(pairs)],
                        zero_detect=True, limiter=None, out=out, abort=threading.Event(),
                        on_pages=lambda n, z: None)
    saver = MultifdRamSaver(m, pool, mapped_fd=None, legacy_zero=False)
    saver.setup(out)
    saver.iterate(out, None)  # one pass from the start: one wrap
    m.run_ops(300)
    saver.sync()
    saver.pos = m.npages // 2  # a pass from the middle: a wrap, then on from 0 to the middle
    saver.iterate(out, None)
    out.flush()
    pool.close()
    for t in drains:
        t.join(10)
    flush = struct.pack(">Q", 0x200)
    assert sum(c.count(flush) for c in chunks) == 4  # START, one wrap, then two (passing the end, then 0)
    assert all(c.endswith(flush) for c in chunks if flush in c), "a MULTIFD_FLUSH record waited in the buffer"
    epochs: list[list[list[Any]]] = []  # per channel, the packets of each epoch (ended by a SYNC packet)
    for k in range(2):
        assert seen[k][0] == MultifdInit(k)
        assert sum(p.is_sync for p, _ in seen[k][1:]) == 4
        eps: list[list[Any]] = [[]]
        for item in seen[k][1:]:
            eps[-1].append(item)
            if item[0].is_sync:
                eps.append([])
        epochs.append(eps)
    for e in range(5):  # epoch by epoch across the channels, as the destination applies them
        for k in range(2):
            for p, data in epochs[k][e]:
                for i, off in enumerate(p.offsets[:p.normal]):
                    image[off:off + 4096] = data[i * 4096:(i + 1) * 4096]
                for off in p.offsets[p.normal:]:
                    image[off:off + 4096] = bytes(4096)
    assert bytes(image) == bytes(m.ram)


# -- the codec against real QEMU 10.0 ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_qemu10_channels_decode(tmp_path: Path) -> None:
    """QEMU 10.0 -> qevm tap -> QEMU 10.0 with multifd, 2 channels (a paused guest: nearly every page
    is a zero page, listed in the packets' zero_pages): the tap decodes both channels with the
    codec the engine uses, one SYNC packet per MULTIFD_FLUSH of the main stream, and the pages
    it counts are QEMU's own normal + duplicate figures."""
    fixtures = Path(__file__).resolve().parent.parent / "scripts" / "fixtures"
    sys.path.insert(0, str(fixtures))
    try:
        from gen_qemu10 import chroot_dir
        from qemu_driver import Qemu

        root = chroot_dir()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"QEMU 10.0 chroot missing in CI ({e})")
        pytest.skip(f"QEMU 10.0 chroot not available ({e})")
    args = ["-machine", "pc", "-m", "64", "-nodefaults", "-S"]
    caps = [{"capability": "multifd", "state": True}]
    port, tport = _free_port(), _free_port()
    rec = tmp_path / "seen.mig"
    with (Qemu("qemu-system-x86_64", args, tmp_path, chroot=str(root), name="src") as src,
          Qemu("qemu-system-x86_64", [*args, "-incoming", "defer"], tmp_path, chroot=str(root), name="dst") as dst):
        dst.qmp("migrate-set-capabilities", capabilities=caps)
        dst.qmp("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        tap = subprocess.Popen([sys.executable, "-m", "qevm.cli.main", "tap", f"tcp:127.0.0.1:{tport}",
                                f"tcp:127.0.0.1:{port}", "-o", str(rec), "--json", "--timeout", "60"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not any(f":{tport:04X} " in ln and " 0A " in ln for ln in Path("/proc/net/tcp").read_text()
                          .splitlines()):
                assert time.monotonic() < deadline and tap.poll() is None, "the tap did not listen"
                time.sleep(0.05)
            reply = src.migrate(f"tcp:127.0.0.1:{tport}", caps={"multifd": True}, timeout=120)
            out, err = tap.communicate(timeout=60)
        finally:
            if tap.poll() is None:
                tap.kill()
                tap.wait()
        assert tap.returncode == 0, err.decode()
    doc = json.loads(out)
    sc, notes = doc["tap"]["side_channels"], doc["tap"]["notes"]
    assert {c["kind"] for c in sc} == {"multifd"} and sorted(c["channel"] for c in sc) == [0, 1], sc
    assert not notes, notes
    flushes = dump_doc(rec)["sections"][0]["ram"]["multifd_flushes"]
    assert flushes >= 2 and all(c["syncs"] == flushes for c in sc), (flushes, sc)
    ram = reply["ram"]
    assert sum(c["pages"] for c in sc) == ram["normal"] and sum(c["zero_pages"] for c in sc) == ram["duplicate"], (
        sc, ram)
    assert ram["duplicate"] > ram["normal"] > 0


def test_multifd_cancel(work: Path) -> None:
    """migrate_cancel during a multifd migration: cancelled, the channel threads gone, the source
    runs on; the destination's load fails instead of waiting for ever on its channels."""

    async def main() -> None:
        async with _pair(work) as (src, dst):
            await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
            port = int((await dst.cmd("query-migrate"))["socket-address"][0]["port"])
            await src.cmd("migrate-set-parameters", {"max-bandwidth": 4 * MIB})
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            await src.wait_migration(want=("active",))
            await asyncio.sleep(0.5)
            await src.cmd("migrate_cancel")
            info = await src.wait_migration(timeout=20)
            assert info["status"] == "cancelled", info
            assert [d["status"] for _, d in src.event_names("MIGRATION")][-2:] == ["cancelling", "cancelled"]
            assert (await dst.wait_migration(timeout=20))["status"] == "failed"
            assert await src.status() == "running"
            n = len(src.lines())
            await asyncio.sleep(0.4)
            assert len(src.lines()) > n

    run(main())
