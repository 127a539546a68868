"""``qevm scan``: a fleet built from real QEMU fixtures, scanned in a local process pool and on a
dask.distributed LocalCluster with two worker processes; identical tables, every damaged file a row
with its error, a worker killed mid-scan costs a retry; ``--compat-to`` agrees with real migrations.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, require_fixture
from fleet import Entry, build_fleet

from qevm.analysis.scan import (
    COLUMNS,
    FileResult,
    expand_paths,
    read_table,
    scan,
    scan_file,
    sort_rows,
    summarize,
    write_table,
)
from qevm.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
COPIES = 100


def qevm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "qevm", *args], capture_output=True, text=True, timeout=600, env=e)


def rows_of(results: Iterator[FileResult]) -> list[dict[str, Any]]:
    return sort_rows(r for res in results for r in res.rows)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Entry]]:
    for name in ("aarch64-virt-7.2", "diff-q35-10.0", "s390x-7.2"):
        require_fixture(name)
    if not (FIXTURES / "savevm-pc-7.2.qcow2").exists():
        if os.environ.get("CI"):
            pytest.fail("savevm-pc-7.2.qcow2 fixture missing in CI")
        pytest.skip("savevm-pc-7.2.qcow2 fixture not generated")
    root = tmp_path_factory.mktemp("fleet") / "fleet"
    return root, build_fleet(root, copies=COPIES)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed") if not os.environ.get("CI") else __import__("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def local_rows(fleet: tuple[Path, dict[str, Entry]]) -> list[dict[str, Any]]:
    root, _ = fleet
    return rows_of(scan(expand_paths([str(root)]), jobs=2))


# ---------------------------------------------------------------------------------------------- the fleet


def test_fleet_rows(fleet: tuple[Path, dict[str, Entry]], local_rows: list[dict[str, Any]]) -> None:
    root, man = fleet
    assert len(man) >= 240
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in local_rows:
        assert set(r) == {n for n, _ in COLUMNS}
        by_path.setdefault(r["path"], []).append(r)
    assert set(by_path) == {str(root / rel) for rel in man}  # every file a row, nothing else
    for rel, entry in man.items():
        rows = by_path[str(root / rel)]
        for r in rows:
            if entry.status is not None:
                assert r["status"] == entry.status, (rel, r["status"], r["error"])
            if entry.machine is not None:
                assert r["machine"] == entry.machine, rel
            if r["status"] == "ok":
                assert r["error"] is None and r["vmdesc"] and r["device_sections"] == r["decoded_devices"] > 0
                assert r["ram_bytes"] > 0 and r["pages_normal"] + r["pages_zero"] > 0 and r["devices"]
            else:
                assert r["error"], rel  # a damaged file is a row with its error
            if entry.kind == "truncated":
                assert r["error_offset"] is not None and r["error_offset"] <= r["file_bytes"]
                assert "ended" in r["error"] or "need" in r["error"] or "left" in r["error"]
    # the qcow2 savevm fixture: one row per snapshot with a VM state, read through the container
    q = by_path[str(root / "qcow2/savevm-pc-7.2.qcow2")]
    assert all(r["container"] == "qcow2" and r["snapshot"] for r in q)
    assert by_path[str(root / "libvirt/guest-gzip.save")][0]["container"] == "libvirt"
    assert by_path[str(root / "libvirt/guest-gzip.save")][0]["compression"] == "gzip"
    assert by_path[str(root / "compressed/small-pc-7.2.mig.xz")][0]["compression"] == "xz"
    # hardlinks, copies and the original give the same summary apart from the path
    small = [r for r in local_rows if "/copies/small-pc-7.2/" in r["path"]] + \
        by_path[str(root / "streams/small-pc-7.2.mig")]
    assert len(small) == COPIES + 1
    assert len({json.dumps({k: v for k, v in r.items() if k != "path"}) for r in small}) == 1
    # the other machine types are there, with the QEMU hints of their machine types
    machines = {r["machine"] for r in local_rows if r["status"] == "ok"}
    assert {"pc-i440fx-7.2", "pc-i440fx-10.0", "pc-q35-7.2", "virt-7.2", "s390-ccw-virtio-7.2"} <= machines
    # QEMU 10.0 saving a pc-q35-7.2 guest: the vmdesc's configuration entry says >= 8.2
    assert by_path[str(root / "machines/diff-q35-10.0.mig")][0]["qemu_min"] == "8.2"
    assert by_path[str(root / "machines/diff-q35-7.2.mig")][0]["qemu_min"] == "7.2"
    # a qevm edit variant is a complete stream like its base
    e = by_path[str(root / "edits/timer-1.mig")][0]
    assert e["status"] == "ok" and e["devices"] == small[0]["devices"]
    s = summarize(local_rows)
    assert s["states"] == len(local_rows) and s["status"]["ok"] + s["status"]["damaged"] == len(local_rows)
    assert len(s["problems"]) == s["status"]["damaged"]


def test_local_and_dask_tables_identical(fleet: tuple[Path, dict[str, Entry]], local_rows: list[dict[str, Any]],
                                         cluster: str, tmp_path: Path) -> None:
    root, _ = fleet
    paths = expand_paths([str(root)])
    seen: list[str] = []
    dask_rows = []
    for res in scan(paths, scheduler=cluster):
        seen.append(res.path)
        dask_rows.extend(res.rows)
    assert sorted(seen) == paths  # each file once, streamed back as it finished
    assert sort_rows(dask_rows) == local_rows
    one = rows_of(scan(paths[:40], jobs=1))
    assert one == [r for r in local_rows if r["path"] in set(paths[:40])]
    # the three table formats hold the same rows
    for suffix in ("parquet", "csv", "json"):
        out = tmp_path / f"t.{suffix}"
        write_table(local_rows, str(out))
        assert read_table(str(out)) == local_rows, suffix
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


# ---------------------------------------------------------------------------------------------- worker death


def kill_once(path: str, ctx: Any) -> list[dict[str, Any]]:
    """The per-file task, except that reading ``victim*`` kills its worker process the first time."""
    marker = Path(path + ".killed")
    if Path(path).name.startswith("victim") and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return scan_file(path, ctx)


def kill_always(path: str, ctx: Any) -> list[dict[str, Any]]:
    if Path(path).name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGKILL)
    return scan_file(path, ctx)


def small_fleet(root: Path, fleet: tuple[Path, dict[str, Entry]], n: int = 12) -> list[str]:
    src = fleet[0] / "streams" / "small-pc-7.2.mig"
    root.mkdir()
    for i in range(n):
        os.link(src, root / f"s{i:02d}.mig")
    os.link(src, root / "victim.mig")
    return expand_paths([str(root)])


def test_worker_killed_locally_costs_a_retry(fleet: tuple[Path, dict[str, Entry]], tmp_path: Path) -> None:
    paths = small_fleet(tmp_path / "f", fleet)
    results = list(scan(paths, jobs=2, task=kill_once))
    assert (tmp_path / "f" / "victim.mig.killed").exists()  # the worker did die
    assert sorted(r.path for r in results) == paths
    assert all(r.rows[0]["status"] == "ok" for r in results)
    victim = next(r for r in results if r.path.endswith("victim.mig"))
    assert victim.retries is not None and victim.retries >= 1
    # a file that kills every worker that reads it ends as a failed row; the rest of the scan completes
    shutil.copy(tmp_path / "f" / "s00.mig", tmp_path / "f" / "poison.mig")
    rows = rows_of(scan(expand_paths([str(tmp_path / "f")]), jobs=2, task=kill_always, max_failures=2))
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["path"] for r in bad] == [str(tmp_path / "f" / "poison.mig")]
    assert bad[0]["status"] == "failed" and "worker process died" in bad[0]["error"]
    assert len(rows) == len(paths) + 1


def test_worker_killed_on_dask_costs_a_retry(fleet: tuple[Path, dict[str, Entry]], cluster: str,
                                             tmp_path: Path) -> None:
    paths = small_fleet(tmp_path / "f", fleet)
    rows = rows_of(scan(paths, scheduler=cluster, task=kill_once))
    assert (tmp_path / "f" / "victim.mig.killed").exists()
    assert [r["path"] for r in rows] == paths and all(r["status"] == "ok" for r in rows)
    assert rows == rows_of(scan(paths, jobs=2))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_local_and_dask(fleet: tuple[Path, dict[str, Entry]], cluster: str, tmp_path: Path) -> None:
    root, man = fleet
    dirs = [str(root / d) for d in ("damaged", "libvirt", "qcow2", "edits")]
    a = qevm("scan", *dirs, "--out", str(tmp_path / "a.parquet"), "-j", "2", "--progress", "always")
    assert a.returncode == 1, a.stderr  # some states are damaged
    n = sum(1 for rel in man if rel.split("/")[0] in ("damaged", "libvirt", "qcow2", "edits"))
    assert f"{n}/{n} files" in a.stderr and "files/s" in a.stderr  # the progress bar
    assert "Traceback" not in a.stderr and "Exception" not in a.stderr
    assert "status    ok " in a.stdout and "damaged " in a.stdout and "machines  pc-i440fx-7.2" in a.stdout
    assert "not ok (" in a.stdout and "damaged/junk.mig" in a.stdout
    b = qevm("scan", *dirs, "--out", str(tmp_path / "b.csv"), "--scheduler", cluster)
    assert b.returncode == 1, b.stderr
    assert f"Dask scheduler {cluster}" in b.stdout and b.stderr == ""
    assert read_table(str(tmp_path / "a.parquet")) == read_table(str(tmp_path / "b.csv"))
    ok = qevm("scan", str(root / "edits"), str(root / "streams" / "*.mig"), "--out", str(tmp_path / "c.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(read_table(str(tmp_path / "c.json"))) == 5
    assert qevm("scan", str(tmp_path / "nothing-here")).returncode == 2
    bad = qevm("scan", str(root / "edits"), "--out", str(tmp_path / "t.xlsx"))
    assert bad.returncode == 2 and "must end in .parquet, .csv or .json" in bad.stderr
    unreachable = qevm("scan", str(root / "edits"), "--scheduler", "tcp://127.0.0.1:9",
                       env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"})
    assert unreachable.returncode == 2 and "cannot reach the Dask scheduler" in unreachable.stderr


def test_cli_without_the_fleet_extra(fleet: tuple[Path, dict[str, Entry]], tmp_path: Path) -> None:
    """Without dask/pyarrow: one line saying what to install, exit 2; a local CSV scan still works."""
    block = tmp_path / "block"
    block.mkdir()
    for mod in ("distributed", "pyarrow"):
        (block / f"{mod}.py").write_text("raise ImportError('not installed (blocked by the test)')\n")
    env = {"PYTHONPATH": f"{block}{os.pathsep}{ROOT / 'src'}"}
    edits = str(fleet[0] / "edits")
    for args in (("--scheduler", "tcp://127.0.0.1:8786"), ("--out", str(tmp_path / "t.parquet"))):
        r = qevm("scan", edits, *args, env=env)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "pip install 'qevm[fleet]'" in r.stderr, r.stderr
    r = qevm("scan", edits, "--out", str(tmp_path / "t.csv"), env=env)
    assert r.returncode == 0, r.stderr
    assert len(read_table(str(tmp_path / "t.csv"))) == 3


def test_expand_paths(fleet: tuple[Path, dict[str, Entry]], tmp_path: Path) -> None:
    src = fleet[0] / "streams" / "small-pc-7.2.mig"
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    os.link(src, d / "sub" / "a.mig")
    (d / "notes.txt").write_text("not a state\n")
    disk = d / "disk.qcow2"
    if shutil.which("qemu-img"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    else:
        disk.write_bytes(b"QFI\xfb" + bytes(100))  # a qcow2 header with no snapshots
    # a directory walk takes what starts like a VM state (not a qcow2 disk without snapshots)
    assert expand_paths([str(d)]) == [str(d / "sub" / "a.mig")]
    # named files are taken as they are, and say in their row what they are not
    got = expand_paths([str(d / "notes.txt"), str(disk), str(d / "sub" / "a.mig"), str(d / "**" / "*.mig")])
    assert got == sorted([str(d / "notes.txt"), str(disk), str(d / "sub" / "a.mig")])
    rows = {r["path"]: r for p in got for r in scan_file(p)}
    assert rows[str(d / "notes.txt")]["status"] == "unreadable"
    assert rows[str(disk)]["status"] == "unreadable" and "snapshot" in rows[str(disk)]["error"]
    os.mkfifo(d / "pipe")  # named: a row saying what it is, never a worker blocked on it
    (row,) = scan_file(str(d / "pipe"))
    assert row["status"] == "unreadable" and "not a regular file" in row["error"]
    assert expand_paths([str(d)]) == [str(d / "sub" / "a.mig")]
    with pytest.raises(UsageError):
        expand_paths([str(d / "missing.mig")])
    with pytest.raises(UsageError):
        expand_paths([str(d / "*.nothing")])


# ---------------------------------------------------------------------------------------------- --compat-to


@pytest.fixture(scope="module")
def matrix() -> tuple[Path, dict[str, Any]]:
    """The real 7.2/10.0 migration matrix of ``qevm compat`` (scripts/compat_matrix.py, cached)."""
    import importlib.util

    if shutil.which("qemu-system-x86_64") is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the compat matrix needs qemu-system-x86_64 and root (chroot) in CI")
        pytest.skip("needs qemu-system-x86_64 and root")
    spec = importlib.util.spec_from_file_location("compat_matrix", ROOT / "scripts" / "compat_matrix.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.cache_root()
    return out, mod.build(out)


def test_compat_to_agrees_with_real_migrations(matrix: tuple[Path, dict[str, Any]], cluster: str,
                                               tmp_path: Path) -> None:
    """Every destination of the matrix: the sources migrated to it, scanned with --compat-to its dump and
    stream; each state's verdict is what real QEMU did with it."""
    from qevm.analysis.compat import load_side

    out, doc = matrix
    groups: dict[tuple[str, str], dict[str, bool]] = {}
    for c in doc["cells"]:
        groups.setdefault((c["destination_dump"], c["destination_stream"]), {})[c["source_stream"]] = \
            c["qemu"]["loaded"]
    assert len(groups) >= 10
    checked = wrong = 0
    for (dump, stream), sources in groups.items():
        dsts = [load_side(str(out / dump)), load_side(str(out / stream))]
        for src, loaded in sources.items():
            (row,) = scan_file(str(out / src), dsts)
            checked += 1
            wrong += row["compat"] != ("compatible" if loaded else "incompatible")
            assert (row["compat_breaks"] == 0) == loaded and bool(row["breaking"]) != loaded
    assert checked == len(doc["cells"]) and wrong == 0
    # one destination as a fleet, through the CLI, locally and on Dask: QEMU 10.0 reads a byte of esp state
    # (drq_state) that 7.2 never wrote
    fleet = tmp_path / "f"
    fleet.mkdir()
    for src in ("stream-7.2-pc-q35-7.2-esp.mig", "stream-10.0-pc-q35-7.2-esp.mig", "stream-7.2-pc-q35-7.2-base.mig"):
        for i in range(3):
            os.link(out / src, fleet / f"{i}-{src}")
    (fleet / "cut.mig").write_bytes((out / "stream-7.2-pc-q35-7.2-esp.mig").read_bytes()[:100_000])
    dst = [str(out / "dump-10.0-pc-q35-7.2.json"), str(out / "stream-10.0-pc-q35-7.2-esp.mig")]
    tables = []
    for where in (("-j", "2"), ("--scheduler", cluster)):
        r = qevm("scan", str(fleet), "--compat-to", *dst, "--out", str(tmp_path / "t.json"), *where)
        assert r.returncode == 1, r.stderr
        # a guest without esp loads there too (the destination's esp keeps its reset state)
        assert "compat    compatible 6, incompatible 3, not checked 1" in r.stdout, r.stdout
        assert "breaking  pciespscsi (3 states)" in r.stdout, r.stdout
        tables.append(read_table(str(tmp_path / "t.json")))
    assert tables[0] == tables[1]
    rows = {Path(r["path"]).name: r for r in tables[0]}
    # the breaking sections are those `qevm compat` reports for the same state and destination
    c = qevm("compat", "--json", str(out / "stream-7.2-pc-q35-7.2-esp.mig"), *dst)
    assert c.returncode == 1
    brk = [f for f in json.loads(c.stdout)["findings"] if f["severity"] == "break"]
    assert rows["0-stream-7.2-pc-q35-7.2-esp.mig"]["compat_breaks"] == len(brk)
    assert rows["0-stream-7.2-pc-q35-7.2-esp.mig"]["breaking"] == "; ".join(dict.fromkeys(f["section"] for f in brk))
    assert rows["cut.mig"]["status"] == "damaged" and rows["cut.mig"]["compat"] == "not checked"
