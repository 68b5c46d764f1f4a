"""raceguard: a happens-before data-race and deadlock detector for PyTorch programs."""

__version__ = "0.1.0"
