"""``qevm dump --format analyze-migration``: the text QEMU's ``scripts/analyze-migration.py`` prints.

``render(an)`` yields, chunk by chunk, exactly what ``analyze-migration.py -f STREAM`` writes to stdout
(``-m`` when a RAM image is passed as ``memory``), final newline included, for every stream that script
can read.  ``flavor`` picks the script: ``"10.0"`` (default, the newest QEMU) or ``"7.2"`` (Debian
bookworm's, whose patch reads 16/32/64-bit words unsigned).  The two print the same stream differently
in one place: 7.2 keys arrays on ``"index"`` (always a list, an element without index overwrites),
10.0 merges every field of the same name (a lone element stays a scalar, repeats become a list).

The document is built from qevm's decoded model (section table, ``Struct`` trees, block list, the RAM
image), not by re-reading the stream the way the script does.  ``peer_problems()`` lists the reasons
the script would stop with a traceback on a stream (an empty list means it prints, and prints what
``render`` yields); ``render(..., problems=[])`` collects the same list while rendering.

Differences from analyze-migration.py
-------------------------------------
Where the script prints, the output is identical, its mistakes included, because this format exists to
be compared with it.  qevm's own format (``qevm dump``) does not inherit them:

* Integers: every ``int*`` type and, wrongly, ``uint8 equal``, ``uint16 equal`` and ``int64 equal`` are
  shown signed (``"0xff (-1)"``); ``uint64 equal``, ``timer``, ``CPU_Double_U``, ``float64``,
  ``int32_as_uint16`` and target types (``cpsr``, ``fpr``, ...) only as hex bytes.  ``int32 le`` is read
  big-endian; that is right (``le`` means "less or equal" on load), only the script's class name
  (``VMSDFieldIntLE``) suggests otherwise.
* ``tmp``, ``vstruct``, ``qtailq``, ``qlist`` and ``gtree`` values are hex bytes, not decoded.
* Array shapes depend on the script version (above); 7.2 loses all but the last element when QEMU 10
  describes the last element of an indexed array without ``"index"``.
* A ``bool`` is true for any non-zero byte; a ZERO page's fill byte is read signed (``0xff`` prints as
  ``"Filled with 0x-1"``).
* Special live sections print ``""``; commands, the configuration record and the vmdesc print nothing.
* A section id used twice keeps its first position and shows the last section's contents.

Where the script stops with a traceback there is nothing to match; ``render`` still prints a whole
document in the script's style, and ``peer_problems`` says why the script fails:

* ``-m`` with any normal page: both scripts call ``ord()`` on an int (``TypeError``).  qevm prints the
  page as space-separated hex bytes, which is what the script means to print.  XBZRLE and compressed
  pages (the script raises, with or without ``-m``) print as the page content they produce.
* Streams the script cannot walk: commands (7.2: any; 10.0: other than an empty SWITCHOVER_START),
  configuration subsections (7.2 always; 10.0 when the vmdesc has no ``configuration``: e.g. ARM's and
  RISC-V's ``target-page-bits``), ``s390-storage_attributes`` (7.2; 10.0 on MORE/ERROR records),
  ``dirty-bitmap``/``block``/unknown live sections, MULTIFD_FLUSH (7.2), mapped-ram, postcopy block
  page sizes, x-ignore-shared block addresses (7.2), names longer than 127 bytes or not UTF-8.  Special
  live sections print ``""``; the RAM section prints the block sizes qevm parsed.
* NULL entries of pointer arrays that QEMU < 10.0 describes as ``"struct": {}`` (s390 ``css``): the
  script raises; qevm prints ``"nullptr"`` for the 0x30 marker and hex bytes for the element the
  description cannot explain.  A capability-typed device field prints as its string (10.0 cannot
  JSON-encode it).  Where 7.2 raises "internal index of data field unmatched" (QEMU 10's split arrays)
  the element is appended to the array.  A device section qevm could not decode (``--lenient``)
  prints its payload as hex bytes.
* Prediction limits: ``peer_problems`` assumes bytes after the vmdesc defeat the script's trailer
  search (it fails only if they hold a NUL byte) and cannot see RAM HOOK records.

``-m`` order: the script keys pages by ``"<block> (0x%016x)"`` in a dict, so a page keeps the position of
its first record and shows its last one.  ``OrderedRamImage`` (a ``RamImage`` to pass to ``read_stream``
and ``render``) records exactly that; with a plain ``RamImage`` pages come block by block in address
order (the same whenever the first pass sends every page, as QEMU's does) and a page whose bytes are
all equal prints as ``Filled with`` (right whenever the script can dump the stream at all: it then
holds ZERO pages only).
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterator
from typing import Any

from qevm.codec.types import codec_for
from qevm.codec.vmsd import NULL, Opaque, Struct, encode_struct
from qevm.errors import UsageError
from qevm.format.events import RamFlag, RamPage, Section
from qevm.format.memory import RamImage
from qevm.io.reader import Analysis, Device

__all__ = ["FLAVORS", "render", "peer_problems", "OrderedRamImage"]

FLAVORS = ("7.2", "10.0")

_INT, _UINT, _BOOL, _GENERIC, _STRUCT, _CAP, _NULL = "int", "uint", "bool", "generic", "struct", "cap", "null"

# How each script reads a vmdesc "type" (anything not listed: hex bytes of "size").
_READERS_72: dict[str, str] = {
    "bool": _BOOL,
    "int8": _INT, "int16": _INT, "int32": _INT, "int64": _INT,
    "int32 equal": _INT, "int32 le": _INT, "int64 equal": _INT, "uint8 equal": _INT, "uint16 equal": _INT,
    "uint8": _UINT, "uint16": _UINT, "uint32": _UINT, "uint64": _UINT, "uint32 equal": _UINT,
    "struct": _STRUCT,
}
_READERS_10: dict[str, str] = {**_READERS_72, "capability": _CAP, "nullptr": _NULL}

_SPECIAL = ("ram", "spapr/htab", "s390-storage_attributes")
_ENCODER = json.JSONEncoder(indent=4, separators=(",", ": "))
_VMDESC_WINDOW = 10 * 1024 * 1024  # the script looks for its JSON in the last 10 MiB
_GRAIN = 10  # OrderedRamImage tracks pages at 1 KiB granularity (the smallest target page)


def render(an: Analysis, *, memory: RamImage | None = None, flavor: str = "10.0",
           problems: list[str] | None = None) -> Iterator[str]:
    """Yield the text ``analyze-migration.py -f STREAM`` (``-m`` when ``memory`` is given) prints.

    ``memory`` is the image ``read_stream`` filled (an ``OrderedRamImage`` for the script's exact page
    order).  ``problems``, when given, receives the reasons the script itself would fail.
    """
    peer = _Peer(an, flavor, memory is not None, memory)  # checks the flavor before the first chunk
    return _chunks(peer, problems)


def _chunks(peer: _Peer, problems: list[str] | None) -> Iterator[str]:
    try:
        yield from peer.document()
    finally:
        if problems is not None:
            problems.extend(p for p in peer.problems if p not in problems)


def peer_problems(an: Analysis, *, memory: bool = False, flavor: str = "10.0") -> list[str]:
    """Why ``analyze-migration.py`` (``-m`` if ``memory``) would stop with a traceback on this stream.

    Empty when it prints, which is then exactly what ``render`` yields."""
    peer = _Peer(an, flavor, memory, None)
    for _ in peer.document():
        pass
    return peer.problems


class OrderedRamImage(RamImage):
    """A ``RamImage`` that also remembers what ``analyze-migration.py -m`` keys its page dump on: the
    stream order in which each page first appeared, and whether its last record was a ZERO fill."""

    def __init__(self, page_size: int, directory: str | None = None) -> None:
        super().__init__(page_size, directory)
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._seen: list[bytearray] = []
        self._filled: list[bytearray] = []
        self._fill_bytes: dict[tuple[int, int], int] = {}  # non-zero fill bytes only
        self._order_block = array("H")
        self._order_addr = array("Q")

    def apply(self, ev: RamPage) -> None:
        super().apply(ev)
        b = self._index.get(ev.block)
        if b is None:
            b = self._index[ev.block] = len(self._names)
            self._names.append(ev.block)
            self._seen.append(bytearray())
            self._filled.append(bytearray())
        i = ev.addr >> _GRAIN
        byte, bit = i >> 3, 1 << (i & 7)
        seen, filled = self._seen[b], self._filled[b]
        if byte >= len(seen):
            grow = bytes(byte + 1 - len(seen))
            seen += grow
            filled += grow
        if not seen[byte] & bit:
            seen[byte] |= bit
            self._order_block.append(b)
            self._order_addr.append(ev.addr)
        if ev.kind == RamFlag.ZERO:
            filled[byte] |= bit
            if ev.payload[0]:
                self._fill_bytes[(b, ev.addr)] = ev.payload[0]
            else:
                self._fill_bytes.pop((b, ev.addr), None)
        else:
            filled[byte] &= ~bit
            self._fill_bytes.pop((b, ev.addr), None)

    def first_seen(self) -> Iterator[tuple[str, int, int | None]]:
        """``(block, addr, fill)`` per page in order of first appearance; ``fill`` is the fill byte when
        the page's last record was a ZERO page, else None (the page holds data)."""
        for b, addr in zip(self._order_block, self._order_addr, strict=True):
            i = addr >> _GRAIN
            fill = None
            if self._filled[b][i >> 3] >> (i & 7) & 1:
                fill = self._fill_bytes.get((b, addr), 0)
            yield self._names[b], addr, fill


