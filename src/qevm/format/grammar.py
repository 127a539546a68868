"""The stream's record grammar and each section's life, as tables (in the manner of h11's ``_state.py``).

Two machines, both data:

* ``RECORD_GRAMMAR``: where the parser stands in the stream (``Place``) and which records (``Token``: the
  top-level record types, and the commands that change the place) may come next, with the place each one
  leads to.  A token absent from a place's row is illegal there: ``RecordGrammar.after`` raises
  ``IllegalRecord``.  ``COMMAND_NEEDS`` lists the commands that need an earlier one.
* ``SECTION_LIFE``: the life of one section (one savevm entry, named by idstr and instance) through the
  section records: START -> PART* -> END for a live section, FULL alone for device state.  Each cell gives
  the next ``Life`` and, where QEMU's loader goes along with something no correct source writes (a PART
  after the section's END, a second START, ...), the name of that ``Oddity``.  ``Sections`` applies the
  table and resolves the section id of PART and END records the way QEMU's loader does.

What QEMU's loader (``qemu_loadvm_state_main`` in QEMU 7.2 ``migration/savevm.c``) does, and therefore
what these tables encode:

* START and FULL both name the section by idstr and instance; the loader looks the entry up by that name,
  loads the payload with the entry's handler whatever the record type, and remembers the record's section id
  as the entry's current id.  A START for a section already started, a FULL for a live section, a FULL
  reusing another section's id: all load.
* PART and END name only a section id; the loader looks for an entry whose current id it is.  None: the
  load fails.  An entry that has ended: it loads again (a PART after END loads and the migration
  completes).  Two entries holding the id (one took it with a FULL): the loader takes the one the
  destination registered first, which the stream cannot tell; qevm refuses the record (with the 7.2 pc
  machine, a PART for ram's id after the timer's FULL took it goes to the timer and fails).
* A PACKAGED command carries a nested stream that the loader runs to its EOF or POSTCOPY_RUN; the rest of
  the blob is never read; a blob without either makes the nested loader read past its end and fail.
* PING needs the return path that OPEN_RETURN_PATH opens (QEMU refuses a PING before it; qevm reads on and
  reports the ``COMMAND_TOO_EARLY`` oddity).
* The footer after every payload repeats the entry's current id.
* EOF ends the records; after it the loader reads a vmdesc if one follows and ignores everything else.

Whether the destination *has* an entry with a given idstr is a property of the destination machine, not of
the stream: a section for a device the destination lacks is rejected by QEMU and accepted here, with the
``NOT_LIVE`` oddity when it came as a START of a name that is none of QEMU's live sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from qevm.errors import DecodeError
from qevm.format.records import Command, RecordType, SectionKind

__all__ = [
    "Place", "Token", "token", "RECORD_GRAMMAR", "PACKAGE_MAY_END_IN", "COMMAND_NEEDS", "RecordGrammar",
    "IllegalRecord", "Life", "Oddity", "SECTION_LIFE", "ODDITY_TEXT", "LIVE_SECTION_NAMES", "is_live_name",
    "Sections", "SectionEntry", "Resolved",
]


class IllegalRecord(DecodeError):
    """A record that QEMU's loader rejects at this point of the stream."""


# -- the record grammar ---------------------------------------------------------------------------------

class Place(Enum):
    """Where the parser stands between top-level records."""

    RECORDS = "among the records"  # the main run of sections and commands
    PACKAGED = "inside a PACKAGED blob"  # a nested stream (postcopy): the same records
    PACKAGE_DONE = "after the nested loader ended"  # EOF or POSTCOPY_RUN ended the blob: its rest is unread
    AFTER_EOF = "after EOF"  # a vmdesc may follow; anything else is trailing data
    AFTER_VMDESC = "after the vmdesc"  # the loader reads nothing more


class Token(Enum):
    """What moves the record machine: a top-level record type, or one of the commands that change the
    place (PACKAGED opens a nested stream, POSTCOPY_RUN ends every nested loader)."""

    START = RecordType.SECTION_START
    PART = RecordType.SECTION_PART
    END = RecordType.SECTION_END
    FULL = RecordType.SECTION_FULL
    COMMAND = RecordType.COMMAND
    EOF = RecordType.EOF
    VMDESC = RecordType.VMDESCRIPTION
    PACKAGED = 0x100 | Command.PACKAGED
    POSTCOPY_RUN = 0x100 | Command.POSTCOPY_RUN


_RECORDS = (Token.START, Token.PART, Token.END, Token.FULL, Token.COMMAND, Token.PACKAGED)

