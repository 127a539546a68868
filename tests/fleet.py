"""A synthetic fleet of saved VM states built from real QEMU fixtures (for ``qevm scan`` tests and
``benchmarks/scan.py``).

Hardlinks and copies of small real streams (QEMU 7.2 and 10.0, i440fx and q35, aarch64, riscv64,
s390x, ppc64), ``qevm edit`` variants, truncated and otherwise damaged files, the gzip/xz wrapped
stream, libvirt save images around a real stream, the real qcow2 ``savevm`` fixture (one hardlink,
plus a cut-off copy), a file that only starts like a stream.  ``build_fleet`` returns a manifest:
relative path -> what the file is and the status a scan must give it (None when either is fine).
"""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import DATA, FIXTURES
from crafted import read_bytes
from test_containers import libvirt_image

ROOT = Path(__file__).resolve().parent.parent

#: small real streams (name -> where), each copied many times
SMALL = {
    "small-pc-7.2": DATA / "small-pc-7.2.mig.xz",
    "pc-10.0-small": DATA / "pc-10.0-small.mig.xz",
}
#: other machine types / versions / features, once each (skipped when not generated)
OTHERS = ["aarch64-virt-7.2", "riscv64-virt-7.2", "s390x-7.2", "diff-q35-7.2", "diff-q35-10.0",
          "ignore-shared-7.2", "ppc64-pseries-7.2"]  # dirty-bitmap-7.2: 52k sections, 10 s alone
QCOW2 = FIXTURES / "savevm-pc-7.2.qcow2"


@dataclass
class Entry:
    kind: str
    status: str | None  # expected scan status; None: not fixed by construction
    machine: str | None = None


def build_fleet(out: Path, copies: int = 100, seed: int = 14) -> dict[str, Entry]:
    """Build the fleet under ``out`` (which must not exist or be empty)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    man: dict[str, Entry] = {}

    def put(rel: str, data: bytes, entry: Entry) -> Path:
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        man[rel] = entry
        return p

    machines = {"small-pc-7.2": "pc-i440fx-7.2", "pc-10.0-small": "pc-i440fx-10.0"}
    originals: dict[str, bytes] = {}
    for name, src in SMALL.items():
        data = read_bytes(src)
        originals[name] = data
        first = put(f"streams/{name}.mig", data, Entry("original", "ok", machines[name]))
        for i in range(copies):  # hardlinks, and every tenth a real copy
            rel = f"copies/{name}/{i:04d}.mig"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            if i % 10:
                os.link(first, out / rel)
            else:
                (out / rel).write_bytes(data)
            man[rel] = Entry("copy", "ok", machines[name])
    put("compressed/small-pc-7.2.mig.xz", SMALL["small-pc-7.2"].read_bytes(), Entry("xz", "ok", "pc-i440fx-7.2"))
    put("compressed/pc-10.0-small.mig.gz", gzip.compress(originals["pc-10.0-small"], 1),
        Entry("gzip", "ok", "pc-i440fx-10.0"))

    for name in OTHERS:
        src = FIXTURES / f"{name}.mig"
        if src.exists():
            rel = f"machines/{name}.mig"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(src, out / rel)
            man[rel] = Entry("other machine", "ok")

    # qevm edit variants: still complete, valid streams
    base = out / "streams" / "small-pc-7.2.mig"
    for i, value in enumerate((1, 0x1234, 2**40)):
        rel = f"edits/timer-{i}.mig"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "qevm", "edit", str(base), str(out / rel),
                            "--set", f"timer/cpu_ticks_offset={value}"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        assert r.returncode == 0, r.stderr
        man[rel] = Entry("edit", "ok", "pc-i440fx-7.2")

    # damage: cut anywhere after the header, a bad header, garbage after the magic
    for name, data in originals.items():
        for k in range(12):
            cut = rng.randrange(9, len(data) - 1)
            put(f"damaged/{name}-cut{k:02d}-{cut}.mig", data[:cut], Entry("truncated", "damaged"))
        put(f"damaged/{name}-header-only.mig", data[:8], Entry("truncated", "damaged"))
        bad = bytearray(data)
        bad[4:8] = (7).to_bytes(4, "big")  # unknown file version
        put(f"damaged/{name}-version7.mig", bytes(bad), Entry("bad version", "damaged"))
    put("damaged/junk.mig", b"QEVM" + bytes(rng.randrange(256) for _ in range(4000)), Entry("junk", "damaged"))
    put("damaged/xz-cut.mig.xz", SMALL["small-pc-7.2"].read_bytes()[:5000], Entry("truncated xz", "damaged"))

    # libvirt save images around a real stream
    small = originals["small-pc-7.2"]
    put("libvirt/guest-raw.save", libvirt_image(small), Entry("libvirt", "ok", "pc-i440fx-7.2"))
    put("libvirt/guest-gzip.save", libvirt_image(small, "gzip"), Entry("libvirt", "ok", "pc-i440fx-7.2"))
    put("libvirt/guest-partial.save", libvirt_image(small[: len(small) // 2], magic=b"LibvirtQemudPart"),
        Entry("libvirt partial", "damaged", "pc-i440fx-7.2"))

    if QCOW2.exists():
        rel = "qcow2/savevm-pc-7.2.qcow2"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(QCOW2, out / rel)
        man[rel] = Entry("qcow2", "ok", "pc-i440fx-7.2")
        with open(QCOW2, "rb") as f:
            put("qcow2/cut.qcow2", f.read(256 << 10), Entry("truncated qcow2", None))
    return man
