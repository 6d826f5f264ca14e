#!/bin/sh
# hooktest/action:test: an "action" image for tests. Prints a marker (with its arguments and the
# action environment tink-worker sets) and exits 0; ACTION_EXIT=N makes it exit N instead.
echo "HOOK-TEST-ACTION-RAN args=$* worker_id=${WORKER_ID:-} action=${ACTION_NAME:-}"
exit "${ACTION_EXIT:-0}"
