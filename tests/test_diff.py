"""``qevm diff`` on real QEMU states: CPU models, two saves of a running guest, a stream and its edit,
7.2 vs 10.0, a pipe as one side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES, require_fixture

from qevm.analysis.diff import (
    BlockDiff,
    PageLocations,
    PageTable,
    PageVerdicts,
    _byte_ranges,
    _ram_diff,
    _split_at,
    _x86_lowmem,
    diff_states,
    read_order,
    read_side,
)
from qevm.io.sources import open_input


def qevm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], input=stdin, capture_output=True,
                          timeout=600)


def as_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode in (0, 1), r.stderr.decode()
    return json.loads(r.stdout)


def test_cpu_models_differ_in_cpu_fields_and_subsections() -> None:
    a = require_fixture("diff-cpu-qemu64-7.2")
    b = require_fixture("diff-cpu-max-7.2")
    r = qevm("diff", "--json", "--no-ram", str(a), str(b))
    assert r.returncode == 1
    doc = as_json(r)
    cpu = next(s for s in doc["sections"] if s["section"] == "cpu:0")
    subs = {s["name"]: s["presence"] for s in cpu["subsections"]}
    # -cpu max has features qemu64 lacks: their state travels in subsections only B has
    assert any(p == "only-b" for p in subs.values()), subs
    assert any(n.startswith("cpu/") for n in subs)
    paths = [f["path"] for f in cpu["fields"]]
    assert paths and all(p.startswith("cpu:0/") for p in paths)
    # the cpuid-dependent registers differ (e.g. cr4 / xcr0 / efer), with old and new values and types
    assert all("type" in f and "old" in f and "new" in f for f in cpu["fields"])
    text = qevm("diff", "--no-ram", str(a), str(b)).stdout.decode()
    assert "section cpu:0" in text and "only in B" in text


def test_two_saves_of_a_running_guest() -> None:
    a = require_fixture("diff-run-7.2")
    b = a.with_name("diff-run-7.2.b.mig")
    assert b.exists()
    doc = as_json(qevm("diff", "--json", str(a), str(b)))
    assert not doc["equal"]
    names = {s["section"] for s in doc["sections"]}
    assert "timer:0" in names  # the clocks moved on
    ram = {blk["block"]: blk for blk in doc["ram"]["blocks"]}
    pc_ram = ram["pc.ram"]
    assert pc_ram["pages_changed"] > 0  # the dirty:2 workload rewrote guest pages in between
    total = pc_ram["pages_changed"] + pc_ram["pages_appeared"] + pc_ram["pages_disappeared"]
    covered = sum(r["end"] - r["start"] for r in pc_ram["ranges"]) // doc["ram"]["page_size"]
    assert covered == total  # merged ranges account for every differing page
    assert all(r["gpa"] == r["start"] for r in pc_ram["ranges"])  # 128 MiB pc guest: all below 4 GiB
    # --ignore drops what matches; --no-ram drops RAM
    doc2 = as_json(qevm("diff", "--json", "--no-ram", "--ignore", "timer:*", str(a), str(b)))
    assert doc2["ram"] is None
    assert "timer:0" not in {s["section"] for s in doc2["sections"]}


def test_pipe_side_gives_the_same_result() -> None:
    a = require_fixture("diff-run-7.2")
    b = a.with_name("diff-run-7.2.b.mig")
    direct = as_json(qevm("diff", "--json", str(a), str(b)))
    piped = as_json(qevm("diff", "--json", "-", str(b), stdin=a.read_bytes()))
    assert piped["ram"] == direct["ram"]
    assert piped["sections"] == direct["sections"]


def test_equal_and_error_exit_codes(tmp_path: Path) -> None:
    a = require_fixture("diff-q35-7.2")
    r = qevm("diff", str(a), str(a))
    assert r.returncode == 0 and b"no differences" in r.stdout
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"QEVM\0\0\0\3\x07\0\0\0\xff")
    r = qevm("diff", str(a), str(bad))
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert qevm("diff", str(a), str(tmp_path / "missing")).returncode == 2


def test_an_edit_shows_exactly_the_edited_paths_and_the_paths_work_with_set(tmp_path: Path) -> None:
    src = require_fixture("diff-q35-7.2")
    edited = tmp_path / "edited.mig"
    sets = ['"0000:00:01.0/e1000e":0/core.mac[5]=0x1234', "hpet:0/timer[1]/cmp=77", "cpu:0/env.regs[3]=0xabc"]
    r = qevm("edit", str(src), str(edited), *[x for s in sets for x in ("--set", s)])
    assert r.returncode == 0, r.stderr.decode()
    doc = as_json(qevm("diff", "--json", str(src), str(edited)))
    got = sorted(f["path"] for s in doc["sections"] for f in s["fields"])
    assert got == sorted(s.split("=")[0] for s in sets)
    assert not doc["configuration"] and not [b for b in doc["ram"]["blocks"]]
    # every printed path, with its old value, undoes the edit
    back = tmp_path / "back.mig"
    undo = [x for s in doc["sections"] for f in s["fields"] for x in ("--set", f"{f['path']}={f['old']}")]
    assert qevm("edit", str(edited), str(back), *undo).returncode == 0
    assert qevm("diff", str(src), str(back)).returncode == 0
    assert back.read_bytes() == src.read_bytes()


def test_qemu_72_vs_100_same_machine_type() -> None:
    a = require_fixture("diff-q35-7.2")
    b = require_fixture("diff-q35-10.0")
    res = diff_states(str(a), str(b))
    assert not res.configuration or all(k != "machine" for k, _, _ in res.configuration)
    by = {s.name: s for s in res.sections}
    gs = by["globalstate:0"]
    # 10.0 splits the 100-byte runstate buffer: new fields appear, the old one changes size
    assert {f.path for f in gs.fields if f.change == "only-b"} >= {"globalstate:0/has_vm_was_suspended"}
    esp = next(s for n, s in by.items() if "pciespscsi" in n)
    assert any(f.path.endswith("/esp/drq_state") and f.change == "only-b" for f in esp.fields)
    assert not res.equal


def test_byte_ranges_merge_and_cover_length_changes() -> None:
    assert _byte_ranges(b"abcdef", b"abcdef") == []
    assert _byte_ranges(b"a" * 10, b"aXaaaaaaXa") == [(1, 2), (8, 9)]
    assert _byte_ranges(b"a" * 10, b"aXaaXaaaaa") == [(1, 5)]  # gaps of up to 4 equal bytes are merged
    assert _byte_ranges(b"ab", b"abcd") == [(2, 4)]


def test_xbzrle_compressed_and_arm_streams_equal_themselves() -> None:
    for name in ("xbzrle-7.2", "compress-7.2", "aarch64-virt-7.2"):
        p = require_fixture(name)
        res = diff_states(str(p), str(p))
        assert res.equal, (name, res.as_json())
        assert res.ram is not None and res.ram  # the RAM was really compared
        if name != "xbzrle-7.2":  # a pipe on either side
            for args in (("-", str(p)), (str(p), "-")):
                r = qevm("diff", *args, stdin=p.read_bytes())
                assert r.returncode == 0, (name, args, r.stdout.decode()[-500:], r.stderr.decode())
    # a side of compressed pages read from a pipe against a plain file: inflated and compared with the
    # file's pages as it passes (PageVerdicts), the same result as both files (digests)
    plain, comp = require_fixture("pc-7.2"), require_fixture("compress-7.2")
    both = as_json(qevm("diff", "--json", str(plain), str(comp)))
    piped = as_json(qevm("diff", "--json", str(plain), "-", stdin=comp.read_bytes()))
    assert both["ram"]["blocks"] and piped == {**both, "b": "-"}
    # an XBZRLE side needs its earlier page content: from a pipe that is refused with one clear line
    p = require_fixture("xbzrle-7.2")
    r = qevm("diff", "-", str(p), stdin=p.read_bytes())
    assert r.returncode == 2 and b"XBZRLE" in r.stderr and b"Traceback" not in r.stderr


def test_qcow2_snapshot_side() -> None:
    img = FIXTURES / "savevm-pc-7.2.qcow2"
    if not img.exists():
        require_fixture("savevm-pc-7.2.qcow2-missing")  # fails in CI, skips elsewhere
    r = qevm("diff", "--snapshot", "snap1", str(img), str(img))
    assert r.returncode == 0, r.stderr.decode()
    r = qevm("diff", "--snapshot", "nosuch", str(img), str(img))
    assert r.returncode == 2 and b"no snapshot named" in r.stderr
    doc = as_json(qevm("diff", "--json", str(img), str(require_fixture("pc-7.2"))))
    assert not doc["equal"] and doc["ram"]["blocks"]


def test_pc_ram_guest_physical_addresses_above_4g() -> None:
    size = 4 << 30
    b = BlockDiff("pc.ram", (size, size), ranges=[(0x7FFF0000, 0x80010000, "changed")])
    b.lowmem = _x86_lowmem("pc-q35-7.2", size)
    _split_at(b, b.lowmem)
    assert [(s, e, b.gpa(s)) for s, e, _ in b.ranges] == [(0x7FFF0000, 0x80000000, 0x7FFF0000),
                                                            (0x80000000, 0x80010000, 0x100000000)]
    assert _x86_lowmem("pc-i440fx-7.2", 3 << 30) == 3 << 30  # below 3.5 GiB all of it is low
    assert _x86_lowmem("virt-7.2", size) is None


def _virtio_paths(stream: Path) -> dict[str, str]:
    """Edit paths of fields inside decoded virtio blobs, from the report's device tree."""
    from qevm.analysis.report import collect

    doc = collect(str(stream), pages=False)
    net = next(d for d in doc["devices"] if d["section"].endswith("/virtio-net"))
    scsi = next(d for d in doc["devices"] if d["section"].endswith("/virtio-scsi"))
    rows = {r[0]: r for d in (net, scsi) for r in d["rows"]}
    idx = next(p for p in rows if p.startswith(scsi["path"] + "/virtio/vq[") and p.endswith("/last_avail_idx")
               and rows[p][2] != "0")
    return {"mac": f"{net['path']}/virtio/device/mac", "idx": idx, "idx_value": rows[idx][2].split()[0]}


