"""``qevm info STREAM``: a human summary of a stream (``--json`` for scripts)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qevm.analysis.document import info_document
from qevm.cli.common import add_input_options, opened, print_json, read_options
from qevm.io.reader import read_stream
from qevm.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("info", help="summary: machine, capabilities, sections, RAM, commands")
    add_input_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def render(doc: dict[str, Any]) -> str:
    lines = []
    q = doc["qemu"]
    qv = " and ".join(x for x in ((f">= {q['min']}" if q["min"] else ""), (f"<= {q['max']}" if q["max"] else ""))
                      if x) or "unknown"
    lines.append(f"stream size     {doc['size']} bytes ({format_size(doc['size'])})")
    lines.append(f"machine         {doc['machine'] or '(no configuration record)'}")
    lines.append(f"page size       {doc['page_size']}")
    lines.append(f"capabilities    {', '.join(doc['capabilities']) or '(none validated)'}")
    if doc["uuid"]:
        lines.append(f"uuid            {doc['uuid']}")
    lines.append(f"QEMU            {qv}" + (f"  ({'; '.join(q['reasons'])})" if q["reasons"] else ""))
    vm = f"yes, {doc['vmdesc_size']} bytes" if doc["vmdesc"] else "no"
    if not doc["vmdesc"] and doc.get("vmdesc_source"):
        vm += f" (the {doc['vmdesc_source']} section carries one)"
    lines.append(f"vmdesc          {vm}")
    lines.append(f"devices         {doc['decoded_devices']} of {doc['device_sections']} device sections decoded")
    if doc["commands"]:
        lines.append("commands        " + ", ".join(f"{k} x{v}" for k, v in doc["commands"].items()))
    if doc["trailing_bytes"]:
        lines.append(f"trailing bytes  {doc['trailing_bytes']} after the end of the stream")
    for w in doc["warnings"]:
        lines.append(f"warning         offset {w['offset']}: {w['what']} ({w['detail']})")
    ram = doc["ram"]
    if ram:
        lines.append("")
        lines.append(f"RAM: {ram['passes']} pass(es) over memory, {ram['iterations']} iteration section(s)")
        lines.append(f"  {'block':<40} {'size':>12} {'normal':>9} {'zero':>9} {'xbzrle':>9} {'compr':>9}")
        for b in ram["blocks"]:
            p = b["pages"]
            lines.append(f"  {b['name'][:40]:<40} {format_size(b['size']):>12} {p['normal']:>9} {p['zero']:>9} "
                         f"{p['xbzrle']:>9} {p['compressed']:>9}")
    lines.append("")
    lines.append(f"  {'id':>4} {'section':<44} {'inst':>10} {'ver':>4} {'kind':<6} {'chunks':>6} {'bytes':>12}")
    for s in doc["sections"]:
        lines.append(f"  {s['section_id']:>4} {s['name'][:44]:<44} {s['instance_id']:>10} {s['version']:>4} "
                     f"{s['kind']:<6} {s['chunks']:>6} {s['size']:>12}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    with opened(args) as inp:
        an = read_stream(inp, **opts)
    doc = info_document(an, args.page_size)
    if args.json:
        print_json(doc)
    else:
        sys.stdout.write(render(doc))
    return 0
