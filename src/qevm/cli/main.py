"""Entry point: dispatch to a verb module; every qevm error becomes one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qevm.cli import (
    compat,
    convert,
    core,
    desc,
    diff,
    dump,
    edit,
    extract,
    info,
    record,
    redact,
    report,
    rewrite,
    scan,
    send,
    tap,
    vm,
)
from qevm.errors import QevmError

VERBS = (dump, desc, info, rewrite, edit, record, tap, send, vm, diff, compat, convert, report, extract, redact, core,
         scan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qevm", description="Read and write QEMU VM-state (savevm / migration) streams.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for mod in VERBS:
        mod.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "takes_extra", False):  # a verb that passes `-- ARGS...` on (compat --qemu)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = [a for a in extra if a != "--"] if extra[:1] == ["--"] else extra
    try:
        return int(args.run(args))
    except QevmError as e:
        print(f"qevm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our output went away (e.g. `| head`): not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130
    except (MemoryError, RecursionError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        if os.environ.get("QEVM_DEBUG"):
            raise
        print(f"qevm: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
