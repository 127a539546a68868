"""Device state declared in Python (qevm.vmstate, qevm.devices) against real QEMU streams.

The four real devices (pckbd, mc146818rtc, serial, i8254) are declared from QEMU 7.2's source;
each section of each fixture that holds one is loaded with the Python description, saved
again, and compared byte for byte with the section QEMU wrote, and the vmdesc entry we emit
is compared with the one QEMU wrote (as JSON and as the exact compact text).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA, require_binary, require_fixture, streams
from hypothesis import given, settings
from hypothesis import strategies as st

from qevm.codec.vmsd import decode_vmsd, encode_struct
from qevm.codec.wire import Cursor
from qevm.errors import DecodeError, EncodeError, QevmError, SchemaError
from qevm.format.events import Configuration, DeviceState, SectionHeader, VmDescription
from qevm.io.reader import Analysis, iter_events, read_stream
from qevm.vmstate import (
    CONFIGURATION,
    MIG_PRI_PCI_BUS,
    TIMER_NOT_ARMED,
    HookError,
    LegacyHandler,
    SaveStateRegistry,
    State,
    VersionError,
    VMStateDescription,
    array,
    buffer,
    equal,
    int32_le,
    load_state,
    save_state,
    scalar,
    struct,
    timer,
    unused,
    validate,
    varray,
    vbuffer,
    vmdesc_json,
    vstruct,
    with_tmp,
)
from qevm.vmstate.devices import DESCRIPTIONS, i8254, mc146818rtc, pckbd, serial

DEVICE_IDSTRS = ("pckbd", "mc146818rtc", "serial", "i8254")


@functools.cache
def _analysis(path: Path) -> Analysis:
    return read_stream(str(path), strict=False)


def _analysis_of(path: Path, unpacked) -> Analysis:
    return _analysis(unpacked(path))


def _description(key: str, an: Analysis) -> tuple[VMStateDescription, Any]:
    """The Python description for a section idstr; the UART is ISA on PCs, memory-mapped elsewhere."""
    if key == "serial":
        machine = an.configuration.machine if an.configuration else ""
        key = "serial" if machine.startswith("pc-") else "serial-mm"
    return DESCRIPTIONS[key]


def _qemu_entry(an: Analysis, name: str, instance_id: int) -> dict[str, Any] | None:
    if an.vmdesc is None:
        return None
    for d in an.vmdesc["devices"]:
        if d["name"] == name and d["instance_id"] == instance_id:
            return d
    raise AssertionError(f"no vmdesc entry for {name} {instance_id}")


# -- real devices against real streams ---------------------------------------------------------------

@pytest.mark.parametrize("idstr", DEVICE_IDSTRS)
@pytest.mark.parametrize("path", streams())
def test_real_device_round_trip_and_vmdesc(path: Path, idstr: str, unpacked) -> None:
    """Load QEMU's section with the Python description, save it again: same bytes, same vmdesc."""
    an = _analysis_of(path, unpacked)
    found = [d for d in an.devices if d.section.idstr == idstr]
    if not found:
        pytest.skip(f"{path.name} has no {idstr} section")
    vmsd, factory = _description(idstr, an)
    for d in found:
        sec = d.section
        obj = factory()
        load_state(vmsd, obj, d.data, sec.version, name=sec.idstr, offset=d.offset)
        saved = save_state(vmsd, obj, sec.version)
        assert saved.data == d.data, f"{idstr} re-encodes differently"
        entry = {"name": sec.idstr, "instance_id": sec.instance_id, **saved.desc}
        qemu = _qemu_entry(an, sec.idstr, sec.instance_id)
        if qemu is None:
            continue  # postcopy streams carry no vmdesc
        assert entry == qemu
        assert vmdesc_json(entry).encode() in an.vmdesc_raw, "not the exact text QEMU wrote"
        # the core decodes QEMU's bytes with our vmdesc and gives them back unchanged
        decoded = decode_vmsd(Cursor(d.data), entry, idstr)
        assert decoded.size == len(d.data)
        assert encode_struct(decoded) == d.data


def test_real_values_make_sense(unpacked) -> None:
    """Spot checks of decoded values from the committed 7.2 stream."""
    an = _analysis_of(DATA / "small-pc-7.2.mig.xz", unpacked)
    by_name = {d.section.idstr: d for d in an.devices}
    kbd = load_state(pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState(), by_name["pckbd"].data, 3)
    assert kbd.kbd.extended_state_loaded and not kbd.kbd.outport_present
    assert kbd.kbd.outport & pckbd.KBD_OUT_ONES == pckbd.KBD_OUT_ONES
    rtc = load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), by_name["mc146818rtc"].data, 3)
    assert len(rtc.cmos_data) == 128 and rtc.base_rtc > 1_600_000_000  # seconds since 1970
    pit = load_state(i8254.VMSTATE_PIT_COMMON, i8254.PITCommonState(), by_name["i8254"].data, 3)
    assert len(pit.channels) == 3
    assert pit.channels[0].next_transition_time == _be64s(by_name["i8254"].data[-8:])


def _be64s(b: bytes) -> int:
    return int.from_bytes(b, "big", signed=True)


