"""`python -m ipu_effnet <command>`: see ipu_effnet/cli.py."""

import sys

from ipu_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
