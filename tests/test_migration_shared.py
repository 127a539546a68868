"""The pieces the live verbs (record/tap/send) and the engine share (``qevm.migration``): channels for
every URI QEMU takes, the return-path responder and reader, the rate limiter, the push parser, and
the engine's stream writer built on the one RAM record encoder and the vmstate registry.
No QEMU process here (tests/test_live_qemu.py drives real QEMU); the streams are real QEMU 7.2
fixtures."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture

import qevm.engine as engine_pkg
import qevm.migration as migration_pkg
from qevm.errors import DecodeError, QevmError, UsageError
from qevm.format.events import CommandEvent, RamPage, VmDescription
from qevm.format.parser import Parser
from qevm.format.records import Command, RamFlag, ram_record_head
from qevm.format.returnpath import RpType, pong, req_pages, shut
from qevm.io.reader import read_stream
from qevm.migration.channels import TransportError, open_incoming, open_outgoing, parse_uri
from qevm.migration.pushparser import PushParser, StreamMonitor
from qevm.migration.ratelimit import RateLimiter
from qevm.migration.returnpath import PRECOPY_MESSAGES, DestinationResponder, ReturnPathReader

ROOT = Path(__file__).resolve().parent.parent
ENV = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}


def qevm(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kw)


# ------------------------------------------------------------------------------------ the error tree


def test_every_migration_and_engine_exception_is_a_qevm_error() -> None:
    found = []
    for pkg in (migration_pkg, engine_pkg):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            mod = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__ == mod.__name__ and issubclass(cls, BaseException):
                    found.append(cls)
                    assert issubclass(cls, QevmError), cls
    names = {c.__name__ for c in found}
    assert {"TransportError", "QMPError", "LoadError", "IllegalTransition", "Cancelled"} <= names


# ------------------------------------------------------------------------------------------ channels


def test_record_exec_file_fd_give_the_bytes_byte_identical(tmp_path: Path) -> None:
    """`qevm record exec:CMD` reads what CMD prints; file: and fd: read the stream too (QEMU's -incoming)."""
    f = require_fixture("pc-7.2")
    data = f.read_bytes()
    for i, uri in enumerate((f"exec:cat {f}", f"file:{f}", "fd:7")):
        out = tmp_path / f"r{i}.mig"
        if uri == "fd:7":
            with open(f, "rb") as src:
                r = qevm("record", uri, "-o", str(out), "--json", **_as_fd7(src))
        else:
            r = qevm("record", uri, "-o", str(out), "--json")
        assert r.returncode == 0, (uri, r.stderr)
        assert out.read_bytes() == data, uri
        doc = json.loads(r.stdout)
        assert doc["record"]["complete"] and doc["record"]["bytes"] == len(data)
        assert doc["stream"]["decoded_devices"] == doc["stream"]["device_sections"] > 10
        assert not doc["record"]["return_path"]


def _as_fd7(src: Any) -> dict[str, Any]:
    """subprocess arguments that put ``src`` on descriptor 7 of the child."""
    def setup() -> None:
        os.dup2(src.fileno(), 7)
    return {"preexec_fn": setup, "close_fds": False}


def test_record_exec_file_offset_and_short_streams(tmp_path: Path) -> None:
    f = require_fixture("pc-7.2")
    data = f.read_bytes()
    padded = tmp_path / "padded.bin"
    padded.write_bytes(bytes(4096) + data)
    out = tmp_path / "o.mig"
    r = qevm("record", f"file:{padded},offset=4K", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    # a command whose output stops early: exit 2, one line, the partial recording kept under .part
    cut = tmp_path / "cut.mig"
    r = qevm("record", f"exec:head -c 100000 {f}", "-o", str(cut))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "before the end of the stream" in r.stderr and not cut.exists()
    assert (tmp_path / "cut.mig.part").stat().st_size == 100000


def test_rdma_refused_in_one_line(tmp_path: Path) -> None:
    for argv in (["record", "rdma:127.0.0.1:4444", "-o", str(tmp_path / "x.mig")],
                 ["tap", "rdma:127.0.0.1:4444", "tcp:127.0.0.1:1"],
                 ["tap", "tcp:127.0.0.1:0", "rdma:127.0.0.1:1"],
                 ["send", str(tmp_path / "x.mig"), "rdma:127.0.0.1:4444"]):
        r = qevm(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "rdma" in lines[0] and "not supported" in lines[0], (argv, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.mig").exists()
    with pytest.raises(UsageError, match="unknown migration protocol: gopher:x"):
        parse_uri("gopher:x")


def test_tap_from_exec_to_file(tmp_path: Path) -> None:
    """tap takes any -incoming URI and any migrate URI: exec:cat in, file: out, bytes unchanged."""
    f = require_fixture("pc-7.2")
    out, rec = tmp_path / "fwd.mig", tmp_path / "seen.mig"
    r = qevm("tap", f"exec:cat {f}", f"file:{out}", "-o", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == f.read_bytes() == rec.read_bytes()
    doc = json.loads(r.stdout)
    assert doc["tap"]["forward_bytes"] == f.stat().st_size and doc["tap"]["back_bytes"] == 0


def test_send_and_record_over_a_unix_socket(tmp_path: Path) -> None:
    """send -> record over unix:, both qevm: the return path opened by the stream is answered (PONG, SHUT)."""
    f = require_fixture("postcopy-7.2")  # a stream with OPEN_RETURN_PATH and PINGs
    sock, out = tmp_path / "m.sock", tmp_path / "got.mig"
    rec = subprocess.Popen([sys.executable, "-m", "qevm.cli.main", "record", f"unix:{sock}", "-o", str(out),
                            "--json", "--timeout", "20", "--accept-timeout", "30"], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and rec.poll() is None
            time.sleep(0.05)
        s = qevm("send", str(f), f"unix:{sock}", "--json", "--timeout", "20")
        got, err = rec.communicate(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    assert s.returncode == 0, s.stderr
    assert rec.returncode == 0, err
    assert out.read_bytes() == f.read_bytes()
    sent, recd = json.loads(s.stdout)["send"], json.loads(got)["record"]
    assert sent["shut_status"] == 0
    assert [m["type"] for m in sent["return_path_messages"]] == [m["type"] for m in recd["return_path_sent"]]
    assert recd["return_path_sent"][-1]["type"] == "SHUT"


def test_incoming_and_outgoing_fd_socket_carry_a_return_path() -> None:
    a, b = socket.socketpair()
    inc = open_incoming(f"fd:{a.fileno()}")
    out = open_outgoing(f"fd:{b.fileno()}")
    try:
        ch = inc.accept()
        assert ch.has_return_path and out.has_return_path
        out.sendall(b"QEVM")
        buf = bytearray(8)
        assert ch.recv_into(memoryview(buf)) == 4 and buf[:4] == b"QEVM"
        ch.sendall(b"back")
        assert out.recv_into(memoryview(buf)) == 4 and buf[:4] == b"back"
    finally:
        inc.close()
        out.close()
        a.close()
        b.close()


def test_incoming_listener_abort_wakes_accept(tmp_path: Path) -> None:
    inc = open_incoming(f"unix:{tmp_path / 'l.sock'}")
    assert inc.socket_address() == [{"type": "unix", "path": str(tmp_path / "l.sock")}]
    errors: list[Exception] = []

    def wait() -> None:
        try:
            inc.accept()
        except TransportError as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.3)
    inc.abort()
    t.join(5)
    assert not t.is_alive() and errors and "aborted" in str(errors[0])
    inc.close()
    assert not (tmp_path / "l.sock").exists()


def test_outgoing_exec_status_and_missing_fd(tmp_path: Path) -> None:
    ch = open_outgoing(f"exec:cat > {tmp_path / 'x'}")
    ch.sendall(b"abc")
    ch.close()
    assert (tmp_path / "x").read_bytes() == b"abc"
    ch = open_outgoing("exec:exit 3")
    with pytest.raises(TransportError, match="status 3"):
        ch.close()
    with pytest.raises(UsageError, match="not open"):
        open_outgoing("fd:999")


# ---------------------------------------------------------------------------------------- return path


def _cmd(cmd: Command, data: bytes = b"") -> CommandEvent:
    return CommandEvent(10, cmd, data)


def test_destination_responder() -> None:
    r = DestinationResponder()
    with pytest.raises(DecodeError, match="no return path open"):
        r.on_command(_cmd(Command.PING, (7).to_bytes(4, "big")))
    assert r.finish(True) == b""  # nothing opened: nothing to say
    assert r.on_command(_cmd(Command.OPEN_RETURN_PATH)) == b""
    assert r.on_command(_cmd(Command.OPEN_RETURN_PATH)) == b"" and "again" in r.notes[0]
    assert r.on_command(_cmd(Command.PING, (7).to_bytes(4, "big")), 0) == pong(7).encode()
    assert r.finish(True, 8) == shut(0).encode() and r.finish(True) == b""
    assert [(m.name, m.offset) for m in r.sent] == [("PONG", 0), ("SHUT", 8)]
    failed = DestinationResponder(switchover_ack=True)
    assert failed.on_command(_cmd(Command.OPEN_RETURN_PATH)) == bytes.fromhex("00070000")
    assert failed.finish(False) == shut(1).encode()
    one_way = DestinationResponder(channel_has_return_path=False)
    with pytest.raises(DecodeError, match="has none"):
        one_way.on_command(_cmd(Command.OPEN_RETURN_PATH))


def test_return_path_reader() -> None:
    a, b = socket.socketpair()
    from qevm.migration.channels import SocketChannel

    ch = SocketChannel(a, "test")
    rd = ReturnPathReader(ch, allowed=PRECOPY_MESSAGES)
    b.sendall(pong(1).encode() + pong(2).encode()[:3])
    time.sleep(0.1)
    b.sendall(pong(2).encode()[3:] + shut(0).encode())
    assert rd.wait_shut(5) == 0 and rd.pongs == [1, 2] and rd.error is None
    rd.stop()
    # a page request in a precopy migration is an error; the end of the channel without SHUT is None
    rd = ReturnPathReader(ch, allowed=PRECOPY_MESSAGES)
    b.sendall(req_pages(0, 4096, "pc.ram").encode())
    with pytest.raises(DecodeError, match="unexpected REQ_PAGES_ID"):
        rd.wait_shut(5)
    rd = ReturnPathReader(ch)
    b.sendall(req_pages(0, 4096, "pc.ram").encode())
    b.close()
    assert rd.wait_shut(5) is None and [m.type for m in rd.messages] == [RpType.REQ_PAGES_ID]
    a.close()


# -------------------------------------------------------------------------------------- rate limiter


def test_rate_limiter() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    rl = RateLimiter(1 << 20, clock=lambda: now[0], sleep=sleep)
    assert rl.burst == (1 << 20) // 10  # one 100 ms window of credit
    for _ in range(100):
        rl.take(64 << 10)
    assert abs(now[0] - (100 * (64 << 10) - rl.burst) / (1 << 20)) < 0.01
    rl.set_rate(2 << 20)
    t = now[0]
    for _ in range(100):
        rl.take(64 << 10)
    assert 2.9 < now[0] - t < 3.2
    assert RateLimiter(0).unlimited and RateLimiter(1 << 62).take(1 << 40)
    t = now[0]
    cold = RateLimiter(1000, initial=0, clock=lambda: now[0], sleep=sleep)
    cold.take(500)
    assert now[0] - t == pytest.approx(0.5)  # no credit at the start
    stop = threading.Event()
    stop.set()
    slow = RateLimiter(1000, burst=1000)
    assert slow.take(1000, stop) and not slow.take(100_000, stop)  # the wait is abandoned at once


# -------------------------------------------------------------------------------------- push parser


def test_push_parser_landmarks_in_any_chunking() -> None:
    f = require_fixture("postcopy-7.2")
    data = f.read_bytes()
    ref = read_stream(str(f))
    for size in (1 << 20, 4093):
        seen: list[Any] = []
        pp = PushParser(seen.append, count_pages=True, keep_raw=False)
        cmds: list[CommandEvent] = []
        for i in range(0, len(data), size):
            chunk = data[i:i + size]
            view = pp.get_buffer(len(chunk))
            view[:len(chunk)] = chunk
            view.release()
            cmds += pp.buffer_updated(len(chunk))
        cmds += pp.buffer_updated(0)
        assert pp.complete and pp.return_path and pp.postcopy and pp.eof and pp.offset == len(data)
        assert [(c.offset, c.name) for c in cmds] == [(c.offset, c.name) for c in ref.commands]
        assert len(seen) > 10
    mon = StreamMonitor()
    mon.feed(data)
    mon.close()
    doc = mon.document()
    assert doc["size"] == len(data) and mon.pages > 0 and mon.complete


# ----------------------------------------------------------- the engine's writer on the shared pieces


def test_engine_ram_records_use_the_one_encoder() -> None:
    from qevm.engine.machine import RAM_BLOCK, Machine
    from qevm.engine.stream import SaveSession, StreamOut

    m = Machine(256 << 10, dirty_rate=0, seed=3)
    m.boot()
    m.run_ops(500)
    buf = bytearray()
    sess = SaveSession(m, StreamOut(buf.extend))
    sess.header()
    sess.setup()
    sess.complete()
    p = Parser(count_pages=False)
    p.feed(bytes(buf))
    p.close()
    pages = [ev for ev in p.events() if isinstance(ev, RamPage)]
    assert len(pages) == m.npages
    for ev in pages:
        head = ram_record_head(ev.addr, ev.flags, ev.block)
        assert bytes(buf[ev.offset:ev.offset + len(head)]) == head
    assert not pages[0].flags & RamFlag.CONTINUE and all(ev.flags & RamFlag.CONTINUE for ev in pages[1:])
    assert {ev.block for ev in pages} == {RAM_BLOCK}


def test_engine_device_sections_are_the_registry_stream() -> None:
    """The end of an engine stream (FULL device sections, EOF, vmdesc) is the registry's own stream."""
    from qevm.engine.machine import MACHINE_TYPE, Machine
    from qevm.engine.stream import SaveSession, StreamOut

    m = Machine(256 << 10, dirty_rate=0, seed=3)
    m.boot()
    m.globalstate.store(m.runstate)
    buf = bytearray()
    out = StreamOut(buf.extend)
    SaveSession(m, out).write_devices()
    out.flush()
    whole = m.registry.encode(machine=MACHINE_TYPE, page_size=m.page_size, describe_configuration=True)
    assert whole.endswith(bytes(buf))
    head = m.registry.events(machine=MACHINE_TYPE, page_size=m.page_size)[:2]
    assert len(whole) - len(buf) == sum(len(ev.encode()) for ev in head)
    p = Parser()
    p.feed(whole)
    p.close()
    (vd,) = [ev for ev in p.events() if isinstance(ev, VmDescription)]
    vm = vd.json()
    assert vm["page_size"] == m.page_size and list(vm) == ["configuration", "page_size", "devices"]
    # every entry with a FULL section (the live-only ones, ram, block and dirty-bitmap, have none)
    assert [d["name"] for d in vm["devices"]] == [se.idstr for se in m.registry.handlers
                                                  if m.registry.save_entry(se) is not None]
    assert {se.idstr for se in m.registry.handlers} - {d["name"] for d in vm["devices"]} == \
        {"ram", "block", "dirty-bitmap"}
