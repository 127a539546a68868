"""``qevm core STREAM -o FILE``: the ELF core QEMU's dump-guest-memory (paging off) writes."""

from __future__ import annotations

import argparse

from qevm.analysis.elfcore import write_core
from qevm.analysis.guestmap import parse_map_options
from qevm.cli.common import read_options


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("core", help="guest memory as an ELF core file (as QEMU's dump-guest-memory writes it)")
    p.add_argument("stream", metavar="STREAM", help="stream file, or - for standard input")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the core file (written whole or not at all)")
    p.add_argument("--map", action="append", default=[], metavar="KEY=VALUE",
                   help="memory-map facts the stream cannot tell: max-ram-below-4g=SIZE (as given to QEMU's -machine)")
    p.add_argument("--snapshot", metavar="NAME", help="STREAM is a qcow2 image: this internal snapshot's VM state")
    p.add_argument("--page-size", type=int, metavar="N", help="target page size when the stream cannot tell")
    p.set_defaults(run=run, schema=None, lenient=True)


def run(args: argparse.Namespace) -> int:
    opts = read_options(args)
    res = write_core(args.stream, args.output, overrides=parse_map_options(args.map), snapshot=args.snapshot,
                     page_size=opts["page_size"])
    print(f"{res.path}: ELF{32 * res.elf_class} core, machine {res.machine}, {res.cpus} CPU(s), "
          f"{len(res.loads)} PT_LOAD, vmcoreinfo {'yes' if res.vmcoreinfo else 'no'}, {res.size} bytes")
    for r in res.loads:
        print(f"  0x{r.addr:016x}-0x{r.addr + r.size - 1:016x}  {r.block} +0x{r.offset:x}")
    return 0
