"""Postcopy in the engine (``qevm vm``), both ends engines driven with QEMU's QMP client: the switch
from precopy, the destination running while it pulls its missing pages over the return path, the
serial numbering and the RAM across the switch, failures on either side, ``qevm tap`` in between."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine import ENV, MIB, VM, ExecuteError, assert_continues, incoming_port, qevm_cli, run, vms, work

__all__ = ["work"]  # the fixture, shared with test_engine

RAM = "32M"


def replay_digest(ram: int, ops: int, seed: int = 1) -> str:
    """The RAM a machine booted with ``seed`` has after ``ops`` workload operations: what the source's
    workload, continued on the destination, must have produced."""
    from qevm.engine.machine import Machine

    m = Machine(ram, seed=seed)
    m.boot()
    m.run_ops(ops)
    return m.ram_digest()


async def postcopy_pair(src: VM, dst: VM, *, precopy_bw: int, postcopy_bw: int) -> None:
    for vm in (src, dst):
        await vm.enable_events("postcopy-ram")
    await src.cmd("migrate-set-parameters", {"max-bandwidth": precopy_bw, "max-postcopy-bandwidth": postcopy_bw,
                                             "downtime-limit": 50})


async def switch_to_postcopy(src: VM, after: float) -> None:
    await src.wait_migration(want=("active",))
    await asyncio.sleep(after)
    await src.cmd("migrate-start-postcopy")
    await src.wait_migration(want=("postcopy-active", "completed", "failed"))


async def check_ram(src: VM, dst: VM) -> None:
    """The destination, stopped, holds exactly what the workload produced from boot to its last op."""
    await dst.cmd("stop")
    mach = await dst.cmd("x-qevm-query-machine", {"digest": True})
    srcm = await src.cmd("x-qevm-query-machine")
    assert mach["ops"] >= srcm["ops"] and mach["next-line"] >= srcm["next-line"]
    assert mach["ram-sha256"] == replay_digest(32 * MIB, mach["ops"], mach["seed"])


def test_postcopy_tcp(work: Path) -> None:
    """Precopy for a while, then postcopy: the destination runs at once and faults on the pages the source
    still has; the source serves the requests; both complete; ticks continue, RAM is the workload's."""

    async def main() -> None:
        src = VM(work, "src", ram=RAM, dirty_rate=30000)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", ram=RAM, dirty_rate=30000)
        async with vms(src, dst):
            await postcopy_pair(src, dst, precopy_bw=6 * MIB, postcopy_bw=6 * MIB)
            port = incoming_port(await dst.cmd("query-migrate"))
            with pytest.raises(ExecuteError, match="Postcopy must be started after migration has been started"):
                await src.cmd("migrate-start-postcopy")
            await asyncio.sleep(0.3)
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await src.wait_migration(want=("active",))
            assert "expected-downtime" in info
            await switch_to_postcopy(src, 1.0)
            mid = await src.cmd("query-migrate")
            assert mid["status"] == "postcopy-active", mid
            assert "downtime" in mid and "expected-downtime" not in mid
            assert await src.status() == "finish-migrate"
            with pytest.raises(ExecuteError, match="Postcopy migration in progress, cannot cancel."):
                await src.cmd("migrate_cancel")
            assert (await dst.cmd("query-migrate"))["status"] == "postcopy-active"
            assert await dst.status() == "running"  # running with pages still at the source
            text = await src.hmp("info migrate")
            assert "Migration status: postcopy-active\r\n" in text
            info = await src.wait_migration(timeout=90)
            assert info["status"] == "completed", info
            ram = info["ram"]
            assert ram["postcopy-requests"] > 0 and ram["postcopy-bytes"] > 0
            assert ram["precopy-bytes"] + ram["downtime-bytes"] + ram["postcopy-bytes"] == ram["transferred"]
            assert ram["remaining"] == 0 and info["downtime"] >= 0
            assert await src.status() == "postmigrate"
            assert [d["status"] for _, d in src.event_names("MIGRATION")] == [
                "setup", "active", "device", "postcopy-active", "completed"]
            assert (await dst.wait_migration())["status"] == "completed"
            assert [d["status"] for _, d in dst.event_names("MIGRATION")] == ["active", "postcopy-active",
                                                                              "completed"]
            text = await src.hmp("info migrate")
            assert f"postcopy request count: {ram['postcopy-requests']}\r\n" in text and "postcopy ram: " in text
            await asyncio.sleep(0.6)
            assert_continues(src.lines(), dst.lines())
            await check_ram(src, dst)

    run(main())


def test_postcopy_through_tap(work: Path) -> None:
    """engine -> qevm tap -> engine in postcopy: the tap forwards the stream and the page requests,
    its recording parses with qevm dump, the destination's RAM is the workload's."""

    async def main() -> None:
        src = VM(work, "src", ram=RAM, dirty_rate=30000)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", ram=RAM, dirty_rate=30000)
        rec = work / "tapped.mig"
        sock = work / "tap.sock"
        tap: subprocess.Popen[bytes] | None = None
        try:
            async with vms(src, dst):
                await postcopy_pair(src, dst, precopy_bw=6 * MIB, postcopy_bw=6 * MIB)
                port = incoming_port(await dst.cmd("query-migrate"))
                tap = subprocess.Popen([sys.executable, "-m", "qevm.cli.main", "tap", f"unix:{sock}",
                                        f"tcp:127.0.0.1:{port}", "-o", str(rec), "--json", "--timeout", "60"],
                                       env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                deadline = time.monotonic() + 20
                while not sock.exists():
                    assert tap.poll() is None and time.monotonic() < deadline, tap.communicate()[1].decode()
                    await asyncio.sleep(0.05)
                await src.cmd("migrate", {"uri": f"unix:{sock}"})
                await switch_to_postcopy(src, 1.0)
                info = await src.wait_migration(timeout=90)
                assert info["status"] == "completed", info
                assert (await dst.wait_migration())["status"] == "completed"
                out, err = tap.communicate(timeout=30)
                assert tap.returncode == 0, err.decode()
                doc = json.loads(out)
                t, s = doc["tap"], doc["stream"]
                assert t["complete"] and not s["vmdesc"]
                assert {"POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD", "PACKAGED", "POSTCOPY_LISTEN",
                        "POSTCOPY_RUN"} <= set(s["commands"])
                rp = t["return_path"]
                assert rp["messages"]["PONG"] == 4 and rp["messages"]["SHUT"] == 1
                assert rp["page_requests"] == info["ram"]["postcopy-requests"] > 0
                reqs = [m for m in rp["list"] if m["type"].startswith("REQ_PAGES")]
                assert reqs[0]["type"] == "REQ_PAGES_ID" and all(m["block"] == "demo.ram" for m in reqs)
                assert all(m["length"] == 4096 and m["start"] % 4096 == 0 for m in reqs)
                assert t["forward_bytes"] == info["ram"]["transferred"] == rec.stat().st_size
                await asyncio.sleep(0.4)
                assert_continues(src.lines(), dst.lines())
                await check_ram(src, dst)
        finally:
            if tap is not None and tap.poll() is None:
                tap.kill()
                tap.communicate()
        r = qevm_cli("dump", str(rec))
        assert r.returncode == 0, r.stderr.decode()
        dump = json.loads(r.stdout)
        assert [x["name"] for x in dump["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate"]
        pages = dump["sections"][0]["ram"]["pages"]
        assert pages["normal"] + pages["zero"] >= 32 * MIB // 4096

    run(main())

