#!/bin/sh
# apk-root.sh PACKAGES ROOT TARGETARCH: put Alpine's PACKAGES (python3, kexec-tools) for the target
# arch into ROOT, to be copied over the Alpine-based docker:dind image. Runs on the build platform in an Alpine image of
# the same release as the dind base: `apk --root --arch` runs nothing of the target arch.
# An empty PACKAGES leaves ROOT empty (for a base image that brings its own python3).
set -eu
packages=$1
root=$2
arch=$3
mkdir -p "$root"
if [ -z "$packages" ]; then
  echo "apk-root.sh: no packages: the base image must have python3 (and kexec)"
  exit 0
fi
case "$arch" in
  amd64) apk_arch=x86_64 ;;
  arm64) apk_arch=aarch64 ;;
  *) echo "apk-root.sh: unsupported TARGETARCH $arch" >&2; exit 1 ;;
esac
if [ -s /run/secrets/ca ]; then
  export SSL_CERT_FILE=/run/secrets/ca
fi
mkdir -p "$root/etc/apk/keys"
cp /etc/apk/repositories "$root/etc/apk/repositories"
# Each arch's packages are signed with its own keys; alpine-keys ships them all here.
for key in /etc/apk/keys/*.pub /usr/share/apk/keys/"$apk_arch"/*.pub; do
  if [ -e "$key" ]; then cp -L "$key" "$root/etc/apk/keys/"; fi
done
# shellcheck disable=SC2086 # PACKAGES is a list
apk add --root "$root" --arch "$apk_arch" --initdb --no-cache --no-scripts $packages
# Only what the packages need at run time: no package database (the base image keeps its own),
# no caches, no bytecode (python runs with -B), none of the stdlib that hook-docker never imports.
rm -rf "${root:?}/lib/apk" "${root:?}/etc/apk" "${root:?}/var" "${root:?}/usr/share" "${root:?}/usr/include"
for lib in "$root"/usr/lib/python3.*; do
  rm -rf "$lib"/test "$lib"/idlelib "$lib"/tkinter "$lib"/turtledemo "$lib"/ensurepip \
    "$lib"/lib2to3 "$lib"/pydoc_data "$lib"/config-3.* "$lib"/site-packages/*
done
find "$root" -name __pycache__ -prune -exec rm -rf {} +
