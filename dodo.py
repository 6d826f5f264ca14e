"""hook's build graph. `doit list` is the menu; `doit settings` shows every setting.

Settings: `doit dist org=ghcr.io/me arches=x86_64`, else HOOK_* variables, else defaults.
"""

from __future__ import annotations

import functools
import os
import sys

from doit import get_var
from doit.exceptions import TaskFailed
from doit.task import clean_targets
from doit.tools import config_changed

from tasks import pipeline
from tasks.boot.builds import DEFAULT_CMDLINE, boot_build
from tasks.convert.stage import clean_converted, convert, convert_is_current
from tasks.core.arch import Arch
from tasks.core.doit_support import HookReporter, Sha256Checker, action, interrupt_on_sigterm, lazy_config_changed
from tasks.core.errors import HookError
from tasks.hookos import embed
from tasks.hookos.stage import os_inputs
from tasks.images import build as images
from tasks.images import tools
from tasks.images.bases import BaseResolver
from tasks.images.plan import ImagePlan, image_records, plan_images, refresh_bases
from tasks.images.specs import context_files, is_current
from tasks.kernel import source as source_kernel
from tasks.media import iso, netboot_sb
from tasks.media.package import package_build
from tasks.settings import SETTINGS, load_settings
from tasks.settings.builds import (
    BUILDS,
    Build,
    artifacts_record,
    bases_record,
    boot_files,
    dist_dir,
    get_build,
    image_record,
    linuxkit_dir,
    linuxkit_outputs,
    package_targets,
    rendered_files,
)

DOIT_CONFIG = {
    "default_tasks": ["dev_dist"],
    "reporter": HookReporter,
    "dep_file": "out/.doit.db",
    "backend": "json",
    "check_file_uptodate": Sha256Checker,
    "verbosity": 2,
}


def _cmdline_vars() -> dict[str, str]:
    from doit import doit_cmd

    return dict(getattr(doit_cmd, "_CMDLINE_VARS", None) or {})


os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"), exist_ok=True)  # doit's state lives here
interrupt_on_sigterm()  # SIGTERM stops a running linuxkit or buildx too, and leaves nothing half-made
try:
    S = load_settings(get_var, given=_cmdline_vars())
    PLANS = plan_images(S)
except HookError as exc:
    sys.exit(f"hook: {exc}")
BASES = BaseResolver.load(bases_record(S))

RELEASE, DEV, DEBUG = (BUILDS[name] for name in ("release", "dev", "debug"))
LOCAL_ARCHES = tuple(dict.fromkeys(DEV.arches(S) + DEBUG.arches(S)))


def _code(*packages: str, skip: tuple[str, ...] = ()) -> list:
    """The modules of tasks/<package>/ that shape an output: a fixed convert engine re-makes the initramfs."""
    return sorted(p for package in packages for p in (S.root / "tasks" / package).glob("*.py")
                  if p.name not in ("__init__.py", *skip))


# Our code that shapes an output is an input of it (not the CLIs, and not the tool provider).
OS_CODE = _code("hookos", "convert", skip=("embed.py", "tool.py", "cli.py"))
PACKAGE_CODE = [S.root / "tasks" / "media" / "package.py"]
ISO_CODE = [S.root / "tasks" / "media" / "iso.py", S.root / "tasks" / "settings" / "cmdline.py"]
NETBOOT_SB_CODE = [S.root / "tasks" / "media" / "netboot_sb.py", S.root / "tasks" / "settings" / "cmdline.py"]
EMBED_CODE = [S.root / "tasks" / "hookos" / "embed.py"]


def _relative(paths: list) -> list[str]:
    """Paths as doit stores them: relative to the project, so a moved checkout stays up to date."""
    return [os.path.relpath(p, S.root) for p in paths]


def _image_task(plan: ImagePlan, arch: Arch, *, local: bool) -> dict:
    record = image_record(S, plan.spec.name, arch, local=local)
    if plan.spec.maker == "kernel-source":  # our kernel from a source tarball (tasks.kernel.source)
        make, extra = functools.partial(source_kernel.make_kernel, push=not local), source_kernel.source_files(S)
    else:
        make, extra = images.load_image if local else images.push_image, []
    return {
        "name": f"{plan.spec.name}-{arch}",
        "file_dep": _relative([*plan.files, *extra]),
        "targets": _relative([record]),
        # The tag is made when the task runs (files, build args, base identities); this asks
        # whether any of those changed without a network lookup.
        "uptodate": [lambda: is_current(plan.spec, S, arch, record, BASES)],
        "actions": [action(make, plan.spec, S, arch, plan.files, record, BASES)],
        "clean": True,
    }


def task_image_load():
    """Build an image for one arch into the local engine (dev_dist, debug_image)."""
    for plan in PLANS.values():
        for arch in LOCAL_ARCHES:
            yield _image_task(plan, arch, local=True)


