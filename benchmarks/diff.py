#!/usr/bin/env python3
"""``qevm diff`` of two 1.7 GB streams against dumping both, and ``qevm compat`` of two full dumps.

Uses the big stream of ``benchmarks/run.py`` (built there, cached at ``${QEVM_CACHE:-~/.cache/qevm}/bench/
big.mig``) and a second one made from it by ``qevm edit`` (two RAM pages and one CPU register changed:
``big-edited.mig``, cached).  Every command runs ``--runs`` times, alternating, warm page cache; the best
wall time and the peak RSS (GNU time) are printed side by side with the targets: ``qevm diff A B`` within
1.5x of ``qevm dump A`` + ``qevm dump B``, with a plain file on each side and with a pipe as either side;
peak RSS <= 64 MB; compat of two -dump-vmstate files well under a second.  ``--check`` makes a missed
target exit 1.  ``--baseline DIR``: the diff rows of another qevm tree (e.g. ``git archive`` of an older
commit), timed in the same rounds, marked "(before)".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import compile_once  # noqa: E402

TIME_BIN = shutil.which("time", path="/usr/bin:/bin")
DIFF_VS_DUMPS = 1.5
MAX_RSS_MB = 64.0


def cache_root() -> Path:
    env = os.environ.get("QEVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qevm"


def qevm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qevm.cli.main", *args]


def timed(argv: list[str], shell: bool = False, src: Path = REPO / "src") -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run."""
    if TIME_BIN is None:
        raise SystemExit("GNU time (/usr/bin/time) is needed: apt-get install time")
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        cmd = [TIME_BIN, "-f", "%e %M", "-o", tf.name, "--"]
        cmd += ["sh", "-c", argv[0]] if shell else argv
        env = {**os.environ, "PYTHONPATH": str(src)}
        t0 = time.monotonic()
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        wall = time.monotonic() - t0
        if r.returncode not in (0, 1):
            raise SystemExit(f"{argv}: exit {r.returncode}: {r.stderr.decode()[-300:]}")
        parts = tf.read().split()
        return wall, int(parts[-1]) / 1024


def ensure_pair() -> tuple[Path, Path]:
    bench = cache_root() / "bench"
    a, b = bench / "big.mig", bench / "big-edited.mig"
    if not a.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--build-only"], check=True)
    if not b.exists():
        page = bench / "page.bin"
        page.write_bytes(bytes(range(256)) * 16)
        part = bench / "big-edited.part.mig"
        subprocess.run(qevm_cmd("edit", str(a), str(part), "--set-page", f"pc.ram:0x1000000=@{page}",
                                "--set-page", f"pc.ram:0x1001000=@{page}", "--set", "cpu:0/env.regs[3]=0x1234"),
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.DEVNULL)
        os.replace(part, b)
    return a, b


def compat_seconds() -> float | None:
    from qevm.analysis.compat import compat, side_from_dump

    dumps = sorted((cache_root() / "compat-matrix").glob("dump-*-pc-q35-7.2.json"))
    if len(dumps) < 2:
        return None
    t0 = time.perf_counter()
    s = side_from_dump(str(dumps[0]), json.loads(dumps[0].read_text()))
    d = side_from_dump(str(dumps[1]), json.loads(dumps[1].read_text()))
    compat(s, [d])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--baseline", metavar="DIR", type=Path,
                    help="another qevm tree (its src/ is used): its diff rows are timed in the same rounds, "
                         "marked (before)")
    args = ap.parse_args()
    compile_once()
    a, b = ensure_pair()
    src = REPO / "src"

    def diff_rows(tree: Path, mark: str) -> dict[str, tuple[list[str], bool, Path]]:
        py = f"PYTHONPATH={tree} {sys.executable} -m qevm.cli.main"
        return {
            f"qevm diff A B{mark}": (qevm_cmd("diff", str(a), str(b)), False, tree),
            f"cat A | qevm diff - B{mark}": ([f"cat {a} | {py} diff - {b}"], True, tree),
            f"cat B | qevm diff A -{mark}": ([f"cat {b} | {py} diff {a} -"], True, tree),
        }

    cmds: dict[str, tuple[list[str], bool, Path]] = {
        "qevm dump A": (qevm_cmd("dump", str(a)), False, src),
        "qevm dump B": (qevm_cmd("dump", str(b)), False, src),
        "cat A | qevm dump -": ([f"cat {a} | PYTHONPATH={src} {sys.executable} -m qevm.cli.main dump -"], True, src),
        **diff_rows(src, ""),
        "qevm diff --no-ram A B": (qevm_cmd("diff", "--no-ram", str(a), str(b)), False, src),
    }
    if args.baseline is not None:
        cmds.update(diff_rows(args.baseline.resolve() / "src", " (before)"))
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.runs):
        for name, (argv, shell, tree) in cmds.items():
            wall, rss = timed(argv, shell, tree)
            old = best.get(name)
            best[name] = (min(wall, old[0]) if old else wall, max(rss, old[1]) if old else rss)
    dumps = best["qevm dump A"][0] + best["qevm dump B"][0]
    ratio = best["qevm diff A B"][0] / dumps
    pipes = [best[n][0] for n in best if n.startswith("cat") and "diff" in n and "(before)" not in n]
    pipe_ratio = max(pipes) / dumps
    # the pipe's own cost (cat, a copy through the kernel) is in the anchor too: a pipe dumped, a file dumped
    pipe_anchor = best["cat A | qevm dump -"][0] + min(best["qevm dump A"][0], best["qevm dump B"][0])
    rss = max(best[n][1] for n in best if "diff" in n and "(before)" not in n)
    cs = compat_seconds()
    fig = {"stream_bytes": a.stat().st_size, "best_seconds": {k: round(v[0], 2) for k, v in best.items()},
           "peak_rss_mb": {k: round(v[1], 1) for k, v in best.items()}, "diff_vs_dumps": round(ratio, 2),
           "pipe_diff_vs_dumps": round(pipe_ratio, 2),
           "pipe_diff_vs_pipe_dump_plus_dump": round(max(pipes) / pipe_anchor, 2),
           "compat_two_dumps_seconds": None if cs is None else round(cs, 3)}
    if args.json:
        print(json.dumps(fig, indent=1))
    else:
        print(f"streams: {a.stat().st_size / 1e9:.2f} GB each (best of {args.runs}, warm cache)")
        print(f"{'command':38} {'seconds':>8} {'peak RSS MB':>12}")
        for k, (w, r) in best.items():
            print(f"{k:38} {w:8.2f} {r:12.1f}")
        print(f"qevm diff / (dump A + dump B) = {ratio:.2f}, with a pipe side {pipe_ratio:.2f} "
              f"(target <= {DIFF_VS_DUMPS}); peak RSS {rss:.1f} MB (target <= {MAX_RSS_MB:.0f})")
        print(f"with a pipe side / (cat A | qevm dump - + dump B) = {max(pipes) / pipe_anchor:.2f}")
        if cs is not None:
            print(f"qevm compat, two full -dump-vmstate files (in process): {cs:.3f} s")
    missed = max(ratio, pipe_ratio) > DIFF_VS_DUMPS or rss > MAX_RSS_MB
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
