"""``python -m qevm VERB ...``: the same as the ``qevm`` command."""

import sys

from qevm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
