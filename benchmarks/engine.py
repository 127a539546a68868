#!/usr/bin/env python3
"""Live migration with the engine (``qevm vm``): migration time and downtime for a 256 MiB guest at two
dirty rates, and the bandwidth achieved against ``max-bandwidth``.

Every run starts two fresh ``qevm vm`` processes on this machine (source with ``--ram 256M --fill 1.0``:
every page holds data; destination ``--incoming tcp:127.0.0.1:0``), lets the source run its workload
for a second, then ``migrate`` over tcp on loopback, driven with qemu.qmp.  Figures are the source's
``query-migrate`` (total-time, downtime, setup-time, dirty-sync-count, transferred, precopy-bytes) and
the wall time from ``migrate`` until the destination runs.  The achieved dirty rate is measured on
the source (workload operations per second of virtual time while the migration ran).

    python3 benchmarks/engine.py                 # every part, table on stdout, progress on stderr
    python3 benchmarks/engine.py --json          # figures as JSON
    python3 benchmarks/engine.py --rates 1000,20000 --bandwidths 32,64 --ram 256M

Part 3 (compression) migrates with QEMU 7.2's API and the compress capability, 1 and 2 compression
threads, max-bandwidth unlimited so that the workers are the limit.

Part 4 (multifd) migrates with the multifd capability, 1 and 2 channels (QEMU 10.0's packets, the
destination started with ``-incoming defer`` as QEMU requires), for each --multifd-ram size and dirty
rate, max-bandwidth unlimited so that the channels are the limit; one run without multifd per size
and rate is the baseline (same settings).

Part 5 (postcopy) migrates a 256 MiB and a 1 GiB guest at two dirty rates with postcopy-ram on both
ends and QEMU's defaults (max-bandwidth 128 MiB/s for the precopy phase, max-postcopy-bandwidth 0:
unlimited), calls migrate-start-postcopy one second after ``migrate``, and reports the source's
total-time, the time from ``migrate`` to postcopy-active (switchover, polled every 10 ms), the downtime
(VM stopped to package sent), the page requests the destination's faults sent (postcopy-requests),
the time its vCPU waited for them (the destination's postcopy-blocktime),
the bytes of each phase, and the wall time until the destination completed.

Part 6 (block migration) migrates with QEMU 7.2's API and ``migrate`` ``blk: true`` a guest whose
``--drive`` is a raw image of random data (64 and 256 MiB by default) that the workload keeps
writing (``--disk-every 100``: 10 sectors/s at 1000 pages/s), QEMU's defaults otherwise (the
tests check that the images end equal; here only the time is measured).

Part 1 (dirty rates) uses QEMU's defaults: max-bandwidth 128 MiB/s, downtime-limit 300 ms, plus one
run with XBZRLE at the higher rate.  Part 2 (bandwidth) migrates at a low dirty rate (1000 pages/s)
with max-bandwidth set, and reports the rate over the whole run (transferred / total-time) and over the
precopy phase (precopy-bytes / (total-time - downtime - setup)); QEMU, and the engine, do not limit the
stop-and-copy phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, QMPClient

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
MIB = 1 << 20


def log(msg: str) -> None:
    print(f"[engine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Proc:
    def __init__(self, work: Path, name: str, *args: str) -> None:
        self.sock = work / f"{name}.qmp"
        self.err = open(work / f"{name}.err", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "qevm", "vm", "--qmp", f"unix:{self.sock}",
                                      "--serial", str(work / f"{name}.serial"), *args],
                                     env=ENV, stdout=subprocess.DEVNULL, stderr=self.err)
        self.qmp = QMPClient(name)

    async def connect(self) -> None:
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.sock} did not appear")
            await asyncio.sleep(0.05)
        await self.qmp.connect(str(self.sock))

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, args)

    async def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                await self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


async def migrate_once(ram: str, dirty_rate: int, params: dict[str, Any], xbzrle: bool = False,
                       compress_threads: int = 0, disk_mib: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qe-bench-") as d:
        work = Path(d)
        api = ["--migration-api", "7.2"] if compress_threads or disk_mib else []
        drives: tuple[list[str], list[str]] = ([], [])
        if disk_mib:
            with open(work / "src.raw", "wb") as f:
                for _ in range(disk_mib):
                    f.write(os.urandom(MIB))
            with open(work / "dst.raw", "wb") as f:
                f.truncate(disk_mib * MIB)
            drives = (["--drive", str(work / "src.raw"), "--disk-every", "100"], ["--drive", str(work / "dst.raw")])
        src = Proc(work, "src", "--ram", ram, "--dirty-rate", str(dirty_rate), "--fill", "1.0", *api, *drives[0])
        dst = Proc(work, "dst", "--ram", ram, "--incoming", "tcp:127.0.0.1:0", *api, *drives[1])
        try:
            await src.connect()
            await dst.connect()
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await src.cmd("migrate-set-parameters", params)
            if compress_threads:
                for p in (src, dst):
                    await p.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "compress",
                                                                                 "state": True}]})
                await src.cmd("migrate-set-parameters", {"compress-threads": compress_threads})
            if xbzrle:
                await src.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle",
                                                                              "state": True}]})
            await asyncio.sleep(1.0)
            before = await src.cmd("x-qevm-query-machine")
            t0 = time.monotonic()
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}", **({"blk": True} if disk_mib else {})})
            disk_total = 0
            while True:
                info = await src.cmd("query-migrate")
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                disk_total = info.get("disk", {}).get("total", disk_total)
                await asyncio.sleep(0.01)
            t_src = time.monotonic() - t0
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info}")
            while (await dst.cmd("query-status"))["status"] != "running":
                await asyncio.sleep(0.01)
            t_dst = time.monotonic() - t0
            after = await src.cmd("x-qevm-query-machine")
            vclock = (after["vm-clock-ns"] - before["vm-clock-ns"]) / 1e9
            ram_info = info["ram"]
            return {
                "ram": ram, "dirty_rate": dirty_rate, "xbzrle": xbzrle, "params": params,
                "wall_until_source_completed_s": round(t_src, 3),
                "wall_until_destination_running_s": round(t_dst, 3),
                "total_time_ms": info["total-time"], "downtime_ms": info["downtime"],
                "setup_time_ms": info["setup-time"], "dirty_sync_count": ram_info["dirty-sync-count"],
                "transferred_bytes": ram_info["transferred"], "precopy_bytes": ram_info["precopy-bytes"],
                "downtime_bytes": ram_info["downtime-bytes"], "mbps": round(ram_info["mbps"], 1),
                "normal_pages": ram_info["normal"], "xbzrle_pages": info.get("xbzrle-cache", {}).get("pages", 0),
                "achieved_dirty_rate": round((after["ops"] - before["ops"]) / vclock) if vclock > 0 else None,
                "pages_per_second": ram_info["pages-per-second"], "compress_threads": compress_threads,
                "compression": info.get("compression"), "disk_mib": disk_mib, "disk_total": disk_total,
            }
        finally:
            await src.close()
            await dst.close()


async def postcopy_once(ram: str, dirty_rate: int, switch_after: float = 1.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qe-bench-") as d:
        work = Path(d)
        src = Proc(work, "src", "--ram", ram, "--dirty-rate", str(dirty_rate), "--fill", "1.0")
        dst = Proc(work, "dst", "--ram", ram, "--incoming", "tcp:127.0.0.1:0")
        try:
            await src.connect()
            await dst.connect()
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            for p in (src, dst):
                await p.cmd("migrate-set-capabilities", {"capabilities": [
                    {"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-blocktime")]})
            await src.cmd("migrate-set-parameters", {"max-bandwidth": 128 * MIB, "downtime-limit": 300,
                                                     "max-postcopy-bandwidth": 0})
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            await asyncio.sleep(switch_after)
            await src.cmd("migrate-start-postcopy")
            t_switch = None
            while True:
                info = await src.cmd("query-migrate")
                if t_switch is None and info["status"] in ("postcopy-active", "completed"):
                    t_switch = time.monotonic() - t0
                if info["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.01)
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info}")
            while (dinfo := await dst.cmd("query-migrate"))["status"] != "completed":
                await asyncio.sleep(0.01)
            t_dst = time.monotonic() - t0
            r = info["ram"]
            return {
                "ram": ram, "dirty_rate": dirty_rate, "switch_after_s": switch_after,
                "total_time_ms": info["total-time"], "downtime_ms": info["downtime"],
                "switchover_s": round(t_switch or 0.0, 3), "postcopy_requests": r["postcopy-requests"],
                "vcpu_blocktime_ms": dinfo["postcopy-blocktime"],
                "precopy_bytes": r["precopy-bytes"], "downtime_bytes": r["downtime-bytes"],
                "postcopy_bytes": r["postcopy-bytes"], "transferred_bytes": r["transferred"],
                "wall_until_destination_completed_s": round(t_dst, 3),
            }
        finally:
            await src.close()
            await dst.close()


async def multifd_once(ram: str, dirty_rate: int, channels: int) -> dict[str, Any]:
    """One migration with ``channels`` multifd channels (0: without multifd), bandwidth unlimited."""
    with tempfile.TemporaryDirectory(prefix="qe-bench-") as d:
        work = Path(d)
        src = Proc(work, "src", "--ram", ram, "--dirty-rate", str(dirty_rate), "--fill", "1.0")
        dst = Proc(work, "dst", "--ram", ram, "--incoming", "defer", "-S")  # paused: its RAM is compared
        try:
            for p in (src, dst):
                for _ in range(600):  # a 1 GiB guest fills its RAM before its QMP socket listens
                    try:
                        await p.connect()
                        break
                    except ConnectError:
                        await asyncio.sleep(0.1)
            for p in (src, dst):
                await p.cmd("migrate-set-parameters", {"max-bandwidth": 64 << 30, "downtime-limit": 300,
                                                       "multifd-channels": max(1, channels)})
                if channels:
                    await p.cmd("migrate-set-capabilities", {"capabilities": [{"capability": "multifd",
                                                                                 "state": True}]})
            await dst.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await dst.cmd("query-migrate"))["socket-address"][0]["port"]
            await asyncio.sleep(1.0)
            t0 = time.monotonic()
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            while (info := await src.cmd("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                await asyncio.sleep(0.01)
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info}")
            while (await dst.cmd("query-migrate"))["status"] != "completed":
                await asyncio.sleep(0.01)
            t_dst = time.monotonic() - t0
            a = await src.cmd("x-qevm-query-machine", {"digest": True})
            b = await dst.cmd("x-qevm-query-machine", {"digest": True})
            if a["ram-sha256"] != b["ram-sha256"]:
                raise RuntimeError("the destination's RAM differs from the source's")
            r = info["ram"]
            return {"ram": ram, "dirty_rate": dirty_rate, "channels": channels, "total_time_ms": info["total-time"],
                    "downtime_ms": info["downtime"], "dirty_sync_count": r["dirty-sync-count"],
                    "pages_per_second": r["pages-per-second"], "transferred_bytes": r["transferred"],
                    "multifd_bytes": r["multifd-bytes"], "wall_until_destination_loaded_s": round(t_dst, 3)}
        finally:
            await src.close()
            await dst.close()


def bandwidth_figures(r: dict[str, Any], limit: int) -> dict[str, Any]:
    total_s = r["total_time_ms"] / 1000
    pre_s = (r["total_time_ms"] - r["downtime_ms"] - r["setup_time_ms"]) / 1000
    overall = r["transferred_bytes"] / total_s
    precopy = r["precopy_bytes"] / pre_s
    return {"max_bandwidth": limit, "overall_Bps": round(overall), "precopy_Bps": round(precopy),
            "overall_vs_limit_pct": round((overall / limit - 1) * 100, 1),
            "precopy_vs_limit_pct": round((precopy / limit - 1) * 100, 1)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rates = [int(x) for x in args.rates.split(",") if x]
    bws = [int(x) for x in args.bandwidths.split(",") if x]
    out: dict[str, Any] = {"dirty_rates": [], "bandwidth": []}
    defaults = {"max-bandwidth": 128 * MIB, "downtime-limit": 300}
    for rate in rates:
        log(f"{args.ram} at {rate} pages/s, QEMU defaults")
        out["dirty_rates"].append(await migrate_once(args.ram, rate, defaults))
    if rates and not args.no_xbzrle:
        log(f"{args.ram} at {rates[-1]} pages/s, XBZRLE")
        out["dirty_rates"].append(await migrate_once(args.ram, rates[-1], defaults, xbzrle=True))
    for bw in bws:
        log(f"{args.ram} at 1000 pages/s, max-bandwidth {bw} MiB/s")
        r = await migrate_once(args.ram, 1000, {"max-bandwidth": bw * MIB, "downtime-limit": 300})
        r.update(bandwidth_figures(r, bw * MIB))
        out["bandwidth"].append(r)
    out["postcopy"] = []
    for ram in [x for x in args.postcopy_ram.split(",") if x]:
        for rate in rates:
            log(f"{ram} at {rate} pages/s, postcopy one second after migrate")
            out["postcopy"].append(await postcopy_once(ram, rate))
    out["multifd"] = []
    for ram in [x for x in args.multifd_ram.split(",") if x]:
        for rate in rates:
            best: dict[int, dict[str, Any]] = {}
            for rnd in range(args.multifd_repeat):  # round-robin over the channel counts, best of N
                for channels in [int(x) for x in args.multifd_channels.split(",") if x]:
                    log(f"{ram} at {rate} pages/s, multifd with {channels} channel(s), max-bandwidth unlimited, "
                        f"round {rnd + 1}")
                    r = await multifd_once(ram, rate, channels)
                    if channels not in best or r["total_time_ms"] < best[channels]["total_time_ms"]:
                        best[channels] = r
            out["multifd"] += best.values()
    out["compression"] = []
    for threads in [int(x) for x in args.compress_threads.split(",") if x]:
        log(f"{args.ram} at 1000 pages/s, compression with {threads} thread(s), max-bandwidth unlimited")
        out["compression"].append(await migrate_once(args.ram, 1000, {"max-bandwidth": 64 << 30,
                                                                       "downtime-limit": 300},
                                                     compress_threads=threads))
    out["block"] = []
    for mib in [int(x) for x in args.block_disks.split(",") if x]:
        log(f"{args.ram} at 1000 pages/s, block migration of a {mib} MiB raw disk, QEMU defaults")
        out["block"].append(await migrate_once(args.ram, 1000, defaults, disk_mib=mib))
    return out


def table(doc: dict[str, Any]) -> str:
    lines = ["Migration of a running guest, tcp on loopback (query-migrate on the source):", "",
             "| RAM | dirty rate (pages/s, achieved) | XBZRLE | total-time | downtime | passes | transferred | "
             "wall to dest running |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["dirty_rates"]:
        lines.append(f"| {r['ram']} | {r['dirty_rate']} ({r['achieved_dirty_rate']}) | "
                     f"{'on' if r['xbzrle'] else 'off'} | {r['total_time_ms']} ms | {r['downtime_ms']} ms | "
                     f"{r['dirty_sync_count']} | {r['transferred_bytes'] / MIB:.1f} MiB | "
                     f"{r['wall_until_destination_running_s']:.2f} s |")
    lines += ["", "Bandwidth achieved against max-bandwidth (1000 pages/s):", "",
              "| max-bandwidth | whole run | precopy phase | total-time | downtime |", "|---:|---:|---:|---:|---:|"]
    for r in doc["bandwidth"]:
        lines.append(f"| {r['max_bandwidth'] / MIB:.0f} MiB/s | {r['overall_Bps'] / MIB:.2f} MiB/s "
                     f"({r['overall_vs_limit_pct']:+.1f}%) | {r['precopy_Bps'] / MIB:.2f} MiB/s "
                     f"({r['precopy_vs_limit_pct']:+.1f}%) | {r['total_time_ms']} ms | {r['downtime_ms']} ms |")
    if doc.get("postcopy"):
        lines += ["", "Postcopy (migrate-start-postcopy 1 s after migrate; precopy at 128 MiB/s, postcopy unlimited):",
                  "", "| RAM | dirty rate | total-time | to switchover | downtime | pages requested | vCPU blocked | "
                  "precopy | postcopy | dest completed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in doc["postcopy"]:
            lines.append(f"| {r['ram']} | {r['dirty_rate']} | {r['total_time_ms']} ms | {r['switchover_s']:.2f} s | "
                         f"{r['downtime_ms']} ms | {r['postcopy_requests']} | {r['vcpu_blocktime_ms']} ms | "
                         f"{r['precopy_bytes'] / MIB:.1f} MiB | "
                         f"{r['postcopy_bytes'] / MIB:.1f} MiB | {r['wall_until_destination_completed_s']:.2f} s |")
    if doc.get("multifd"):
        lines += ["", "Multifd (QEMU 10.0's packets over tcp on loopback, every page data, max-bandwidth unlimited; "
                  "0 channels = without multifd):", "",
                  "| RAM | dirty rate | channels | total-time | downtime | passes | pages/s | multifd bytes | "
                  "transferred |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in doc["multifd"]:
            lines.append(f"| {r['ram']} | {r['dirty_rate']} | {r['channels']} | {r['total_time_ms']} ms | "
                         f"{r['downtime_ms']} ms | {r['dirty_sync_count']} | {r['pages_per_second']} | "
                         f"{r['multifd_bytes'] / MIB:.1f} MiB | {r['transferred_bytes'] / MIB:.1f} MiB |")
    if doc.get("compression"):
        lines += ["", "Compression threads (QEMU 7.2's API, zlib level 1, every page random data, "
                  "1000 pages/s, max-bandwidth unlimited):", "",
                  "| threads | total-time | downtime | pages/s | compressed pages | busy | transferred |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in doc["compression"]:
            c = r["compression"] or {}
            lines.append(f"| {r['compress_threads']} | {r['total_time_ms']} ms | {r['downtime_ms']} ms | "
                         f"{r['pages_per_second']} | {c.get('pages', 0)} | {c.get('busy', 0)} | "
                         f"{r['transferred_bytes'] / MIB:.1f} MiB |")
    if doc.get("block"):
        lines += ["", "Block migration (QEMU 7.2's API, migrate blk=true, raw disk of random data written at "
                  "10 sectors/s, RAM at 1000 pages/s, QEMU's defaults):", "",
                  "| RAM | disk | total-time | downtime | passes | transferred | wall to dest running |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in doc["block"]:
            lines.append(f"| {r['ram']} | {r['disk_mib']} MiB | {r['total_time_ms']} ms | {r['downtime_ms']} ms | "
                         f"{r['dirty_sync_count']} | {r['transferred_bytes'] / MIB:.1f} MiB | "
                         f"{r['wall_until_destination_running_s']:.2f} s |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ram", default="256M")
    p.add_argument("--rates", default="1000,20000", help="dirty rates, pages/s (default 1000,20000)")
    p.add_argument("--bandwidths", default="32,64", help="max-bandwidth values, MiB/s (default 32,64)")
    p.add_argument("--no-xbzrle", action="store_true", help="skip the XBZRLE run")
    p.add_argument("--compress-threads", default="1,2",
                   help="compression runs, one per thread count (default 1,2; empty: none)")
    p.add_argument("--postcopy-ram", default="256M,1G",
                   help="postcopy runs: RAM sizes, each at every --rates value (default 256M,1G; empty: none)")
    p.add_argument("--block-disks", default="64,256",
                   help="block migration runs, one per raw disk size in MiB (default 64,256; empty: none)")
    p.add_argument("--multifd-ram", default="256M,1G", help="multifd runs: guest sizes (default 256M,1G; empty: none)")
    p.add_argument("--multifd-channels", default="0,1,2",
                   help="multifd runs: channel counts, 0 = without multifd (default 0,1,2)")
    p.add_argument("--multifd-repeat", type=int, default=3, help="multifd runs: best of N, round-robin (default 3)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    doc = asyncio.run(main_async(args))
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
