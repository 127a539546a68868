"""A fleet of saved VM states: one summary row per state, read on all local cores or on a Dask cluster.

``scan_file(path)`` opens one file the way every verb does (qcow2 images and libvirt save images
are sniffed; a qcow2 image gives one row per internal snapshot with a VM state), reads it to the
end and returns its rows: container, machine type, QEMU hints, devices with their section
versions, RAM size and pages by kind, vmdesc, and what went wrong (errors are data here: a
damaged file is a row with its error, never a crash).  With destination ``Side``s it also runs
``qevm compat``'s check on each state.

``scan(paths)`` runs ``scan_file`` once per file in a local process pool (default) or on a
``dask.distributed`` scheduler, and yields each file's result as it finishes.  Tasks carry only a
path: the workers open the files themselves.  A worker process that dies in the middle of a file
costs that file a retry (Dask's own rescheduling; in the local pool the files that were in flight
are retried one at a time, so the one that kills its worker is the one charged), not the scan.

``write_table`` writes the rows as Parquet (pyarrow), CSV or JSON by the output's suffix; dask and
pyarrow are imported only when used (the ``fleet`` extra).  ``summarize`` gives the counts the
CLI prints.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import glob
import importlib
import json
import logging
import multiprocessing
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from qevm.analysis.compat import CompatResult, Side, compat, side_from_stream
from qevm.analysis.document import info_document
from qevm.errors import DecodeError, QevmError, UsageError
from qevm.format.events import VmDescription
from qevm.io.base import atomic_output
from qevm.io.containers import QCOW2_MAGIC, Qcow2Image, Qcow2VmState, sniff
from qevm.io.reader import Analysis, read_stream
from qevm.io.sources import Input, open_input

__all__ = ["COLUMNS", "FLEET_EXTRA", "FileResult", "STATUSES", "expand_paths", "missing_extra", "scan",
           "scan_file", "sort_rows", "summarize", "write_table"]

FLEET_EXTRA = "pip install 'qevm[fleet]'"

#: status of a row: read to its end with every device decoded / the bytes are wrong somewhere /
#: not a VM state at all (or cannot be opened) / the reader itself failed (a bug, or a worker
#: that kept dying on this file)
STATUSES = ("ok", "damaged", "unreadable", "failed")

#: the table's columns and their types ("str", "int", "bool"); every row has every key
COLUMNS: tuple[tuple[str, str], ...] = (
    ("path", "str"),
    ("snapshot", "str"),  # qcow2: the internal snapshot's id and name
    ("file_bytes", "int"),
    ("container", "str"),  # stream | qcow2 | libvirt
    ("compression", "str"),  # gzip, xz, ... around the stream
    ("status", "str"),
    ("error", "str"),
    ("error_offset", "int"),
    ("stream_bytes", "int"),  # bytes of the stream read (up to the error for a damaged one)
    ("file_version", "int"),
    ("machine", "str"),
    ("page_size", "int"),
    ("capabilities", "str"),
    ("qemu_min", "str"),
    ("qemu_max", "str"),
    ("qemu_reasons", "str"),
    ("vmdesc", "bool"),
    ("vmdesc_bytes", "int"),
    ("device_sections", "int"),
    ("decoded_devices", "int"),
    ("device_errors", "int"),
    ("devices", "str"),  # "NAME vVERSION[ xCOUNT], ..." in stream order
    ("live_sections", "str"),
    ("ram_blocks", "int"),
    ("ram_bytes", "int"),
    ("pages_normal", "int"),
    ("pages_zero", "int"),
    ("pages_xbzrle", "int"),
    ("pages_compressed", "int"),
    ("ram_passes", "int"),
    ("trailing_bytes", "int"),
    ("compat", "str"),  # compatible | incompatible | not checked (with --compat-to)
    ("compat_breaks", "int"),
    ("compat_risks", "int"),
    ("breaking", "str"),  # the sections with a break finding, "; "-separated
    ("break_reasons", "str"),
)
_NAMES = tuple(n for n, _ in COLUMNS)

#: first bytes of the files a directory walk picks up (a qcow2 image only with snapshots)
_STATE_MAGIC = (b"QEVM", b"LibvirtQemudSave", b"LibvirtQemudPart", b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh",
                b"\x28\xb5\x2f\xfd")


# ---------------------------------------------------------------------------------------------- one file


def _row(path: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_NAMES)
    row["path"] = path
    return row


def scan_file(path: str, compat_to: list[Side] | None = None) -> list[dict[str, Any]]:
    """The rows of one file: one per VM state it holds (a qcow2 image: one per snapshot with a VM
    state).  Never raises for bad input: the error is in the row."""
    base = _row(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")  # a FIFO or device could block the worker
        base["file_bytes"] = st.st_size
        with open(path, "rb") as f:
            head = f.read(16)
        base["container"] = sniff(head) or "stream"
        if base["container"] == "qcow2":
            return _scan_qcow2(path, base, compat_to)
        row = _scan_input(lambda: open_input(path), base, compat_to)
        if row["status"] == "damaged" and row["file_version"] is None and not head.startswith(_STATE_MAGIC):
            row["status"] = "unreadable"  # not a VM state at all: no stream header, no known wrapper
        return [row]
    except Exception as e:  # noqa: BLE001 - a row with the error, whatever it was
        _fail(base, e)
        return [base]


def _scan_qcow2(path: str, base: dict[str, Any], compat_to: list[Side] | None) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        image = Qcow2Image(f, path)
        image.check_readable()
        snaps = [s for s in image.snapshots if s.vm_state_size]
        if not snaps:
            image.find_snapshot()  # raises the one-line reason (no snapshots / only disk-only ones)
    rows = []
    for s in snaps:
        row = dict(base)
        row["snapshot"] = f"{s.id} {s.name}"

        def opener(snap_id: str = s.id) -> Input:
            return Qcow2VmState.open(path, int(snap_id) if snap_id.isdigit() else snap_id).to_input(path)
        rows.append(_scan_input(opener, row, compat_to))
    return rows


def _scan_input(opener: Callable[[], Input], row: dict[str, Any], compat_to: list[Side] | None) -> dict[str, Any]:
    try:
        inp = opener()
    except Exception as e:  # noqa: BLE001
        _fail(row, e)
        return row
    partial = Analysis()  # sees the same events: what was read before an error
    try:
        row["compression"] = inp.compression
        try:
            an = read_stream(inp, on_event=lambda ev: None if type(ev) is VmDescription else partial.handle(ev),
                             pages=False, strict=False)
        except QevmError as e:
            _fail(row, e)
            an = partial
            an.size = row["error_offset"] if row["error_offset"] is not None else 0
        except Exception as e:  # noqa: BLE001
            _fail(row, e)
            return row
    finally:
        inp.close()
    _describe(row, an)
    if row["status"] is None:
        row["status"] = "damaged" if row["device_errors"] else "ok"
        if row["device_errors"]:
            first = next(d for d in an.devices if d.error)
            row["error"] = f"section {first.section.idstr!r}: {first.error}"
    if compat_to:
        row["compat"] = "not checked"  # a damaged state: its vmdesc and sections are not the whole story
        if row["status"] == "ok":
            try:
                _compat(row, compat(side_from_stream(str(row["path"]), an), compat_to))
            except QevmError as e:
                row["break_reasons"] = f"qevm compat: {e}"
    return row


def _fail(row: dict[str, Any], e: BaseException) -> None:
    if isinstance(e, DecodeError):
        row["status"] = "damaged"
        row["error_offset"] = e.offset
    elif isinstance(e, UsageError | OSError):
        row["status"] = "unreadable"
    else:
        row["status"] = "failed"
    msg = str(e) if isinstance(e, QevmError) else f"{type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.strerror:
        msg = f"cannot read: {e.strerror}"
    row["error"] = msg


def _describe(row: dict[str, Any], an: Analysis) -> None:
    doc = info_document(an)
    row["stream_bytes"] = an.size
    row["file_version"] = an.header.version if an.header else None
    row["machine"] = doc["machine"]
    row["page_size"] = doc["page_size"]
    row["capabilities"] = ", ".join(doc["capabilities"]) or None
    q = doc["qemu"]
    row["qemu_min"], row["qemu_max"] = q["min"], q["max"]
    row["qemu_reasons"] = "; ".join(q["reasons"]) or None
    row["vmdesc"] = bool(doc["vmdesc"])
    row["vmdesc_bytes"] = doc["vmdesc_size"]
    row["device_sections"] = doc["device_sections"]
    row["decoded_devices"] = doc["decoded_devices"]
    row["device_errors"] = sum(1 for d in an.devices if d.error)
    devices: Counter[str] = Counter()
    live: list[str] = []
    for s in doc["sections"]:
        if s["kind"] == "device":
            devices[f"{device_name(s['name'])} v{s['version']}"] += 1
        elif s["name"] not in live:
            live.append(s["name"])
    row["devices"] = ", ".join(k if n == 1 else f"{k} x{n}" for k, n in devices.items()) or None
    row["live_sections"] = ", ".join(live) or None
    ram = doc["ram"]
    row["ram_blocks"] = len(ram["blocks"]) if ram else 0
    row["ram_bytes"] = sum(b["size"] for b in ram["blocks"]) if ram else 0
    for kind in ("normal", "zero", "xbzrle", "compressed"):
        row[f"pages_{kind}"] = ram["pages"][kind] if ram else 0
    row["ram_passes"] = ram["passes"] if ram else 0
    row["trailing_bytes"] = doc["trailing_bytes"]


def device_name(idstr: str) -> str:
    """A section's device name without its bus address: ``0000:00:02.0/e1000e`` -> ``e1000e``."""
    return idstr.rsplit("/", 1)[-1]


