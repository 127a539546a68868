"""Migration URIs and the byte channels behind them: the I/O edge of ``record``, ``tap`` and ``send``.

URIs are spelled and dispatched the way QEMU's ``migrate`` / ``-incoming`` spell them:

    tcp:HOST:PORT[,ipv4|,ipv6]    HOST may be empty (any address) or [IPv6]; PORT 0 = pick one (listen)
    unix:PATH                     a stream socket at PATH
    vsock:CID:PORT
    exec:COMMAND                  COMMAND run by /bin/sh -c: the stream goes to its standard input (outgoing)
                                  or is read from its standard output (incoming)
    fd:N | fd:NAME                an inherited (or QMP ``getfd``-named) descriptor; a socket there carries
                                  a return path
    file:PATH[,offset=N]          outgoing: PATH created/truncated 0600, the stream written from byte N;
                                  incoming: read from byte N

``rdma:`` is refused in one line; anything else fails with QEMU's own words: ``unknown migration
protocol: URI``.  Outgoing: ``open_outgoing``; incoming: ``open_incoming`` (the engine, ``record``
and ``tap`` use the same ones).  Nothing here knows the stream format; these objects only move
bytes, with timeouts, and raise ``TransportError`` with the address in the message when a peer is
missing, drops or stalls.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from qevm.errors import QevmError, UsageError

__all__ = ["TransportError", "MigrationURI", "parse_uri", "parse_size", "Channel", "SocketChannel", "FdChannel",
           "ExecChannel", "Listener", "listen", "connect", "FdTable", "resolve_uri", "open_outgoing", "Incoming",
           "open_incoming", "LISTEN_SCHEMES", "SEND_SCHEMES", "INCOMING_SCHEMES"]

#: the schemes a socket listens on / connects to
LISTEN_SCHEMES = ("tcp", "unix", "vsock")
#: QEMU's ``migrate URI`` and ``-incoming URI`` schemes (rdma: refused)
SEND_SCHEMES = ("tcp", "unix", "vsock", "exec", "fd", "file")
INCOMING_SCHEMES = SEND_SCHEMES


class TransportError(QevmError):
    """A connection could not be made, was dropped, stalled, or the peer failed."""


@dataclass(frozen=True)
class MigrationURI:
    """One parsed migration URI.  ``str()`` gives it back in canonical spelling."""

    scheme: str
    host: str = ""
    port: int = 0
    family: int = 0  # socket.AF_INET / AF_INET6 when ",ipv4" / ",ipv6" was given
    path: str = ""  # unix, file
    command: str = ""  # exec
    fd: int = -1  # fd
    offset: int = 0  # file
    cid: int = 0  # vsock

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if self.scheme == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        if self.scheme == "exec":
            return f"exec:{self.command}"
        if self.scheme == "fd":
            return f"fd:{self.fd}"
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")

    @property
    def is_socket(self) -> bool:
        return self.scheme in LISTEN_SCHEMES


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)\s*$", re.I)


def parse_size(text: str, what: str = "size") -> int:
    """A byte count as QEMU's size options take it: a number with an optional B/K/M/G/T/P/E suffix
    (powers of 1024); a fraction needs a suffix (``1.5M``)."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{what} {text!r} is not a size (a number with an optional K, M, G, T suffix)")
    num, unit = m.group(1), m.group(2).lower()
    scale = 1 << (10 * "bkmgtpe".index(unit)) if unit else 1
    if "." in num and scale == 1:
        raise UsageError(f"{what} {text!r}: a fraction needs a unit suffix")
    value = int(float(num) * scale) if "." in num else int(num) * scale
    if value >= 1 << 64:
        raise UsageError(f"{what} {text!r} is too large")
    return value


