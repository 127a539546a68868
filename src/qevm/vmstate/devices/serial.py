"""The 16550A UART ("serial"), on the ISA bus and memory-mapped.

Describes QEMU 7.2 hw/char/serial.c (``vmstate_serial`` with its seven subsections,
``vmstate_serial_mm``) and hw/char/serial-isa.c (``vmstate_isa_serial``), with the FIFO
layout of QEMU 7.2 util/fifo8.c (``vmstate_fifo8``).  The hooks that shape the stream are
kept: ``fcr_vmstate`` is copied from ``fcr`` before saving, ``thr_ipending`` and ``poll_msl``
default to -1 before loading, and post_load derives ``thr_ipending``, re-applies the FCR and
rejects the states QEMU rejects (TSR retry count inconsistent with LSR.TEMT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qevm.vmstate import (
    TIMER_NOT_ARMED,
    HookError,
    VMStateDescription,
    VMStateField,
    scalar,
    struct,
    timer,
    vbuffer,
)

__all__ = ["Fifo8", "SerialState", "ISASerialState", "SerialMM", "VMSTATE_FIFO8", "VMSTATE_SERIAL",
           "VMSTATE_ISA_SERIAL", "VMSTATE_SERIAL_MM", "UART_FIFO_LENGTH"]

UART_FIFO_LENGTH = 16
UART_IER_THRI = 0x02
UART_IIR_NO_INT = 0x01
UART_IIR_ID = 0x06
UART_IIR_THRI = 0x02
UART_IIR_FE = 0xC0
UART_LSR_TEMT = 0x40
UART_LSR_THRE = 0x20
UART_FCR_FE = 0x01
UART_MCR_OUT2 = 0x08
UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
MAX_XMIT_RETRY = 4


@dataclass
class Fifo8:
    capacity: int = UART_FIFO_LENGTH
    data: bytes = field(default_factory=lambda: bytes(UART_FIFO_LENGTH))
    head: int = 0
    num: int = 0


VMSTATE_FIFO8 = VMStateDescription(
    "Fifo8", 1, 1,
    fields=[
        vbuffer("data", "capacity", 1),
        scalar("head", "uint32"),
        scalar("num", "uint32"),
    ],
)


@dataclass
class SerialState:
    """The UART as QEMU's reset leaves it, with a backend that has no modem lines (``poll_msl`` -1)."""

    divider: int = 0x0C
    rbr: int = 0
    ier: int = 0
    iir: int = UART_IIR_NO_INT
    lcr: int = 0
    mcr: int = UART_MCR_OUT2
    lsr: int = UART_LSR_TEMT | UART_LSR_THRE
    msr: int = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
    scr: int = 0
    fcr: int = 0
    fcr_vmstate: int = 0
    thr_ipending: int = 0
    tsr_retry: int = 0
    thr: int = 0
    tsr: int = 0
    recv_fifo: Fifo8 = field(default_factory=Fifo8)
    xmit_fifo: Fifo8 = field(default_factory=Fifo8)
    fifo_timeout_timer: int = TIMER_NOT_ARMED
    timeout_ipending: int = 0
    poll_msl: int = -1
    modem_status_poll: int = TIMER_NOT_ARMED
    last_break_enable: int = 0
    recv_fifo_itl: int = 1


def _pre_save(s: SerialState) -> None:
    s.fcr_vmstate = s.fcr


def _pre_load(s: SerialState) -> None:
    s.thr_ipending = -1
    s.poll_msl = -1


def _write_fcr(s: SerialState, val: int) -> None:
    s.fcr = val
    if val & UART_FCR_FE:
        s.iir |= UART_IIR_FE
        s.recv_fifo_itl = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}[val & 0xC0]
    else:
        s.iir &= ~UART_IIR_FE & 0xFF