def task_image_push():
    """Build an image for one arch and push it as <org>/<image>:<hash>-<arch> (dist)."""
    for plan in PLANS.values():
        for arch in RELEASE.arches(S):
            yield _image_task(plan, arch, local=False)


def task_image_index():
    """Join the pushed per-arch images into the multi-arch index <org>/<image>:<hash> (dist)."""
    arches = RELEASE.arches(S)
    for plan in PLANS.values():
        record = image_record(S, plan.spec.name, None, local=False)
        sources = {a: image_record(S, plan.spec.name, a, local=False) for a in arches}
        yield {
            "name": plan.spec.name,
            "file_dep": _relative(list(sources.values())),
            "targets": _relative([record]),
            "uptodate": [config_changed({"org": S.org, "arches": [a.value for a in arches]})],
            "actions": [action(images.create_index, plan.spec, S, sources, record)],
            "clean": True,
        }


def task_linuxkit():
    """Render the LinuxKit config, run `linuxkit build`, convert its initrd (one build, one arch)."""
    for build in (RELEASE, DEV, DEBUG):
        for arch in build.arches(S):
            templates = [S.root / "linuxkit" / t for t in build.templates]
            records = list(image_records(S, PLANS, build, arch).values())
            records.append(embed.record_path(linuxkit_dir(S, build, arch)))  # the embedded images
            outputs = [*rendered_files(S, build, arch), *linuxkit_outputs(S, build, arch).values(),
                       *boot_files(S, build, arch)]
            yield {
                "name": f"{build.name}-{arch}",
                "file_dep": _relative(templates + records + OS_CODE),
                # settings, and for local builds the identity of each LinuxKit package in the engine
                "uptodate": [lazy_config_changed(lambda build=build, arch=arch: os_inputs(S, build, arch))],
                "targets": _relative(outputs),
                "actions": [action(pipeline.make_os, S, build, arch, PLANS)],
                "clean": [clean_targets, (clean_converted, (S, build, arch))],
            }


def task_embed():
    """Export the embedded images (embed_images) for one build and arch: archives the OS carries."""
    for build in (RELEASE, DEV, DEBUG):
        for arch in build.arches(S):
            folder = linuxkit_dir(S, build, arch)
            yield {
                "name": f"{build.name}-{arch}",
                "file_dep": _relative(EMBED_CODE),
                "targets": _relative(embed.targets(S, folder, arch)),
                # the list, and each image's identity now: local image id, or the recorded digest
                "uptodate": [lambda folder=folder, arch=arch, local=build.local:
                             embed.is_current(S, folder, arch, local=local)],
                "actions": [action(embed.export, S, folder, arch, local=build.local)],
                "clean": [clean_targets, (embed.clean, (folder,))],
            }


def task_convert():
    """Re-pack linuxkit's initrd again into initramfs-<arch> (never runs images or linuxkit)."""
    for build in (RELEASE, DEV, DEBUG):
        for arch in build.arches(S):
            yield {
                "name": f"{build.name}-{arch}",
                "uptodate": [lambda build=build, arch=arch: convert_is_current(S, build, arch)],
                "actions": [action(convert, S, build, arch)],
            }


def task_package():
    """Pack out/dist/<build>/: <prefix>-<version>.tar.gz, <prefix>_<arch>.tar.gz, checksum.txt."""
    for build in (RELEASE, DEV, DEBUG):
        inputs = [f for arch in build.arches(S) for f in boot_files(S, build, arch)]
        yield {
            "name": build.name,
            "file_dep": _relative(inputs + PACKAGE_CODE),
            "targets": _relative(package_targets(S, build)),
            "uptodate": [config_changed({"version": S.version, "mtime": S.source_date_epoch})],
            "actions": [action(package_build, S, build)],
            "clean": True,
        }


def task_dist():
    """Release: push multi-arch images, build every arch from the registry, package out/dist/release/."""
    return {"actions": None, "task_dep": ["package:release", *(["artifacts"] if S.artifacts else [])]}


def task_dev_dist():
    """Local: build this machine's arch from local images (no registry), package out/dist/dev/."""
    return {"actions": None, "task_dep": ["package:dev"]}


def task_debug_image():
    """Like dev_dist, plus sshd and your public keys (ssh_keys); package out/dist/debug/."""
    return {"actions": None, "task_dep": ["package:debug"]}


def task_iso_tools():
    """Build the ISO tools image (containers/hook-iso: GRUB, xorriso, mtools) into the local engine."""
    return {
        "file_dep": _relative(context_files(iso.TOOLS, S.root)),
        "targets": _relative([tools.record_path(S, iso.TOOLS)]),
        "uptodate": [lambda: tools.is_current(S, iso.TOOLS, BASES)],
        "actions": [action(tools.build, S, iso.TOOLS, BASES, versions=iso.TOOL_VERSIONS)],
        "clean": True,
    }


