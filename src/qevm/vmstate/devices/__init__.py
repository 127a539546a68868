"""Descriptions of real QEMU devices, declared with ``qevm.vmstate`` (one module per device).

Each module names the QEMU source file and version it describes, holds the device's state as
dataclasses with QEMU's reset values, and the ``VMStateDescription`` objects.  ``DESCRIPTIONS``
maps a top-level vmsd (by module) to the factory of a fresh device object.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qevm.vmstate import VMStateDescription
from qevm.vmstate.devices import i8254, mc146818rtc, pckbd, serial

__all__ = ["i8254", "mc146818rtc", "pckbd", "serial", "DESCRIPTIONS"]

#: (top-level description, factory of a fresh object) for every device described here
DESCRIPTIONS: dict[str, tuple[VMStateDescription, Callable[[], Any]]] = {
    "pckbd": (pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState),
    "mc146818rtc": (mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState),
    "serial": (serial.VMSTATE_ISA_SERIAL, serial.ISASerialState),
    "serial-mm": (serial.VMSTATE_SERIAL_MM, serial.SerialMM),
    "i8254": (i8254.VMSTATE_PIT_COMMON, i8254.PITCommonState),
}
