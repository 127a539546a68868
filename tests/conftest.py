"""Shared test fixtures: real QEMU streams.

Streams come from ``scripts/fixtures/make.py`` (written to ``$QEVM_FIXTURES`` or
``~/.cache/qevm/fixtures``) and from the small compressed ones in ``tests/data``.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def stream_id(p: Path) -> str:
    return p.name.removesuffix(".xz").removesuffix(".mig")

FIXTURES = Path(os.environ.get("QEVM_FIXTURES") or Path.home() / ".cache" / "qevm" / "fixtures")
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
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="no fixture streams generated"))]


def require_fixture(name: str) -> Path:
    p = FIXTURES / f"{name}.mig"
    if not p.exists():
        d = DATA / f"{name}.mig.xz"
        if d.exists():
            return d
        if os.environ.get("CI"):
            pytest.fail(f"fixture {name} missing in CI (scripts/fixtures/make.py should have built it)")
        pytest.skip(f"fixture {name} not generated (python3 scripts/fixtures/make.py {name})")
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
        pytest.skip("fixture metadata missing")
    return json.loads(m.read_text())
