"""`python -m moe_ext <command>`: the same commands as the `moe-ext` script."""

import sys

from moe_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
