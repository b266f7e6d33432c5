"""blkjobs: QEMU-style block jobs and image tools with a C data path."""

__version__ = "0.1.0"
