"""qevm as a live migration peer of real QEMU 7.2: record, tap and send, loopback only.

Every QEMU test boots the project's Linux guest (``scripts/fixtures/guest.py``: "tick N" every
100 ms on the serial port), migrates it through qevm and checks that the guest runs on at the far
end with its tick numbering continuing.  Every process is bounded in time and killed at teardown.
The first tests need no QEMU: URI parsing, the return-path codec, the token bucket, --live framing.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, IN_CI, missing, require_binary, require_file, require_fixture

from qevm.errors import DecodeError, TruncatedError, UsageError
from qevm.format.parser import Parser
from qevm.format.returnpath import (
    DONE,
    NEED_DATA,
    RpDecoder,
    RpMessage,
    RpType,
    pong,
    recv_bitmap,
    req_pages,
    resume_ack,
    shut,
    switchover_ack,
)
from qevm.io.reader import read_stream
from qevm.migration.channels import LISTEN_SCHEMES, parse_size, parse_uri
from qevm.migration.ratelimit import RateLimiter
from qevm.migration.send import LiveResender

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")
Procs = list[subprocess.Popen[str]]
ENV = {"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}
BASE = ["-M", "pc", "-accel", "tcg", "-smp", "1"]


# ----------------------------------------------------------------------------------- no QEMU needed


def test_uri_parsing() -> None:
    u = parse_uri("tcp:127.0.0.1:4444")
    assert (u.scheme, u.host, u.port, str(u)) == ("tcp", "127.0.0.1", 4444, "tcp:127.0.0.1:4444")
    assert parse_uri("tcp:[::1]:5").host == "::1" and str(parse_uri("tcp:[::1]:5")) == "tcp:[::1]:5"
    assert parse_uri("tcp::4444").host == ""
    assert parse_uri("tcp:localhost:4444,ipv4").family == socket.AF_INET
    assert parse_uri("unix:/tmp/a b.sock").path == "/tmp/a b.sock"
    assert parse_uri("vsock:3:1234").cid == 3
    assert parse_uri("exec:cat > /tmp/x").command == "cat > /tmp/x"
    assert parse_uri("fd:5").fd == 5
    f = parse_uri("file:/tmp/x.mig,offset=4k")
    assert (f.path, f.offset, str(f)) == ("/tmp/x.mig", 4096, "file:/tmp/x.mig,offset=4096")
    assert parse_size("1.5M") == 3 << 19 and parse_size("100") == 100 and parse_size("2G") == 2 << 30
    for bad, why in (("foo:bar", "unknown migration protocol: foo:bar"), ("tcp", "unknown migration protocol"),
                     ("tcp:1.2.3.4", "error parsing address"), ("tcp:[::1:4", "error parsing IPv6"),
                     ("tcp:h:1,to=9", "not supported"), ("unix:", "invalid Unix socket"), ("fd:x", "number"),
                     ("file:/x,offset=zz", "file URI has bad offset zz"), ("rdma:1:2", "not supported"),
                     ("defer", "-incoming"), ("tcp:h:99999", "out of range")):
        with pytest.raises(UsageError, match=re.escape(why)):
            parse_uri(bad)
    with pytest.raises(UsageError, match="cannot be used here"):
        parse_uri("exec:cat", LISTEN_SCHEMES)


def _decode_all(data: bytes, step: int | None = None) -> list[RpMessage]:
    d = RpDecoder()
    out = []
    for i in range(0, len(data), step or max(1, len(data))):
        d.feed(data[i:i + (step or len(data))])
        out += list(d.messages())
    d.close()
    assert d.next_message() is DONE
    return out


def test_return_path_codec() -> None:
    # verified bytes (format.md §2.3): REQ_PAGES_ID for pc.bios at 0x3f000
    verified = bytes.fromhex("00030014000000000003f0000000100007") + b"pc.bios"
    msgs = [pong(1), req_pages(0x3f000, 0x1000, "pc.bios"), req_pages(0x40000, 0x1000), recv_bitmap("pc.ram", b"\x05"),
            resume_ack(), switchover_ack(), shut(0)]
    assert msgs[1].encode() == verified
    wire = b"".join(m.encode() for m in msgs)
    for step in (None, 1, 3):
        got = _decode_all(wire, step)
        assert [m.encode() for m in got] == [m.encode() for m in msgs]
        assert [m.name for m in got] == ["PONG", "REQ_PAGES_ID", "REQ_PAGES", "RECV_BITMAP", "RESUME_ACK",
                                         "SWITCHOVER_ACK", "SHUT"]
        assert got[2].block == "pc.bios" and got[2].info()["start"] == 0x40000
        assert got[3].info()["pages_received"] == 2 and got[3].info()["bitmap_bytes"] == 8
        assert got[0].offset == 0 and got[1].offset == 8
    d = RpDecoder()
    d.feed(shut(0).encode()[:5])
    assert d.next_message() is NEED_DATA
    d.close()
    with pytest.raises(TruncatedError):
        d.next_message()
    for bad, why in ((b"\x00\x00\x00\x00", "invalid"), (b"\x00\x09\x00\x00", "invalid"),
                     (b"\x00\x02\x00\x05" + bytes(5), "expected 4"), (b"\x00\x04\x00\x0c" + bytes(12), "before any"),
                     (shut(0).encode() + pong(1).encode(), "after SHUT"),
                     (recv_bitmap("a", b"\x01").encode()[:-1] + b"\x00", "end marker")):
        with pytest.raises(DecodeError, match=why):
            _decode_all(bad)


def test_return_path_of_a_real_postcopy_migration() -> None:
    rp = require_file(FIXTURES / "postcopy-7.2.rp", "python3 scripts/fixtures/make.py postcopy-7.2")
    got = _decode_all(rp.read_bytes(), 7)
    names = [m.name for m in got]
    assert [m.info()["value"] for m in got if m.type == RpType.PONG] == [1, 2, 4, 3]
    assert names[-1] == "SHUT" and got[-1].info()["status"] == 0
    assert "REQ_PAGES_ID" in names and b"".join(m.encode() for m in got) == rp.read_bytes()


def test_token_bucket() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    b = RateLimiter(1000, burst=100, clock=lambda: now[0], sleep=sleep)
    for _ in range(50):
        b.take(100)
    assert 4.8 <= now[0] <= 5.0  # 5000 bytes at 1000 B/s, the first burst free


def test_live_resend_framing(tmp_path: Path, unpacked: Any) -> None:
    """--live output: same device sections, more passes, the last copy of every page unchanged."""
    f = unpacked(require_fixture("small-pc-7.2"))
    out = bytearray()
    p = Parser(count_pages=False)
    res = LiveResender(out.extend, p, chunk=16 << 10, stride=4, passes=3)
    p.feed(f.read_bytes())
    p.close()
    for ev in p.events():
        res.handle(ev)
    live = tmp_path / "live.mig"
    live.write_bytes(out)
    a, b = read_stream(str(f)), read_stream(str(live))
    assert b.passes == a.passes + 2 and res.resent > 0 and b.ram_chunks > a.ram_chunks + 2
    assert [(d.section.idstr, d.data) for d in a.devices] == [(d.section.idstr, d.data) for d in b.devices]
    assert b.vmdesc_raw == a.vmdesc_raw
    from qevm.format.memory import RamImage

    ma, mb = RamImage(4096, str(tmp_path)), RamImage(4096, str(tmp_path))
    try:
        read_stream(str(f), memory=ma)
        read_stream(str(live), memory=mb)
        assert ma.blocks() == mb.blocks()
        for name in ma.blocks():
            assert ma.read(name, 0, ma.blocks()[name]) == mb.read(name, 0, mb.blocks()[name]), name
    finally:
        ma.close()
        mb.close()


# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture
def procs() -> Iterator[Procs]:
    """qevm processes started by a test; killed at teardown whatever happened."""
    started: Procs = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def start(procs: Procs, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "qevm.cli.main", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV, text=True)
    procs.append(p)
    return p


def listening(p: subprocess.Popen[str], timeout: float = 20) -> str:
    """The address a qevm listening on port 0 announces on stderr."""
    assert p.stderr is not None
    r, _, _ = select.select([p.stderr], [], [], timeout)
    assert r, "qevm did not announce its address"
    line = p.stderr.readline()
    m = re.match(r"qevm: listening on (\S+)", line)
    assert m, line
    return m.group(1)


def wait_path(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def finish(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"qevm did not finish within {timeout}s; stderr: {err[-2000:]}")
    return p.returncode, out, err


def qevm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def guest_args(work: str | None = None, mem: int = 128) -> list[str]:
    require_binary("qemu-system-x86_64")
    from guest import ensure_guest, qemu_args

    try:
        g = ensure_guest(verbose=False)
    except Exception as e:  # noqa: BLE001 - no network/apt: skip outside CI
        if IN_CI:
            raise
        missing("guest kernel", f"scripts/fixtures/guest.py: {e}")
    return [*BASE, "-m", str(mem), *qemu_args(g, work)]


def boot(args: list[str], workdir: Path, name: str, ticks: int = 5) -> Qemu:
    vm = Qemu(QEMU or "qemu-system-x86_64", args, workdir, name=name)
    try:
        vm.wait_serial(f"tick {ticks}", 60)
    except BaseException:
        vm.close()
        raise
    return vm


def ticks(vm: Qemu) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", vm.serial())]


def assert_runs_on(dst: Qemu, last_src_tick: int, more: int = 10, timeout: float = 60) -> None:
    """The destination runs the guest: its ticks continue the source's numbering and advance."""
    deadline = time.monotonic() + timeout
    while True:
        t = ticks(dst)
        if t and t[-1] >= last_src_tick + more:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"guest not running on the destination (source ended at tick {last_src_tick}, "
                                 f"destination ticks {t[:3]}...{t[-3:]}; status {dst.qmp('query-status')})")
        time.sleep(0.2)
    assert dst.qmp("query-status")["status"] == "running"
    assert t[0] > 1 and t[0] >= last_src_tick - 2, (t[:3], last_src_tick)  # continued, not rebooted
    assert t == sorted(t)