def _iso_tasks(build: Build):
    for arch in build.arches(S):
        record = iso.iso_record(S, build, arch)
        yield {
            "name": str(arch),
            "file_dep": _relative([*boot_files(S, build, arch), tools.record_path(S, iso.TOOLS), *ISO_CODE,
                                   *iso.sign_files(S)]),
            "targets": _relative([iso.iso_path(S, build, arch), record]),
            "task_dep": [f"package:{build.name}"],  # both write checksum.txt: one after the other
            "uptodate": [config_changed(iso.iso_config(S, arch)),
                         lambda build=build, arch=arch: iso.iso_is_current(S, build, arch)],
            "actions": [action(iso.make_iso, S, build, arch, record)],
            "clean": [clean_targets, (iso.clean_iso, (S, build, arch))],
        }


def task_iso():
    """Hybrid ISO (BIOS+UEFI) of the dev build: out/dist/dev/hook-<arch>.iso, cmdline from iso_cmdline."""
    yield from _iso_tasks(DEV)


def task_dist_iso():
    """Hybrid ISO of the release build, every arch: out/dist/release/hook-<arch>.iso."""
    yield from _iso_tasks(RELEASE)


def task_debug_iso():
    """Hybrid ISO of the debug build: out/dist/debug/hook-debug-<arch>.iso."""
    yield from _iso_tasks(DEBUG)


def _netboot_sb_tasks(build: Build):
    for arch in build.arches(S):
        record = netboot_sb.netboot_record(S, build, arch)
        yield {
            "name": str(arch),
            "file_dep": _relative([*boot_files(S, build, arch), tools.record_path(S, iso.TOOLS), *NETBOOT_SB_CODE,
                                   *iso.sign_files(S)]),
            "targets": _relative([netboot_sb.netboot_path(S, build, arch), record]),
            "task_dep": [f"package:{build.name}"],  # after the tarballs (a lock keeps checksum.txt whole)
            "uptodate": [config_changed(netboot_sb.netboot_config(S, arch)),
                         lambda build=build, arch=arch: netboot_sb.netboot_is_current(S, build, arch)],
            "actions": [action(netboot_sb.make_netboot, S, build, arch, record)],
            "clean": [clean_targets, (netboot_sb.clean_netboot, (S, build, arch))],
        }


def task_netboot_sb():
    """Netboot with Secure Boot on (shim, Debian's signed GRUB, by TFTP) for the dev build:
    out/dist/dev/hook-netboot-sb_<arch>.tar.gz, cmdline from netboot_sb_cmdline."""
    yield from _netboot_sb_tasks(DEV)


def task_dist_netboot_sb():
    """The Secure Boot netboot tarballs of the release build, every arch."""
    yield from _netboot_sb_tasks(RELEASE)


def task_debug_netboot_sb():
    """The Secure Boot netboot tarballs of the debug build."""
    yield from _netboot_sb_tasks(DEBUG)


