#!/bin/sh
# build.sh ARCH [make targets...]: build a kernel from /src/linux.tar (a kernel.org or Debian source
# tarball, any compression tar reads) with the config /src/config, into /out as a LinuxKit kernel
# image's files (assemble.py: kernel, kernel.tar with every module built and the firmware they name,
# kernel.json, kernel.config). ccache's folder is /ccache (the pipeline binds <cache_dir>/ccache).
# With make targets instead (menuconfig, olddefconfig, ...): run them on the config $HOOK_CONFIG, then
# write the result beside it as $HOOK_CONFIG.new, a savedefconfig (`doit kernel_config`).
# Patches: COMMAND_LINE_SIZE 2048 -> 4096 on x86 (Tinkerbell's cmdlines are long), as Hook and
# CaptainOS do. Reproducible: fixed build user, host and timestamp. A failure: `hook: error: ...`.
set -eu
arch=$1
shift
die() { echo "hook: error: $*" >&2; exit 1; }
case "$arch" in
  amd64) karch=x86_64 cross="" image=arch/x86/boot/bzImage target=bzImage ;;
  arm64) karch=arm64 cross=aarch64-linux-gnu- image=arch/arm64/boot/Image target=Image ;;
  *) die "unknown arch $arch (amd64 or arm64)" ;;
esac
config=${HOOK_CONFIG:-/src/config}
[ -f /src/linux.tar ] || die "no kernel source tarball at /src/linux.tar"
[ -f "$config" ] || die "no kernel config at $config"
work=/build/linux
mkdir -p "$work"
echo "hook-kernel: unpacking the kernel source"
tar -xf /src/linux.tar -C "$work" --strip-components=1 || die "the kernel source tarball cannot be unpacked"
cd "$work"
[ -f Makefile ] && grep -q '^VERSION = ' Makefile || die "the tarball is not a kernel source tree (no top Makefile)"
if [ "$karch" = x86_64 ]; then
  setup=arch/x86/include/asm/setup.h
  grep -q '#define COMMAND_LINE_SIZE 2048' "$setup" && sed -i 's/#define COMMAND_LINE_SIZE 2048/#define COMMAND_LINE_SIZE 4096/' "$setup"
  grep -q '#define COMMAND_LINE_SIZE 4096' "$setup" || die "$setup: COMMAND_LINE_SIZE cannot be raised to 4096"
fi
export ARCH="$karch" CROSS_COMPILE="$cross" KBUILD_BUILD_USER=hook KBUILD_BUILD_HOST=hook \
  KBUILD_BUILD_TIMESTAMP="${SOURCE_DATE_EPOCH:+@$SOURCE_DATE_EPOCH}" CCACHE_DIR=/ccache CCACHE_BASEDIR=/build
cp "$config" .config
if [ $# -gt 0 ]; then  # doit kernel_config
  make -s olddefconfig
  make "$@"
  make -s savedefconfig
  cp defconfig "$config.new"
  echo "hook-kernel: saved as a savedefconfig"
  exit 0
fi
make -s olddefconfig
python3 /opt/hook-kernel/assemble.py --arch "$arch" --check-config .config
version=$(make -s kernelrelease)
jobs=$(nproc)
echo "hook-kernel: building $version for $karch with $jobs jobs (ccache: $(ccache -s 2>/dev/null | grep -m1 -i 'hits' || echo new))"
started=$(date +%s)
make -s -j"$jobs" CC="ccache ${cross}gcc" "$target" modules || die "the kernel build failed (the compiler's lines are above)"
echo "hook-kernel: built in $(( $(date +%s) - started )) s"
make -s INSTALL_MOD_PATH=/stage INSTALL_MOD_STRIP=1 modules_install
python3 /opt/hook-kernel/assemble.py --arch "$arch" --root /stage --kernel "$image" --config .config \
  --all-modules --firmware-debs /opt/firmware --package "linux-$version (source)" --flavour source --out /out
