"""The engine: one machine, its migration state, the incoming side, snapshots, and the QMP command set.

``Engine.execute(name, arguments)`` is what a QMP monitor calls; it returns the ``return`` value or
raises ``QMPError(class, desc)`` with QEMU 10.0's words.  Commands run one at a time (``cmd_lock``),
as they do in QEMU's main loop; the migration and the CPU run in their own threads.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qevm.engine.blockdev import SECTOR, DirtyBitmap, Disk
from qevm.engine.errors import QMPError
from qevm.engine.hmp import run_hmp
from qevm.engine.incoming import IncomingMigration
from qevm.engine.machine import Machine
from qevm.engine.migration import SUPPORTED_CAPABILITIES, MigrationState
from qevm.engine.multifd import check_capabilities, check_transport
from qevm.engine.parameters import APIS, PARAMETERS, apply_parameters
from qevm.engine.postcopy import postcopy_caps_error
from qevm.engine.qcow2store import Qcow2SnapshotStore
from qevm.engine.snapshots import NO_SNAPSHOT_DEVICE, SnapshotStore, format_snapshot_table
from qevm.engine.states import MigrationStatus, RunState
from qevm.errors import QevmError, UsageError
from qevm.migration.channels import (
    LISTEN_SCHEMES,
    SEND_SCHEMES,
    Channel,
    FdTable,
    SocketChannel,
    open_incoming,
    open_outgoing,
    parse_uri,
)

__all__ = ["Engine", "QMPError", "COMMANDS", "QEMU_VERSION", "Arg", "check_args"]

log = logging.getLogger(__name__)

#: the QEMU release whose QMP behaviour (texts, fields) the engine reproduces
QEMU_VERSION = {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "qevm"}
MIGRATION_ACTIVE = "There's a migration process in progress"
S = MigrationStatus


# -- argument checking (QEMU's QAPI visitor messages) -------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    type: str  # "str", "bool", "int", "size", "list", "any"
    required: bool = False


def check_args(args: dict[str, Any], spec: dict[str, Arg]) -> None:
    for name in args:
        if name not in spec:
            raise QMPError(f"Parameter '{name}' is unexpected")
    for name, a in spec.items():
        if name not in args:
            if a.required:
                raise QMPError(f"Parameter '{name}' is missing")
            continue
        v = args[name]
        ok = {
            "str": isinstance(v, str),
            "bool": isinstance(v, bool),
            "int": isinstance(v, int) and not isinstance(v, bool),
            "size": isinstance(v, int) and not isinstance(v, bool),
            "list": isinstance(v, list),
            "any": True,
        }[a.type]
        if not ok:
            if a.type == "size":
                raise QMPError(f"Parameter '{name}' expects uint64")
            expected = {"str": "string", "bool": "boolean", "int": "integer", "list": "array"}[a.type]
            raise QMPError(f"Invalid parameter type for '{name}', expected: {expected}")


#: parameter values the engine stores and reports but cannot act on: ``migrate`` refuses them
UNSUPPORTED_VALUES: dict[str, Callable[[Any], bool]] = {
    "tls-creds": bool, "mode": lambda v: v != "normal", "direct-io": bool,
}


class Engine:
    """The QMP-facing VM: see the module docstring."""

    def __init__(self, machine: Machine, *, snapshot_dir: str | None = None, autostart: bool = True,
                 incoming: str | None = None, drive: str | None = None, api: str = "10.0") -> None:
        self.m = machine
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        machine.emit = self.emit
        if api not in APIS:
            raise UsageError(f"migration API {api!r}: choose one of {', '.join(APIS)}")
        self.api = api
        major, minor = (int(x) for x in api.split("."))
        self.version: dict[str, Any] = {"qemu": {"micro": 0, "minor": minor, "major": major}, "package": "qevm"}
        self.mig = MigrationState(machine, self.emit, api)
        self.fds = FdTable()
        if snapshot_dir and drive:
            raise UsageError("give --snapshot-dir or --drive, not both (snapshots go into the drive's image)")
        self.store: SnapshotStore | Qcow2SnapshotStore | None = (
            SnapshotStore(snapshot_dir) if snapshot_dir else Qcow2SnapshotStore(drive) if drive else None)
        if drive:
            machine.disk = Disk(drive)
        self.autostart = autostart
        self.incoming: IncomingMigration | None = None
        self.incoming_once = False
        self.cmd_lock = threading.RLock()
        self.exit_code: int | None = None
        self.exited = threading.Event()
        self.COMMANDS = COMMANDS
        if incoming is not None:
            machine.set_runstate(RunState.INMIGRATE)
            if incoming != "defer":
                self._start_incoming(incoming, exit_on_error=True)
        else:
            machine.boot()
            if autostart:
                machine.vm_start()

    # -- events / lifecycle ------------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        now = time.time()
        msg: dict[str, Any] = {"timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)},
                               "event": name}
        if data is not None:
            msg["data"] = data
        for cb in list(self.listeners):
            try:
                cb(name, msg)
            except Exception:  # noqa: BLE001 - a broken monitor must not stop the VM
                log.exception("event listener failed")

    def request_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self.exited.set()

    def shutdown(self) -> None:
        """Stop everything this engine started (after ``exited``)."""
        if self.mig.running:
            self.mig.cancel()
            self.mig.wait(10)
        if self.incoming is not None:
            self.incoming.abort()
        self.m.close()
        self.fds.close_all()

    # -- dispatch ----------------------------------------------------------------------------------------
    def execute(self, name: str, arguments: dict[str, Any]) -> Any:
        entry = COMMANDS.get(name)
        if entry is None:
            raise QMPError(f"The command {name} has not been found", "CommandNotFound")
        fn, spec = entry
        check_args(arguments, spec)
        with self.cmd_lock:
            return fn(self, arguments)

    # -- helpers used by the commands and HMP --------------------------------------------------------------
    def migration_info(self) -> dict[str, Any]:
        if self.mig.status is S.NONE and self.incoming is not None:
            return self.incoming.info()
        return self.mig.info()

    def _start_incoming(self, uri: str, exit_on_error: bool) -> None:
        scheme, _, rest = uri.partition(":")
        if scheme == "rdma":
            raise QMPError(rdma_error(rest, outgoing=False))
        check_transport(self.mig.caps, self.mig.params, uri)
        try:
            src = open_incoming(uri, self.fds)
        except QevmError as e:
            raise QMPError(str(e)) from None
        self.incoming = IncomingMigration(
            self.m, src, autostart=self.autostart, exit_on_error=exit_on_error, emit=self.emit,
            events_on=lambda: self.mig.caps["events"], on_exit=self.request_exit,
            caps=lambda: self.mig.caps, params=self.mig.params)
        self.incoming_once = True
        self.incoming.start()

    def migrate(self, uri: str) -> None:
        mig = self.mig
        if mig.running:
            raise QMPError(MIGRATION_ACTIVE)
        if self.m.runstate is RunState.INMIGRATE:
            raise QMPError("Guest is waiting for an incoming migration")
        if self.m.runstate is RunState.POSTMIGRATE:
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        scheme, _, rest = uri.partition(":")
        if scheme == "rdma":
            mig.prepare()
            why = rdma_error(rest, outgoing=True)
            mig.fail_setup(why)
            raise QMPError(why)
        for name, unsupported in UNSUPPORTED_VALUES.items():
            if name in mig.params and unsupported(mig.params[name]):
                raise QMPError(f"qevm's engine does not implement migrate parameter {name}="
                               f"{mig.params[name]!r}; set it back to its default")
        check_transport(mig.caps, mig.params, uri)
        if scheme in LISTEN_SCHEMES:
            # parse now (errors go back to the caller), connect in the migration thread like QEMU
            try:
                parse_uri(uri)
            except QevmError as e:
                raise QMPError(str(e)) from None
            mig.prepare()
            mig.start(lambda: self._open_outgoing(uri), uri)
            return
        if ":" not in uri or scheme not in SEND_SCHEMES:
            try:
                parse_uri(uri)  # rdma: gets its own line
            except QevmError as e:
                raise QMPError(str(e)) from None
            raise QMPError(f"unknown migration protocol: {uri}")
        mig.prepare()
        try:
            ch: Channel = self._open_outgoing(uri)
        except QevmError as e:
            mig.fail_setup(str(e))
            raise QMPError(str(e)) from None
        mig.start(lambda: ch, uri)

    def _open_outgoing(self, uri: str) -> Channel:
        ch = open_outgoing(uri, fds=self.fds, timeout=30.0)  # the connect times out, not the migration
        if isinstance(ch, SocketChannel):
            ch.settimeout(None)
        return ch

    def _can_snapshot(self) -> None:
        if isinstance(self.store, Qcow2SnapshotStore):
            self.store.check()

    def savevm(self, name: str | None) -> None:
        if self.store is None:
            raise UsageError(NO_SNAPSHOT_DEVICE)
        self._can_snapshot()
        if self.mig.running:
            raise UsageError(MIGRATION_ACTIVE)
        m = self.m
        with m.lock:
            was_running = m.running
            m.globalstate.store(RunState.RUNNING if was_running else m.runstate)
            m.vm_stop(RunState.SAVE_VM)
        mig = self.mig
        mig.prepare()
        ok = False
        try:
            self.store.save(m, name, datetime.datetime.now(), on_sync=mig._pass)
            ok = True
        except (QevmError, OSError) as e:
            mig.error = str(e)
            raise UsageError(f"Error while writing VM state: {e}") from None
        finally:
            mig.cell.transition(S.SETUP, S.COMPLETED if ok else S.FAILED)
            if was_running:
                m.vm_start()

    def loadvm(self, name: str) -> None:
        self._can_snapshot()
        m = self.m
        was_running = m.running
        m.vm_stop(RunState.RESTORE_VM)
        if self.store is None:
            raise UsageError(NO_SNAPSHOT_DEVICE)
        if self.mig.running:
            raise UsageError(MIGRATION_ACTIVE)
        with m.lock:
            try:
                self.store.load(m, name)
            except UsageError:
                raise
            except (QevmError, OSError) as e:
                raise UsageError(f"Error while loading VM state: {e}") from None
        if was_running:
            m.vm_start()

    def delvm(self, name: str) -> None:
        if self.store is None:
            return
        self._can_snapshot()
        with self.m.lock:  # no guest disk write meanwhile: both take the image's locks
            self.store.delete(name)

    def info_snapshots(self) -> str:
        if self.store is None or (isinstance(self.store, Qcow2SnapshotStore) and not self.store.qcow2):
            return NO_SNAPSHOT_DEVICE + "\n"
        return format_snapshot_table(self.store.entries())


def rdma_error(address: str, *, outgoing: bool) -> str:
    """What QEMU answers for an ``rdma:`` URI on a host without an RDMA device (as this engine is):
    a malformed HOST:PORT is refused first, then the connection manager cannot be opened."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or (host.startswith("[") != host.endswith("]")):
        return f"RDMA ERROR: bad RDMA migration address '{address}'"
    return "RDMA ERROR: could not create CM channel" if outgoing else \
        "RDMA ERROR: could not create rdma event channel"


