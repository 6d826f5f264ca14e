#!/bin/sh
# hooktest sshd: LinuxKit's pkg/sshd/usr/bin/ssh.sh for Debian's OpenSSH, which also needs its
# privilege separation directory (/run is the host's, bound in: create it at each start).
mkdir -p /run/sshd
chmod 0755 /run/sshd

KEYS=$(find /etc/ssh -name 'ssh_host_*_key')
[ -z "$KEYS" ] && ssh-keygen -A >/dev/null 2>/dev/null

exec /usr/sbin/sshd -D -e
