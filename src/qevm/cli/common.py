"""Options shared by the reading verbs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qevm.errors import UsageError
from qevm.io.reader import load_schema
from qevm.io.sources import Input, open_input


def add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input (gzip/xz/bzip2 ok)")
    p.add_argument("--schema", metavar="FILE",
                   help="device descriptions: another stream with a vmdesc, or a vmdesc JSON file")
    p.add_argument("--snapshot", metavar="NAME",
                   help="STREAM is a qcow2 image: read the VM state of this internal snapshot (name or id; "
                        "default: the newest one with a VM state)")
    p.add_argument("--page-size", type=int, metavar="N", help="target page size when the stream cannot tell")
    p.add_argument("--lenient", action="store_true",
                   help="keep going when a device section does not match its description (raw bytes)")


def read_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.page_size is not None and (args.page_size < 256 or args.page_size & (args.page_size - 1)):
        raise UsageError(f"--page-size {args.page_size} is not a power of two >= 256")
    return {
        "schema": load_schema(args.schema) if args.schema else None,
        "page_size": args.page_size,
        "strict": not args.lenient,
    }


@contextmanager
def opened(args: argparse.Namespace) -> Iterator[Input]:
    """The verb's input (a stream, a qcow2 snapshot's VM state, a libvirt save image), closed after."""
    inp = open_input(args.stream, snapshot=args.snapshot)
    try:
        yield inp
    finally:
        inp.close()


def print_json(doc: Any, indent: int | None = 2) -> None:
    json.dump(doc, sys.stdout, indent=indent)
    sys.stdout.write("\n")
