"""Entry point: dispatch to a verb module; every qevm error becomes one line and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from qevm.errors import QevmError

#: the verbs, in the order ``qevm --help`` lists them: each is the module ``qevm.cli.NAME`` with
#: ``add_parser(sub)``; only the verb being run is imported (the others cost startup time)
VERBS = ("dump", "desc", "info", "rewrite", "edit", "record", "tap", "send", "vm", "diff", "compat", "convert",
         "report", "extract", "redact", "core", "scan")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every verb's, or with ``only`` just that verb's (the others are listed by
    name so that a typo still gets argparse's "invalid choice" message)."""
    p = argparse.ArgumentParser(prog="qevm", description="Read and write QEMU VM-state (savevm / migration) streams.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERBS:
        if only is None or name == only:
            importlib.import_module(f"qevm.cli.{name}").add_parser(sub)
    return p


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb on the command line when it comes first (``qevm VERB ...``), else None."""
    return argv[0] if argv and argv[0] in VERBS else None


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(_verb_of(argv))
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
