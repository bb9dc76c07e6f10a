import sys
from neuroray.cli.export import main
if __name__ == "__main__":
    sys.exit(main())
