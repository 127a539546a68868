"""The MC146818 real-time clock ("mc146818rtc").

Describes QEMU 7.2 hw/rtc/mc146818rtc.c (``vmstate_rtc`` and its subsection
``mc146818rtc/irq_reinject_on_ack_count``).  QEMU's pre_save and post_load hooks bring the
CMOS clock and the timers up to date with the host clock; they change no serialised layout
and have no counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qevm.vmstate import TIMER_NOT_ARMED, VMStateDescription, buffer, scalar, timer, unused

__all__ = ["RTCState", "VMSTATE_RTC", "VMSTATE_RTC_IRQ_REINJECT_ON_ACK_COUNT"]


@dataclass
class RTCState:
    cmos_data: bytes = field(default_factory=lambda: bytes(128))
    cmos_index: int = 0
    periodic_timer: int = TIMER_NOT_ARMED
    next_periodic_time: int = 0
    irq_coalesced: int = 0
    period: int = 0
    base_rtc: int = 0
    last_update: int = 0
    offset: int = 0
    update_timer: int = TIMER_NOT_ARMED
    next_alarm_time: int = 0
    irq_reinject_on_ack_count: int = 0


VMSTATE_RTC_IRQ_REINJECT_ON_ACK_COUNT = VMStateDescription(
    "mc146818rtc/irq_reinject_on_ack_count", 1, 1,
    fields=[scalar("irq_reinject_on_ack_count", "uint16")],
    needed=lambda s: s.irq_reinject_on_ack_count != 0,
)

VMSTATE_RTC = VMStateDescription(
    "mc146818rtc", 3, 1,
    fields=[
        buffer("cmos_data", 128),
        scalar("cmos_index", "uint8"),
        unused(7 * 4),
        timer("periodic_timer"),
        scalar("next_periodic_time", "int64"),
        unused(3 * 8),
        scalar("irq_coalesced", "uint32", 2),
        scalar("period", "uint32", 2),
        scalar("base_rtc", "uint64", 3),
        scalar("last_update", "uint64", 3),
        scalar("offset", "int64", 3),
        timer("update_timer", 3),
        scalar("next_alarm_time", "uint64", 3),
    ],
    subsections=[VMSTATE_RTC_IRQ_REINJECT_ON_ACK_COUNT],
)
