"""The qevm verbs on real QEMU streams, from files, pipes and compressed files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, FIXTURES, fixture_meta, require_file, require_fixture, require_peer, streams

SRC = str(Path(__file__).resolve().parent.parent / "src")


def qevm(*args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], input=stdin, capture_output=True,
                       timeout=600, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    if check and r.returncode != 0:
        raise AssertionError(f"qevm {' '.join(args)} exited {r.returncode}: {r.stderr.decode()}")
    return r


@pytest.mark.parametrize("path", streams())
def test_dump_every_fixture(path: Path, unpacked) -> None:
    f = unpacked(path)
    doc = json.loads(qevm("dump", str(f)).stdout)
    assert doc["file_version"] == 3
    assert doc["size"] == f.stat().st_size
    names = [s["name"] for s in doc["sections"]]
    assert "ram" in names
    ram = next(s for s in doc["sections"] if s["name"] == "ram")["ram"]
    assert ram["blocks"] and sum(ram["pages"].values()) > 0
    devices = [s for s in doc["sections"] if s["kind"] == "device"]
    assert devices
    if doc["vmdesc"]:
        assert all("fields" in s for s in devices), [s["name"] for s in devices if "fields" not in s]
    # sizes account for every byte between the header and the EOF
    info = json.loads(qevm("info", "--json", str(f)).stdout)
    sized = sum(s["size"] for s in info["sections"])
    assert sized < info["eof_offset"]


@pytest.mark.parametrize("name", ["pc-10.0-small", "small-pc-7.2", "xbzrle-7.2", "s390x-7.2"])
def test_pipe_equals_file(name: str, unpacked) -> None:
    f = unpacked(require_fixture(name))
    a = qevm("dump", str(f)).stdout
    b = qevm("dump", "-", stdin=f.read_bytes()).stdout
    assert a == b
    assert qevm("info", "-", stdin=f.read_bytes()).stdout == qevm("info", str(f)).stdout


def test_compressed_input_is_undone() -> None:
    for p in sorted(DATA.glob("*.mig.xz")):
        doc = json.loads(qevm("dump", str(p)).stdout)
        assert doc["vmdesc"] and doc["configuration"]["machine"].startswith("pc-i440fx")


def test_desc(unpacked) -> None:
    f = unpacked(require_fixture("pc-7.2"))
    raw = qevm("desc", "--raw", str(f)).stdout
    data = f.read_bytes()
    assert data.endswith(raw[:-1])
    pretty = json.loads(qevm("desc", str(f)).stdout)
    assert pretty == json.loads(raw)
    assert json.loads(qevm("desc", "-", stdin=data).stdout) == pretty
    r = qevm("desc", str(unpacked(require_fixture("postcopy-7.2"))), check=False)
    assert r.returncode == 2 and "no vmdesc" in r.stderr.decode()


def test_info_text_and_json(unpacked) -> None:
    f = unpacked(require_fixture("xbzrle-7.2"))
    meta = json.loads(f.with_suffix(".json").read_text()) if f.with_suffix(".json").exists() else {}
    text = qevm("info", str(f)).stdout.decode()
    assert "pc-i440fx-7.2" in text and "xbzrle" in text
    doc = json.loads(qevm("info", "--json", str(f)).stdout)
    pages = doc["ram"]["pages"]
    assert pages["xbzrle"] > 0
    assert doc["ram"]["passes"] >= 2
    q = meta.get("query_migrate")
    if q:  # QEMU's own counters for the migration that wrote this stream
        assert pages["normal"] == q["ram"]["normal"] and pages["zero"] == q["ram"]["duplicate"]
    assert doc["qemu"]["min"] == "7.2"


@pytest.mark.parametrize("name", ["pc-7.2", "q35-7.2", "xbzrle-10.0", "q35-10.0"])
def test_page_counts_match_qemu_counters(name: str, unpacked) -> None:
    fx = require_fixture(name)
    q = fixture_meta(fx)["query_migrate"]
    f = unpacked(fx)
    pages = json.loads(qevm("info", "--json", str(f)).stdout)["ram"]["pages"]
    assert (pages["normal"], pages["zero"]) == (q["ram"]["normal"], q["ram"]["duplicate"])


def test_info_compressed_and_commands(unpacked) -> None:
    doc = json.loads(qevm("info", "--json", str(unpacked(require_fixture("compress-7.2")))).stdout)
    assert doc["ram"]["pages"]["compressed"] > 0 and doc["qemu"]["max"] == "9.0"
    doc = json.loads(qevm("info", "--json", str(unpacked(require_fixture("postcopy-7.2")))).stdout)
    for c in ("OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD", "PACKAGED",
              "POSTCOPY_LISTEN", "POSTCOPY_RUN"):
        assert doc["commands"].get(c), c
    assert not doc["vmdesc"]
    doc = json.loads(qevm("info", "--json", str(unpacked(require_fixture("q35-10.0")))).stdout)
    assert doc["commands"].get("SWITCHOVER_START") == 1 and doc["qemu"]["min"] == "10.0"


def test_special_sections(unpacked) -> None:
    want = {"ppc64-pseries-7.2": "spapr/htab", "s390x-7.2": "s390-storage_attributes",
            "dirty-bitmap-7.2": "dirty-bitmap", "block-7.2": "block"}
    for fx, section in want.items():
        doc = json.loads(qevm("dump", str(unpacked(require_fixture(fx)))).stdout)
        s = next(s for s in doc["sections"] if s["name"] == section)
        assert s["kind"] == "live" and s["records"], (fx, s)
    doc = json.loads(qevm("dump", str(unpacked(require_fixture("block-7.2")))).stdout)
    s = next(s for s in doc["sections"] if s["name"] == "block")
    assert s["records"]["block"] > 0 and s["records"]["progress"] > 0


def test_configuration_subsections(unpacked) -> None:
    doc = json.loads(qevm("dump", str(unpacked(require_fixture("ignore-shared-7.2")))).stdout)
    conf = doc["configuration"]
    assert conf["capabilities"] == ["x-ignore-shared"] and conf["uuid"]
    ram = next(s for s in doc["sections"] if s["name"] == "ram")["ram"]
    assert all("addr" in b for b in ram["blocks"])
    doc = json.loads(qevm("dump", str(unpacked(require_fixture("aarch64-virt-7.2")))).stdout)
    assert doc["configuration"]["page_bits"] == 12 and doc["page_size"] == 4096
    doc = json.loads(qevm("dump", str(unpacked(require_fixture("mapped-ram-10.0")))).stdout)
    assert doc["configuration"]["capabilities"] == ["mapped-ram"]
    ram = next(s for s in doc["sections"] if s["name"] == "ram")["ram"]
    assert ram["pages"]["normal"] > 1000 and all("mapped_ram" in b for b in ram["blocks"])


def test_schema_from_another_stream(tmp_path: Path, unpacked) -> None:
    """A stream with its vmdesc cut off decodes with --schema pointing at the original."""
    f = unpacked(require_fixture("pc-7.2"))
    data = f.read_bytes()
    eof = json.loads(qevm("info", "--json", str(f)).stdout)["eof_offset"]
    bare = tmp_path / "bare.mig"
    bare.write_bytes(data[:eof + 1])
    full = json.loads(qevm("dump", str(f)).stdout)
    without = json.loads(qevm("dump", str(bare)).stdout)
    assert not without["vmdesc"] and all("fields" not in s for s in without["sections"])
    with_schema = json.loads(qevm("dump", str(bare), "--schema", str(f)).stdout)
    assert [s.get("fields") for s in with_schema["sections"]] == [s.get("fields") for s in full["sections"]]
    vm = tmp_path / "vmdesc.json"
    vm.write_bytes(qevm("desc", "--raw", str(f)).stdout)
    assert json.loads(qevm("dump", str(bare), "--schema", str(vm)).stdout)["sections"] == with_schema["sections"]


def test_schema_for_postcopy_stream(tmp_path: Path, unpacked) -> None:
    pc = unpacked(require_fixture("postcopy-7.2"))
    doc = json.loads(qevm("dump", str(pc), "--schema", str(unpacked(require_fixture("xbzrle-7.2")))).stdout)
    decoded = [s for s in doc["sections"] if "fields" in s]
    assert len(decoded) >= 30
    dv = tmp_path / "dump-vmstate.json"
    subprocess.run(["qemu-system-x86_64", "-M", "pc", "-dump-vmstate", str(dv)], check=True, timeout=60,
                   capture_output=True)
    doc = json.loads(qevm("dump", str(pc), "--schema", str(dv)).stdout)
    rtc = next(s for s in doc["sections"] if s["name"] == "mc146818rtc")
    assert "cmos_data" in rtc["fields"]
    guessed = [s for s in doc["sections"] if "fields" in s]
    assert len(guessed) >= 8


def test_memory_dump_small(unpacked) -> None:
    f = unpacked(require_fixture("small-pc-7.2"))
    doc = json.loads(qevm("dump", "--memory", str(f)).stdout)
    mem = doc["memory"]
    assert "pc.bios" in mem
    data = f.read_bytes()
    # every normal page printed is a substring of the stream (it was sent verbatim)
    for page in list(mem["pc.bios"].values())[:8]:
        b = bytes.fromhex(page)
        assert len(b) == 4096 and (b in data or b == bytes(4096))


def test_qcow2_snapshot_input(tmp_path: Path) -> None:
    """`savevm` stores the stream inside the qcow2 image: every verb reads it with --snapshot."""
    img = require_file(FIXTURES / "savevm-pc-7.2.qcow2",  # the artifact is a .qcow2, not a .mig
                       "python3 scripts/fixtures/make.py savevm-pc-7.2")
    doc = json.loads(qevm("dump", str(img), "--snapshot", "snap1").stdout)
    assert doc["vmdesc"] and all("fields" in s for s in doc["sections"] if s["kind"] == "device")
    assert json.loads(qevm("info", "--json", str(img)).stdout)["machine"] == "pc-i440fx-7.2"
    out = tmp_path / "snap.mig"
    qevm("rewrite", str(img), str(out), "--snapshot", "snap1")
    assert json.loads(qevm("dump", str(out)).stdout)["sections"] == doc["sections"]
    r = qevm("dump", str(img), "--snapshot", "nosuch", check=False)
    assert r.returncode == 2 and "snap1" in r.stderr.decode()
    r = qevm("dump", str(out), "--snapshot", "snap1", check=False)
    assert r.returncode == 2 and "qcow2" in r.stderr.decode()


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_cli_analyze_migration_format_matches_peer(version: str, unpacked) -> None:
    """`qevm dump --format analyze-migration --peer-version V` prints what QEMU V's script prints."""
    script = require_peer(version)
    f = unpacked(require_fixture("small-pc-7.2"))
    want = subprocess.run([sys.executable, str(script), "-f", str(f)], capture_output=True, timeout=300, check=True)
    got = qevm("dump", "--format", "analyze-migration", "--peer-version", version, str(f))
    assert got.stdout == want.stdout
    piped = qevm("dump", "--format", "analyze-migration", "--peer-version", version, "-", stdin=f.read_bytes())
    assert piped.stdout == want.stdout
