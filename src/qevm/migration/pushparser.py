"""The push side of the sans-I/O parser, as every live consumer drives it.

    pp = PushParser(on_event)                   # or a subclass overriding ``handle``
    view = pp.get_buffer(n); k = recv_into(view); del view
    for cmd in pp.buffer_updated(k): ...         # k == 0: the input ended (same as ``close()``)

Bytes go straight into the parser's own buffer; each event is handed to ``handle`` as soon as it
is decoded, and the stream's landmarks are kept: the section being read, EOF, the vmdesc, whether a
return path was opened or the stream went postcopy.  ``buffer_updated`` returns the commands met
(a destination answers some on the return path, see ``qevm.migration.returnpath``).

``StreamMonitor`` adds the ``qevm info`` summary and a page count (``record``, ``tap``, ``send``);
the engine's loader (``qevm.engine.load.StreamLoader``) applies the events to its machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qevm.analysis.document import info_document
from qevm.format.events import CommandEvent, EndOfFile, Event, RamTally, SectionHeader, VmDescription
from qevm.format.parser import DONE, NEED_DATA, Parser
from qevm.format.records import Command
from qevm.io.reader import Analysis

__all__ = ["PushParser", "StreamMonitor"]

_POSTCOPY = (Command.POSTCOPY_LISTEN, Command.POSTCOPY_RUN)
_LANDMARKS = frozenset({SectionHeader, CommandEvent, EndOfFile, VmDescription})


class PushParser:
    """A ``Parser`` fed by pushes; see the module docstring.  ``parser_args`` go to ``Parser``."""

    def __init__(self, on_event: Callable[[Event], None] | None = None, **parser_args: Any) -> None:
        self.parser = Parser(**parser_args)
        self._sink: Callable[[Event], None] = on_event if on_event is not None else self.handle
        self.section = ""
        self.eof = False
        self.vmdesc = False
        self.postcopy = False  # POSTCOPY_LISTEN/RUN seen: no vmdesc will follow the EOF
        self.return_path = False  # OPEN_RETURN_PATH seen
        self.done = False
        self._cmds: list[CommandEvent] = []

    def handle(self, ev: Event) -> None:
        """Called with every event, in stream order (override, or pass ``on_event``)."""

    @property
    def offset(self) -> int:
        return self.parser.offset

    @property
    def passes(self) -> int:
        return self.parser.passes.passes

    @property
    def complete(self) -> bool:
        """The stream reached its end: EOF record, and the vmdesc too if it had begun."""
        return self.done and self.eof

    def get_buffer(self, n: int) -> memoryview:
        return self.parser.get_buffer(n)

    def buffer_updated(self, k: int) -> list[CommandEvent]:
        if k == 0:
            return self.close()
        self.parser.buffer_updated(k)
        return self._drain()

    def feed(self, data: bytes | bytearray | memoryview) -> list[CommandEvent]:
        self.parser.feed(data)
        return self._drain()

    def close(self) -> list[CommandEvent]:
        self.parser.close()
        return self._drain()

    def take_commands(self) -> list[CommandEvent]:
        """The commands met since the last return (after an error interrupted a drain)."""
        cmds, self._cmds = self._cmds, []
        return cmds

    def _drain(self) -> list[CommandEvent]:
        next_event = self.parser.next_event
        handle = self._sink
        landmark = self._landmark
        while True:
            ev = next_event()
            if ev is NEED_DATA:
                return self.take_commands()
            if ev is DONE:
                self.done = True
                return self.take_commands()
            if type(ev) in _LANDMARKS:  # one set lookup per event: the page path stays short
                landmark(ev)  # type: ignore[arg-type]
            handle(ev)  # type: ignore[arg-type]

    def _landmark(self, ev: Event) -> None:
        if isinstance(ev, SectionHeader):
            self.section = f"{ev.section.idstr} {ev.kind.name}"
        elif isinstance(ev, CommandEvent):
            self._cmds.append(ev)
            if ev.cmd == Command.OPEN_RETURN_PATH:
                self.return_path = True
            elif ev.cmd in _POSTCOPY:
                self.postcopy = True
        elif isinstance(ev, EndOfFile):
            self.eof = True
            self.section = "EOF"
        elif isinstance(ev, VmDescription):
            self.vmdesc = True
            self.section = "vmdesc"


class StreamMonitor(PushParser):
    """A ``PushParser`` in counting mode that keeps an ``Analysis`` (the ``qevm info`` summary) and
    a live page count."""

    def __init__(self, **parser_args: Any) -> None:
        parser_args.setdefault("count_pages", True)
        parser_args.setdefault("keep_raw", False)
        super().__init__(**parser_args)
        self.analysis = Analysis(page_size=lambda: self.parser.page_size or 4096)
        self._handle = self.analysis.handle
        self.pages = 0

    def handle(self, ev: Event) -> None:
        self._handle(ev)
        if type(ev) is RamTally:
            for c in ev.counts.values():
                self.pages += c[0] + c[1] + c[2] + c[3]

    def document(self) -> dict[str, Any]:
        """The ``qevm info --json`` document of what was seen so far."""
        an = self.analysis
        an.size = self.parser.offset
        an.stream_page_size = self.parser.page_size
        an.decode_devices(strict=False)
        return info_document(an)
