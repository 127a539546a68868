"""``qevm dump STREAM``: the decoded state as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from qevm.analysis.document import dump_document
from qevm.cli.common import add_input_options, opened, read_options
from qevm.format.memory import RamImage
from qevm.io.reader import read_stream


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dump", help="decoded sections and device fields as JSON")
    add_input_options(p)
    p.add_argument("--format", choices=("qevm", "analyze-migration"), default="qevm",
                   help="qevm's JSON (default) or exactly what QEMU's scripts/analyze-migration.py prints")
    p.add_argument("--memory", "-m", action="store_true", help="include RAM page contents")
    p.add_argument("--peer-version", choices=("10.0", "7.2"), default="10.0",
                   help="with --format analyze-migration: which QEMU release's script to match (default 10.0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    image: RamImage | None = None
    try:
        if args.memory:
            image = _image(args, opts)
        with opened(args) as inp:
            an = read_stream(inp, memory=image, **opts)
        out = sys.stdout
        if args.format == "analyze-migration":
            from qevm.analysis.analyze_format import render

            for chunk in render(an, memory=image, flavor=args.peer_version):
                out.write(chunk)
            return 0
        doc = dump_document(an, args.page_size)
        if image is None:
            json.dump(doc, out, indent=2)
            out.write("\n")
            return 0
        text = json.dumps(doc, indent=2)
        out.write(text[:-2] + ',\n  "memory": {')
        for bi, block in enumerate(image.blocks()):
            out.write(("," if bi else "") + f"\n    {json.dumps(block)}: {{")
            for pi, addr in enumerate(image.sent_pages(block)):
                out.write(("," if pi else "") + f'\n      "0x{addr:x}": "{image.read(block, addr).hex()}"')
            out.write("\n    }")
        out.write("\n  }\n}\n")
        return 0
    finally:
        if image is not None:
            image.close()


def _image(args: argparse.Namespace, opts: dict) -> RamImage:  # type: ignore[type-arg]
    if args.format == "analyze-migration":
        from qevm.analysis.analyze_format import OrderedRamImage

        return OrderedRamImage(opts["page_size"] or 4096)
    return RamImage(opts["page_size"] or 4096)
