"""``qevm convert``: every output checked by the real consumer.

* qcow2 snapshot -> stream: byte-identical to what QEMU's own block layer reads at the vmstate
  offset (``qemu-img snapshot -a`` + ``resize`` + ``convert -O raw``);
* compression: gzip/xz/zstd and back, checked with the system's gzip/xz and the zstandard module;
* mapped-ram -> plain -> mapped-ram gives back QEMU 10.0's own file byte for byte; the plain stream
  is read by QEMU 10.0's analyze-migration.py and loaded by QEMU 10.0 (the guest keeps ticking);
  a plain stream with XBZRLE pages becomes a mapped-ram file QEMU 10.0 loads with the capability;
  a 7.2 stream round-tripped through mapped-ram loads into QEMU 7.2;
* stream -> qcow2 snapshot: ``qemu-img check`` (7.2 and 10.0) clean, ``qemu-img snapshot -l``
  right, QEMU 7.2 ``-loadvm`` restores the running guest, and QEMU 10.0 restores a snapshot made from
  its own stream in an image its qemu-img created; images written by QEMU 10.0's qemu-img,
  with extended L2 entries, zstd and compressed clusters; locked and corrupt images refused.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, destination_args, require_fixture

from qevm.io.containers import Qcow2Image
from qevm.io.qcow2write import add_snapshot, create_image, delete_snapshot, list_image_snapshots

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
sys.path.insert(0, str(ROOT / "scripts" / "fixtures"))
from qemu_driver import Qemu  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": SRC}
QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
PEER10 = Path(os.environ.get("QEVM_CACHE", Path.home() / ".cache" / "qevm")) / "peer" / "10.0" / "analyze-migration.py"
SAVEVM = FIXTURES / "savevm-pc-7.2.qcow2"


def need(thing: Any, what: str) -> None:
    if not thing:
        if os.environ.get("CI"):
            pytest.fail(f"{what} missing in CI")
        pytest.skip(f"{what} not available")


def qevm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def ok(*args: str) -> str:
    r = qevm(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fails(*args: str) -> str:
    r = qevm(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qevm: error: "), r.stderr
    return lines[0]


def sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def img_check(img: Path, chroot: Path | None = None) -> str:
    """``qemu-img check`` (QEMU 7.2, or 10.0 in its chroot) finds no errors and no leaks."""
    if chroot is None:
        cmd = [QEMU_IMG or "qemu-img", "check", str(img)]
    else:
        cmd = ["chroot", str(chroot), "qemu-img", "check", "/" + str(img.relative_to(chroot))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "No errors were found" in r.stdout, r.stdout[-2000:]
    assert "leaked" not in r.stdout, r.stdout[-2000:]
    return r.stdout


def snapshot_list(img: Path) -> str:
    return subprocess.run([QEMU_IMG or "qemu-img", "snapshot", "-l", str(img)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def savevm_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(SAVEVM.exists(), "savevm-pc-7.2 fixture")
    out = tmp_path_factory.mktemp("savevm") / "snap1.mig"
    ok("convert", str(SAVEVM), str(out), "--snapshot", "snap1")
    return out


# ------------------------------------------------------------------------------ qcow2 -> stream


def qemu_view_of_vmstate(img: Path, snap: str, work: Path) -> bytes:
    """The vmstate bytes as QEMU's own qcow2 driver reads them: revert a copy to the snapshot (its L1,
    vmstate entries included, becomes the active one), grow the disk over the vmstate area, read."""
    with open(img, "rb") as f:
        q = Qcow2Image(f)
        s = q.find_snapshot(snap)
        off, size = q.vm_state_offset(s), s.vm_state_size
    c = work / "view.qcow2"
    shutil.copy(img, c)
    subprocess.run([QEMU_IMG, "snapshot", "-a", snap, str(c)], check=True)
    grown = (off + size) // (1 << 20) * (1 << 20) + (2 << 20)
    subprocess.run([QEMU_IMG, "resize", "-q", str(c), str(grown)], check=True)
    raw = work / "view.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", str(c), str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(off)
        data = f.read(size)
    raw.unlink()
    c.unlink()
    return data


def test_snapshot_to_stream_is_what_qemu_stored(savevm_stream: Path, tmp_path: Path) -> None:
    need(QEMU_IMG, "qemu-img")
    assert savevm_stream.read_bytes() == qemu_view_of_vmstate(SAVEVM, "snap1", tmp_path)
    # the newest snapshot by default, and standard output
    r = subprocess.run([sys.executable, "-m", "qevm.cli.main", "convert", str(SAVEVM), "-", "--to", "stream"],
                       capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0 and r.stdout == savevm_stream.read_bytes()
    assert "has no snapshot named 'nope'" in fails("convert", str(SAVEVM), str(tmp_path / "x.mig"), "--snapshot",
                                                   "nope")


# ------------------------------------------------------------------------------ compression


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_compress_and_back(kind: str, tmp_path: Path) -> None:
    savevm_stream = require_fixture("small-pc-7.2")  # small: xz on a shared 2-core machine is slow
    ext = {"gzip": ".gz", "xz": ".xz", "zstd": ".zst"}[kind]
    z = tmp_path / f"s.mig{ext}"
    out = ok("convert", str(savevm_stream), str(z))  # compression guessed from the name
    assert f"stream ({kind})" in out
    raw = savevm_stream.read_bytes()
    if kind == "gzip":
        assert gzip.decompress(z.read_bytes()) == raw
        assert subprocess.run(["gzip", "-dc", str(z)], capture_output=True, check=True).stdout == raw
    elif kind == "xz":
        assert lzma.decompress(z.read_bytes()) == raw
        assert subprocess.run(["xz", "-dc", str(z)], capture_output=True, check=True).stdout == raw
    else:
        import zstandard

        assert zstandard.ZstdDecompressor().stream_reader(open(z, "rb")).read() == raw
    back = tmp_path / "back.mig"
    ok("convert", str(z), str(back))
    assert back.read_bytes() == raw
    # --compress on an explicit stream output, from a pipe
    z2 = tmp_path / "piped"
    with open(savevm_stream, "rb") as f:
        r = subprocess.run([sys.executable, "-m", "qevm.cli.main", "convert", "-", str(z2), "--to", "stream",
                            "--compress", kind], stdin=f, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    ok("convert", str(z2), str(back), "--to", "stream")
    assert back.read_bytes() == raw
    # a compressed stream into a mapped-ram file and a qcow2 snapshot
    ok("convert", str(z), str(tmp_path / "m.mapped"), "--to", "mapped-ram")
    ok("convert", str(tmp_path / "m.mapped"), str(back), "--to", "stream")
    ok("convert", str(z), str(tmp_path / "i.qcow2"), "--name", "z", "--size", "1M")
    ok("convert", str(tmp_path / "i.qcow2"), str(back))
    assert back.read_bytes() == raw


# ------------------------------------------------------------------------------ mapped-ram


def analyze10(path: Path) -> dict[str, Any]:
    need(PEER10.exists(), "QEMU 10.0 analyze-migration.py")
    r = subprocess.run([sys.executable, str(PEER10), "-f", str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def test_mapped_ram_round_trip_is_qemus_file(tmp_path: Path) -> None:
    src = require_fixture("mapped-ram-10.0")
    plain = tmp_path / "plain.mig"
    out = ok("convert", str(src), str(plain), "--to", "stream")
    assert "stream from mapped-ram" in out
    assert b"mapped-ram" not in plain.read_bytes()[:200]
    doc = analyze10(plain)
    assert "ram (1)" in doc and any(k.startswith("globalstate") for k in doc)
    back = tmp_path / "back.mapped-ram"
    out = ok("convert", str(plain), str(back), "--to", "mapped-ram")
    assert sha(back) == sha(src)  # the layout QEMU 10.0 wrote, byte for byte
    assert os.stat(back).st_blocks * 512 < os.path.getsize(back) // 2  # zero pages are holes


def test_mapped_ram_multifd_to_plain(tmp_path: Path) -> None:
    src = require_fixture("mapped-ram-multifd-10.0")
    plain = tmp_path / "plain.mig"
    ok("convert", str(src), str(plain), "--to", "stream")
    analyze10(plain)
    # plain -> mapped-ram -> plain is the identity on the plain form
    m = tmp_path / "m.mapped"
    ok("convert", str(plain), str(m), "--to", "mapped-ram")
    plain2 = tmp_path / "plain2.mig"
    ok("convert", str(m), str(plain2), "--to", "stream")
    assert sha(plain) == sha(plain2)


# ------------------------------------------------------------------------------ stream -> qcow2


def test_stream_into_new_and_existing_images(savevm_stream: Path, tmp_path: Path) -> None:
    need(QEMU_IMG, "qemu-img")
    new = tmp_path / "new.qcow2"
    out = ok("convert", str(savevm_stream), str(new), "--name", "conv", "--size", "32M")
    assert "VM clock 00:00:03.521" in out  # the clock of the stream's timer section = what savevm stored
    img_check(new)
    lst = snapshot_list(new)
    assert re.search(r"\n1\s+conv\s+74\.3 MiB .* 00:00:03\.521", lst), lst
    back = tmp_path / "back.mig"
    ok("convert", str(new), str(back), "--snapshot", "conv")
    assert sha(back) == sha(savevm_stream)
    assert qemu_view_of_vmstate(new, "conv", tmp_path) == savevm_stream.read_bytes()

    # into a copy of the image QEMU wrote (its active L1 still maps the old vmstate area)
    img = tmp_path / "disk.qcow2"
    shutil.copy(SAVEVM, img)
    ok("convert", str(savevm_stream), str(img), "--name", "again")
    img_check(img)
    assert "again" in snapshot_list(img)
    before = sha(img)
    line = fails("convert", str(savevm_stream), str(img), "--name", "again")
    assert "already has a snapshot named 'again'" in line and "--replace" in line
    assert sha(img) == before
    ok("convert", str(savevm_stream), str(img), "--name", "again", "--replace")
    img_check(img)
    assert snapshot_list(img).count("again") == 1
    delete_snapshot(str(img), "snap1")
    img_check(img)
    ok("convert", str(img), str(back), "--snapshot", "again")
    assert sha(back) == sha(savevm_stream)


def test_library_api(savevm_stream: Path, tmp_path: Path) -> None:
    """What the engine's savevm uses: chunks of any size, a clock asked for at the end, icount."""
    need(QEMU_IMG, "qemu-img")
    img = tmp_path / "lib.qcow2"
    create_image(str(img), 32 << 20)
    img_check(img)

    def chunks() -> Iterator[bytes]:
        with open(savevm_stream, "rb") as f:
            while b := f.read(100_003):
                yield b

    snap = add_snapshot(str(img), "lib", chunks(), vm_clock_ns=lambda: 5_250_000_000, icount=12345)
    assert (snap.vm_state_size, snap.vm_clock_nsec, snap.icount) == (savevm_stream.stat().st_size, 5_250_000_000,
                                                                     12345)
    img_check(img)
    assert re.search(r"lib\s+74\.3 MiB .* 00:00:05\.250\s+12345", snapshot_list(img)), snapshot_list(img)
    assert delete_snapshot(str(img), "lib").name == "lib"
    img_check(img)
    assert list_image_snapshots(str(img)) == []


