"""Settings: doit variables (`doit dist org=...`), else HOOK_* environment variables, else defaults.

All settings are read and validated once, up front, into one frozen object; a bad value stops the
build before any work with a line that names the setting and what it accepts.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core.arch import Arch
from tasks.core.errors import HookError
from tasks.core.refs import ORG, REF, split_tag
from tasks.settings.builds import BUILDS
from tasks.settings.cmdline import check_cmdline
from tasks.settings.embed_list import parse_setting as parse_embed_images

ROOT = Path(__file__).resolve().parent.parent.parent

#: The LinuxKit CLI this pipeline is written for (tasks.hookos.tool provides it).
LINUXKIT_VERSION = "v1.8.2"
DEFAULT_LINUXKIT_URL = f"https://github.com/linuxkit/linuxkit/releases/download/{LINUXKIT_VERSION}"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
COMPRESSIONS = ("gzip", "zstd")
KERNEL_FLAVOURS = ("debian", "source")
_SUITE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_KERNEL_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+~]*(-[0-9A-Za-z.+~]+)*$")


@dataclass(frozen=True)
class Setting:
    """One setting: its name (doit variable), default and help text."""

    name: str
    default: str
    doc: str

    @property
    def env(self) -> str:
        return "HOOK_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("org", "quay.io/tinkerbell", "registry and org of the hook images: <org>/hook-bootkit, <org>/hook-docker"),
    Setting("arches", "", "comma list of x86_64,aarch64 (dist: both; dev_dist/debug_image: this machine's)"),
    Setting("version", "", "version in the tarball names (default: short git sha, plus -dirty on a dirty tree)"),
    Setting("source_date_epoch", "", "mtime of tarball entries (default: SOURCE_DATE_EPOCH, else the last commit)"),
    Setting("kernel", "", "the kernel: empty builds ours (hook-kernel, kernel_flavour); or any LinuxKit kernel image"),
    Setting("kernel_flavour", "debian", "our kernel: debian (Debian's signed kernel package and firmware) or source"),
    Setting("kernel_suite", "bookworm", "debian flavour: the Debian suite (bookworm, bookworm-backports, trixie)"),
    Setting("kernel_version", "", "debian flavour: the kernel ABI name (6.1.0-57); empty: the suite's newest"),
    Setting("debian_builder", "", "the Debian image (with apt) our kernel and hook-events are made in; empty: "
            "debian:bookworm-slim"),
    Setting("kernel_src", "", "source flavour: a kernel source tarball, a URL (with kernel_src_sha256) or a file"),
    Setting("kernel_src_sha256", "", "source flavour: the sha256 the tarball must have (needed for a URL)"),
    Setting("kernel_config", "", "source flavour: the kernel config (empty: hook-kernel/source/config-<arch>)"),
    Setting("pkg_org", "linuxkit", "where the LinuxKit packages (init, runc, containerd, ...) are pulled from"),
    Setting("linuxkit", "linuxkit", "linuxkit v1.8.2: a path, or a name on PATH; not found: hook downloads it"),
    Setting("linuxkit_url", "", "where hook downloads linuxkit-linux-<arch> from (default: LinuxKit's v1.8.2 release)"),
    Setting("linuxkit_sha256", "", "the sha256 the downloaded linuxkit must have (upstream publishes none)"),
    Setting("linuxkit_src", "", "build linuxkit v1.8.2 from this source tarball or folder with Go instead"),
    Setting("cache_dir", "", "per-user cache shared by checkouts: linuxkit, Go's build cache (default ~/.cache/hook)"),
    Setting("builder", "", "buildx builder (docker buildx ls); empty: the current one"),
    Setting("ssh_keys", "~/.ssh/id_*.pub", "debug_image: comma list of public key files or globs"),
    Setting("compression", "gzip", "initramfs compression: gzip or zstd"),
    Setting("bootkit_base", "", "hook-bootkit BASE_IMAGE build arg ({arch} = amd64/arm64); empty: Dockerfile's"),
    Setting("docker_base", "", "hook-docker BASE_IMAGE build arg ({arch} = amd64/arm64); empty: Dockerfile's"),
    Setting("build_image", "", "BUILD_IMAGE build arg (build-platform python+pip stage); empty: Dockerfile's"),
    Setting("build_args", "", "more build args for every image: KEY=VALUE,KEY=VALUE ({arch} expanded)"),
    Setting("build_ca", "", "CA bundle passed to image builds as secret 'ca' (for pip behind a TLS proxy)"),
    Setting("iso_cmdline", "{consoles}",
            "the ISO's built-in kernel cmdline (Tinkerbell keys; {consoles} = nothing with iso_smee=true, Smee gives "
            "them, else 'console=tty0 console={serial}'; {serial} = ttyS0/ttyAMA0); patchable later"),
    Setting("iso_smee", "true", "the ISO carries Tinkerbell's placeholder that Smee patches as it serves it: "
            "true or false"),
    Setting("iso_base", "", "hook-iso (ISO tools) BASE_IMAGE build arg, a Debian with apt; empty: Dockerfile's"),
    Setting("iso_sign_key", "", "a PEM private key the ISOs' kernel is signed with for Secure Boot (sbsign; with "
            "iso_sign_cert; enrol that certificate as a MOK or in db: docs/iso.md); empty: not signed by us"),
    Setting("iso_sign_cert", "", "the PEM X.509 certificate of iso_sign_key"),
    Setting("netboot_sb_cmdline", "{consoles}",
            "doit netboot_sb: the kernel cmdline in its grub.cfg (Tinkerbell keys: grpc_authority, syslog_host...; "
            "{consoles} = 'console=tty0 console={serial}'); worker_id and hw_addr: the NIC's MAC unless given"),
    Setting("embed_images", "", "images in hook-docker's engine at boot: comma list of 'IMAGE [NAME]', or @FILE "
            "(one a line); local builds take them from the engine, dist from the registry (docs/embedded.md)"),
    Setting("artifacts", "false", "doit dist also pushes the files as OCI images <org>/hook-artifacts:<version> "
            "(every file) and :<version>-<arch>, one layer per file (true/false)"),
    Setting("webroot", "", "doit deploy: the Tinkerbell webroot (the folder nginx serves) a build is installed into"),
    Setting("deploy_keep", "3", "doit deploy: how many versions the webroot keeps, the current one included"),
    Setting("deploy_from", "", "doit deploy (also from=): release, dev, debug, a folder, or an image "
            "<org>/hook-artifacts:<version>[-<arch>]; empty: the release build, else the dev build"),
)
#: Shorter names a doit variable may use for a setting: `doit deploy from=REF`.
ALIASES = {"from": "deploy_from"}
SETTING_NAMES = frozenset(s.name for s in SETTINGS)
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


@dataclass(frozen=True)
class Settings:
    """The validated settings of one build."""

    org: str
    arches: tuple[Arch, ...] | None
    version: str
    source_date_epoch: int
    kernel: str
    pkg_org: str
    linuxkit: str
    linuxkit_url: str
    linuxkit_sha256: str
    linuxkit_src: str
    cache_dir: Path
    builder: str | None
    ssh_keys: tuple[str, ...]
    compression: str
    bootkit_base: str
    docker_base: str
    build_image: str
    build_args: Mapping[str, str] = field(default_factory=dict)
    build_ca: Path | None = None
    iso_cmdline: str = "{consoles}"
    iso_base: str = ""
    iso_smee: bool = True
    #: the key and certificate the ISOs' kernel is signed with (sbsign), or None
    iso_sign: tuple[Path, Path] | None = None
    netboot_sb_cmdline: str = "{consoles}"
    #: `SOURCE` or `SOURCE NAME` per embedded image (tasks.settings.embed_list parses and validates them)
    embed_images: tuple[str, ...] = ()
    kernel_flavour: str = "debian"
    kernel_suite: str = "bookworm"
    kernel_version: str = ""
    debian_builder: str = ""
    kernel_src: str = ""
    kernel_src_sha256: str = ""
    kernel_config: str = ""
    artifacts: bool = False
    #: doit deploy: the webroot (None: not given), the versions it keeps, and where the build comes from:
    #: "" (release, else dev), a build's name, a folder (absolute) or an image reference
    webroot: Path | None = None
    deploy_keep: int = 3
    deploy_from: str = ""
    root: Path = ROOT

    @property
    def out(self) -> Path:
        return self.root / "out"

    def arches_for(self, default: tuple[Arch, ...]) -> tuple[Arch, ...]:
        """The arches a build makes: the setting when given, else the build's own default."""
        return self.arches or default


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/hook, else ~/.cache/hook: per user, shared by every checkout."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "hook"


