"""``qevm scan PATH... [--compat-to DST...] [--out TABLE]``: a fleet of saved VM states.

One row per state (Parquet, CSV or JSON by the suffix of ``--out``) and a short summary on
stdout.  Local processes by default, a Dask cluster with ``--scheduler``.  Exit 0 when every
state read cleanly (and, with ``--compat-to``, is compatible), 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

from qevm.analysis.compat import load_side
from qevm.analysis.scan import FileResult, expand_paths, missing_extra, scan, sort_rows, summarize, write_table
from qevm.errors import UsageError
from qevm.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("scan", help="summarise a fleet of saved states (files, directories, globs) into one table")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="streams, qcow2 images, libvirt save images; directories are walked; globs (quote them) "
                        "are expanded")
    p.add_argument("--out", metavar="TABLE", help="write the table: TABLE.parquet (needs pyarrow), .csv or .json")
    p.add_argument("--compat-to", nargs="+", metavar="DST",
                   help="check every state as `qevm compat STATE DST...` does: the destination's -dump-vmstate "
                        "JSON and/or a stream saved by it")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on this dask.distributed scheduler (tcp://HOST:8786); the workers must see the paths")
    p.add_argument("-j", "--jobs", type=int, metavar="N", help="local worker processes (default: all cores)")
    p.add_argument("--problems", type=int, default=10, metavar="N",
                   help="list up to N states that are not ok in the summary (default 10)")
    p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    p.set_defaults(run=run)


class Progress:
    """``done/total, failures, files/s`` on one line of a terminal, redrawn at most 10 times a second."""

    def __init__(self, total: int, out: TextIO, enabled: bool) -> None:
        self.total, self.out, self.enabled = total, out, enabled
        self.done = self.failed = 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, res: FileResult) -> None:
        self.done += 1
        self.failed += res.failed
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done == self.total):
            self._last = now
            self.out.write("\r" + self.line(now) + "\x1b[K")
            self.out.flush()

    def line(self, now: float) -> str:
        width = 30
        fill = width * self.done // max(self.total, 1)
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} files, {self.failed} not ok, "
                f"{rate:.1f} files/s, {eta:.0f} s left")

    def close(self) -> None:
        if self.enabled and self.done:
            self.out.write("\n")
            self.out.flush()


def render(s: dict[str, Any], seconds: float, where: str, problems: int) -> str:
    rate = s["files"] / seconds if seconds > 0 else 0.0
    out = [f"{s['states']} states in {s['files']} files ({format_size(s['bytes'])}, "
           f"guest RAM {format_size(s['ram_bytes'])}) scanned in {seconds:.1f} s ({rate:.1f} files/s, {where})"]
    out.append("status    " + ", ".join(f"{k} {v}" for k, v in s["status"].items()))
    if s["machines"]:
        out.append("machines  " + ", ".join(f"{k} {v}" for k, v in s["machines"].items()))
    if s["compat"]:
        out.append("compat    " + ", ".join(f"{k} {v}" for k, v in s["compat"].items()))
        if s["top_breaking"]:
            out.append("breaking  " + ", ".join(f"{k} ({v} state{'s' if v != 1 else ''})"
                                                for k, v in s["top_breaking"]))
    shown = s["problems"][:problems]
    if shown:
        out.append(f"not ok ({len(s['problems'])}):" if len(shown) == len(s["problems"])
                   else f"not ok ({len(s['problems'])}, first {len(shown)}):")
        for path, status, error in shown:
            out.append(f"  {status:<10} {path}: {error}")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: at least 1")
    if args.scheduler is not None:
        hint = missing_extra("distributed")
        if hint:
            raise UsageError(hint)
    if args.out is not None and args.out.lower().endswith(".parquet"):
        hint = missing_extra("pyarrow")
        if hint:
            raise UsageError(hint)
    dsts = [load_side(d) for d in args.compat_to] if args.compat_to else None
    paths = expand_paths(args.paths)
    if not paths:
        raise UsageError("no VM state files under " + ", ".join(args.paths))
    progress = Progress(len(paths), sys.stderr,
                        args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty()))
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    try:
        for res in scan(paths, compat_to=dsts, jobs=args.jobs, scheduler=args.scheduler):
            rows.extend(res.rows)
            progress.update(res)
    finally:
        progress.close()
    seconds = time.monotonic() - start
    rows = sort_rows(rows)
    if args.out:
        write_table(rows, args.out)
    where = (f"Dask scheduler {args.scheduler}" if args.scheduler
             else f"{args.jobs or os.cpu_count() or 1} local workers")
    summary = summarize(rows)
    sys.stdout.write(render(summary, seconds, where, args.problems))
    bad = any(r["status"] != "ok" or r["compat"] == "incompatible" for r in rows)
    return 1 if bad else 0
