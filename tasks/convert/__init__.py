"""The initramfs convert engine (read, plan, write; its CLI) and the convert stage of a build.

Light on purpose: the engine's modules (zlib-ng, zstd, threads) are imported where they are used.
"""