def _compat(row: dict[str, Any], res: CompatResult) -> None:
    breaks = [f for f in res.findings if f.severity == "break"]
    row["compat"] = "compatible" if res.compatible else "incompatible"
    row["compat_breaks"] = len(breaks)
    row["compat_risks"] = res.count("risk")
    sections: list[str] = []
    for f in breaks:
        if f.section not in sections:
            sections.append(f.section)
    row["breaking"] = "; ".join(sections) or None
    row["break_reasons"] = "; ".join(f"{f.section}: {f.reason}" for f in breaks[:3]) or None


# ---------------------------------------------------------------------------------------------- paths


def expand_paths(specs: Iterable[str]) -> list[str]:
    """Files from PATH arguments: a file as given, a directory walked recursively (files that
    start like a VM state: a stream, a libvirt save image, a qcow2 image with snapshots, a
    compressed file), a glob (``*``, ``?``, ``[``, ``**``) expanded.  Sorted, each path once."""
    out: set[str] = set()
    for spec in specs:
        if os.path.isdir(spec):
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                for name in files:
                    p = os.path.join(root, name)
                    if _looks_like_state(p):
                        out.add(p)
        elif os.path.exists(spec) or not any(c in spec for c in "*?["):
            if not os.path.exists(spec):
                raise UsageError(f"{spec}: no such file or directory")
            out.add(spec)
        else:
            hits = glob.glob(spec, recursive=True)
            if not hits:
                raise UsageError(f"{spec}: no file matches")
            for h in hits:
                if os.path.isdir(h):
                    out.update(expand_paths([h]))
                elif os.path.isfile(h):
                    out.add(h)
    return sorted(out)


