"""relay.py HOST PORT: join this process's stdin/stdout to a TCP connection to HOST:PORT.

QEMU's user network runs it for each connection a guest opens to a `guestfwd=...-cmd:` address
(tasks.qemu.Forward), so a guest with `restrict=on` reaches exactly one service on the host's
loopback and nothing else. A fresh process per connection: the `-tcp:` form of guestfwd opens a
single connection at start, and docker's pulls (several connections) would hang on it.

Standard library only, no package imports: it starts in a few milliseconds.
When the service is down the connection is closed at once (the guest sees a reset, and retries).
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int, *, infd: int = 0, outfd: int = 1) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError:
        # Nothing on stderr: QEMU hands the guest's connection to this process as stdout AND
        # stderr, so a message would reach the guest as the service's answer.
        return 1
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(infd, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    open_sides = 2
    try:
        while open_sides:
            for key, _ in sel.select():
                if key.data == "in":
                    data = os.read(infd, 65536)
                    if not data:
                        sel.unregister(infd)
                        sock.shutdown(socket.SHUT_WR)
                        open_sides -= 1
                    else:
                        sock.sendall(data)
                else:
                    data = sock.recv(65536)
                    if not data:
                        sel.unregister(sock)
                        os.close(outfd)
                        open_sides -= 1
                    else:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(outfd, view):]
    except OSError:
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: relay.py HOST PORT")
    sys.exit(relay(sys.argv[1], int(sys.argv[2])))
