"""The images we build (hook-bootkit, hook-docker and the tools images): content-hash tags, base
identities, the local engine, buildx builds and pushes, multi-arch indexes."""
