"""``qevm report``: what a stream holds, as data for one self-contained HTML page.

``collect`` reads a stream once and returns a JSON-able document: the summary (the ``info``
document), the section table, a RAM map per block and the decoded device tree with the path
``qevm edit`` takes for every field.  The RAM map is aggregated into cells of ``CELL_PAGES``
pages: how many times the pages of a cell were sent across the passes over memory (from the
parser's pass bitmaps, so the counting fast path keeps its speed) and, with ``pages=True``, how many
records of each kind (zero / data / XBZRLE / compressed) the cell received.  For two states the
differences are ``qevm diff``'s (``qevm.analysis.diff``, read in the order it reads them: the page
table -- file locations, verdicts against the other side, or digests -- is filled in the same pass
that gathers the RAM map, so each stream is still read once and RAM is never held);
``qevm.analysis.report_html`` renders the documents and that diff side by side.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from qevm.analysis.diff import PageTable, StateDiff, add_side_notes, diff_analyses, read_order, read_side
from qevm.analysis.document import info_document
from qevm.codec.vmsd import NULL, Field, Opaque, Struct, encode_struct
from qevm.errors import UsageError
from qevm.format.events import Event, PassTracker, RamPage, RamTally
from qevm.io.base import atomic_output
from qevm.io.reader import Analysis, read_stream
from qevm.io.sources import Input

__all__ = ["HeatTracker", "collect", "diff_view", "write_report", "device_rows", "CELL_PAGES", "DETAIL_LIMIT"]

#: pages per cell of the RAM map as gathered (display cells are whole multiples of it)
CELL_PAGES = 64
#: most cells one block shows (larger blocks use larger display cells)
MAX_CELLS = 1024
#: streams up to this size get the per-record kind map by default (it needs one event per page)
DETAIL_LIMIT = 1 << 30
#: field differences and RAM ranges per block the two-state page lists (``qevm diff --json`` has all)
MAX_DIFF_FIELDS = 5000
MAX_DIFF_RANGES = 500
_KINDS = ("normal", "zero", "xbzrle", "compressed")
_KIND_OF_FLAG = {0x08: 0, 0x02: 1, 0x40: 2, 0x100: 3}


class HeatTracker(PassTracker):
    """A pass tracker that, before each pass's bitmaps are cleared, adds them up per cell:
    ``sent[block][cell]`` is the number of page sends into that cell over all passes, and
    ``pass_pages[k]`` the pages sent in pass k+1."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, list[int]] = {}
        self.pass_pages: list[int] = []
        self.last_index = 0
        self._done = False

    def see(self, block: str, index: int) -> None:
        self.last_index = index
        PassTracker.see(self, block, index)

    def new_pass(self) -> None:
        if self.passes:
            self._flush()
        PassTracker.new_pass(self)

    def finish(self) -> None:
        if self.passes and not self._done:
            self._flush()
        self._done = True

    def _flush(self) -> None:
        total = 0
        step = CELL_PAGES // 8
        frombytes = int.from_bytes
        for name, bm in self.seen.items():
            n = (len(bm) + step - 1) // step
            cells = self.sent.setdefault(name, [])
            if len(cells) < n:
                cells.extend([0] * (n - len(cells)))
            for k in range(n):
                c = frombytes(bm[k * step:(k + 1) * step], "little").bit_count()
                if c:
                    cells[k] += c
                    total += c
        self.pass_pages.append(total)


