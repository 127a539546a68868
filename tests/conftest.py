"""Shared test fixtures: real QEMU streams, QEMU's own scripts, QEMU binaries.

Heavy artifacts live under ``$QEVM_CACHE`` (default ``~/.cache/qevm``), as ``scripts/test.sh`` builds them:
streams from ``scripts/fixtures/make.py`` in ``$QEVM_FIXTURES`` (default ``$QEVM_CACHE/fixtures``), QEMU's
``analyze-migration.py`` in ``$QEVM_PEER`` (default ``$QEVM_CACHE/peer``, from ``scripts/fetch-peer.sh``).
Small compressed streams are committed in ``tests/data``.

A missing prerequisite (fixture, peer script, QEMU binary, Python package) skips a test on a developer's
machine and FAILS it when the environment variable ``CI`` is set: under CI nothing passes by skipping.
Skips that depend on what a fixture holds (a device absent from a machine, a stream without vmdesc) are
decided from the fixture itself and stay skips.
"""

from __future__ import annotations

import lzma
import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

DATA = Path(__file__).parent / "data"


def stream_id(p: Path) -> str:
    return p.name.removesuffix(".xz").removesuffix(".mig")

#: true when running under CI: a missing prerequisite is a failure there
IN_CI = bool(os.environ.get("CI"))
CACHE = Path(os.environ.get("QEVM_CACHE") or Path.home() / ".cache" / "qevm")
FIXTURES = Path(os.environ.get("QEVM_FIXTURES") or CACHE / "fixtures")
PEER = Path(os.environ.get("QEVM_PEER") or CACHE / "peer")


def missing(what: str, how: str) -> NoReturn:
    """``what`` is not there: fail under CI (``scripts/test.sh`` should have provided it, ``how``
    says how), skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} missing in CI ({how})", pytrace=False)
    pytest.skip(f"{what} missing ({how})")


def require_peer(version: str) -> Path:
    """QEMU ``version``'s ``scripts/analyze-migration.py`` (``$QEVM_PEER/VERSION/``)."""
    p = PEER / version / "analyze-migration.py"
    if not p.exists():
        missing(f"peer script {p}", "bash scripts/fetch-peer.sh")
    return p


def require_binary(name: str, how: str = "scripts/test.sh installs QEMU from Debian") -> str:
    """The path of program ``name`` on PATH."""
    p = shutil.which(name)
    if p is None:
        missing(f"program {name}", how)
    return p


def require_file(p: Path, how: str) -> Path:
    """An artifact of the fixture generators that is not a ``.mig`` stream (a qcow2 image, a return path)."""
    if not p.exists():
        missing(f"fixture {p}", how)
    return p
#: fixtures small enough to feed byte-at-a-time or mutate hundreds of times
SMALL_LIMIT = 400 << 10


def fixture_streams() -> list[Path]:
    """Generated fixtures, then the committed ones not generated here (same name = same stream)."""
    found = sorted(FIXTURES.glob("*.mig")) if FIXTURES.is_dir() else []
    names = {stream_id(p) for p in found}
    return found + [p for p in sorted(DATA.glob("*.mig.xz")) if stream_id(p) not in names]


ALL_STREAMS = fixture_streams()


@pytest.fixture(scope="session")
def unpacked(tmp_path_factory: pytest.TempPathFactory):
    """Path of a fixture as a plain file (``.xz`` ones decompressed once)."""
    cache: dict[Path, Path] = {}
    tmp = tmp_path_factory.mktemp("streams")

    def get(p: Path) -> Path:
        if p.suffix != ".xz":
            return p
        if p not in cache:
            out = tmp / p.name.removesuffix(".xz")
            out.write_bytes(lzma.decompress(p.read_bytes()))
            cache[p] = out
        return cache[p]

    return get


def streams(small: bool = False) -> list:
    """Parametrize over the available real streams (a skip marker when there are none)."""
    out = []
    for p in ALL_STREAMS:
        if small and p.suffix != ".xz" and p.stat().st_size > SMALL_LIMIT:
            continue
        out.append(pytest.param(p, id=stream_id(p)))
    if not out:  # tests/data is committed: only a broken checkout gets here
        if IN_CI:
            raise RuntimeError(f"no fixture streams in {FIXTURES} or {DATA}")
        return [pytest.param(None, marks=pytest.mark.skip(reason="no fixture streams"))]
    return out


def require_fixture(name: str) -> Path:
    p = FIXTURES / f"{name}.mig"
    if not p.exists():
        d = DATA / f"{name}.mig.xz"
        if d.exists():
            return d
        missing(f"fixture {name} ({p})", f"python3 scripts/fixtures/make.py {name}")
    return p


def destination_args(meta: dict) -> list[str]:
    """The QEMU command line a fixture was made with, without its monitor, serial and display options
    (a test adds its own), for starting a destination that loads the fixture."""
    args: list[str] = []
    skip = False
    for a in meta["args"]:
        if skip:
            skip = False
            continue
        if a in ("-qmp", "-serial", "-display"):
            skip = True
            continue
        args.append(a)
    return args


def fixture_meta(f: Path) -> dict:
    import json

    m = f.with_suffix(".json")
    if not m.exists():
        missing(f"fixture metadata {m}", "scripts/fixtures/make.py writes it beside the stream")
    return json.loads(m.read_text())
