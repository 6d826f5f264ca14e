#!/usr/bin/env bash
# Set up a Debian 12 machine to run hook's tests: idempotent, safe to run again.
# Installs Debian's docker.io, buildx and Go 1.24 (both from trixie, pinned low), docker-registry,
# qemu, cpio, busybox, debootstrap; starts dockerd; makes
# the local base images the tests build on (no registry to pull from here). The test OS (LinuxKit's
# packages remade from Debian parts) and LinuxKit itself come after, from hack/test.sh.
set -euo pipefail

CACHE=${HOOK_TEST_CACHE:-/var/cache/hook-test}
mkdir -p "$CACHE"
log() { printf '==> %s\n' "$*" >&2; }

need_pkgs=()
for p in docker.io docker-registry qemu-system-x86 qemu-user-static busybox-static cpio \
         debootstrap zstd xz-utils pigz iproute2 apache2-utils openssh-client gcc libc6-dev patch ovmf kmod \
         qemu-system-arm qemu-efi-aarch64; do
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

# dockerd: start it unless it already answers.
if ! docker info >/dev/null 2>&1; then
  log "dockerd: starting"
  nohup dockerd >/var/log/hook-test-dockerd.log 2>&1 &
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

# Local base images (no Docker Hub here): busybox for both arches, a Debian python base (python3, requests, pip) for amd64.
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
for arch in amd64 arm64; do
  if ! docker image inspect "local/busybox:$arch" >/dev/null 2>&1; then
    log "base: local/busybox:$arch"
    tmp=$(mktemp -d)
    cp "$CACHE/busybox-rootfs.tar" "$tmp/rootfs.tar"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/sh"]\n' >"$tmp/Dockerfile"
    docker buildx build -q --platform "linux/$arch" --load -t "local/busybox:$arch" "$tmp" >/dev/null
    rm -rf "$tmp"
  fi
done
if [ ! -s "$CACHE/python-rootfs.tar" ]; then
  log "base: debootstrap a minimal Debian with python3 (about a minute)"
  tmp=$(mktemp -d)
  debootstrap --variant=minbase --include=python3,python3-requests,python3-pip bookworm "$tmp/root" \
    "$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || echo http://deb.debian.org/debian)" >/dev/null
  rm -rf "$tmp/root/var/cache/apt" "$tmp/root/var/lib/apt/lists"
  tar --sort=name --numeric-owner -C "$tmp/root" -cf "$CACHE/python-rootfs.tar.tmp" .
  mv "$CACHE/python-rootfs.tar.tmp" "$CACHE/python-rootfs.tar"
  rm -rf "$tmp"
fi
for arch in amd64 arm64; do
  if ! docker image inspect "local/python-base:$arch" >/dev/null 2>&1; then
    log "base: local/python-base:$arch (amd64 rootfs; arm64 label only, for build-graph tests)"
    tmp=$(mktemp -d)
    ln "$CACHE/python-rootfs.tar" "$tmp/rootfs.tar" 2>/dev/null || cp "$CACHE/python-rootfs.tar" "$tmp/rootfs.tar"
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/usr/bin/python3"]\n' >"$tmp/Dockerfile"
    docker buildx build -q --platform "linux/$arch" --load -t "local/python-base:$arch" "$tmp" >/dev/null
    rm -rf "$tmp"
  fi
done
log "test machine ready (cache: $CACHE)"
