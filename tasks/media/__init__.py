"""What users download: reproducible tarballs with checksums, and the hybrid ISO."""
