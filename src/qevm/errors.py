"""The qevm error tree.

``QevmError`` is the root.  Input errors (the bytes are wrong) are ``DecodeError``
and its subclasses; they carry the absolute byte offset and the section/field path.
Caller errors (usage, schema, state) are separate classes so that a CLI can tell
"your file is broken" from "you asked for something impossible".
"""

from __future__ import annotations

__all__ = [
    "QevmError",
    "DecodeError",
    "TruncatedError",
    "EncodeError",
    "SchemaError",
    "UsageError",
    "InvalidOperation",
]


class QevmError(Exception):
    """Root of every error qevm raises on purpose."""


class DecodeError(QevmError):
    """The input is malformed.  ``offset`` is absolute within the stream."""

    def __init__(self, msg: str, offset: int | None = None, path: str = "") -> None:
        super().__init__(msg)
        self.msg = msg
        self.offset = offset
        self.path = path

    def at(self, path: str) -> DecodeError:
        """Prefix ``path`` to the error's path (used while unwinding nested decoders)."""
        self.path = f"{path}/{self.path}" if self.path else path
        return self

    def __str__(self) -> str:
        where = []
        if self.offset is not None:
            where.append(f"offset {self.offset} (0x{self.offset:x})")
        if self.path:
            where.append(self.path)
        return f"{', '.join(where)}: {self.msg}" if where else self.msg


class TruncatedError(DecodeError):
    """The input ended in the middle of a record."""


class EncodeError(QevmError):
    """A model value cannot be encoded (out of range, wrong size, wrong type)."""


class SchemaError(QevmError):
    """A vmdesc/schema is unusable (not JSON, wrong shape)."""


class UsageError(QevmError):
    """The caller asked for something that cannot be done."""


class InvalidOperation(UsageError, ValueError):
    """A call the object's state does not allow: ``feed()`` after ``close()``, I/O on a closed file,
    a seek before the start.  Also a ``ValueError``, as Python's file protocol has it."""