def _path(text: str, root: Path) -> Path:
    """A path setting: ~ expanded, relative to the project."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_version(root: Path) -> tuple[str, int] | None:
    """(short sha[-dirty], commit time) of the checkout at root, or None outside git."""
    head = _git(root, "log", "-1", "--format=%h %ct")
    if not head:
        return None
    sha, ctime = head.split()
    dirty = _git(root, "status", "--porcelain", "--untracked-files=normal")
    return (f"{sha}-dirty" if dirty else sha), int(ctime)


def _parse_build_args(text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise HookError(f"setting build_args: {item!r} is not KEY=VALUE; write build_args=KEY=VALUE,KEY2=VALUE2")
        args[key] = value
    return args


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise HookError(f"setting {name}={value!r} is not true or false")


def _iso_sign(key_text: str, cert_text: str, root: Path) -> tuple[Path, Path] | None:
    """iso_sign_key and iso_sign_cert: both or neither; PEM files, the key not encrypted (sbsign runs
    unattended). What a file holds is never quoted: one of them is a private key."""
    if not key_text and not cert_text:
        return None
    if not key_text or not cert_text:
        given, missing = ("iso_sign_key", "iso_sign_cert") if key_text else ("iso_sign_cert", "iso_sign_key")
        raise HookError(f"setting {given} needs {missing} too: the key and its certificate sign the ISOs' kernel "
                        "together (docs/iso.md, Secure Boot)")
    paths = []
    for name, text, begin in (("iso_sign_key", key_text, b"PRIVATE KEY-----"),
                              ("iso_sign_cert", cert_text, b"-----BEGIN CERTIFICATE-----")):
        path = _path(text, root)
        try:
            head = path.read_bytes()[:1 << 16]
        except OSError as exc:
            raise HookError(f"setting {name}={text!r}: cannot read it ({exc.strerror or exc})") from None
        if b"-----BEGIN " not in head or begin not in head:
            what = "a PEM private key (-----BEGIN PRIVATE KEY-----)" if name == "iso_sign_key" else \
                "a PEM certificate (-----BEGIN CERTIFICATE-----; openssl x509 -inform DER -in C.der -out C.crt)"
            raise HookError(f"setting {name}={text!r} is not {what}")
        if name == "iso_sign_key" and b"ENCRYPTED" in head:
            raise HookError(f"setting iso_sign_key={text!r} is encrypted: the build signs unattended; give it "
                            "without a passphrase (openssl pkey -in KEY -out KEY.plain; readable by you only)")
        paths.append(path)
    return paths[0], paths[1]


def _deploy_from(text: str, root: Path) -> str:
    """deploy_from: a build's name; a folder (made absolute); or an image reference with a tag or digest."""
    if not text or text in BUILDS:
        return text
    folder = _path(text, root)
    if text.startswith(("/", ".", "~")) or folder.is_dir():
        if not folder.is_dir():
            raise HookError(f"setting deploy_from={text!r}: no such folder")
        return str(folder)
    if REF.match(text) and "{" not in text and any(split_tag(text)[1:]):
        return text
    raise HookError(f"setting deploy_from={text!r} is not {', '.join(BUILDS)}, a folder, or an image reference "
                    "with a tag (<org>/hook-artifacts:<version>)")


