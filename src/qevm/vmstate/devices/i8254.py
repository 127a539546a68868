"""The i8254 programmable interval timer ("i8254").

Describes QEMU 7.2 hw/timer/i8254_common.c (``vmstate_pit_common`` with the array of three
``vmstate_pit_channel`` structs).  ``channels[0].irq_disabled`` and
``channels[0].next_transition_time`` are fields of channel 0 named from the top-level state;
here they are the same Python attributes as ``channels[0]``'s.  The pre_save/post_load hooks
only dispatch to the in-kernel PIT class and have no counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qevm.vmstate import VMStateDescription, scalar, struct

__all__ = ["PITChannelState", "PITCommonState", "VMSTATE_PIT_CHANNEL", "VMSTATE_PIT_COMMON"]


@dataclass
class PITChannelState:
    count: int = 0
    latched_count: int = 0
    count_latched: int = 0
    status_latched: int = 0
    status: int = 0
    read_state: int = 0
    write_state: int = 0
    write_latch: int = 0
    rw_mode: int = 0
    mode: int = 0
    bcd: int = 0
    gate: int = 0
    count_load_time: int = 0
    next_transition_time: int = 0
    irq_disabled: int = 0


@dataclass
class PITCommonState:
    channels: list[PITChannelState] = field(default_factory=lambda: [PITChannelState() for _ in range(3)])


VMSTATE_PIT_CHANNEL = VMStateDescription(
    "pit channel", 2, 2,
    fields=[
        scalar("count", "int32"),
        scalar("latched_count", "uint16"),
        scalar("count_latched", "uint8"),
        scalar("status_latched", "uint8"),
        scalar("status", "uint8"),
        scalar("read_state", "uint8"),
        scalar("write_state", "uint8"),
        scalar("write_latch", "uint8"),
        scalar("rw_mode", "uint8"),
        scalar("mode", "uint8"),
        scalar("bcd", "uint8"),
        scalar("gate", "uint8"),
        scalar("count_load_time", "int64"),
        scalar("next_transition_time", "int64"),
    ],
)

VMSTATE_PIT_COMMON = VMStateDescription(
    "i8254", 3, 2,
    fields=[
        scalar("channels[0].irq_disabled", "uint32", 3),
        struct("channels", VMSTATE_PIT_CHANNEL, 2, num=3, factory=PITChannelState),
        scalar("channels[0].next_transition_time", "int64"),  # formerly the IRQ timer
    ],
)
