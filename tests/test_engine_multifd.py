"""Multifd and mapped-ram in the engine (``qevm vm``): two engines driven with QEMU's QMP client,
extra connections carrying pages in QEMU 10.0's multifd packets, the main stream's MULTIFD_FLUSH,
``file:`` + ``mapped-ram`` written by the channel threads, ``qevm tap`` in between."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import require_peer  # noqa: E402
from test_engine import (  # noqa: E402
    ENV,
    MIB,
    VM,
    assert_continues,
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


def _stream_records(path: Path) -> dict[str, Any]:
    r = qevm_cli("dump", str(path))
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)  # type: ignore[no-any-return]


async def _migrate_multifd(work: Path, channels: int, *, via_tap: bool = False) -> None:
    src = VM(work, "src", ram="32M", dirty_rate=3000)
    dst = VM(work, "dst", "--incoming", "defer", "-S", ram="32M")
    tap: subprocess.Popen[bytes] | None = None
    rec = work / "tapped.mig"
    async with vms(src, dst):
        await _multifd(src, channels)
        await _multifd(dst, channels)
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
        await src.cmd("migrate-set-parameters", {"max-bandwidth": 24 * MIB, "downtime-limit": 100})
        await asyncio.sleep(0.5)
        await src.cmd("migrate", {"uri": target})
        info = await src.wait_migration()
        assert info["status"] == "completed", info
        ram = info["ram"]
        assert ram["multifd-bytes"] > 32 * MIB // 2, ram  # the pages went over the channels
        assert ram["transferred"] > ram["multifd-bytes"]
        assert ram["normal"] + ram["duplicate"] >= 32 * MIB // 4096
        assert ram["dirty-sync-count"] >= 3, "expected at least two iterations after setup"
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
        dump = _stream_records(rec)
        assert [s["name"] for s in dump["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate"]
        pages = dump["sections"][0]["ram"]
        assert pages["multifd_flushes"] >= 3, pages  # START, and every pass over RAM, END included
        # QEMU 10.0's analyze-migration.py knows MULTIFD_FLUSH (7.2's stops at "Unknown RAM flags: 200")
        p = subprocess.run([sys.executable, str(require_peer("10.0")), "-f", str(rec)], capture_output=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert "ram (1)" in json.loads(p.stdout)


@pytest.mark.parametrize("channels", [1, 2])
def test_multifd_tcp(work: Path, channels: int) -> None:
    """Pages over 1 or 2 multifd channels while the guest runs: several passes, identical RAM and
    machine state, serial numbering with no gap and no repeat across the switch."""
    run(_migrate_multifd(work, channels))


def test_multifd_through_tap(work: Path) -> None:
    """engine -> qevm tap -> engine with 2 channels: the tap pairs the extra connections, the
    recorded main stream parses with qevm dump and QEMU's analyze-migration.py."""
    run(_migrate_multifd(work, 2, via_tap=True))
