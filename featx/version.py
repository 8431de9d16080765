"""featx's version: one place, read by the package, the files it writes and setup.cfg."""

__version__ = "0.1.0"
