"""`python -m tasks.tools linuxkit`: print the path of a LinuxKit v1.8.2 binary (tasks.hookos.tool)."""

import sys

from tasks.hookos.tool import main

if __name__ == "__main__":
    sys.exit(main())
