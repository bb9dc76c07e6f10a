"""``python -m neuroray.train``: see neuroray/cli/train.py (the library is neuroray.training.run)."""

import sys

from neuroray.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
