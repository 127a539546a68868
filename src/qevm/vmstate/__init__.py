"""QEMU's VMState framework in Python: declare a device (``description``), save and load its state
(``saveload``), emit its vmdesc entry as QEMU's JSON writer does (``jsonout``), and keep the SaveStateEntry
list that writes and loads whole streams (``registry``).  ``devices`` holds device descriptions taken from QEMU."""

from __future__ import annotations

from qevm.vmstate.description import (
    CONFIGURATION,
    MIG_PRI_DEFAULT,
    MIG_PRI_GICV3,
    MIG_PRI_GICV3_ITS,
    MIG_PRI_IOMMU,
    MIG_PRI_PCI_BUS,
    MIG_PRI_VIRTIO_MEM,
    TIMER_NOT_ARMED,
    HookError,
    State,
    VersionError,
    VMStateDescription,
    VMStateField,
    array,
    buffer,
    equal,
    int32_le,
    scalar,
    struct,
    timer,
    unused,
    validate,
    varray,
    vbuffer,
    vstruct,
    with_tmp,
)
from qevm.vmstate.jsonout import vmdesc_json
from qevm.vmstate.registry import LegacyHandler, LoadReport, SaveStateEntry, SaveStateRegistry, savevm_state
from qevm.vmstate.saveload import SavedState, load_state, save_state

__all__ = [
    "VersionError", "HookError", "State", "VMStateField", "VMStateDescription", "SavedState", "scalar",
    "equal", "int32_le", "array", "varray", "buffer", "vbuffer", "unused", "timer", "struct", "vstruct",
    "with_tmp", "validate", "save_state", "load_state", "vmdesc_json", "CONFIGURATION", "LegacyHandler",
    "SaveStateEntry", "SaveStateRegistry", "LoadReport", "savevm_state", "TIMER_NOT_ARMED", "MIG_PRI_DEFAULT",
    "MIG_PRI_IOMMU", "MIG_PRI_PCI_BUS", "MIG_PRI_VIRTIO_MEM", "MIG_PRI_GICV3_ITS", "MIG_PRI_GICV3",
]
