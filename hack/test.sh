#!/usr/bin/env bash
# Install everything the tests need on a Debian 12 machine, then run them all.
#   hack/test.sh                 set up (idempotent) + ruff + pytest
#   hack/test.sh -k dev_dist     extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/setup-test-machine.sh
echo "==> python: pip install -e .[test]" >&2
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -e 'Running pip as the' -e 'is ignored: it is neither' || true
echo "==> ruff" >&2
python3 -m ruff check .
echo "==> pytest" >&2
exec python3 -m pytest "$@"
