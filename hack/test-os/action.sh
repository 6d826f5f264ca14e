#!/bin/sh
# hooktest/action:test: an "action" image for tests. Prints a marker (with its arguments and the
# action environment tink-worker sets) and exits 0; ACTION_EXIT=N makes it exit N instead.
# With IMG_URL and DEST_DISK (as Tinkerbell's image2disk action takes them): streams the image
# at IMG_URL onto the disk DEST_DISK (a /dev/disk/by-id name), synced, and says how it went;
# a failed download or write is its exit status.
set -o pipefail
echo "HOOK-TEST-ACTION-RAN args=$* worker_id=${WORKER_ID:-} action=${ACTION_NAME:-}"
if [ -n "${IMG_URL:-}" ] && [ -n "${DEST_DISK:-}" ]; then
	if [ ! -b "$DEST_DISK" ]; then
		echo "IMAGE2DISK FAILED: $DEST_DISK is not a block device (ls /dev/disk/by-id: $(ls /dev/disk/by-id 2>&1 | tr '\n' ' '))"
		exit 2
	fi
	start=$(date +%s)
	if wget -q -O - "$IMG_URL" | dd of="$DEST_DISK" bs=1M conv=fsync 2>/tmp/dd.log; then
		echo "IMAGE2DISK wrote $IMG_URL to $DEST_DISK ($(readlink -f "$DEST_DISK")) in $(( $(date +%s) - start ))s: $(tail -n 1 /tmp/dd.log)"
	else
		code=$?
		echo "IMAGE2DISK FAILED writing $IMG_URL to $DEST_DISK (exit $code): $(tail -n 2 /tmp/dd.log | tr '\n' ' ')"
		exit "$code"
	fi
fi
exit "${ACTION_EXIT:-0}"