def _post_load(s: SerialState, version_id: int) -> None:
    if version_id < 3:
        s.fcr_vmstate = 0
    if s.thr_ipending == -1:
        s.thr_ipending = int((s.iir & UART_IIR_ID) == UART_IIR_THRI)
    if s.tsr_retry > 0:
        if s.lsr & UART_LSR_TEMT:
            raise HookError("serial", "post_load", f"inconsistent state (tsr empty, tsr_retry={s.tsr_retry})")
        s.tsr_retry = min(s.tsr_retry, MAX_XMIT_RETRY)
    elif not s.lsr & UART_LSR_TEMT:
        raise HookError("serial", "post_load", "inconsistent state (tsr not empty, tsr_retry=0)")
    s.last_break_enable = (s.lcr >> 6) & 1
    _write_fcr(s, s.fcr_vmstate)


def _thr_ipending_needed(s: SerialState) -> bool:
    if s.ier & UART_IER_THRI:
        return s.thr_ipending != int((s.iir & UART_IIR_ID) == UART_IIR_THRI)
    return False


def _sub(name: str, needed: Callable[[SerialState], bool], *fields: VMStateField) -> VMStateDescription:
    return VMStateDescription(name, 1, 1, fields=list(fields), needed=needed)


VMSTATE_SERIAL_THR_IPENDING = _sub("serial/thr_ipending", _thr_ipending_needed, scalar("thr_ipending", "int32"))
VMSTATE_SERIAL_TSR = _sub("serial/tsr", lambda s: s.tsr_retry != 0,
                          scalar("tsr_retry", "uint32"), scalar("thr", "uint8"), scalar("tsr", "uint8"))
VMSTATE_SERIAL_RECV_FIFO = _sub("serial/recv_fifo", lambda s: s.recv_fifo.num != 0,
                                struct("recv_fifo", VMSTATE_FIFO8, 1, factory=Fifo8))
VMSTATE_SERIAL_XMIT_FIFO = _sub("serial/xmit_fifo", lambda s: s.xmit_fifo.num != 0,
                                struct("xmit_fifo", VMSTATE_FIFO8, 1, factory=Fifo8))
VMSTATE_SERIAL_FIFO_TIMEOUT_TIMER = _sub("serial/fifo_timeout_timer",
                                         lambda s: s.fifo_timeout_timer != TIMER_NOT_ARMED,
                                         timer("fifo_timeout_timer"))
VMSTATE_SERIAL_TIMEOUT_IPENDING = _sub("serial/timeout_ipending", lambda s: s.timeout_ipending != 0,
                                       scalar("timeout_ipending", "int32"))
VMSTATE_SERIAL_POLL = _sub("serial/poll", lambda s: s.poll_msl >= 0,
                           scalar("poll_msl", "int32"), timer("modem_status_poll"))

VMSTATE_SERIAL = VMStateDescription(
    "serial", 3, 2,
    fields=[
        scalar("divider", "uint16", 2),
        scalar("rbr", "uint8"),
        scalar("ier", "uint8"),
        scalar("iir", "uint8"),
        scalar("lcr", "uint8"),
        scalar("mcr", "uint8"),
        scalar("lsr", "uint8"),
        scalar("msr", "uint8"),
        scalar("scr", "uint8"),
        scalar("fcr_vmstate", "uint8", 3),
    ],
    subsections=[
        VMSTATE_SERIAL_THR_IPENDING,
        VMSTATE_SERIAL_TSR,
        VMSTATE_SERIAL_RECV_FIFO,
        VMSTATE_SERIAL_XMIT_FIFO,
        VMSTATE_SERIAL_FIFO_TIMEOUT_TIMER,
        VMSTATE_SERIAL_TIMEOUT_IPENDING,
        VMSTATE_SERIAL_POLL,
    ],
    pre_save=_pre_save,
    pre_load=_pre_load,
    post_load=_post_load,
)


@dataclass
class ISASerialState:
    state: SerialState = field(default_factory=SerialState)


@dataclass
class SerialMM:
    serial: SerialState = field(default_factory=SerialState)


VMSTATE_ISA_SERIAL = VMStateDescription(
    "serial", 3, 2,
    fields=[struct("state", VMSTATE_SERIAL, factory=SerialState)],
)

VMSTATE_SERIAL_MM = VMStateDescription(
    "serial", 3, 2,
    fields=[struct("serial", VMSTATE_SERIAL, factory=SerialState)],
)
