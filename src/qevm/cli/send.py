"""``qevm send FILE URI``: act as a migration source and stream FILE into a waiting QEMU."""

from __future__ import annotations

import argparse
import sys

from ..send import send
from ..transport import parse_size
from .common import print_json
from .info import render as render_info
from .record import ProgressLine, add_session_options, rp_list, size


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
    if bw == 0:
        bw = None
    line = ProgressLine(args.progress)
    try:
        res = send(args.file, args.uri, max_bandwidth=bw, live=args.live, timeout=args.timeout, progress=line)
    finally:
        line.clear()
    doc = res.document()
    if args.json:
        print_json(doc)
        return 0
    s = doc["send"]
    rate = f" ({size(s['rate_bytes_per_s'])}/s)" if s["rate_bytes_per_s"] else ""
    out = [f"sent            {s['bytes']} bytes ({size(s['bytes'])}) in {s['seconds']:.2f} s{rate}",
           f"path            {s['source']} -> {s['target']}"]
    if res.live:
        out.append(f"live            {s['input_bytes']} input bytes; {res.resent_pages} page(s) sent again in "
                   "later passes")
    if res.return_path:
        out.append(f"return path     {rp_list(res.rp_messages)}")
    for n in res.notes:
        out.append(f"note            {n}")
    sys.stdout.write("\n".join(out) + "\n\n" + render_info(doc["stream"]))
    return 0
