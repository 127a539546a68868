"""``qevm rewrite IN OUT``: decode IN into the model and encode it again (byte-identical)."""

from __future__ import annotations

import argparse

from qevm.cli.common import add_input_options, read_options
from qevm.io.writer import rewrite


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rewrite", help="decode a stream and encode it again (the output equals the input)")
    add_input_options(p)
    p.add_argument("output", metavar="OUT", help="output file (written to a temporary name, then renamed)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    res = rewrite(args.stream, args.output, schema=opts["schema"], page_size=opts["page_size"],
                  snapshot=args.snapshot)
    print(f"{args.output}: {res.size} bytes, {res.devices_reencoded} device sections re-encoded from their "
          f"fields, {res.devices_raw} kept raw (no description)")
    return 0