# -- the commands --------------------------------------------------------------------------------------------

Handler = Callable[[Engine, dict[str, Any]], Any]
COMMANDS: dict[str, tuple[Handler, dict[str, Arg]]] = {}


def command(name: str, /, **spec: Arg) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, dict(spec))
        return fn
    return deco


@command("query-status")
def _query_status(e: Engine, a: dict[str, Any]) -> Any:
    return {"status": e.m.runstate.value, "running": e.m.running}


@command("query-version")
def _query_version(e: Engine, a: dict[str, Any]) -> Any:
    return dict(e.version)


@command("query-commands")
def _query_commands(e: Engine, a: dict[str, Any]) -> Any:
    return [{"name": n} for n in ["qmp_capabilities", *COMMANDS]]


@command("stop")
def _stop(e: Engine, a: dict[str, Any]) -> Any:
    if e.m.runstate is RunState.INMIGRATE:
        e.autostart = False
        if e.incoming is not None:
            e.incoming.autostart = False
    else:
        e.m.vm_stop(RunState.PAUSED)
    return {}


@command("cont")
def _cont(e: Engine, a: dict[str, Any]) -> Any:
    if e.m.runstate is RunState.INMIGRATE:
        e.autostart = True
        if e.incoming is not None:
            e.incoming.autostart = True
        return {}
    if e.m.runstate is RunState.FINISH_MIGRATE:
        raise QMPError("Migration is not finalized yet")
    e.m.vm_start()
    return {}


