"""A thread ends holding a Python object in torch's C++ thread-locals, as the first thread to
import ``torch._inductor.cudagraph_trees`` does; the main thread ends right after joining it.

The object is released by the thread's C++ thread-local destructor, after its Python code ended;
its ``__del__`` sleeps (releasing the GIL) before printing. If the interpreter finalizes
meanwhile, the thread dies in a forced unwind torch cannot pass (SIGABRT) and "released" is never
printed; plain python loses that race in some runs, raceguard's checked process waits for it.
"""
import threading
import time

import torch


class Held:
    def __del__(self):
        time.sleep(0.05)
        print("released", flush=True)


def worker():
    torch._C._stash_obj_in_tls("raceguard_test_held", Held())
    print("worker done", flush=True)


t = threading.Thread(target=worker)
t.start()
t.join()
print("main done", flush=True)
