"""``qevm send FILE URI``: act as a migration source and stream FILE into a waiting QEMU."""

from __future__ import annotations

import argparse
from typing import Any

from qevm.cli.record import add_session_options, rate, rp_list, run_session
from qevm.migration.channels import parse_size
from qevm.migration.send import send
from qevm.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("send", help="act as a migration source: send a stream file to a QEMU waiting with -incoming",
                       description="Send FILE (a recorded or edited stream; - for standard input; gzip/xz/bzip2 "
                       "ok) to URI: tcp:HOST:PORT, unix:PATH, vsock:CID:PORT, exec:CMD, fd:N or "
                       "file:PATH[,offset=N].  With a return path, waits for the destination's SHUT.")
    p.add_argument("file", metavar="FILE", help="the stream to send")
    p.add_argument("uri", metavar="URI", help="the destination, e.g. tcp:127.0.0.1:4444")
    p.add_argument("--max-bandwidth", metavar="BYTES_PER_S",
                   help="limit the rate (bytes per second; K, M, G suffixes allowed)")
    p.add_argument("--live", action="store_true",
                   help="re-send RAM in iterations like a live source: pages over many PART sections, then a "
                   "subset again in later passes, before END and the devices")
    add_session_options(p, listen=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    bw = parse_size(args.max_bandwidth, "--max-bandwidth") if args.max_bandwidth else None

    def head(res: Any, doc: dict[str, Any]) -> list[str]:
        s = doc["send"]
        out = [f"sent            {s['bytes']} bytes ({format_size(s['bytes'])}) in {s['seconds']:.2f} s{rate(s)}",
               f"path            {s['source']} -> {s['target']}"]
        if res.live:
            out.append(f"live            {s['input_bytes']} input bytes; {res.resent_pages} page(s) sent again in "
                       "later passes")
        if res.return_path:
            out.append(f"return path     {rp_list(res.rp_messages)}")
        return out

    return run_session(args, lambda line: send(args.file, args.uri, max_bandwidth=bw or None, live=args.live,
                                               timeout=args.timeout, progress=line), head)
