"""Ask a destination QEMU what it would expect: its ``-dump-vmstate`` and the stream it would itself save.

``probe(command, args)`` runs ``command args -dump-vmstate FILE``, then ``command args -S`` with a QMP
socket and migrates the paused machine to ``exec:cat > FILE``.  ``command`` may be a wrapper such as
``chroot DIR qemu-system-x86_64``: files then live under ``DIR/tmp`` and QEMU is given the paths as the
chroot sees them.  Everything runs in a private temporary directory removed by ``Probe.close()``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from qevm.errors import QevmError

__all__ = ["Probe", "ProbeError", "probe"]


class ProbeError(QevmError):
    pass


@dataclass
class Probe:
    dump: str
    stream: str
    workdir: str

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _chroot_of(command: list[str]) -> str | None:
    if len(command) >= 3 and os.path.basename(command[0]) == "chroot":
        return os.path.expanduser(command[1])
    return None


def _qmp(sock: socket.socket, buf: list[bytes], cmd: str, args: dict[str, Any] | None = None,
         timeout: float = 30.0) -> Any:
    msg: dict[str, Any] = {"execute": cmd}
    if args:
        msg["arguments"] = args
    sock.sendall(json.dumps(msg).encode() + b"\n")
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" not in buf[0]:
            if time.monotonic() > deadline:
                raise ProbeError(f"QMP {cmd}: no answer within {timeout:.0f}s")
            chunk = sock.recv(65536)
            if not chunk:
                raise ProbeError(f"QMP {cmd}: QEMU closed the connection")
            buf[0] += chunk
        line, _, buf[0] = buf[0].partition(b"\n")
        reply = json.loads(line)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise ProbeError(f"QMP {cmd}: {reply['error'].get('desc', reply['error'])}")


def probe(command: list[str], args: list[str], timeout: float = 120.0) -> Probe:
    """Run the destination QEMU twice (dump, then a paused save); return the two files."""
    if not command:
        raise ProbeError("--qemu: no QEMU command given")
    command = [os.path.expanduser(w) for w in command]
    root = _chroot_of(command)
    base = os.path.join(root, "tmp") if root else None
    work = tempfile.mkdtemp(prefix="qevm-probe-", dir=base)
    inner = (lambda p: "/" + os.path.relpath(p, root)) if root else (lambda p: p)
    dump, stream, sock_path, log = (os.path.join(work, n) for n in ("dump.json", "dest.mig", "qmp.sock", "qemu.log"))
    try:
        r = subprocess.run([*command, *args, "-dump-vmstate", inner(dump)], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0 or not os.path.exists(dump):
            raise ProbeError(f"{' '.join(command)} -dump-vmstate failed: {(r.stderr or r.stdout).strip()[-400:]}")
        argv = [*command, *args, "-S", "-display", "none", "-qmp", f"unix:{inner(sock_path)},server=on,wait=off"]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            _save(proc, sock_path, f"exec:cat > {inner(stream)}", timeout, log)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        return Probe(dump, stream, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _save(proc: subprocess.Popen[bytes], sock_path: str, uri: str, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX)
    try:
        while True:
            try:
                s.connect(sock_path)
                break
            except OSError:
                if proc.poll() is not None:
                    with open(log, errors="replace") as f:
                        raise ProbeError(f"the destination QEMU exited: {f.read()[-400:].strip()}") from None
                if time.monotonic() > deadline:
                    raise ProbeError("the destination QEMU did not open its QMP socket") from None
                time.sleep(0.05)
        s.settimeout(timeout)
        buf = [b""]
        while b"\n" not in buf[0]:
            buf[0] += s.recv(65536)
        buf[0] = buf[0].partition(b"\n")[2]  # the greeting
        _qmp(s, buf, "qmp_capabilities")
        _qmp(s, buf, "migrate", {"uri": uri})
        while True:
            st = _qmp(s, buf, "query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise ProbeError(f"saving the destination's state failed: {st.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise ProbeError("saving the destination's state did not complete in time")
            time.sleep(0.05)
        try:
            _qmp(s, buf, "quit", timeout=5)
        except ProbeError:
            pass
        proc.wait(15)
    finally:
        s.close()
