#!/usr/bin/env python3
"""``qevm scan`` throughput and memory on a synthetic fleet built from real QEMU fixtures.

1. Builds the test fleet (tests/fleet.py: copies of small real streams, edits, truncated and
   otherwise damaged files, libvirt and qcow2 containers, other machine types) and, from its
   files under 1 MiB, a fleet of N files and one of 2N (hardlinks, cycling through them).
2. Scans the N-file fleet with 1 and 2 local worker processes and on a dask.distributed
   LocalCluster with 2 worker processes (cluster start-up timed separately), and the 2N fleet with
   2 local workers and on the cluster: files/s, and t(2N)/t(N) (2.0 = linear), in wall time and in
   the CPU seconds of the tasks (which other load on a shared machine does not inflate).  Each
   configuration runs ``--runs`` times round-robin; the best time is kept.
3. Memory: every file of the mixed fleet plus the big fixture streams (80-275 MB) scanned once more
   with ``tracemalloc`` in the worker: the peak of qevm's own allocations per task, and the
   workers' peak RSS (interpreter and imports included).  An ``.xz`` file's decoder holds the
   dictionary the file was compressed with (64 MiB for ``xz -9``; ``xz -d`` needs it too): those
   tasks are reported on their own line.

Prints a table (or ``--json``); ``--check`` exits 1 when a target is missed: per-task peak <= 64 MB,
t(2N)/t(N) <= 2.3.  Wall times are noisy on a shared machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
# worker processes (the local pool's and the LocalCluster's) import this tree's qevm and this module
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"),
                                            *filter(None, [os.environ.get("PYTHONPATH")])])

from qevm.analysis.scan import expand_paths, scan, scan_file  # noqa: E402

MAX_TASK_MB = 64.0
MAX_LINEAR = 2.3
BIG = ["q35-7.2", "pc-7.2", "xbzrle-7.2", "mapped-ram-10.0", "compress-7.2", "memdump-pc-big-7.2"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measured(path: str, ctx: Any) -> list[dict[str, Any]]:
    """The per-file task with qevm's own peak allocation and the worker's peak RSS in each row."""
    if not tracemalloc.is_tracing():
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    rows = scan_file(path, ctx)
    peak = tracemalloc.get_traced_memory()[1] - base
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for r in rows:
        r["_peak"] = peak
        r["_rss"] = rss
    return rows


def cpu_timed(path: str, ctx: Any) -> list[dict[str, Any]]:
    """The per-file task with its CPU time in each row (the work, whatever else loads the machine)."""
    t = time.process_time()
    rows = scan_file(path, ctx)
    for r in rows:
        r["_cpu"] = time.process_time() - t
    return rows


def timed(paths: list[str], **kw: Any) -> tuple[float, float]:
    """Wall time of the whole scan (pool start-up included) and the CPU seconds of its tasks."""
    t = time.perf_counter()
    cpu = 0.0
    n = 0
    for res in scan(paths, task=cpu_timed, **kw):
        n += 1
        cpu += res.rows[0]["_cpu"]
    assert n == len(paths)
    return time.perf_counter() - t, cpu


def link_fleet(src: list[str], n: int, out: Path) -> list[str]:
    out.mkdir(parents=True)
    for i in range(n):
        s = src[i % len(src)]
        os.link(s, out / f"{i:05d}-{Path(s).name}")
    return expand_paths([str(out)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=400, help="N (default 400)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration, best kept (default 3)")
    ap.add_argument("--no-dask", action="store_true", help="skip the LocalCluster run")
    args = ap.parse_args()

    from conftest import FIXTURES
    from fleet import build_fleet

    res: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} "
                                      f"{platform.python_version()}", "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="qevm-scan-bench-") as tmp:
        root = Path(tmp)
        log("building the fleet")
        build_fleet(root / "mixed", copies=20)
        mixed = expand_paths([str(root / "mixed")])
        small = [p for p in mixed if os.path.getsize(p) < (1 << 20)]
        n = args.files
        picked = [small[i % len(small)] for i in range(n)]
        fleet_n = link_fleet(picked, n, root / "n")
        fleet_2n = link_fleet(picked, 2 * n, root / "2n")  # the same N files twice: the same mix
        res["fleet"] = {"files": n, "bytes": sum(os.path.getsize(p) for p in fleet_n),
                        "kinds": len(small)}

        # every configuration --runs times, round-robin (background load spreads over all); best time kept
        configs: dict[str, tuple[list[str], dict[str, Any]]] = {
            "local-1": (fleet_n, {"jobs": 1}),
            "local-2": (fleet_n, {"jobs": 2}),
            "local-2-2N": (fleet_2n, {"jobs": 2}),
        }
        cluster = None
        startup = 0.0
        if not args.no_dask:
            import logging

            from distributed import LocalCluster

            log("starting a LocalCluster with 2 worker processes")
            t0 = time.perf_counter()
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
            startup = time.perf_counter() - t0
            configs["dask-2"] = (fleet_n, {"scheduler": cluster.scheduler_address})
            configs["dask-2-2N"] = (fleet_2n, {"scheduler": cluster.scheduler_address})
            timed(fleet_n[:20], scheduler=cluster.scheduler_address)  # the workers import qevm once
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        try:
            for i in range(args.runs):
                for name, (paths, kw) in configs.items():
                    log(f"run {i + 1}/{args.runs}: {name} ({len(paths)} files)")
                    t, c = timed(paths, **kw)
                    best[name] = min(best.get(name, t), t)
                    cpu[name] = min(cpu.get(name, c), c)
        finally:
            if cluster is not None:
                cluster.close()
        runs: dict[str, Any] = {}
        for name, (paths, _) in configs.items():
            runs[name] = {"files": len(paths), "seconds": round(best[name], 2),
                          "files_per_s": round(len(paths) / best[name], 1), "task_cpu_s": round(cpu[name], 2)}
        if cluster is not None:
            runs["dask-2"]["cluster_start_s"] = round(startup, 1)
            res["linear_dask"] = round(best["dask-2-2N"] / best["dask-2"], 2)
        res["linear"] = round(best["local-2-2N"] / best["local-2"], 2)
        res["linear_cpu"] = round(cpu["local-2-2N"] / cpu["local-2"], 2)
        res["runs"] = runs

        big = [str(FIXTURES / f"{b}.mig") for b in BIG if (FIXTURES / f"{b}.mig").exists()]
        log(f"memory: {len(mixed)} mixed files + {len(big)} big fixture streams, tracemalloc in the workers")
        rows = [r for fr in scan(mixed + big, jobs=2, task=measured) for r in fr.rows]
        # an .xz file's decoder holds the dictionary the file was made with (64 MiB for xz -9, which
        # `xz -d` needs as well): reported on its own, not as qevm's memory
        own = [r for r in rows if r["compression"] != "xz"]
        xz = [r for r in rows if r["compression"] == "xz"]
        worst = max(own, key=lambda r: r["_peak"])
        res["memory"] = {
            "tasks": len(rows),
            "largest_file_mb": round(max(r["file_bytes"] or 0 for r in rows) / 1e6, 1),
            "task_peak_mb": round(worst["_peak"] / 1e6, 1),
            "task_peak_file": Path(worst["path"]).name,
            "xz_task_peak_mb": round(max(r["_peak"] for r in xz) / 1e6, 1) if xz else None,
            "worker_rss_mb": round(max(r["_rss"] for r in rows) / 1e6, 1),
        }
    res["load_after"] = os.getloadavg()[0]
    checks = [
        ("qevm's own peak memory per task <= 64 MB", res["memory"]["task_peak_mb"] <= MAX_TASK_MB,
         f"{res['memory']['task_peak_mb']} MB ({res['memory']['task_peak_file']})"),
        (f"scan time of 2N files <= {MAX_LINEAR} x N files (2 local workers, wall)", res["linear"] <= MAX_LINEAR,
         f"{res['linear']}x"),
        (f"CPU time of the 2N files' tasks <= {MAX_LINEAR} x the N files'", res["linear_cpu"] <= MAX_LINEAR,
         f"{res['linear_cpu']}x"),
    ]
    res["checks"] = [{"target": t, "pass": ok, "value": v} for t, ok, v in checks]
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['machine']}; load average {res['load_before']:.1f} before, {res['load_after']:.1f} after")
        print(f"fleet: {n} files ({res['fleet']['bytes'] / 1e6:.1f} MB) cycling through {res['fleet']['kinds']} "
              "small real streams, damaged files and containers")
        print(f"{'run (best of ' + str(args.runs) + ')':<34} {'files':>6} {'seconds':>8} {'files/s':>8} "
              f"{'task cpu s':>10}")
        names = {"local-1": "local, 1 worker", "local-2": "local, 2 workers", "local-2-2N": "local, 2 workers, 2N",
                 "dask-2": "Dask LocalCluster, 2 workers", "dask-2-2N": "Dask LocalCluster, 2 workers, 2N"}
        for k, r in res["runs"].items():
            print(f"{names[k]:<34} {r['files']:>6} {r['seconds']:>8.2f} {r['files_per_s']:>8.1f} "
                  f"{r['task_cpu_s']:>10.2f}")
        if "dask-2" in res["runs"]:
            print(f"(LocalCluster start-up: {res['runs']['dask-2']['cluster_start_s']} s, not included; "
                  f"2N/N: {res['linear_dask']}x)")
        m = res["memory"]
        print(f"memory: {m['tasks']} tasks, files up to {m['largest_file_mb']} MB: qevm's peak per task "
              f"{m['task_peak_mb']} MB ({m['task_peak_file']}), worker peak RSS {m['worker_rss_mb']} MB")
        if m["xz_task_peak_mb"] is not None:
            print(f"        .xz files: {m['xz_task_peak_mb']} MB, the LZMA dictionary of xz -9 (64 MiB) included")
        for c in res["checks"]:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['target']:<60} {c['value']}")
    return 1 if args.check and not all(c["pass"] for c in res["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
