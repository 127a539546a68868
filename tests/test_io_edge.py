"""The one decompressor and the one size formatter, against the real programs.

Streams compressed by the real ``gzip``, ``xz``, ``bzip2`` and ``zstd`` are read from a file and from a
pipe; a cut compressed stream is one clear error.  ``format_size`` prints what ``qemu-img info`` prints.
"""

from __future__ import annotations

import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, missing, require_binary

from qevm.errors import DecodeError
from qevm.io.compression import KINDS, sniff_compression
from qevm.io.reader import read_stream
from qevm.units import format_size

SRC = str(Path(__file__).resolve().parent.parent / "src")
TOOLS = {"gzip": ["gzip", "-c"], "xz": ["xz", "-c"], "bzip2": ["bzip2", "-c"], "zstd": ["zstd", "-q", "-c"]}


@pytest.fixture(scope="module")
def stream() -> bytes:
    return lzma.decompress((DATA / "small-pc-7.2.mig.xz").read_bytes())


def qevm(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qevm", *args], input=stdin, capture_output=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("kind", KINDS)
def test_compressed_file_and_pipe(kind: str, stream: bytes, tmp_path: Path) -> None:
    if kind == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            missing("Python package zstandard", "pip install -e '.[test]'")
    tool = TOOLS[kind]
    require_binary(tool[0], f"apt-get install {tool[0]}")
    packed = subprocess.run(tool, input=stream, capture_output=True, check=True).stdout
    assert sniff_compression(packed[:16]) == kind
    f = tmp_path / f"s.{kind}"
    f.write_bytes(packed)
    an = read_stream(str(f))
    assert an.size == len(stream) and an.vmdesc is not None
    plain = qevm("info", "--json", str(f))
    piped = qevm("info", "--json", "-", stdin=packed)  # a pipe: the peeked bytes go back in front
    assert plain.returncode == piped.returncode == 0, (plain.stderr, piped.stderr)
    assert plain.stdout == piped.stdout
    # cut in the middle of the compressed data: one line, exit 2, the offset where the compressed data starts
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(packed[: len(packed) // 2])
    # (zstandard's reader reports no error at a cut frame: the stream then reads as truncated)
    why = "need .* bytes" if kind == "zstd" else f"{kind}-compressed stream is damaged"
    with pytest.raises(DecodeError, match=why):
        read_stream(str(cut))
    r = qevm("dump", str(cut))
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and re.search(why, err) and "Traceback" not in err


def test_format_size_matches_qemu_img(tmp_path: Path) -> None:
    qemu_img = require_binary("qemu-img")
    for size in (512, 1536, 65536, 1000 * 1024, 1536 * 1024, 64 << 20, 1000 << 20, (3 << 30) + (1 << 29), 5 << 40):
        img = tmp_path / "x.qcow2"
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(img), str(size)], check=True)
        out = subprocess.run([qemu_img, "info", str(img)], capture_output=True, text=True, check=True).stdout
        m = re.search(r"^virtual size: (.*) \((\d+) bytes\)$", out, re.M)
        assert m and int(m.group(2)) == size
        assert format_size(size) == m.group(1), out
