#!/usr/bin/env bash
# Set up a Debian 12 machine to run hook's tests: idempotent, safe to run again.
# Installs Debian's docker.io, buildx and Go 1.24 (both from trixie, pinned low), docker-registry,
# qemu, cpio, busybox, debootstrap, an aarch64 cross C compiler; starts dockerd; makes
# the local base images the tests build on (no registry to pull from here), amd64 and arm64: the arm64
# ones of Debian's arm64 packages, downloaded and unpacked, never run. The test OS (LinuxKit's
# packages remade from Debian parts) and LinuxKit itself come after, from hack/test.sh.
set -euo pipefail

CACHE=${HOOK_TEST_CACHE:-/var/cache/hook-test}
mkdir -p "$CACHE"
log() { printf '==> %s\n' "$*" >&2; }

need_pkgs=()
for p in docker.io docker-registry qemu-system-x86 qemu-user-static busybox-static cpio \
         debootstrap zstd xz-utils pigz iproute2 apache2-utils openssh-client gcc libc6-dev patch ovmf kmod openssl \
         qemu-system-arm qemu-efi-aarch64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "apt: installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm "${need_pkgs[@]}" >/dev/null
fi

# chrony: a real NTP server for the network tests (in a network namespace, never this machine's clock):
# installed with its service held back (policy-rc.d), so no chronyd starts here.
if ! dpkg -s chrony >/dev/null 2>&1; then
  log "apt: chrony (its service is not started)"
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm chrony >/dev/null || {
    rm -f /usr/sbin/policy-rc.d; exit 1; }
  rm -f /usr/sbin/policy-rc.d
fi

if ! dpkg -s docker-buildx >/dev/null 2>&1 || ! dpkg -s golang-1.24-go >/dev/null 2>&1; then
  log "apt: docker-buildx and golang-1.24-go from trixie (pinned low: nothing else comes from trixie)"
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  cat >/etc/apt/sources.list.d/trixie.sources <<SRC
Types: deb
URIs: $uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat >/etc/apt/preferences.d/trixie-low <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t trixie docker-buildx \
    golang-1.24-go >/dev/null
fi

# dockerd: start it unless it already answers; in a session of its own, so that a Ctrl-C of the test
# run (or a kill of its process group) does not take the engine down with it.
if ! docker info >/dev/null 2>&1; then
  log "dockerd: starting"
  setsid nohup dockerd >/var/log/hook-test-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/hook-test-dockerd.log" >&2; exit 1; }
fi

# arm64 emulation, for tests that run an arm64 image (builds need none).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ -e /proc/sys/fs/binfmt_misc/register ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  /lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf 2>/dev/null || true
fi

# Local base images (no Docker Hub here): busybox and a Debian python base (python3, requests, pip) for
# amd64 from this machine's busybox and a debootstrap, for arm64 the same from Debian's arm64 packages.
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || echo http://deb.debian.org/debian)
if [ ! -s "$CACHE/busybox-rootfs.tar" ]; then
  log "base: busybox rootfs"
  tmp=$(mktemp -d)
  mkdir -p "$tmp"/root/{bin,sbin,etc,tmp,proc,sys,dev,usr/bin,usr/sbin}
  cp /bin/busybox "$tmp/root/bin/busybox"
  for a in $("$tmp/root/bin/busybox" --list); do [ -e "$tmp/root/bin/$a" ] || ln -s busybox "$tmp/root/bin/$a"; done
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$tmp/root" -cf "$CACHE/busybox-rootfs.tar.tmp" .
  mv "$CACHE/busybox-rootfs.tar.tmp" "$CACHE/busybox-rootfs.tar"
  rm -rf "$tmp"
fi
for arch in amd64; do
  if ! docker image inspect "local/busybox:$arch" >/dev/null 2>&1; then
    log "base: local/busybox:$arch"
    tmp=$(mktemp -d)
    cp "$CACHE/busybox-rootfs.tar" "$tmp/rootfs.tar"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/sh"]\n' >"$tmp/Dockerfile"
    docker buildx build -q --platform "linux/$arch" --load -t "local/busybox:$arch" "$tmp" >/dev/null
    rm -rf "$tmp"
  fi
done

