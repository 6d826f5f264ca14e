"""Architectures: one type that converts between the naming schemes of each tool."""

from __future__ import annotations

import enum
import platform

from tasks.core.errors import HookError


class Arch(enum.Enum):
    """An output arch. The value is the name used in output file names (x86_64, aarch64)."""

    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @property
    def docker(self) -> str:
        """The name used by image tags, `linuxkit --arch` and TARGETARCH: amd64, arm64."""
        return {Arch.X86_64: "amd64", Arch.AARCH64: "arm64"}[self]

    @property
    def docker_platform(self) -> str:
        """The buildx platform: linux/amd64, linux/arm64."""
        return f"linux/{self.docker}"

    @property
    def serial_console(self) -> str:
        """The kernel's name of the first serial port: ttyS0 (x86_64), ttyAMA0 (aarch64's PL011)."""
        return {Arch.X86_64: "ttyS0", Arch.AARCH64: "ttyAMA0"}[self]

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.value}"

    @classmethod
    def parse(cls, name: str) -> Arch:
        """Accept any of the names (x86_64, amd64, linux/amd64, aarch64, arm64, ...)."""
        key = name.strip().lower().removeprefix("linux/")
        for arch in cls:
            if key in (arch.value, arch.docker):
                return arch
        valid = ", ".join(a.value for a in cls)
        raise HookError(f"unknown arch {name!r}: use one of {valid}")

    @classmethod
    def native(cls) -> Arch:
        """The arch of this machine."""
        return cls.parse(platform.machine())

    def __str__(self) -> str:
        return self.value
