#!/usr/bin/env bash
# Install everything the tests need on a Debian 12 machine (as root), then run them all.
#   hack/test.sh                 set up (idempotent) + ruff + pytest
#   hack/test.sh -k dev_dist     extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/setup-test-machine.sh
if [ ! -x .venv/bin/python3 ]; then
  echo "==> python: virtual environment .venv" >&2
  python3 -m venv .venv
fi
export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"
echo "==> python: pip install -e .[test]" >&2
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v 'is ignored: it is neither a file' >&2)
echo "==> ruff" >&2
ruff check .
echo "==> pytest" >&2
exec python3 -m pytest "$@"
