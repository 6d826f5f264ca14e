#!/bin/sh
# busybox udhcpc's event script (udhcpc -s): it only reports. udhcpc's stdout is a pipe that
# hook-docker reads (hookcommon/network.py), which configures the interface: one line per event,
# tab-separated name=value pairs of the variables udhcpc sets.
printf '@hook-dhcp-event\t%s\tinterface=%s\tip=%s\tmask=%s\tsubnet=%s\tbroadcast=%s\trouter=%s\tdns=%s\tdomain=%s\tsearch=%s\tmtu=%s\tserverid=%s\tlease=%s\tstaticroutes=%s\tntpsrv=%s\thostname=%s\n' \
	"$1" "$interface" "$ip" "$mask" "$subnet" "$broadcast" "$router" "$dns" "$domain" "$search" "$mtu" \
	"$serverid" "$lease" "$staticroutes" "$ntpsrv" "$hostname"
