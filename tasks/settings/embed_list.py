"""The `embed_images` setting: a comma list or `@FILE` of `IMAGE [NAME]` entries (docs/embedded.md).

A leaf of the settings: it checks the text of the setting and nothing else; tasks.hookos.embed
exports the images it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.core.errors import HookError
from tasks.core.refs import REF, TAGGED, split_tag


@dataclass(frozen=True)
class Entry:
    """One embedded image for one arch: where it is taken from, and the name it has in the OS."""

    source: str
    name: str


def default_name(source: str) -> str | None:
    """The name an image is embedded as when the list gives none: the source's repository and tag
    (`:latest` when it has none, as docker does); None for a source pinned by digest alone."""
    repo, tag, digest = split_tag(source)
    if digest and not tag:
        return None
    return f"{repo}:{tag or 'latest'}"


def parse_setting(text: str, root: Path) -> tuple[str, ...]:
    """Validate `embed_images` and return its entries, each `SOURCE` or `SOURCE NAME`.

    The setting is a comma list, or `@FILE` (relative to the project) with one entry a line, where
    `#` starts a comment. SOURCE may hold `{arch}` (amd64/arm64); NAME is the reference the OS
    knows the image by (default: SOURCE without its digest, `:latest` when untagged).
    """
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        path = path if path.is_absolute() else root / path
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise HookError(f"setting embed_images={text}: cannot read {path} ({exc.strerror}): give a file "
                            "with one image reference a line, or a comma list") from None
        items = [(f"{path.name} line {n}", line.split("#", 1)[0].strip()) for n, line in enumerate(lines, 1)]
    else:
        items = [(f"item {n}", item.strip()) for n, item in enumerate(text.split(","), 1)]
    entries: list[str] = []
    names: dict[str, str] = {}
    for where, item in items:
        if not item:
            continue
        words = item.split()
        if len(words) > 2:
            raise HookError(f"setting embed_images ({where}): {item!r} is not 'IMAGE' or 'IMAGE NAME'")
        source = words[0]
        if not REF.match(source.replace("{arch}", "amd64")) or "{" in source.replace("{arch}", ""):
            raise HookError(f"setting embed_images ({where}): {source!r} is not an image reference "
                            "(lowercase [registry/]path[:tag][@sha256:...]; {arch} may stand for amd64/arm64)")
        name = words[1] if len(words) == 2 else default_name(source)
        if name is None:
            raise HookError(f"setting embed_images ({where}): {source} is pinned by digest alone; give the "
                            f"name the OS asks for after it: '{source} REPOSITORY:TAG'")
        if len(words) == 2 and not TAGGED.match(name):
            raise HookError(f"setting embed_images ({where}): the name {name!r} must be REPOSITORY:TAG "
                            "(lowercase, no digest, no {arch}): the OS finds the image by it")
        key = name.replace("{arch}", "amd64")
        if key in names:
            raise HookError(f"setting embed_images ({where}): {name} is embedded twice ({names[key]} and {item})")
        names[key] = item
        entries.append(source if len(words) == 1 else f"{source} {name}")
    return tuple(entries)
