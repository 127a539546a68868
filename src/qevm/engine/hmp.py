"""The human monitor commands the engine understands (``human-monitor-command``), printing what
QEMU 10.0's HMP prints: ``savevm [tag]``, ``loadvm tag``, ``delvm tag``, ``info snapshots``,
``info migrate``, ``info status``, ``stop``, ``cont``/``c``, ``migrate [-d] uri``, ``migrate_cancel``,
``migrate_start_postcopy``,
``migrate_set_parameter name value``, ``migrate_set_capability name on|off``, ``quit``/``q``.
Lines end with ``\\n`` here; the QMP layer turns them into ``\\r\\n`` as QEMU's monitor does.
"""

from __future__ import annotations

import shlex
from typing import Any, Protocol

from qevm.engine.errors import QMPError
from qevm.engine.machine import Machine
from qevm.errors import QevmError
from qevm.migration.channels import parse_size

__all__ = ["run_hmp", "format_info_migrate", "Monitored"]


class Monitored(Protocol):
    """What the human monitor drives: the engine (``qevm.engine.core.Engine``)."""

    m: Machine

    def execute(self, name: str, arguments: dict[str, Any]) -> Any: ...
    def migration_info(self) -> dict[str, Any]: ...
    def info_snapshots(self) -> str: ...
    def savevm(self, name: str | None) -> None: ...
    def loadvm(self, name: str) -> None: ...
    def delvm(self, name: str) -> None: ...


def _error(msg: str) -> str:
    return f"Error: {msg}\n"


def _usage(cmd: str, what: str = "string") -> str:
    return f'{cmd}: {what} expected\nTry "help {cmd}" for more information\n'


def run_hmp(engine: Monitored, line: str) -> str:
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    if not words:
        return ""
    cmd, args = words[0], words[1:]
    try:
        if cmd == "info":
            if not args:
                return 'info: string expected\nTry "help info" for more information\n'
            what = args[0]
            if what == "snapshots":
                return engine.info_snapshots()
            if what == "migrate":
                return format_info_migrate(engine)
            if what == "status":
                st = engine.m.runstate.value
                if engine.m.running:
                    return "VM status: running\n"
                return "VM status: paused\n" if st == "paused" else f"VM status: paused ({st})\n"
            return f"unknown command: 'info {what}'\n"
        if cmd == "savevm":
            engine.savevm(args[0] if args else None)
            return ""
        if cmd == "loadvm":
            if not args:
                return _usage("loadvm")
            engine.loadvm(args[0])
            return ""
        if cmd == "delvm":
            if not args:
                return _usage("delvm")
            engine.delvm(args[0])
            return ""
        if cmd == "stop":
            engine.execute("stop", {})
            return ""
        if cmd in ("cont", "c"):
            engine.execute("cont", {})
            return ""
        if cmd in ("quit", "q"):
            engine.execute("quit", {})
            return ""
        if cmd == "migrate_cancel":
            engine.execute("migrate_cancel", {})
            return ""
        if cmd == "migrate_start_postcopy":
            engine.execute("migrate-start-postcopy", {})
            return ""
        if cmd == "migrate":
            rest = [w for w in args if not w.startswith("-")]
            if not rest:
                return _usage("migrate")
            flags = {w for w in args if w.startswith("-")}
            margs: dict[str, Any] = {"uri": rest[0]}
            if "-b" in flags:
                margs["blk"] = True
            if "-i" in flags:
                margs["inc"] = True
            engine.execute("migrate", margs)
            return ""
        if cmd == "migrate_set_parameter":
            if len(args) < 2:
                return _usage("migrate_set_parameter")
            name, value = args[0].replace("_", "-"), args[1]
            v: Any = value
            if name in ("max-bandwidth", "xbzrle-cache-size"):
                v = parse_size(value if value[-1:].isalpha() else value + "M", name)
            elif value.lstrip("-").isdigit():
                v = int(value)
            engine.execute("migrate-set-parameters", {name: v})
            return ""
        if cmd == "migrate_set_capability":
            if len(args) < 2:
                return _usage("migrate_set_capability")
            engine.execute("migrate-set-capabilities",
                           {"capabilities": [{"capability": args[0], "state": args[1] in ("on", "true")}]})
            return ""
    except QMPError as e:
        return _error(e.desc)
    except QevmError as e:
        return _error(str(e))
    return f"unknown command: '{cmd}'\n"


def format_info_migrate(engine: Monitored) -> str:
    """``info migrate`` (QEMU 10.0's hmp_info_migrate)."""
    info = engine.migration_info()
    out = ["globals:", "store-global-state: on", "only-migratable: off", "send-configuration: on",
           "send-section-footer: on", "send-switchover-start: off", "clear-bitmap-shift: 18"]
    if "status" in info:
        st = info["status"]
        if st == "failed" and info.get("error-desc"):
            out.append(f"Migration status: {st} ({info['error-desc']})")
        else:
            out.append(f"Migration status: {st}")
        out.append(f"total time: {info.get('total-time', 0)} ms")
        if "expected-downtime" in info:
            out.append(f"expected downtime: {info['expected-downtime']} ms")
        if "downtime" in info:
            out.append(f"downtime: {info['downtime']} ms")
        if "setup-time" in info:
            out.append(f"setup: {info['setup-time']} ms")
    ram = info.get("ram")
    if ram:
        out += [f"transferred ram: {ram['transferred'] >> 10} kbytes",
                f"throughput: {ram['mbps']:0.2f} mbps",
                f"remaining ram: {ram['remaining'] >> 10} kbytes",
                f"total ram: {ram['total'] >> 10} kbytes",
                f"duplicate: {ram['duplicate']} pages",
                f"normal: {ram['normal']} pages",
                f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
                f"dirty sync count: {ram['dirty-sync-count']}",
                f"page size: {ram['page-size'] >> 10} kbytes",
                f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
                f"pages-per-second: {ram['pages-per-second']}"]
        if ram["dirty-pages-rate"]:
            out.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram["postcopy-requests"]:
            out.append(f"postcopy request count: {ram['postcopy-requests']}")
        if ram["precopy-bytes"]:
            out.append(f"precopy ram: {ram['precopy-bytes'] >> 10} kbytes")
        if ram["downtime-bytes"]:
            out.append(f"downtime ram: {ram['downtime-bytes'] >> 10} kbytes")
        if ram["postcopy-bytes"]:
            out.append(f"postcopy ram: {ram['postcopy-bytes'] >> 10} kbytes")
    disk = info.get("disk")
    if disk:  # QEMU 7.2's block migration
        out += [f"transferred disk: {disk['transferred'] >> 10} kbytes",
                f"remaining disk: {disk['remaining'] >> 10} kbytes", f"total disk: {disk['total'] >> 10} kbytes"]
    x = info.get("xbzrle-cache")
    if x:
        out += [f"cache size: {x['cache-size']} bytes",
                f"xbzrle transferred: {x['bytes'] >> 10} kbytes",
                f"xbzrle pages: {x['pages']} pages",
                f"xbzrle cache miss: {x['cache-miss']} pages",
                f"xbzrle cache miss rate: {x['cache-miss-rate']:0.2f}",
                f"xbzrle encoding rate: {x['encoding-rate']:0.2f}",
                f"xbzrle overflow: {x['overflow']}"]
    return "\n".join(out) + "\n"
