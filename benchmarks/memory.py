#!/usr/bin/env python3
"""Guest-memory verbs on the big benchmark stream (the one ``run.py`` builds and caches), side by side:

    qevm extract  vs  cp of the stream  and  analyze-migration.py -x (QEMU 7.2's, one file per RAM block)
    qevm core     vs  cp
    qevm redact   vs  qevm rewrite
    peak RSS of every qevm process

Outputs go to a tmpfs (``--out``, default /dev/shm) and are removed after every run (the removal is timed too,
as in run.py's cp row).  Targets (issue 9): extract <= cp and >= 3x faster than analyze-migration.py -x;
core <= 1.2x cp; redact <= rewrite; RSS <= 64 MB.  ``--check`` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (  # noqa: E402
    MAX_RSS_MB,
    REPO,
    Cmd,
    Result,
    cache_root,
    compile_once,
    ensure_peer,
    measure,
    print_table,
)

EXTRACT_VS_CP = 1.0
EXTRACT_VS_PEER = 3.0
CORE_VS_CP = 1.2


def commands(file: Path, peer: Path, out: Path, before: Path | None = None) -> list[Cmd]:
    py = sys.executable
    qevm = [py, "-m", "qevm.cli.main"]
    f = str(file)
    x = out / "x"
    old = [] if before is None else [
        Cmd(f"{k}_before", f"{label} (before)", [["env", f"PYTHONPATH={before}", *qevm, *argv]],
            after=["rm", "-rf", str(x)], qevm=True)
        for k, label, argv in (("extract", "qevm extract FILE -o DIR && rm -r DIR", ["extract", f, "-o", str(x)]),
                               ("core", "qevm core FILE -o OUT && rm OUT", ["core", f, "-o", str(x)]),
                               ("redact", "qevm redact FILE OUT && rm OUT", ["redact", f, str(x)]))]
    return old + [
        Cmd("cp", "cp FILE OUT && rm OUT", [["cp", f, str(x)]], after=["rm", "-rf", str(x)]),
        Cmd("extract", "qevm extract FILE -o DIR && rm -r DIR", [[*qevm, "extract", f, "-o", str(x)]],
            after=["rm", "-rf", str(x)], qevm=True),
        Cmd("peer_x", "analyze-migration.py -f FILE -x (in DIR) && rm -r DIR",
            [["sh", "-c", 'mkdir -p "$1" && cd "$1" && exec "$2" "$3" -f "$4" -x', "sh", str(x), py, str(peer), f]],
            after=["rm", "-rf", str(x)]),
        Cmd("core", "qevm core FILE -o OUT && rm OUT", [[*qevm, "core", f, "-o", str(x)]],
            after=["rm", "-rf", str(x)], qevm=True),
        Cmd("redact", "qevm redact FILE OUT && rm OUT", [[*qevm, "redact", f, str(x)]],
            after=["rm", "-rf", str(x)], qevm=True),
        Cmd("rewrite", "qevm rewrite FILE OUT && rm OUT", [[*qevm, "rewrite", f, str(x)]],
            after=["rm", "-rf", str(x)], qevm=True),
    ]


def targets(res: dict[str, Result]) -> list[dict[str, Any]]:
    def t(k: str) -> float:
        v = res[k].best("warm")
        assert v is not None
        return v
    out = [
        {"target": "qevm extract <= cp", "value": round(t("extract") / t("cp"), 2), "unit": "x cp",
         "ok": t("extract") <= EXTRACT_VS_CP * t("cp")},
        {"target": "qevm extract >= 3x faster than analyze-migration.py -x",
         "value": round(t("peer_x") / t("extract"), 2), "unit": "x",
         "ok": t("peer_x") >= EXTRACT_VS_PEER * t("extract")},
        {"target": "qevm core <= 1.2x cp", "value": round(t("core") / t("cp"), 2), "unit": "x cp",
         "ok": t("core") <= CORE_VS_CP * t("cp")},
        {"target": "qevm redact <= qevm rewrite", "value": round(t("redact") / t("rewrite"), 2), "unit": "x rewrite",
         "ok": t("redact") <= t("rewrite")},
    ]
    rss = max(res[k].peak_rss_mb() for k in ("extract", "core", "redact"))
    out.append({"target": f"peak RSS of qevm extract/core/redact <= {MAX_RSS_MB:g} MB", "value": round(rss, 1),
                "unit": "MB", "ok": rss <= MAX_RSS_MB})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, help="stream to use (default: run.py's cached big.mig)")
    ap.add_argument("--out", type=Path, default=Path("/dev/shm"), help="where outputs go (a tmpfs; /dev/shm)")
    ap.add_argument("--runs", type=int, default=1, help="runs per command; best time wins (1)")
    ap.add_argument("--only", help="comma-separated subset of: cp,extract,peer_x,core,redact,rewrite "
                    "(and X_before with --before)")
    ap.add_argument("--before", type=Path, help="a source tree (its src/) of an older qevm: its extract, core "
                    "and redact run in the same round-robin, labelled (before)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ns = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    compile_once()
    file = (ns.file or cache_root() / "bench" / "big.mig").resolve()
    if not file.exists():
        print(f"{file} missing: build it with python3 benchmarks/run.py --build-only", file=sys.stderr)
        return 2
    out = Path(tempfile.mkdtemp(prefix="qevm-bench-mem-", dir=ns.out))
    errlog = out.parent / f"{out.name}.stderr"
    try:
        cmds = commands(file, ensure_peer(), out, ns.before.resolve() if ns.before else None)
        if ns.only:
            keep = set(ns.only.split(","))
            cmds = [c for c in cmds if c.key in keep]
        results = measure(cmds, ["warm"], ns.runs, errlog, file)
        res = {r.key: r for r in results}
        tg = targets(res) if {"cp", "extract", "peer_x", "core", "redact", "rewrite"} <= set(res) else []
        if ns.json:
            print(json.dumps({"file": str(file), "size": file.stat().st_size,
                              "results": {r.key: {"label": r.label, "wall": r.best("warm"), "cpu": r.best_cpu("warm"),
                                                  "peak_rss_mb": round(r.peak_rss_mb(), 1)} for r in results},
                              "targets": tg}, indent=2))
        else:
            print(f"stream {file} ({file.stat().st_size / 1e9:.2f} GB), outputs on {ns.out}, warm page cache")
            print_table(results, ["warm"], file.stat().st_size, [])
            for t in tg:
                print(f"{'ok  ' if t['ok'] else 'MISS'} {t['target']}: {t['value']} {t['unit']}")
        return 1 if ns.check and not all(t["ok"] for t in tg) else 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if errlog.exists() and not errlog.stat().st_size:  # kept only when a command complained
            errlog.unlink()


if __name__ == "__main__":
    sys.exit(main())
