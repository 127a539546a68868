"""``qevm edit IN OUT --set PATH=VALUE | --patch FILE.json | --set-page BLOCK:OFFSET=@FILE``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from qevm.cli.common import add_input_options, read_options
from qevm.codec.paths import parse_assignment, parse_path
from qevm.errors import UsageError
from qevm.io.writer import Edit, PageEdit, rewrite


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("edit", help="change device fields or RAM pages; everything else stays byte-identical")
    add_input_options(p)
    p.add_argument("output", metavar="OUT", help="output file (not written when an edit is invalid)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="set a field: SECTION[:INSTANCE]/FIELD[/FIELD...]=VALUE, e.g. 'cpu:0/env.regs[3]=0x1234'")
    p.add_argument("--patch", metavar="FILE.json", help="a JSON object of PATH: VALUE pairs")
    p.add_argument("--set-page", action="append", default=[], metavar="BLOCK:OFFSET=@FILE",
                   help="replace the content of one RAM page (every copy the stream carries)")
    p.set_defaults(run=run)


def _value(text: str) -> Any:
    t = text.strip()
    if t.startswith("["):
        try:
            return json.loads(t)
        except ValueError:
            raise UsageError(f"{text!r} is not a JSON list") from None
    return t


def _page_edit(text: str) -> PageEdit:
    spec, eq, src = text.partition("=")
    block, colon, off = spec.rpartition(":")
    if not eq or not colon or not src.startswith("@"):
        raise UsageError(f"--set-page {text!r}: expected BLOCK:OFFSET=@FILE")
    try:
        addr = int(off, 0)
    except ValueError:
        raise UsageError(f"--set-page {text!r}: offset {off!r} is not a number") from None
    try:
        with open(src[1:], "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"--set-page: cannot read {src[1:]}: {e.strerror}") from None
    return PageEdit(block, addr, data)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    edits = []
    for item in args.set:
        path, value = parse_assignment(item)
        edits.append(Edit(path, _value(value)))
    if args.patch:
        try:
            with open(args.patch) as f:
                patch = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--patch {args.patch}: {e}") from None
        if not isinstance(patch, dict):
            raise UsageError(f"--patch {args.patch}: expected a JSON object of PATH: VALUE")
        edits += [Edit(parse_path(k), v) for k, v in patch.items()]
    pages = [_page_edit(t) for t in args.set_page]
    if not edits and not pages:
        raise UsageError("nothing to edit: give --set, --patch or --set-page")
    res = rewrite(args.stream, args.output, edits=edits, page_edits=pages, schema=opts["schema"],
                  page_size=opts["page_size"], snapshot=args.snapshot)
    for name in res.fields_set:
        print(f"set {name}")
    for pg in res.pages_set:
        print(f"set page {pg}")
    return 0
