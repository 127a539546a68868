"""``qevm convert IN OUT --to FORMAT``: move a VM state between a plain (or compressed) stream, a
mapped-ram file and a qcow2 internal snapshot."""

from __future__ import annotations

import argparse

from qevm.io.convert import COMPRESSIONS, FORMATS, convert
from qevm.migration.channels import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("convert", help="convert a VM state: stream <-> qcow2 snapshot <-> mapped-ram, compression",
                       description="Convert IN (stream, gzip/xz/zstd stream, mapped-ram file, qcow2 image, libvirt "
                                   "save image) into OUT.  IN is never modified; OUT is written under a temporary "
                                   "name and renamed when complete (a qcow2 image gets its snapshot table last).")
    p.add_argument("input", metavar="IN", help="input file, or - for standard input")
    p.add_argument("output", metavar="OUT", help="output file (- = standard output for streams)")
    p.add_argument("--to", choices=FORMATS, help="output format (default: guessed from OUT's name)")
    p.add_argument("--compress", choices=COMPRESSIONS, help="compress the output stream")
    p.add_argument("--snapshot", metavar="NAME", help="IN is a qcow2 image: take this snapshot (default: newest)")
    p.add_argument("--name", metavar="NAME", help="--to qcow2: name of the new snapshot")
    p.add_argument("--size", metavar="SIZE",
                   help="--to qcow2: create OUT as a new image of this virtual size (e.g. 1G)")
    p.add_argument("--replace", action="store_true", help="--to qcow2: overwrite a snapshot of the same name")
    p.add_argument("--vm-clock", metavar="NS", type=int,
                   help="--to qcow2: guest clock to store (default: from the stream's timer section)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    size = None if args.size is None else parse_size(args.size, "--size")
    res = convert(args.input, args.output, to=args.to, compress=args.compress, snapshot=args.snapshot,
                  name=args.name, size=size, replace=args.replace, vm_clock_ns=args.vm_clock)
    if args.output == "-":
        return 0
    what = res.to + (f" ({res.compression})" if res.compression else "")
    line = f"{args.output}: {what} from {res.source}, {res.size} bytes"
    if res.pages or res.zero_pages:
        line += f", {res.pages} pages + {res.zero_pages} zero pages"
    if res.resolved:
        line += f", {res.resolved} XBZRLE/compressed pages applied"
    if res.snapshot:
        s = res.snapshot
        line += f"; snapshot id {s['id']} {s['name']!r}, VM clock {s['vm_clock']}"
    print(line)
    for n in res.notes:
        print(f"note: {n}")
    return 0
