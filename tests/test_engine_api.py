"""The engine's migration API against QEMU 10.0's: every ``migrate-set-parameters`` request below is
sent to the real QEMU 10.0 (the trixie chroot, ``-machine none``) and to a ``qevm vm``; both must
answer the same, and ``query-migrate-parameters`` must report the same values afterwards.  ``rdma:``
URIs fail with QEMU's words (QEMU on a host without an RDMA device)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_engine import ENV, MIB, VM, run, vms

QEMU10 = Path.home() / ".cache" / "qevm" / "trixie"



@pytest.fixture
def work() -> Any:
    d = Path(tempfile.mkdtemp(prefix="qe-"))  # short: unix socket paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


P = "migrate-set-parameters"
# (command, arguments): accepted ones change the state the later queries report
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("query-migrate-parameters", {}),
    *[(P, {k: v}) for k, vs in {
        "throttle-trigger-threshold": [0, 101, -1, "x", 60], "cpu-throttle-initial": [0, 100, 30],
        "cpu-throttle-increment": [0, 100, 5], "max-cpu-throttle": [0, 100, 29, 90],
        "max-bandwidth": [-1, 1.5, "x", 1 << 62], "avail-switchover-bandwidth": [1 << 40],
        "downtime-limit": [2000001, 1 << 64, 500], "x-checkpoint-delay": [-1, 1 << 32, 100],
        "multifd-channels": [0, 256, -1, 4], "multifd-zlib-level": [10, 9], "multifd-zstd-level": [21, 20],
        "multifd-qatzip-level": [0, 10, 9], "xbzrle-cache-size": [1000, 4095, 1 << 20],
        "max-postcopy-bandwidth": [1 << 30], "announce-initial": [100001, 7], "announce-max": [100001, 70],
        "announce-rounds": [1001, 3], "announce-step": [0, 10001, 9],
        "x-vcpu-dirty-limit-period": [0, 1001, -1, 500], "vcpu-dirty-limit": [0, 10],
        "multifd-compression": ["bogus", "qatzip", "qpl", "uadk", 5, "zstd"],
        "mode": ["x", 1], "zero-page-detection": ["x", "legacy"], "direct-io": ["x"],
        "cpu-throttle-tailslow": [True], "tls-creds": [5, "c0", None], "tls-hostname": ["h"], "tls-authz": ["a"],
        "compress-level": [1], "block-incremental": [True], "bogus": [1],
        "block-bitmap-mapping": [
            "x", [{"node-name": "x"}], [{"node-name": "x", "alias": "y", "bitmaps": [{"name": "b"}]}],
            [{"node-name": "x", "alias": "y", "bitmaps": [{"name": "b", "alias": "c"}, {"name": "b", "alias": "d"}]}],
            [{"node-name": "x", "alias": "y", "bitmaps": []}, {"node-name": "z", "alias": "y", "bitmaps": []}],
            [{"node-name": "x", "alias": "y", "bitmaps": []}, {"node-name": "x", "alias": "z", "bitmaps": []}],
            [{"node-name": "x", "alias": "", "bitmaps": []}],
            [{"node-name": "x", "alias": "y", "bitmaps": [{"name": "b", "alias": "c",
                                                            "transform": {"persistent": True}}]}]],
    }.items() for v in vs],
    (P, {"cpu-throttle-initial": 95}),  # above max-cpu-throttle (90): the merged check refuses it
    (P, {"cpu-throttle-initial": 50, "max-cpu-throttle": 40}),
    (P, {"multifd-channels": 8, "downtime-limit": 2000001}),  # all or nothing: channels stay 4
    (P, {}),
    ("query-migrate-parameters", {}),
]


def _qemu10_replies(requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    if not (QEMU10 / "usr" / "bin" / "qemu-system-x86_64").exists():
        if os.environ.get("CI"):
            pytest.fail("the QEMU 10.0 chroot is missing (scripts/chroot.sh)")
        pytest.skip("the QEMU 10.0 chroot is missing (scripts/chroot.sh)")
    return _qemu_replies(["chroot", str(QEMU10), "qemu-system-x86_64"], requests)


def test_parameters_answer_as_qemu_10(work: Path) -> None:
    expected = _qemu10_replies(REQUESTS)

    async def go() -> list[Any]:
        async with vms(VM(work, "a")) as (a,):
            return [await _raw(a, c, args) for c, args in REQUESTS]

    got = run(go())
    for (c, args), want, have in zip(REQUESTS, expected, got, strict=True):
        assert have == want, f"{c} {args}: QEMU 10.0 said {want}, the engine {have}"
    # the final report carries every value set above, in QEMU's own spelling
    assert got[-1]["block-bitmap-mapping"][0]["bitmaps"][0]["transform"] == {"persistent": True}
    assert got[-1]["multifd-channels"] == 4 and got[-1]["max-bandwidth"] == 1 << 62


async def _raw(vm: VM, cmd: str, args: dict[str, Any]) -> Any:
    from qemu.qmp import ExecuteError

    try:
        return await vm.cmd(cmd, args)
    except ExecuteError as e:
        return {"class": e.error.error.class_, "desc": e.error.error.desc}


def test_rdma_refused_with_qemus_words(work: Path) -> None:
    async def go() -> None:
        from qemu.qmp import ExecuteError

        async with vms(VM(work, "a"), VM(work, "b", "--incoming", "defer")) as (a, b):
            await a.enable_events()
            a.mark()
            for uri, why in (("rdma:127.0.0.1:4444", "RDMA ERROR: could not create CM channel"),
                             ("rdma:[::1]:5", "RDMA ERROR: could not create CM channel"),
                             ("rdma:x", "RDMA ERROR: bad RDMA migration address 'x'")):
                with pytest.raises(ExecuteError) as ei:
                    await a.cmd("migrate", {"uri": uri})
                assert ei.value.error.error.desc == why
                assert await a.cmd("query-migrate") == {"status": "failed", "error-desc": why}
            assert [d["status"] for _, d in a.event_names("MIGRATION")] == ["setup", "failed"] * 3
            assert await a.status() == "running"
            with pytest.raises(ExecuteError) as ei:
                await b.cmd("migrate-incoming", {"uri": "rdma:127.0.0.1:4444"})
            assert ei.value.error.error.desc == "RDMA ERROR: could not create rdma event channel"
            # the refusal leaves the destination usable: a real migration still goes through
            await b.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await b.cmd("query-migrate"))["socket-address"][0]["port"]
            await a.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            assert (await a.wait_migration())["status"] == "completed"
            assert (await b.wait_migration())["status"] == "completed"

    run(go())


def test_unimplemented_parameter_values_refused_at_migrate(work: Path) -> None:
    async def go() -> None:
        from qemu.qmp import ExecuteError

        async with vms(VM(work, "a")) as (a,):
            for k, v in (("tls-creds", "c0"), ("mode", "cpr-reboot"), ("direct-io", True)):
                await a.cmd(P, {k: v})
                with pytest.raises(ExecuteError) as ei:
                    await a.cmd("migrate", {"uri": f"file:{work}/x.mig"})
                assert k in ei.value.error.error.desc and "does not implement" in ei.value.error.error.desc
                assert await a.cmd("query-migrate") == {}
                await a.cmd(P, {k: None if k == "tls-creds" else {"mode": "normal", "direct-io": False}[k]})
            await a.cmd("migrate", {"uri": f"file:{work}/x.mig"})
            assert (await a.wait_migration())["status"] == "completed"

    run(go())


# -- the debug-migration device ---------------------------------------------------------------------------

def _qevm(*args: str) -> subprocess.CompletedProcess[bytes]:
    from test_engine import qevm_cli

    return qevm_cli(*args)


def test_debug_migration_device(work: Path) -> None:
    """``--device debug-migration``: the stream carries its vmdesc in a device section (magic, length,
    JSON identical to the trailer); a destination with the device loads it, one without refuses it as
    QEMU refuses an unknown section; with the trailer cut off, ``qevm dump`` still names every field."""
    from test_engine import assert_continues

    from qevm.format.selfdesc import DEBUG_MIGRATION_MAGIC
    from qevm.io.reader import read_stream

    stream = work / "a.mig"

    async def main() -> None:
        src = VM(work, "src", "--device", "debug-migration", ram="8M", dirty_rate=1000)
        async with vms(src):
            await asyncio.sleep(0.35)
            await src.cmd("migrate", {"uri": f"file:{stream}"})
            assert (await src.wait_migration())["status"] == "completed"
            digest = (await src.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"]
        dst = VM(work, "dst", "--device", "debug-migration", "--incoming", f"file:{stream}", "-S", ram="8M")
        bare = VM(work, "bare", "--incoming", "defer", ram="8M")
        async with vms(dst, bare):
            assert (await dst.wait_migration())["status"] == "completed"
            assert (await dst.cmd("x-qevm-query-machine", {"digest": True}))["ram-sha256"] == digest
            await dst.cmd("cont")
            await asyncio.sleep(0.35)
            await bare.cmd("migrate-incoming", {"uri": f"file:{stream}", "exit-on-error": False})
            info = await bare.wait_migration()
            assert info["status"] == "failed"
            assert "Unknown savevm section or instance 'debug-migration' 0" in info["error-desc"]
        assert_continues(src.lines(), dst.lines())

    run(main())

    full = _qevm("dump", str(stream))
    assert full.returncode == 0, full.stderr.decode()
    doc = json.loads(full.stdout)
    assert doc["vmdesc_source"] == "trailer"
    sec = doc["sections"][-1]
    assert sec["name"] == "debug-migration" and sec["version"] == 1
    # the payload: magic, be32 length, the trailer's JSON byte for byte
    data = stream.read_bytes()
    at = data.index(DEBUG_MIGRATION_MAGIC)
    n = int.from_bytes(data[at + 16:at + 20], "big")
    embedded = data[at + 20:at + 20 + n]
    assert data.endswith(embedded) and data[-n - 5] == 0x06  # QEMU's vmdesc record: 0x06, be32 size, JSON
    desc = json.loads(embedded)
    entry = [d for d in desc["devices"] if d["name"] == "debug-migration"][0]
    assert entry["fields"] == [{"name": "data", "size": 20 + n, "type": "buffer"}]
    # QEMU's own analyze-migration.py (7.2 and 10.0) reads the stream, the new section included
    from conftest import require_peer

    for v in ("7.2", "10.0"):
        p = subprocess.run([sys.executable, str(require_peer(v)), "-f", str(stream)], capture_output=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert "debug-migration (5)" in json.loads(p.stdout)

    # nothing after EOF (as on a postcopy channel): the embedded vmdesc names every field
    cut = work / "cut.mig"
    cut.write_bytes(data[:-n - 5])
    r = _qevm("dump", str(cut))
    assert r.returncode == 0, r.stderr.decode()
    cdoc = json.loads(r.stdout)
    assert cdoc["vmdesc"] is False and cdoc["vmdesc_source"] == "debug-migration"
    by_name = {s["name"]: s for s in cdoc["sections"]}
    assert by_name["cpu"]["fields"] == {s["name"]: s for s in doc["sections"]}["cpu"]["fields"]
    assert "fields" in by_name["serial"] and "fields" in by_name["globalstate"]
    # without the device the same cut stream decodes no field
    plain = work / "plain.mig"

    async def plain_stream() -> None:
        v = VM(work, "p", ram="8M")
        async with vms(v):
            await v.cmd("migrate", {"uri": f"file:{plain}"})
            assert (await v.wait_migration())["status"] == "completed"

    run(plain_stream())
    pdata = plain.read_bytes()
    eof = read_stream(str(plain)).eof_offset
    assert eof is not None and pdata[eof] == 0x00  # QEMU_VM_EOF
    (work / "pcut.mig").write_bytes(pdata[:eof + 1])
    r = _qevm("dump", str(work / "pcut.mig"))
    assert r.returncode == 0, r.stderr.decode()
    pdoc = json.loads(r.stdout)
    assert pdoc["vmdesc_source"] is None
    assert all("fields" not in s for s in pdoc["sections"])


def test_debug_migration_bad_device_name(work: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "qevm", "vm", "--qmp", f"unix:{work}/q", "--device", "nosuch"],
                       env=ENV, capture_output=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "'nosuch' is not a valid device model name" in lines[0], lines


# -- savevm into a qcow2 drive ------------------------------------------------------------------------------

def _snapshot_list(img: Path) -> list[list[str]]:
    """``qemu-img snapshot -l`` (QEMU 7.2's tool) rows: ID, TAG, VM_SIZE value and unit, DATE, TIME, CLOCK."""
    r = subprocess.run(["qemu-img", "snapshot", "-l", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    if not lines:
        return []
    assert lines[0] == "Snapshot list:"
    return [ln.split() for ln in lines[2:]]


def _check_clean(img: Path) -> None:
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "No errors were found on the image." in r.stdout, r.stdout + r.stderr


def test_savevm_into_qcow2_drive(work: Path) -> None:
    """``--drive FILE.qcow2``: savevm/loadvm/delvm/info snapshots use the image's internal snapshots;
    ``qemu-img snapshot -l`` lists what ``info snapshots`` lists, ``qemu-img check`` finds the image
    clean after every change, ``qevm dump --snapshot`` reads the state, a new process loads it."""
    from conftest import require_binary

    require_binary("qemu-img")
    img = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "16M"], check=True, capture_output=True)
    raw = work / "disk.raw"
    raw.write_bytes(bytes(1 << 20))
    state: dict[str, Any] = {}

    async def main() -> None:
        vm = VM(work, "vm", "--drive", str(img), ram="8M", dirty_rate=2000)
        bare = VM(work, "bare", "--drive", str(raw), ram="8M")
        async with vms(vm, bare):
            assert await vm.hmp("info snapshots") == "There is no snapshot available.\r\n"
            await asyncio.sleep(0.3)
            assert await vm.hmp("savevm s1") == ""
            assert await vm.hmp("savevm s2") == ""
            await asyncio.sleep(0.3)
            await vm.cmd("stop")
            state["saved"] = await vm.cmd("x-qevm-query-machine", {"digest": True})
            assert await vm.hmp("savevm s1") == ""  # replaces s1: deleted first, the new one gets id 3
            rows = (await vm.hmp("info snapshots")).split("\r\n")
            assert [r.split()[1] for r in rows[2:-1]] == ["s2", "s1"]
            listed = _snapshot_list(img)
            assert [(r[0], r[1]) for r in listed] == [("2", "s2"), ("3", "s1")]
            for row, ours in zip(listed, rows[2:-1], strict=True):  # same size, date and clock as QEMU prints
                assert ours.split()[2:6] == row[2:6], (ours, row)
            _check_clean(img)
            await vm.cmd("cont")
            await asyncio.sleep(0.4)
            await vm.cmd("stop")
            assert await vm.hmp("loadvm s1") == ""
            back = await vm.cmd("x-qevm-query-machine", {"digest": True})
            assert back["ram-sha256"] == state["saved"]["ram-sha256"] and back["ops"] == state["saved"]["ops"]
            assert await vm.hmp("loadvm nope") == "Error: Snapshot 'nope' does not exist in one or more devices\r\n"
            assert await vm.hmp("loadvm 3") == "Error: Snapshot '3' does not exist in one or more devices\r\n"
            assert await vm.hmp("delvm s2") == ""
            assert await vm.hmp("delvm nope") == ""
            assert [(r[0], r[1]) for r in _snapshot_list(img)] == [("3", "s1")]
            _check_clean(img)
            # a raw drive cannot hold snapshots: QEMU's words
            assert await bare.hmp("savevm x") == ("Error: Device 'drive0' is writable but does not support "
                                                  "snapshots\r\n")
            for cmd in ("loadvm x", "delvm x"):
                assert await bare.hmp(cmd) == ("Error: Device 'drive0' is writable but does not support "
                                               "snapshots\r\n")
            assert await bare.hmp("info snapshots") == "no block device can store vmstate for snapshot\r\n"
            assert await bare.status() == "running"

    run(main())
    r = _qevm("dump", "--snapshot", "s1", str(img))
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert [s["name"] for s in doc["sections"]] == ["ram", "timer", "cpu", "serial", "globalstate"]
    cpu = [s for s in doc["sections"] if s["name"] == "cpu"][0]["fields"]
    assert cpu["ops"] == state["saved"]["ops"]

    async def again() -> None:
        vm2 = VM(work, "vm2", "--drive", str(img), "-S", ram="8M")
        async with vms(vm2):
            assert await vm2.hmp("loadvm s1") == ""
            m = await vm2.cmd("x-qevm-query-machine", {"digest": True})
            assert m["ram-sha256"] == state["saved"]["ram-sha256"]
            assert m["next-line"] == state["saved"]["next-line"]

    run(again())
    _check_clean(img)


# -- compression threads (QEMU 7.2's migration API) ------------------------------------------------------------

REQUESTS_72: list[tuple[str, dict[str, Any]]] = [
    ("query-migrate-parameters", {}),
    ("query-migrate-capabilities", {}),
    *[(P, {k: v}) for k, vs in {
        "compress-level": [10, -1, "x", 6], "compress-threads": [0, 256, 2], "decompress-threads": [0, 256, 3],
        "compress-wait-thread": [1, False], "multifd-zlib-level": [10], "multifd-zstd-level": [21],
        "mode": ["normal"], "zero-page-detection": ["none"], "avail-switchover-bandwidth": [1],
        "max-cpu-throttle": [10], "block-incremental": [True, False], "throttle-trigger-threshold": [101],
    }.items() for v in vs],
    ("query-migrate-parameters", {}),
]


def _qemu_replies(argv0: list[str], requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The replies of a real QEMU (``-machine none``, QMP on stdio) to ``requests``, in order."""
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [json.dumps({"execute": c, "arguments": a, "id": i}) for i, (c, a) in enumerate(requests)]
    lines.append(json.dumps({"execute": "quit"}))
    p = subprocess.run([*argv0, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                       input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=60)
    out: list[Any] = [None] * len(requests)
    for line in p.stdout.decode().splitlines():
        msg = json.loads(line)
        if "id" in msg:
            out[msg["id"]] = msg.get("return", msg.get("error"))
    assert None not in out, p.stdout.decode() + p.stderr.decode()
    return out


def test_migration_api_72_answers_as_qemu_72(work: Path) -> None:
    """``--migration-api 7.2``: capabilities and parameters (compress-*, decompress-threads, no 10.0-only
    ones, no multifd level checks) answer as the real QEMU 7.2 does; QEMU 10.0's API has no compress."""
    from conftest import require_binary

    expected = _qemu_replies([require_binary("qemu-system-x86_64")], REQUESTS_72)

    async def go() -> tuple[list[Any], Any, Any]:
        async with vms(VM(work, "a", "--migration-api", "7.2"), VM(work, "b")) as (a, b):
            got = [await _raw(a, c, args) for c, args in REQUESTS_72]
            version = await a.cmd("query-version")
            refused = await _raw(b, "migrate-set-capabilities",
                                 {"capabilities": [{"capability": "compress", "state": True}]})
            return got, version, refused

    got, version, refused = run(go())
    for (c, args), want, have in zip(REQUESTS_72, expected, got, strict=True):
        assert have == want, f"{c} {args}: QEMU 7.2 said {want}, the engine {have}"
    assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert refused == {"class": "GenericError", "desc": "Parameter 'capability' does not accept value 'compress'"}


def test_compression_threads_migration(work: Path) -> None:
    """compress on, 2 threads, level 6: the destination (also 7.2 API) gets the same RAM, the serial
    numbering continues, query-migrate shows QEMU 7.2's compression counters, and the stream (to a
    file) holds COMPRESS_PAGE records that qevm counts."""
    from test_engine import CountingProxy, assert_continues, incoming_port

    stream = work / "c.mig"
    state: dict[str, Any] = {}

    async def main() -> None:
        # --fill 0: the pages hold the workload's 64-byte records only (random firmware data does not deflate)
        src = VM(work, "src", "--migration-api", "7.2", "--fill", "0", ram="32M", dirty_rate=5000)
        dst = VM(work, "dst", "--migration-api", "7.2", "--incoming", "tcp:127.0.0.1:0", "-S", ram="32M")
        async with vms(src, dst):
            for vm in (src, dst):
                await vm.cmd("migrate-set-capabilities", {"capabilities": [
                    {"capability": "compress", "state": True}, {"capability": "events", "state": True}]})
            await src.cmd(P, {"compress-threads": 2, "compress-level": 6})
            await dst.cmd(P, {"decompress-threads": 2})
            await asyncio.sleep(0.4)
            proxy = CountingProxy(incoming_port(await dst.cmd("query-migrate")))
            await src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
            info = await src.wait_migration()
            assert info["status"] == "completed", info
            assert (await dst.wait_migration())["status"] == "completed"
            proxy.done.wait(10)
            comp = info["compression"]
            assert set(comp) == {"pages", "busy", "busy-rate", "compressed-size", "compression-rate"}
            assert comp["pages"] > 500 and 0 < comp["compressed-size"] < comp["pages"] * 4096
            assert comp["compression-rate"] > 1.0
            assert info["ram"]["transferred"] == proxy.count
            normal = info["ram"]["normal"]
            assert info["ram"]["transferred"] < (comp["pages"] + normal) * 4096  # less than the pages sent
            a = await src.cmd("x-qevm-query-machine", {"digest": True})
            b = await dst.cmd("x-qevm-query-machine", {"digest": True})
            assert a["ram-sha256"] == b["ram-sha256"]
            await dst.cmd("cont")
            await asyncio.sleep(0.35)
            state["lines"] = (src.lines(), dst.lines())
            # the same to a file, for qevm dump
            f = VM(work, "f", "--migration-api", "7.2", ram="16M", dirty_rate=2000)
            async with vms(f):
                await f.cmd("migrate-set-capabilities", {"capabilities": [
                    {"capability": "compress", "state": True}]})
                await f.cmd("migrate", {"uri": f"file:{stream}"})
                finfo = await f.wait_migration()
                assert finfo["status"] == "completed"
                state["pages"] = finfo["compression"]["pages"]

    run(main())
    assert_continues(*state["lines"])
    r = _qevm("dump", str(stream))
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    pages = doc["sections"][0]["ram"]["pages"]
    assert pages["compressed"] == state["pages"] > 0, pages


def test_compressed_records_load_in_qemu_72(work: Path) -> None:
    """The pool's COMPRESS_PAGE records, in a RAM-only stream for QEMU 7.2's pc-i440fx-7.2 (32 MiB,
    block pc.ram), are loaded by QEMU 7.2 (compress capability on, as its loader needs): guest memory
    read back with pmemsave equals what was sent."""
    import random

    from conftest import require_binary

    from qevm.engine.compress import CompressPool
    from qevm.format.events import (
        Configuration,
        EndOfFile,
        FileHeader,
        Footer,
        RamBlock,
        RamControl,
        RamMemSize,
        Section,
        SectionHeader,
        SectionKind,
    )
    from qevm.format.records import RamFlag, ram_record_head

    qemu = require_binary("qemu-system-x86_64")
    size, ps = 32 * MIB, 4096
    rnd = random.Random(7)
    ram = bytearray(size)
    for p in range(256, size // ps):  # from 1 MiB on: below it the guest sees ROM and VGA holes
        if p % 3:
            ram[p * ps:p * ps + 64] = rnd.randbytes(64)
    # a non-zero section id: QEMU matches PART sections on load_section_id, which is 0 for every handler
    # that no START named
    sec = Section(2, "ram", 0, 4, "ram")
    out = bytearray(FileHeader(0).encode() + Configuration(0, "pc-i440fx-7.2", []).encode())
    out += SectionHeader(0, SectionKind.START, sec).encode()
    out += RamMemSize(0, size).encode() + RamBlock(0, "pc.ram", size).encode()
    out += RamControl(0, int(RamFlag.EOS)).encode() + Footer(0, 2).encode()
    out += SectionHeader(0, SectionKind.PART, sec).encode()
    pool = CompressPool(2, 1, True, ps)
    out += ram_record_head(0, int(RamFlag.PAGE), "pc.ram") + bytes(ram[:ps])
    for p in range(1, size // ps):
        page = bytes(ram[p * ps:(p + 1) * ps])
        pool.submit(ram_record_head(p * ps, int(RamFlag.COMPRESS_PAGE | RamFlag.CONTINUE), None), page, out.extend)
    pool.flush(out.extend)
    pool.close()
    assert pool.c.pages == size // ps - 1
    out += RamControl(0, int(RamFlag.EOS)).encode() + Footer(0, 2).encode() + EndOfFile(0).encode()
    stream = work / "ram-only.mig"
    stream.write_bytes(out)
    dump = work / "mem.bin"
    reqs = [("migrate-set-capabilities", {"capabilities": [{"capability": "compress", "state": True},
                                                           {"capability": "events", "state": True}]}),
            ("migrate-incoming", {"uri": f"exec:cat {stream}"})]
    lines = [json.dumps({"execute": "qmp_capabilities"})]
    lines += [json.dumps({"execute": c, "arguments": a}) for c, a in reqs]
    proc = subprocess.Popen([qemu, "-M", "pc-i440fx-7.2", "-m", "32M", "-nodefaults", "-display", "none",
                             "-incoming", "defer", "-S", "-qmp", "stdio"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n".join(lines) + "\n")
        proc.stdin.flush()
        status = None
        for line in proc.stdout:
            msg = json.loads(line)
            seen.append(msg)
            assert "error" not in msg, msg
            if msg.get("event") == "MIGRATION" and msg["data"]["status"] in ("completed", "failed"):
                status = msg["data"]["status"]
                break
        proc.stdin.write(json.dumps({"execute": "pmemsave", "arguments": {
            "val": 1 << 20, "size": size - (1 << 20), "filename": str(dump)}}) + "\n")
        proc.stdin.write(json.dumps({"execute": "quit"}) + "\n")
        proc.stdin.flush()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == "completed", (seen, proc.stderr.read() if proc.stderr else "")
    assert dump.read_bytes() == bytes(ram[1 << 20:])


def test_unimplemented_features_refused_clearly(work: Path) -> None:
    """What the engine does not implement (auto-converge, multifd in 7.2's format) is refused up front,
    never half done."""

    async def go() -> None:
        async with vms(VM(work, "a"), VM(work, "b", "--migration-api", "7.2")) as (a, b):
            r = await _raw(a, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "auto-converge", "state": True}]})
            assert r == {"class": "GenericError",
                         "desc": "Migration capability 'auto-converge' is not supported by qevm's engine"}
            r = await _raw(b, "migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
            assert r["desc"] == "qevm's engine sends multifd as QEMU 10.0 does: use --migration-api 10.0"
            assert await _raw(a, "migrate-start-postcopy", {}) == {
                "class": "GenericError",
                "desc": "Enable postcopy with migrate_set_capability before the start of migration"}
            assert (await _raw(a, "migrate", {"uri": f"file:{work}/x", "blk": True}))["desc"] == \
                "Parameter 'blk' is unexpected"
            assert await a.cmd("query-migrate") == {} and await b.cmd("query-migrate") == {}

    run(go())
