#!/usr/bin/env python3
"""Live-migration overhead of ``qevm record`` and ``qevm tap`` against QEMU on its own, same machine.

1. Boots QEMU 7.2 ``qemu-system-x86_64 -M pc -m 2048`` (TCG) with the project's Linux guest and
   ``qevm.work=fill:SIZE_MB`` (SIZE_MB of /dev/urandom data in tmpfs, so >= 1.5 GiB must cross), the
   guest of ``benchmarks/run.py``.
2. Migrates that running guest four times at unlimited bandwidth (max-bandwidth 1 TiB/s,
   downtime-limit 2 s, as run.py does), resuming it (``cont``) after each migration:

   * ``migrate "exec:cat > FILE"``                       (baseline for record)
   * ``migrate tcp:...`` into ``qevm record ... -o FILE``
   * ``migrate tcp:...`` into a destination QEMU ``-incoming tcp:...``   (baseline for tap)
   * the same through ``qevm tap``

   Each run is timed from the ``migrate`` command until everything has finished: the source
   reports ``completed`` and the file is written / ``qevm record`` has exited / the destination
   runs the guest (and ``qevm tap`` has exited).  QEMU's own ``total-time`` is shown beside it.
3. Prints the table with the ratios and the targets (record within 1.1x of exec:cat, tap within
   1.15x of the direct migration); ``--json`` for the figures, ``--check`` to exit 1 on a miss.

``--runs N`` repeats the four migrations round-robin and compares medians (default 1: one run of
each); every run is listed with ``--json``.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "fixtures"))
from guest import FILL_DONE, READY, ensure_guest, qemu_args  # noqa: E402
from qemu_driver import Qemu, QemuError  # noqa: E402

QEMU_BIN = "qemu-system-x86_64"
RECORD_VS_EXEC = 1.10
TAP_VS_DIRECT = 1.15
PARAMS = {"max-bandwidth": 1 << 40, "downtime-limit": 2000}
POLL = 0.02


def log(msg: str) -> None:
    print(f"[live {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get("QEVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qevm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def qevm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qevm.cli.main", *args]


class Bench:
    def __init__(self, size_mb: int, mem: int, work: Path, fill_timeout: float, timeout: float) -> None:
        self.size_mb = size_mb
        self.work = work
        self.timeout = timeout
        guest = ensure_guest()
        self.args = ["-M", "pc", "-m", str(mem), "-accel", "tcg", "-smp", "1", *qemu_args(guest, f"fill:{size_mb}")]
        self.dst_args = ["-M", "pc", "-m", str(mem), "-accel", "tcg", "-smp", "1", *qemu_args(guest)]
        log(f"booting {QEMU_BIN} {shlex.join(self.args)}")
        self.src = Qemu(QEMU_BIN, self.args, work, name="src")
        t0 = time.monotonic()
        deadline = t0 + fill_timeout
        while not (FILL_DONE in (s := self.src.serial()) and READY in s):
            if time.monotonic() > deadline or not self.src.alive():
                raise QemuError(f"fill did not finish; serial tail:\n{s[-1500:]}")
            time.sleep(0.5)
        log(f"guest filled {size_mb} MiB in {time.monotonic() - t0:.0f}s")
        self.src.set_migration(params=PARAMS)
        self.procs: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.src.close()

    # -- one migration -------------------------------------------------------------------------------
    def _resume(self) -> None:
        st = self.src.qmp("query-status")["status"]
        if st != "running":
            self.src.qmp("cont")
        ticks = len(re.findall(r"tick \d+", self.src.serial()))
        deadline = time.monotonic() + 30
        while len(re.findall(r"tick \d+", self.src.serial())) < ticks + 10:  # a second of the guest running
            if time.monotonic() > deadline:
                raise QemuError("the source guest does not run again after cont")
            time.sleep(0.1)

    def _migrate(self, uri: str, done: Any) -> dict[str, Any]:
        self._resume()
        os.sync()
        t0 = time.monotonic()
        self.src.qmp("migrate", uri=uri)
        completed_at = None
        reply: dict[str, Any] = {}
        deadline = t0 + self.timeout
        while True:
            now = time.monotonic()
            if completed_at is None:
                reply = self.src.qmp("query-migrate")
                status = reply.get("status")
                if status == "completed":
                    completed_at = now
                elif status in ("failed", "cancelled"):
                    raise QemuError(f"migration to {uri} {status}: {reply.get('error-desc')}")
            if completed_at is not None and done():
                end = time.monotonic()
                break
            if now > deadline:
                raise QemuError(f"migration to {uri} did not finish within {self.timeout}s")
            time.sleep(POLL)
        return {"seconds": end - t0, "qemu_total_ms": reply.get("total-time"), "downtime_ms": reply.get("downtime"),
                "transferred": reply.get("ram", {}).get("transferred"), "completed_after": completed_at - t0}

    def run_exec(self) -> dict[str, Any]:
        out = self.work / "exec.mig"
        out.unlink(missing_ok=True)
        last = [-1, 0.0]

        def done() -> bool:  # the exec'd cat has written everything: the size stays put
            size = out.stat().st_size if out.exists() else -1
            now = time.monotonic()
            if size != last[0]:
                last[0], last[1] = size, now
                return False
            return size > 0 and now - last[1] >= 0.1

        r = self._migrate("exec:cat > " + shlex.quote(str(out)), done)
        r["seconds"] -= 0.1  # the settle window above is not part of the migration
        r["bytes"] = out.stat().st_size
        out.unlink()
        return r

    def run_record(self) -> dict[str, Any]:
        out = self.work / "record.mig"
        out.unlink(missing_ok=True)
        p = subprocess.Popen(qevm_cmd("record", "tcp:127.0.0.1:0", "-o", str(out), "--json", "--no-progress"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(p)
        assert p.stderr is not None
        line = p.stderr.readline().decode()
        uri = line.split()[-1]
        r = self._migrate(uri, lambda: p.poll() is not None)
        stdout, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"qevm record failed: {err.decode()[-1000:]}")
        doc = json.loads(stdout)
        r["bytes"] = doc["record"]["bytes"]
        r["qevm_seconds"] = doc["record"]["seconds"]
        out.unlink()
        return r

    def _dst(self, port: int) -> Qemu:
        return Qemu(QEMU_BIN, [*self.dst_args, "-incoming", f"tcp:127.0.0.1:{port}"], self.work, name="dst")

    def _dst_running(self, dst: Qemu) -> bool:
        return bool(dst.qmp("query-status")["status"] == "running")

    def run_direct(self) -> dict[str, Any]:
        port = free_port()
        with self._dst(port) as dst:
            r = self._migrate(f"tcp:127.0.0.1:{port}", lambda: self._dst_running(dst))
            dst.quit()
        return r

    def run_tap(self) -> dict[str, Any]:
        port = free_port()
        with self._dst(port) as dst:
            p = subprocess.Popen(qevm_cmd("tap", "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{port}", "--json",
                                          "--no-progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs.append(p)
            assert p.stderr is not None
            uri = p.stderr.readline().decode().split()[-1]
            r = self._migrate(uri, lambda: self._dst_running(dst) and p.poll() is not None)
            stdout, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"qevm tap failed: {err.decode()[-1000:]}")
            doc = json.loads(stdout)
            r["bytes"] = doc["tap"]["forward_bytes"]
            r["qevm_seconds"] = doc["tap"]["seconds"]
            dst.quit()
        return r


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median total time (the lower one of the two middle ones)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    r = dict(ordered[(len(ordered) - 1) // 2])
    r["all_seconds"] = [round(x["seconds"], 3) for x in runs]
    r["median_seconds"] = statistics.median(x["seconds"] for x in runs)
    return r


def table(res: dict[str, dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [
        ("exec", 'migrate "exec:cat > FILE"', None),
        ("record", "migrate -> qevm record tcp:... -o FILE", "exec"),
        ("direct", "migrate QEMU -> QEMU (tcp)", None),
        ("tap", "migrate QEMU -> qevm tap -> QEMU", "direct"),
    ]
    head = ["method", "total s", "QEMU total-time s", "downtime s", "bytes", "MB/s", "ratio", "runs s"]
    lines = [head]
    targets = []
    for key, label, base in rows:
        r = res[key]
        ratio = r["seconds"] / res[base]["seconds"] if base else 1.0
        lines.append([label, f"{r['seconds']:.2f}", f"{(r['qemu_total_ms'] or 0) / 1000:.2f}",
                      f"{(r['downtime_ms'] or 0) / 1000:.2f}", str(r.get("bytes") or r.get("transferred")),
                      f"{(r.get('bytes') or r.get('transferred') or 0) / 1e6 / r['seconds']:.0f}", f"{ratio:.3f}",
                      " ".join(f"{x:.2f}" for x in r["all_seconds"])])
        if base:
            limit = RECORD_VS_EXEC if key == "record" else TAP_VS_DIRECT
            targets.append({"target": f"{label} within {limit:g}x of {res[base]['label']}", "value": round(ratio, 3),
                            "ok": ratio <= limit})
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
           for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1600, help="MiB of random data in the guest (default 1600)")
    ap.add_argument("--mem", type=int, default=2048, help="guest RAM in MiB (default 2048)")
    ap.add_argument("--fill-timeout", type=float, default=1800, help="seconds allowed for boot + fill")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for one migration")
    ap.add_argument("--runs", type=int, default=1, help="migrations per method, round-robin; medians compared")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ns = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    if shutil.which(QEMU_BIN) is None:
        log(f"{QEMU_BIN} not found")
        return 2
    version = subprocess.run([QEMU_BIN, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = version.splitlines()[0].strip() if version else "?"
    work = Path(tempfile.mkdtemp(prefix="qevm-live-", dir=cache_root() if cache_root().is_dir() else None))
    runs: dict[str, list[dict[str, Any]]] = {}
    load = os.getloadavg()[0]
    bench = Bench(ns.size_mb, ns.mem, work, ns.fill_timeout, ns.timeout)
    try:
        for i in range(ns.runs):
            for key, label, fn in (("exec", "exec:cat > FILE", bench.run_exec),
                                   ("record", "qevm record", bench.run_record),
                                   ("direct", "QEMU -> QEMU", bench.run_direct),
                                   ("tap", "qevm tap", bench.run_tap)):
                log(f"run {i + 1}/{ns.runs}: migrating through {label} ...")
                r = fn()
                r["label"] = label
                runs.setdefault(key, []).append(r)
                log(f"  {label}: {r['seconds']:.2f}s (QEMU total-time {r['qemu_total_ms']} ms)")
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    res = {k: median_run(v) for k, v in runs.items()}
    lines, targets = table(res)
    doc = {"qemu": version, "guest_mb": ns.mem, "fill_mb": ns.size_mb, "cpus": os.cpu_count(), "runs": ns.runs,
           "load_average_at_start": load, "results": res, "all_runs": runs, "targets": targets}
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        what = "one run each" if ns.runs == 1 else f"median of {ns.runs} runs each"
        print(f"{version}; guest -m {ns.mem} with {ns.size_mb} MiB of random data; {os.cpu_count()} CPUs "
              f"(load average {load:.2f} at start); {what}")
        print("\n".join(lines))
        for t in targets:
            print(f"{'ok  ' if t['ok'] else 'MISS'} {t['target']}: {t['value']:.3f}x")
    return 1 if ns.check and not all(t["ok"] for t in targets) else 0


if __name__ == "__main__":
    sys.exit(main())
