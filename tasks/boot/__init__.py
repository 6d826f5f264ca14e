"""Booting under QEMU: the harness (serial console, milestones, restricted NICs and their relays)
and the boot of a build's outputs."""