class _RamWatch:
    """Event hook: wire bytes per pass (from RAM record offsets) and, per page, its kind per cell."""

    def __init__(self, tracker: HeatTracker, kinds: bool) -> None:
        self.tracker = tracker
        self.kinds: dict[str, list[list[int]]] | None = {} if kinds else None
        self.pass_bytes: list[int] = []
        self._pending: tuple[int, int] | None = None

    def __call__(self, ev: Event) -> None:
        off = getattr(ev, "offset", None)
        if self._pending is not None and isinstance(off, int):
            start, p = self._pending
            if p >= 1:
                while len(self.pass_bytes) < p:
                    self.pass_bytes.append(0)
                self.pass_bytes[p - 1] += off - start
            self._pending = None
        t = type(ev)
        if t is RamPage:
            assert isinstance(ev, RamPage)
            self._pending = (ev.offset, self.tracker.passes)
            if self.kinds is not None:
                k = _KIND_OF_FLAG.get(ev.kind)
                if k is not None:
                    per = self.kinds.get(ev.block)
                    if per is None:
                        per = self.kinds[ev.block] = [[], [], [], []]
                    cell = self.tracker.last_index // CELL_PAGES  # the page index Analysis just saw
                    lst = per[k]
                    if cell >= len(lst):
                        for x in per:
                            x.extend([0] * (cell + 1 - len(x)))
                    lst[cell] += 1
        elif t is RamTally:
            assert isinstance(ev, RamTally)
            self._pending = (ev.offset, ev.passes)