def wait_incoming_done(dst: Qemu, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while dst.qmp("query-status")["status"] in ("inmigrate", "postmigrate", "finish-migrate", "paused"):
        assert time.monotonic() < deadline, dst.qmp("query-migrate")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ----------------------------------------------------------------------------------------- record


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One migration of a running guest into ``qevm record`` (return-path capability on)."""
    w = tmp_path_factory.mktemp("record")
    args = guest_args()
    out = w / "guest.mig"
    started: Procs = []
    try:
        with boot(args, w, "src") as vm:
            rec = start(started, "record", "tcp:127.0.0.1:0", "-o", str(out), "--json", "--timeout", "30",
                        "--accept-timeout", "60")
            uri = listening(rec)
            reply = vm.migrate(uri, caps={"return-path": True}, timeout=120)
            rc, stdout, err = finish(rec)
            last = ticks(vm)[-1]
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
    assert rc == 0, err
    return {"path": out, "args": args, "doc": json.loads(stdout), "reply": reply, "last_tick": last, "dir": w}


def test_record_completes_and_loads(recording: dict[str, Any], tmp_path: Path) -> None:
    assert recording["reply"]["status"] == "completed"
    doc, out = recording["doc"], recording["path"]
    r = doc["record"]
    assert r["complete"] and r["output"] == str(out) and not Path(str(out) + ".part").exists()
    assert r["bytes"] == out.stat().st_size
    # what a destination answers: PONG to the PING after OPEN_RETURN_PATH, SHUT(0) at the end
    assert [(m["type"], m.get("value", m.get("status"))) for m in r["return_path_sent"]] == [("PONG", 1), ("SHUT", 0)]
    s = doc["stream"]
    assert s["vmdesc"] and s["size"] == r["bytes"] and s["commands"] == {"OPEN_RETURN_PATH": 1, "PING": 1}
    assert s["decoded_devices"] == s["device_sections"] > 10
    ram = s["ram"]["pages"] if "pages" in s["ram"] else None
    assert ram is None or sum(ram.values()) > 0
    # the recording is a stream QEMU loads: the guest runs on from where it was
    with Qemu(QEMU or "", [*recording["args"], "-incoming", f"exec:cat {out}"], tmp_path, name="dst") as dst:
        wait_incoming_done(dst)
        assert dst.qmp("query-migrate")["status"] == "completed"
        assert_runs_on(dst, recording["last_tick"])


def test_record_unix_takes_a_real_migration(tmp_path: Path, procs: Procs) -> None:
    """``qevm record unix:PATH``: a guest migrated by QEMU to ``exec:cat``, resumed, then migrated to
    qevm record over a unix socket: the same sections and vmdesc (QEMU 7.2 refuses a second migration
    of a guest still paused by the first, so the RAM differs); ``record exec:cat`` copies it byte for byte."""
    args = guest_args()
    ref, out, sock = tmp_path / "ref.mig", tmp_path / "unix.mig", tmp_path / "m.sock"
    with boot(args, tmp_path, "src") as vm:
        assert vm.migrate(f"exec:cat > {ref}", timeout=120)["status"] == "completed"
        vm.qmp("cont")
        rec = start(procs, "record", f"unix:{sock}", "-o", str(out), "--json", "--timeout", "30",
                    "--accept-timeout", "60")
        wait_path(sock)
        reply = vm.migrate(f"unix:{sock}", timeout=120)
        rc, stdout, err = finish(rec)
    assert rc == 0, err
    assert reply["status"] == "completed" and not sock.exists()
    doc = json.loads(stdout)
    assert doc["record"]["complete"] and doc["record"]["listen"] == f"unix:{sock}"
    a, b = read_stream(str(ref)), read_stream(str(out))
    assert [(d.section.idstr, d.section.instance_id, d.section.version) for d in a.devices] == \
        [(d.section.idstr, d.section.instance_id, d.section.version) for d in b.devices]
    assert len(a.devices) > 10 and a.vmdesc_raw == b.vmdesc_raw
    assert a.eof_offset and b.eof_offset and b.size == out.stat().st_size
    copy = tmp_path / "copy.mig"
    r = qevm("record", f"exec:cat {out}", "-o", str(copy))
    assert r.returncode == 0 and copy.read_bytes() == out.read_bytes(), r.stderr


def test_source_killed_midway(tmp_path: Path, procs: Procs) -> None:
    with boot(guest_args(), tmp_path, "src") as vm:
        out = tmp_path / "cut.mig"
        sock = tmp_path / "rec.sock"
        rec = start(procs, "record", f"unix:{sock}", "-o", str(out), "--timeout", "30")
        wait_path(sock)
        vm.set_migration(params={"max-bandwidth": 8 << 20})
        vm.qmp("migrate", uri=f"unix:{sock}")
        deadline = time.monotonic() + 30
        while vm.qmp("query-migrate").get("ram", {}).get("transferred", 0) < 4 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        vm.kill()
        rc, _, err = finish(rec, 60)
    assert rc == 2
    assert "closed the connection before the end of the stream" in err and "offset" in err, err
    assert not out.exists()  # never looks complete
    part = Path(str(out) + ".part")
    assert part.exists() and str(part) in err
    with pytest.raises(DecodeError):
        read_stream(str(part))


def test_record_rejects_garbage_and_stalls(tmp_path: Path, procs: Procs) -> None:
    out = tmp_path / "g.mig"
    rec = start(procs, "record", "tcp:127.0.0.1:0", "-o", str(out), "--timeout", "30")
    host, port = listening(rec).split(":")[1:]
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"QEVM\x00\x00\x00\x03" + b"\x4b" * 4096)
        rc, _, err = finish(rec, 30)
    assert rc == 2 and "offset 8 (0x8)" in err and "unknown top-level record type 0x4b" in err, err
    assert not out.exists()
    rec = start(procs, "record", "tcp:127.0.0.1:0", "-o", str(out), "--timeout", "1.5")
    host, port = listening(rec).split(":")[1:]
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"QEVM\x00\x00\x00\x03")
        t0 = time.monotonic()
        rc, _, err = finish(rec, 30)
    assert rc == 2 and "no data from the source" in err and time.monotonic() - t0 < 15, err
    assert not out.exists()
    # a file that is not a stream is never sent: send fails before writing a byte, record sees nothing
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"NOPE" + bytes(100))
    rec = start(procs, "record", "tcp:127.0.0.1:0", "-o", str(out), "--timeout", "30")
    uri = listening(rec)
    r = qevm("send", str(bad), uri, timeout=60)
    assert r.returncode == 2 and "not a QEMU VM-state stream" in r.stderr, r.stderr
    rc, _, err = finish(rec, 30)
    assert rc == 2 and "offset 0" in err, err
    r = qevm("record", "foo:bar", "-o", str(out))
    assert r.returncode == 2 and r.stderr.strip() == "qevm: error: unknown migration protocol: foo:bar"
    r = qevm("tap", "tcp:127.0.0.1:0", "rdma:127.0.0.1:1")
    assert r.returncode == 2 and "rdma migration is not supported" in r.stderr


# -------------------------------------------------------------------------------------------- tap


def _tap_migration(tmp_path: Path, procs: Procs, caps: dict[str, bool], params: dict[str, Any], work: str | None,
                   mem: int, postcopy: bool = False) -> tuple[dict[str, Any], dict[str, Any], Path]:
    args = guest_args(work, mem)
    port = free_port()
    out = tmp_path / "tapped.mig"
    with (boot(args, tmp_path, "src") as src,
          Qemu(QEMU or "", [*args, "-incoming", f"tcp:127.0.0.1:{port}"], tmp_path, name="dst") as dst):
        if caps:
            dst.set_migration(caps=caps)
        if work and work.startswith("dirty"):
            src.wait_serial("dirty pass 2", 60)
        sock = tmp_path / "tap.sock"
        tp = start(procs, "tap", f"unix:{sock}", f"tcp:127.0.0.1:{port}", "-o", str(out), "--json", "--timeout", "60",
                   "--accept-timeout", "60")
        wait_path(sock)

        def go_postcopy(vm: Qemu) -> None:
            if not postcopy:
                return
            deadline = time.monotonic() + 60
            while vm.qmp("query-migrate").get("ram", {}).get("transferred", 0) < 48 << 20:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            vm.qmp("migrate-start-postcopy")

        reply = src.migrate(f"unix:{sock}", caps=caps, params=params, timeout=180, on_active=go_postcopy)
        rc, stdout, err = finish(tp)
        assert rc == 0, err
        wait_incoming_done(dst)
        assert dst.qmp("query-migrate")["status"] == "completed"
        assert_runs_on(dst, ticks(src)[-1])
    return json.loads(stdout), reply, out


def test_tap_precopy(tmp_path: Path, procs: Procs) -> None:
    doc, reply, out = _tap_migration(tmp_path, procs, {}, {"max-bandwidth": 1 << 30}, None, 128)
    t = doc["tap"]
    assert t["complete"] and t["forward_bytes"] == out.stat().st_size and t["back_bytes"] == 0
    assert doc["stream"]["vmdesc"] and doc["stream"]["decoded_devices"] == doc["stream"]["device_sections"]
    # the tap's recording is the stream the destination loaded
    an = read_stream(str(out))
    assert an.vmdesc is not None and an.size == t["forward_bytes"]
    assert reply["ram"]["normal"] == sum(b.pages["normal"] for b in an.blocks.values())


def test_tap_return_path(tmp_path: Path, procs: Procs) -> None:
    doc, _, _ = _tap_migration(tmp_path, procs, {"return-path": True}, {"max-bandwidth": 1 << 30}, None, 128)
    rp = doc["tap"]["return_path"]
    assert rp["messages"] == {"PONG": 1, "SHUT": 1}
    assert [(m["type"], m.get("value", m.get("status"))) for m in rp["list"]] == [("PONG", 1), ("SHUT", 0)]
    assert doc["tap"]["back_bytes"] == 16


def test_tap_multifd_channels(tmp_path: Path, procs: Procs) -> None:
    """Further connections (multifd) are paired with connections to the destination, in order."""
    doc, reply, _ = _tap_migration(tmp_path, procs, {"multifd": True}, {"max-bandwidth": 1 << 30}, None, 128)
    t = doc["tap"]
    assert len(t["side_channels"]) == 2 and all(c["forward"] > 0 for c in t["side_channels"])
    # the main channel carries the framing and zero pages only; the page data went over the side channels
    assert doc["stream"]["ram"]["pages"]["normal"] == 0
    assert sum(c["forward"] for c in t["side_channels"]) > reply["ram"]["normal"] * 4096
    # the tap decodes QEMU's channels (qevm.format.multifd): ids, every normal page, one SYNC per RAM EOS (7.2)
    sc = t["side_channels"]
    assert {c["kind"] for c in sc} == {"multifd"} and sorted(c["channel"] for c in sc) == [0, 1], sc
    # (7.2's "normal" counter misses a packet or so of the pages its channels carry)
    assert 0 <= sum(c["pages"] for c in sc) - reply["ram"]["normal"] <= 256 and not t["notes"], (sc, t["notes"])
    assert len({c["syncs"] for c in sc}) == 1 and sc[0]["syncs"] >= 3, sc


def test_tap_postcopy(tmp_path: Path, procs: Procs) -> None:
    # switch to postcopy part-way through the first pass, with a slow postcopy phase, so that the running
    # destination faults on pages it lacks and asks for them through the tap
    params = {"max-bandwidth": 32 << 20, "downtime-limit": 10, "max-postcopy-bandwidth": 8 << 20}
    doc, reply, out = _tap_migration(tmp_path, procs, {"postcopy-ram": True}, params, "dirty:8", 256, postcopy=True)
    t, s = doc["tap"], doc["stream"]
    assert t["complete"] and not s["vmdesc"]
    assert {"POSTCOPY_ADVISE", "PACKAGED", "POSTCOPY_LISTEN", "POSTCOPY_RUN"} <= set(s["commands"])
    rp = t["return_path"]
    assert rp["messages"]["PONG"] == 4 and rp["messages"]["SHUT"] == 1
    assert rp["list"][-1] == {"offset": rp["list"][-1]["offset"], "type": "SHUT", "status": 0}
    # every page request the source served came back through the tap
    assert rp["page_requests"] == reply["ram"]["postcopy-requests"]
    reqs = [m for m in rp["list"] if m["type"].startswith("REQ_PAGES")]
    assert all(m["block"] and m["length"] == 4096 for m in reqs)
    assert read_stream(str(out)).eof_offset is not None


# ------------------------------------------------------------------------------------------- send


def _send_into_qemu(recording: dict[str, Any], tmp_path: Path, *opts: str) -> tuple[dict[str, Any], float]:
    port = free_port()
    with Qemu(QEMU or "", [*recording["args"], "-incoming", f"tcp:127.0.0.1:{port}"], tmp_path, name="dst") as dst:
        t0 = time.monotonic()
        r = qevm("send", str(recording["path"]), f"tcp:127.0.0.1:{port}", "--json", *opts)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        wait_incoming_done(dst)
        assert dst.qmp("query-migrate")["status"] == "completed"
        assert_runs_on(dst, recording["last_tick"])
    return json.loads(r.stdout), took


def test_send_recorded_stream(recording: dict[str, Any], tmp_path: Path) -> None:
    doc, _ = _send_into_qemu(recording, tmp_path)
    s = doc["send"]
    assert s["bytes"] == recording["path"].stat().st_size and s["shut_status"] == 0
    assert [m["type"] for m in s["return_path_messages"]] == ["PONG", "SHUT"]


def test_send_to_a_unix_destination(recording: dict[str, Any], tmp_path: Path) -> None:
    """``qevm send FILE unix:PATH`` into a QEMU started with ``-incoming unix:PATH``: the guest runs on."""
    sock = tmp_path / "in.sock"
    with Qemu(QEMU or "", [*recording["args"], "-incoming", f"unix:{sock}"], tmp_path, name="dst") as dst:
        wait_path(sock)
        r = qevm("send", str(recording["path"]), f"unix:{sock}", "--json", "--timeout", "30")
        assert r.returncode == 0, r.stderr
        wait_incoming_done(dst)
        assert dst.qmp("query-migrate")["status"] == "completed"
        assert_runs_on(dst, recording["last_tick"])
    s = json.loads(r.stdout)["send"]
    assert s["target"] == f"unix:{sock}" and s["shut_status"] == 0
    assert [m["type"] for m in s["return_path_messages"]] == ["PONG", "SHUT"]


def test_send_live_iterations(recording: dict[str, Any], tmp_path: Path) -> None:
    doc, _ = _send_into_qemu(recording, tmp_path, "--live")
    s, st = doc["send"], doc["stream"]
    assert s["live"] and s["resent_pages"] > 0 and s["bytes"] > s["input_bytes"] and s["shut_status"] == 0
    orig = recording["doc"]["stream"]["ram"]
    assert st["ram"]["passes"] == orig["passes"] + 2 and st["ram"]["iterations"] > orig["iterations"]


def test_send_max_bandwidth(recording: dict[str, Any], tmp_path: Path) -> None:
    size = recording["path"].stat().st_size
    bw = 48 << 20
    doc, took = _send_into_qemu(recording, tmp_path, "--max-bandwidth", "48M")
    s = doc["send"]
    assert s["seconds"] >= 0.9 * size / bw, s
    assert s["rate_bytes_per_s"] <= 1.05 * bw, s


def test_send_to_a_file_uri(recording: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "copy.mig"
    r = qevm("send", str(recording["path"]), f"file:{out},offset=4K")
    assert r.returncode == 0, r.stderr
    data = out.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096:] == recording["path"].read_bytes()
    r = qevm("send", str(recording["path"]), f"exec:cat > {tmp_path / 'e.mig'}")
    assert r.returncode == 0 and (tmp_path / "e.mig").read_bytes() == recording["path"].read_bytes()
    r = qevm("send", str(recording["path"]), "exec:exit 3")
    assert r.returncode == 2, r.stderr


def test_tap_to_nowhere(tmp_path: Path, procs: Procs) -> None:
    sock = tmp_path / "t.sock"
    tp = start(procs, "tap", f"unix:{sock}", f"unix:{tmp_path / 'nobody.sock'}", "--timeout", "5")
    wait_path(sock)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        rc, _, err = finish(tp, 30)
    assert rc == 2 and "Failed to connect" in err, err


def test_qemu_error_is_reported(recording: dict[str, Any], tmp_path: Path) -> None:
    """A destination that cannot load the stream: send reports it (no SHUT(0)) and exits 2."""
    port = free_port()
    args = [a if a != "128" else "256" for a in recording["args"]]  # different RAM size: load fails
    with Qemu(QEMU or "", [*args, "-incoming", f"tcp:127.0.0.1:{port}"], tmp_path, name="dst"):
        r = qevm("send", str(recording["path"]), f"tcp:127.0.0.1:{port}", "--timeout", "20")
    assert r.returncode == 2 and "destination" in r.stderr, r.stderr
