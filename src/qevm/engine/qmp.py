"""A QMP server speaking QEMU's wire protocol, so that ``qemu.qmp.QMPClient`` (or any QEMU tool)
drives the engine.

* On connect: the greeting ``{"QMP": {"version": ..., "capabilities": ["oob"]}}``.
* Until ``qmp_capabilities`` only that command is accepted (``CommandNotFound``, "Expecting
  capabilities negotiation with 'qmp_capabilities'"); afterwards it is refused ("Capabilities
  negotiation is already complete, command ignored").
* Input is a stream of JSON objects (no framing needed); every reply echoes the request's ``id``;
  errors are ``{"error": {"class", "desc"}}`` with QEMU's texts for malformed requests.
* Events (``{"event", "data", "timestamp": {"seconds", "microseconds"}}``) go to every negotiated
  client.  Lines end with ``\\r\\n`` as QEMU writes them.
* File descriptors sent with SCM_RIGHTS (``QMPClient.send_fd_scm``) are kept for the next
  ``getfd``, as QEMU's monitor does.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import re
import socket
import threading
from typing import Any

from qevm.engine.core import COMMANDS, Engine, QMPError, check_args
from qevm.errors import UsageError

__all__ = ["QMPServer", "parse_qmp_address"]

log = logging.getLogger(__name__)
_WORD = re.compile(r"[A-Za-z_][\w-]*")
_ALLOWED_KEYS = {"execute", "exec-oob", "arguments", "id", "control"}


def parse_qmp_address(spec: str) -> tuple[int, Any]:
    """``unix:PATH[,server=on,wait=off]`` or ``tcp:HOST:PORT[,...]`` -> (family, address)."""
    base = spec.split(",", 1)[0]
    scheme, sep, rest = base.partition(":")
    if sep and scheme == "unix" and rest:
        return socket.AF_UNIX, rest
    if sep and scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return socket.AF_INET, (host.strip("[]") or "127.0.0.1", int(port))
    if not sep and spec.startswith("/"):
        return socket.AF_UNIX, spec
    raise UsageError(f"QMP address {spec!r}: use unix:PATH or tcp:HOST:PORT")


class QMPServer:
    def __init__(self, engine: Engine, address: str) -> None:
        self.engine = engine
        self.family, self.addr = parse_qmp_address(address)
        self.sock = socket.socket(self.family, socket.SOCK_STREAM)
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.addr)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(self.addr)
        self.sock.listen(4)
        self.monitors: list[_Monitor] = []
        self._lock = threading.Lock()
        self._closed = False
        engine.listeners.append(self._event)
        self._thread = threading.Thread(target=self._accept_loop, name="qmp-accept", daemon=True)

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def start(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            mon = _Monitor(self, conn)
            with self._lock:
                self.monitors.append(mon)
            threading.Thread(target=mon.run, name="qmp-monitor", daemon=True).start()

    def _event(self, name: str, msg: dict[str, Any]) -> None:
        with self._lock:
            mons = list(self.monitors)
        for mon in mons:
            if mon.negotiated:
                mon.send(msg)

    def remove(self, mon: _Monitor) -> None:
        with self._lock:
            if mon in self.monitors:
                self.monitors.remove(mon)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            mons = list(self.monitors)
        for mon in mons:
            mon.close()
        if self.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(self.addr)


class _Monitor:
    def __init__(self, server: QMPServer, conn: socket.socket) -> None:
        self.server = server
        self.engine = server.engine
        self.conn = conn
        self.negotiated = False
        self.oob = False
        self._wlock = threading.Lock()
        self.fds: list[int] = []
        self._alive = True

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\r\n"
        with self._wlock:
            if not self._alive:
                return
            try:
                self.conn.sendall(data)
            except OSError:
                self._alive = False

    def close(self) -> None:
        self._alive = False
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            self.send({"QMP": {"version": self.engine.version, "capabilities": ["oob"]}})
            buf = ""
            dec = json.JSONDecoder()
            while self._alive:
                data = self._recv()
                if not data:
                    break
                buf += data.decode("utf-8", "replace")
                while True:
                    buf = buf.lstrip(" \t\r\n")
                    if not buf:
                        break
                    try:
                        obj, end = dec.raw_decode(buf)
                    except json.JSONDecodeError as e:
                        nl = buf.find("\n", e.pos)
                        if nl < 0:
                            break  # maybe incomplete: wait for more input
                        m = _WORD.match(buf, e.pos)
                        desc = (f"JSON parse error, invalid keyword '{m.group(0)}'" if m
                                else f"JSON parse error, {e.msg.lower()}")
                        self.send({"error": {"class": "GenericError", "desc": desc}})
                        buf = buf[nl + 1:]
                        continue
                    buf = buf[end:]
                    self._handle(obj)
        finally:
            self._alive = False
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                self.conn.close()
            self.server.remove(self)

    def _recv(self) -> bytes:
        if self.server.family != socket.AF_UNIX:
            try:
                return self.conn.recv(65536)
            except OSError:
                return b""
        fds = array.array("i")
        try:
            data, anc, _flags, _addr = self.conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        except OSError:
            return b""
        for level, typ, cdata in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(cdata[:len(cdata) - (len(cdata) % fds.itemsize)])
        if fds:  # a newer descriptor replaces one that no getfd claimed
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fds = list(fds)
        return data

    def _handle(self, req: Any) -> None:
        if not isinstance(req, dict):
            self.send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        rid = req.get("id")
        reply: dict[str, Any]
        try:
            reply = {"return": self._dispatch(req)}
        except QMPError as e:
            reply = {"error": {"class": e.cls, "desc": e.desc}}
        except Exception as e:  # noqa: BLE001 - a bug must not kill the monitor; report it like QEMU would
            log.exception("QMP command failed")
            reply = {"error": {"class": "GenericError", "desc": f"{type(e).__name__}: {e}"}}
        if "id" in req:
            reply["id"] = rid
        self.send(reply)

    def _dispatch(self, req: dict[str, Any]) -> Any:
        for k in req:
            if k not in _ALLOWED_KEYS:
                raise QMPError(f"QMP input member '{k}' is unexpected")
        oob = "exec-oob" in req
        if oob and "execute" in req:
            raise QMPError("QMP input must not have both 'execute' and 'exec-oob'")
        name = req.get("exec-oob" if oob else "execute")
        if name is None:
            raise QMPError("QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QMPError(f"QMP input member '{'exec-oob' if oob else 'execute'}' must be a string")
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            raise QMPError("QMP input member 'arguments' must be an object")
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            for k in args:
                if k != "enable":
                    raise QMPError(f"Parameter '{k}' is unexpected")
            for cap in args.get("enable", []):
                if cap != "oob":
                    raise QMPError(f"Parameter 'enable' does not accept value '{cap}'")
            self.oob = "oob" in args.get("enable", [])
            self.negotiated = True
            return {}
        if name == "qmp_capabilities":
            raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        if oob:
            raise QMPError(f"The command {name} does not support OOB")
        if name == "getfd":
            return self._getfd(args)
        return self.engine.execute(name, args)

    def _getfd(self, args: dict[str, Any]) -> Any:
        check_args(args, COMMANDS["getfd"][1])
        name = args["fdname"]
        if not self.fds:
            raise QMPError("No file descriptor supplied via SCM_RIGHTS")
        if name[:1].isdigit():
            raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
        fd = self.fds.pop()
        for other in self.fds:
            with contextlib.suppress(OSError):
                os.close(other)
        self.fds = []
        self.engine.fds.add(name, fd)
        return {}
