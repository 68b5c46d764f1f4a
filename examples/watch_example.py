"""raceguard.watch(): check threaded PyTorch code from inside a program or a test.

    python examples/watch_example.py

prints the data race of the unlocked reader (``parameter model.weight``), then
"locked version: clean". Everything it prints is checked by tests/test_api.py.
"""

import threading

import torch

import raceguard

model = torch.nn.Linear(8, 2)


def train(lock, steps=5):
    for _ in range(steps):
        with lock:
            with torch.no_grad():
                model.weight.add_(0.01)


def read_weights(lock, saved, use_lock):
    if use_lock:
        with lock:
            saved.append(model.weight.clone())
    else:
        saved.append(model.weight.clone())


def serve(use_lock):
    lock = threading.Lock()  # created inside the watched block, so raceguard sees what it orders
    saved = []
    threads = [
        threading.Thread(target=train, args=(lock,), name="trainer"),
        threading.Thread(target=read_weights, args=(lock, saved, use_lock), name="reader"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # join inside the block: work done after it is not watched
    return saved


# 1. A with block: the session collects findings; nothing is raised until you ask.
with raceguard.watch() as session:
    serve(use_lock=False)

race = session.findings[0]
print(race.kind, race.resource, sorted(a.thread for a in race.accesses))
try:
    session.assert_clean()
except raceguard.RaceError as error:
    print(error)  # the text report, as `raceguard check` prints it


# 2. A decorator: every call is watched and raises RaceError if it produced a finding.
@raceguard.watch(fail_on="error")
def serve_locked():
    return serve(use_lock=True)


serve_locked()
print("locked version:", "clean" if not serve_locked.last_session.findings else "races")
