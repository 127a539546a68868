"""``qevm diff A B``: configuration, sections, device fields (by edit path) and RAM pages that differ."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qevm.analysis.diff import StateDiff, diff_states
from qevm.cli.common import print_json
from qevm.errors import UsageError
from qevm.io.reader import load_schema
from qevm.io.sources import open_input


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("diff", help="what differs between two VM states (exit 0 equal, 1 different, 2 error)")
    p.add_argument("a", metavar="A", help="stream, qcow2 image (--snapshot), libvirt image, or - for stdin")
    p.add_argument("b", metavar="B", help="the same kinds; at most one of A and B may be -")
    p.add_argument("--snapshot", metavar="NAME", help="read this internal snapshot of qcow2 inputs")
    p.add_argument("--snapshot-b", metavar="NAME", help="another snapshot for B (default: --snapshot)")
    p.add_argument("--schema", metavar="FILE", help="device descriptions for streams without a vmdesc")
    p.add_argument("--json", action="store_true", help="a JSON document instead of text")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="skip fields/sections whose path matches (e.g. '*timer*', 'configuration/uuid')")
    p.add_argument("--no-ram", action="store_true", help="do not compare RAM pages (faster)")
    p.add_argument("--max-ranges", type=int, default=20, metavar="N", help="RAM ranges printed per block (text)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.a == "-" and args.b == "-":
        raise UsageError("only one of A and B can be standard input")
    kw: dict[str, Any] = {}
    if args.schema:
        kw["schema"] = load_schema(args.schema)
    ia = open_input(args.a, snapshot=args.snapshot)
    try:
        ib = open_input(args.b, snapshot=args.snapshot_b or args.snapshot)
        try:
            res = diff_states(args.a if _reopenable(args.a, ia.seekable, ia.compression) else ia,
                              args.b if _reopenable(args.b, ib.seekable, ib.compression) else ib,
                              ram=not args.no_ram, ignore=tuple(args.ignore), name_a=args.a, name_b=args.b, **kw)
        finally:
            ib.close()
    finally:
        ia.close()
    if args.json:
        print_json(res.as_json())
    else:
        sys.stdout.write(render(res, args.max_ranges))
    return 0 if res.equal else 1


def _reopenable(path: str, seekable: bool, compression: str | None) -> bool:
    # a plain file is read by path (so an XBZRLE side can be read again); pipes/images by handle
    return path != "-" and seekable and compression is None and not path.endswith((".qcow2", ".img"))


def _v(x: Any) -> str:
    if isinstance(x, str):
        return x if len(x) <= 72 else x[:69] + "..."
    return json.dumps(x)


def render(res: StateDiff, max_ranges: int = 20) -> str:
    out = [f"--- {res.a}", f"+++ {res.b}"]
    if res.configuration:
        out.append("configuration:")
        for k, a, b in res.configuration:
            out.append(f"  {k}: {_v(a)} -> {_v(b)}")
    for s in res.sections:
        if not s.differs:
            continue
        if s.presence == "only-a":
            out.append(f"- section {s.name} (version {s.version[0]}): only in A")
            continue
        if s.presence == "only-b":
            out.append(f"+ section {s.name} (version {s.version[1]}): only in B")
            continue
        ver = f"version {s.version[0]}" if s.version[0] == s.version[1] else f"version {s.version[0]} -> {s.version[1]}"
        out.append(f"section {s.name} ({ver}):")
        for name, p in s.subsections:
            out.append(f"  {'-' if p == 'only-a' else '+'} subsection {name}: only in {'A' if p == 'only-a' else 'B'}")
        for f in s.fields:
            if f.change == "only-a":
                out.append(f"  - {f.path} ({f.type}): only in A")
            elif f.change == "only-b":
                out.append(f"  + {f.path} ({f.type}): only in B")
            elif f.change == "bytes":
                rs = ", ".join(f"[0x{a:x}, 0x{b:x})" for a, b in f.ranges[:8])
                more = f" and {len(f.ranges) - 8} more" if len(f.ranges) > 8 else ""
                nbytes = sum(b - a for a, b in f.ranges)
                vals = f": {_v(f.old)} -> {_v(f.new)}" if f.old is not None and f.new is not None else ""
                out.append(f"  {f.path} ({f.type}): {nbytes} bytes differ at {rs}{more}{vals}")
            elif f.change == "length":
                out.append(f"  {f.path} ({f.type}): {f.old} elements -> {f.new}")
            else:
                out.append(f"  {f.path} ({f.type}): {_v(f.old)} -> {_v(f.new)}")
    if res.ram is not None:
        for b in res.ram:
            if not b.differs:
                continue
            a_, b_ = ("absent" if x is None else str(x) for x in b.size)
            size = a_ if a_ == b_ else f"{a_} -> {b_}"
            out.append(f"ram {b.name} (size {size}): {b.changed} pages changed, {b.appeared} appeared, "
                       f"{b.disappeared} disappeared ({res.page_size}-byte pages)")
            for start, end, kind in b.ranges[:max_ranges]:
                gpa = b.gpa(start)
                where = f" (guest-physical 0x{gpa:x})" if gpa is not None and gpa != start else ""
                out.append(f"  [0x{start:x}, 0x{end:x}) {kind}{where}")
            if len(b.ranges) > max_ranges:
                out.append(f"  ... {len(b.ranges) - max_ranges} more ranges (--json lists all)")
    for n in res.notes:
        out.append(f"note: {n}")
    if res.equal:
        out.append("no differences")
    return "\n".join(out) + "\n"