@pytest.mark.parametrize("name", ["small-pc-7.2", "pc-10.0-small", "pc-7.2", "q35-7.2", "xbzrle-7.2", "q35-10.0"])
def test_registry_loads_real_stream(name: str, unpacked) -> None:
    """The registry finds our four entries in a real machine's stream, loads them in stream order
    (others skipped), and saves each back to QEMU's bytes."""
    path = unpacked(require_fixture(name))
    an = _analysis(path)
    reg = SaveStateRegistry()
    entries = {}
    for idstr in DEVICE_IDSTRS:
        vmsd, factory = _description(idstr, an)
        entries[idstr] = reg.register(vmsd, factory())
    report = reg.load(str(path), strict=False)
    loaded = [se.idstr for se, _ in report.loaded]
    want = [d.section.idstr for d in an.devices if d.section.idstr in DEVICE_IDSTRS]
    assert loaded == want and len(want) >= 3
    assert report.configuration is not None and report.configuration.machine.startswith("pc-")
    by_name = {d.section.idstr: d for d in an.devices}
    for idstr, se in entries.items():
        if idstr in by_name:
            saved = reg.save_entry(se)
            assert saved is not None and saved[0] == by_name[idstr].data
    first = next(d.section for d in an.devices if d.section.idstr not in DEVICE_IDSTRS)
    with pytest.raises(DecodeError, match=f"unknown savevm section or instance '{first.idstr}' {first.instance_id}"):
        reg.load(str(path))


def test_configuration_vmsd_matches_qemu_10() -> None:
    """QEMU >= 8.2 describes the configuration record; our CONFIGURATION vmsd gives the same entry
    and the same bytes as the record (qevm.events.Configuration)."""
    path = require_fixture("q35-10.0")
    an = _analysis(path)
    assert an.configuration is not None and an.vmdesc is not None
    machine = an.configuration.machine.encode()
    saved = save_state(CONFIGURATION, State(len=len(machine), name=machine))
    assert saved.desc == an.vmdesc["configuration"]
    assert b"\x07" + saved.data == Configuration(0, an.configuration.machine).encode()
    reg = SaveStateRegistry()
    raw = _trailer(reg.encode(machine=an.configuration.machine, describe_configuration=True))
    assert raw.startswith(b'{"configuration": ' + vmdesc_json(saved.desc).encode() + b', "page_size": 4096')


def _trailer(stream: bytes) -> bytes:
    evs = _events(stream)
    vd = [e for e in evs if isinstance(e, VmDescription)]
    assert len(vd) == 1
    return vd[0].raw


def _events(stream: bytes) -> list:
    from qevm.format.parser import Parser

    p = Parser()
    p.feed(stream)
    p.close()
    return list(p.events())