def _fold(values: list[int], n: int, factor: int) -> list[int]:
    out = [0] * ((n + factor - 1) // factor)
    for i, v in enumerate(values[:n]):
        out[i // factor] += v
    return out


def _ram(an: Analysis, tracker: HeatTracker, watch: _RamWatch, page_size: int) -> dict[str, Any]:
    blocks = []
    for b in an.blocks.values():
        pages = max(1, b.used_length // page_size)
        n = (pages + CELL_PAGES - 1) // CELL_PAGES
        factor = max(1, -(-n // MAX_CELLS))
        d: dict[str, Any] = {"name": b.name, "size": b.used_length, "pages": dict(b.pages), "npages": pages,
                             "cell_pages": CELL_PAGES * factor,
                             "sent": _fold(tracker.sent.get(b.name, []), n, factor)}
        if watch.kinds is not None:
            per = watch.kinds.get(b.name, [[], [], [], []])
            d["kinds"] = [_fold(x, n, factor) for x in per]
        blocks.append(d)
    return {"page_size": page_size, "passes": tracker.passes, "blocks": blocks,
            "pass_pages": tracker.pass_pages, "pass_bytes": watch.pass_bytes,
            "detail": watch.kinds is not None}


def collect(source: str | Input, *, pages: bool | None = None, name: str | None = None,
            **read_opts: Any) -> dict[str, Any]:
    """Read one stream and return the report document.

    ``pages``: gather the per-record kind map (one event per page; slower).  Default: on for
    inputs up to ``DETAIL_LIMIT`` bytes."""
    return _gather(source, pages, name, False, read_opts)[0]


def _detail(source: str | Input, pages: bool | None) -> bool:
    if pages is None:
        size = source.size if isinstance(source, Input) else (os.path.getsize(source) if source != "-" else None)
        return size is not None and size <= DETAIL_LIMIT
    return pages


def _gather(source: str | Input, pages: bool | None, name: str | None, ram_digests: bool,
            read_opts: dict[str, Any], locate: bool = False,
            against: PageTable | None = None) -> tuple[dict[str, Any], Analysis, PageTable | None]:
    """The report document, the analysis and, with ``ram_digests``, the page table ``qevm.analysis.diff``
    compares (filled in the same pass, so two states are still read once each; ``locate``, ``against``:
    as ``qevm.analysis.diff.read_side`` takes them, in the order ``read_order`` gives)."""
    pages = _detail(source, pages)
    made: list[tuple[HeatTracker, _RamWatch]] = []

    def hooks() -> tuple[_RamWatch, HeatTracker]:  # once per pass (an XBZRLE side is read twice)
        tracker = HeatTracker()
        made.append((tracker, _RamWatch(tracker, kinds=bool(pages))))
        return made[-1][1], tracker

    table: PageTable | None = None
    if ram_digests:
        an, table = read_side(source, ram=True, hooks=hooks, pages=bool(pages), locate=locate, against=against,
                              **read_opts)
    else:
        watch, tracker = hooks()
        an = read_stream(source, on_event=watch, pages=bool(pages), tracker=tracker, **read_opts)
    tracker, watch = made[-1]
    tracker.finish()
    ps = an.page_size or read_opts.get("page_size") or 4096
    info = info_document(an, read_opts.get("page_size"))
    sections = []
    decoded = {d.section.section_id: d for d in an.devices}
    for st in an.order:
        s = st.section
        d = decoded.get(s.section_id)
        sections.append({"id": s.section_id, "name": s.idstr, "instance": s.instance_id, "version": s.version,
                         "kind": "device" if s.handler == "device" else s.handler, "chunks": st.chunks,
                         "offset": st.offset, "size": st.size,
                         "decoded": d is not None and d.struct is not None})
    devices = []
    for d in an.devices:
        sec = d.section
        prefix = section_path(sec.idstr, sec.instance_id)
        entry: dict[str, Any] = {"section": sec.idstr, "instance": sec.instance_id, "path": prefix,
                                 "offset": d.offset, "size": len(d.data)}
        if d.struct is not None:
            entry["vmsd"] = d.struct.vmsd_name or sec.idstr
            entry["rows"] = list(device_rows(d.struct, prefix))
        else:
            entry["rows"] = [[prefix, "raw", _show_bytes(d.data), d.offset, len(d.data),
                              d.error or "no description for this section"]]
        devices.append(entry)
    summary = {k: info.get(k) for k in ("size", "machine", "page_size", "capabilities", "uuid", "qemu", "vmdesc",
                                         "vmdesc_size", "decoded_devices", "device_sections", "commands",
                                         "trailing_bytes")}
    return {"name": name or (source if isinstance(source, str) else "stream"), "summary": summary,
            "sections": sections, "ram": _ram(an, tracker, watch, ps), "devices": devices}, an, table


def section_path(idstr: str, instance: int) -> str:
    sec = f'"{idstr}"' if ("/" in idstr or ":" in idstr) else idstr
    return f"{sec}:{instance}"


# -- device tree ------------------------------------------------------------------------------------

def _show_bytes(b: bytes) -> str:
    if len(b) <= 64:
        return b.hex()
    if not any(b):
        return f"{len(b)} zero bytes"
    return f"{b[:48].hex()}… ({len(b)} bytes)"


def _show(v: Any) -> str:
    if v is NULL:
        return "NULL"
    if isinstance(v, Opaque):
        return f"opaque {_show_bytes(v.data)}"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v} (0x{v:x})" if v > 9 or v < 0 else str(v)
    if isinstance(v, bytes | bytearray):
        return _show_bytes(bytes(v))
    return str(v)


def _name(f: Field) -> str:
    idx = f.desc.get("index")
    return f.name if idx is None else f"{f.name}[{idx}]"


def device_rows(st: Struct, prefix: str) -> Iterator[list[Any]]:
    """``[path, type, value, offset, size, note]`` for each field; runs of identical trailing struct
    elements of long arrays fold into one row, long scalar arrays show as one row."""
    for f in st.fields:
        path = f"{prefix}/{_name(f)}"
        note = str(f.desc.get("note", ""))
        if f.desc.get("array_len") is not None:
            vals = f.value
            n = len(vals)
            if vals and isinstance(vals[0], Struct):
                last = n - 1
                if n > 8 and isinstance(vals[-1], Struct):
                    tail = encode_struct(vals[-1])
                    while last > 0 and isinstance(vals[last - 1], Struct) and encode_struct(vals[last - 1]) == tail:
                        last -= 1
                size = f.size // max(1, n)
                for i in range(last + 1):
                    v = vals[i]
                    if isinstance(v, Struct):
                        yield from device_rows(v, f"{path}[{i}]")
                    else:
                        yield [f"{path}[{i}]", f.type, _show(v), f.offset + i * size, size, note]
                if last < n - 1:
                    yield [f"{path}[{last + 1}..{n - 1}]", f.type, f"{n - 1 - last} more elements, each as "
                           f"{path}[{last}]", f.offset + (last + 1) * size, (n - 1 - last) * size, "folded"]
            else:
                shown = ", ".join(_show(v) for v in vals[:32]) + (f", … ({n} items)" if n > 32 else "")
                yield [path, f"{f.type}[{n}]", f"[{shown}]", f.offset, f.size, note]
        elif isinstance(f.value, Struct):
            yield [path, f.type, f"{f.value.vmsd_name or 'struct'} ({f.size} bytes)", f.offset, f.size, note]
            yield from device_rows(f.value, path)
        else:
            yield [path, f.type, _show(f.value), f.offset, f.size, note]
    for sub in st.subsections:
        yield [f"{prefix}/{sub.name}", "subsection", f"version {sub.version}", sub.offset, sub.size, ""]
        yield from device_rows(sub.body, f"{prefix}/{sub.name}")


# -- two states ---------------------------------------------------------------------------------------

def diff_view(res: StateDiff, max_fields: int = MAX_DIFF_FIELDS, max_ranges: int = MAX_DIFF_RANGES) -> dict[str, Any]:
    """``qevm diff``'s JSON document of two states, bounded for the page: at most ``max_fields`` field
    rows and ``max_ranges`` RAM ranges per block (the totals say how many there were)."""
    doc = res.as_json()
    total = left = sum(len(s["fields"]) for s in doc["sections"])
    for sec in doc["sections"]:
        keep = min(len(sec["fields"]), max(0, max_fields - (total - left)))
        left -= len(sec["fields"])
        sec["fields_total"] = len(sec["fields"])
        del sec["fields"][keep:]
    doc["fields_total"] = total
    if doc["ram"] is not None:
        for blk in doc["ram"]["blocks"]:
            blk["ranges_total"] = len(blk["ranges"])
            del blk["ranges"][max_ranges:]
    return doc


def write_report(sources: list[str], out_path: str, *, pages: bool | None = None, **read_opts: Any) -> dict[str, Any]:
    """Collect one or two streams and write the HTML page to ``out_path`` (temp name, then rename).

    Returns figures about the page: ``bytes``, ``fields`` (rows in the device tree), ``changed``."""
    from qevm.analysis.report_html import render

    if not 1 <= len(sources) <= 2:
        raise UsageError("report takes one stream, or two to compare")
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise UsageError(f"output directory {directory} does not exist")
    two = len(sources) == 2
    if two:  # read as ``qevm diff`` reads them (``read_order``): a plain file first, the other against it
        a, b = sources
        la, lb, b_first = read_order(a, b, pages_a=_detail(a, pages), pages_b=_detail(b, pages))
        if b_first:
            side_b = _gather(b, pages, b, True, read_opts, locate=lb)
            sides = [_gather(a, pages, a, True, read_opts, locate=la, against=side_b[2]), side_b]
        else:
            side_a = _gather(a, pages, a, True, read_opts, locate=la)
            sides = [side_a, _gather(b, pages, b, True, read_opts, locate=lb, against=side_a[2])]
    else:
        sides = [_gather(sources[0], pages, sources[0], False, read_opts)]
    docs = [side[0] for side in sides]
    diff = None
    if two:
        (_, an_a, ta), (_, an_b, tb) = sides
        res = diff_analyses(an_a, an_b, sources[0], sources[1], (ta, tb) if ta is not None and tb is not None else None)
        add_side_notes(res, ((an_a, sources[0]), (an_b, sources[1])))
        diff = diff_view(res)
    del sides
    page = render(docs, diff, version=_version()).encode("utf-8")
    with atomic_output(out_path) as out:
        out.write(page)
    return {"bytes": len(page), "fields": sum(len(dv["rows"]) for d in docs for dv in d["devices"]),
            "changed": diff["fields_total"] if diff else None, "equal": diff["equal"] if diff else None}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qevm")
    except Exception:  # noqa: BLE001 - not installed: no version to show
        return ""
