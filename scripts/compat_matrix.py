#!/usr/bin/env python3
"""A matrix of REAL migrations between QEMU 7.2 (host) and QEMU 10.0 (trixie chroot), to judge ``qevm compat``.

Every cell is: a source QEMU (version, machine type, device set) saves its paused (-S) machine with
``migrate "exec:cat > FILE"``; a destination QEMU (version, machine type, device set) is started with
``-incoming "exec:cat FILE"`` and either loads it (runstate leaves ``inmigrate``) or fails (it exits; its
error line is recorded).  Same-version and both cross-version directions, for ``pc-i440fx-7.2`` and
``pc-q35-7.2``, with device sets that include devices whose descriptions changed between the versions
(e1000e, the esp SCSI controller am53c974, virtio-gpu, hpet is on both machines), plus mismatched
destinations (the other machine type, a device missing).

For every cell the results record what QEMU did, ``qevm compat``'s verdict (source stream vs destination
-dump-vmstate + destination stream saved with the destination's own command line) and
``vmstate-static-checker.py``'s verdict (source dump vs destination dump; compatible iff it exits 0).

    python3 scripts/compat_matrix.py [--out DIR] [--force] [--table]

Outputs (cached) in ``${QEVM_CACHE:-~/.cache/qevm}/compat-matrix/``: the streams, the dumps and
``results.json``.  ``--table`` prints the README table.  Needs root (chroot); ~2-3 minutes on 2 cores.
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
sys.path.insert(0, str(REPO / "scripts" / "fixtures"))
sys.path.insert(0, str(REPO / "src"))

from qemu_driver import Qemu, QemuError  # noqa: E402

BIN = "qemu-system-x86_64"
VERSIONS = ("7.2", "10.0")
MACHINES = ("pc-i440fx-7.2", "pc-q35-7.2")
NET = ["-netdev", "user,id=n0,restrict=on"]
DEVICE_SETS: dict[str, list[str]] = {
    "base": [],
    "e1000e": [*NET, "-device", "e1000e,netdev=n0,mac=52:54:00:12:34:20,addr=0x5"],
    "esp": ["-device", "am53c974,addr=0x6"],
    "virtio-gpu": ["-device", "virtio-gpu-pci,addr=0x7"],
}
COMMON = ["-m", "32", "-S", "-nodefaults", "-accel", "tcg", "-smp", "1"]
SCHEMA = 1


def cache_root() -> Path:
    env = os.environ.get("QEVM_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "qevm") / "compat-matrix"


def chroot_dir() -> Path:
    out = subprocess.run(["bash", str(REPO / "scripts" / "chroot.sh"), "build"], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=3600)
    return Path(out.stdout.strip().splitlines()[-1])


def log(msg: str) -> None:
    print(f"[matrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = chroot_dir()
        self.scratch = Path(tempfile.mkdtemp(prefix="qevm-matrix-", dir=self.root / "tmp"))
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def chroot(self, version: str) -> str | None:
        return str(self.root) if version == "10.0" else None

    def path_for(self, version: str, host: Path) -> str:
        """A path QEMU of ``version`` can open for ``host`` (copied into the chroot for 10.0)."""
        if version != "10.0":
            return str(host)
        dst = self.scratch / host.name
        if not dst.exists():
            shutil.copy(host, dst)
        return "/" + str(dst.relative_to(self.root))

    def dump(self, version: str, machine: str) -> Path:
        path = self.out / f"dump-{version}-{machine}.json"
        if not path.exists():
            if version == "10.0":
                inner = self.scratch / path.name
                subprocess.run(["chroot", str(self.root), BIN, "-M", machine, "-dump-vmstate",
                                "/" + str(inner.relative_to(self.root))], check=True, capture_output=True, timeout=60)
                shutil.move(inner, path)
            else:
                subprocess.run([BIN, "-M", machine, "-dump-vmstate", str(path)], check=True, capture_output=True,
                               timeout=60)
        return path

    def save(self, version: str, machine: str, devices: str) -> Path:
        path = self.out / f"stream-{version}-{machine}-{devices}.mig"
        if path.exists():
            return path
        args = ["-M", machine, *COMMON, *DEVICE_SETS[devices]]
        tmp = self.scratch / (path.name + ".part")
        inner = "/" + str(tmp.relative_to(self.root)) if version == "10.0" else str(tmp)
        with Qemu(BIN, args, self.logs, chroot=self.chroot(version), name=f"save-{version}-{machine}-{devices}") as vm:
            vm.migrate(f"exec:cat > {inner}", timeout=120)
            vm.quit()
        shutil.move(tmp, path)
        return path

    def load(self, version: str, machine: str, devices: str, stream: Path) -> tuple[bool, str]:
        """Start the destination with -incoming; True when the state loaded, else False and QEMU's error."""
        args = ["-M", machine, *COMMON, *DEVICE_SETS[devices],
                "-incoming", f"exec:cat {self.path_for(version, stream)}"]
        name = f"load-{version}-{machine}-{devices}-{stream.stem}"
        try:
            with Qemu(BIN, args, self.logs, chroot=self.chroot(version), name=name) as vm:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        st = vm.qmp("query-status")
                    except QemuError:
                        break
                    if st.get("status") != "inmigrate":
                        ok = st.get("status") in ("paused", "prelaunch", "running", "postmigrate")
                        vm.quit()
                        return ok, "" if ok else f"runstate {st.get('status')}"
                    time.sleep(0.05)
                with_err = _error_of(vm.log_path)
                return False, with_err or "destination did not finish loading"
        except QemuError as e:
            err = _error_of(self.logs / f"qemu-{name}.log")
            return False, err or str(e).splitlines()[0]


