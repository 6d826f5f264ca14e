"""Our kernel: the source flavour's build (a tarball, our config, the builder; docs/kernel.md).

The debian flavour is a plain Dockerfile build (containers/hook-kernel/debian) of the image stage.
"""
