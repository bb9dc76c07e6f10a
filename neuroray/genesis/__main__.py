"""``python -m neuroray.genesis``: see neuroray/cli/genesis.py (the library is this package)."""

import sys

from neuroray.cli.genesis import main

if __name__ == "__main__":
    sys.exit(main())
