#!/bin/sh
# hooktest getty: LinuxKit's pkg/getty/usr/bin/rungetty.sh rewritten for busybox (the real one
# needs util-linux's agetty and `setsid -w`). One shell (INSECURE=true) or busybox getty+login per
# console= on the kernel command line whose device exists; each respawns when it exits.

respawn() {
	while true; do
		"$@"
		sleep 1
	done
}

start_getty() {
	tty=${1%,*}
	speed=${1#*,}
	[ "$speed" = "$1" ] && speed=115200
	case " $PROCESSEDTTY " in
	*" $tty "*)
		echo "getty: already processed tty for $tty, not starting twice" | tee /dev/console
		return ;;
	esac
	PROCESSEDTTY="$PROCESSEDTTY $tty"
	if [ ! -c "/dev/$tty" ]; then
		echo "getty: cmdline has console=$tty but /dev/$tty is not a character device; not starting getty for $tty" | tee /dev/console
		return
	fi
	# a console= that names a device with no driver behind it (e.g. ttyS1 on a machine with one UART)
	if ! stty -F "/dev/$tty" >/dev/null 2>&1; then
		echo "getty: /dev/$tty cannot be opened as a terminal; not starting getty for $tty" | tee /dev/console
		return
	fi
	case "$tty" in
	tty[0-9]*) term=linux ;;
	*) term=vt100 ;;
	esac
	echo "getty: starting getty for $tty" | tee "/dev/$tty"
	if [ "$INSECURE" = "true" ]; then
		# what `agetty -a root` + login gives: a root login shell, with $tty as controlling terminal
		respawn env TERM=$term HOME=/root setsid -c /bin/sh -l <>"/dev/$tty" >&0 2>&1 &
	else
		respawn setsid getty -L "$speed" "$tty" "$term" &
	fi
}

if [ -z "$INITGETTY" ]; then
	cat >/etc/profile.d/namespace.sh <<"NS"
export PS1="(ns: getty) $PS1"
NS
fi

PROCESSEDTTY=

ROOTSHADOW=/hostroot/etc/getty.shadow
if [ -f $ROOTSHADOW ]; then
	cp $ROOTSHADOW /etc/shadow
	echo >> /etc/shadow
fi

for opt in $(cat /proc/cmdline); do
	case "$opt" in
	console=*)
		start_getty "${opt#console=}" ;;
	esac
done

[ -n "$INITGETTY" ] || wait