def test_real_qemu_loads_our_stream_and_saves_the_same_bytes(tmp_path: Path, unpacked) -> None:
    """A stream written entirely by the registry is accepted by a real QEMU (``-incoming``); QEMU then
    migrates the four devices out again with the bytes we wrote (the RTC's clock and status
    registers aside: its pre_save brings them up to date with the clock)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "fixtures"))
    from qemu_driver import Qemu

    qemu_x86 = require_binary("qemu-system-x86_64")
    an = _analysis_of(DATA / "small-pc-7.2.mig.xz", unpacked)
    reg = SaveStateRegistry()
    objs: dict[str, Any] = {}
    for idstr in DEVICE_IDSTRS:
        vmsd, factory = DESCRIPTIONS[idstr]
        objs[idstr] = factory()
        for d in an.devices:
            if d.section.idstr == idstr:
                load_state(vmsd, objs[idstr], d.data, d.section.version)
        reg.register(vmsd, objs[idstr])
    objs["serial"].state.scr = 0x5A
    objs["serial"].state.divider = 1
    objs["serial"].state.timeout_ipending = 1  # sent in the serial/timeout_ipending subsection
    objs["pckbd"].kbd.outport = 0xDD  # A20 off: not the default, so the pckbd_outport subsection is sent
    objs["pckbd"].kbd.mode = 0x61
    cmos = bytearray(objs["mc146818rtc"].cmos_data)
    cmos[0x40] = 0xAB
    objs["mc146818rtc"].cmos_data = bytes(cmos)
    objs["i8254"].channels[1].write_latch = 0x77
    ours = {se.idstr: reg.save_entry(se) for se in reg.handlers}
    assert b"pckbd_outport" in ours["pckbd"][0] and b"serial/timeout_ipending" in ours["serial"][0]
    src = tmp_path / "ours.mig"
    reg.write(str(src), machine="pc-i440fx-7.2")
    out = tmp_path / "back.mig"
    with Qemu(qemu_x86, ["-M", "pc-i440fx-7.2", "-m", "32", "-S", "-accel", "tcg", "-incoming", "defer"],
              tmp_path) as vm:
        vm.command("migrate-incoming", {"uri": f"exec:cat {src}"})
        deadline = time.monotonic() + 60
        while (status := vm.command("query-migrate").get("status")) not in ("completed", "failed"):
            assert time.monotonic() < deadline, "incoming migration did not finish"
            time.sleep(0.05)
        assert status == "completed", (tmp_path / "qemu.log").read_text()
        vm.migrate(f"exec:cat > {out}")
        vm.quit()
    back = {d.section.idstr: d for d in read_stream(str(out), strict=False).devices}
    for idstr, (data, entry) in ours.items():
        if idstr == "mc146818rtc":
            # the clock registers (CMOS 0x00-0x09), status register C and the update/alarm timers follow
            # the host clock; the rest (CMOS 0x0D-0x7F, base_rtc, last_update, offset...) is ours
            assert back[idstr].data[13:229] == data[13:229]
        else:
            assert back[idstr].data == data, idstr
        assert back[idstr].desc == entry, idstr


# -- versions -------------------------------------------------------------------------------------------

def _rtc_bytes() -> bytes:
    s = mc146818rtc.RTCState(cmos_data=bytes(range(128)), base_rtc=1_700_000_000, offset=-5)
    return save_state(mc146818rtc.VMSTATE_RTC, s).data


def test_version_too_new_names_device_and_versions() -> None:
    with pytest.raises(VersionError) as ei:
        load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), _rtc_bytes(), 4)
    e = ei.value
    assert (e.name, e.incoming, e.local, e.too_new) == ("mc146818rtc", 4, 3, True)
    assert "mc146818rtc: incoming version 4 is too new for local version 3" in str(e)
    assert isinstance(e, DecodeError) and e.offset == 0


def test_version_too_old_names_device_and_versions() -> None:
    with pytest.raises(VersionError, match="pckbd: incoming version 2 is too old for local minimum version 3"):
        load_state(pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState(), b"\x00" * 4, 2)
    # a nested struct is checked at its own version: the outer version is fine, the subsection's is not
    data = bytearray(save_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(irq_reinject_on_ack_count=3)).data)
    marker = data.index(b"\x05")
    data[marker + 2 + len("mc146818rtc/irq_reinject_on_ack_count") + 3] = 7  # subsection version 7
    with pytest.raises(VersionError, match="irq_reinject_on_ack_count.*incoming version 7 is too new"):
        load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), bytes(data), 3)


def test_section_version_checked_by_registry(tmp_path: Path) -> None:
    """A stream section whose version is above our entry's is refused before loading (QEMU's
    'unsupported version'); one below our minimum is refused by the vmsd."""
    newer = VMStateDescription("mc146818rtc", 4, 1, fields=mc146818rtc.VMSTATE_RTC.fields)
    src = SaveStateRegistry()
    src.register(newer, mc146818rtc.RTCState())
    f = tmp_path / "newer.mig"
    src.write(str(f))
    dst = SaveStateRegistry()
    dst.register(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState())
    with pytest.raises(VersionError, match="mc146818rtc: incoming version 4 is too new for local version 3"):
        dst.load(str(f))
    older = VMStateDescription("pckbd", 2, 2, fields=pckbd.VMSTATE_KBD_ISA.fields)
    src = SaveStateRegistry()
    src.register(older, pckbd.ISAKBDState())
    dst = SaveStateRegistry()
    dst.register(pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState())
    with pytest.raises(VersionError, match="pckbd: incoming version 2 is too old for local minimum version 3"):
        dst.load(src.encode())


def test_per_field_versions() -> None:
    """Fields newer than the version written are absent, in the bytes and in vmdesc."""
    s = mc146818rtc.RTCState(cmos_data=bytes(range(128)), irq_coalesced=9)
    v1 = save_state(mc146818rtc.VMSTATE_RTC, s, 1)
    assert len(v1.data) == 128 + 1 + 28 + 8 + 8 + 24
    assert v1.desc["version"] == 1
    assert [f["name"] for f in v1.desc["fields"]] == [
        "cmos_data", "cmos_index", "unused[0]", "periodic_timer", "next_periodic_time", "unused[1]"]
    v2 = save_state(mc146818rtc.VMSTATE_RTC, s, 2)
    assert len(v2.data) == len(v1.data) + 8
    back = load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(irq_coalesced=77), v1.data, 1)
    assert back.cmos_data == s.cmos_data and back.irq_coalesced == 77  # not in version 1: left alone
    assert save_state(mc146818rtc.VMSTATE_RTC, back, 1).data == v1.data
    # serial version 2 has no fcr_vmstate; post_load then resets it
    u = serial.SerialState(fcr=0xC1)
    old = save_state(serial.VMSTATE_SERIAL, u, 2)
    assert len(old.data) == 10
    got = load_state(serial.VMSTATE_SERIAL, serial.SerialState(fcr_vmstate=0x55), old.data, 2)
    assert got.fcr_vmstate == 0 and got.fcr == 0
    # a nested struct is always written at its own version: the ISA wrapper at version 2 still holds it
    assert len(save_state(serial.VMSTATE_ISA_SERIAL, serial.ISASerialState(u), 2).data) == 11


# -- subsections --------------------------------------------------------------------------------------------

def _busy_uart() -> serial.ISASerialState:
    u = serial.ISASerialState()
    s = u.state
    s.ier = serial.UART_IER_THRI
    s.iir = serial.UART_IIR_NO_INT | serial.UART_IIR_FE  # as the FCR below leaves it
    s.thr_ipending = 1  # differs from what IIR implies: needs its subsection
    s.lsr = 0x20  # TEMT clear: a character is stuck in the TSR
    s.tsr_retry = 2
    s.thr, s.tsr = 0x41, 0x42
    s.recv_fifo = serial.Fifo8(data=b"hello world!....", head=3, num=5)
    s.fifo_timeout_timer = 123456789
    s.timeout_ipending = 1
    s.poll_msl = 0
    s.modem_status_poll = 987654321
    s.fcr = 0x81
    return u


def test_subsections_present_round_trip() -> None:
    u = _busy_uart()
    saved = save_state(serial.VMSTATE_ISA_SERIAL, u)
    inner = saved.desc["fields"][0]["struct"]
    names = [sd["vmsd_name"] for sd in inner["subsections"]]
    assert names == ["serial/thr_ipending", "serial/tsr", "serial/recv_fifo", "serial/fifo_timeout_timer",
                     "serial/timeout_ipending", "serial/poll"]
    assert b"\x05\x10serial/recv_fifo\x00\x00\x00\x01" in saved.data
    fifo = inner["subsections"][2]["fields"][0]
    assert fifo == {"name": "recv_fifo", "type": "struct", "struct": {"vmsd_name": "Fifo8", "version": 1, "fields": [
        {"name": "data", "type": "buffer", "size": 16}, {"name": "head", "type": "uint32", "size": 4},
        {"name": "num", "type": "uint32", "size": 4}]}, "size": 24}
    assert saved.desc["fields"][0]["size"] == len(saved.data)  # the struct's size counts its subsections
    back = load_state(serial.VMSTATE_ISA_SERIAL, serial.ISASerialState(), saved.data, 3)
    b = back.state
    assert (b.thr_ipending, b.tsr_retry, b.thr, b.tsr) == (1, 2, 0x41, 0x42)
    assert b.recv_fifo == u.state.recv_fifo and b.xmit_fifo.num == 0
    assert (b.fifo_timeout_timer, b.timeout_ipending, b.poll_msl, b.modem_status_poll) == (
        123456789, 1, 0, 987654321)
    assert b.fcr == 0x81 and b.iir & serial.UART_IIR_FE  # post_load re-applied the FCR
    assert save_state(serial.VMSTATE_ISA_SERIAL, back).data == saved.data
    # the decoded model of the core agrees with our vmdesc
    assert encode_struct(decode_vmsd(Cursor(saved.data), saved.desc, "serial")) == saved.data


def test_subsections_absent_leave_defaults() -> None:
    quiet = serial.ISASerialState()
    saved = save_state(serial.VMSTATE_ISA_SERIAL, quiet)
    assert len(saved.data) == 11 and "subsections" not in saved.desc["fields"][0]["struct"]
    target = serial.ISASerialState()
    target.state.tsr_retry = 0
    target.state.poll_msl = 5
    back = load_state(serial.VMSTATE_ISA_SERIAL, target, saved.data, 3)
    assert back.state.poll_msl == -1  # pre_load's value stays when the subsection is absent
    assert back.state.thr_ipending == 0  # post_load derived it from IIR
    # pckbd: outport only when it differs from what the status implies
    k = pckbd.ISAKBDState()
    assert b"pckbd_outport" not in save_state(pckbd.VMSTATE_KBD_ISA, k).data
    k.kbd.outport = 0x03
    data = save_state(pckbd.VMSTATE_KBD_ISA, k).data
    assert b"\x05\x0dpckbd_outport\x00\x00\x00\x01\x03" in data
    back_k = load_state(pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState(), data, 3)
    assert back_k.kbd.outport == 0x03 and back_k.kbd.outport_present
    k.kbd.extended_state = False
    k.kbd.pending = pckbd.KBD_PENDING_KBD
    legacy = save_state(pckbd.VMSTATE_KBD_ISA, k)
    assert b"extended_state" not in legacy.data and legacy.data[3] == pckbd.KBD_PENDING_KBD_COMPAT
    back_k = load_state(pckbd.VMSTATE_KBD_ISA, pckbd.ISAKBDState(), legacy.data, 3)
    assert back_k.kbd.pending == pckbd.KBD_PENDING_KBD and not back_k.kbd.extended_state_loaded


def test_unknown_subsection_is_an_error_foreign_one_is_left() -> None:
    body = save_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState()).data
    bogus = body + b"\x05\x11mc146818rtc/bogus" + b"\x00\x00\x00\x01"
    with pytest.raises(DecodeError, match="subsection 'mc146818rtc/bogus' is not declared by vmsd 'mc146818rtc'"):
        load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), bogus, 3)
    # a name without our prefix belongs to an enclosing vmsd: the load stops in front of it
    foreign = body + b"\x05\x0bother/thing\x00\x00\x00\x01"
    cur = Cursor(foreign)
    load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), cur, 3)
    assert cur.pos == len(body)
    with pytest.raises(DecodeError, match="left over"):
        load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), foreign, 3)


def test_post_load_rejects_inconsistent_state() -> None:
    u = serial.ISASerialState()
    u.state.tsr_retry = 1  # but LSR.TEMT is set
    data = save_state(serial.VMSTATE_ISA_SERIAL, u).data
    with pytest.raises(HookError, match="serial: post_load failed: inconsistent state"):
        load_state(serial.VMSTATE_ISA_SERIAL, serial.ISASerialState(), data, 3)


# -- hooks ----------------------------------------------------------------------------------------------------

def test_hooks_are_called_in_qemu_order() -> None:
    calls: list[tuple] = []

    def rec(name: str, ret: Any = None):
        def hook(*args: Any) -> Any:
            calls.append((name, *args[1:]))
            return ret
        return hook

    sub = VMStateDescription("dev/sub", 1, 1, fields=[scalar("x", "uint8")], needed=rec("needed", True),
                             pre_save=rec("sub.pre_save"), post_load=rec("sub.post_load"),
                             pre_load=rec("sub.pre_load"))
    dev = VMStateDescription(
        "dev", 5, 1,
        fields=[scalar("a", "uint8"),
                scalar("b", "uint8", exists=lambda o, v: calls.append(("exists", v)) or True)],
        subsections=[sub], pre_save=rec("pre_save"), post_save=rec("post_save"), pre_load=rec("pre_load"),
        post_load=rec("post_load"))
    data = save_state(dev, State(a=1, b=2, x=3), 4).data
    assert data == b"\x01\x02\x05\x07dev/sub\x00\x00\x00\x01\x03"
    assert [c[0] for c in calls] == ["pre_save", "exists", "needed", "sub.pre_save", "post_save"]
    assert calls[1] == ("exists", 4)
    calls.clear()
    obj = load_state(dev, State(), data, 4)
    assert [c[0] for c in calls] == ["pre_load", "exists", "sub.pre_load", "sub.post_load", "post_load"]
    assert calls[3] == ("sub.post_load", 1) and calls[4] == ("post_load", 4)
    assert obj == State(a=1, b=2, x=3)
    # a hook fails like QEMU's: a non-zero return, or an exception
    bad = VMStateDescription("dev", 1, 1, fields=[scalar("a", "uint8")], post_load=lambda o, v: -22)
    with pytest.raises(HookError, match="dev: post_load failed: returned -22"):
        load_state(bad, State(), b"\x01", 1)
    boom = VMStateDescription("dev", 1, 1, fields=[scalar("a", "uint8")], pre_save=lambda o: 1 / 0)
    with pytest.raises(HookError, match="pre_save failed: ZeroDivisionError") as ei:
        save_state(boom, State(a=1))
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


# -- field kinds and the vmdesc shapes -------------------------------------------------------------------------

def test_duplicate_names_compressed_and_indexed_arrays() -> None:
    inner_plain = VMStateDescription("plain", 1, 1, fields=[scalar("v", "uint16")])
    inner_sub = VMStateDescription("withsub", 1, 1, fields=[scalar("v", "uint16")],
                                   subsections=[VMStateDescription("withsub/s", 1, 1, fields=[],
                                                                   needed=lambda o: False)])
    dev = VMStateDescription("dev", 2, 1, fields=[
        scalar("kcs", "uint8", exists=lambda o, v: v == 1),  # declared twice: both become kcs[k]
        scalar("kcs", "uint16", 2),
        array("regs", "uint32", 4),
        array("one", "uint8", 1),
        array("tested", "uint8", 2, exists=lambda o, v: True),
        struct("ps", inner_plain, num=3),
        struct("ss", inner_sub, num=2),
        scalar("n", "uint8"),
        varray("vals", "int32", "n"),
        unused(4),
    ])
    obj = State(kcs=513, regs=[1, 2, 3, 4], one=[9], tested=[5, 6], ps=[State(v=k) for k in range(3)],
                ss=[State(v=7), State(v=8)], n=0, vals=[])
    saved = save_state(dev, obj)
    f = saved.desc["fields"]
    assert f[0] == {"name": "kcs[1]", "type": "uint16", "size": 2}
    assert f[1] == {"name": "regs", "array_len": 4, "type": "uint32", "size": 4}
    assert f[2] == {"name": "one", "type": "uint8", "size": 1}
    assert f[3:5] == [{"name": "tested", "index": 0, "type": "uint8", "size": 1},
                      {"name": "tested", "index": 1, "type": "uint8", "size": 1}]
    assert f[5]["array_len"] == 3 and f[5]["struct"]["vmsd_name"] == "plain" and f[5]["size"] == 2
    assert [x.get("index") for x in f[6:8]] == [0, 1]
    assert f[8]["name"] == "n" and f[9] == {"name": "unused", "type": "unused_buffer", "size": 4}
    assert len(f) == 10  # the empty variable array has no entry
    assert saved.data == (b"\x02\x01" + b"".join(i.to_bytes(4, "big") for i in (1, 2, 3, 4)) + b"\x09\x05\x06"
                          + b"\x00\x00\x00\x01\x00\x02" + b"\x00\x07\x00\x08" + b"\x00" + b"\x00" * 4)
    assert list(f[0]) == ["name", "type", "size"] and list(f[5]) == ["name", "array_len", "type", "struct", "size"]
    back = load_state(dev, State(), saved.data, 2)
    assert back.regs == [1, 2, 3, 4] and back.ps == obj.ps and back.vals == [] and not hasattr(back, "unused")
    v1 = save_state(dev, State(**{**obj.__dict__, "kcs": 7}), 1)
    assert v1.desc["fields"][0] == {"name": "kcs[0]", "type": "uint8", "size": 1}


def test_vstruct_tmp_validate_equal_le_and_pointers() -> None:
    regs = VMStateDescription("regs", 3, 1, fields=[scalar("r0", "uint32"), scalar("r1", "uint32", 3)])

    def tmp_pre_save(t: Any) -> None:
        t.wide = t.parent.lo | (t.parent.hi << 32)

    def tmp_post_load(t: Any, v: int) -> None:
        t.parent.lo, t.parent.hi = t.wide & 0xFFFFFFFF, t.wide >> 32

    tmp = VMStateDescription("dev/tmp", 0, 0, fields=[scalar("wide", "uint64")], pre_save=tmp_pre_save,
                             post_load=tmp_post_load)
    node = VMStateDescription("node", 1, 1, fields=[scalar("id", "uint8")])
    dev = VMStateDescription("dev", 1, 1, fields=[
        vstruct("regs", regs, 2),
        with_tmp(tmp),
        equal("magic", "uint32 equal"),
        int32_le("used"),
        validate("used_ok", lambda o, v: o.used <= 8),
        struct("nodes", node, num=3, pointers=True),
    ])
    obj = State(regs=State(r0=1, r1=2), lo=5, hi=6, magic=0xCAFE, used=3, nodes=[None, State(id=4), None])
    saved = save_state(dev, obj)
    f = saved.desc["fields"]
    assert f[0] == {"name": "regs", "type": "vstruct", "vmsd_name": "regs", "version": 2,
                    "fields": [{"name": "r0", "type": "uint32", "size": 4}], "size": 4}
    assert f[1] == {"name": "tmp", "type": "tmp", "vmsd_name": "dev/tmp", "version": 0,
                    "fields": [{"name": "wide", "type": "uint64", "size": 8}], "size": 8}
    assert f[2] == {"name": "magic", "type": "uint32 equal", "size": 4}
    assert f[3] == {"name": "used", "type": "int32 le", "size": 4}
    # 7.2 shape for NULL pointers: the first element is NULL, so the array is "compressed" as 1-byte structs
    assert f[4] == {"name": "nodes", "array_len": 3, "type": "struct", "struct": {}, "size": 1}
    assert saved.data.endswith(b"\x30\x04\x30")
    with pytest.raises(DecodeError, match=r"nodes\[1\]: NULL pointer element: marker 0x30 expected, found 0x04"):
        load_state(dev, State(magic=0xCAFE, used=8, nodes=[None, None, None]), saved.data, 1)  # NULL locally
    fresh = State(magic=0xCAFE, used=8, nodes=[None, State(), None])
    back = load_state(dev, fresh, saved.data, 1)
    assert (back.regs.r0, back.lo, back.hi, back.used, back.nodes[1].id) == (1, 5, 6, 3, 4)
    assert not hasattr(back.regs, "r1")  # vstruct written at version 2: r1 (v3) absent
    with pytest.raises(DecodeError, match="uint32 equal"):
        load_state(dev, State(magic=1, used=8, nodes=[None, State(), None]), saved.data, 1)
    with pytest.raises(DecodeError, match="int32 le"):
        load_state(dev, State(magic=0xCAFE, used=2, nodes=[None, State(), None]), saved.data, 1)
    with pytest.raises(EncodeError, match="validation failed"):
        save_state(dev, State(**{**obj.__dict__, "used": 9}))
    data9 = save_state(VMStateDescription("dev", 1, 1, fields=dev.fields[:4]),
                       State(**{**obj.__dict__, "used": 9})).data + b"\x30\x04\x30"
    with pytest.raises(DecodeError, match="input validation failed: dev/used_ok"):
        load_state(dev, State(magic=0xCAFE, used=100, nodes=[None, State(), None]), data9, 1)


def test_dict_objects_and_paths() -> None:
    """A dict holds values under the verbatim C names; an object resolves them as paths."""
    dev = VMStateDescription("cpu", 1, 1, fields=[array("env.regs", "uint32", 2), scalar("env.cr[0]", "uint64")])
    d = {"env.regs": [1, 2], "env.cr[0]": 3}
    saved = save_state(dev, d)
    assert load_state(dev, {}, saved.data, 1) == d
    obj = load_state(dev, State(), saved.data, 1)
    assert obj.env.regs == [1, 2] and obj.env.cr == [3]
    assert save_state(dev, obj).data == saved.data
    # i8254's alias: channels[0].next_transition_time is channel 0's own attribute
    pit = i8254.PITCommonState()
    pit.channels[0].next_transition_time = 42
    data = save_state(i8254.VMSTATE_PIT_COMMON, pit).data
    assert data[-8:] == (42).to_bytes(8, "big") and data[4 + 24:4 + 32] == (42).to_bytes(8, "big")


def test_encode_and_decode_errors_carry_paths() -> None:
    with pytest.raises(EncodeError, match=r"mc146818rtc/cmos_index: .*out of range"):
        save_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(cmos_index=256))
    with pytest.raises(EncodeError, match="pckbd/kbd: the object has no value"):
        save_state(pckbd.VMSTATE_KBD_ISA, State())
    with pytest.raises(EncodeError, match=r"i8254/channels: 3 elements to write, the list has 1"):
        save_state(i8254.VMSTATE_PIT_COMMON, State(channels=[i8254.PITChannelState()]))
    data = _rtc_bytes()
    with pytest.raises(DecodeError) as ei:
        load_state(mc146818rtc.VMSTATE_RTC, mc146818rtc.RTCState(), data[:150], 3, name="mc146818rtc", offset=1000)
    assert ei.value.offset == 1000 + 129 and "unused" in ei.value.path
    with pytest.raises(SchemaError, match="unknown vmstate type"):
        scalar("x", "uint24")
    with pytest.raises(SchemaError, match="needs an explicit size"):
        array("x", "buffer", 2)
    assert issubclass(VersionError, QevmError)


def test_vmdesc_json_writer_is_qemus() -> None:
    v = {"name": 'a"b\\c/d\n\x7f\u00e9\U0001f600', "n": [1, -2, True], "o": {}, "l": []}
    assert vmdesc_json(v) == ('{"name": "a\\"b\\\\c/d\\n\\u007F\\u00E9\\uD83D\\uDE00", "n": [1, -2, true], '
                              '"o": {}, "l": []}')
    assert json.loads(vmdesc_json(v)) == v
    plain = {"page_size": 4096, "devices": [{"name": "x", "instance_id": 0}]}
    assert vmdesc_json(plain) == json.dumps(plain)


# -- property: random values survive save -> load ----------------------------------------------------------------

INNER = VMStateDescription("inner", 2, 1, fields=[scalar("a", "uint16"), scalar("b", "int64"), buffer("tag", 3)])
EXTRA = VMStateDescription("synth/extra", 1, 1, fields=[scalar("extra", "uint32"), array("pair", "int8", 2)],
                           needed=lambda o: bool(getattr(o, "has_extra", False)))
SYNTH = VMStateDescription("synth", 1, 1, fields=[
    scalar("u8", "uint8"), scalar("s8", "int8"), scalar("u16", "uint16"), scalar("s16", "int16"),
    scalar("u32", "uint32"), scalar("s32", "int32"), scalar("u64", "uint64"), scalar("s64", "int64"),
    scalar("flag", "bool"), buffer("buf", 5), array("arr", "uint32", 3), timer("t"),
    scalar("n", "uint8"), varray("varr", "int16", "n"),
    scalar("blen", "uint32"), vbuffer("vbuf", "blen"),
    struct("inner", INNER), struct("inners", INNER, num=2),
], subsections=[EXTRA])


def _ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else st.integers(0, (1 << bits) - 1)


_inner = st.builds(lambda a, b, tag: State(a=a, b=b, tag=tag), _ints(16, False), _ints(64, True),
                   st.binary(min_size=3, max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_property_save_load_round_trip(data: st.DataObject) -> None:
    varr = data.draw(st.lists(_ints(16, True), max_size=6))
    vbuf = data.draw(st.binary(max_size=40))
    values = {
        "u8": data.draw(_ints(8, False)), "s8": data.draw(_ints(8, True)),
        "u16": data.draw(_ints(16, False)), "s16": data.draw(_ints(16, True)),
        "u32": data.draw(_ints(32, False)), "s32": data.draw(_ints(32, True)),
        "u64": data.draw(_ints(64, False)), "s64": data.draw(_ints(64, True)),
        "flag": data.draw(st.booleans()), "buf": data.draw(st.binary(min_size=5, max_size=5)),
        "arr": data.draw(st.lists(_ints(32, False), min_size=3, max_size=3)),
        "t": data.draw(st.one_of(st.just(TIMER_NOT_ARMED), _ints(63, False))),
        "n": len(varr), "varr": varr, "blen": len(vbuf), "vbuf": vbuf,
        "inner": data.draw(_inner), "inners": data.draw(st.lists(_inner, min_size=2, max_size=2)),
    }
    has_extra = data.draw(st.booleans())
    if has_extra:
        values["extra"] = data.draw(_ints(32, False))
        values["pair"] = data.draw(st.lists(_ints(8, True), min_size=2, max_size=2))
    saved = save_state(SYNTH, State(has_extra=has_extra, **values))
    assert ("subsections" in saved.desc) == has_extra
    back = load_state(SYNTH, State(), saved.data, 1)
    assert back == State(**values)
    assert save_state(SYNTH, State(has_extra=has_extra, **back.__dict__)).data == saved.data
    # the vmdesc we emit lets the core decode the same bytes exactly
    decoded = decode_vmsd(Cursor(saved.data), saved.desc, "synth")
    assert decoded.size == len(saved.data) and encode_struct(decoded) == saved.data


# -- the SaveStateEntry registry -------------------------------------------------------------------------------

SMALL = VMStateDescription("small", 2, 1, fields=[scalar("value", "uint32"), scalar("on", "bool", 2)])
BRIDGE = VMStateDescription("bridge", 1, 1, fields=[scalar("bus", "uint8")], priority=MIG_PRI_PCI_BUS)
SKIPPED = VMStateDescription("skipped", 1, 1, fields=[scalar("x", "uint8")], needed=lambda o: False)


def _machine(reg: SaveStateRegistry) -> dict[str, Any]:
    objs = {
        "pckbd": pckbd.ISAKBDState(),
        "mc146818rtc": mc146818rtc.RTCState(cmos_data=bytes(range(128)), base_rtc=1_700_000_000),
        "serial": _busy_uart(),
        "i8254": i8254.PITCommonState(),
        "small0": State(value=1, on=True),
        "small1": State(value=2, on=False),
        "nic": State(value=3, on=True),
        "bridge": State(bus=1),
        "legacy": State(blob=b"old-style bytes"),
    }
    objs["i8254"].channels[2].count = 0x10000
    reg.register(mc146818rtc.VMSTATE_RTC, objs["mc146818rtc"], instance_id=0)
    reg.register(i8254.VMSTATE_PIT_COMMON, objs["i8254"])
    reg.register(serial.VMSTATE_ISA_SERIAL, objs["serial"])
    reg.register(pckbd.VMSTATE_KBD_ISA, objs["pckbd"])
    reg.register(SMALL, objs["small0"])
    reg.register(SMALL, objs["small1"])
    reg.register(SKIPPED, State(x=1))
    reg.register(SMALL, objs["nic"], path="0000:00:02.0")
    reg.register(LegacyHandler("legacy", 1, save_state=lambda o: o.blob,
                               load_state=lambda o, data, v: setattr(o, "blob", data)), objs["legacy"])
    reg.register(BRIDGE, objs["bridge"])
    return objs


def test_registry_ids_order_and_stream(tmp_path: Path) -> None:
    reg = SaveStateRegistry()
    objs = _machine(reg)
    ids = [(se.idstr, se.instance_id, se.section_id) for se in reg.handlers]
    # higher priority first; registration order within a priority; ids from registration order
    assert ids == [("bridge", 0, 9), ("mc146818rtc", 0, 0), ("i8254", 0, 1), ("serial", 0, 2), ("pckbd", 0, 3),
                   ("small", 0, 4), ("small", 1, 5), ("skipped", 0, 6), ("0000:00:02.0/small", 0, 7),
                   ("legacy", 0, 8)]
    nic = reg.handlers[8]
    assert (nic.compat_idstr, nic.compat_instance_id) == ("small", 0)
    f = tmp_path / "mini.mig"
    size = reg.write(str(f))
    assert size == f.stat().st_size
    an = read_stream(str(f))
    assert an.configuration is not None and an.configuration.machine == "pc-i440fx-7.2"
    secs = [(d.section.idstr, d.section.instance_id, d.section.section_id, d.section.version) for d in an.devices]
    assert secs == [("bridge", 0, 9, 1), ("mc146818rtc", 0, 0, 3), ("i8254", 0, 1, 3), ("serial", 0, 2, 3),
                    ("pckbd", 0, 3, 3), ("small", 0, 4, 2), ("small", 1, 5, 2), ("0000:00:02.0/small", 0, 7, 2),
                    ("legacy", 0, 8, 1)]
    assert all(d.struct is not None and d.error is None for d in an.devices)  # decoded with our vmdesc
    assert an.vmdesc_raw is not None and an.vmdesc_raw.startswith(b'{"page_size": 4096, "devices": [{"name": ')
    assert an.vmdesc is not None
    legacy = an.vmdesc["devices"][-1]
    assert legacy == {"name": "legacy", "instance_id": 0, "size": 15,
                      "fields": [{"name": "data", "size": 15, "type": "buffer"}]}
    kinds = [type(e).__name__ for e in iter_events(str(f))]
    assert kinds[:2] == ["FileHeader", "Configuration"] and kinds[-2:] == ["EndOfFile", "VmDescription"]
    assert kinds[2:-2] == ["SectionHeader", "DeviceState", "Footer"] * 9
    # each section is exactly what save_state gives, and the byte stream is the events' encoding
    by_name = {d.section.idstr: d for d in an.devices if d.section.instance_id == 0}
    assert by_name["serial"].data == save_state(serial.VMSTATE_ISA_SERIAL, objs["serial"]).data
    assert f.read_bytes() == reg.encode()

    # load it back into a second machine declared the same way
    reg2 = SaveStateRegistry()
    objs2 = _machine(reg2)
    for o in objs2.values():
        if isinstance(o, State):
            o.__dict__.update({k: 0 if isinstance(v, int) else v for k, v in o.__dict__.items()})
    objs2["legacy"].blob = b""
    objs2["i8254"].channels[2].count = 0
    report = reg2.load(str(f))
    assert [se.idstr for se, _ in report.loaded] == [s[0] for s in secs]
    assert objs2["small1"].value == 2 and objs2["nic"].value == 3 and objs2["bridge"].bus == 1
    assert objs2["legacy"].blob == b"old-style bytes"
    assert objs2["i8254"].channels[2].count == 0x10000
    assert objs2["serial"].state.recv_fifo == objs["serial"].state.recv_fifo
    assert reg2.encode() == reg.encode()


def test_registry_instance_ids_and_lookup() -> None:
    reg = SaveStateRegistry()
    a = reg.register(SMALL)
    b = reg.register(SMALL)
    c = reg.register(SMALL, instance_id=7)
    d = reg.register(SMALL)  # one more than the highest, like QEMU
    assert [x.instance_id for x in (a, b, c, d)] == [0, 1, 7, 8]
    assert [x.section_id for x in (a, b, c, d)] == [0, 1, 2, 3]
    p0 = reg.register(SMALL, path="0000:00:03.0")
    p1 = reg.register(SMALL, path="0000:00:04.0")
    alias = reg.register(SMALL, path="0000:00:05.0", instance_id=0x42, alias_id=5)
    assert (p0.idstr, p0.instance_id, p0.compat_instance_id) == ("0000:00:03.0/small", 0, 0)
    assert (p1.idstr, p1.instance_id, p1.compat_instance_id) == ("0000:00:04.0/small", 0, 1)
    assert (alias.instance_id, alias.compat_instance_id) == (0, 0x42)
    assert reg.find("small", 1) is b
    assert reg.find("0000:00:04.0/small", 0) is p1
    assert reg.find("0000:00:05.0/small", 5) is alias  # by alias id
    assert reg.find("small", 0x42) is alias  # an old stream without the path: the compat entry
    assert reg.find("small", 3) is None
    with pytest.raises(QevmError):
        reg.register(object())  # type: ignore[arg-type]


def test_stream_without_configuration_footers_or_vmdesc() -> None:
    reg = SaveStateRegistry()
    reg.register(SMALL, State(value=5, on=True))
    raw = reg.encode(machine=None, footers=False, vmdesc=False)
    assert raw == (b"QEVM\x00\x00\x00\x03" + b"\x04\x00\x00\x00\x00\x05small\x00\x00\x00\x00\x00\x00\x00\x02"
                   + b"\x00\x00\x00\x05\x01" + b"\x00")
    full = reg.encode()
    evs = _events(full)
    headers = [e for e in evs if isinstance(e, SectionHeader)]
    states = [e for e in evs if isinstance(e, DeviceState)]
    assert len(headers) == 1 and states[0].data == b"\x00\x00\x00\x05\x01"
    assert b"".join(e.encode() for e in evs) == full
    reg.handlers[0].opaque.value = 0
    reg.load(full)
    assert reg.handlers[0].opaque.value == 5