def test_virtio_blob_edit_shows_exactly_the_blob_paths_and_they_work_with_set(tmp_path: Path) -> None:
    """A virtio-net MAC and a virtio-scsi queue's last_avail_idx, both inside the decoded virtio blob:
    the diff names exactly those paths, old and new value whole, and the old values undo the edit."""
    src = require_fixture("virtio-pc-7.2")
    p = _virtio_paths(src)
    new_idx = int(p["idx_value"]) + 37
    edited = tmp_path / "edited.mig"
    r = qevm("edit", str(src), str(edited), "--set", f"{p['mac']}=5254009abcde", "--set", f"{p['idx']}={new_idx}")
    assert r.returncode == 0, r.stderr.decode()
    doc = as_json(qevm("diff", "--json", str(src), str(edited)))
    fields = {f["path"]: f for s in doc["sections"] for f in s["fields"]}
    assert sorted(fields) == sorted([p["mac"], p["idx"]])
    assert not doc["configuration"] and not doc["ram"]["blocks"]
    mac = fields[p["mac"]]
    assert (mac["type"], mac["change"], mac["old"], mac["new"], mac["ranges"]) == (
        "buffer", "bytes", "525400123470", "5254009abcde", [[3, 6]])
    idx = fields[p["idx"]]
    assert (idx["type"], idx["change"], idx["old"], idx["new"]) == ("uint16", "value", int(p["idx_value"]), new_idx)
    text = qevm("diff", str(src), str(edited)).stdout.decode()
    assert f"{p['mac']} (buffer): 3 bytes differ at [0x3, 0x6): 525400123470 -> 5254009abcde" in text
    assert f"{p['idx']} (uint16): {p['idx_value']} -> {new_idx}" in text
    back = tmp_path / "back.mig"
    undo = [x for f in fields.values() for x in ("--set", f"{f['path']}={f['old']}")]
    assert qevm("edit", str(edited), str(back), *undo).returncode == 0
    assert back.read_bytes() == src.read_bytes()


