import sys
from neuroray.cli.generate import main
if __name__ == "__main__":
    sys.exit(main())
