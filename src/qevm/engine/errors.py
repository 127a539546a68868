"""The engine's monitor error (its other errors live next to what raises them: ``IllegalTransition``
in ``states``, ``LoadError`` in ``load``, ``Cancelled`` in ``stream``)."""

from __future__ import annotations

from qevm.errors import QevmError

__all__ = ["QMPError"]


class QMPError(QevmError):
    """A command failed: QMP's ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc
