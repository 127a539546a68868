"""``python -m qevm.engine vm ...``: the ``vm`` verb on its own (same as ``qevm vm ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import QevmError


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import vm

    p = argparse.ArgumentParser(prog="qevm")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    vm.add_parser(sub)
    args = p.parse_args(argv)
    try:
        return int(args.run(args))
    except QevmError as e:
        print(f"qevm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
