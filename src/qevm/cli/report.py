"""``qevm report STREAM [STREAM2] -o report.html``: one self-contained HTML page about a stream
(summary, sections, RAM map, device tree with edit paths), or two side by side with their differences."""

from __future__ import annotations

import argparse
import sys

from qevm.analysis.report import DETAIL_LIMIT, write_report
from qevm.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="a self-contained HTML report of one stream, or of two compared")
    p.add_argument("streams", nargs="+", metavar="STREAM", help="one stream, or two to compare")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the HTML file to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pages", dest="pages", action="store_true", default=None,
                   help="map the kind of every RAM record (zero/data/XBZRLE/compressed) per region; "
                        f"default for streams up to {DETAIL_LIMIT >> 20} MiB")
    g.add_argument("--no-pages", dest="pages", action="store_false",
                   help="heat map of page sends only (the fast path, default for larger streams)")
    p.add_argument("--page-size", type=int, metavar="N", help="target page size when the stream cannot tell")
    p.add_argument("--lenient", action="store_true",
                   help="keep going when a device section does not match its description (raw bytes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if len(args.streams) > 2:
        raise UsageError("report takes one stream, or two to compare")
    if args.page_size is not None and (args.page_size < 256 or args.page_size & (args.page_size - 1)):
        raise UsageError(f"--page-size {args.page_size} is not a power of two >= 256")
    res = write_report(args.streams, args.output, pages=args.pages, page_size=args.page_size,
                       strict=not args.lenient)
    extra = f", {res['changed']} changed fields" if res["changed"] is not None else ""
    sys.stderr.write(f"wrote {args.output}: {res['bytes']} bytes, {res['fields']} field rows{extra}\n")
    return 0
