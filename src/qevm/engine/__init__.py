"""A Python VM with QEMU's migration and snapshot machinery (``qevm vm``).

``machine``   the demo machine: RAM with dirty logging, a CPU thread running a deterministic
              workload, a 16550 UART printing ``tick N`` every 100 ms, QEMU's virtual clock;
              every piece of state described with ``qevm.vmstate``; the optional debug-migration
              device (its section carries the vmdesc: ``qevm.format.selfdesc``)
``states``    the migration status and run state lifecycles, as tables
``stream``    writing a stream: savevm phases, the RAM handler (dirty bitmap, zero pages, XBZRLE
              cache), the output buffer
``load``      loading a stream into the machine on the sans-I/O parser
``migration`` the outgoing migration thread (precopy, stop-and-copy, cancel, failure)
``incoming``  the destination side
``snapshots`` savevm / loadvm / delvm into a directory of stream files
``qcow2store`` savevm / loadvm / delvm into a qcow2 drive's internal snapshots (``--drive``)
``blockdev``  the disk (``--drive``, raw or qcow2) and its dirty bitmaps
``blockmig``  block migration (QEMU 7.2's ``block`` section) and dirty-bitmap migration
``parameters`` QEMU 10.0's (and 7.2's) migration parameters: types, defaults, checks, texts
``compress``  QEMU 7.2's compression threads (a zlib worker pool, COMPRESS_PAGE records)
``errors``    ``QMPError``
``hmp``       the human monitor commands
``core``      the engine and its QMP command set
``qmp``       the QMP server (QEMU's wire protocol)

Channels (every ``-incoming`` / ``migrate`` URI, ``getfd`` descriptors), the return-path responder
and reader, the rate limiter and the push parser come from ``qevm.migration``, shared with
``qevm record``, ``tap`` and ``send``.
"""

from __future__ import annotations

from qevm.engine.core import Engine, QMPError
from qevm.engine.machine import Machine
from qevm.engine.qmp import QMPServer
from qevm.engine.states import MigrationStatus, RunState

__all__ = ["Engine", "QMPError", "Machine", "QMPServer", "MigrationStatus", "RunState"]
