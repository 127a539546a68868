"""The stream's record grammar and each section's life, as tables (in the manner of h11's ``_state.py``).

Two machines, both data:

* ``RECORD_GRAMMAR``: where the parser stands in the stream (``Place``) and which top-level record types
  (``RecordType``) may come next, with the place each one leads to.  A type absent from a place's row is
  illegal there: ``RecordGrammar.after`` raises ``IllegalRecord``.
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
  completes).
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
from qevm.format.records import RecordType, SectionKind

__all__ = [
    "Place", "RECORD_GRAMMAR", "RecordGrammar", "IllegalRecord", "Life", "Oddity", "SECTION_LIFE", "ODDITY_TEXT",
    "LIVE_SECTION_NAMES", "is_live_name", "Sections", "SectionEntry", "Resolved",
]


class IllegalRecord(DecodeError):
    """A record that QEMU's loader rejects at this point of the stream."""


# -- the record grammar ---------------------------------------------------------------------------------

class Place(Enum):
    """Where the parser stands between top-level records."""

    RECORDS = "records"  # the main run of sections and commands
    PACKAGED = "packaged"  # inside a MIG_CMD_PACKAGED blob (postcopy): the same records, no EOF
    AFTER_EOF = "after-eof"  # after EOF: a vmdesc may follow; anything else is trailing data
    AFTER_VMDESC = "after-vmdesc"  # after the vmdesc: the loader reads nothing more


_SECTION_RECORDS = (RecordType.SECTION_START, RecordType.SECTION_PART, RecordType.SECTION_END,
                    RecordType.SECTION_FULL, RecordType.COMMAND)

#: place -> {record type that may come next -> the place it leads to}
RECORD_GRAMMAR: dict[Place, dict[RecordType, Place]] = {
    Place.RECORDS: {**{t: Place.RECORDS for t in _SECTION_RECORDS}, RecordType.EOF: Place.AFTER_EOF},
    # QEMU runs a nested loader on the blob: EOF there would end the blob early, leaving its remaining bytes
    # unread; no source writes that and qevm rejects it (an EOF in a blob is a cut or corrupt package)
    Place.PACKAGED: {t: Place.PACKAGED for t in _SECTION_RECORDS},
    Place.AFTER_EOF: {RecordType.VMDESCRIPTION: Place.AFTER_VMDESC},
    Place.AFTER_VMDESC: {},
}


class RecordGrammar:
    """The record machine of one stream: ``after(type, offset)`` gives the next place or raises
    ``IllegalRecord``; ``go(place)`` moves there."""

    __slots__ = ("place", "_stack")

    def __init__(self) -> None:
        self.place = Place.RECORDS
        self._stack: list[Place] = []

    def allows(self, rtype: int) -> bool:
        return rtype in RECORD_GRAMMAR[self.place]

    def after(self, rtype: int, offset: int) -> Place:
        """The place a record of type ``rtype`` leads to from here; ``IllegalRecord`` if it may not come here.
        Pure: the caller moves with ``go()`` once the whole record has been read."""
        nxt: Place | None = RECORD_GRAMMAR[self.place].get(rtype)  # type: ignore[call-overload]  # int keys
        if nxt is None:
            raise IllegalRecord(self._why(rtype), offset)
        return nxt

    def go(self, place: Place) -> None:
        self.place = place

    def _why(self, rtype: int) -> str:
        try:
            name = RecordType(rtype).name
        except ValueError:
            return f"unknown top-level record type 0x{rtype:02x}"
        if self.place is Place.PACKAGED and rtype == RecordType.EOF:
            return "EOF inside a PACKAGED blob"
        return f"record {name} (0x{rtype:02x}) is not allowed {self.place.value.replace('-', ' ')}"

    def enter_package(self) -> None:
        self._stack.append(self.place)
        self.place = Place.PACKAGED

    def leave_package(self) -> None:
        self.place = self._stack.pop()

    def trailing(self) -> None:
        """Bytes after EOF that are not a vmdesc (or after the vmdesc): the loader never reads them."""
        self.place = Place.AFTER_VMDESC


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
    Oddity.TRAILING: "bytes after the end of the stream that QEMU's loader never reads",
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
        self.holders: dict[int, list[SectionEntry]] = {}  # id -> entries whose current id it is, first first

    def holds(self, section_id: int) -> bool:
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
            odd.append((Oddity.ID_CHANGED, f"section {idstr!r} instance {instance_id} comes back as id "
                                           f"{section_id}, was {e.section_id}"))
            self._release(e)
            e.section_id = section_id
            self.holders.setdefault(section_id, []).append(e)
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
        return self._move(hs[0], kind, [])

    def _move(self, e: SectionEntry, kind: SectionKind, odd: list[tuple[Oddity, str]]) -> Resolved:
        nxt, oddity = SECTION_LIFE[(e.life, kind)]
        if oddity is not None and not any(o is oddity for o, _ in odd):
            odd.append((oddity, f"{kind.name} of {e.idstr!r} (id {e.section_id}) while it is {e.life.value}"))
        e.life = nxt
        e.records += 1
        return Resolved(e, odd)

    def _release(self, e: SectionEntry) -> None:
        hs = self.holders.get(e.section_id)
        if hs is not None:
            hs[:] = [o for o in hs if o is not e]