def _looks_like_state(path: str) -> bool:
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return True  # unreadable: let the scan say so in its row
    if head.startswith(QCOW2_MAGIC):
        return len(head) >= 64 and int.from_bytes(head[60:64], "big") > 0
    return head.startswith(_STATE_MAGIC)


# ---------------------------------------------------------------------------------------------- the fleet


@dataclass
class FileResult:
    path: str
    rows: list[dict[str, Any]]
    retries: int | None = 0  # worker deaths this file survived (None: the scheduler does not say)

    @property
    def failed(self) -> bool:
        return any(r["status"] != "ok" for r in self.rows)


TaskFn = Callable[[str, "list[Side] | None"], list[dict[str, Any]]]


def missing_extra(*modules: str) -> str | None:
    """The one-line install hint when one of ``modules`` cannot be imported, else None."""
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if not missing:
        return None
    return f"qevm scan needs {', '.join(missing)} for this (the 'fleet' extra): {FLEET_EXTRA}"


def scan(paths: list[str], *, compat_to: list[Side] | None = None, jobs: int | None = None,
         scheduler: str | None = None, task: TaskFn = scan_file, max_failures: int = 3) -> Iterator[FileResult]:
    """Scan every path (already expanded) and yield each file's result as it finishes.

    ``scheduler``: a ``dask.distributed`` scheduler address (``tcp://host:8786``); the workers
    must see the same paths.  Otherwise a local pool of ``jobs`` processes (default: all cores).
    A file whose worker dies ``max_failures`` times (on Dask: the scheduler's
    ``distributed.scheduler.allowed-failures`` + 1) becomes a ``failed`` row."""
    if scheduler is not None:
        yield from _scan_dask(paths, scheduler, compat_to, task)
    else:
        yield from _scan_local(paths, max(1, min(jobs or os.cpu_count() or 1, len(paths))), compat_to, task,
                               max_failures)


