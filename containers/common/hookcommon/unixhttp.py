"""HTTP over a unix socket (the docker engine's API), with the standard library only.

Shared by hook-docker (loading embedded images through dockerd's socket) and the pipeline
(tasks/images/engine.py: the local engine's images in a millisecond, where the docker SDK's import alone
would cost a no-op build a third of its time).
"""

from __future__ import annotations

import os
import socket
from http.client import HTTPConnection


class UnixHTTPConnection(HTTPConnection):
    """An HTTPConnection to the server listening on the unix socket at path."""

    def __init__(self, path: str | os.PathLike[str], timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = os.fspath(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
