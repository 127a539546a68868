"""Postcopy in the engine (``qevm vm``), both ends engines driven with QEMU's QMP client: the switch
from precopy, the destination running while it pulls its missing pages over the return path, the
serial numbering and the RAM across the switch, failures on either side, ``qevm tap`` in between."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, require_fixture
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


def skeleton(path: Path) -> list[str]:
    """A stream's structure outside the RAM pages: commands (nesting, PING values, ADVISE length),
    section kinds, EOF, vmdesc; device sections as one FULL run, repeats collapsed."""
    from qevm.format.events import CommandEvent, EndOfFile, SectionHeader, VmDescription
    from qevm.io.reader import iter_events

    out: list[str] = []
    for ev in iter_events(str(path)):
        if isinstance(ev, CommandEvent):
            t = "  " * ev.depth + ev.name
            if ev.name == "PING":
                t += f"({int.from_bytes(ev.data, 'big')})"
            elif ev.name == "POSTCOPY_ADVISE":
                t += f"[{len(ev.data)}]"
        elif isinstance(ev, SectionHeader):
            t = f"{ev.kind.name} {ev.section.idstr if ev.section.idstr == 'ram' else 'device'}"
        elif isinstance(ev, (EndOfFile, VmDescription)):
            t = type(ev).__name__
        else:
            continue
        if not out or out[-1] != t:
            out.append(t)
    return out


async def postcopy_pair(src: VM, dst: VM, *, precopy_bw: int, postcopy_bw: int, caps: tuple[str, ...] = ()) -> None:
    for vm in (src, dst):
        await vm.enable_events("postcopy-ram", *caps)
    await src.cmd("migrate-set-parameters", {"max-bandwidth": precopy_bw, "max-postcopy-bandwidth": postcopy_bw,
                                             "downtime-limit": 50})


async def switch_to_postcopy(src: VM, after: float, *, hmp: bool = False) -> None:
    await src.wait_migration(want=("active",))
    await asyncio.sleep(after)
    if hmp:
        assert await src.hmp("migrate_start_postcopy") == ""
    else:
        await src.cmd("migrate-start-postcopy")
    await src.wait_migration(want=("postcopy-active", "completed", "failed"))


async def into_postcopy(src: VM, dst: VM, *, after: float, precopy_bw: int, postcopy_bw: int) -> None:
    """Migrate over tcp, switch to postcopy ``after`` seconds; returns with both ends postcopy-active."""
    await postcopy_pair(src, dst, precopy_bw=precopy_bw, postcopy_bw=postcopy_bw)
    port = incoming_port(await dst.cmd("query-migrate"))
    await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    await switch_to_postcopy(src, after)
    assert (await src.cmd("query-migrate"))["status"] == "postcopy-active"
    deadline = time.monotonic() + 10
    while (await dst.cmd("query-migrate"))["status"] != "postcopy-active":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


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
            await postcopy_pair(src, dst, precopy_bw=6 * MIB, postcopy_bw=6 * MIB, caps=("postcopy-blocktime",))
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
            dinfo = await dst.wait_migration()
            assert dinfo["status"] == "completed"
            # the time the vCPU spent waiting for requested pages (one vCPU: the same for all and for it)
            assert 0 < dinfo["postcopy-blocktime"] < info["total-time"], dinfo
            assert dinfo["postcopy-vcpu-blocktime"] == [dinfo["postcopy-blocktime"]]
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
    its recording parses with qevm dump (no vmdesc follows a postcopy EOF: the debug-migration device's
    copy, sent in the package, names the fields), the destination's RAM is the workload's."""

    async def main() -> None:
        src = VM(work, "src", "--device", "debug-migration", ram=RAM, dirty_rate=30000)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", "--device", "debug-migration", "-S", ram=RAM,
                 dirty_rate=30000)
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
                await switch_to_postcopy(src, 1.0, hmp=True)
                # -S: after POSTCOPY_RUN the destination stays paused until cont, pages still arriving
                deadline = time.monotonic() + 10
                while (await dst.cmd("query-migrate"))["status"] != "postcopy-active":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                while await dst.status() != "paused":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)
                await dst.cmd("cont")
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
        # the same structure as QEMU 7.2's own postcopy stream (the postcopy-7.2 fixture; under CI it must exist)
        expected = ["OPEN_RETURN_PATH", "PING(1)", "POSTCOPY_ADVISE[16]", "START ram", "PART ram",
                    "POSTCOPY_RAM_DISCARD", "PING(2)", "PACKAGED", "  POSTCOPY_LISTEN", "FULL device", "  PING(3)",
                    "  POSTCOPY_RUN", "PING(4)", "PART ram", "END ram", "EndOfFile"]
        assert skeleton(rec) == expected
        if (FIXTURES / "postcopy-7.2.mig").exists() or os.environ.get("CI"):
            assert skeleton(require_fixture("postcopy-7.2")) == expected
        r = qevm_cli("dump", str(rec))
        assert r.returncode == 0, r.stderr.decode()
        dump = json.loads(r.stdout)
        assert [x["name"] for x in dump["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate",
                                                         "debug-migration"]
        cpu = dump["sections"][2]["fields"]
        assert cpu["dirty_rate"] == 30000 and cpu["ops"] > 0
        pages = dump["sections"][0]["ram"]["pages"]
        assert pages["normal"] + pages["zero"] >= 32 * MIB // 4096

    run(main())


def test_postcopy_72_api_compress_xbzrle(work: Path) -> None:
    """QEMU 7.2's API takes postcopy with compression threads (and XBZRLE): precopy pages go
    compressed or as deltas, the postcopy phase plain (a requested page never waits in a worker)."""

    async def main() -> None:
        api = ("--migration-api", "7.2")
        src = VM(work, "src", *api, ram=RAM, dirty_rate=30000)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", *api, ram=RAM, dirty_rate=30000)
        async with vms(src, dst):
            await src.enable_events("xbzrle")
            await postcopy_pair(src, dst, precopy_bw=20 * MIB, postcopy_bw=4 * MIB, caps=("compress",))
            port = incoming_port(await dst.cmd("query-migrate"))
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            deadline = time.monotonic() + 60
            while not (await src.cmd("query-migrate")).get("xbzrle-cache", {}).get("pages"):  # a second pass
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await switch_to_postcopy(src, 0.0)
            info = await src.wait_migration(timeout=90)
            assert info["status"] == "completed", (info, dst.stderr.read_text()[-3000:])
            assert info["compression"]["pages"] > 0 and info["ram"]["postcopy-requests"] > 0, info
            assert info["xbzrle-cache"]["pages"] > 0 and info["ram"]["dirty-sync-count"] >= 3, info
            assert (await dst.wait_migration())["status"] == "completed"
            await asyncio.sleep(0.4)
            assert_continues(src.lines(), dst.lines())
            await check_ram(src, dst)

    run(main())


@pytest.mark.parametrize("victim", ["dst", "src"])
def test_one_end_killed_in_postcopy(work: Path, victim: str) -> None:
    """The destination dies in postcopy: the source fails, and its VM stays stopped (the guest lives
    on the destination side now; QEMU would pause for a recovery, never run the source again).
    The source dies: the destination's load fails and the process exits with status 1, as QEMU's
    postcopy listen thread does (its guest cannot go on without the missing pages)."""

    async def main() -> None:
        src = VM(work, "src", ram=RAM, dirty_rate=30000)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", ram=RAM, dirty_rate=30000)
        async with vms(src, dst):
            await into_postcopy(src, dst, after=0.5, precopy_bw=8 * MIB, postcopy_bw=1 * MIB)
            await asyncio.sleep(0.5)
            src.mark()
            if victim == "src":
                src.proc.send_signal(signal.SIGKILL)
                assert dst.proc.wait(20) == 1
                err = dst.stderr.read_text()
                assert "load of migration failed" in err and "Traceback" not in err, err
                return
            dst.proc.send_signal(signal.SIGKILL)
            info = await src.wait_migration(timeout=30)
            assert info["status"] == "failed" and info.get("error-desc"), info
            assert await src.status() == "postmigrate"
            assert not src.event_names("RESUME")
            n = len(src.lines())
            await asyncio.sleep(0.4)
            assert len(src.lines()) == n, "the source must not run again"
            assert "Migration status: failed (" in await src.hmp("info migrate")

    run(main())


def test_postcopy_refusals(work: Path) -> None:
    """QEMU 10.0's answers: capability conflicts (probed on the real binary), migrate-start-postcopy
    without the capability, a destination without postcopy-ram, a transport with no return path."""

    async def main() -> None:
        src = VM(work, "src", ram="8M", dirty_rate=100)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", ram="8M")
        async with vms(src, dst):
            with pytest.raises(ExecuteError, match="Enable postcopy with migrate_set_capability before the start"):
                await src.cmd("migrate-start-postcopy")
            for caps, why in (({"postcopy-preempt"}, "Postcopy preempt requires postcopy-ram"),
                              ({"postcopy-ram", "x-ignore-shared"}, "Postcopy is not compatible with ignore-shared"),
                              ({"postcopy-ram", "multifd"}, "Postcopy is not yet compatible with multifd"),
                              ({"postcopy-ram", "mapped-ram"}, "Mapped-ram migration is incompatible with postcopy")):
                with pytest.raises(ExecuteError, match=why):
                    await src.cmd("migrate-set-capabilities", {"capabilities": [
                        {"capability": c, "state": True} for c in sorted(caps)]})
            await src.enable_events("postcopy-ram", "xbzrle")  # xbzrle goes with postcopy (not used after the switch)
            await src.cmd("migrate", {"uri": "exec:cat > /dev/null"})
            info = await src.wait_migration()
            assert info["status"] == "failed" and "return-path" in info["error-desc"], info
            # the destination did not turn postcopy-ram on: it refuses the 16-byte ADVISE and exits
            port = incoming_port(await dst.cmd("query-migrate"))
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await src.wait_migration()
            assert info["status"] == "failed", info
            assert dst.proc.wait(20) == 1
            assert "RAM postcopy is disabled but have 16 byte advise" in dst.stderr.read_text()
            assert await src.status() == "running"

    run(main())


def test_postcopy_never_started_is_precopy(work: Path) -> None:
    """postcopy-ram on, no migrate-start-postcopy: a precopy migration with ADVISE in its stream,
    ending with the usual stop and copy (and the vmdesc)."""

    async def main() -> None:
        src = VM(work, "src", ram="8M", dirty_rate=500)
        dst = VM(work, "dst", "--incoming", "tcp:127.0.0.1:0", "-S", ram="8M")
        async with vms(src, dst):
            await postcopy_pair(src, dst, precopy_bw=1 << 30, postcopy_bw=0)
            port = incoming_port(await dst.cmd("query-migrate"))
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await src.wait_migration()
            assert info["status"] == "completed" and info["ram"]["postcopy-bytes"] == 0
            assert info["ram"]["precopy-bytes"] + info["ram"]["downtime-bytes"] == info["ram"]["transferred"]
            assert (await dst.wait_migration())["status"] == "completed"
            assert [d["status"] for _, d in dst.event_names("MIGRATION")] == ["active", "completed"]
            a = await src.cmd("x-qevm-query-machine", {"digest": True})
            b = await dst.cmd("x-qevm-query-machine", {"digest": True})
            assert a["ram-sha256"] == b["ram-sha256"]
            # asking after the end is no error (QEMU: it would race with the command)
            await src.cmd("migrate-start-postcopy")

    run(main())


# -- in-process ---------------------------------------------------------------------------------------------------

def test_discard_commands_decode() -> None:
    """Every run of dirty pages becomes one byte range; 12 ranges per command; the reader's decoder
    (qevm dump's view) reads them back."""
    from qevm.engine.postcopy import MAX_DISCARDS_PER_COMMAND, discard_commands
    from qevm.format.live import decode_command
    from qevm.format.records import Command

    bm = bytearray(200)
    runs = [(0, 1), (5, 3)] + [(20 + 7 * i, 2) for i in range(20)] + [(199, 1)]
    for a, n in runs:
        bm[a:a + n] = b"\x01" * n
    recs = discard_commands(bm, 4096, "demo.ram")
    assert len(recs) == -(-len(runs) // MAX_DISCARDS_PER_COMMAND)
    got = []
    for r in recs:
        assert r[0] == 0x08 and int.from_bytes(r[1:3], "big") == Command.POSTCOPY_RAM_DISCARD
        data = r[5:]
        assert int.from_bytes(r[3:5], "big") == len(data)
        info = decode_command(Command.POSTCOPY_RAM_DISCARD, data)
        assert info["version"] == 0 and info["block"] == "demo.ram"
        got += info["ranges"]
    assert got == [[a * 4096, n * 4096] for a, n in runs]
    assert discard_commands(bytearray(10), 4096) == []


def test_incoming_postcopy_state_machine() -> None:
    """The destination's checks, in QEMU's words: command order, ADVISE lengths and page sizes,
    DISCARD layout; pages loaded before LISTEN count as received, discarded ones do not."""
    from qevm.codec.wire import be64
    from qevm.engine.machine import Machine
    from qevm.engine.postcopy import PostcopyIncoming, discard_commands
    from qevm.errors import QevmError
    from qevm.format.events import CommandEvent
    from qevm.format.records import Command

    def pc(enabled: bool = True) -> tuple[PostcopyIncoming, list[str]]:
        calls: list[str] = []
        return PostcopyIncoming(Machine(64 * 4096), caps=lambda: {"postcopy-ram": enabled}, send=lambda b: None,
                                on_listen=lambda: calls.append("listen"), on_run=lambda: calls.append("run")), calls

    def cmd(c: Command, data: bytes = b"") -> CommandEvent:
        return CommandEvent(0, c, data)

    advise = cmd(Command.POSTCOPY_ADVISE, be64(4096) + be64(4096))
    p, calls = pc()
    with pytest.raises(QevmError, match=r"CMD_POSTCOPY_LISTEN in wrong postcopy state \(0\)"):
        p.command(cmd(Command.POSTCOPY_LISTEN))
    p, calls = pc()
    with pytest.raises(QevmError, match="RAM postcopy is enabled but have 0 byte advise"):
        p.command(cmd(Command.POSTCOPY_ADVISE))
    p, calls = pc(False)
    with pytest.raises(QevmError, match="RAM postcopy is disabled but have 16 byte advise"):
        p.command(advise)
    p, calls = pc()
    with pytest.raises(QevmError, match=r"Postcopy needs matching RAM page sizes \(s=10000 d=1000\)"):
        p.command(cmd(Command.POSTCOPY_ADVISE, be64(65536) + be64(4096)))
    p, calls = pc()
    p.command(advise)
    with pytest.raises(QevmError, match=r"CMD_POSTCOPY_ADVISE in wrong postcopy state \(1\)"):
        p.command(advise)
    with pytest.raises(QevmError, match=r"CMD_POSTCOPY_RUN in wrong postcopy state \(1\)"):
        p.command(cmd(Command.POSTCOPY_RUN))
    for i in range(64):
        p.page_loaded(i)
    dirty = bytearray(64)
    dirty[3:9] = b"\x01" * 6
    (rec,) = discard_commands(dirty, 4096, "demo.ram")
    p.command(cmd(Command.POSTCOPY_RAM_DISCARD, rec[5:]))
    with pytest.raises(QevmError, match=r"CMD_POSTCOPY_RAM_DISCARD invalid version \(1\)"):
        p.command(cmd(Command.POSTCOPY_RAM_DISCARD, b"\x01" + rec[6:]))
    with pytest.raises(QevmError, match="ram_discard_range: Failed to find block 'xemo.ram'"):
        p.command(cmd(Command.POSTCOPY_RAM_DISCARD, rec[5:7] + b"x" + rec[8:]))
    p.command(cmd(Command.POSTCOPY_LISTEN))
    assert calls == ["listen"] and p.m.fault is not None and p.m.received is p.received
    assert [i for i in range(64) if not p.present(i)] == list(range(3, 9))
    p.command(cmd(Command.POSTCOPY_RUN))
    assert calls == ["listen", "run"]
    with pytest.raises(QevmError, match=r"6 page\(s\) never received"):
        p.finish()
    for i in range(3, 9):
        p.page_loaded(i)
    p.finish()
    assert p.m.fault is None and p.m.received is None