def test_virtio_q35_72_vs_100_compares_blobs_field_by_field() -> None:
    """PCI config space and virtio state differ between 7.2 and 10.0 field by field (decoded names inside
    the blobs), never as one opaque blob; a subsection only 10.0 sends inside the virtio state is named."""
    a, b = require_fixture("virtio-q35-7.2"), require_fixture("virtio-q35-10.0")
    res = diff_states(str(a), str(b), ram=False)
    by = {s.idstr.rsplit("/", 1)[-1]: s for s in res.sections if "virtio" in s.idstr}
    assert {"virtio-net", "virtio-blk", "virtio-scsi", "virtio-balloon", "virtio-rng", "virtio-gpu"} <= set(by)
    for s in by.values():
        for f in s.fields:
            rest = f.path[len(s.name) + 1:]
            assert rest.count("/") >= 2 and not rest.endswith(("/virtio", "/config")), f.path
    net = {f.path[len(by["virtio-net"].name) + 1:]: f for f in by["virtio-net"].fields}
    assert net["virtio/transport/config/pcie@0x40/devcap"].type == "uint32_le"
    assert net["virtio/vq[0]/num"].change == "value"
    assert ("virtio/virtio/ringsize", "only-b") in by["virtio-blk"].subsections
    bal = {f.path[len(by["virtio-balloon"].name) + 1:]: f for f in by["virtio-balloon"].fields}
    assert bal["virtio/transport/config_vector"].change == "only-b"  # MSI-X vectors only on 10.0's balloon
    assert any(k.startswith("virtio/transport/config/msix@") and f.change == "only-b" for k, f in bal.items())


