"""``qevm vm --qmp unix:PATH [...]``: run the demo VM, driven over QMP like a QEMU process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from qevm.engine import Engine, Machine, QMPServer
from qevm.migration.channels import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("vm", help="run a Python VM that migrates and snapshots like QEMU (QMP-driven)")
    p.add_argument("--qmp", required=True, metavar="unix:PATH",
                   help="QMP server address: unix:PATH (QEMU's ,server=on,wait=off suffixes are accepted) "
                        "or tcp:HOST:PORT")
    p.add_argument("--ram", default="256M", metavar="SIZE", help="RAM size (default 256M)")
    p.add_argument("--dirty-rate", type=int, default=1000, metavar="PAGES_PER_S",
                   help="pages the workload writes per second of virtual time (default 1000)")
    p.add_argument("--serial", metavar="FILE", help="file the serial port writes to (truncated, as QEMU's file:)")
    p.add_argument("--incoming", metavar="URI",
                   help="wait for an incoming migration: tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N, "
                        "file:PATH[,offset=N], or 'defer' (then migrate-incoming)")
    p.add_argument("-S", dest="stopped", action="store_true", help="do not start the CPU (cont starts it)")
    p.add_argument("--snapshot-dir", metavar="DIR", help="where savevm keeps snapshots (one stream file each)")
    p.add_argument("--device", action="append", default=[], metavar="MODEL",
                   help="add a device: debug-migration (a section carrying the stream's vmdesc)")
    p.add_argument("--drive", metavar="FILE",
                   help="the VM's disk image; with a qcow2 image savevm/loadvm/delvm use its internal snapshots")
    p.add_argument("--migration-api", choices=("10.0", "7.2"), default="10.0",
                   help="whose QMP migration interface to offer: QEMU 10.0's (default) or QEMU 7.2's, which "
                        "has the compress capability and compression-thread parameters")
    p.add_argument("--disk-every", type=int, default=0, metavar="N",
                   help="with --drive: every N-th workload operation also writes one 512-byte sector of the disk "
                        "(default 0: the guest never writes its disk)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument("--fill", type=float, default=1.0,
                   help="fraction of RAM the firmware fills with data at boot (default 1.0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qevm vm: %(message)s"))
    root = logging.getLogger("qevm")
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    machine = Machine(parse_size(args.ram, "--ram"), dirty_rate=args.dirty_rate, serial_path=args.serial,
                      seed=args.seed, fill=args.fill, devices=tuple(args.device),
                      disk_every=args.disk_every)
    engine = Engine(machine, snapshot_dir=args.snapshot_dir, autostart=not args.stopped, incoming=args.incoming,
                    drive=args.drive, api=args.migration_api)
    server = QMPServer(engine, args.qmp)

    def on_signal(signum: int, frame: Any) -> None:
        engine.emit("SHUTDOWN", {"guest": False, "reason": "host-signal"})
        engine.request_exit(0)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        machine.start_cpu_thread()
        server.start()
        while not engine.exited.wait(0.5):
            pass
    finally:
        server.close()
        engine.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
        root.removeHandler(handler)
    return engine.exit_code or 0
