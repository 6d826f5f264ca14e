#!/bin/sh
# apt-sources.sh, sourced with $suite (bookworm, bookworm-backports, trixie, ...) and $arch (a
# foreign architecture to add, or empty) set: point apt at that suite of the builder image's own
# Debian mirror, with the components firmware needs (main non-free-firmware) and the suite's -updates
# and -security; then apt-get update. Exports $suite, $release, $mirror and $target ("-t SUITE" for a
# backports suite, else empty). A failure is one line `hook: error: ...`.
set -eu
die() { echo "hook: error: $*" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if [ -s /run/secrets/ca ]; then
  echo 'Acquire::https::CAInfo "/run/secrets/ca";' >/etc/apt/apt.conf.d/99hook-ca
fi
sources=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=$(printf '%s\n' "$sources" | grep -Eo 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ')
mirror=${mirror%/}
[ -n "$mirror" ] || die "the kernel builder image has no Debian mirror in /etc/apt (set debian_builder= to a Debian image with apt)"
security=$(printf '%s\n' "$sources" | grep -Eo 'https?://[^ ]+/debian-security/?( |$)' | head -n 1 | tr -d ' ')
security=${security%/}
security=${security:-${mirror%/debian}/debian-security}
release=${suite%-backports}
rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*
{
  echo "deb $mirror $release main non-free-firmware"
  case "$suite" in
    *-backports) echo "deb $mirror $suite main non-free-firmware" ;;
  esac
  case "$release" in
    sid|unstable|experimental) ;;
    *) echo "deb $mirror $release-updates main non-free-firmware"
       echo "deb $security $release-security main non-free-firmware" ;;
  esac
} >/etc/apt/sources.list
if [ -n "$arch" ] && [ "$arch" != "$(dpkg --print-architecture)" ]; then
  dpkg --add-architecture "$arch"
fi
if ! apt-get update -q >/tmp/apt-update.log 2>&1; then
  if grep -q " $suite Release" /tmp/apt-update.log || grep -q " $release Release" /tmp/apt-update.log; then
    die "the Debian suite '$suite' is not on $mirror: set kernel_suite= to a suite it has (bookworm, bookworm-backports, trixie, ...)"
  fi
  die "apt-get update failed: $(grep -E '^(E|Err):' /tmp/apt-update.log | tail -n 1)"
fi
target=""
case "$suite" in *-backports) target="-t $suite" ;; esac
export suite release mirror target
