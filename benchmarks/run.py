#!/usr/bin/env python3
"""Throughput / memory benchmark of qevm on a big (>= 1.5 GB) real QEMU 7.2 migration stream.

1. Builds the stream once (cached at ``${QEVM_CACHE:-~/.cache/qevm}/bench/big.mig``): QEMU 7.2
   ``qemu-system-x86_64 -M pc -m 2048`` (TCG) boots the project's Linux guest (``scripts/fixtures/guest.py``)
   with ``qevm.work=fill:SIZE_MB`` (SIZE_MB of /dev/urandom data in tmpfs), then ``migrate "exec:cat > FILE"``
   with max-bandwidth set very high.
2. Runs every command below ``--runs`` times on that file, measuring wall time (best run), CPU time and the
   peak RSS of every process (GNU ``time``), with a warm page cache and, when ``/proc/sys/vm/drop_caches``
   is writable, with a cold one (``sync; echo 3 > drop_caches`` before every run).
3. Prints a table side by side (or ``--json``) and checks the targets: ``qevm dump`` >= 3x faster than
   QEMU's ``analyze-migration.py``; ``cat FILE | qevm dump -`` within 1.5x of ``cat FILE | cat``; peak RSS
   of every qevm process <= 64 MB.

Progress goes to stderr; the table / JSON to stdout.  ``--check`` makes the exit status 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "scripts" / "fixtures"
QEMU_BIN = "qemu-system-x86_64"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MIN_STREAM_BYTES = 1_500_000_000
TIME_BIN = shutil.which("time", path="/usr/bin:/bin")  # GNU time, for per-process CPU time and peak RSS

# targets
DUMP_VS_PEER = 3.0  # qevm dump at least this many times faster than analyze-migration.py
REWRITE_VS_CP = 1.5
PIPE_VS_CATCAT = 1.5  # cat FILE | qevm dump -  at most this many times slower than cat FILE | cat
MAX_RSS_MB = 64.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    env = os.environ.get("QEVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qevm"


def compile_once() -> None:
    """Measured Python commands compile their modules once, as an installed qevm does: an environment with
    PYTHONDONTWRITEBYTECODE would compile every module at every start (~0.07 s a command).  The bytecode cache
    goes under the cache root, out of the source tree.  Sets this process's environment (children inherit it)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(cache_root() / "pycache"))