# ---------------------------------------------------------------------------------------------------


class _Peer:
    """One rendering (or dry run) of a stream the way one version of the script sees it."""

    def __init__(self, an: Analysis, flavor: str, want_memory: bool, image: RamImage | None) -> None:
        if flavor not in FLAVORS:
            raise UsageError(f"unknown analyze-migration flavor {flavor!r} (one of {', '.join(FLAVORS)})")
        self.an = an
        self.v10 = flavor == "10.0"
        self.readers = _READERS_10 if self.v10 else _READERS_72
        self.want_memory = want_memory
        self.image = image
        self.problems: list[str] = []
        self.classes = self._classes()

    def fail(self, why: str) -> None:
        if why not in self.problems:
            self.problems.append(why)

    # -- whole document ------------------------------------------------------------------------------
    def document(self) -> Iterator[str]:
        self._check_stream()
        sections = self._sections()
        if not sections:
            yield "{}\n"
            return
        sep = "{"
        for sec, dev in sections:
            key = f"{self._utf8(sec.idstr, 'section name')} ({sec.section_id})"
            yield f"{sep}\n    {_ENCODER.encode(key)}: "
            sep = ","
            if sec.handler == "ram":
                yield from self._ram(sec)
            else:
                yield _indent(_ENCODER.encode(self._value(sec, dev)), 1)
        yield "\n}\n"

    def _sections(self) -> list[tuple[Section, Device | None]]:
        """The script's section dict: by section id, at the first START/FULL, holding the last one."""
        devices: dict[int, Device] = {id(d.section): d for d in self.an.devices}
        table: dict[int, Section] = {}
        for st in self.an.order:
            if st.kinds and st.kinds[0] not in ("START", "FULL"):
                self.fail(f"{st.kinds[0]} for section id {st.section.section_id} before its START")
                continue
            table[st.section.section_id] = st.section
        return [(sec, devices.get(id(sec))) for sec in table.values()]

    def _classes(self) -> dict[tuple[Any, Any], str]:
        out: dict[tuple[Any, Any], str] = {("ram", 0): "ram", ("spapr/htab", 0): "spapr/htab"}
        if self.v10:
            out[("s390-storage_attributes", 0)] = "s390-storage_attributes"
        vm = self.an.vmdesc
        devs = vm.get("devices") if isinstance(vm, dict) else None
        for d in devs if isinstance(devs, list) else []:
            if isinstance(d, dict):
                try:
                    out[(d.get("name"), d.get("instance_id"))] = "device"
                except TypeError:
                    pass
        return out

    # -- global checks ---------------------------------------------------------------------------------
    def _check_stream(self) -> None:
        an = self.an
        vm = an.vmdesc
        if vm is None:
            self.fail("the stream has no vmdesc (No Debug Migration device found)")
        else:
            self._check_vmdesc(vm)
        conf = an.configuration
        if conf is not None:
            desc = vm.get("configuration") if isinstance(vm, dict) and self.v10 else None
            names = [s.name for s in conf.subsections]
            if desc:
                subs = desc.get("subsections", [])
                want = [str(sd.get("vmsd_name")) for sd in subs if isinstance(sd, dict)]
                if want != names:
                    self.fail(f"configuration subsections {names} do not match the vmdesc's {want}")
            else:
                if names:
                    self.fail(f"configuration subsection {names[0]!r} (the script reads only the machine "
                              "name: Unknown section type: 5)")
                if not conf.machine:
                    self.fail("empty machine name in the configuration record")
        for c in an.commands:
            if not self.v10:
                self.fail(f"command {c.name} (Unknown section type: 8)")
            elif c.cmd != 0x0B or c.data:
                self.fail(f"command {c.name} (Unknown QEMU_VM_COMMAND)")
        for st in an.order:
            sec = st.section
            raw = sec.idstr.encode("latin-1")
            if len(raw) > 127:
                self.fail(f"section name of {len(raw)} bytes (the script reads the length signed)")
            cls = self.classes.get((self._utf8(sec.idstr, "section name"), sec.instance_id))
            if cls is None:
                self.fail(f"no reader for section {sec.idstr!r} instance {sec.instance_id} (KeyError)")
                continue
            expected = sec.handler if sec.handler in _SPECIAL or sec.handler == "device" else None
            if cls != expected:
                self.fail(f"{sec.handler} section {sec.idstr!r} would be read as {cls}")
            need = {"ram": 4, "spapr/htab": 1, "s390-storage_attributes": 0}.get(cls)
            if need is not None and sec.version != need:
                self.fail(f"section {sec.idstr!r} version {sec.version} (the script wants {need})")
            if cls == "s390-storage_attributes":
                kinds = an.live_records.get(sec.section_id, {})
                for k in ("more", "error"):
                    if kinds.get(k):
                        self.fail(f"s390 storage attribute {k.upper()} record (Unknown flags)")

    def _check_vmdesc(self, vm: dict[str, Any]) -> None:
        if "page_size" not in vm:
            self.fail("vmdesc without page_size")
        devs = vm.get("devices")
        if not isinstance(devs, list):
            self.fail("vmdesc without a devices list")
        else:
            for d in devs:
                if not isinstance(d, dict) or "name" not in d or "instance_id" not in d:
                    self.fail("vmdesc device entry without name or instance_id")
                elif self.v10 and "fields" not in d:
                    self.fail(f"vmdesc entry {d['name']!r} has no fields")
        raw = self.an.vmdesc_raw
        if raw is not None:
            # The script takes the last NUL byte of the file's last 10 MiB and the first '{' after it.
            n = len(raw).to_bytes(4, "big")
            tail = n[n.rfind(0) + 1:] if 0 in n else n
            if 0x7B in tail:
                self.fail("the vmdesc length field holds a '{' byte (the script misplaces its JSON)")
            if len(raw) + 6 > _VMDESC_WINDOW:
                self.fail("vmdesc larger than the 10 MiB the script searches")
        if self.an.trailing:
            self.fail("bytes after the vmdesc (the script looks for its JSON after the last NUL byte)")

    # -- values ------------------------------------------------------------------------------------------
    def _value(self, sec: Section, dev: Device | None) -> Any:
        if sec.handler == "device":
            if dev is None or dev.struct is None:
                why = dev.error if dev is not None and dev.error else "no vmdesc entry"
                self.fail(f"device section {sec.idstr!r} not decoded: {why}")
                return dev.data.hex(" ") if dev is not None else ""
            return self._struct(dev.struct, sec.idstr)
        if sec.handler in ("spapr/htab", "s390-storage_attributes"):
            return ""
        # dirty-bitmap, block, unknown live sections: no class in the script (already reported)
        return ""

    def _struct(self, st: Struct, path: str) -> dict[Any, Any]:
        if "fields" not in st.desc:
            self.fail(f"{path}: a description without fields (the script cannot read it)")
        data: dict[Any, Any] = {}
        for f in st.fields:
            fd = f.desc
            name = fd.get("name")
            if name is None:
                self.fail(f"{path}: field without a name")
            fpath = f"{path}/{name}"
            if "array_len" in fd and isinstance(f.value, list):
                if not fd["array_len"]:
                    self.fail(f"{fpath}: array_len {fd['array_len']!r} (the script reads one element)")
                for i, v in enumerate(f.value):
                    self._merge(data, name, self._elem(fd, v, fpath), True, i, fpath)
            else:
                if "array_len" in fd:
                    self.fail(f"{fpath}: array_len {fd['array_len']!r}")
                self._merge(data, name, self._elem(fd, f.value, fpath), "index" in fd, fd.get("index"), fpath)
        for sub in st.subsections:
            name = self._utf8(sub.name, "subsection name")
            if not sub.body.desc:
                self.fail(f"{path}: empty description for subsection {name}")
            data[name] = self._struct(sub.body, f"{path}/{name}")
        return data

    def _merge(self, data: dict[Any, Any], name: Any, item: Any, indexed: bool, index: Any,
               path: str) -> None:
        try:
            hash(name)
        except TypeError:
            self.fail(f"{path}: field name {name!r} is not a string")
            name = json.dumps(name)
        if self.v10 or not indexed:
            if not self.v10 or name not in data:
                data[name] = item
            elif type(data[name]) is list:
                data[name].append(item)
            else:
                data[name] = [data[name], item]
            return
        cur = data.setdefault(name, [])
        if type(cur) is not list:
            self.fail(f"{path}: an indexed element after a single field of the same name")
            cur = data[name] = [cur]
        try:
            ok = len(cur) == int(index)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            self.fail(f"{path}: internal index of data field unmatched ({len(cur)}/{index})")
        cur.append(item)

    def _elem(self, fd: dict[str, Any], v: Any, path: str) -> Any:
        t = fd.get("type")
        try:
            kind = self.readers.get(t, _GENERIC)  # type: ignore[arg-type]
        except TypeError:
            kind = _GENERIC
        if kind == _STRUCT:
            if isinstance(v, Struct):
                if not isinstance(fd.get("struct"), dict):
                    self.fail(f"{path}: struct field without a struct description")
                return self._struct(v, path)
            self.fail(f"{path}: NULL pointer entry described as an empty struct")
            return "nullptr" if v is NULL else _raw(fd, v).hex(" ")
        if kind == _CAP:
            self.fail(f"{path}: a capability field (the script cannot JSON-encode it)")
            return str(v)
        raw = _raw(fd, v)
        if kind == _GENERIC:
            return raw.hex(" ")
        if kind == _NULL:
            if raw != b"0":
                self.fail(f"{path}: nullptr field holds {raw.hex()}")
            return "nullptr"
        if not raw:
            self.fail(f"{path}: {t} field of size 0")
            return "" if kind != _BOOL else False
        if kind == _BOOL:
            return raw[0] != 0
        width = 2 * len(raw)
        u = int.from_bytes(raw, "big")
        if kind == _INT:
            s = int.from_bytes(raw, "big", signed=True)
            if s < 0:
                return f"0x{u:0{width}x} ({s})"
        return f"0x{u:0{width}x}"

    # -- RAM ----------------------------------------------------------------------------------------------
    def _ram(self, sec: Section) -> Iterator[str]:
        an = self.an
        sizes: dict[str, str] = {}
        for name, b in an.blocks.items():
            raw = name.encode("latin-1")
            if len(raw) > 127:
                self.fail(f"RAM block name of {len(raw)} bytes (the script reads the length signed)")
            sizes[self._utf8(name, "RAM block name")] = f"0x{b.used_length:016x}"
            pages = b.pages
            if pages.get("xbzrle"):
                self.fail("XBZRLE pages (XBZRLE RAM compression is not supported yet)")
            if pages.get("compressed"):
                self.fail("compressed pages (Unknown RAM flags: 100)")
            if b.mapped is not None:
                self.fail("mapped-ram block layout")
            if b.page_size is not None:
                self.fail("postcopy block page sizes in the block list")
            if b.addr is not None and not (self.v10 and isinstance(an.vmdesc, dict)
                                           and an.vmdesc.get("configuration")):
                self.fail("x-ignore-shared block addresses in the block list")
            if self.want_memory and pages.get("normal"):
                self.fail("-m with normal pages (TypeError: ord() expected string of length 1)")
        if an.ram_flushes and not self.v10:
            self.fail("MULTIFD_FLUSH records (Unknown RAM flags: 200)")
        yield "{\n        \"section sizes\": " + _indent(_ENCODER.encode(sizes), 2)
        if self.want_memory:
            yield ",\n        \"memory\": "
            yield from self._memory()
        yield "\n    }"

    def _memory(self) -> Iterator[str]:
        image = self.image
        if image is None:
            yield "{}"
            return
        ps = self.an.page_size or image.page_size
        sep = "{"
        for block, addr, fill in self._pages(image, ps):
            if fill is None:
                value = image.read(block, addr, ps).hex(" ")
            else:
                value = _filled(fill - 256 if fill > 127 else fill)
            key = f"{self._utf8(block, 'RAM block name')} (0x{addr:016x})"
            yield f'{sep}\n            {_ENCODER.encode(key)}: "{value}"'
            sep = ","
        yield "{}" if sep == "{" else "\n        }"

    @staticmethod
    def _pages(image: RamImage, ps: int) -> Iterator[tuple[str, int, int | None]]:
        if isinstance(image, OrderedRamImage):
            yield from image.first_seen()
            return
        for block in image.blocks():
            for addr in image.sent_pages(block):
                data = image.read(block, addr, ps)
                yield block, addr, (data[0] if data.count(data[0]) == len(data) else None)

    def _utf8(self, s: str, what: str) -> str:
        """A latin-1 decoded stream string as the script decodes it (UTF-8)."""
        try:
            return s.encode("latin-1").decode("utf-8")
        except UnicodeError:
            self.fail(f"{what} {s!r} is not UTF-8")
            return s


def _raw(fd: dict[str, Any], v: Any) -> bytes:
    """The bytes one element occupied in the stream."""
    if v is NULL:
        return b"0"
    if isinstance(v, Opaque):
        return bytes(v.data)
    if isinstance(v, Struct):
        return encode_struct(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    size = fd.get("size", 0)
    return codec_for(str(fd.get("type")), size).encode(v, size)


def _filled(fill: int) -> str:
    """The script's ``'Filled with 0x%02x' % fill`` (a negative fill keeps its sign: ``0x-1``)."""
    return f"Filled with 0x{fill:02x}" if fill >= 0 else f"Filled with 0x-{-fill:x}"


def _indent(text: str, level: int) -> str:
    """Re-indent a JSON text encoded at level 0 (JSON strings never hold a raw newline)."""
    return text.replace("\n", "\n" + "    " * level)
