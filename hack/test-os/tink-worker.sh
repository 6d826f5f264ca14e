#!/bin/sh
# hooktest/tink-worker:test: stands in for tink-worker. Prints a marker with the settings that
# hook-bootkit passed to the console and the kernel log, at start and every 10 s, so that a boot
# test sees it on the serial line. The password itself is never printed: only the first 16 hex
# digits of its sha256, so that a test can check the right one arrived.
pw_sha256=$(printf '%s' "$REGISTRY_PASSWORD" | sha256sum | cut -c1-16)
while true; do
	msg="TINK-WORKER-RUNNING worker_id=$WORKER_ID registry=$DOCKER_REGISTRY user=$REGISTRY_USERNAME password_sha256=$pw_sha256"
	echo "$msg"
	{ echo "$msg" >/dev/console; } 2>/dev/null
	{ echo "$msg" >/dev/kmsg; } 2>/dev/null
	sleep 10
done