def _ram(blocks: list[BlockDiff]) -> list[tuple[object, ...]]:
    return [(b.name, b.size, b.changed, b.appeared, b.disappeared, b.ranges) for b in blocks]


def _edited_pair(tmp_path: Path) -> tuple[Path, Path, PageTable, tuple[int, int, int]]:
    """A booted guest's stream and its edit: a data page zeroed, a zero page given data, a data page
    changed (pc.ram addresses ``gone``, ``new``, ``changed``); with A's digest table."""
    a = require_fixture("diff-run-7.2")  # a booted guest: data and zero pages in pc.ram
    _, digested = read_side(str(a))
    assert digested is not None
    ps = digested.granule
    slots = digested.tables["pc.ram"]
    zero = digested.zero_digest(ps)
    data_at = [i for i in range(0, len(slots), 8) if slots[i:i + 8] not in (zero, bytes(8))]
    zero_at = [i for i in range(0, len(slots), 8) if slots[i:i + 8] in (zero, bytes(8))]
    gone, new, changed = data_at[5] // 8 * ps, zero_at[-3] // 8 * ps, data_at[-2] // 8 * ps
    (tmp_path / "zeros.bin").write_bytes(bytes(ps))
    (tmp_path / "ones.bin").write_bytes(b"\x5a" * ps)
    b = tmp_path / "b.mig"
    r = qevm("edit", str(a), str(b), "--set-page", f"pc.ram:0x{gone:x}=@{tmp_path / 'zeros.bin'}",
             "--set-page", f"pc.ram:0x{new:x}=@{tmp_path / 'ones.bin'}",
             "--set-page", f"pc.ram:0x{changed:x}=@{tmp_path / 'ones.bin'}")
    assert r.returncode == 0, r.stderr.decode()
    return a, b, digested, (gone, new, changed)


def test_located_pages_compare_as_the_digests_do(tmp_path: Path) -> None:
    """Two plain files are compared by where their pages lie (memcmp), not by digests: every way of
    comparing (located, located while B is read against A, digested, one side of each) gives the same
    pages, including a data page of zeros (counted as zero) and a zero page that got data."""
    a, b, digested, (gone, new, changed) = _edited_pair(tmp_path)
    _, located = read_side(str(a), locate=True)
    assert isinstance(located, PageLocations) and not isinstance(digested, PageLocations)
    assert located.digests().tables == digested.tables  # the same digests, read back from the file
    ps = digested.granule
    _, la = read_side(str(a), locate=True)
    _, lb = read_side(str(b), locate=True)
    _, lb_against = read_side(str(b), locate=True, against=la)
    _, db = read_side(str(b))
    assert isinstance(lb_against, PageLocations) and lb_against.tables != lb.tables  # equal runs marked
    size = digested.sizes["pc.ram"]
    expect = [("pc.ram", (size, size), 1, 1, 1,
               sorted([(gone, gone + ps, "disappeared"), (new, new + ps, "appeared"),
                       (changed, changed + ps, "changed")]))]
    for ta, tb in ((la, lb), (la, lb_against), (digested, db), (la, db), (digested, lb)):
        got = [x for x in _ram(_ram_diff(ta, tb, ps)) if x[2] or x[3] or x[4]]
        assert got == expect, (type(ta).__name__, type(tb).__name__)
    res = diff_states(str(a), str(b))
    assert _ram([x for x in res.ram or [] if x.differs]) == expect


