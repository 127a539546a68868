"""``qevm desc STREAM``: print the vmdesc JSON the stream carries."""

from __future__ import annotations

import argparse
import json
import sys

from qevm.cli.common import add_input_options, read_options
from qevm.errors import DecodeError
from qevm.io.reader import read_stream
from qevm.io.sources import find_vmdesc, open_input


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("desc", help="print the vmdesc JSON carried after the end of the stream")
    add_input_options(p)
    p.add_argument("--raw", action="store_true", help="the JSON bytes exactly as in the stream")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    inp = open_input(args.stream, snapshot=args.snapshot)
    try:
        raw: bytes | None = None
        if inp.seekable and inp.size:
            found = find_vmdesc(inp.file, inp.size)
            raw = found[1] if found else None
        if raw is None:
            an = read_stream(inp, schema=opts["schema"], page_size=opts["page_size"], strict=False)
            raw = an.vmdesc_raw
    finally:
        inp.close()
    if raw is None:
        raise DecodeError(f"{args.stream} carries no vmdesc trailer (postcopy streams and "
                          "suppress-vmdesc machines have none)")
    if args.raw:
        sys.stdout.buffer.write(raw + b"\n")
        return 0
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DecodeError(f"vmdesc is not valid JSON: {e}", None, "vmdesc") from None
    json.dump(doc, sys.stdout, indent=4)
    sys.stdout.write("\n")
    return 0
