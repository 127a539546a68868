"""``qevm extract``: per-block sparse files equal the RAM qevm.format.memory rebuilds (every fixture:
pipes, XBZRLE, compressed, mapped-ram, qcow2 snapshots, multi-pass) and real QEMU's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ALL_STREAMS, FIXTURES, require_fixture, stream_id

from qevm.analysis.extract import extract, safe_names
from qevm.errors import QevmError
from qevm.format.events import MappedRamBitmap, RamBlock
from qevm.format.memory import RamImage
from qevm.io.reader import iter_events, read_stream

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _qevm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "qevm", *args], input=stdin, capture_output=True, env=env,
                          timeout=600)


def _same_file(path: Path, image: RamImage, block: str, size: int) -> None:
    assert path.stat().st_size == size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            n = min(1 << 22, size - pos)
            got = f.read(n)
            want = image.read(block, pos, n)
            if got != want:
                bad = next(i for i in range(0, n, 4096) if got[i:i + 4096] != want[i:i + 4096])
                pytest.fail(f"{block}: page 0x{pos + bad:x} differs")
            pos += n


def _mapped_reference(fixture: Path, tmp: Path) -> dict[str, bytes]:
    """Mapped-ram content read straight from the file: the page of every set bitmap bit."""
    heads: dict[str, RamBlock] = {}
    out: dict[str, bytes] = {}
    with open(fixture, "rb") as f:
        for ev in iter_events(str(fixture), skip_regions=True):
            if isinstance(ev, RamBlock) and ev.mapped is not None:
                heads[ev.name] = ev
            elif isinstance(ev, MappedRamBitmap):
                h = heads[ev.block]
                assert h.mapped is not None
                ps = h.mapped.page_size
                buf = bytearray(h.used_length)
                for i in range(h.used_length // ps):
                    if ev.data[i >> 3] >> (i & 7) & 1:
                        f.seek(h.mapped.pages_offset + i * ps)
                        buf[i * ps:(i + 1) * ps] = f.read(ps)
                out[ev.block] = bytes(buf)
    return out


def _streams() -> list:  # type: ignore[type-arg]
    return [pytest.param(p, id=stream_id(p)) for p in ALL_STREAMS] + \
        [pytest.param(p, id=p.stem) for p in sorted(FIXTURES.glob("*.qcow2"))]


@pytest.mark.parametrize("fixture", _streams())
def test_extract_equals_rebuilt_memory(fixture: Path, tmp_path: Path, unpacked) -> None:  # type: ignore[no-untyped-def]
    fixture = unpacked(fixture)
    out = tmp_path / "out"
    try:
        res = extract(str(fixture), str(out))
    except QevmError as e:
        assert "carries no RAM" in str(e)
        return
    doc = json.loads((out / "blocks.json").read_text())
    assert [b["name"] for b in doc["blocks"]] == [b.name for b in res.blocks]
    if "mapped-ram" in fixture.name:
        ref = _mapped_reference(fixture, tmp_path)
        assert ref
        for b in res.blocks:
            assert (out / b.file).read_bytes() == ref[b.name], b.name
        return
    image = RamImage(4096, str(tmp_path))
    try:
        an = read_stream(str(fixture), memory=image, strict=False)
        assert set(image.blocks()) == {b.name for b in res.blocks}
        for b in res.blocks:
            assert b.pages == an.blocks[b.name].pages
            _same_file(out / b.file, image, b.name, b.size)
            # holes: a file takes no more disk than the pages that carry data
            st = os.stat(out / b.file)
            data_pages = b.pages["normal"] + b.pages["xbzrle"] + b.pages["compressed"]
            assert st.st_blocks * 512 <= (data_pages + 16) * 4096 + (1 << 20)
    finally:
        image.close()


def test_extract_from_pipe_and_one_block(tmp_path: Path) -> None:
    fixture = require_fixture("xbzrle-7.2")
    r = _qevm("extract", "-", "-o", str(tmp_path / "pipe"), "--block", "pc.ram", stdin=fixture.read_bytes())
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "pipe" / "blocks.json").read_text())
    assert [b["name"] for b in doc["blocks"]] == ["pc.ram"]
    extract(str(fixture), str(tmp_path / "file"))
    assert (tmp_path / "pipe" / "pc.ram.ram").read_bytes() == (tmp_path / "file" / "pc.ram.ram").read_bytes()
    assert doc["blocks"][0]["pages"]["xbzrle"] > 0
    assert doc["blocks"][0]["guest_physical"][0] == {"addr": 0, "offset": 0, "size": 0xA0000}


def test_safe_names() -> None:
    names = safe_names(["../../x", "/etc/passwd", "a/b", "a_b", "A_B", ".hidden", "", "blocks.json", "x" * 500])
    for v in names.values():
        assert "/" not in v and not v.startswith(".") and len(v) < 140
    assert len({v.lower() for v in names.values()}) == len(names)
    assert names["blocks.json"] != "blocks.json"


def test_crafted_block_name_stays_inside(tmp_path: Path) -> None:
    fixture = require_fixture("small-pc-7.2")
    data = fixture.read_bytes()
    assert b"\x06pc.rom" in data
    crafted = tmp_path / "crafted.mig"
    crafted.write_bytes(data.replace(b"\x06pc.rom", b"\x06../../"))
    out = tmp_path / "a" / "b"
    out.parent.mkdir()
    r = _qevm("extract", str(crafted), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["crafted.mig", *[b["file"] for b in json.loads((out / "blocks.json").read_text())["blocks"]], "blocks.json"])
    assert any(b["name"] == "../../" for b in json.loads((out / "blocks.json").read_text())["blocks"])


def test_extract_errors(tmp_path: Path) -> None:
    fixture = require_fixture("small-pc-7.2")
    afile = tmp_path / "file"
    afile.write_text("x")
    r = _qevm("extract", str(fixture), "-o", str(afile))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1 and "not a directory" in r.stderr.decode()
    r = _qevm("extract", str(fixture), "-o", str(tmp_path / "d"), "--block", "nope")
    assert r.returncode == 2 and "no RAM block 'nope'" in r.stderr.decode()
    assert not (tmp_path / "d").exists()
    cut = tmp_path / "cut.mig"
    cut.write_bytes(fixture.read_bytes()[:60000])
    r = _qevm("extract", str(cut), "-o", str(tmp_path / "e"))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    assert not (tmp_path / "e").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mig", "file"]


@pytest.mark.parametrize("name", ["xbzrle-7.2", "compress-7.2"])
def test_extract_equals_qemu_destination(name: str, tmp_path: Path) -> None:
    from test_memory import HOLE, _destination_memory

    fixture = require_fixture(name)
    res = extract(str(fixture), str(tmp_path / "out"), block="pc.ram")
    ours = (tmp_path / "out" / res.blocks[0].file).read_bytes()
    theirs = _destination_memory(fixture, tmp_path, len(ours))
    lo, hi = HOLE
    assert ours[:lo] == theirs[:lo]
    bad = [a for a in range(hi, len(ours), 4096) if ours[a:a + 4096] != theirs[a:a + 4096]]
    assert not bad, f"{len(bad)} pages differ, first at 0x{bad[0]:x}"


def _no_space() -> None:  # in the child: writes past 8 MiB fail (EFBIG), as on a full disk
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))


@pytest.mark.parametrize("verb", ["extract", "core", "redact"])
def test_full_disk_leaves_nothing(verb: str, tmp_path: Path) -> None:
    fixture = require_fixture("memdump-pc-7.2")
    out = tmp_path / "out"
    args = {"extract": ["-o", str(out)], "core": ["-o", str(out)], "redact": ["--fill", "0xcc", str(out)]}[verb]
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "qevm", verb, str(fixture), *args], capture_output=True, text=True,
                       env=env, timeout=600, preexec_fn=_no_space)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["raw", "gzip"])
def test_extract_libvirt_image(fmt: str, tmp_path: Path) -> None:
    """A libvirt save image (header "LibvirtQemudSave", version 2, the domain XML, then the stream)."""
    import gzip
    import struct

    fixture = require_fixture("xbzrle-7.2")
    xml = b"<domain type='kvm'><name>guest</name></domain>\n\0"
    data_len = len(xml) + 4096
    head = b"LibvirtQemudSave" + struct.pack("<5I", 2, data_len, 1, {"raw": 0, "gzip": 1}[fmt], 0) + bytes(56)
    body = fixture.read_bytes() if fmt == "raw" else gzip.compress(fixture.read_bytes(), 1)
    img = tmp_path / "guest.save"
    img.write_bytes(head + xml + bytes(data_len - len(xml)) + body)
    a = extract(str(img), str(tmp_path / "a"), block="pc.ram")
    b = extract(str(fixture), str(tmp_path / "b"), block="pc.ram")
    assert a.blocks[0].pages == b.blocks[0].pages
    assert (tmp_path / "a" / "pc.ram.ram").read_bytes() == (tmp_path / "b" / "pc.ram.ram").read_bytes()
