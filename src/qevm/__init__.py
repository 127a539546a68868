"""qevm: read, rewrite and edit QEMU's VM-state stream (savevm snapshots, live migration).

The library front: everything a program needs to look into a stream or change it.

``open_input(path, snapshot=None) -> Input``
    Open a stream file, ``-`` (standard input), a gzip/xz/bzip2/zstd-compressed stream, a qcow2
    image's internal snapshot or a libvirt save image.  Functions below take a path or an ``Input``.
``iter_events(source) -> Iterator[Event]``
    Every record of the stream, lazily, as lossless events (``qevm.format.events``).
``read_stream(source) -> Analysis``
    The whole stream read in one pass: sections with their sizes, RAM page counts per block,
    device state decoded into named fields with the vmdesc the stream carries.
``dump_document(analysis)`` / ``info_document(analysis)``
    The JSON documents ``qevm dump`` and ``qevm info --json`` print.
``rewrite(source, out_path) -> RewriteResult``
    Write the stream again (byte-identical when nothing is edited), to a temporary name renamed
    into place when complete.
``edit(source, out_path, {"SECTION[:INSTANCE]/FIELD": value}) -> RewriteResult``
    Rewrite with device fields set (paths as ``qevm edit --set`` takes them); ``Edit``,
    ``PageEdit`` and ``parse_path`` for finer control.
``QevmError``
    Root of every error qevm raises on purpose; ``DecodeError`` (malformed input, with the byte
    offset and field path), ``UsageError`` (a request that cannot be done), ``EncodeError``,
    ``SchemaError``.

Names are loaded on first use, so ``import qevm.errors`` (or any leaf module) stays cheap.
The layers below the front are described in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing would cost every ``import qevm.x`` ~5 ms

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from qevm.analysis.document import dump_document, info_document
    from qevm.codec.paths import FieldPath, parse_path
    from qevm.errors import DecodeError, EncodeError, QevmError, SchemaError, TruncatedError, UsageError
    from qevm.io.base import Input
    from qevm.io.reader import Analysis, iter_events, read_stream
    from qevm.io.sources import open_input
    from qevm.io.writer import Edit, PageEdit, RewriteResult, rewrite

__all__ = [
    "__version__",
    # opening and reading
    "open_input",
    "Input",
    "iter_events",
    "read_stream",
    "Analysis",
    "dump_document",
    "info_document",
    # writing
    "rewrite",
    "edit",
    "Edit",
    "PageEdit",
    "RewriteResult",
    "parse_path",
    "FieldPath",
    # errors
    "QevmError",
    "DecodeError",
    "TruncatedError",
    "EncodeError",
    "SchemaError",
    "UsageError",
]

#: where each lazily loaded name lives
_HOME = {
    "open_input": "qevm.io.sources",
    "Input": "qevm.io.base",
    "iter_events": "qevm.io.reader",
    "read_stream": "qevm.io.reader",
    "Analysis": "qevm.io.reader",
    "dump_document": "qevm.analysis.document",
    "info_document": "qevm.analysis.document",
    "rewrite": "qevm.io.writer",
    "Edit": "qevm.io.writer",
    "PageEdit": "qevm.io.writer",
    "RewriteResult": "qevm.io.writer",
    "parse_path": "qevm.codec.paths",
    "FieldPath": "qevm.codec.paths",
    "QevmError": "qevm.errors",
    "DecodeError": "qevm.errors",
    "TruncatedError": "qevm.errors",
    "EncodeError": "qevm.errors",
    "SchemaError": "qevm.errors",
    "UsageError": "qevm.errors",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'qevm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def edit(source: str | Input, out_path: str, fields: Mapping[str, Any], **options: Any) -> RewriteResult:
    """Rewrite ``source`` to ``out_path`` with device fields set.

    ``fields`` maps field paths (``SECTION[:INSTANCE]/FIELD[/FIELD...]``, as ``qevm edit --set``
    takes them) to values (a number, a ``0x`` string, a list for an array, hex for a buffer).
    ``options`` go to ``rewrite`` (``schema``, ``page_size``, ``snapshot``, ``page_edits``).
    Raises ``UsageError`` for a path that names no field of the stream."""
    from qevm.codec.paths import parse_path
    from qevm.io.writer import Edit, rewrite

    return rewrite(source, out_path, edits=[Edit(parse_path(p), v) for p, v in fields.items()], **options)