#: place -> {token that may come next -> the place it leads to}.  QEMU 7.2's loader runs a nested loader on
#: a PACKAGED blob: EOF or POSTCOPY_RUN ends it (the rest of the blob is never read), and a blob that ends
#: before either makes the nested loader read past its end and fail (``PACKAGE_MAY_END_IN``).  For the
#: PACKAGED token the cell is the place to come back to when the blob's bytes are all read; in between the
#: machine stands in ``Place.PACKAGED`` (``RecordGrammar.go`` keeps the stack).
RECORD_GRAMMAR: dict[Place, dict[Token, Place]] = {
    Place.RECORDS: {**{t: Place.RECORDS for t in _RECORDS}, Token.POSTCOPY_RUN: Place.RECORDS,
                    Token.EOF: Place.AFTER_EOF},
    Place.PACKAGED: {**{t: Place.PACKAGED for t in _RECORDS}, Token.POSTCOPY_RUN: Place.PACKAGE_DONE,
                     Token.EOF: Place.PACKAGE_DONE},
    Place.PACKAGE_DONE: {},
    Place.AFTER_EOF: {Token.VMDESC: Place.AFTER_VMDESC},
    Place.AFTER_VMDESC: {},
}

#: the places a PACKAGED blob may end in (its last byte read); ``PACKAGED``: the nested loader still wants more
PACKAGE_MAY_END_IN = frozenset((Place.PACKAGE_DONE,))

#: commands QEMU's loader refuses unless an earlier command came (7.2 ``loadvm_process_command``: a PING
#: answers on the return path, which OPEN_RETURN_PATH opens).  qevm reads such a stream and reports the
#: ``COMMAND_TOO_EARLY`` oddity: the refusal is the destination's (no return path), and analysis tools
#: must still read what such a stream holds.
COMMAND_NEEDS: dict[Command, Command] = {Command.PING: Command.OPEN_RETURN_PATH}


def token(rtype: int, cmd: int | None = None) -> Token | None:
    """The token of a record (``cmd``: the command number of a COMMAND record), None if unknown."""
    if cmd is not None and (cmd == Command.PACKAGED or cmd == Command.POSTCOPY_RUN):
        return Token(0x100 | cmd)
    try:
        return Token(rtype)
    except ValueError:
        return None


class RecordGrammar:
    """The record machine of one stream: ``after(token, offset)`` gives the next place or raises
    ``IllegalRecord``; ``go(place)`` moves there.  PACKAGED blobs nest."""

    __slots__ = ("place", "_stack", "commands")

    def __init__(self) -> None:
        self.place = Place.RECORDS
        self._stack: list[Place] = []
        self.commands: set[int] = set()  # command numbers seen

    def allows(self, rtype: int) -> bool:
        """May a record of this type come next (commands: any)?"""
        t = _BY_TYPE.get(rtype)
        return t is not None and t in RECORD_GRAMMAR[self.place]

    def after(self, rtype: int, offset: int, cmd: int | None = None) -> Place:
        """The place the record leads to from here; ``IllegalRecord`` if it may not come here.  Pure: the
        caller moves with ``go()`` once the whole record has been read."""
        t = token(rtype, cmd)
        nxt = RECORD_GRAMMAR[self.place].get(t) if t is not None else None
        if nxt is None:
            raise IllegalRecord(self._why(rtype, t), offset)
        return nxt

    def missing(self, cmd: int) -> Command | None:
        """The command that ``cmd`` needs and that has not come yet (``COMMAND_NEEDS``), if any."""
        need = COMMAND_NEEDS.get(cmd)  # type: ignore[call-overload]
        return need if need is not None and need not in self.commands else None

    def _why(self, rtype: int, t: Token | None) -> str:
        if t is None:
            return f"unknown top-level record type 0x{rtype:02x}"
        if self.place is Place.PACKAGE_DONE:
            return f"a {t.name} record in a PACKAGED blob after its nested loader ended"
        if self.place is Place.PACKAGED and t is Token.VMDESC:
            return "a vmdesc inside a PACKAGED blob"
        return f"record {RecordType(rtype).name} (0x{rtype:02x}) is not allowed {self.place.value}"

    def go(self, place: Place, cmd: int | None = None) -> None:
        self.place = place
        if cmd is not None:
            self.commands.add(cmd)
            if cmd == Command.PACKAGED:
                self._stack.append(place)
                self.place = Place.PACKAGED

    def leave_package(self, offset: int) -> None:
        """The PACKAGED blob's bytes are all read: back to the enclosing place, or ``IllegalRecord`` when its
        nested loader had not ended (QEMU reads past the blob and fails)."""
        if self.place not in PACKAGE_MAY_END_IN:
            raise IllegalRecord("the PACKAGED blob ends without EOF or POSTCOPY_RUN (QEMU's nested loader reads "
                                "past its end)", offset)
        self.place = self._stack.pop()

    def trailing(self) -> None:
        """Bytes after EOF that are not a vmdesc (or after the vmdesc): the loader never reads them."""
        self.place = Place.AFTER_VMDESC