def test_crash_before_the_table_leaves_leaks_only(savevm_stream: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the clusters and refcounts were written but before the header switched to the new
    table: the image keeps its snapshots, ``qemu-img check`` reports leaked clusters and no error."""
    need(QEMU_IMG, "qemu-img")
    import qevm.io.qcow2write as w

    img = tmp_path / "d.qcow2"
    shutil.copy(SAVEVM, img)
    listing = snapshot_list(img)

    def crash(self: Any, offset: int, count: int) -> None:
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(w._Image, "commit_table", crash)
    with pytest.raises(KeyboardInterrupt):
        add_snapshot(str(img), "lost", [savevm_stream.read_bytes()], vm_clock_ns=1)
    r = subprocess.run([QEMU_IMG, "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 3 and "leaked clusters" in r.stdout and "ERROR" not in r.stdout, r.stdout[-800:]
    assert snapshot_list(img) == listing
    # and a stream that fails midway leaves the image as it was
    monkeypatch.undo()
    img2 = tmp_path / "e.qcow2"
    shutil.copy(SAVEVM, img2)
    before = sha(img2)

    def broken() -> Iterator[bytes]:
        yield savevm_stream.read_bytes()[:1 << 20]
        raise OSError("read error")

    with pytest.raises(OSError):
        add_snapshot(str(img2), "lost", broken())
    assert sha(img2) == before


def test_images_written_by_qemu_10(savevm_stream: Path, tmp_path: Path) -> None:
    """qcow2 images made by QEMU 10.0's qemu-img: default, extended L2 + zstd, with compressed and
    normal clusters in the active layer; checked by both qemu-img versions."""
    need(QEMU_IMG, "qemu-img")
    try:
        from gen_qemu10 import chroot_dir
        root = chroot_dir()
    except Exception as e:  # noqa: BLE001
        need(False, f"QEMU 10.0 chroot ({e})")
        return
    work = Path(tempfile.mkdtemp(prefix="qevm-conv-", dir=root / "tmp"))
    try:
        inner = "/" + str(work.relative_to(root))
        q10 = ["chroot", str(root), "qemu-img"]
        for name, opts in (("plain", "cluster_size=65536"),
                           ("extl2", "extended_l2=on,cluster_size=131072,compression_type=zstd")):
            img = work / f"{name}.qcow2"
            subprocess.run([*q10, "create", "-q", "-f", "qcow2", "-o", opts, f"{inner}/{name}.qcow2", "64M"],
                           check=True)
            io = ["chroot", str(root), "qemu-io", "-f", "qcow2", f"{inner}/{name}.qcow2"]
            subprocess.run([*io, "-c", "write -P 0x5a 0 1M", "-c", "write -c -P 0x33 4M 1M",
                            "-c", "write -z 8M 256k"], check=True, capture_output=True)
            ok("convert", str(savevm_stream), str(img), "--name", "s1")
            img_check(img, root)
            img_check(img)
            ok("convert", str(savevm_stream), str(img), "--name", "s2")
            img_check(img, root)
            back = work / "back.mig"
            ok("convert", str(img), str(back), "--snapshot", "s1")
            assert sha(back) == sha(savevm_stream)
            # the guest data is untouched and shared: read it through QEMU after the snapshot
            r = subprocess.run([*io, "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 4M 1M"], capture_output=True,
                               text=True, check=True)
            assert "Pattern verification failed" not in r.stdout
            with open(img, "rb") as f:
                snaps = Qcow2Image(f).snapshots
            assert [s.name for s in snaps] == ["s1", "s2"] and all(s.icount is None for s in snaps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_refusals(savevm_stream: Path, tmp_path: Path) -> None:
    need(QEMU_IMG, "qemu-img")
    # unknown and mixed formats
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a stream at all")
    assert "not a QEVM stream" in fails("convert", str(junk), str(tmp_path / "o.mig"))
    assert "named like a gzip" in fails("convert", str(savevm_stream), str(tmp_path / "o.gz"), "--to", "qcow2",
                                        "--name", "x")
    assert "cannot tell the output format" in fails("convert", str(savevm_stream), str(tmp_path / "o.dat"))
    assert "--compress is for stream outputs" in fails("convert", str(savevm_stream), str(tmp_path / "o.m"),
                                                       "--to", "mapped-ram", "--compress", "xz")
    assert "needs --name" in fails("convert", str(savevm_stream), str(tmp_path / "o.qcow2"))
    assert "--size" in fails("convert", str(savevm_stream), str(tmp_path / "o.qcow2"), "--name", "a")
    assert not list(tmp_path.glob(".*part"))
    # a corrupt image: one line, not modified
    img = tmp_path / "c.qcow2"
    shutil.copy(SAVEVM, img)
    with open(img, "r+b") as f:
        f.seek(72)
        feats = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", feats | 2))
    before = sha(img)
    assert "marked corrupt" in fails("convert", str(savevm_stream), str(img), "--name", "x")
    assert sha(img) == before
    # an image a running QEMU holds open
    need(QEMU, "qemu-system-x86_64")
    img = tmp_path / "busy.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    before = sha(img)
    with Qemu(QEMU or "", ["-M", "pc", "-m", "16", "-S", "-nodefaults", "-accel", "tcg",
                           "-drive", f"file={img},format=qcow2,if=virtio"], tmp_path / "busy") as vm:
        assert vm.qmp("query-status")["status"] == "prelaunch"
        line = fails("convert", str(savevm_stream), str(img), "--name", "x")
        assert "is in use" in line
        vm.quit()
    assert sha(img) == before
    # pages loadvm cannot decode: refused, the image keeps its size and stays clean
    img = tmp_path / "small.qcow2"
    ok("convert", str(savevm_stream), str(img), "--name", "fine", "--size", "32M")
    size = img.stat().st_size
    line = fails("convert", str(require_fixture("compress-7.2")), str(img), "--name", "bad")
    assert "compressed (COMPRESS_PAGE) pages" in line and "--to mapped-ram" in line
    assert img.stat().st_size == size and "bad" not in snapshot_list(img)
    img_check(img)
    assert not (tmp_path / "never.qcow2").exists()
    fails("convert", str(require_fixture("compress-7.2")), str(tmp_path / "never.qcow2"), "--name", "bad", "--size",
          "32M")
    assert not (tmp_path / "never.qcow2").exists() and not list(tmp_path.glob(".*part"))
    # IN is never modified
    h = sha(savevm_stream)
    ok("convert", str(savevm_stream), str(img), "--name", "x")
    assert sha(savevm_stream) == h


# ------------------------------------------------------------------------------ real QEMU loads


def ticks(vm: Qemu) -> list[int]:
    return [int(x) for x in re.findall(r"tick (\d+)", vm.serial())]


def assert_guest_runs(vm: Qemu, timeout: float = 90) -> None:
    """The guest continues: running, ticks advance, and the first tick seen is not a fresh boot."""
    deadline = time.monotonic() + timeout
    while vm.qmp("query-status")["status"] != "running":
        assert time.monotonic() < deadline, vm.qmp("query-migrate")
        time.sleep(0.2)
    while True:
        t = ticks(vm)
        if len(t) >= 10:
            break
        assert time.monotonic() < deadline, f"guest does not tick: {vm.serial()[-500:]!r}"
        time.sleep(0.2)
    assert t[0] > 3 and t == sorted(t), t[:5]
    assert "QEVM-GUEST-READY" not in vm.serial()  # not rebooted


def meta(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def test_loadvm_of_a_written_snapshot(savevm_stream: Path, tmp_path: Path) -> None:
    """QEMU 7.2 restores, with -loadvm, a snapshot qevm wrote into a new image (and into a QEMU 10.0
    extended-L2 image), and the Linux guest keeps running."""
    need(QEMU, "qemu-system-x86_64")
    ok("convert", str(savevm_stream), str(tmp_path / "new.qcow2"), "--name", "restored", "--size", "32M")
    # extended L2 entries, 32 KiB clusters, made by qemu-img
    subprocess.run([QEMU_IMG or "qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "extended_l2=on,cluster_size=32768", str(tmp_path / "extl2.qcow2"), "32M"], check=True)
    ok("convert", str(savevm_stream), str(tmp_path / "extl2.qcow2"), "--name", "restored")
    for name in ("new", "extl2"):
        img = tmp_path / f"{name}.qcow2"
        args = [a if not a.startswith("file=") else f"file={img},format=qcow2,if=virtio,id=drive0"
                for a in destination_args(meta("savevm-pc-7.2"))]
        with Qemu(QEMU or "", [*args, "-loadvm", "restored"], tmp_path / name) as vm:
            assert_guest_runs(vm)
            vm.quit()
        img_check(img)


def test_mapped_ram_loads_into_qemu_7_2_after_round_trip(tmp_path: Path) -> None:
    """A 7.2 stream with compressed pages -> mapped-ram (pages inflated) -> plain: QEMU 7.2 loads it
    (without the compress capability) and the guest keeps ticking.  (The xbzrle-7.2 fixture's
    dirty-workload guest oopses when QEMU loads even the original stream, so it cannot serve.)"""
    need(QEMU, "qemu-system-x86_64")
    src = require_fixture("compress-7.2")
    m = tmp_path / "x.mapped"
    out = ok("convert", str(src), str(m), "--to", "mapped-ram")
    assert "XBZRLE/compressed pages applied" in out
    plain = tmp_path / "x.mig"
    ok("convert", str(m), str(plain), "--to", "stream")
    with Qemu(QEMU or "", [*destination_args(meta("compress-7.2")), "-incoming", f"exec:cat {plain}"],
              tmp_path / "q") as vm:
        assert_guest_runs(vm)
        vm.quit()


@pytest.fixture(scope="module")
def chroot10() -> Iterator[tuple[Path, Path, str]]:
    try:
        from gen_qemu10 import chroot_dir, guest_in_chroot
        root = chroot_dir()
        guest_in_chroot(root)
    except Exception as e:  # noqa: BLE001
        need(False, f"QEMU 10.0 chroot ({e})")
        raise
    work = Path(tempfile.mkdtemp(prefix="qevm-conv-", dir=root / "tmp"))
    try:
        yield root, work, "/" + str(work.relative_to(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load10(root: Path, args: list[str], uri: str, caps: list[str], logs: Path) -> None:
    with Qemu("qemu-system-x86_64", [*args, "-incoming", "defer"], logs, chroot=str(root)) as vm:
        if caps:
            vm.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": c, "state": True} for c in caps])
        vm.qmp("migrate-incoming", uri=uri)
        assert_guest_runs(vm)
        vm.quit()


def test_qemu_10_loads_converted_mapped_ram_and_plain(chroot10: tuple[Path, Path, str], tmp_path: Path) -> None:
    """QEMU 10.0 loads (a) a mapped-ram file qevm built from a plain stream with XBZRLE pages, with the
    mapped-ram capability on, and (b) the plain stream qevm made of QEMU's own mapped-ram file."""
    root, work, inner = chroot10
    src = require_fixture("xbzrle-10.0")
    m = work / "x.mapped"
    out = ok("convert", str(src), str(m), "--to", "mapped-ram")
    assert "XBZRLE/compressed pages applied" in out
    load10(root, destination_args(meta("xbzrle-10.0")), f"file:{inner}/x.mapped", ["mapped-ram"], tmp_path / "a")
    m.unlink()
    src = require_fixture("mapped-ram-multifd-10.0")
    plain = work / "p.mig"
    ok("convert", str(src), str(plain), "--to", "stream")
    load10(root, destination_args(meta("mapped-ram-multifd-10.0")), f"file:{inner}/p.mig", [], tmp_path / "b")


def test_qemu_10_loadvm_of_a_snapshot_added_to_its_own_image(chroot10: tuple[Path, Path, str],
                                                              tmp_path: Path) -> None:
    """QEMU 10.0 end to end: a qcow2 image created by 10.0's qemu-img is the disk of a running Linux
    guest under QEMU 10.0, whose state is migrated to a plain stream; ``qevm convert`` adds that stream
    to the image as a snapshot; QEMU 10.0 restores it with ``-loadvm`` and the guest keeps ticking;
    ``qemu-img check`` of 10.0 and 7.2 finds the image clean and 10.0 lists the snapshot."""
    from gen_qemu10 import READY, booted_args, wait_ticks

    root, work, inner = chroot10
    img = work / "disk.qcow2"
    subprocess.run(["chroot", str(root), "qemu-img", "create", "-q", "-f", "qcow2", f"{inner}/disk.qcow2", "32M"],
                   check=True, timeout=60)
    args = booted_args(root, "pc", 128) + ["-drive", f"file={inner}/disk.qcow2,format=qcow2,if=virtio,id=drive0"]
    stream = work / "guest.mig"
    with Qemu("qemu-system-x86_64", args, tmp_path / "src", chroot=str(root)) as vm:
        vm.wait_serial(READY, 300)
        wait_ticks(vm, 3)
        vm.migrate(f"file:{inner}/guest.mig", timeout=300)
        vm.quit()
    out = ok("convert", str(stream), str(img), "--name", "from-qevm")
    assert "from-qevm" in out
    img_check(img, root)
    img_check(img)
    listing = subprocess.run(["chroot", str(root), "qemu-img", "snapshot", "-l", f"{inner}/disk.qcow2"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
    assert "from-qevm" in listing, listing
    with Qemu("qemu-system-x86_64", [*args, "-loadvm", "from-qevm"], tmp_path / "dst", chroot=str(root)) as vm:
        assert_guest_runs(vm)
        vm.quit()
    img_check(img, root)


def test_snapshot_copied_by_the_kernel_or_through_a_buffer(savevm_stream: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain stream file goes into the image with copy_file_range (cp's way) while it is checked; where
    the kernel refuses (EXDEV on old kernels), through a buffer.  Either way the snapshot's VM state is the
    stream byte for byte and the image is clean."""
    import errno

    from qevm.io import convert as conv

    calls: list[int] = []
    real = os.copy_file_range

    def counted(*a: Any) -> int:
        calls.append(a[2])
        return real(*a)

    def refused(*a: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device copy")

    for name, fake in (("kernel", counted), ("buffer", refused)):
        monkeypatch.setattr(os, "copy_file_range", fake)
        img = tmp_path / f"{name}.qcow2"
        conv.convert(str(savevm_stream), str(img), to="qcow2", name="s", size=32 << 20)
        monkeypatch.setattr(os, "copy_file_range", real)
        back = tmp_path / f"{name}.mig"
        conv.convert(str(img), str(back), to="stream", snapshot="s")
        assert back.read_bytes() == savevm_stream.read_bytes()
        img_check(img)
    assert sum(calls) >= savevm_stream.stat().st_size  # the kernel path really copied it all
