#!/bin/sh
# fetch.sh ARCH SUITE VERSION FIRMWARE_LIST OUT: download Debian's signed kernel package for ARCH
# (amd64, arm64) from SUITE (bookworm, bookworm-backports, trixie, ...), and the firmware packages
# FIRMWARE_LIST names, into OUT; nothing of ARCH is installed or run. VERSION empty: the newest in
# the suite (what linux-image-ARCH depends on); else the ABI name, e.g. 6.1.0-57 or 6.12.95+deb12.
# Also installs (for the build platform) what assemble.py needs: python3 and kmod's depmod.
# A failure is one line `hook: error: ...` that the pipeline shows.
set -eu
arch=$1 suite=$2 version=$3 fwlist=$4 out=$5
here=$(dirname "$0")
. "$here/apt-sources.sh"
mkdir -p "$out"
apt-get install -y -q --no-install-recommends python3 kmod >/tmp/apt-install.log 2>&1 ||
  die "cannot install python3 and kmod in the kernel builder: $(grep -E '^E:' /tmp/apt-install.log | tail -n 1)"
cd "$out"
chown _apt "$out" 2>/dev/null || true
if [ -z "$version" ]; then
  # shellcheck disable=SC2086 # target is "-t SUITE" or empty
  apt-get download -q $target "linux-image-$arch:$arch" >/tmp/apt-meta.log 2>&1 ||
    die "$suite has no linux-image-$arch for $arch: $(grep -E '^E:' /tmp/apt-meta.log | tail -n 1)"
  package=$(dpkg-deb -f linux-image-"${arch}"_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*' | head -n 1)
  rm -f linux-image-"${arch}"_*.deb
  [ -n "$package" ] || die "linux-image-$arch in $suite names no kernel package"
else
  package="linux-image-$version-$arch"
fi
# shellcheck disable=SC2086
if ! apt-get download -q $target "$package:$arch" >/tmp/apt-kernel.log 2>&1; then
  known=$(apt-cache pkgnames linux-image- | grep -E "^linux-image-[0-9].*-$arch\$" | sed -e 's/^linux-image-//' \
    -e "s/-$arch\$//" | sort -V | tr '\n' ' ')
  die "no package $package in $suite: set kernel_version= to one of: ${known:-(none)} or leave it empty for the newest"
fi
echo "hook-kernel: $(ls ./*.deb)"
sh "$here/fetch-firmware.sh" "$fwlist" "$out/firmware"
rm -rf /var/lib/apt/lists/* /etc/apt/apt.conf.d/99hook-ca
