"""``qevm redact STREAM OUT``: the same stream with every guest page's content removed."""

from __future__ import annotations

import argparse

from qevm.analysis.guestmap import parse_map_options
from qevm.analysis.redact import parse_range, redact
from qevm.cli.common import read_options


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _byte(text: str) -> int:
    return int(text, 0)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("redact", help="remove every guest page's content (device state untouched)")
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input")
    p.add_argument("output", metavar="OUT", help="the redacted stream (written whole or not at all)")
    p.add_argument("--fill", type=_byte, default=0, metavar="BYTE",
                   help="fill removed pages with this byte (e.g. 0xcc) instead of zero pages")
    p.add_argument("--keep", action="append", default=[], metavar="BLOCK", help="keep this RAM block's pages")
    p.add_argument("--keep-range", action="append", default=[], metavar="PHYS-RANGE",
                   help="keep pages in this guest-physical range: START-END or START+SIZE (hex with 0x)")
    p.add_argument("--map", action="append", default=[], metavar="KEY=VALUE",
                   help="memory-map facts the stream cannot tell, e.g. max-ram-below-4g=2G")
    p.add_argument("--snapshot", metavar="NAME", help="STREAM is a qcow2 image: this internal snapshot's VM state")
    p.add_argument("--page-size", type=int, metavar="N", help="target page size when the stream cannot tell")
    p.set_defaults(run=run, schema=None, lenient=True)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    res = redact(args.stream, args.output, fill=args.fill, keep_blocks=args.keep,
                 keep_ranges=[parse_range(r) for r in args.keep_range], snapshot=args.snapshot,
                 page_size=opts["page_size"], overrides=parse_map_options(args.map))
    print(f"pages removed: {res.pages_removed}, kept: {res.pages_kept}"
          + (f", mapped-ram bytes removed: {res.mapped_bytes_removed}" if res.mapped_bytes_removed else ""))
    print(f"size: {_mib(res.size_before)} -> {_mib(res.size_after)} "
          f"({res.size_before} -> {res.size_after} bytes)")
    return 0
