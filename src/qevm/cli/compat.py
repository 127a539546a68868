"""``qevm compat SRC DST...``: will this state load on that QEMU?  (exit 0 yes, 1 no, 2 error)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from qevm.analysis.compat import CompatResult, Side, compat, load_side
from qevm.cli.common import print_json
from qevm.errors import SchemaError, UsageError
from qevm.migration.probe import probe


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compat", help="will a VM state load on a destination QEMU? (exit 0 yes, 1 no, 2 error)")
    p.add_argument("source", metavar="SRC", help="what will be sent: a stream/image, or a -dump-vmstate JSON")
    p.add_argument("dest", nargs="*", metavar="DST",
                   help="the destination: its -dump-vmstate JSON and/or a stream saved by it; with --qemu, "
                        "everything after -- is the destination QEMU's command line")
    p.add_argument("--qemu", metavar="COMMAND",
                   help="run the destination QEMU to produce both: COMMAND is 'qemu-system-x86_64' or a wrapper "
                        "('chroot DIR qemu-system-x86_64'); its arguments follow --")
    p.add_argument("--devices", metavar="TYPES", help="dump vs dump: only these device types (comma-separated)")
    p.add_argument("--snapshot", metavar="NAME", help="SRC is a qcow2 image: this internal snapshot")
    p.add_argument("--json", action="store_true", help="a JSON document instead of text")
    p.add_argument("--notes", action="store_true", help="also print the notes (text output)")
    p.set_defaults(run=run, takes_extra=True)


def run(args: argparse.Namespace) -> int:
    src = load_side(args.source, args.snapshot)
    dsts: list[Side] = []
    if getattr(args, "extra", None) and not args.qemu:
        raise UsageError(f"unrecognized arguments: {' '.join(args.extra)} (arguments after -- go to --qemu)")
    if args.qemu is not None:
        command = args.qemu
        pr = probe(shlex.split(command), list(args.dest) + list(getattr(args, "extra", [])))
        try:
            dsts = [load_side(pr.dump), load_side(pr.stream)]
            dsts[0].name = f"{command} -dump-vmstate"
            dsts[1].name = f"{command} (paused, saved)"
        finally:
            pr.close()
    else:
        dsts = [load_side(d) for d in args.dest]
    if not dsts:
        raise UsageError("no destination: give its -dump-vmstate JSON and/or a stream, or --qemu")
    devices = {d.strip() for d in args.devices.split(",") if d.strip()} if args.devices else None
    try:
        res = compat(src, dsts, devices)
    except SchemaError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print_json(res.as_json())
    else:
        sys.stdout.write(render(res, args.notes))
    return 0 if res.compatible else 1


def render(res: CompatResult, notes: bool = False) -> str:
    out: list[str] = [f"source: {res.source}"] + [f"destination: {d}" for d in res.destination]
    order = {"break": 0, "risk": 1, "note": 2}
    shown: list[Any] = sorted((f for f in res.findings if notes or f.severity != "note"),
                              key=lambda f: order[f.severity])
    for f in shown:
        out.append(f"{f.severity:5}  {f.section}: {f.reason}")
        for fld in f.fields[:4]:
            out.append(f"       field {fld}")
    verdict = "compatible" if res.compatible else "INCOMPATIBLE"
    out.append(f"{verdict}: {res.checked} device sections checked, {res.count('break')} break, "
               f"{res.count('risk')} risk, {res.count('note')} note")
    return "\n".join(out) + "\n"
