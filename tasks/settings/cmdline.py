"""The kernel command line as GRUB hands it on: the grammar of the ISO's cmdline area.

A leaf of the settings (the `iso_cmdline` setting is checked with it before any work) that the ISO
stage (tasks.media.iso) writes and reads the area with. Layout of the area: docs/iso.md.
"""

from __future__ import annotations

import re

from tasks.core.arch import Arch
from tasks.core.errors import HookError

#: The size of the ISO's cmdline area, in bytes.
AREA_SIZE = 1024

#: Characters GRUB's script lexer takes literally in an unquoted word.
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.,:/=@+%^~!")
#: Characters GRUB treats specially inside double quotes.
_NOT_IN_DOUBLE = frozenset('$"\\')


def kernel_words(cmdline: str) -> list[str]:
    """The values of a kernel command line's words, split as the kernel does (lib/cmdline.c):
    whitespace separates, double quotes group; quotes around the whole word (`"a=b c"`) or around
    its value (`a="b c"`) are not part of the value.

    Raises HookError for what GRUB cannot hand to the kernel unchanged: a byte that is not printable
    ASCII (tabs and newlines included), an unbalanced double quote, a double quote anywhere else in
    a word, a ' or \\ (GRUB passes ', \\ and " on with a backslash added).
    """
    for index, char in enumerate(cmdline):
        if not " " <= char <= "~":
            raise HookError(f"the cmdline has {char!r} at position {index}: only printable ASCII and spaces "
                            "can be patched in (no tabs, newlines or other bytes)")
    tokens: list[str] = []
    current: list[str] = []
    quoted = False
    for char in cmdline:
        if char == " " and not quoted:
            if current:
                tokens.append("".join(current))
            current = []
            continue
        if char == '"':
            quoted = not quoted
        current.append(char)
    if quoted:
        raise HookError('the cmdline has an unbalanced double quote (")')
    if current:
        tokens.append("".join(current))
    words = []
    for token in tokens:
        key, equals, value = token.partition("=")
        if token.count('"') == 2 and token.startswith('"') and token.endswith('"'):
            word = token[1:-1]
        elif token.count('"') == 2 and equals and value.startswith('"') and value.endswith('"'):
            word = f"{key}={value[1:-1]}"
        elif '"' not in token:
            word = token
        else:
            raise HookError(f"the cmdline word {token!r} has a double quote inside it: GRUB would hand it to the "
                            'kernel with a backslash added; quote a whole word ("a=b c") or a value (a="b c")')
        bad = sorted(set(word) & {"'", "\\"})
        if bad:
            raise HookError(f"the cmdline word {token!r} holds {' and '.join(bad)}: GRUB would hand it to the kernel "
                            "with a backslash added, so it cannot be given this way")
        if word:
            words.append(word)
    return words


def cmdline_secrets(cmdline: str) -> list[str]:
    """The secrets of a cmdline (registry_password's value, as GRUB and the kernel see it): the
    build log masks them."""
    return [w.partition("=")[2] for w in kernel_words(cmdline) if w.startswith("registry_password=") and w[18:]]


def _grub_word(value: str) -> str:
    if set(value) <= _BARE:
        return value
    if not set(value) & _NOT_IN_DOUBLE:
        return f'"{value}"'
    return f"'{value}'"


def grub_words(cmdline: str) -> str:
    """A kernel command line as the words of a GRUB `linux` line that hand it on unchanged."""
    return " ".join(_grub_word(w) for w in kernel_words(cmdline))


def encode(cmdline: str, size: int = AREA_SIZE) -> bytes:
    """The area's content for a kernel command line: each word as GRUB reads it back unchanged
    (bare, "double-quoted" when it has a space, 'single-quoted' when it has $ or "), padded to size."""
    text = grub_words(cmdline).encode("ascii")
    if len(text) > size:
        raise HookError(f"the cmdline needs {len(text)} bytes in GRUB's syntax; the ISO's cmdline area holds {size}: "
                        "shorten it")
    return text.ljust(size, b" ")


def canonical(cmdline: str) -> str:
    """What the kernel is given (after GRUB's own `BOOT_IMAGE=/boot/vmlinuz `): the words, each one
    with a space in double quotes, one space apart. /proc/cmdline shows exactly this."""
    return " ".join(f'"{w}"' if " " in w else w for w in kernel_words(cmdline))


def decode(area: bytes) -> str:
    """The kernel command line an area gives (canonical form): GRUB's quoting rules for words."""
    text = area.decode("ascii", "replace")
    words: list[str] = []
    current: list[str] = []
    started = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == " ":
            if started:
                words.append("".join(current))
            current, started, i = [], False, i + 1
            continue
        started = True
        if char == "'":
            end = text.find("'", i + 1)
            end = len(text) if end < 0 else end
            current.append(text[i + 1:end])
            i = end + 1
        elif char == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '$"\\':
                    i += 1
                current.append(text[i])
                i += 1
            i += 1
        elif char == "\\" and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
        else:
            current.append(char)
            i += 1
    if started:
        words.append("".join(current))
    return " ".join(f'"{w}"' if " " in w else w for w in words if w)


#: {consoles} without Smee: the screen, and the arch's first serial port last (so /dev/console)
CONSOLES = "console=tty0 console={serial}"


def expand(cmdline: str, arch: Arch, *, smee: bool = True) -> str:
    """The iso_cmdline setting for one arch: {consoles} becomes nothing when Smee gives the consoles
    (smee: the ISO carries Smee's placeholder), else CONSOLES; {serial} becomes ttyS0 or ttyAMA0.

    Nothing, because Linux's 8250 driver has one console for all its ports, taken by the first
    console=ttyS<n> of the cmdline: a built-in console=ttyS0 would keep the kernel's lines off
    Smee's console=ttyS1 (its last, the BMC's serial-over-LAN).
    """
    consoles = "" if smee else CONSOLES
    return cmdline.replace("{consoles}", consoles).replace("{serial}", arch.serial_console).strip()


def serial_consoles(cmdline: str) -> list[str]:
    """The console=ttyS<n> words of a cmdline (after expand)."""
    return re.findall(r"(?:^|\s)console=(ttyS\d+)", cmdline)


def check_cmdline(cmdline: str) -> None:
    """Refuse, with one line, an iso_cmdline setting that cannot go into the area (any arch)."""
    for arch in Arch:
        for smee in (True, False):
            encode(expand(cmdline, arch, smee=smee))
