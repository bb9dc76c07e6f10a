"""``python -m neuroray.ledger``: see neuroray/cli/ledger.py (the library is neuroray.ponw.ledger)."""

import sys

from neuroray.cli.ledger import main

if __name__ == "__main__":
    sys.exit(main())
