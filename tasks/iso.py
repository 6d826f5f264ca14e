"""`python -m tasks.iso patch|show`: rewrite or print a Hook ISO's kernel cmdline (tasks.media.iso)."""

import sys

from tasks.media.iso import main

if __name__ == "__main__":
    sys.exit(main())
