"""``qevm extract STREAM -o DIR``: one sparse file per RAM block, and DIR/blocks.json."""

from __future__ import annotations

import argparse

from qevm.analysis.extract import extract
from qevm.cli.common import read_options


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("extract", help="guest RAM: one sparse file per RAM block, plus blocks.json")
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input (gzip/xz/bzip2 ok)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--block", metavar="NAME", help="only this RAM block")
    p.add_argument("--snapshot", metavar="NAME", help="STREAM is a qcow2 image: this internal snapshot's VM state")
    p.add_argument("--page-size", type=int, metavar="N", help="target page size when the stream cannot tell")
    p.set_defaults(run=run, schema=None, lenient=True)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    res = extract(args.stream, args.output, block=args.block, snapshot=args.snapshot, page_size=opts["page_size"])
    for b in res.blocks:
        p = b.pages
        print(f"{b.file}: {b.name!r} {b.size} bytes, pages normal {p['normal']} zero {p['zero']} "
              f"xbzrle {p['xbzrle']} compressed {p['compressed']}")
    print(f"{len(res.blocks)} block(s) written to {res.directory}/ (blocks.json)")
    return 0
