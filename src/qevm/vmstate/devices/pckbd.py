"""The i8042 keyboard controller ("pckbd").

Describes QEMU 7.2 hw/input/pckbd.c (``vmstate_kbd``, its subsections ``pckbd_outport`` and
``pckbd/extended_state``, and the ISA wrapper ``vmstate_kbd_isa``), with the hooks that decide
what is written: ``pending_tmp`` is derived from ``pending`` before saving, the outport is sent
only when it differs from the value implied by the status register, the extended state only
when the ``extended-state`` property is on (the default).  Hooks that only touch QEMU's timers
and IRQ lines have no counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qevm.vmstate import VMStateDescription, scalar, struct

__all__ = ["KBDState", "ISAKBDState", "VMSTATE_KBD", "VMSTATE_KBD_OUTPORT", "VMSTATE_KBD_EXTENDED_STATE",
           "VMSTATE_KBD_ISA"]

KBD_STAT_OBF = 0x01
KBD_STAT_CMD = 0x08
KBD_STAT_UNLOCKED = 0x10
KBD_STAT_MOUSE_OBF = 0x20
KBD_MODE_KBD_INT = 0x01
KBD_MODE_MOUSE_INT = 0x02
KBD_OUT_RESET = 0x01
KBD_OUT_A20 = 0x02
KBD_OUT_OBF = 0x10
KBD_OUT_MOUSE_OBF = 0x20
KBD_OUT_ONES = 0xCC
KBD_PENDING_KBD_COMPAT = 0x01
KBD_PENDING_AUX_COMPAT = 0x02
KBD_PENDING_CTRL_KBD = 0x04
KBD_PENDING_CTRL_AUX = 0x08
KBD_PENDING_KBD = 0x10
KBD_PENDING_AUX = 0x20
KBD_MIGR_TIMER_PENDING = 0x1
KBD_OBSRC_KBD = 0x01
KBD_OBSRC_MOUSE = 0x02


@dataclass
class KBDState:
    """The controller state after reset."""

    write_cmd: int = 0
    status: int = KBD_STAT_CMD | KBD_STAT_UNLOCKED
    mode: int = KBD_MODE_KBD_INT | KBD_MODE_MOUSE_INT
    outport: int = KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES
    migration_flags: int = 0
    obsrc: int = 0
    outport_present: bool = False
    extended_state: bool = True  # the "extended-state" property
    extended_state_loaded: bool = False
    pending: int = 0
    obdata: int = 0
    cbdata: int = 0
    pending_tmp: int = 0
    throttle_timer_pending: bool = False  # stands for timer_pending(throttle_timer)


@dataclass
class ISAKBDState:
    kbd: KBDState = field(default_factory=KBDState)


def _outport_default(s: KBDState) -> int:
    return (KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES
            | (KBD_OUT_OBF if s.status & KBD_STAT_OBF else 0)
            | (KBD_OUT_MOUSE_OBF if s.status & KBD_STAT_MOUSE_OBF else 0))


def _outport_post_load(s: KBDState, version_id: int) -> None:
    s.outport_present = True


def _outport_needed(s: KBDState) -> bool:
    return s.outport != _outport_default(s)


VMSTATE_KBD_OUTPORT = VMStateDescription(
    "pckbd_outport", 1, 1,
    fields=[scalar("outport", "uint8")],
    post_load=_outport_post_load,
    needed=_outport_needed,
)


def _extended_pre_save(s: KBDState) -> None:
    s.migration_flags = KBD_MIGR_TIMER_PENDING if s.throttle_timer_pending else 0


def _extended_post_load(s: KBDState, version_id: int) -> None:
    s.throttle_timer_pending = bool(s.migration_flags & KBD_MIGR_TIMER_PENDING)
    s.extended_state_loaded = True


VMSTATE_KBD_EXTENDED_STATE = VMStateDescription(
    "pckbd/extended_state", 0, 0,
    fields=[
        scalar("migration_flags", "uint32"),
        scalar("obsrc", "uint32"),
        scalar("obdata", "uint8"),
        scalar("cbdata", "uint8"),
    ],
    pre_save=_extended_pre_save,
    post_load=_extended_post_load,
    needed=lambda s: bool(s.extended_state),
)


def _kbd_pre_save(s: KBDState) -> None:
    if s.extended_state:
        s.pending_tmp = s.pending
    else:
        s.pending_tmp = 0
        if s.pending & KBD_PENDING_KBD:
            s.pending_tmp |= KBD_PENDING_KBD_COMPAT
        if s.pending & KBD_PENDING_AUX:
            s.pending_tmp |= KBD_PENDING_AUX_COMPAT


def _kbd_pre_load(s: KBDState) -> None:
    s.outport_present = False
    s.extended_state_loaded = False


def _kbd_post_load(s: KBDState, version_id: int) -> None:
    if not s.outport_present:
        s.outport = _outport_default(s)
    s.pending = s.pending_tmp
    if not s.extended_state_loaded:
        if s.status & KBD_STAT_OBF:
            s.obsrc = KBD_OBSRC_MOUSE if s.status & KBD_STAT_MOUSE_OBF else KBD_OBSRC_KBD
        else:
            s.obsrc = 0
        if s.pending & KBD_PENDING_KBD_COMPAT:
            s.pending |= KBD_PENDING_KBD
        if s.pending & KBD_PENDING_AUX_COMPAT:
            s.pending |= KBD_PENDING_AUX
    s.pending &= KBD_PENDING_CTRL_KBD | KBD_PENDING_CTRL_AUX | KBD_PENDING_KBD | KBD_PENDING_AUX


VMSTATE_KBD = VMStateDescription(
    "pckbd", 3, 3,
    fields=[
        scalar("write_cmd", "uint8"),
        scalar("status", "uint8"),
        scalar("mode", "uint8"),
        scalar("pending_tmp", "uint8"),
    ],
    subsections=[VMSTATE_KBD_OUTPORT, VMSTATE_KBD_EXTENDED_STATE],
    pre_load=_kbd_pre_load,
    post_load=_kbd_post_load,
    pre_save=_kbd_pre_save,
)

VMSTATE_KBD_ISA = VMStateDescription(
    "pckbd", 3, 3,
    fields=[struct("kbd", VMSTATE_KBD, factory=KBDState)],
)