_BY_TYPE: dict[int, Token] = {int(t.value): t for t in Token if t.value < 0x100}


# -- section lives --------------------------------------------------------------------------------------

class Life(Enum):
    """The life of one section (savevm entry) as the loader sees it."""

    NEW = "new"  # no record has named it yet
    LIVE = "live"  # started (START), not ended
    ENDED = "ended"  # END seen
    LOADED = "loaded"  # loaded whole by FULL


class Oddity(Enum):
    """Things QEMU's loader goes along with that no correct source writes (``qevm info`` warns)."""

    SECOND_START = "second-start"
    START_AFTER_END = "start-after-end"
    START_AFTER_FULL = "start-after-full"
    PART_AFTER_END = "part-after-end"
    END_AFTER_END = "end-after-end"
    PART_OF_FULL = "part-of-full"
    END_OF_FULL = "end-of-full"
    FULL_OF_LIVE = "full-of-live"
    SECOND_FULL = "second-full"
    NOT_LIVE = "not-live"
    EOF_IN_PACKAGE = "eof-in-package"
    COMMAND_TOO_EARLY = "command-too-early"
    ID_REUSED = "id-reused"
    ID_CHANGED = "id-changed"
    TRAILING = "trailing"


#: (life, record kind) -> (next life, oddity or None).  PART and END of a NEW section are absent: the loader
#: cannot find a section for their id (that case never reaches the table: ``Sections.resolve`` raises).
SECTION_LIFE: dict[tuple[Life, SectionKind], tuple[Life, Oddity | None]] = {
    (Life.NEW, SectionKind.START): (Life.LIVE, None),
    (Life.NEW, SectionKind.FULL): (Life.LOADED, None),
    (Life.LIVE, SectionKind.START): (Life.LIVE, Oddity.SECOND_START),
    (Life.LIVE, SectionKind.PART): (Life.LIVE, None),
    (Life.LIVE, SectionKind.END): (Life.ENDED, None),
    (Life.LIVE, SectionKind.FULL): (Life.LIVE, Oddity.FULL_OF_LIVE),
    (Life.ENDED, SectionKind.START): (Life.LIVE, Oddity.START_AFTER_END),
    (Life.ENDED, SectionKind.PART): (Life.ENDED, Oddity.PART_AFTER_END),
    (Life.ENDED, SectionKind.END): (Life.ENDED, Oddity.END_AFTER_END),
    (Life.ENDED, SectionKind.FULL): (Life.ENDED, Oddity.FULL_OF_LIVE),
    (Life.LOADED, SectionKind.START): (Life.LIVE, Oddity.START_AFTER_FULL),
    (Life.LOADED, SectionKind.PART): (Life.LOADED, Oddity.PART_OF_FULL),
    (Life.LOADED, SectionKind.END): (Life.LOADED, Oddity.END_OF_FULL),
    (Life.LOADED, SectionKind.FULL): (Life.LOADED, Oddity.SECOND_FULL),
}

ODDITY_TEXT: dict[Oddity, str] = {
    Oddity.SECOND_START: "a second START for a section already started",
    Oddity.START_AFTER_END: "a START for a section that has ended",
    Oddity.START_AFTER_FULL: "a START for a section already sent FULL",
    Oddity.PART_AFTER_END: "a PART after the section's END",
    Oddity.END_AFTER_END: "a second END for a section",
    Oddity.PART_OF_FULL: "a PART for a section sent FULL",
    Oddity.END_OF_FULL: "an END for a section sent FULL",
    Oddity.FULL_OF_LIVE: "a FULL for a live section (sources send it START/PART/END)",
    Oddity.SECOND_FULL: "a second FULL for a section",
    Oddity.NOT_LIVE: "a START for a name that is none of QEMU's live sections (a destination loads it only "
                     "if it registers that name)",
    Oddity.ID_REUSED: "a section id that another section holds",
    Oddity.ID_CHANGED: "a section that comes back under another section id",
    Oddity.COMMAND_TOO_EARLY: "a command before the one it needs (QEMU refuses a PING before OPEN_RETURN_PATH)",
    Oddity.EOF_IN_PACKAGE: "an EOF that ends a PACKAGED blob (sources end it with POSTCOPY_RUN)",
    Oddity.TRAILING: "bytes after the end of the stream (or of a PACKAGED blob) that QEMU's loader skips",
}

