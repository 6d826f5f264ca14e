"""Tinkerbell's Smee, the part that patches an ISO as it serves it: written here from
../shared/tinkerbell/SMEE.md (smee/internal/iso/iso.go), independently of tasks.media.iso, so
that a test sees our ISO the way a real Smee sees it.

Smee copies the upstream ISO in reads of a 32 KiB buffer and parses nothing. Within each read it
finds the first occurrence of the 1024-byte magic string, writes 1024 spaces over it, then writes
its patch over those spaces; a longer patch overwrites what follows (within that read). A match
that straddles two reads, or a second match in one read, is not patched; no match: the ISO passes
through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tests.conftest import SHARED

MAGIC = (SHARED / "tinkerbell" / "smee-iso-magic.txt").read_bytes()
READ_SIZE = 32 * 1024
#: Smee's consoles when the Hardware's facility names none: ttyS1 last, so it is /dev/console
DEFAULT_CONSOLES = "console=ttyAMA0 console=ttyS0 console=tty0 console=tty1 console=ttyS1"


def patch_text(*, mac: str, syslog_host: str, grpc_authority: str, tls: bool = False, vlan_id: str = "",
               extra: str = "", ipam: str = "") -> str:
    """The machine's parameters in Smee's order, one space between parts (no facility)."""
    parts = [DEFAULT_CONSOLES]
    if vlan_id:
        parts.append(f"vlan_id={vlan_id}")
    parts.append(f"hw_addr={mac} syslog_host={syslog_host} grpc_authority={grpc_authority} "
                 f"tinkerbell_tls={'true' if tls else 'false'} worker_id={mac}")
    if extra:
        parts.append(extra)
    if ipam:
        parts.append(f"ipam={ipam}")
    return " ".join(parts)


def serve(source: Path, patch: str) -> Iterator[bytes]:
    """The body Smee sends for /iso/<mac>/<name>.iso: the upstream ISO, patched read by read."""
    data = patch.encode()
    with source.open("rb") as handle:
        while chunk := handle.read(READ_SIZE):
            at = chunk.find(MAGIC)
            if at >= 0:
                buf = bytearray(chunk)
                buf[at:at + len(MAGIC)] = b" " * len(MAGIC)
                end = min(at + len(data), len(buf))
                buf[at:end] = data[:end - at]
                chunk = bytes(buf)
            yield chunk


def patched_copy(source: Path, target: Path, patch: str) -> Path:
    """What a machine downloads from Smee, saved as a file (Content-Length is unchanged)."""
    with target.open("wb") as out:
        for chunk in serve(source, patch):
            out.write(chunk)
    return target