# arm64 debs come from a private apt (the host's sources, keyrings and pins; lists, cache and status of
# its own in $CACHE/apt-arm64, the one hack/testos/debs.py uses): the host's dpkg architectures stay as
# they are.
arm64_apt() {
  local root="$CACHE/apt-arm64"
  mkdir -p "$root/state/lists/partial" "$root/cache/archives/partial"
  [ -e "$root/state/status" ] || : >"$root/state/status"
  printf 'APT::Architecture "arm64";\nAPT::Architectures { "arm64"; };\nDir::State "%s/state";\nDir::State::status "%s/state/status";\nDir::Cache "%s/cache";\n' \
    "$root" "$root" "$root" >"$root/apt.conf"
  if ! ls "$root"/state/lists/*_Packages* >/dev/null 2>&1; then
    APT_CONFIG="$root/apt.conf" apt-get update -qq
  fi
  APT_CONFIG="$root/apt.conf" "$@"
}

# An arm64 image is made again when its rootfs tar is not the one it was made of (label
# org.hook.test.rootfs): an older machine's arm64 bases were the amd64 rootfs with the arm64 label.
arm64_base() {  # arm64_base IMAGE TAR CMD
  local want have tmp
  want=$(sha256sum "$2" | cut -c1-16)
  have=$(docker image inspect -f '{{index .Config.Labels "org.hook.test.rootfs"}}' "$1" 2>/dev/null || true)
  [ "$have" = "$want" ] && return 0
  log "base: $1 (real arm64)"
  tmp=$(mktemp -d)
  ln "$2" "$tmp/rootfs.tar" 2>/dev/null || cp "$2" "$tmp/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["%s"]\n' "$3" >"$tmp/Dockerfile"
  docker buildx build -q --platform linux/arm64 --label "org.hook.test.rootfs=$want" --load -t "$1" "$tmp" >/dev/null
  rm -rf "$tmp"
}

# arm64 busybox: Debian's busybox-static:arm64 of the version installed here, with the applet links of
# this machine's busybox (one Debian configuration for every arch; the arm64 binary is not run here).
if [ ! -s "$CACHE/busybox-rootfs-arm64.tar" ]; then
  log "base: arm64 busybox rootfs (busybox-static:arm64)"
  tmp=$(mktemp -d)
  version=$(dpkg-query -W -f='${Version}' busybox-static)
  chown _apt "$tmp" 2>/dev/null || chmod 755 "$tmp"  # apt-get download writes as _apt
  (cd "$tmp" && arm64_apt apt-get download -qq "busybox-static=$version") || {
    echo "busybox-static $version for arm64 not found: apt-get update && apt-get install busybox-static, then run this again" >&2
    exit 1; }
  mkdir -p "$tmp"/root/{bin,sbin,etc,tmp,proc,sys,dev,usr/bin,usr/sbin} "$tmp/x"
  dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/x"
  cp "$tmp/x/bin/busybox" "$tmp/root/bin/busybox"
  for a in $(/bin/busybox --list); do [ -e "$tmp/root/bin/$a" ] || ln -s busybox "$tmp/root/bin/$a"; done
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$tmp/root" -cf "$CACHE/busybox-rootfs-arm64.tar.tmp" .
  mv "$CACHE/busybox-rootfs-arm64.tar.tmp" "$CACHE/busybox-rootfs-arm64.tar"
  rm -rf "$tmp"
fi
arm64_base local/busybox:arm64 "$CACHE/busybox-rootfs-arm64.tar" /bin/sh
if [ ! -s "$CACHE/python-rootfs.tar" ]; then
  log "base: debootstrap a minimal Debian with python3 (about a minute)"
  tmp=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-requests,python3-pip bookworm "$tmp/root" \
    "$mirror" >/dev/null
  rm -rf "$tmp/root/var/cache/apt" "$tmp/root/var/lib/apt/lists"
  tar --sort=name --numeric-owner -C "$tmp/root" -cf "$CACHE/python-rootfs.tar.tmp" .
  mv "$CACHE/python-rootfs.tar.tmp" "$CACHE/python-rootfs.tar"
  rm -rf "$tmp"
fi
for arch in amd64; do
  if ! docker image inspect "local/python-base:$arch" >/dev/null 2>&1; then
    log "base: local/python-base:$arch"
    tmp=$(mktemp -d)
    ln "$CACHE/python-rootfs.tar" "$tmp/rootfs.tar" 2>/dev/null || cp "$CACHE/python-rootfs.tar" "$tmp/rootfs.tar"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/usr/bin/python3"]\n' >"$tmp/Dockerfile"
    docker buildx build -q --platform "linux/$arch" --load -t "local/python-base:$arch" "$tmp" >/dev/null
    rm -rf "$tmp"
  fi
done
# arm64 python base: the same packages as the amd64 debootstrap, for arm64, and nothing of them run.
# debootstrap --foreign resolves, downloads and checks them and unpacks the essential ones; the rest
# it downloaded are unpacked the same way (dpkg-deb, keeping /bin -> usr/bin). Then what the
# maintainer scripts would have done that a python base needs: passwd and group (base-passwd's
# masters) and the CA bundle (update-ca-certificates': every Mozilla root, in C order). The tar is
# also what hack/test-os.py makes hooktest/python-slim:arm64 of.
if [ ! -s "$CACHE/python-rootfs-arm64.tar" ]; then
  log "base: arm64 Debian with python3 (debootstrap --foreign, unpacked, never run; about 30 s)"
  tmp=$(mktemp -d)
  root="$tmp/root"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,python3-requests,python3-pip bookworm \
    "$root" "$mirror" >/dev/null
  for deb in "$root"/var/cache/apt/archives/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$root" --keep-directory-symlink -xf -
  done
  cp "$root/usr/share/base-passwd/passwd.master" "$root/etc/passwd"
  cp "$root/usr/share/base-passwd/group.master" "$root/etc/group"
  (cd "$root/usr/share/ca-certificates" && find . -type f -name '*.crt' | sed 's#^\./##' | LC_ALL=C sort) \
    >"$root/etc/ca-certificates.conf"
  mkdir -p "$root/etc/ssl/certs"
  while read -r crt; do sed -e '$a\' "$root/usr/share/ca-certificates/$crt"; done \
    <"$root/etc/ca-certificates.conf" >"$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root/debootstrap" "$root/var/cache/apt" "$root/var/lib/apt/lists" "$root/proc" "$root"/dev/*
  mkdir -p "$root/proc"
  [ "$(readlink "$root/bin")" = usr/bin ] && [ -x "$root/usr/bin/python3.11" ] || {
    echo "the arm64 python root in $root is incomplete (no usr/bin/python3.11, or /bin not a link)" >&2; exit 1; }
  tar --sort=name --numeric-owner -C "$root" -cf "$CACHE/python-rootfs-arm64.tar.tmp" .
  mv "$CACHE/python-rootfs-arm64.tar.tmp" "$CACHE/python-rootfs-arm64.tar"
  rm -rf "$tmp"
fi
arm64_base local/python-base:arm64 "$CACHE/python-rootfs-arm64.tar" /usr/bin/python3
log "test machine ready (cache: $CACHE)"