def _inet(rest: str, uri: str) -> tuple[str, int, int]:
    addr, _, opts = rest.partition(",")
    if addr.startswith("["):
        host, sep, tail = addr[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise UsageError(f"error parsing IPv6 address '{rest}'")
        port_s = tail[1:]
    else:
        host, sep, port_s = addr.partition(":")
        if not sep or ":" in port_s:
            raise UsageError(f"error parsing address '{rest}'")
    if not port_s:
        raise UsageError(f"error parsing address '{rest}': no port")
    if port_s.isdigit():
        port = int(port_s)
    else:
        try:
            port = socket.getservbyname(port_s, "tcp")
        except OSError:
            raise UsageError(f"error parsing port in address '{rest}'") from None
    if port > 65535:
        raise UsageError(f"port {port} in '{uri}' is out of range")
    family = 0
    for opt in filter(None, opts.split(",")):
        key, _, val = opt.partition("=")
        if key in ("ipv4", "ipv6") and val in ("", "on", "off"):
            if val != "off":
                family = socket.AF_INET if key == "ipv4" else socket.AF_INET6
        else:
            raise UsageError(f"tcp option {opt!r} in '{uri}' is not supported by qevm")
    return host, port, family


def parse_uri(uri: str, allowed: tuple[str, ...] = SEND_SCHEMES) -> MigrationURI:
    """Parse ``uri`` as QEMU dispatches it (prefix match on the scheme).  ``allowed`` limits the schemes
    the caller can use; others known to QEMU give a ``UsageError`` saying why."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in ("tcp", "unix", "vsock", "exec", "fd", "file", "rdma"):
        if uri == "defer":
            raise UsageError("'defer' only makes sense for QEMU's -incoming; give an address")
        raise UsageError(f"unknown migration protocol: {uri}")
    if scheme == "rdma":
        raise UsageError(f"{uri}: rdma migration is not supported by qevm")
    if scheme not in allowed:
        raise UsageError(f"{uri}: a {scheme}: URI cannot be used here; use one of "
                         + ", ".join(f"{s}:" for s in allowed))
    if scheme == "tcp":
        host, port, family = _inet(rest, uri)
        return MigrationURI("tcp", host=host, port=port, family=family)
    if scheme == "unix":
        if not rest:
            raise UsageError(f"invalid Unix socket address '{uri}'")
        return MigrationURI("unix", path=rest)
    if scheme == "vsock":
        m = re.fullmatch(r"(\d+):(\d+)", rest)
        if not m:
            raise UsageError(f"error parsing address '{rest}'")
        return MigrationURI("vsock", cid=int(m.group(1)), port=int(m.group(2)))
    if scheme == "exec":
        if not rest.strip():
            raise UsageError(f"'{uri}': exec: needs a command")
        return MigrationURI("exec", command=rest)
    if scheme == "fd":
        if not rest.isdigit():
            raise UsageError(f"'{uri}': fd: needs a file descriptor number (qevm has no monitor for named fds)")
        return MigrationURI("fd", fd=int(rest))
    path, marker, off = rest.partition(",offset=")
    if not path:
        raise UsageError(f"'{uri}': file: needs a path")
    try:
        offset = parse_size(off, "file URI offset") if marker else 0
    except UsageError:
        raise UsageError(f"file URI has bad offset {off}") from None
    return MigrationURI("file", path=path, offset=offset)


# ------------------------------------------------------------------------------------------- channels


class Channel:
    """A byte channel to or from a migration peer.  ``has_return_path``: bytes can flow both ways
    (a socket); a pipe, a file or a command carries the stream one way only."""

    name: str = "?"
    peer: str = "?"
    has_return_path: bool = False

    def fileno(self) -> int:
        raise NotImplementedError

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        raise TransportError(f"{self.name}: this channel cannot be written")

    def recv_into(self, view: memoryview, n: int = 0) -> int:
        """Read at most ``n`` (0: ``len(view)``) bytes; 0 at the end of the stream."""
        raise TransportError(f"{self.name}: this channel cannot be read")

    def readable(self, timeout: float | None) -> bool:
        """Whether ``recv_into`` would return at once (data or end of stream) within ``timeout``."""
        try:
            r, _, _ = select.select([self.fileno()], [], [], timeout)
        except (OSError, ValueError):
            return True  # closed under us: the next read says so
        return bool(r)

    def shutdown_write(self) -> None:
        """Tell the peer that no more bytes come (EOF), keeping the return path open."""

    def abort(self) -> None:
        """Wake up whatever blocks on this channel (any thread) and make further use fail."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SocketChannel(Channel):
    """A connected stream socket (tcp, unix, vsock or an inherited socket fd)."""

    has_return_path = True

    def __init__(self, sock: socket.socket, name: str, peer: str = "") -> None:
        self.sock = sock
        self.name = name
        self.peer = peer or name
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TransportError(f"{self.peer}: the peer stopped reading (send timed out)") from None
        except OSError as e:
            raise TransportError(f"{self.peer}: connection lost while sending: {e.strerror or e}") from e

    def recv_into(self, view: memoryview, n: int = 0) -> int:
        return self.sock.recv_into(view, n)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def shutdown(self) -> None:
        """Both directions: wakes up any thread blocked on this socket."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    abort = shutdown

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FdChannel(Channel):
    """A file descriptor read or written in one direction (pipe, file, character device)."""

    def __init__(self, fd: int, name: str, owns: bool = True) -> None:
        self.fd = fd
        self.name = self.peer = name
        self.owns = owns
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            raise TransportError(f"{self.name}: write failed: {e.strerror or e}") from e
        finally:
            view.release()

    def recv_into(self, view: memoryview, n: int = 0) -> int:
        if n and n < len(view):
            view = view[:n]
        try:
            return os.readv(self.fd, [view])
        except OSError as e:
            raise TransportError(f"{self.name}: read failed: {e.strerror or e}") from e

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.owns:
                with contextlib.suppress(OSError):
                    os.close(self.fd)


class ExecChannel(FdChannel):
    """``exec:COMMAND`` run by ``/bin/sh -c``: an outgoing stream goes to its standard input, an
    incoming one is read from its standard output.  Closing waits for the command (``timeout``)."""

    def __init__(self, command: str, timeout: float, incoming: bool = False) -> None:
        try:
            if incoming:
                self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, bufsize=0)
            else:
                self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL)
        except OSError as e:
            raise TransportError(f"exec:{command}: cannot run the command: {e.strerror}") from e
        pipe = self.proc.stdout if incoming else self.proc.stdin
        assert pipe is not None
        self.pipe = pipe
        super().__init__(pipe.fileno(), f"exec:{command}", owns=False)
        self.incoming = incoming
        self.timeout = timeout

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.pipe.close()
        try:
            rc = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            if self.incoming:
                return  # we have read what we wanted; a command that lingers is stopped
            raise TransportError(f"{self.name}: the command did not exit within {self.timeout:g}s") from None
        if rc != 0 and not self.incoming:
            raise TransportError(f"{self.name}: the command exited with status {rc}")

    def shutdown_write(self) -> None:
        if not self.incoming:
            with contextlib.suppress(OSError):
                self.pipe.close()  # the command sees the end of its input

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def kill(self) -> None:
        """Abort and reap the command without raising (error paths)."""
        self.abort()
        with contextlib.suppress(Exception):
            self.close()


def _family_and_addr(u: MigrationURI, passive: bool) -> list[tuple[int, Any]]:
    if u.scheme == "unix":
        return [(socket.AF_UNIX, u.path)]
    if u.scheme == "vsock":
        return [(socket.AF_VSOCK, (u.cid, u.port))]
    host = u.host or None
    try:
        infos = socket.getaddrinfo(host, u.port, u.family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as e:
        raise TransportError(f"address resolution failed for {u}: {e.strerror}") from e
    return [(fam, addr) for fam, _, _, _, addr in infos]


def connect(u: MigrationURI, timeout: float) -> SocketChannel:
    """Connect to a listening migration peer (tcp, unix, vsock)."""
    err: OSError | None = None
    for fam, addr in _family_and_addr(u, passive=False):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except OSError as e:
            s.close()
            err = e
            continue
        return SocketChannel(s, str(u), str(u))
    why = "timed out" if isinstance(err, TimeoutError) else (err.strerror if err and err.strerror else str(err))
    raise TransportError(f"Failed to connect to '{u}': {why}")


# --------------------------------------------------------------------------------- named descriptors


class FdTable:
    """Descriptors received with SCM_RIGHTS and named by QMP ``getfd`` (QEMU's monitor fd list)."""

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


def resolve_uri(uri: str | MigrationURI, fds: FdTable | None, allowed: tuple[str, ...]) -> tuple[MigrationURI, bool]:
    """Parse ``uri``; ``fd:NAME`` becomes ``fd:N`` with the descriptor named in ``fds`` (taken from the
    table).  Returns (uri, owns_fd): whether the channel must close the descriptor."""
    if isinstance(uri, MigrationURI):
        return uri, False
    scheme, sep, rest = uri.partition(":")
    if sep and scheme == "fd" and rest and not rest.isdigit() and fds is not None:
        fd = fds.take(rest)
        if fd is None:
            raise UsageError(f"File descriptor named '{rest}' has not been found")
        return MigrationURI("fd", fd=fd), True
    return parse_uri(uri, allowed), False


def _fd_channel(u: MigrationURI, owns: bool) -> Channel:
    try:
        st = os.fstat(u.fd)
    except OSError:
        raise UsageError(f"{u}: file descriptor {u.fd} is not open") from None
    if stat.S_ISSOCK(st.st_mode):
        s = socket.socket(fileno=u.fd if owns else os.dup(u.fd))
        return SocketChannel(s, str(u))
    return FdChannel(u.fd, str(u), owns=owns)


# ---------------------------------------------------------------------------------------- outgoing


def open_outgoing(uri: str | MigrationURI, *, fds: FdTable | None = None, timeout: float = 30.0) -> Channel:
    """A channel to send a stream to (QEMU's ``migrate URI``): a socket (with a return path), a
    command's standard input, an fd or a file (created/truncated 0600, written from its offset).
    A socket's send timeout is ``timeout``, like its connect."""
    u, owns = resolve_uri(uri, fds, SEND_SCHEMES)
    if u.is_socket:
        return connect(u, timeout)
    if u.scheme == "exec":
        return ExecChannel(u.command, timeout)
    if u.scheme == "fd":
        try:
            return _fd_channel(u, owns)
        except Exception:
            if owns:
                with contextlib.suppress(OSError):
                    os.close(u.fd)
            raise
    try:
        fd = os.open(u.path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    except OSError as e:
        raise UsageError(f"Failed to open file: {u.path}: {e.strerror}") from None
    if u.offset:
        os.lseek(fd, u.offset, os.SEEK_SET)
    return FdChannel(fd, str(u))


# ---------------------------------------------------------------------------------------- incoming


class Listener:
    """A listening socket for ``tcp:``, ``unix:`` or ``vsock:``.  ``address`` is the bound address
    (``tcp:127.0.0.1:40123`` when port 0 was asked for)."""

    def __init__(self, u: MigrationURI, backlog: int = 8) -> None:
        self.uri = u
        self._unlink: str | None = None
        err: OSError | None = None
        self.sock: socket.socket | None = None
        for fam, addr in _family_and_addr(u, passive=True):
            s = socket.socket(fam, socket.SOCK_STREAM)
            try:
                if fam == socket.AF_UNIX:
                    with contextlib.suppress(FileNotFoundError):
                        if stat.S_ISSOCK(os.lstat(addr).st_mode):
                            os.unlink(addr)  # a stale socket, as QEMU does
                else:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if fam == socket.AF_INET6 and not u.host:
                        with contextlib.suppress(OSError):
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(addr)
                s.listen(backlog)
            except OSError as e:
                s.close()
                err = e
                continue
            self.sock = s
            if fam == socket.AF_UNIX:
                self._unlink = addr
            break
        if self.sock is None:
            why = err.strerror if err and err.strerror else str(err)
            raise TransportError(f"Failed to listen on '{u}': {why}")
        if u.scheme == "tcp":
            host, port = self.sock.getsockname()[:2]
            self.address = str(MigrationURI("tcp", host=u.host or host, port=port))
        else:
            self.address = str(u)

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def socket_address(self) -> list[dict[str, Any]] | None:
        """query-migrate's ``socket-address`` while listening."""
        if self.sock is None:
            return None
        u = self.uri
        if u.scheme == "unix":
            return [{"type": "unix", "path": u.path}]
        if u.scheme == "vsock":
            return [{"type": "vsock", "cid": str(u.cid), "port": str(u.port)}]
        host, port = self.sock.getsockname()[:2]
        return [{"type": "inet", "host": host, "port": str(port),
                 "ipv6" if self.sock.family == socket.AF_INET6 else "ipv4": True}]

    def _take(self, sock: socket.socket) -> SocketChannel:
        s, addr = sock.accept()
        s.settimeout(None)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else self.address
        return SocketChannel(s, self.address, peer)

    def accept(self, timeout: float | None, stop: threading.Event | None = None) -> SocketChannel:
        """Wait for a connection (``timeout`` None = forever; ``stop`` set = give up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # short slices, so that Ctrl-C and ``stop`` are seen promptly
            if stop is not None and stop.is_set():
                raise TransportError(f"stopped while waiting for a connection on {self.address}")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError(f"no connection on {self.address} within {timeout:g}s")
            sock = self.sock
            if sock is None:
                raise TransportError(f"{self.address}: the listening socket was closed")
            try:
                r, _, _ = select.select([sock], [], [], 0.2 if left is None else min(left, 0.2))
                if r:
                    return self._take(sock)
            except (BlockingIOError, InterruptedError):
                continue
            except (OSError, ValueError) as e:
                if stop is not None and stop.is_set():
                    continue
                raise TransportError(f"accept on {self.address} failed: {e}") from e

    def poll_accept(self) -> SocketChannel | None:
        """A pending connection, or None without waiting."""
        sock = self.sock
        if sock is None:
            return None
        r, _, _ = select.select([sock], [], [], 0)
        if not r:
            return None
        try:
            return self._take(sock)
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        if self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def listen(u: MigrationURI | str) -> Listener:
    if isinstance(u, str):
        u = parse_uri(u, LISTEN_SCHEMES)
    if not u.is_socket:
        raise UsageError(f"cannot listen on {u}: use tcp:HOST:PORT, unix:PATH or vsock:CID:PORT")
    return Listener(u)


class Incoming:
    """Where an incoming stream comes from (QEMU's ``-incoming URI``).  ``open_incoming`` opens it
    at once (listening socket, file, command, fd), so that errors reach the caller; ``accept()``
    blocks until the stream can be read (for a socket: a connection came); ``channel`` then reads
    it (and answers on the return path when it is a socket).  ``abort()`` from any thread."""

    def __init__(self, u: MigrationURI, owns_fd: bool = False, exec_timeout: float = 5.0) -> None:
        self.uri = u
        self.listener: Listener | None = None
        self.channel: Channel | None = None
        self.extra: list[Channel] = []  # further connections (accept_extra)
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        if u.is_socket:
            self.listener = Listener(u)
        elif u.scheme == "file":
            try:
                fd = os.open(u.path, os.O_RDONLY)
            except OSError as e:
                raise UsageError(f"Failed to open file: {u.path}: {e.strerror}") from None
            if u.offset:
                os.lseek(fd, u.offset, os.SEEK_SET)
            self.channel = FdChannel(fd, str(u))
        elif u.scheme == "fd":
            self.channel = _fd_channel(u, owns_fd)
        elif u.scheme == "exec":
            self.channel = ExecChannel(u.command, exec_timeout, incoming=True)
        else:  # pragma: no cover - parse_uri limits the schemes
            raise UsageError(f"unknown migration protocol: {u}")

    @property
    def address(self) -> str:
        """Where the stream is taken from (the bound address when listening)."""
        return self.listener.address if self.listener is not None else str(self.uri)

    @property
    def has_return_path(self) -> bool:
        return self.channel is not None and self.channel.has_return_path

    def socket_address(self) -> list[dict[str, Any]] | None:
        return self.listener.socket_address() if self.listener is not None and self.channel is None else None

    def accept(self, timeout: float | None = None, *, keep_listening: bool = False) -> Channel:
        """The channel the stream comes on; for a socket, wait for the connection (``timeout``
        None: until one comes or ``abort()``).  ``keep_listening``: leave the listener open (to see
        further connections, e.g. multifd channels)."""
        if self.channel is not None:
            return self.channel
        assert self.listener is not None
        ch = self._wait_connection(self.listener, timeout)
        with self._lock:
            self.channel = ch
        if not keep_listening:
            self.listener.close()
            self.listener = None
        return ch

    def accept_extra(self, timeout: float | None = None) -> SocketChannel:
        """A further connection on the listener that ``accept(keep_listening=True)`` left open
        (multifd channels); ``abort()`` and ``close()`` cover it too."""
        if self.listener is None:
            raise TransportError(f"{self.address}: not listening for further connections")
        ch = self._wait_connection(self.listener, timeout)
        with self._lock:
            self.extra.append(ch)
        return ch

    def _wait_connection(self, listener: Listener, timeout: float | None) -> SocketChannel:
        try:
            return listener.accept(timeout, self._aborted)
        except TransportError:
            if self._aborted.is_set():
                raise TransportError("incoming migration aborted while waiting for a connection") from None
            raise

    def set_main(self, ch: Channel) -> None:
        """Make ``ch`` (one of the accepted connections) the one the stream is read from."""
        with self._lock:
            if ch is not self.channel:
                if self.channel is not None:
                    self.extra.append(self.channel)
                self.extra = [c for c in self.extra if c is not ch]
                self.channel = ch

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def abort(self) -> None:
        self._aborted.set()
        with self._lock:
            if self.channel is not None:
                self.channel.abort()
            for c in self.extra:
                c.abort()
        if self.listener is not None:
            self.listener.close()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.channel is not None:
            self.channel.close()
        for c in self.extra:
            c.close()


def open_incoming(uri: str | MigrationURI, fds: FdTable | None = None) -> Incoming:
    """Open the source of an incoming stream: every scheme QEMU's ``-incoming`` takes."""
    u, owns = resolve_uri(uri, fds, INCOMING_SCHEMES)
    return Incoming(u, owns)
