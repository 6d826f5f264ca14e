#!/bin/sh
# fetch-firmware.sh FIRMWARE_LIST OUT: download the firmware packages the list names (arch: all) into
# OUT, after apt-sources.sh (which exports $suite and $target). A package marked `?` may be missing from the suite; another one that is
# missing is one line `hook: error: ...`.
set -eu
fwlist=$1 out=$2
mkdir -p "$out"
cd "$out"
chown _apt . 2>/dev/null || true
grep -Ev '^[[:space:]]*(#|$)' "$fwlist" | while read -r pkg _; do
  optional=no
  case "$pkg" in *\?) optional=yes; pkg=${pkg%\?} ;; esac
  # shellcheck disable=SC2086 # target is "-t SUITE" or empty
  if ! apt-get download -q $target "$pkg" >/tmp/apt-fw.log 2>&1; then
    if [ "$optional" = yes ]; then
      echo "hook-kernel: note: $pkg is not in $suite (optional): skipped"
      continue
    fi
    echo "hook: error: the firmware package $pkg is not in $suite: take it out of containers/hook-kernel/common/firmware.list or mark it optional (${pkg}?)" >&2
    exit 1
  fi
done
echo "hook-kernel: firmware packages: $(ls | tr '\n' ' ')"
