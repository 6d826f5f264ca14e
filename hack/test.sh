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
echo "==> test OS: LinuxKit's packages from Debian parts and LinuxKit's Go sources (hack/test-os.py)" >&2
CACHE=${HOOK_TEST_CACHE:-/var/cache/hook-test}
python3 hack/test-os.py --cache "$CACHE"
echo "==> linuxkit v1.8.2 from ../shared/linuxkit/src (python -m tasks.tools)" >&2
mkdir -p "$CACHE/bin"
lk=$(python3 -m tasks.tools linuxkit --src "$CACHE/linuxkit-src/linuxkit-v1.8.2" --cache "$CACHE/tools")
ln -sfn "$lk" "$CACHE/bin/linuxkit"
echo "==> ruff" >&2
ruff check .
echo "==> lint-imports: the layout (docs/ARCHITECTURE.md)" >&2
lint-imports --no-cache
# A run needs some room: its builds, disks and registries peak at several GB in $TMPDIR (tests/hygiene.py
# cleans up after each run). Say so up front, rather than fail an hour in with 'no space left on device'.
NEED_GB=10  # measured: a whole run peaked at 5.4 GB over its start
for dir in "${TMPDIR:-/tmp}" "$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)"; do
  [ -d "$dir" ] || continue
  avail_kb=$(df --output=avail -k "$dir" 2>/dev/null | tail -n 1 | tr -dc 0-9 || true)
  free_gb=$(( ${avail_kb:-0} / 1048576 ))
  if (( free_gb < NEED_GB )); then
    echo "==> disk: warning: only ${free_gb} GB free under $dir; a test run needs about ${NEED_GB} GB: free some (docker system df)" >&2
  fi
done
echo "==> pytest" >&2
exec python3 -m pytest "$@"
