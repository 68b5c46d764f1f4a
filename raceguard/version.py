"""The version of raceguard (its own module, so that any layer can read it without importing the package's front ends)."""

__version__ = "0.1.0"
