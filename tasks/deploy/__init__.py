"""doit deploy: one build installed into a Tinkerbell webroot (a folder per version, switched by one
symlink rename), and the build's files as OCI artefact images (`<org>/hook-artifacts:<version>`)."""
