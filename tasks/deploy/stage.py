"""`doit deploy`: one build into a Tinkerbell webroot (tasks.deploy.webroot has the layout).

1. The build's checksum.txt says which files it has; the same version, current already, is nothing to do.
2. Its files are copied (or `docker cp`ed from an artefact image) into a temporary folder in the webroot
   and checked there against checksum.txt (sha512); vmlinuz-<arch> and initramfs-<arch> are unpacked
   from each `<prefix>_<arch>.tar.gz`, as the Tinkerbell chart does, and a checksum.txt covering
   every file of the folder is written. The folder is then renamed to `<version>/`.
3. One rename of the `current` link makes it the version served, by every top-level name at once.
4. Only then are the versions beyond deploy_keep removed.

A deploy that fails or is killed before 3 leaves the current version serving, untouched; whatever it
left is removed by the next one. `doit deploy --rollback` makes the version before the current one
current again (checked against its checksum.txt first).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core.errors import HookError
from tasks.core.files import atomic_write_text
from tasks.core.run import log_step
from tasks.deploy import webroot
from tasks.deploy.oci import ImageSource, push_artifacts
from tasks.deploy.sources import FolderSource, Layout, Source, fsync_file, layout_of
from tasks.media.checksums import NAME, format_checksums, read_checksums, verify_checksums
from tasks.settings.builds import BUILDS, artifacts_record, dist_dir

if TYPE_CHECKING:
    from tasks.settings import Settings

#: Tests only: pause (sleep) at this point, so that a test can kill the deploy there:
#: copied (the temporary folder is complete and checked), installed (renamed to <version>/), swapped.
PAUSE = "HOOK_TEST_DEPLOY_PAUSE"


def _pause(point: str) -> None:
    if os.environ.get(PAUSE) == point:
        log_step(f"deploy: paused after {point} ({PAUSE})")
        time.sleep(3600)


def _relative(settings: Settings, path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(settings.root))
    return str(path)


@contextlib.contextmanager
def open_source(settings: Settings) -> Iterator[Source]:
    """deploy_from: empty (the release build, else the dev build), a build's name, a folder or an image."""
    chosen = settings.deploy_from
    if chosen.startswith("/"):
        yield FolderSource(Path(chosen), chosen)
    elif chosen in BUILDS:
        folder = dist_dir(settings, BUILDS[chosen])
        if not (folder / "checksum.txt").is_file():
            raise HookError(f"the {chosen} build is not packaged ({_relative(settings, folder)} has no checksum.txt): "
                            f"run doit {BUILDS[chosen].task} first")
        yield FolderSource(folder, f"the {chosen} build ({_relative(settings, folder)})")
    elif not chosen:
        for name in ("release", "dev"):
            folder = dist_dir(settings, BUILDS[name])
            if (folder / "checksum.txt").is_file():
                yield FolderSource(folder, f"the {name} build ({_relative(settings, folder)})")
                return
        raise HookError("no build to deploy: out/dist/release and out/dist/dev hold none; run doit dist (or doit "
                        "dev_dist), or say from=FOLDER or from=IMAGE")
    else:
        with ImageSource.opened(chosen) as source:
            yield source


def _unpack(tarball: Path, dest: Path, taken: set[str]) -> dict[str, str]:
    """The plain top-level files of a (checked) tarball, written into dest; their sha512 as written."""
    found: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not member.isfile() or not NAME.match(name):
                continue
            if name in taken or name in found or name == webroot.CHECKSUMS:
                raise HookError(f"{tarball.name} holds {name}, which the build has beside it too: not a hook tarball")
            handle = tar.extractfile(member)
            assert handle is not None
            digest = hashlib.sha512()
            with open(dest / name, "xb") as out:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            fsync_file(dest / name)
            found[name] = digest.hexdigest()
    return found


def _fill(source: Source, folder: Path, listing: dict[str, str], layout: Layout) -> int:
    """The version folder, complete and checked: the build's files, the unpacked ones, checksum.txt.
    Returns how many files were unpacked."""
    fetched: dict[str, str] = {}  # sha512 -> the name it was fetched as: same bytes are linked, not copied twice
    for name in sorted(listing):
        if listing[name] in fetched:
            os.link(folder / fetched[listing[name]], folder / name)
        else:
            source.fetch(name, folder / name)
            fetched[listing[name]] = name
    verify_checksums(folder, listing, where=f"{source.label}'s checksum.txt")
    unpacked: dict[str, str] = {}
    for arch in layout.arches:
        tarball = layout.tarball(arch)
        files = _unpack(folder / tarball, folder, set(listing) | set(unpacked))
        for want in (f"vmlinuz-{arch}", f"initramfs-{arch}"):
            if want not in files:
                raise HookError(f"{tarball} holds no {want}: not a hook build")
        unpacked.update(files)
    verify_checksums(folder, unpacked, where="the files unpacked from the tarballs")  # as they are on disk
    atomic_write_text(folder / webroot.CHECKSUMS, format_checksums({**listing, **unpacked}))
    _check_listing(folder)
    return len(unpacked)