@command("quit")
def _quit(e: Engine, a: dict[str, Any]) -> Any:
    e.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    e.request_exit(0)
    return {}


@command("migrate", uri=Arg("str"), channels=Arg("list"), detach=Arg("bool"), resume=Arg("bool"), blk=Arg("bool"),
         inc=Arg("bool"))
def _migrate(e: Engine, a: dict[str, Any]) -> Any:
    for k in ("blk", "inc"):
        if k in a and e.api != "7.2":
            raise QMPError(f"Parameter '{k}' is unexpected")  # QEMU 9.1 removed block migration
    if (a.get("blk") or a.get("inc")) and not e.mig.running:
        # QEMU 7.2's migrate_prepare: blk / inc turn block migration on for this migration only
        if e.mig.caps["block"] or e.mig.params.get("block-incremental"):
            raise QMPError("Command options are incompatible with current migration capabilities")
        e.mig.caps["block"] = True
        e.mig.params["block-incremental"] = bool(a.get("inc"))
        e.mig.remove_block_options = True
    if a.get("resume"):
        raise QMPError("Cannot resume if there is no paused migration")
    if "uri" in a and "channels" in a:
        raise QMPError("need either 'uri' or 'channels' argument")
    if "channels" in a:
        raise QMPError("qevm's engine takes a 'uri', not 'channels'")
    if "uri" not in a:
        raise QMPError("need either 'uri' or 'channels' argument")
    try:
        e.migrate(a["uri"])
    except QMPError:
        if e.mig.remove_block_options and not e.mig.running:
            e.mig.remove_block_options = False
            e.mig.caps["block"] = False
            e.mig.params["block-incremental"] = False
        raise
    return {}


