"""The engine's byte channels.  Outgoing channels and URI parsing come from ``qevm.transport``; this
module adds what the engine needs on top of it:

* ``fd:NAME`` with descriptors handed over by QMP ``getfd`` (SCM_RIGHTS), as QEMU's monitor keeps them;
* the *incoming* side of every scheme: ``tcp:``/``unix:`` (listen, accept one connection, with a
  return path), ``exec:CMD`` (``/bin/sh -c CMD``, the stream read from its standard output),
  ``fd:N|NAME`` and ``file:PATH[,offset=N]`` (read from byte N);
* ``abort()`` on every channel, so that ``migrate_cancel`` and ``quit`` can wake a thread blocked in
  a send or a receive.

(``qevm.transport`` only has outgoing exec/fd/file channels; the incoming readers here are small and
could move there.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import threading
from typing import Any

from qevm.errors import UsageError
from qevm.migration.channels import (
    Channel,
    Listener,
    MigrationURI,
    SocketChannel,
    TransportError,
    open_sink,
    parse_uri,
)

__all__ = ["FdTable", "resolve_uri", "open_outgoing", "abort_channel", "IncomingSource", "open_incoming",
           "INCOMING_SCHEMES"]

INCOMING_SCHEMES = ("tcp", "unix", "exec", "fd", "file")
OUTGOING_SCHEMES = ("tcp", "unix", "exec", "fd", "file")


class FdTable:
    """Descriptors received with SCM_RIGHTS and named by ``getfd`` (QEMU's monitor fd list)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.named: dict[str, int] = {}

    def add(self, name: str, fd: int) -> None:
        with self._lock:
            old = self.named.pop(name, None)
            self.named[name] = fd
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)

    def close(self, name: str) -> bool:
        with self._lock:
            fd = self.named.pop(name, None)
        if fd is None:
            return False
        with contextlib.suppress(OSError):
            os.close(fd)
        return True

    def take(self, name: str) -> int | None:
        """Remove and return a named fd (QEMU's monitor_get_fd: the migration owns it afterwards)."""
        with self._lock:
            return self.named.pop(name, None)

    def close_all(self) -> None:
        with self._lock:
            fds = list(self.named.values())
            self.named.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def resolve_uri(uri: str, fds: FdTable, allowed: tuple[str, ...]) -> tuple[MigrationURI, bool]:
    """Parse ``uri``; ``fd:NAME`` becomes ``fd:N`` with the named descriptor (taken from the table).
    Returns (uri, owns_fd): whether the channel must close the descriptor."""
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "fd" and rest and not rest.isdigit():
        fd = fds.take(rest)
        if fd is None:
            raise UsageError(f"File descriptor named '{rest}' has not been found")
        return MigrationURI("fd", fd=fd), True
    return parse_uri(uri, allowed), False


def open_outgoing(uri: str, fds: FdTable, timeout: float = 30.0) -> Channel:
    u, owns = resolve_uri(uri, fds, OUTGOING_SCHEMES)
    try:
        ch = open_sink(u, timeout)
    except Exception:
        if owns:
            with contextlib.suppress(OSError):
                os.close(u.fd)
        raise
    if isinstance(ch, SocketChannel):
        ch.settimeout(None)
    if owns:
        ch_any: Any = ch
        if isinstance(ch, SocketChannel):
            with contextlib.suppress(OSError):
                os.close(u.fd)  # the channel holds a dup
        else:
            ch_any.owns = True
    return ch


def abort_channel(ch: Channel) -> None:
    """Wake up whatever blocks on ``ch`` and make further use fail."""
    if isinstance(ch, SocketChannel):
        ch.shutdown()
        return
    abort = getattr(ch, "abort", None)
    if callable(abort):
        with contextlib.suppress(Exception):
            abort()


# -- incoming ------------------------------------------------------------------------------------------------

class IncomingSource:
    """Where an incoming stream comes from.  ``connect()`` blocks until the stream can be read (a
    connection was accepted, the command started...); then ``recv_into`` (0 = end of stream),
    ``send`` (return path, sockets only), ``close``; ``abort`` from any thread."""

    def __init__(self, uri: MigrationURI) -> None:
        self.uri = uri
        self.listener: Listener | None = None
        self.sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None
        self._aborted = threading.Event()
        self._lock = threading.Lock()

    @property
    def has_return_path(self) -> bool:
        return self.sock is not None

    def socket_address(self) -> list[dict[str, Any]] | None:
        """query-migrate's ``socket-address`` while listening."""
        if self.listener is None or self.listener.sock is None:
            return None
        if self.uri.scheme == "unix":
            return [{"type": "unix", "path": self.uri.path}]
        host, port = self.listener.sock.getsockname()[:2]
        fam = self.listener.sock.family
        return [{"type": "inet", "host": host, "port": str(port),
                 "ipv6" if fam == socket.AF_INET6 else "ipv4": True}]

    def listen(self) -> None:
        """Open the listening socket / file / command now (errors go back to the QMP caller)."""
        u = self.uri
        if u.scheme in ("tcp", "unix"):
            self.listener = Listener(u)
        elif u.scheme == "file":
            try:
                self.fd = os.open(u.path, os.O_RDONLY)
            except OSError as e:
                raise UsageError(f"Failed to open file: {u.path}: {e.strerror}") from None
            if u.offset:
                os.lseek(self.fd, u.offset, os.SEEK_SET)
        elif u.scheme == "fd":
            try:
                st = os.fstat(u.fd)
            except OSError:
                raise UsageError(f"{u}: file descriptor {u.fd} is not open") from None
            if stat.S_ISSOCK(st.st_mode):
                self.sock = socket.socket(fileno=u.fd)
            else:
                self.fd = u.fd
        elif u.scheme == "exec":
            try:
                self.proc = subprocess.Popen(["/bin/sh", "-c", u.command], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, bufsize=0)
            except OSError as e:
                raise UsageError(f"{u}: cannot run the command: {e.strerror}") from None
            assert self.proc.stdout is not None
            self.fd = self.proc.stdout.fileno()
        else:  # pragma: no cover - parse_uri limits the schemes
            raise UsageError(f"unknown migration protocol: {u}")

    def connect(self) -> None:
        if self.listener is not None:
            while not self._aborted.is_set():
                try:
                    ch = self.listener.accept(0.5)
                except TransportError:
                    continue  # accept slice timed out
                except OSError as e:
                    if self._aborted.is_set():
                        break
                    raise TransportError(f"accept on {self.listener.address} failed: {e}") from None
                with self._lock:
                    self.sock = ch.sock
                self.listener.close()
                self.listener = None
                return
            raise TransportError("incoming migration aborted while waiting for a connection")

    def recv_into(self, view: memoryview) -> int:
        if self._aborted.is_set():
            raise TransportError("incoming migration aborted")
        try:
            if self.sock is not None:
                return self.sock.recv_into(view)
            assert self.fd is not None
            return os.readv(self.fd, [view])
        except OSError as e:
            if self._aborted.is_set():
                raise TransportError("incoming migration aborted") from None
            raise TransportError(f"{self.uri}: read failed: {e.strerror or e}") from None

    def send(self, data: bytes) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def abort(self) -> None:
        self._aborted.set()
        with self._lock:
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        if self.listener is not None:
            self.listener.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.proc is not None:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if self.proc.poll() is None:
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.fd = None
        elif self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def open_incoming(uri: str, fds: FdTable) -> IncomingSource:
    u, _owns = resolve_uri(uri, fds, INCOMING_SCHEMES)
    src = IncomingSource(u)
    src.listen()
    return src