def _check_listing(folder: Path) -> None:
    """checksum.txt of the new folder lists exactly its files (each was checked as it was written)."""
    lines = read_checksums(folder / webroot.CHECKSUMS)
    files = {p.name for p in folder.iterdir()} - {webroot.CHECKSUMS}
    if files != set(lines):
        raise HookError(f"{folder}: checksum.txt and the files differ ({', '.join(sorted(files ^ set(lines)))})")


def _reusable(root: Path, state: webroot.State, version: str, listing: dict[str, str]) -> bool:
    """A folder of this version hook made before (rolled back from, or kept) that holds this build intact."""
    folder = root / version
    if version not in state.installed or not folder.is_dir():
        return False
    try:
        lines = read_checksums(folder / webroot.CHECKSUMS)
        if any(lines.get(name) != digest for name, digest in listing.items()):
            return False
        webroot.verify_version(folder)
    except HookError as exc:
        log_step(f"deploy: {folder} is not intact ({exc}): installing it again")
        return False
    return True


def _install(settings: Settings, root: Path, state: webroot.State, source: Source) -> None:
    listing = source.listing()
    layout = layout_of(listing, source.version_label(), source.label)
    version = webroot.check_version(layout.version, source.label)
    if version == state.current:
        installed = read_checksums(root / version / webroot.CHECKSUMS)
        differs = sorted(name for name, digest in listing.items() if installed.get(name) != digest)
        if differs:
            raise HookError(f"{version} is current in {root} with other files ({differs[0]} differs): a new build "
                            "needs a new version (commit, or version=...); nothing was changed")
        links = webroot.switch(root, state, version)  # what a deploy stopped after its swap did not finish
        removed = webroot.prune(root, state, settings.deploy_keep)
        done = [f"links {', '.join(links)}"] if links else []
        done += [f"removed {', '.join(removed)} (deploy_keep={settings.deploy_keep})"] if removed else []
        log_step(f"deploy: {version} from {source.label} is current already in {root}: "
                 + ("; ".join(done) if done else "nothing to do"))
        return
    log_step(f"deploy: {version} from {source.label} into {root}")
    webroot.check_target(root, state, version, [])
    if _reusable(root, state, version, listing):
        log_step(f"deploy: {root / version} holds this build already (checked): not copied again")
    else:
        folder = webroot.new_folder(root, version)
        try:
            unpacked = _fill(source, folder, listing, layout)
            log_step(f"deploy: copied and checked {len(listing)} files, unpacked {unpacked}, into {folder.name}")
            _pause("copied")
            webroot.install(root, state, folder, version)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    _pause("installed")
    was = state.current
    webroot.switch(root, state, version)
    log_step(f"deploy: {version} is current" + (f" (was {was})" if was else "") + ": "
             + ", ".join(webroot.served_names(root / version)))
    _pause("swapped")
    removed = webroot.prune(root, state, settings.deploy_keep)
    if removed:
        log_step(f"deploy: removed {', '.join(removed)} (deploy_keep={settings.deploy_keep})")


def _rollback(root: Path, state: webroot.State) -> None:
    target = webroot.rollback_target(root, state)
    webroot.verify_version(root / target)  # a kept version that was changed is not served
    was = state.current
    state.history.pop()
    webroot.save(root, state)  # before the swap: a rollback stopped before it reads back as not done
    webroot.switch(root, state, target)
    log_step(f"deploy: rolled back: {target} is current again (was {was}, which the next deploy removes)")


def deploy(settings: Settings, *, rollback: bool = False) -> None:
    """`doit deploy [--rollback]` into the webroot setting."""
    root = settings.webroot
    if root is None:
        raise HookError("doit deploy needs the webroot: doit deploy webroot=DIR (or HOOK_WEBROOT)")
    with webroot.locked(root):
        left = webroot.clean_temporaries(root)
        if left:
            log_step(f"deploy: removed what a stopped deploy left: {', '.join(left)}")
        state = webroot.load(root)
        if rollback:
            _rollback(root, state)
        else:
            with open_source(settings) as source:
                _install(settings, root, state, source)
        older = ", ".join(reversed(state.history[:-1])) or "none"
        log_step(f"deploy: {root}: current {state.current}; rollback to (newest first): {older}")


def artifacts(settings: Settings) -> None:
    """`doit artifacts`: the release build's files as artefact images (tasks.deploy.oci)."""
    push_artifacts(settings.org, dist_dir(settings, BUILDS["release"]), artifacts_record(settings),
                   mtime=settings.source_date_epoch)