@command("migrate-incoming", uri=Arg("str"), channels=Arg("list"), **{"exit-on-error": Arg("bool")})
def _migrate_incoming(e: Engine, a: dict[str, Any]) -> Any:
    if e.incoming_once:
        raise QMPError("The incoming migration has already been started")
    if e.m.runstate is not RunState.INMIGRATE:
        raise QMPError("'-incoming' was not specified on the command line")
    if "uri" not in a or "channels" in a:
        raise QMPError("need either 'uri' or 'channels' argument")
    e._start_incoming(a["uri"], a.get("exit-on-error", True))
    return {}


@command("migrate-start-postcopy")
def _start_postcopy(e: Engine, a: dict[str, Any]) -> Any:
    caps = e.mig.caps
    if not (caps.get("postcopy-ram") or caps.get("dirty-bitmaps")):
        raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
    if e.mig.status is S.NONE:
        raise QMPError("Postcopy must be started after migration has been started")
    e.mig.start_postcopy.set()  # no error once the migration ended: that would race with the command
    return {}


@command("query-migrate")
def _query_migrate(e: Engine, a: dict[str, Any]) -> Any:
    return e.migration_info()


@command("migrate_cancel")
def _migrate_cancel(e: Engine, a: dict[str, Any]) -> Any:
    if e.mig.status is S.POSTCOPY_ACTIVE:
        raise QMPError("Postcopy migration in progress, cannot cancel.")
    e.mig.cancel()
    return {}


@command("query-migrate-parameters")
def _query_params(e: Engine, a: dict[str, Any]) -> Any:
    return dict(e.mig.params)


@command("migrate-set-parameters", **{p.name: Arg("any") for p in PARAMETERS})
def _set_params(e: Engine, a: dict[str, Any]) -> Any:
    apply_parameters(e.mig.params, a, e.m.page_size, api=e.api)
    return {}


@command("query-migrate-capabilities")
def _query_caps(e: Engine, a: dict[str, Any]) -> Any:
    return [{"capability": c, "state": e.mig.caps[c]} for c in e.mig.capabilities]


@command("migrate-set-capabilities", capabilities=Arg("list", True))
def _set_caps(e: Engine, a: dict[str, Any]) -> Any:
    if e.mig.running:
        raise QMPError(MIGRATION_ACTIVE)
    changes: dict[str, bool] = {}
    for item in a["capabilities"]:
        if not isinstance(item, dict):
            raise QMPError("Invalid parameter type for 'capabilities[0]', expected: object")
        for k in item:
            if k not in ("capability", "state"):
                raise QMPError(f"Parameter 'capabilities[0].{k}' is unexpected")
        cap, state = item.get("capability"), item.get("state")
        if cap is None:
            raise QMPError("Parameter 'capability' is missing")
        if state is None:
            raise QMPError("Parameter 'state' is missing")
        if not isinstance(cap, str) or cap not in e.mig.capabilities:
            raise QMPError(f"Parameter 'capability' does not accept value '{cap}'")
        if not isinstance(state, bool):
            raise QMPError("Invalid parameter type for 'state', expected: boolean")
        changes[cap] = state
    why = postcopy_caps_error({**e.mig.caps, **changes}, e.api)  # QEMU's own refusals come first
    if why is not None:
        raise QMPError(why)
    for cap, state in changes.items():
        if state and cap not in SUPPORTED_CAPABILITIES:
            raise QMPError(f"Migration capability '{cap}' is not supported by qevm's engine")
    check_capabilities({**e.mig.caps, **changes}, incoming_started=e.incoming is not None and e.incoming.running,
                       multifd_was=e.mig.caps.get("multifd", False), api=e.api)
    e.mig.caps.update(changes)
    return {}


