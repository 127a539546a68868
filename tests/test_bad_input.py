"""Bad input: every truncation or corruption of a real stream gives either a clean parse or one
DecodeError naming the byte offset (and the section/field path where there is one) — never another
exception, a hang or unbounded memory.  The CLI turns it into one stderr line and exit code 2."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_fixture, streams

from qevm.analysis.document import dump_document, info_document
from qevm.errors import DecodeError
from qevm.io.reader import read_stream
from qevm.io.sources import Input

SRC = str(Path(__file__).resolve().parent.parent / "src")


def analyze(data: bytes):
    an = read_stream(Input("<mem>", io.BytesIO(data), True, None, len(data)))
    dump_document(an)
    info_document(an)
    return an


def check(data: bytes) -> DecodeError | None:
    try:
        analyze(data)
    except DecodeError as e:
        assert e.offset is not None, f"error without offset: {e}"
        assert 0 <= e.offset <= len(data) + 8, f"offset {e.offset} outside the input"
        return e
    return None


def _points(data: bytes, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    pts = set(range(0, min(len(data), 160)))
    pts |= {rng.randrange(len(data)) for _ in range(n)}
    return sorted(pts)


@pytest.mark.parametrize("path", streams(small=True))
def test_truncations(path: Path, unpacked) -> None:
    data = unpacked(path).read_bytes()
    an = analyze(data)
    eof = an.eof_offset
    errors = 0
    for p in _points(data, 250, 1):
        e = check(data[:p])
        if e is None:
            # only a cut right after the EOF byte (dropping the optional vmdesc) may parse cleanly
            assert eof is not None and p == eof + 1, f"truncation at {p} parsed without error"
        else:
            errors += 1
    assert errors > 100


@pytest.mark.parametrize("path", streams(small=True))
def test_corruptions(path: Path, unpacked) -> None:
    data = unpacked(path).read_bytes()
    rng = random.Random(2)
    for p in _points(data, 400, 3):
        b = bytearray(data)
        b[p] ^= rng.choice((0x01, 0x80, 0xFF, 0x10))
        check(bytes(b))


def _flip_json(data: bytes, an, old: bytes, new: bytes) -> bytes:
    raw = an.vmdesc_raw
    i = raw.index(old)
    assert len(old) == len(new)
    body = raw[:i] + new + raw[i + len(old):]
    start = len(data) - len(raw)
    return data[:start] + body


def test_targeted_errors(unpacked) -> None:
    data = unpacked(require_fixture("pc-10.0-small")).read_bytes()
    an = analyze(data)

    e = check(b"QEVX" + data[4:])
    assert e and e.offset == 0 and "magic" in str(e)

    e = check(data[:4] + b"\x00\x00\x00\x02" + data[8:])
    assert e and e.offset == 4 and "version" in str(e)

    # a footer naming another section
    dev = an.devices[3]
    foot = dev.offset + len(dev.data)
    assert data[foot] == 0x7E
    b = bytearray(data)
    b[foot + 4] ^= 0x01
    e = check(bytes(b))
    assert e is not None

    # an unknown top-level record type right after a footer
    b = bytearray(data)
    b[foot + 5] = 0x42
    e = check(bytes(b))
    assert e and e.offset == foot + 5 and "0x42" in str(e)

    # a vmdesc that lies about a field's size
    e = check(_flip_json(data, an, b'{"name": "env.eip", "type": "uint64", "size": 8}',
                         b'{"name": "env.eip", "type": "uint64", "size": 9}'))
    assert e and "cpu" in e.path and "env.eip" in e.path, str(e)

    # a vmdesc that is not JSON
    e = check(_flip_json(data, an, an.vmdesc_raw[:3], b"[" + an.vmdesc_raw[1:3]))
    assert e and "vmdesc" in str(e)

    # an absurd RAM size
    ram = next(s for s in an.order if s.section.idstr == "ram")
    hdr = ram.offset + 1 + 4 + 1 + 3 + 8
    b = bytearray(data)
    b[hdr] = 0x7F
    e = check(bytes(b))
    assert e and "ram" in e.path


def _cli(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qevm.cli.main", *args], input=stdin, capture_output=True,
                          timeout=120, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})


def test_cli_one_line_exit_2(tmp_path: Path, unpacked) -> None:
    data = unpacked(require_fixture("pc-10.0-small")).read_bytes()
    rng = random.Random(5)
    cases = [data[:p] for p in (0, 3, 9, 30, 1000, len(data) // 2, len(data) - 3)]
    for _ in range(6):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 0xFF
        cases.append(bytes(b))
    for i, case in enumerate(cases):
        f = tmp_path / f"bad{i}.mig"
        f.write_bytes(case)
        for verb in ("dump", "info"):
            for args, stdin in (([verb, str(f)], None), ([verb, "-"], case)):
                r = _cli(args, stdin)
                assert r.returncode in (0, 2), (args, r.stderr)
                err = r.stderr.decode()
                assert "Traceback" not in err
                if r.returncode == 2:
                    assert err.count("\n") == 1 and err.startswith("qevm: error: "), err
                    assert "offset" in err, err
                else:
                    json.loads(r.stdout) if verb == "dump" else None


def test_cli_missing_file_is_exit_2(tmp_path: Path) -> None:
    r = _cli(["dump", str(tmp_path / "nope.mig")])
    assert r.returncode == 2 and r.stderr.decode().startswith("qevm: error: cannot open")


def test_cut_before_eof_says_so(unpacked) -> None:
    data = unpacked(require_fixture("pc-10.0-small")).read_bytes()
    eof = analyze(data).eof_offset
    e = check(data[:eof])
    assert e is not None and e.offset == eof and "no EOF" in str(e), str(e)