def _abs(paths: list[str]) -> dict[str, str]:
    return {os.path.abspath(p): p for p in paths}


def _died(path: str, times: int | None) -> list[dict[str, Any]]:
    row = _row(path)
    row["status"] = "failed"
    row["error"] = "the worker process died while reading it" + (f" ({times} times)" if times else
                                                                  " (Dask's allowed-failures ran out)")
    return [row]


def _relabel(rows: list[dict[str, Any]], shown: str) -> list[dict[str, Any]]:
    for r in rows:
        r["path"] = shown
    return rows


# -- local processes


_WORKER_CONTEXT: list[Side] | None = None


def _init_worker(compat_to: list[Side] | None) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = compat_to
    logging.getLogger("qevm").setLevel(logging.ERROR)  # warnings are in the rows; keep the terminal clean


def _run_local(task: TaskFn, path: str) -> list[dict[str, Any]]:
    return task(path, _WORKER_CONTEXT)


@dataclass
class _Job:
    path: str
    suspect: bool = False  # was in flight when a worker died: from then on it runs alone
    deaths: int = 0  # worker deaths while it ran alone (certainly its own)
    retries: int = 0


def _scan_local(paths: list[str], jobs: int, compat_to: list[Side] | None, task: TaskFn,
                max_failures: int) -> Iterator[FileResult]:
    shown = _abs(paths)
    queue = [_Job(p) for p in shown]
    queue.reverse()  # pop() from the end keeps the order
    ctx = multiprocessing.get_context("forkserver")

    def new_pool() -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(compat_to,))

    pool = new_pool()
    inflight: dict[cf.Future[list[dict[str, Any]]], _Job] = {}
    try:
        while queue or inflight:
            # a suspect runs alone, so a death while it runs is its own
            while queue and len(inflight) < jobs and not any(j.suspect for j in inflight.values()):
                if queue[-1].suspect and inflight:
                    break
                job = queue.pop()
                inflight[pool.submit(_run_local, task, job.path)] = job
                if job.suspect:
                    break
            done, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                job = inflight.pop(fut)
                try:
                    rows = fut.result()
                except cf.process.BrokenProcessPool:
                    broken = True
                    job.deaths += not inflight and job.suspect
                    if job.deaths >= max_failures:
                        yield FileResult(shown[job.path], _died(shown[job.path], job.deaths), job.retries)
                    else:
                        job.suspect = True
                        job.retries += 1
                        queue.append(job)
                    continue
                except Exception as e:  # noqa: BLE001 - the task itself raised: a row, not a crash
                    row = _row(job.path)
                    _fail(row, e)
                    rows = [row]
                yield FileResult(shown[job.path], _relabel(rows, shown[job.path]), job.retries)
            if broken:
                for job in inflight.values():  # the rest of the pool went down with it
                    job.suspect = True
                    job.retries += 1
                    queue.append(job)
                inflight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    except BaseException:  # interrupted, or the consumer stopped iterating: do not wait for running files
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    # all done: a waited shutdown also unregisters the pool's wakeup pipe, which CPython would
    # otherwise write to at interpreter exit (an ignored 'Bad file descriptor' traceback)
    pool.shutdown(wait=True)


# -- dask.distributed


