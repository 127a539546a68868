"""Section lives and the record grammar against real QEMU 7.2: each crafted stream (a real one with
records spliced in or out) is loaded by a QEMU destination and parsed by qevm; the verdicts must agree,
and what QEMU goes along with but no source writes must show up as an anomaly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import fixture_meta, require_fixture, streams
from crafted import (
    EOS,
    Cut,
    Rec,
    command,
    cut,
    qemu_verdict,
    qevm_verdict,
    read_bytes,
    section,
    with_footer_id,
    with_section_id,
)
from test_cli import qevm

from qevm.format.events import Section
from qevm.format.grammar import ODDITY_TEXT, RECORD_GRAMMAR, SECTION_LIFE, Life, Oddity, Place, Token
from qevm.format.parser import Parser
from qevm.format.records import Command, RecordType, SectionKind

BOGUS_ID = 99


def _insert_after(c: Cut, what: str, idstr: str | None, *recs: Rec) -> bytes:
    i = c.find(what, idstr)
    return c.join(c.records[:i + 1] + list(recs) + c.records[i + 1:])


def _ram(c: Cut) -> Section:
    sec = c.records[c.find("START", "ram")].section
    assert sec is not None
    return sec


def part_after_end(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", section(SectionKind.PART, _ram(c).section_id, EOS))


def part_unknown_id(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", section(SectionKind.PART, BOGUS_ID, EOS))


def end_unknown_id(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", section(SectionKind.END, BOGUS_ID, EOS))


def end_without_start(c: Cut) -> bytes:
    # ram's START and PART records dropped: its END names an id nothing has named
    return c.join([r for r in c.records if not (r.section is not None and r.section.idstr == "ram"
                                                and r.what in ("START", "PART"))])


def second_start(c: Cut) -> bytes:
    return _insert_after(c, "PART", "ram", c.records[c.find("START", "ram")])


def full_of_live(c: Cut) -> bytes:
    ram = _ram(c)
    return _insert_after(c, "END", "ram", section(SectionKind.FULL, ram.section_id, EOS, "ram", 0, ram.version))


def _timer_takes_ram_id(c: Cut) -> tuple[list[Rec], int]:
    recs = list(c.records)
    i = c.find("FULL", "timer")
    recs[i] = with_section_id(recs[i], _ram(c).section_id)
    return recs, i


def id_reused_by_full(c: Cut) -> bytes:
    # the timer's FULL takes ram's section id
    return c.join(_timer_takes_ram_id(c)[0])


def id_reused_then_part(c: Cut) -> bytes:
    # as above, then a PART for that id: which section does it load?
    recs, i = _timer_takes_ram_id(c)
    recs.insert(i + 1, section(SectionKind.PART, _ram(c).section_id, EOS))
    return c.join(recs)


def start_unknown_idstr(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", section(SectionKind.START, 50, EOS, "qevm-no-such-section", 0, 1))


def start_of_device(c: Cut) -> bytes:
    # a START (not FULL) for a device the destination has: the loader does not tell them apart
    recs = list(c.records)
    i = c.find("FULL", "timer")
    recs[i] = Rec("START", recs[i].section, bytes((SectionKind.START,)) + recs[i].data[1:])
    return c.join(recs)


def records_after_eof(c: Cut) -> bytes:
    return _insert_after(c, "EOF", None, c.records[c.find("FULL", "timer")])


def eof_missing(c: Cut) -> bytes:
    return c.join([r for r in c.records if r.what != "EOF"], tail=b"")


def eof_missing_vmdesc_kept(c: Cut) -> bytes:
    return c.join([r for r in c.records if r.what != "EOF"])


def footer_wrong_id(c: Cut) -> bytes:
    recs = list(c.records)
    i = c.find("END", "ram")
    recs[i] = with_footer_id(recs[i], BOGUS_ID)
    return c.join(recs)


def unknown_command(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", Rec("COMMAND", None, bytes((RecordType.COMMAND,)) + b"\x00\x30\x00\x00"))


def end_after_end(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", section(SectionKind.END, _ram(c).section_id, EOS))


def start_after_end(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", c.records[c.find("START", "ram")])


def ping(c: Cut) -> bytes:
    return _insert_after(c, "END", "ram", command(Command.PING, b"\x00\x00\x00\x07"))


def ping_with_return_path(c: Cut) -> bytes:
    recs = [command(Command.OPEN_RETURN_PATH, b""), *c.records]
    i = recs.index(c.records[c.find("END", "ram")])
    recs.insert(i + 1, command(Command.PING, b"\x00\x00\x00\x07"))
    return c.join(recs)


def _packaged(c: Cut, inner: list[Rec]) -> bytes:
    blob = b"".join(r.data for r in inner)
    first = c.find("FULL", None)
    devices = [r for r in c.records[first:] if r.what == "FULL"]
    rest = [r for r in c.records[first:] if r.what != "FULL"]
    del devices  # the package carries them instead
    pkg = command(Command.PACKAGED, len(blob).to_bytes(4, "big"))
    return c.join(c.records[:first] + [pkg, Rec("BLOB", None, blob)] + rest)


def packaged_devices_eof(c: Cut) -> bytes:
    # the device sections inside a PACKAGED blob that ends with EOF (the nested loader stops there)
    first = c.find("FULL", None)
    inner = [r for r in c.records[first:] if r.what == "FULL"] + [r for r in c.records if r.what == "EOF"]
    return _packaged(c, inner)


def packaged_devices_only(c: Cut) -> bytes:
    # the device sections inside a PACKAGED blob with nothing that ends the nested loader
    first = c.find("FULL", None)
    return _packaged(c, [r for r in c.records[first:] if r.what == "FULL"])


#: name -> (builder, QEMU 7.2's verdict, qevm's verdict, anomaly qevm reports)
CASES: dict[str, tuple[Callable[[Cut], bytes], bool, bool, Oddity | None]] = {
    "part_after_end": (part_after_end, True, True, Oddity.PART_AFTER_END),
    "end_after_end": (end_after_end, True, True, Oddity.END_AFTER_END),
    "start_after_end": (start_after_end, True, True, Oddity.START_AFTER_END),
    "part_unknown_id": (part_unknown_id, False, False, None),
    "end_unknown_id": (end_unknown_id, False, False, None),
    "end_without_start": (end_without_start, False, False, None),
    "second_start": (second_start, True, True, Oddity.SECOND_START),
    "full_of_live": (full_of_live, True, True, Oddity.FULL_OF_LIVE),
    "id_reused_by_full": (id_reused_by_full, True, True, Oddity.ID_REUSED),
    # a PART for an id two sections hold: QEMU gives it to the one registered first (here the timer, whose
    # load then fails); qevm cannot know the destination's order and refuses the record
    "id_reused_then_part": (id_reused_then_part, False, False, Oddity.ID_REUSED),
    # QEMU refuses a section the destination machine does not register: a fact about the destination,
    # not the stream; qevm keeps it (as an opaque live section) and reports the oddity
    "start_unknown_idstr": (start_unknown_idstr, False, True, Oddity.NOT_LIVE),
    "start_of_device": (start_of_device, True, True, Oddity.NOT_LIVE),
    "records_after_eof": (records_after_eof, True, True, Oddity.TRAILING),
    "eof_missing": (eof_missing, False, False, None),
    "eof_missing_vmdesc_kept": (eof_missing_vmdesc_kept, False, False, None),
    "footer_wrong_id": (footer_wrong_id, False, False, None),
    "unknown_command": (unknown_command, False, False, None),
    # QEMU's destination has no return path to answer on; qevm reads on (analysis tools must) and warns
    "ping_without_return_path": (ping, False, True, Oddity.COMMAND_TOO_EARLY),
    "ping_with_return_path": (ping_with_return_path, True, True, None),
    "packaged_devices_eof": (packaged_devices_eof, True, True, Oddity.EOF_IN_PACKAGE),
    "packaged_devices_only": (packaged_devices_only, False, False, None),
}


@pytest.fixture(scope="module")
def base() -> tuple[Cut, dict]:
    f = require_fixture("small-pc-7.2")
    return cut(read_bytes(f)), fixture_meta(f)  # the destination's command line comes from the metadata


@pytest.mark.parametrize("name", list(CASES))
def test_verdict_matches_qemu(name: str, base: tuple[Cut, dict], tmp_path: Path) -> None:
    c, meta = base
    build, qemu_expected, qevm_expected, oddity = CASES[name]
    data = build(c)
    q = qemu_verdict(data, meta, tmp_path)
    assert q.accepted == qemu_expected, f"QEMU {'loaded' if q.accepted else 'refused'} {name}:\n{q.why}"
    v = qevm_verdict(data)
    assert v.accepted == qevm_expected, f"qevm {'accepted' if v.accepted else 'refused'} {name}: {v.why}"
    if oddity is not None:
        assert oddity.value in v.anomalies, (name, v.anomalies)
    elif v.accepted:
        assert not v.anomalies, (name, v.anomalies)
    # the same verdict, byte by byte (small chunks keep it quick)
    w = qevm_verdict(data, chunk=7)
    assert (w.accepted, w.anomalies) == (v.accepted, v.anomalies), name


def test_base_stream_loads_without_anomalies(base: tuple[Cut, dict], tmp_path: Path) -> None:
    c, meta = base
    data = c.join()
    assert qemu_verdict(data, meta, tmp_path).accepted
    v = qevm_verdict(data)
    assert v.accepted and not v.anomalies


def test_tables_are_complete() -> None:
    # every (life, kind) pair has a cell except PART/END of a section never named (an id nothing holds)
    missing = {(life, kind) for life in Life for kind in SectionKind} - set(SECTION_LIFE)
    assert missing == {(Life.NEW, SectionKind.PART), (Life.NEW, SectionKind.END)}
    assert set(RECORD_GRAMMAR) == set(Place)
    # every place the parser can stand in knows every token (absent = illegal there, by design)
    assert Token.EOF in RECORD_GRAMMAR[Place.PACKAGED] and Token.VMDESC not in RECORD_GRAMMAR[Place.PACKAGED]
    assert not RECORD_GRAMMAR[Place.AFTER_VMDESC]


@pytest.mark.parametrize("name", ["part_after_end", "second_start", "records_after_eof", "packaged_devices_eof"])
def test_info_warns_and_rewrite_keeps_bytes(name: str, base: tuple[Cut, dict], tmp_path: Path) -> None:
    c, _ = base
    build, _, _, oddity = CASES[name]
    assert oddity is not None
    f = tmp_path / f"{name}.mig"
    f.write_bytes(build(c))
    doc = json.loads(qevm("info", "--json", str(f)).stdout)
    assert [w["code"] for w in doc["warnings"]] == [oddity.value], doc["warnings"]
    w = doc["warnings"][0]
    assert w["what"] == ODDITY_TEXT[oddity] and isinstance(w["offset"], int)
    text = qevm("info", str(f)).stdout.decode()
    assert f"warning         offset {w['offset']}: {ODDITY_TEXT[oddity]}" in text, text
    out = tmp_path / "out.mig"
    qevm("rewrite", str(f), str(out))
    assert out.read_bytes() == f.read_bytes()


def test_info_of_a_correct_stream_has_no_warnings(base: tuple[Cut, dict], tmp_path: Path) -> None:
    c, _ = base
    f = tmp_path / "base.mig"
    f.write_bytes(c.join())
    assert json.loads(qevm("info", "--json", str(f)).stdout)["warnings"] == []
    assert "warning" not in qevm("info", str(f)).stdout.decode()


@pytest.mark.parametrize("path", streams())
def test_real_streams_have_no_anomalies(path: Path, unpacked) -> None:
    # every stream a real QEMU wrote follows the grammar without an oddity
    p = Parser(count_pages=True, keep_raw=False)
    with open(unpacked(path), "rb") as f:
        while chunk := f.read(1 << 20):
            p.feed(chunk)
            for _ in p.events():
                pass
    p.close()
    for _ in p.events():
        pass
    assert p.anomalies == []