def test_every_way_of_reading_the_sides_gives_the_same_pages(tmp_path: Path) -> None:
    """file/file, pipe/file, file/pipe, pipe/pipe, a gzip side, an opened side and a pipe read through the
    CLI give the same RAM differences (a data page zeroed, a zero page given data, a changed page), with
    A the old side however the sides are read; a side that is not a plain file is compared with the file
    side's pages as it passes (``PageVerdicts``), not digested, and is read once."""
    import gzip

    a, b, digested, (gone, new, changed) = _edited_pair(tmp_path)
    ps = digested.granule
    size = digested.sizes["pc.ram"]
    expect_ab = [("pc.ram", (size, size), 1, 1, 1,
                  sorted([(gone, gone + ps, "disappeared"), (new, new + ps, "appeared"),
                          (changed, changed + ps, "changed")]))]
    expect_ba = [("pc.ram", (size, size), 1, 1, 1,
                  sorted([(gone, gone + ps, "appeared"), (new, new + ps, "disappeared"),
                          (changed, changed + ps, "changed")]))]
    gz = {}
    for p in (a, b):
        gz[p] = tmp_path / (p.name + ".gz")
        gz[p].write_bytes(gzip.compress(p.read_bytes(), compresslevel=1))
    assert read_order(str(a), str(b)) == (True, True, False)
    assert read_order(str(gz[a]), str(b)) == (False, True, True)  # B (the file) is read first
    assert read_order(str(a), str(gz[b])) == (True, False, False)
    assert read_order(str(gz[a]), str(gz[b])) == (False, False, False)

    def ram(x: str | Path, y: str | Path, opened: bool = False) -> list[tuple[object, ...]]:
        if not opened:
            res = diff_states(str(x), str(y))
        else:  # sides given as opened inputs: read once, by handle
            with open_input(str(x)) as ix, open_input(str(y)) as iy:
                res = diff_states(ix if x != a and x != b else str(x), iy if y != a and y != b else str(y))
        return _ram([blk for blk in res.ram or [] if blk.differs])

    for x, y, expect in ((a, b, expect_ab), (b, a, expect_ba)):
        assert ram(x, y) == expect  # file / file
        assert ram(gz[x], y) == expect  # compressed / file: A compared with B's pages as it is read
        assert ram(x, gz[y]) == expect  # file / compressed
        assert ram(gz[x], gz[y]) == expect  # neither a plain file: digests
        assert ram(gz[x], y, opened=True) == expect
        assert ram(x, gz[y], opened=True) == expect
    # the verdicts table really is what compares the non-file side
    _, la = read_side(str(a), locate=True)
    _, vb = read_side(str(gz[b]), against=la)
    assert isinstance(vb, PageVerdicts)
    assert _ram([x for x in _ram_diff(la, vb, ps) if x.differs]) == expect_ab
    _, lb = read_side(str(b), locate=True)
    _, va = read_side(str(gz[a]), against=lb)
    assert isinstance(va, PageVerdicts)
    assert _ram([x for x in _ram_diff(va, lb, ps) if x.differs]) == expect_ab
    _, ve = read_side(str(gz[b]), against=la, pages=True)  # one event per page: the same verdicts
    assert isinstance(ve, PageVerdicts) and ve.tables == vb.tables
    # a compressed page (QEMU 7.2's multi-thread compression) is inflated and compared the same way
    import zlib

    from qevm.format.events import RamFlag

    vc = PageVerdicts(la)
    vc.granule = vc.page_size = ps
    vc.add_block("pc.ram", size)
    loc = memoryview(la.tables["pc.ram"]).cast("q")
    k = changed // ps  # a data page of A, located in A's file
    page = a.read_bytes()[loc[k] - (1 << 62) + k * (ps + 8):][:ps]
    for data, verdict in ((page, -1), (b"\x5a" * ps, -2), (bytes(ps), -4)):
        rec = len(zlib.compress(data)).to_bytes(4, "big") + zlib.compress(data)
        vc.sink("pc.ram", int(RamFlag.COMPRESS_PAGE), changed, 1, memoryview(rec), 0, len(rec), 0, 0)
        assert memoryview(vc.tables["pc.ram"]).cast("q")[k] == verdict  # same, changed, data only in A
    vc.release()
    # through the CLI, a real pipe on either side or both (process substitution: /dev/fd/N)
    direct = as_json(qevm("diff", "--json", str(a), str(b)))
    assert as_json(qevm("diff", "--json", "-", str(b), stdin=a.read_bytes())) == {**direct, "a": "-"}
    assert as_json(qevm("diff", "--json", str(a), "-", stdin=b.read_bytes())) == {**direct, "b": "-"}
    r = subprocess.run(["bash", "-c", f'{sys.executable} -m qevm.cli.main diff --json <(cat "$0") <(cat "$1")',
                        str(a), str(b)], capture_output=True, timeout=600)
    both = as_json(r)
    assert both["ram"] == direct["ram"] and both["sections"] == direct["sections"]
    blk = next(x for x in direct["ram"]["blocks"] if x["block"] == "pc.ram")
    assert (blk["pages_changed"], blk["pages_appeared"], blk["pages_disappeared"]) == (1, 1, 1)
