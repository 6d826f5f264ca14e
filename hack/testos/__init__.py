"""The test OS (hack/test-os.py), one module per kind of part; see docs/test-os.md, "Layout".

common (plumbing, root filesystems) <- engine (images, content keys, docker) <- debs,
bases, linuxkit_pkgs, workloads (the parts) <- cli (the command and the run). No module imports
one to its right.
"""
