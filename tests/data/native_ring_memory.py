"""Peak-RSS growth of many recording threads: eight threads each run ``x.add_(1)`` on a tensor of
their own, with the native recorder drained into a session, and the program prints how much
VmHWM grew (MB). Each thread's record buffers span about 8.5 MB; the pages of records already
drained go back to the kernel, so the growth stays near what is pending (a few MB in all)
rather than the whole span per thread (about 70 MB here before they did).

Usage: python native_ring_memory.py OPS_PER_THREAD
"""

import sys
import threading

import torch

from raceguard.capture.native.backend import NativeBackend
from raceguard.capture.native.build import ensure
from raceguard.capture.session import Session
from raceguard.process.install import activate, deactivate


def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main(ops):
    module = ensure().module
    session = Session(lambda event: None)
    backend = NativeBackend(module)
    backend.attach(session)
    handle = activate(session, thread=threading.main_thread())
    tensors = [torch.zeros(16, 16) for _ in range(8)]

    def work(x):
        for _ in range(ops):
            x.add_(1)

    before = peak_mb()
    threads = [threading.Thread(target=work, args=(x,)) for x in tensors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.drain()
    grown = peak_mb() - before
    deactivate(handle)
    backend.stop()
    assert all(int(x[0, 0]) == ops for x in tensors)
    print(f"{grown:.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