def _error_of(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln.split(": ", 1)[-1] for ln in lines if ln.startswith(("qemu-system", "qemu:"))]
    return " | ".join(errs[-3:])


def cells() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for machine in MACHINES:
        for devices in DEVICE_SETS:
            for sv in VERSIONS:
                for dv in VERSIONS:
                    out.append({"src": [sv, machine, devices], "dst": [dv, machine, devices]})
    # mismatched destinations: another machine type; a device missing
    for sv, dv in (("7.2", "10.0"), ("10.0", "7.2"), ("7.2", "7.2")):
        out.append({"src": [sv, "pc-i440fx-7.2", "base"], "dst": [dv, "pc-q35-7.2", "base"]})
        out.append({"src": [sv, "pc-q35-7.2", "e1000e"], "dst": [dv, "pc-q35-7.2", "base"]})
    out.append({"src": ["7.2", "pc-i440fx-7.2", "base"], "dst": ["7.2", "pc-i440fx-7.2", "e1000e"]})
    return out


def qevm_verdict(src_stream: Path, dst_dump: Path, dst_stream: Path) -> dict[str, Any]:
    from qevm.analysis.compat import compat, side_from_dump, side_from_stream
    from qevm.io.reader import read_stream

    src = side_from_stream(str(src_stream), read_stream(str(src_stream), strict=False))
    dump = side_from_dump(str(dst_dump), json.loads(dst_dump.read_text()))
    dst = side_from_stream(str(dst_stream), read_stream(str(dst_stream), strict=False))
    res = compat(src, [dump, dst])
    return {"compatible": res.compatible,
            "breaks": [f"{f.section}: {f.reason}" for f in res.findings if f.severity == "break"],
            "risks": res.count("risk")}


def checker_verdict(src_dump: Path, dst_dump: Path) -> dict[str, Any]:
    script = (Path(os.environ.get("QEVM_CACHE", Path.home() / ".cache" / "qevm")) / "peer" / "10.0"
              / "vmstate-static-checker.py")
    r = subprocess.run([sys.executable, str(script), "-s", str(src_dump), "-d", str(dst_dump)],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return {"compatible": r.returncode == 0, "exit": r.returncode, "messages": len(lines), "first": lines[:3]}


def build(out: Path, force: bool = False) -> dict[str, Any]:
    results = out / "results.json"
    if results.exists() and not force:
        doc: dict[str, Any] = json.loads(results.read_text())
        if doc.get("schema") == SCHEMA and len(doc.get("cells", [])) == len(cells()):
            return doc
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out)
    t0 = time.monotonic()
    try:
        rows = []
        for c in cells():
            sv, sm, sd = c["src"]
            dv, dm, dd = c["dst"]
            src = r.save(sv, sm, sd)
            dst_stream = r.save(dv, dm, dd)
            loaded, error = r.load(dv, dm, dd, src)
            row = {**c, "source_stream": src.name, "destination_stream": dst_stream.name,
                   "destination_dump": r.dump(dv, dm).name, "source_dump": r.dump(sv, sm).name,
                   "qemu": {"loaded": loaded, "error": error}}
            log(f"{sv} {sm} {sd} -> {dv} {dm} {dd}: {'loaded' if loaded else 'FAILED ' + error}")
            rows.append(row)
    finally:
        r.close()
    doc = {"schema": SCHEMA, "built_seconds": round(time.monotonic() - t0, 1), "cells": rows}
    tmp = results.with_suffix(".part")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, results)
    return doc


def judge(out: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Add qevm's and the static checker's verdicts to every cell (computed fresh: they are what is tested)."""
    rows = []
    for c in doc["cells"]:
        q = qevm_verdict(out / c["source_stream"], out / c["destination_dump"], out / c["destination_stream"])
        s = checker_verdict(out / c["source_dump"], out / c["destination_dump"])
        rows.append({**c, "qevm": q, "checker": s})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def mark(ok: bool) -> str:
        return "loads" if ok else "fails"

    lines = ["| source | destination | real QEMU | qevm compat | vmstate-static-checker.py |",
             "| --- | --- | --- | --- | --- |"]
    for c in rows:
        real = c["qemu"]["loaded"]
        q = c["qevm"]["compatible"]
        s = c["checker"]["compatible"]
        first = c["qemu"]["error"].split(" | ")[0].replace("|", "/")
        err = f" ({first[:60]})" if not real and first else ""
        lines.append(f"| {' '.join(c['src'])} | {' '.join(c['dst'])} | {mark(real)}{err} | "
                     f"{mark(q)}{'' if q == real else ' ✗'} | {mark(s)} (exit {c['checker']['exit']})"
                     f"{'' if s == real else ' ✗'} |")
    n = len(rows)
    qa = sum(c["qevm"]["compatible"] == c["qemu"]["loaded"] for c in rows)
    sa = sum(c["checker"]["compatible"] == c["qemu"]["loaded"] for c in rows)
    lines.append("")
    lines.append(f"Agreement with real QEMU: qevm compat {qa}/{n}, vmstate-static-checker.py {sa}/{n}.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=cache_root())
    ap.add_argument("--force", action="store_true", help="rebuild the migrations even when cached")
    ap.add_argument("--table", action="store_true", help="print the README table")
    ap.add_argument("--json", action="store_true", help="print the judged cells as JSON")
    a = ap.parse_args()
    doc = build(a.out, a.force)
    rows = judge(a.out, doc)
    if a.json:
        print(json.dumps(rows, indent=1))
    if a.table or not a.json:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
