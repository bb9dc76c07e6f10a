"""``python -m neuroray.plan``: see neuroray/cli/plan.py (the library is neuroray.planner)."""

import sys

from neuroray.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