#: idstrs QEMU registers with iterative (live) handlers, in any release (migration/ram.c, migration/block.c,
#: migration/block-dirty-bitmap.c, hw/ppc/spapr.c, hw/s390x/s390-stattrib.c; VFIO devices end in "/vfio"
#: or are named "vfio")
LIVE_SECTION_NAMES = frozenset(("ram", "block", "dirty-bitmap", "spapr/htab", "s390-storage_attributes", "vfio"))


def is_live_name(idstr: str) -> bool:
    return idstr in LIVE_SECTION_NAMES or idstr.endswith("/vfio")


@dataclass(slots=True)
class SectionEntry:
    """One section as the loader tracks it: its name, its current section id, its life."""

    idstr: str
    instance_id: int
    section_id: int
    life: Life = Life.NEW
    records: int = 0


@dataclass(slots=True)
class Resolved:
    """What a section record does: the entry it loads and the oddities it shows."""

    entry: SectionEntry
    oddities: list[tuple[Oddity, str]] = field(default_factory=list)


class Sections:
    """The section table of one stream: entries by (idstr, instance), and which entries hold each id."""

    __slots__ = ("entries", "holders")

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], SectionEntry] = {}
        self.holders: dict[int, list[SectionEntry]] = {}  # id -> entries whose current id it is

    def holds(self, section_id: int) -> bool:
        """Does a section hold this id (so that a PART or END may name it)?"""
        return bool(self.holders.get(section_id))

    def open(self, kind: SectionKind, section_id: int, idstr: str, instance_id: int, offset: int) -> Resolved:
        """A START or FULL record: name the entry, move its life, take the id."""
        key = (idstr, instance_id)
        e = self.entries.get(key)
        odd: list[tuple[Oddity, str]] = []
        if e is None:
            e = self.entries[key] = SectionEntry(idstr, instance_id, section_id)
            self.holders.setdefault(section_id, []).append(e)
        elif e.section_id != section_id:
            if kind == SectionKind.FULL and e.life is Life.LOADED:
                # Two registrations under one name (QEMU 7.2 writes one FULL "slirp" instance 0 per user
                # netdev): the loader finds the first for both and the id moves; a correct source does this.
                self._take(e, section_id)
                e.records += 1
                return Resolved(e, [])
            odd.append((Oddity.ID_CHANGED, f"section {idstr!r} instance {instance_id} comes back as id "
                                           f"{section_id}, was {e.section_id}"))
            self._take(e, section_id)
        others = [o for o in self.holders[section_id] if o is not e]
        if others:
            o = others[0]
            odd.append((Oddity.ID_REUSED, f"section id {section_id} of {idstr!r} is also held by "
                                          f"{o.idstr!r} instance {o.instance_id}"))
        if kind == SectionKind.START and e.life is Life.NEW and not is_live_name(idstr):
            odd.append((Oddity.NOT_LIVE, f"START of {idstr!r}"))
        if kind == SectionKind.FULL and e.life is Life.NEW and is_live_name(idstr):
            odd.append((Oddity.FULL_OF_LIVE, f"FULL of {idstr!r}"))
        return self._move(e, kind, odd)

    def resolve(self, kind: SectionKind, section_id: int, offset: int) -> Resolved:
        """A PART or END record: the entry whose current id it names (the first to take it), or
        ``IllegalRecord`` when none does."""
        hs = self.holders.get(section_id)
        if not hs:
            raise IllegalRecord(f"{kind.name} for section id {section_id}, which no START or FULL has named "
                                "(QEMU: unknown savevm section)", offset)
        if len(hs) > 1:
            names = " and ".join(f"{e.idstr!r}" for e in hs)
            raise IllegalRecord(f"{kind.name} for section id {section_id}, which {names} both hold (QEMU loads "
                                "whichever the destination registered first)", offset)
        return self._move(hs[0], kind, [])

    def _move(self, e: SectionEntry, kind: SectionKind, odd: list[tuple[Oddity, str]]) -> Resolved:
        nxt, oddity = SECTION_LIFE[(e.life, kind)]
        if oddity is not None and not any(o is oddity for o, _ in odd):
            odd.append((oddity, f"{kind.name} of {e.idstr!r} (id {e.section_id}) while it is {e.life.value}"))
        e.life = nxt
        e.records += 1
        return Resolved(e, odd)

    def _take(self, e: SectionEntry, section_id: int) -> None:
        """The entry gives up its current id and holds ``section_id`` instead."""
        hs = self.holders.get(e.section_id)
        if hs is not None:
            hs[:] = [o for o in hs if o is not e]
        e.section_id = section_id
        self.holders.setdefault(section_id, []).append(e)
