"""`python -m tasks.initramfs repack|list|verify`: the convert engine's command line (tasks.convert.cli)."""

import sys

from tasks.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