def task_boot():
    """Boot a build under QEMU: doit boot [--build dev] [--cmdline ...] [--registry 127.0.0.1:5000] [--expect TEXT]."""

    def boot(build: str, arch: str, cmdline: str, memory: int, accel: str, expect: str, timeout: float,
             registry: str, ssh: int, net: str, smp: int, netboot: bool, uefi: bool, secure_boot: bool):
        try:
            chosen = get_build(build)
            boot_build(S, chosen, Arch.parse(arch) if arch else chosen.arches(S)[0], cmdline=cmdline,
                                memory_mb=memory, accel=accel, expect=expect, timeout=timeout, registry=registry,
                                ssh_port=ssh, net=net, smp=smp, netboot=netboot, uefi=uefi,
                       secure_boot=secure_boot)
        except HookError as exc:
            return TaskFailed(str(exc))
        return None

    return {
        "actions": [boot],
        "params": [
            {"name": "build", "long": "build", "default": "dev", "help": "release, dev or debug"},
            {"name": "arch", "long": "arch", "default": "", "help": "x86_64 or aarch64 (default: the build's first)"},
            {"name": "cmdline", "long": "cmdline", "default": DEFAULT_CMDLINE,
             "help": "kernel cmdline (the Tinkerbell keys), written --cmdline='...'; {registry} is --registry as the "
                     "guest sees it; console=<serial> is added last unless the last console= is the serial port"},
            {"name": "registry", "long": "registry", "default": "",
             "help": "a registry on this machine (127.0.0.1:PORT) the guest reaches as 10.0.2.100:5000"},
            {"name": "ssh", "long": "ssh", "type": int, "default": 0,
             "help": "forward 127.0.0.1:SSH on this machine to the guest's port 22 (debug builds)"},
            {"name": "net", "long": "net", "default": "user",
             "help": "user (QEMU user net, restrict=on: only the forwards) or none (no NIC)"},
            {"name": "memory", "long": "memory", "type": int, "default": 2048, "help": "MiB of guest memory"},
            {"name": "smp", "long": "smp", "type": int, "default": 2, "help": "guest CPUs"},
            {"name": "netboot", "long": "netboot", "type": bool, "default": False,
             "help": "boot as Smee does: iPXE (an e1000e's ROM) fetches the kernel and initramfs over HTTP from "
                     "127.0.0.1 with Smee's parameters; console ttyS1 (the firmware and iPXE: a ttyS0 file)"},
            {"name": "uefi", "long": "uefi", "type": bool, "default": False,
             "help": "with --netboot: UEFI (OVMF) instead of BIOS (SeaBIOS)"},
            {"name": "secure_boot", "long": "secure-boot", "type": bool, "default": False,
             "help": "with --netboot: the doit netboot_sb tarball by TFTP under OVMF (AAVMF with --arch aarch64) "
                     "with Secure Boot on (shim, "
                     "Debian's signed GRUB; the cmdline is its grub.cfg's, netboot_sb_cmdline)"},
            {"name": "accel", "long": "accel", "default": "auto", "help": "auto, tcg or kvm"},
            {"name": "expect", "long": "expect", "default": "",
             "help": "wait for this text on the console, then stop (default: interactive)"},
            {"name": "timeout", "long": "timeout", "type": float, "default": 600.0,
             "help": "seconds to wait for --expect"},
        ],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_kernel_config():
    """Edit our kernel config (kernel_flavour=source): make menuconfig in the builder, saved as a savedefconfig."""

    def edit(arch: str, tool: str) -> TaskFailed | None:
        try:
            source_kernel.edit_config(S, Arch.parse(arch) if arch else Arch.native(), BASES, tool=tool)
        except HookError as exc:
            return TaskFailed(str(exc))
        return None

    return {
        "actions": [edit],
        "params": [
            {"name": "arch", "long": "arch", "default": "", "help": "x86_64 or aarch64 (default: this machine's)"},
            {"name": "tool", "long": "tool", "default": "menuconfig",
             "help": "the make target: menuconfig (default), nconfig, or olddefconfig (no terminal needed)"},
        ],
        "uptodate": [False],
        "verbosity": 2,
    }


def task_bases():
    """Look up the registry base images again (network): an image whose base moved is rebuilt next time."""

    def refresh() -> None:
        refresh_bases(S, PLANS, BASES)
        embed.refresh_digests(S, RELEASE.arches(S))  # the release builds' embedded images

    return {"actions": [action(refresh)], "uptodate": [False], "verbosity": 2}


def task_settings():
    """Show every setting: its value now, its HOOK_* variable and what it does."""

    def show() -> None:
        for setting in SETTINGS:
            value = getattr(S, setting.name, "")
            if setting.name == "arches":
                value = ",".join(a.value for a in S.arches) if S.arches else "(per build)"
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            value = str(value) if value is not None else ""
            print(f"{setting.name:18} = {value or '':30} {setting.env:24} {setting.doc}")

    return {"actions": [show], "uptodate": [False], "verbosity": 2}


def _deploy():  # noqa: ANN202 - the module
    """tasks.deploy.stage, imported only when a task of it runs (dodo.py loads on every doit command)."""
    from tasks.deploy import stage

    return stage


def task_artifacts():
    """Push the release build's files as OCI images: <org>/hook-artifacts:<version> and :<version>-<arch>."""
    return {
        "file_dep": _relative([dist_dir(S, RELEASE) / "checksum.txt"]),  # every file's sha512: what is pushed
        "targets": _relative([artifacts_record(S)]),
        "uptodate": [config_changed({"org": S.org, "mtime": S.source_date_epoch})],
        "actions": [action(lambda: _deploy().artifacts(S))],
        "clean": True,
    }


def task_deploy():
    """Install a build into a Tinkerbell webroot: doit deploy webroot=DIR [from=BUILD|FOLDER|IMAGE] [--rollback]."""

    def run(rollback: bool) -> TaskFailed | None:
        try:
            _deploy().deploy(S, rollback=rollback)
        except HookError as exc:
            return TaskFailed(str(exc))
        except KeyboardInterrupt:
            return TaskFailed("interrupted: the current version still serves; run the same command again")
        return None

    return {
        "actions": [run],
        "params": [{"name": "rollback", "long": "rollback", "type": bool, "default": False,
                    "help": "make the version deployed before the current one current again"}],
        "uptodate": [False],
        "verbosity": 2,
    }
