"""``qevm record URI -o FILE``: be the destination of a real QEMU migration and keep the stream.

Also home of the live progress line and the summary helpers shared by ``tap`` and ``send``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from qevm.cli.common import print_json
from qevm.cli.info import render as render_info
from qevm.format.returnpath import RpMessage
from qevm.migration.record import record
from qevm.migration.session import Progress
from qevm.units import format_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("record", help="be a migration destination and record the stream to a file",
                       description="Take an incoming migration from URI, any address QEMU's -incoming takes: "
                       "listen on tcp:HOST:PORT, unix:PATH or vsock:CID:PORT (a QEMU `migrate URI` completes), "
                       "or read exec:COMMAND's output, fd:N or file:PATH[,offset=N]; FILE holds the stream "
                       "exactly as received (FILE.part until the stream is complete).")
    p.add_argument("uri", metavar="URI", help="e.g. tcp:127.0.0.1:4444, unix:/tmp/mig.sock (port 0: pick a free "
                   "one, printed on stderr), exec:'cat saved.mig', file:saved.mig")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the recording")
    add_session_options(p)
    p.add_argument("--switchover-ack", action="store_true",
                   help="send SWITCHOVER_ACK when the return path opens, as a QEMU >= 8.1 destination with the "
                   "switchover-ack capability does")
    p.set_defaults(run=run)


def add_session_options(p: argparse.ArgumentParser, listen: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="summary as JSON on stdout")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up when the peer sends nothing for S seconds (default 60)")
    if listen:
        p.add_argument("--accept-timeout", type=float, metavar="S",
                       help="give up when nobody connects within S seconds (default: wait)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress on stderr (default: when stderr is a terminal)")


def render_progress(p: Progress) -> str:
    done = f"{format_size(p.bytes)}" + (f"/{format_size(p.total)} {100 * p.bytes / p.total:3.0f}%" if p.total else "")
    parts = [f"{p.elapsed:6.1f}s", f"{done} {format_size(p.rate)}/s", f"pages {p.pages}", f"pass {p.passes}"]
    if p.rp_messages or p.back_bytes:
        rp = f"rp {p.rp_messages} msg"
        if p.page_requests:
            rp += f", {p.page_requests} page req"
        parts.append(rp)
    if p.phase:
        parts.append(p.phase)
    if p.section:
        parts.append(p.section)
    return "  ".join(parts)


class ProgressLine:
    """One line on stderr rewritten in place with ``\\r``; silent when disabled (not a terminal)."""

    def __init__(self, enabled: bool | None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.shown = False

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + render_progress(p)[:200] + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def note(self, text: str) -> None:
        """A line of its own (the listening address, say), shown when the progress is on."""
        if self.enabled:
            self.clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def rp_list(msgs: list[RpMessage], limit: int = 12) -> str:
    out = []
    for m in msgs[:limit]:
        i = m.info()
        arg = i.get("status", i.get("value"))
        if "start" in i:
            arg = f"{i['block']}:0x{i['start']:x}"
        out.append(f"{m.name}({arg})" if arg is not None else m.name)
    if len(msgs) > limit:
        out.append(f"... {len(msgs) - limit} more")
    return ", ".join(out) or "(none)"


def on_listen(line: ProgressLine, requested: str) -> Any:
    picked = requested.startswith("tcp:") and requested.partition(",")[0].endswith(":0")

    def cb(address: str) -> None:
        if line.enabled or picked:
            # a port picked by the system must be told, even to a script
            print(f"qevm: listening on {address}", file=sys.stderr, flush=True)
    return cb


def run_session(args: argparse.Namespace, call: Callable[[ProgressLine], Any],
                head: Callable[[Any, dict[str, Any]], list[str]]) -> int:
    """The shared shape of record/tap/send: run with a progress line, then the summary (or --json)."""
    line = ProgressLine(args.progress)
    try:
        res = call(line)
    finally:
        line.clear()
    doc = res.document()
    if args.json:
        print_json(doc)
        return 0
    out = head(res, doc) + [f"note            {n}" for n in res.notes]
    sys.stdout.write("\n".join(out) + "\n\n" + render_info(doc["stream"]))
    return 0


def rate(d: dict[str, Any]) -> str:
    return f" ({format_size(d['rate_bytes_per_s'])}/s)" if d["rate_bytes_per_s"] else ""


def run(args: argparse.Namespace) -> int:
    def head(res: Any, doc: dict[str, Any]) -> list[str]:
        r = doc["record"]
        out = [f"recorded        {r['bytes']} bytes ({format_size(r['bytes'])}) in {r['seconds']:.2f} s{rate(r)}",
               f"from            {r['source']}" + (f" on {r['listen']}" if r["listen"] != r["source"] else ""),
               f"output          {r['output']} (complete)"]
        if res.return_path:
            out.append(f"return path     opened; sent {rp_list(res.sent)}")
        return out

    return run_session(args, lambda line: record(
        args.uri, args.output, timeout=args.timeout, accept_timeout=args.accept_timeout, progress=line,
        switchover_ack=args.switchover_ack, on_listen=on_listen(line, args.uri)), head)
