"""checksum.txt read back: the `sha512sum -c` lines package() and the ISOs write, parsed strictly and
checked against the files of a folder.

A line is `<128 hex digits>  <name>` (`<hex> *<name>`, sha512sum's binary mode, is read too); a name is a
plain file of the same folder. Anything else is refused, since a checksum file that was edited by hand
or cut short must not pass as one that covers the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from tasks.core.errors import HookError
from tasks.core.files import file_digest

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_LINE = re.compile(r"^([0-9a-fA-F]{128}) [ *](.+)$")


def parse_checksums(text: str, where: str) -> dict[str, str]:
    """{name: sha512 hex} of a checksum.txt's text; where names it in the refusal."""
    lines: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        found = _LINE.match(line)
        if not found or not NAME.match(found.group(2)):
            raise HookError(f"{where}: line {number} is not '<sha512 hex>  <file name>' (sha512sum's format): "
                            "the file was changed or cut short")
        name = found.group(2)
        if name in lines:
            raise HookError(f"{where}: {name} is listed twice")
        lines[name] = found.group(1).lower()
    if not lines:
        raise HookError(f"{where} lists no file")
    return lines


def read_checksums(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise HookError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HookError(f"{path} cannot be read ({exc})") from None
    return parse_checksums(text, str(path))


def format_checksums(lines: Mapping[str, str]) -> str:
    """The text of a checksum.txt: one line per file, sorted by name, as sha512sum writes them."""
    return "".join(f"{lines[name]}  {name}\n" for name in sorted(lines))


def verify_checksums(folder: Path, lines: Mapping[str, str], *, where: str) -> None:
    """Every listed file is a plain file of folder whose sha512 is its line's (`sha512sum -c`)."""
    for name in sorted(lines):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise HookError(f"{name} is listed in {where} but is not a file there")
        if file_digest(path, "sha512") != lines[name]:
            raise HookError(f"{name} does not match its sha512 in {where} (the file or checksum.txt was changed, "
                            "or the copy is broken)")
