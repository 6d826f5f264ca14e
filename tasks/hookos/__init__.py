"""The Hook OS stage: render its LinuxKit configs, provide and run LinuxKit v1.8.2, embed images."""
