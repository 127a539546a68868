"""The two lifecycles of the engine, as tables: QEMU's migration status and its run state.

``MigrationStatus`` is QAPI's ``MigrationStatus`` (qapi/migration.json) restricted to what a precopy or postcopy
engine goes through; ``MIGRATION_TRANSITIONS`` lists the moves QEMU 10.0's migration code makes
(migration/migration.c: ``migrate_set_state(old, new)`` is a compare-and-swap, a move that is not in
the table is a bug and raises ``IllegalTransition``).  ``RunState`` / ``RUNSTATE_TRANSITIONS`` is the
subset of system/runstate.c's ``runstate_transitions_def`` that this machine can reach.

    none --> setup --> active --> device --> completed
               |         |          |   +--> postcopy-active --> completed | failed
               +---------+----------+--> failed
               +---------+----------+--> cancelling --> cancelled

The destination uses the same enum: setup (listening), active (loading), postcopy-active (from
POSTCOPY_LISTEN on), completed or failed.  A postcopy migration cannot be cancelled (QEMU refuses
``migrate_cancel`` then), so postcopy-active has no move to cancelling.
"""

from __future__ import annotations

import threading
from enum import StrEnum

from qevm.errors import QevmError

__all__ = ["MigrationStatus", "MIGRATION_TRANSITIONS", "RUNNING_STATUSES", "TERMINAL_STATUSES",
           "IllegalTransition", "StatusCell", "RunState", "RUNSTATE_TRANSITIONS", "transitions_table"]


class IllegalTransition(QevmError):
    """A state change the table does not allow (a bug in the caller, never an input error)."""


class MigrationStatus(StrEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    DEVICE = "device"
    POSTCOPY_ACTIVE = "postcopy-active"


S = MigrationStatus
#: status -> statuses it may move to
MIGRATION_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    # COMPLETED straight from SETUP: savevm (qemu_savevm_state has no active stage)
    S.SETUP: frozenset({S.ACTIVE, S.COMPLETED, S.FAILED, S.CANCELLING}),
    # COMPLETED from ACTIVE: the destination (it has no device stage) and savevm
    # POSTCOPY_ACTIVE from ACTIVE: the destination at POSTCOPY_LISTEN
    S.ACTIVE: frozenset({S.DEVICE, S.COMPLETED, S.FAILED, S.CANCELLING, S.POSTCOPY_ACTIVE}),
    # POSTCOPY_ACTIVE from DEVICE: the source once the postcopy package was sent
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.POSTCOPY_ACTIVE}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.CANCELLED: frozenset(),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
}
#: QEMU's migration_is_running(): a new ``migrate`` is refused in these
RUNNING_STATUSES = frozenset({S.SETUP, S.ACTIVE, S.DEVICE, S.CANCELLING, S.POSTCOPY_ACTIVE})
#: a new migration may start (after ``reset``) from these
TERMINAL_STATUSES = frozenset({S.NONE, S.COMPLETED, S.FAILED, S.CANCELLED})


class StatusCell:
    """One migration's status with QEMU's compare-and-swap semantics.

    ``transition(old, new)`` moves only if the current status is ``old`` (returns False otherwise,
    like ``migrate_set_state``) and raises ``IllegalTransition`` when ``old -> new`` is not in the
    table.  ``on_change(new)`` runs after every move (the MIGRATION event)."""

    def __init__(self, on_change: object = None) -> None:
        self._lock = threading.Lock()
        self._status = MigrationStatus.NONE
        self.on_change = on_change

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def reset(self) -> None:
        """A new migration: back to ``none`` (QEMU's ``migrate_init``); only from a terminal status."""
        with self._lock:
            if self._status not in TERMINAL_STATUSES:
                raise IllegalTransition(f"cannot start a new migration while the status is {self._status}")
            self._status = MigrationStatus.NONE

    def transition(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        if new not in MIGRATION_TRANSITIONS[old]:
            raise IllegalTransition(f"migration status {old} -> {new} is not allowed")
        with self._lock:
            if self._status is not old:
                return False
            self._status = new
        cb = self.on_change
        if callable(cb):
            cb(new)
        return True


class RunState(StrEnum):
    """QAPI ``RunState`` values this machine reaches."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SAVE_VM = "save-vm"
    RESTORE_VM = "restore-vm"
    SHUTDOWN = "shutdown"


R = RunState
#: run state -> run states it may move to (system/runstate.c, the part that applies here)
RUNSTATE_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    R.PRELAUNCH: frozenset({R.RUNNING, R.FINISH_MIGRATE, R.INMIGRATE, R.SAVE_VM, R.RESTORE_VM, R.SHUTDOWN}),
    R.INMIGRATE: frozenset({R.RUNNING, R.PAUSED, R.PRELAUNCH, R.POSTMIGRATE, R.SHUTDOWN, R.FINISH_MIGRATE,
                            R.RESTORE_VM, R.SAVE_VM}),
    R.RUNNING: frozenset({R.PAUSED, R.FINISH_MIGRATE, R.SAVE_VM, R.RESTORE_VM, R.SHUTDOWN, R.POSTMIGRATE}),
    R.PAUSED: frozenset({R.RUNNING, R.FINISH_MIGRATE, R.POSTMIGRATE, R.SAVE_VM, R.RESTORE_VM, R.SHUTDOWN,
                         R.PRELAUNCH}),
    R.FINISH_MIGRATE: frozenset({R.RUNNING, R.PAUSED, R.POSTMIGRATE, R.PRELAUNCH, R.SHUTDOWN}),
    R.POSTMIGRATE: frozenset({R.RUNNING, R.FINISH_MIGRATE, R.PRELAUNCH, R.SAVE_VM, R.RESTORE_VM, R.SHUTDOWN,
                              R.PAUSED}),
    R.SAVE_VM: frozenset({R.RUNNING, R.PAUSED, R.PRELAUNCH, R.POSTMIGRATE, R.SHUTDOWN, R.SAVE_VM}),
    R.RESTORE_VM: frozenset({R.RUNNING, R.PAUSED, R.PRELAUNCH, R.POSTMIGRATE, R.SHUTDOWN, R.SAVE_VM,
                             R.RESTORE_VM}),
    R.SHUTDOWN: frozenset(),
}


def transitions_table() -> str:
    """The migration lifecycle as a Markdown table (docs are generated from the data)."""
    lines = ["| from | to |", "|---|---|"]
    for old, news in MIGRATION_TRANSITIONS.items():
        lines.append(f"| {old} | {', '.join(sorted(n.value for n in news)) or '(terminal)'} |")
    return "\n".join(lines)
