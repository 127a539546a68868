#!/usr/bin/env python3
"""Throughput / memory of ``qevm convert`` on the big (>= 1.5 GB) QEMU 7.2 stream that ``benchmarks/run.py``
builds (``${QEVM_CACHE:-~/.cache/qevm}/bench/big.mig``; run that first, or pass ``--stream``).

Each operation runs ``--runs`` times (best wall time kept), round-robin with ``cp`` of the stream on the same
filesystem, with a warm page cache; GNU ``time`` gives CPU time and peak RSS:

* ``cp``                       cp STREAM OUT (the anchor; coreutils' cp copies in the kernel: copy_file_range)
* ``cp + sync``                cp, then fsync OUT (what a writer that flushes, like the qcow2 one, pays)
* ``python copy``              reference: the file read into a 1 MiB buffer (the reader's chunk) and written
                               out by Python, nothing else: what moving the bytes through a process costs, as
                               the mapped-ram <-> stream conversions must (they reorder every page)
* ``to mapped-ram``            qevm convert STREAM OUT.mapped --to mapped-ram
* ``mapped-ram to stream``     qevm convert OUT.mapped OUT.mig --to stream
* ``to qcow2 snapshot``        qevm convert STREAM NEW.qcow2 --name big --size 1G

``--before SRC`` adds the two mapped-ram conversions of an older tree (its ``src/``) to the same round-robin;
``--only a,b`` runs those operations (and cp).  Measured qevm commands compile their modules once
(``run.compile_once``).

Targets (issue 12): each within 1.5x of cp's wall time; peak RSS <= 64 MB.  Prints a table (or ``--json``);
``--check`` makes the exit status 1 when a target is missed.  The outputs are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import compile_once  # noqa: E402

TIME_BIN = shutil.which("time", path="/usr/bin:/bin")
VS_CP = 1.5
MAX_RSS_MB = 64.0


PY_COPY = """
import os, sys
src, dst = os.open(sys.argv[1], os.O_RDONLY), os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
buf = bytearray(1 << 20)
mv = memoryview(buf)
while k := os.readv(src, [buf]):
    done = 0
    while done < k:
        done += os.write(dst, mv[done:k])
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall seconds, cpu seconds, peak RSS MB) of one run."""
    if TIME_BIN is None:
        raise SystemExit("GNU time (/usr/bin/time) is needed for CPU time and peak RSS")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.monotonic()
        r = subprocess.run([TIME_BIN, "-o", tf.name, "-f", "%U %S %M", *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {r.stderr[-2000:]}")
        u, s, m = tf.read().split()[-3:]
    return wall, float(u) + float(s), int(m) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("QEVM_CACHE", Path.home() / ".cache" / "qevm"))
    ap.add_argument("--stream", type=Path, default=cache / "bench" / "big.mig")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--before", type=Path, help="a source tree (its src/) of an older qevm: its two mapped-ram "
                    "conversions run in the same round-robin, labelled (before)")
    ap.add_argument("--only", help="comma-separated operations to run (cp always runs)")
    args = ap.parse_args()
    compile_once()
    stream: Path = args.stream
    if not stream.exists():
        raise SystemExit(f"{stream} missing: run benchmarks/run.py once to build it")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    qevm = [sys.executable, "-m", "qevm.cli.main", "convert"]
    work = Path(tempfile.mkdtemp(prefix="qevm-bench-convert-", dir=stream.parent))
    mapped = work / "big.mapped"
    ops: list[tuple[str, list[str], Path]] = [
        ("cp", ["cp", str(stream), str(work / "cp.mig")], work / "cp.mig"),
        # the qcow2 writer flushes the image (fsync) before and after switching the snapshot table
        ("cp + sync", ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(stream), str(work / "cps.mig")],
         work / "cps.mig"),
        ("python copy", [sys.executable, "-c", PY_COPY, str(stream), str(work / "py.mig")], work / "py.mig"),
        ("to mapped-ram", [*qevm, str(stream), str(mapped), "--to", "mapped-ram"], mapped),
        ("mapped-ram to stream", [*qevm, str(mapped), str(work / "back.mig"), "--to", "stream"], work / "back.mig"),
        ("to qcow2 snapshot", [*qevm, str(stream), str(work / "new.qcow2"), "--name", "big", "--size", "1G"],
         work / "new.qcow2"),
    ]
    if args.before is not None:
        old_qevm = ["env", f"PYTHONPATH={args.before.resolve()}", *qevm]
        ops += [("to mapped-ram (before)", [*old_qevm, str(stream), str(work / "old.mapped"), "--to", "mapped-ram"],
                 work / "old.mapped"),
                ("mapped-ram to stream (before)", [*old_qevm, str(mapped), str(work / "old.mig"), "--to", "stream"],
                 work / "old.mig")]
    to_mapped = next(argv for op, argv, _ in ops if op == "to mapped-ram")
    if args.only:
        keep = {"cp", *args.only.split(",")}
        ops = [op for op in ops if op[0] in keep]
    best: dict[str, tuple[float, float, float]] = {}
    try:
        log(f"stream {stream} ({stream.stat().st_size / 1e9:.2f} GB); warming the page cache")
        subprocess.run(["cat", str(stream)], stdout=subprocess.DEVNULL, check=True)
        for i in range(args.runs):
            for name, argv, out in ops:
                if name.startswith("mapped-ram to stream") and not mapped.exists():
                    subprocess.run(to_mapped, env=env, check=True, stdout=subprocess.DEVNULL)
                wall, cpu, rss = run_once(argv, env)
                log(f"run {i + 1}/{args.runs} {name:22s} {wall:7.2f}s  cpu {cpu:6.2f}s  rss {rss:6.1f} MB")
                old = best.get(name)
                best[name] = (min(wall, old[0]) if old else wall, min(cpu, old[1]) if old else cpu,
                              max(rss, old[2]) if old else rss)
                if out != mapped:
                    out.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp_wall = best["cp"][0]
    rows: list[dict[str, Any]] = []
    ok = True
    for name, _, _ in ops:
        wall, cpu, rss = best[name]
        row = {"op": name, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1),
               "vs_cp": round(wall / cp_wall, 2)}
        if not name.startswith("cp") and name != "python copy" and not name.endswith("(before)"):
            row["ok"] = wall <= VS_CP * cp_wall and rss <= MAX_RSS_MB
            ok = ok and bool(row["ok"])
        rows.append(row)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"stream_bytes": stream.stat().st_size, "load_avg": load, "rows": rows}, indent=2))
    else:
        print(f"qevm convert on {stream.stat().st_size / 1e9:.2f} GB (best of {args.runs}, warm cache, "
              f"load average {load:.1f}); targets: <= {VS_CP}x cp, <= {MAX_RSS_MB:.0f} MB RSS")
        print(f"{'operation':24s} {'wall':>8s} {'cpu':>8s} {'x cp':>6s} {'peak RSS':>9s}  target")
        for r in rows:
            mark = "" if "ok" not in r else ("met" if r["ok"] else "MISSED")
            print(f"{r['op']:24s} {r['wall_s']:7.2f}s {r['cpu_s']:7.2f}s {r['vs_cp']:6.2f} {r['peak_rss_mb']:7.1f} MB"
                  f"  {mark}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
