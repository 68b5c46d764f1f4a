"""Threads that come and go while the native recorder's records are drained: four threads each
train a tiny MLP of their own, then four train one set of shared weights (optimizer step under a
lock), in a fresh raceguard session each round, for a few seconds. Storages die on the target's
threads while other threads drain. A native shadow table swept while a record was being applied
freed an entry of that record whose storage had just died: heap corruption (in one of three
20-second runs of this program; within 8-17 s in every run of a similar benchmark loop).

Usage: python native_drain_churn.py SECONDS   (prints the number of rounds; exit 0)
"""

import sys
import threading
import time

import torch

from raceguard.capture.native.backend import NativeBackend
from raceguard.capture.native.build import ensure
from raceguard.capture.session import Session
from raceguard.process.install import activate, deactivate


def make():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model, steps, lock=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.ones(16, 32), torch.zeros(16, 10)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if lock is None:
            opt.step()
        else:
            with lock:
                opt.step()


def on_shared(shared):
    model = make()
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), shared.parameters()):
            mine.set_(theirs.untyped_storage(), theirs.storage_offset(), theirs.shape, theirs.stride())
    return model


def in_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main(seconds):
    module = ensure().module
    if module is None:
        sys.exit("native recorder unavailable")
    own = [make() for _ in range(4)]
    shared, lock = make(), threading.Lock()
    replicas = [on_shared(shared) for _ in range(4)]
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        session = Session(lambda event: None)
        backend = NativeBackend(module)
        backend.attach(session)
        handle = activate(session)
        try:
            in_threads([lambda m=m: train(m, 100) for m in own])
            in_threads([lambda m=m: train(m, 100, lock) for m in replicas])
            backend.drain()
        finally:
            deactivate(handle)
            backend.stop()
        rounds += 1
    print(rounds)


if __name__ == "__main__":
    main(float(sys.argv[1]))
