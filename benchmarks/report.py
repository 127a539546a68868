#!/usr/bin/env python3
"""``qevm report`` against ``qevm info`` on the big real stream (2 GiB guest, ~1.7 GB stream).

Uses the stream ``benchmarks/run.py`` builds (cached at ``${QEVM_CACHE:-~/.cache/qevm}/bench/big.mig``;
built here when missing).  Runs each command ``--runs`` times with a warm page cache (one ``cat`` of
the file first), best wall time wins, and prints them side by side with the page size and peak RSS.
Targets: report <= 2x the time of info; the HTML < 5 MB.  ``--check`` exits 1 when one is missed.
Also reports the detailed mode (``--pages``: record kinds per RAM region), which has no target.
Two states (``qevm report A B``, A = big.mig, B = its edit ``big-edited.mig`` as benchmarks/diff.py builds it):
the differences are ``qevm diff``'s, its page tables filled in the report's one pass per stream; targets:
<= 2x ``qevm info A`` + ``qevm info B``, peak RSS <= 64 MB (RAM is never held); ``qevm diff A B`` is shown
alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

import diff as diffbench  # noqa: E402  (benchmarks/diff.py: the edited pair)
import run as bench  # noqa: E402  (benchmarks/run.py: the stream builder)

MAX_TWO_STATE_RSS_MIB = 64


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one run."""
    env = dict(os.environ, PYTHONPATH=str(REPO.parent / "src"))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if os.waitstatus_to_exitcode(status) not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed: {err}")
    return wall, ru.ru_maxrss


def best(cmd: list[str], runs: int, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    results = [timed(cmd, ok) for _ in range(runs)]
    wall = min(r[0] for r in results)
    return {"cmd": " ".join(cmd), "seconds": round(wall, 2), "all": [round(r[0], 2) for r in results],
            "peak_rss_mib": round(max(r[1] for r in results) / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--file", type=Path, help="benchmark this stream instead of the cached big.mig")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--no-two", action="store_true", help="skip the two-state report")
    ns = ap.parse_args()
    f = ns.file or bench.cache_root() / "bench" / "big.mig"
    if not f.exists():
        bench.build_stream(f, 1600, 600.0, 900.0)
    subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    py = [sys.executable, "-m", "qevm"]
    with tempfile.TemporaryDirectory(prefix="qevm-bench-report-") as tmp:
        out = Path(tmp) / "report.html"
        info = best([*py, "info", str(f)], ns.runs)
        report = best([*py, "report", str(f), "-o", str(out)], ns.runs)
        html_bytes = out.stat().st_size
        detail = best([*py, "report", "--pages", str(f), "-o", str(out)], 1)
        detail_bytes = out.stat().st_size
        two: dict[str, Any] | None = None
        if not ns.no_two and not ns.file:
            a, b = diffbench.ensure_pair()
            subprocess.run(["cat", str(b)], stdout=subprocess.DEVNULL, check=True)
            info_b = best([*py, "info", str(b)], ns.runs)
            rep2 = best([*py, "report", str(a), str(b), "-o", str(out)], ns.runs)
            dif = best([*py, "diff", str(a), str(b)], ns.runs, ok=(0, 1))
            two = {"info_b": info_b, "report": rep2, "diff": dif, "html_bytes": out.stat().st_size,
                   "ratio": round(rep2["seconds"] / (info["seconds"] + info_b["seconds"]), 2)}
    ratio = report["seconds"] / info["seconds"]
    res = {"stream": str(f), "stream_bytes": f.stat().st_size, "info": info, "report": report,
           "report_pages": detail, "ratio": round(ratio, 2), "html_bytes": html_bytes,
           "html_bytes_pages": detail_bytes,
           "targets": {"report <= 2x info": ratio <= 2.0, "html < 5 MB": html_bytes < 5_000_000}, "two_state": two}
    if two is not None:
        res["targets"]["report A B <= 2x (info A + info B)"] = two["ratio"] <= 2.0
        res["targets"][f"report A B peak RSS <= {MAX_TWO_STATE_RSS_MIB} MiB"] = (
            two["report"]["peak_rss_mib"] <= MAX_TWO_STATE_RSS_MIB)
    if ns.json:
        json.dump(res, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"stream {f} ({res['stream_bytes'] / 2**30:.2f} GiB), best of {ns.runs}, warm page cache")
        print(f"  {'command':<28} {'seconds':>8} {'peak RSS':>10}")
        for name, r in (("qevm info", info), ("qevm report", report), ("qevm report --pages", detail)):
            print(f"  {name:<28} {r['seconds']:>8.2f} {r['peak_rss_mib']:>8.1f} MiB")
        print(f"  report / info = {ratio:.2f} (target <= 2.0)")
        print(f"  HTML {html_bytes} bytes (target < 5 MB); with --pages {detail_bytes} bytes")
        if two is not None:
            print("two states (A = big.mig, B = its edit)")
            for name, r in (("qevm info B", two["info_b"]), ("qevm report A B", two["report"]),
                            ("qevm diff A B", two["diff"])):
                print(f"  {name:<28} {r['seconds']:>8.2f} {r['peak_rss_mib']:>8.1f} MiB")
            print(f"  report A B / (info A + info B) = {two['ratio']:.2f} (target <= 2.0); "
                  f"peak RSS target <= {MAX_TWO_STATE_RSS_MIB} MiB; HTML {two['html_bytes']} bytes")
    return 1 if ns.check and not all(res["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