@command("human-monitor-command", **{"command-line": Arg("str", True), "cpu-index": Arg("int")})
def _hmp(e: Engine, a: dict[str, Any]) -> Any:
    return run_hmp(e, a["command-line"]).replace("\n", "\r\n")


@command("getfd", fdname=Arg("str", True))
def _getfd(e: Engine, a: dict[str, Any]) -> Any:
    raise QMPError("No file descriptor supplied via SCM_RIGHTS")  # the monitor handles it when one came


@command("closefd", fdname=Arg("str", True))
def _closefd(e: Engine, a: dict[str, Any]) -> Any:
    if not e.fds.close(a["fdname"]):
        raise QMPError(f"File descriptor named '{a['fdname']}' not found")
    return {}


@command("x-qevm-query-machine", digest=Arg("bool"))
def _query_machine(e: Engine, a: dict[str, Any]) -> Any:
    m = e.m
    with m.lock:
        out: dict[str, Any] = {
            "machine": "qevm-demo-1.0", "ram-size": m.ram_size, "page-size": m.page_size, "seed": m.cpu.seed,
            "ops": m.cpu.ops, "next-line": m.cpu.line, "dirty-rate": m.cpu.dirty_rate,
            "vm-clock-ns": m.clock.now(),
        }
        if a.get("digest"):
            out["ram-sha256"] = m.ram_digest()
    return out


# -- the drive and its dirty bitmaps (QEMU's block QMP commands, the members used here) ----------------------

def _node(e: Engine, node: str) -> Disk:
    d = e.m.disk
    if d is None or node not in (d.name, d.node_name):
        raise QMPError(f"Cannot find device={node} nor node_name={node}", "DeviceNotFound")
    return d


def _bitmap(e: Engine, node: str, name: str) -> tuple[Disk, DirtyBitmap]:
    d = _node(e, node)
    bm = d.find_bitmap(name)
    if bm is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return d, bm


@command("query-block")
def _query_block(e: Engine, a: dict[str, Any]) -> Any:
    d = e.m.disk
    if d is None:
        return []
    with e.m.lock:
        return [d.info()]


@command("block-dirty-bitmap-add", node=Arg("str", True), name=Arg("str", True), granularity=Arg("int"),
         persistent=Arg("bool"), disabled=Arg("bool"))
def _bitmap_add(e: Engine, a: dict[str, Any]) -> Any:
    name = a["name"]
    if not name:
        raise QMPError("Bitmap name cannot be empty")
    d = _node(e, a["node"])
    g = a.get("granularity", d.default_granularity())
    if g < SECTOR or g & (g - 1) or g > 1 << 31:
        raise QMPError("Granularity must be power of 2, and at least 512")
    if len(name.encode()) > 1023:
        raise QMPError("Bitmap name too long")
    if d.find_bitmap(name) is not None:
        raise QMPError(f"Bitmap already exists: {name}")
    persistent = a.get("persistent", False)
    if persistent and d.format != "qcow2":
        raise QMPError(f"Cannot store persistent bitmaps in '{d.node_name}': the {d.format} format has no bitmap "
                       "support")
    with e.m.lock:
        d.bitmaps.append(DirtyBitmap(name, g, d.size, persistent=persistent, enabled=not a.get("disabled", False)))
    return {}


@command("block-dirty-bitmap-remove", node=Arg("str", True), name=Arg("str", True))
def _bitmap_remove(e: Engine, a: dict[str, Any]) -> Any:
    d, bm = _bitmap(e, a["node"], a["name"])
    if bm.busy:
        raise QMPError(f"Bitmap '{bm.name}' is currently in use by another operation and cannot be used")
    with e.m.lock:
        d.bitmaps.remove(bm)
    return {}


@command("x-debug-block-dirty-bitmap-sha256", node=Arg("str", True), name=Arg("str", True))
def _bitmap_sha256(e: Engine, a: dict[str, Any]) -> Any:
    _, bm = _bitmap(e, a["node"], a["name"])
    with e.m.lock:
        return {"sha256": bm.sha256()}
