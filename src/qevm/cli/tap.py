"""``qevm tap LISTEN_URI TARGET_URI [-o FILE]``: forward a live migration unchanged and show what crosses."""

from __future__ import annotations

import argparse
from typing import Any

from qevm.cli.record import add_session_options, on_listen, rate, rp_list, run_session
from qevm.migration.tap import tap
from qevm.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tap", help="sit between a source and a destination QEMU, decode the stream as it passes",
                       description="Accept the source QEMU's migration on LISTEN_URI (any -incoming URI), open the "
                       "destination (a QEMU started with -incoming TARGET_URI, or any migrate URI) and forward "
                       "every byte unchanged in both directions, return path included when both ends are "
                       "sockets; the stream is decoded on the way.")
    p.add_argument("listen", metavar="LISTEN_URI", help="where the source connects, e.g. tcp:127.0.0.1:4444 "
                   "(or exec:CMD, fd:N, file:PATH to read a stream)")
    p.add_argument("target", metavar="TARGET_URI", help="the destination, e.g. tcp:127.0.0.1:5555 "
                   "(or exec:CMD, fd:N, file:PATH)")
    p.add_argument("-o", "--output", metavar="FILE", help="also record the forward stream (FILE.part until complete)")
    p.add_argument("--rp-output", metavar="FILE", help="also record the return-path bytes")
    add_session_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    def head(res: Any, doc: dict[str, Any]) -> list[str]:
        t = doc["tap"]
        out = [f"forwarded       {t['forward_bytes']} bytes ({format_size(t['forward_bytes'])}) in {t['seconds']:.2f} s"
               f"{rate(t)}",
               f"path            {' -> '.join(dict.fromkeys((t['source'], t['listen'], t['target'])))}",
               f"return path     {t['back_bytes']} bytes: {rp_list(res.rp_messages)}"]
        if res.page_requests:
            out.append(f"page requests   {res.page_requests} (postcopy faults served through the tap)")
        for sc in res.side_channels:
            what = (f"multifd channel {sc.channel}: {sc.packets} packets, {sc.pages} pages + {sc.zero_pages} zero, "
                    f"{sc.syncs} syncs" if sc.kind == "multifd" else "not decoded")
            out.append(f"side channel    {sc.source}: {sc.forward} bytes forward, {sc.back} back ({what})")
        if args.output:
            out.append(f"output          {args.output} (complete)")
        return out

    return run_session(args, lambda line: tap(
        args.listen, args.target, output=args.output, rp_output=args.rp_output, timeout=args.timeout,
        accept_timeout=args.accept_timeout, progress=line, on_listen=on_listen(line, args.listen)), head)