def _check(name: str, value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(value.format(arch="amd64")):
        raise HookError(f"setting {name}={value!r} is not {what}")
    return value


def load_settings(
    get_var: Callable[[str, str | None], str | None],
    environ: Mapping[str, str] = os.environ,
    *,
    root: Path = ROOT,
    given: Mapping[str, str] | None = None,
) -> Settings:
    """Read every setting (doit variable, then HOOK_* variable, then default) and validate it.

    `given` is the full set of doit variables, to refuse unknown names (typos) up front.
    """
    for name in given or {}:
        if name not in SETTING_NAMES and name not in ALIASES:
            close = [s for s in sorted(SETTING_NAMES) if s[:3] == name[:3]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise HookError(f"unknown setting {name!r}{hint}; `doit settings` lists them all (doit takes every "
                            "NAME=VALUE word for a setting: join an option to a value holding '=', as in "
                            "--cmdline='console=ttyS0 worker_id=m1')")

    def get(name: str) -> str:
        setting = next(s for s in SETTINGS if s.name == name)
        value = get_var(name, None)
        for alias in (a for a, target in ALIASES.items() if target == name and value is None):
            value = get_var(alias, None)
        if value is None:
            value = environ.get(setting.env, setting.default)
        return value.strip()

    arches_text = get("arches")
    arches = tuple(Arch.parse(a) for a in arches_text.split(",") if a.strip()) or None
    if arches:
        arches = tuple(dict.fromkeys(arches))

    compression = get("compression")
    if compression not in COMPRESSIONS:
        raise HookError(f"setting compression={compression!r} is not one of {', '.join(COMPRESSIONS)}")

    version, epoch_text = get("version"), get("source_date_epoch") or environ.get("SOURCE_DATE_EPOCH", "")
    if not version or not epoch_text:
        found = git_version(root)
        if found is None and not version:
            raise HookError(f"{root} is not a git checkout: set version=... (or HOOK_VERSION)")
        if found:
            version = version or found[0]
            epoch_text = epoch_text or str(found[1])
    if not _VERSION.match(version):
        raise HookError(f"setting version={version!r} may hold only letters, digits and . _ + -")
    try:
        epoch = int(epoch_text or 0)
        if epoch < 0:
            raise ValueError
    except ValueError:
        raise HookError(f"setting source_date_epoch={epoch_text!r} is not a non-negative integer") from None

    sha256 = get("linuxkit_sha256").lower()
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise HookError(f"setting linuxkit_sha256={sha256!r} is not 64 hex digits (sha256sum prints them)")
    linuxkit_src = get("linuxkit_src")
    if linuxkit_src and not Path(linuxkit_src).expanduser().exists():
        raise HookError(f"setting linuxkit_src={linuxkit_src!r}: no such tarball or folder")
    cache_text = get("cache_dir")
    cache_dir = Path(cache_text).expanduser() if cache_text else default_cache_dir()

    build_ca_text = get("build_ca")
    build_ca = Path(build_ca_text).expanduser() if build_ca_text else None
    if build_ca and not build_ca.is_file():
        raise HookError(f"setting build_ca={build_ca_text!r}: no such file")

    iso_cmdline, iso_base = get("iso_cmdline"), get("iso_base")
    try:
        check_cmdline(iso_cmdline)
    except HookError as exc:
        raise HookError(f"setting iso_cmdline: {exc}") from None

    iso_sign = _iso_sign(get("iso_sign_key"), get("iso_sign_cert"), root)
    netboot_sb_cmdline = get("netboot_sb_cmdline")
    try:
        check_cmdline(netboot_sb_cmdline)
    except HookError as exc:
        raise HookError(f"setting netboot_sb_cmdline: {exc}") from None

    kernel, kernel_version, debian_builder = get("kernel"), get("kernel_version"), get("debian_builder")
    kernel_flavour = get("kernel_flavour")
    if kernel_flavour not in KERNEL_FLAVOURS:
        raise HookError(f"setting kernel_flavour={kernel_flavour!r} is not one of {', '.join(KERNEL_FLAVOURS)}")
    kernel_src, kernel_config = get("kernel_src"), get("kernel_config")
    kernel_src_sha256 = get("kernel_src_sha256").lower()
    if kernel_src_sha256 and not re.fullmatch(r"[0-9a-f]{64}", kernel_src_sha256):
        raise HookError(f"setting kernel_src_sha256={kernel_src_sha256!r} is not 64 hex digits (sha256sum prints them)")
    remote = kernel_src.startswith(("http://", "https://"))
    if kernel_src and not remote:
        kernel_src = str(_path(kernel_src, root))
        if not Path(kernel_src).is_file():
            raise HookError(f"setting kernel_src={get('kernel_src')!r}: no such file (a source tarball or a URL)")
    if kernel_flavour == "source" and not kernel:
        if not kernel_src:
            raise HookError("kernel_flavour=source needs kernel_src=: a kernel source tarball (a kernel.org URL with "
                            "kernel_src_sha256=, or a file such as Debian's linux-source-6.1)")
        if remote and not kernel_src_sha256:
            raise HookError(f"setting kernel_src={kernel_src} is a URL: give its sha256 too (kernel_src_sha256=; "
                            "kernel.org publishes sha256sums.asc)")
    if kernel_config:
        kernel_config = str(_path(kernel_config, root))
        if not Path(kernel_config).is_file():
            raise HookError(f"setting kernel_config={get('kernel_config')!r}: no such file")

    webroot_text = get("webroot")
    webroot = _path(webroot_text, root) if webroot_text else None
    if webroot and webroot.exists() and not webroot.is_dir():
        raise HookError(f"setting webroot={webroot_text!r} is not a folder")
    keep_text = get("deploy_keep")
    if not keep_text.isdigit() or int(keep_text) < 1:
        raise HookError(f"setting deploy_keep={keep_text!r} is not a whole number of at least 1 (the current version)")

    bases = {}
    for name in ("bootkit_base", "docker_base", "build_image"):
        value = get(name)
        bases[name] = _check(name, value, REF, "an image reference") if value else ""

    return Settings(
        org=_check("org", get("org"), ORG, "a registry/org such as quay.io/tinkerbell (lowercase)"),
        arches=arches,
        version=version,
        source_date_epoch=epoch,
        kernel=_check("kernel", kernel, REF, "an image reference such as linuxkit/kernel:6.6.71") if kernel else "",
        kernel_flavour=kernel_flavour,
        kernel_suite=_check("kernel_suite", get("kernel_suite"), _SUITE, "a Debian suite such as bookworm"),
        kernel_version=_check("kernel_version", kernel_version, _KERNEL_VERSION,
                              "a Debian kernel ABI name such as 6.1.0-57") if kernel_version else "",
        debian_builder=_check("debian_builder", debian_builder, REF, "an image reference") if debian_builder else "",
        kernel_src=kernel_src,
        kernel_src_sha256=kernel_src_sha256,
        kernel_config=kernel_config,
        pkg_org=_check("pkg_org", get("pkg_org"), ORG, "a registry/org such as linuxkit"),
        linuxkit=get("linuxkit") or "linuxkit",
        linuxkit_url=get("linuxkit_url") or DEFAULT_LINUXKIT_URL,
        linuxkit_sha256=sha256,
        linuxkit_src=str(Path(linuxkit_src).expanduser()) if linuxkit_src else "",
        cache_dir=cache_dir,
        builder=get("builder") or None,
        ssh_keys=tuple(k.strip() for k in get("ssh_keys").split(",") if k.strip()),
        compression=compression,
        build_args=_parse_build_args(get("build_args")),
        build_ca=build_ca,
        iso_cmdline=iso_cmdline,
        iso_base=_check("iso_base", iso_base, REF, "an image reference") if iso_base else "",
        iso_smee=_flag("iso_smee", get("iso_smee")),
        iso_sign=iso_sign,
        netboot_sb_cmdline=netboot_sb_cmdline,
        embed_images=parse_embed_images(get("embed_images"), root),
        artifacts=_flag("artifacts", get("artifacts")),
        webroot=webroot,
        deploy_keep=int(keep_text),
        deploy_from=_deploy_from(get("deploy_from"), root),
        root=root,
        **bases,
    )
