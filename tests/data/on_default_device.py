"""Run a CPU fixture with every tensor on DEVICE: ``on_default_device.py DEVICE SCRIPT [ARGS]``.

For the GPU check: each CPU race and clean fixture, unchanged, with its model and tensors on
``cuda`` and every thread on the default stream. torch's default device is per thread, so each
thread enters it too. The script runs in this module's globals, as ``__main__``, so raceguard
names its globals (``model.fc1.weight``) exactly as when it is run directly.
"""

import sys
import threading

import torch

_device = torch.device(sys.argv[1])
_script = sys.argv[2]
torch.set_default_device(_device)
_bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _on_device(self: threading.Thread) -> None:
    with torch.device(_device):
        _bootstrap_inner(self)


threading.Thread._bootstrap_inner = _on_device  # type: ignore[attr-defined]
sys.argv = sys.argv[2:]
__file__ = _script
with open(_script) as _f:
    _code = compile(_f.read(), _script, "exec")
del _f
exec(_code)