# ---------------------------------------------------------------------------------------------- build


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def build_stream(out: Path, size_mb: int, fill_timeout: float, migrate_timeout: float) -> dict[str, Any]:
    """Boot the guest with the fill workload and migrate it to ``out``; return metadata."""
    sys.path.insert(0, str(FIXTURES))
    from guest import FILL_DONE, READY, ensure_guest, qemu_args  # noqa: I001
    from qemu_driver import Qemu, QemuError

    version = subprocess.run([QEMU_BIN, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = version.splitlines()[0].strip() if version else "?"
    log(f"{version}")
    if " 7.2" not in version:
        log(f"WARNING: expected QEMU 7.2, got {version!r}")

    t_start = time.monotonic()
    guest = ensure_guest()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="qevm-bench-", dir=out.parent))
    args = ["-M", "pc", "-m", "2048", "-accel", "tcg", "-smp", "1", *qemu_args(guest, f"fill:{size_mb}")]
    log(f"booting: {QEMU_BIN} {' '.join(shlex.quote(a) for a in args)}")
    log(f"guest fills tmpfs with {size_mb} MiB of /dev/urandom under TCG (minutes); serial log {workdir}/serial.log")
    meta: dict[str, Any] = {"qemu": version, "size_mb": size_mb, "args": args}
    with Qemu(QEMU_BIN, args, workdir) as vm:
        # --- wait for the fill to finish, showing progress (QEMU's RSS grows as the guest touches RAM)
        deadline = time.monotonic() + fill_timeout
        t_boot = time.monotonic()
        next_report = 0.0
        while True:
            serial = vm.serial()
            if FILL_DONE in serial and READY in serial:
                break
            if not vm.alive():
                raise QemuError(f"QEMU exited during the fill; serial tail:\n{serial[-2000:]}")
            now = time.monotonic()
            if now > deadline:
                raise QemuError(f"fill did not finish within {fill_timeout:.0f}s; serial tail:\n{serial[-2000:]}")
            if now >= next_report:
                ticks = re.findall(r"tick (\d+)", serial)
                state = "filling" if "QEVM-GUEST work=" in serial else "booting"
                log(f"  {now - t_boot:6.0f}s {state}: QEMU RSS {_rss_mib(vm.pid):7.0f} MiB, "
                    f"guest tick {ticks[-1] if ticks else '-'}")  # fmt: skip
                next_report = now + 15
            time.sleep(0.5)
        m = re.search(re.escape(FILL_DONE) + r" (\d+)", vm.serial())
        meta["fill_seconds"] = round(time.monotonic() - t_boot, 1)
        meta["qemu_rss_mib_after_fill"] = round(_rss_mib(vm.pid))
        log(f"fill done ({m.group(0) if m else FILL_DONE}) after {meta['fill_seconds']}s, "
            f"QEMU RSS {meta['qemu_rss_mib_after_fill']} MiB")  # fmt: skip
        # --- migrate with (effectively) unlimited bandwidth
        params = {"max-bandwidth": 1 << 40, "downtime-limit": 2000}
        uri = "exec:cat > " + shlex.quote(str(tmp))
        log(f"migrate {uri!r} params {params}")
        t_mig = time.monotonic()
        reply = vm.migrate(uri, params=params, timeout=migrate_timeout, poll=0.5)
        meta["migrate_seconds"] = round(time.monotonic() - t_mig, 1)
        meta["query_migrate"] = reply
        vm.quit()
    # the exec'd cat may still be flushing when QEMU reports completion
    last = -1
    for _ in range(600):
        size = tmp.stat().st_size
        if size == last:
            break
        last = size
        time.sleep(0.5)
    size = tmp.stat().st_size
    meta["stream_bytes"] = size
    meta["build_seconds"] = round(time.monotonic() - t_start, 1)
    log(f"migration completed in {meta['migrate_seconds']}s: {size} bytes ({size / 2**30:.2f} GiB)")
    if size < size_mb * 2**20:
        raise RuntimeError(
            f"stream is only {size} bytes, less than the {size_mb} MiB the guest should have filled: the fill was "
            f"short (tmpfs full or guest out of memory?); see {workdir}/serial.log and the fill workload and tmpfs "
            "size in scripts/fixtures/guest.py"
        )
    if size < MIN_STREAM_BYTES:
        log(f"WARNING: stream smaller than {MIN_STREAM_BYTES} bytes (use --size-mb >= 1450 for a >= 1.5 GB stream)")
    os.replace(tmp, out)
    for p in sorted(workdir.iterdir()):
        p.unlink()
    workdir.rmdir()
    meta["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------- measure


@dataclass
class Cmd:
    key: str
    label: str
    stages: list[list[str]]  # a pipeline: stdout of stage i -> stdin of stage i+1; last stage -> /dev/null
    after: list[str] | None = None  # run after the pipeline, timed too (the `&& rm` of the cp test)
    qevm: bool = False  # its RSS counts for the <= 64 MB target


@dataclass
class Run:
    wall: float
    cpu: float
    rss_kb: list[int]  # per process, in pipeline order (+ `after`)


@dataclass
class Result:
    key: str
    label: str
    runs: dict[str, list[Run]] = field(default_factory=dict)  # "warm" / "cold" -> runs

    def best(self, mode: str) -> float | None:
        r = self.runs.get(mode)
        return min(x.wall for x in r) if r else None

    def best_cpu(self, mode: str) -> float | None:
        r = self.runs.get(mode)
        return min(x.cpu for x in r) if r else None

    def peak_rss_mb(self) -> float:
        return max((max(x.rss_kb) for r in self.runs.values() for x in r), default=0) / 1024


def drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def _stage_argv(argv: list[str], tfile: Path) -> list[str]:
    if TIME_BIN is None:
        return argv
    return [TIME_BIN, "-f", "%e %U %S %M", "-o", str(tfile), "--", *argv]


def run_once(cmd: Cmd, errlog: Path) -> Run:
    """Run the pipeline once (then ``cmd.after``).  Wall time over all its processes; CPU time and peak RSS
    of each process from GNU time.

    Why GNU time and not ``os.wait4`` on our own children: Linux records, at exec, the RSS high-water mark of
    the address space being replaced, i.e. that of this (~16 MB) Python process for a child it forked, so
    ``ru_maxrss`` of any direct child is at least our own RSS.  A child forked by the small ``time`` process
    does not have that problem."""
    rss: list[int] = []
    cpu = 0.0
    stages = [*cmd.stages, *([cmd.after] if cmd.after else [])]
    with tempfile.TemporaryDirectory(prefix="qevm-bench-") as tdir, open(os.devnull, "wb") as devnull:
        tfiles = [Path(tdir) / f"t{i}" for i in range(len(stages))]
        with open(errlog, "ab") as err:
            t0 = time.perf_counter()
            procs: list[subprocess.Popen[bytes]] = []
            stdin: Any = subprocess.DEVNULL
            for i, argv in enumerate(cmd.stages):
                last = i == len(cmd.stages) - 1
                p = subprocess.Popen(
                    _stage_argv(argv, tfiles[i]), stdin=stdin, stdout=devnull if last else subprocess.PIPE, stderr=err
                )
                if stdin is not subprocess.DEVNULL:
                    stdin.close()
                stdin = p.stdout
                procs.append(p)
            if cmd.after:
                procs[-1].wait()  # `A && B`: B starts when A is done
                procs.append(
                    subprocess.Popen(
                        _stage_argv(cmd.after, tfiles[-1]), stdin=subprocess.DEVNULL, stdout=devnull, stderr=err
                    )
                )
            for p in procs:
                p.wait()
            wall = time.perf_counter() - t0
        for p, argv, tfile in zip(procs, stages, tfiles, strict=True):
            if p.returncode != 0:
                tail = errlog.read_bytes()[-1500:].decode("utf-8", "replace")
                raise RuntimeError(f"{shlex.join(argv)} exited {p.returncode}; stderr ({errlog}) ends:\n{tail}")
            if TIME_BIN is None:
                rss.append(0)
                continue
            fields = tfile.read_text().split()[-4:]  # a failing command adds a "Command exited..." line first
            cpu += float(fields[1]) + float(fields[2])
            rss.append(int(fields[3]))
    return Run(wall=wall, cpu=cpu, rss_kb=rss)


def commands(file: Path, peer: Path, scratch: Path) -> list[Cmd]:
    py = sys.executable
    qevm = [py, "-m", "qevm.cli.main"]
    f = str(file)
    return [
        Cmd("cat", "cat FILE > /dev/null", [["cat", f]]),
        Cmd("catcat", "cat FILE | cat > /dev/null", [["cat", f], ["cat"]]),
        Cmd("dump", "qevm dump FILE", [[*qevm, "dump", f]], qevm=True),
        Cmd("dump_pipe", "cat FILE | qevm dump -", [["cat", f], [*qevm, "dump", "-"]], qevm=True),
        Cmd("info", "qevm info FILE", [[*qevm, "info", f]], qevm=True),
        Cmd("peer", "analyze-migration.py -f FILE", [[py, str(peer), "-f", f]]),
        Cmd("cp", "cp FILE /tmp/x && rm /tmp/x", [["cp", f, str(scratch)]], after=["rm", "-f", str(scratch)]),
        Cmd("rewrite", "qevm rewrite FILE /tmp/x && rm /tmp/x", [[*qevm, "rewrite", f, str(scratch)]],
            after=["rm", "-f", str(scratch)], qevm=True),
    ]


def ensure_peer() -> Path:
    peer = cache_root() / "peer" / "7.2" / "analyze-migration.py"
    if not peer.exists():
        log(f"{peer} missing: running scripts/fetch-peer.sh 7.2")
        subprocess.run(["bash", str(REPO / "scripts" / "fetch-peer.sh"), "7.2"], check=True, timeout=1800)
    return peer


def measure(cmds: list[Cmd], modes: list[str], runs: int, errlog: Path, file: Path) -> list[Result]:
    results = {c.key: Result(c.key, c.label) for c in cmds}
    for mode in modes:
        if mode == "warm":
            log("warming the page cache (one cat of the file)")
            subprocess.run(["cat", str(file)], stdout=subprocess.DEVNULL, check=True)
        # round-robin over the commands so that background noise is spread over all of them
        for i in range(runs):
            for c in cmds:
                if mode == "cold":
                    drop_caches()
                r = run_once(c, errlog)
                results[c.key].runs.setdefault(mode, []).append(r)
                rss = max(r.rss_kb) / 1024
                log(f"{mode} run {i + 1}/{runs}  {c.label:34s} {r.wall:8.2f}s  cpu {r.cpu:7.2f}s  rss {rss:6.1f} MB")
    return [results[c.key] for c in cmds]


# ---------------------------------------------------------------------------------------------- report


def evaluate(res: dict[str, Result], mode: str) -> list[dict[str, Any]]:
    def t(k: str) -> float:
        v = res[k].best(mode)
        assert v is not None
        return v

    speedup = t("peer") / t("dump")
    pipe = t("dump_pipe") / t("catcat")
    extra = []
    if "rewrite" in res and "cp" in res and res["rewrite"].best(mode) and res["cp"].best(mode):
        rw = t("rewrite") / t("cp")
        extra.append({"target": f"qevm rewrite within {REWRITE_VS_CP:g}x of cp", "mode": mode,
                      "value": round(rw, 2), "unit": "x", "ok": rw <= REWRITE_VS_CP})
    return extra + [
        {"target": f"qevm dump >= {DUMP_VS_PEER:g}x faster than analyze-migration.py", "mode": mode,
         "value": round(speedup, 2), "unit": "x", "ok": speedup >= DUMP_VS_PEER},
        {"target": f"cat FILE | qevm dump - within {PIPE_VS_CATCAT:g}x of cat FILE | cat", "mode": mode,
         "value": round(pipe, 2), "unit": "x", "ok": pipe <= PIPE_VS_CATCAT},
    ]  # fmt: skip


def rss_target(res: dict[str, Result], cmds: list[Cmd]) -> dict[str, Any]:
    qevm_rss = max(res[c.key].peak_rss_mb() for c in cmds if c.qevm)
    names = ", ".join(c.label for c in cmds if c.qevm)
    return {"target": f"peak RSS of every qevm process <= {MAX_RSS_MB:g} MB ({names})", "mode": "all",
            "value": round(qevm_rss, 1), "unit": "MB", "ok": qevm_rss <= MAX_RSS_MB}  # fmt: skip


def print_table(results: list[Result], modes: list[str], size: int, notes: list[str]) -> None:
    anchor = results[0]
    head = ["command"]
    for m in modes:
        head += [f"{m} s", f"{m} cpu s", f"{m} MB/s", f"{m} x cat"]
    head += ["peak RSS MB"]
    rows: list[list[str]] = []
    for r in results:
        row = [r.label]
        for m in modes:
            best, cpu, a = r.best(m), r.best_cpu(m), anchor.best(m)
            assert best is not None and cpu is not None and a is not None
            row += [f"{best:.2f}", f"{cpu:.2f}", f"{size / 1e6 / best:.0f}", f"{best / a:.2f}"]
        row.append(f"{r.peak_rss_mb():.1f}")
        rows.append(row)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    print(fmt(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row))
    for n in notes:
        print(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1600, help="MiB of random data the guest writes (default 1600)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the stream even if cached")
    ap.add_argument("--runs", type=int, default=3, help="runs per command and cache mode; best time wins (3)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    ap.add_argument("--json-out", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    ap.add_argument(
        "--cache",
        choices=["warm", "cold", "both"],
        default="both",
        help="page cache state: warm, cold (drop_caches before each run, needs root) or both (default)",
    )
    ap.add_argument("--file", type=Path, help="benchmark this stream instead of the cached big.mig")
    ap.add_argument(
        "--only",
        help="comma-separated subset of: cat,catcat,dump,dump_pipe,info,peer,cp "
        "(cat, catcat, dump, dump_pipe, peer are always needed for the targets)",
    )
    ap.add_argument("--build-only", action="store_true", help="build the stream and stop")
    ap.add_argument("--fill-timeout", type=float, default=3600, help="seconds allowed for boot + fill (3600)")
    ap.add_argument("--migrate-timeout", type=float, default=1800, help="seconds allowed for the migration (1800)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ns = ap.parse_args(argv)

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    )
    compile_once()
    meta: dict[str, Any] = {}
    if ns.file:
        file = ns.file.resolve()
    else:
        file = cache_root() / "bench" / "big.mig"
        if ns.rebuild or not file.exists():
            log(f"building {file}")
            meta = build_stream(file, ns.size_mb, ns.fill_timeout, ns.migrate_timeout)
            log(f"build took {meta['build_seconds']}s (fill {meta['fill_seconds']}s, "
                f"migrate {meta['migrate_seconds']}s)")  # fmt: skip
        else:
            mj = file.with_suffix(".json")
            if mj.exists():
                meta = json.loads(mj.read_text())
            log(f"using cached {file} (--rebuild to rebuild)")
    if ns.build_only:
        return 0
    size = file.stat().st_size

    notes: list[str] = [
        "note: analyze-migration.py (without -m) reads only each RAM page's 8-byte header and seek()s over the "
        "page data (it cannot read a pipe); qevm reads every byte"
    ]
    modes = ["warm", "cold"] if ns.cache == "both" else [ns.cache]
    if "cold" in modes and not drop_caches():
        modes = [m for m in modes if m != "cold"] or ["warm"]
        notes.append(f"note: cannot write {DROP_CACHES} (not root?): cold-cache runs skipped, warm cache only")
    if TIME_BIN is None:
        notes.append("note: GNU time (/usr/bin/time) not found: CPU time and peak RSS not measured (shown as 0)")
    peer = ensure_peer()
    scratch = Path(tempfile.gettempdir()) / f"qevm-bench-x-{os.getpid()}"
    cmds = commands(file, peer, scratch)
    if ns.only:
        want = set(ns.only.split(",")) | {"cat", "catcat", "dump", "dump_pipe", "peer"}
        cmds = [c for c in cmds if c.key in want]
    errlog = Path(tempfile.gettempdir()) / f"qevm-bench-{os.getpid()}.stderr"
    log(f"{file}: {size} bytes; modes {modes}; {ns.runs} run(s) each; stderr of the commands in {errlog}")
    load0 = os.getloadavg()
    t0 = time.monotonic()
    try:
        results = measure(cmds, modes, ns.runs, errlog, file)
    finally:
        scratch.unlink(missing_ok=True)
    if errlog.exists() and errlog.stat().st_size == 0:
        errlog.unlink()
    log(f"measurements took {time.monotonic() - t0:.0f}s")
    by_key = {r.key: r for r in results}
    targets = [t for m in modes for t in evaluate(by_key, m)] + [rss_target(by_key, cmds)]

    load = os.getloadavg()
    doc = {
        "file": str(file), "bytes": size, "runs": ns.runs, "modes": modes, "python": sys.version.split()[0],
        "cpus": os.cpu_count(), "machine": platform.machine(), "build": meta,
        "loadavg_before": load0, "loadavg_after": load,
        "cmdlines": {c.key: [shlex.join(a) for a in [*c.stages, *([c.after] if c.after else [])]] for c in cmds},
        "commands": [
            {"key": r.key, "command": r.label, "peak_rss_mb": round(r.peak_rss_mb(), 1),
             **{m: {"best_s": r.best(m), "best_cpu_s": r.best_cpu(m),
                    "ratio_vs_cat": (r.best(m) or 0) / (results[0].best(m) or 1),
                    "runs": [asdict(x) for x in r.runs[m]]} for m in modes}}
            for r in results
        ],
        "targets": targets, "notes": notes,
    }  # fmt: skip
    if ns.json_out:
        ns.json_out.write_text(json.dumps(doc, indent=2) + "\n")
        log(f"figures written to {ns.json_out}")
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        built = f"; {meta['qemu']}, built in {meta['build_seconds']}s" if "build_seconds" in meta else ""
        print(f"stream: {file}  {size} bytes ({size / 2**30:.2f} GiB){built}")
        print(f"best of {ns.runs} run(s); 'x cat' = time / time of `cat FILE > /dev/null`; peak RSS = largest "
              f"process of the command, over all runs; {os.cpu_count()} CPUs, load avg {load0[0]:.2f} before, "
              f"{load[0]:.2f} after")  # fmt: skip
        print()
        print_table(results, modes, size, notes)
        print()
        for t in targets:
            mark = "PASS" if t["ok"] else "FAIL"
            print(f"{mark}  {t['target']:62s} [{t['mode']}] {t['value']}{t['unit']}")
    return 1 if ns.check and not all(t["ok"] for t in targets) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        log(f"error: {e}")
        sys.exit(2)
