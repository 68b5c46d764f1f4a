"""raceguard's pytest plugin on a small training loop.

A trainer thread updates the model under a lock while a checkpoint thread copies the weights.
``test_checkpoint_racy`` forgets the lock on the checkpoint side: plain ``pytest`` passes it
(the race is real, this run's timing just did not show it), ``pytest --raceguard`` fails it
with a data race on ``model.weight``. ``test_checkpoint_locked`` takes the lock on both sides
and passes either way.

    pytest examples/pytest_example                # 3 passed
    pytest --raceguard examples/pytest_example    # 1 failed (the racy one), 2 passed
"""

import threading

import pytest
import torch


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 2)


def train(model, lock, steps=5):
    for _ in range(steps):
        with lock:
            with torch.no_grad():
                model.weight.add_(0.01)


def checkpoint(model, lock, saved, use_lock):
    if use_lock:
        with lock:
            saved.append(model.weight.clone())
    else:
        saved.append(model.weight.clone())  # reads while the trainer may be writing


def train_and_checkpoint(model, use_lock):
    lock = threading.Lock()
    saved = []
    threads = [
        threading.Thread(target=train, args=(model, lock), name="trainer"),
        threading.Thread(target=checkpoint, args=(model, lock, saved, use_lock), name="checkpointer"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return saved


def test_checkpoint_racy(model):
    assert len(train_and_checkpoint(model, use_lock=False)) == 1


def test_checkpoint_locked(model):
    assert len(train_and_checkpoint(model, use_lock=True)) == 1


def test_checkpoint_locked_checked_midway(raceguard, model):
    # The `raceguard` fixture turns detection on for this test even without --raceguard.
    train_and_checkpoint(model, use_lock=True)
    raceguard.assert_clean()  # findings so far; the plugin checks again when the test ends
    assert raceguard.findings == []
