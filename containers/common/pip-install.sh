#!/bin/sh
# pip-install.sh REQUIREMENTS TARGET: install pinned pure-Python wheels into TARGET for any target
# platform, running on the build platform (no emulation). With the optional build secret "ca"
# (a CA bundle, for networks that intercept TLS) pip trusts it; a normal machine needs none.
set -eu
requirements=$1
target=$2
if [ -s /run/secrets/ca ]; then
  export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca
fi
# --break-system-packages and --root-user-action as variables: older pips ignore them.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install --no-cache-dir --no-compile --disable-pip-version-check --no-warn-script-location \
  --only-binary=:all: --platform any --implementation py --abi none \
  --require-hashes -r "$requirements" --target "$target"
# Scripts and caches are of no use in the image; keep the dist-info (licences, versions).
rm -rf "${target:?}/bin"
find "$target" -name __pycache__ -prune -exec rm -rf {} +
