#!/bin/sh
# hooktest openntpd: a stand-in that stays up. The test guest reaches no NTP server
# (QEMU user network with restrict=on), so there is nothing to synchronise with.
echo "ntpd: hooktest stand-in for openntpd: no time synchronisation (arguments: $*)"
while true; do
	sleep 3600
done