def _scan_dask(paths: list[str], scheduler: str, compat_to: list[Side] | None, task: TaskFn) -> Iterator[FileResult]:
    hint = missing_extra("distributed")
    if hint:
        raise UsageError(hint)
    dd: Any = importlib.import_module("distributed")  # optional: typed as Any, with or without it installed

    shown = _abs(paths)
    try:
        client = dd.Client(scheduler, set_as_default=False)  # connect timeout: dask's config (30 s default)
    except (OSError, TimeoutError) as e:
        raise UsageError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    try:
        ctx = client.scatter(compat_to, broadcast=True) if compat_to else None
        keys = [f"qevm-scan-{i}-{os.path.basename(p)[:40]}" for i, p in enumerate(shown)]
        futures = client.map(task, list(shown), [ctx] * len(shown), key=keys, pure=False)
        by_key = {f.key: p for f, p in zip(futures, shown, strict=True)}
        # with_results: the client fetches finished results concurrently, not one round trip per file
        for fut, result in dd.as_completed(futures, loop=client.loop, with_results=True, raise_errors=False):
            path = by_key[fut.key]
            if fut.status == "error":
                exc = result[1]  # (type, exception, traceback)
                if type(exc).__name__ == "KilledWorker":  # the scheduler's allowed-failures (default 3) ran out
                    rows = _died(shown[path], None)
                else:
                    rows = [_row(path)]
                    _fail(rows[0], exc)
            else:
                rows = result
            fut.release()
            yield FileResult(shown[path], _relabel(rows, shown[path]), None)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- output


def sort_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in a stable order (path, then snapshot), whatever order the workers finished in."""
    return sorted(rows, key=lambda r: (r["path"], r["snapshot"] or ""))


def write_table(rows: list[dict[str, Any]], out: str) -> None:
    """Write the rows to ``out`` by its suffix (.parquet, .csv, .json), through a temporary file in
    the same directory renamed into place when complete."""
    kind = out.rsplit(".", 1)[-1].lower() if "." in os.path.basename(out) else ""
    if kind not in ("parquet", "csv", "json"):
        raise UsageError(f"--out {out}: the name must end in .parquet, .csv or .json")
    if kind == "parquet":
        hint = missing_extra("pyarrow")
        if hint:
            raise UsageError(hint)
    with atomic_output(out) as f:
        if kind == "json":
            f.write(json.dumps([{k: r[k] for k in _NAMES} for r in rows], indent=1).encode() + b"\n")
        elif kind == "csv":
            import io

            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            w = csv.writer(text)
            w.writerow(_NAMES)
            for r in rows:
                w.writerow(["" if r[k] is None else r[k] for k in _NAMES])
            text.flush()
            text.detach()
        else:
            _write_parquet(rows, f)


def _write_parquet(rows: list[dict[str, Any]], f: Any) -> None:
    pa: Any = importlib.import_module("pyarrow")
    pq: Any = importlib.import_module("pyarrow.parquet")

    types = {"str": pa.string(), "int": pa.int64(), "bool": pa.bool_()}
    schema = pa.schema([(n, types[t]) for n, t in COLUMNS])
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in _NAMES} for r in rows], schema=schema), f)


def read_table(path: str) -> list[dict[str, Any]]:
    """Rows back from a table ``write_table`` wrote (any of the three formats), typed as written."""
    kind = path.rsplit(".", 1)[-1].lower()
    if kind == "json":
        with open(path, encoding="utf-8") as f:
            return list(json.load(f))
    if kind == "parquet":
        pq: Any = importlib.import_module("pyarrow.parquet")

        return list(pq.read_table(path).to_pylist())
    types = dict(COLUMNS)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in rec.items():
                t = types[k]
                row[k] = None if v == "" else int(v) if t == "int" else (v == "True") if t == "bool" else v
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- summary


def summarize(rows: list[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """Counts per status, per machine type, per compat verdict, and the devices that break most."""
    status = Counter(r["status"] for r in rows)
    machines = Counter(r["machine"] or "(unknown)" for r in rows if r["status"] != "unreadable")
    verdicts = Counter(r["compat"] for r in rows if r["compat"])
    breaking: Counter[str] = Counter()
    for r in rows:
        if r["breaking"]:
            for sec in {device_name(s.rsplit(":", 1)[0]) for s in r["breaking"].split("; ")}:
                breaking[sec] += 1
    files = {r["path"] for r in rows}
    return {
        "states": len(rows),
        "files": len(files),
        "bytes": sum(r["file_bytes"] or 0 for r in {r["path"]: r for r in rows}.values()),
        "ram_bytes": sum(r["ram_bytes"] or 0 for r in rows),
        "status": {s: status[s] for s in STATUSES if status[s]},
        "machines": dict(machines.most_common()),
        "compat": dict(verdicts.most_common()),
        "top_breaking": breaking.most_common(top),
        "problems": [(r["path"] + (f" @{r['snapshot']}" if r["snapshot"] else ""), r["status"], r["error"])
                     for r in rows if r["status"] != "ok"],
    }
