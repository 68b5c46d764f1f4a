"""Issue 14's first GPU workload: a 4-layer TransformerEncoder (d_model=256, 8 heads) trained with
AdamW for 60 steps; every 10 steps an EMA thread takes a snapshot of the weights under the lock
the trainer steps under. Device-agnostic (cuda when available, else cpu). Prints the loop time
after warm-up (``loop_seconds``), which the GPU benchmark compares across plain, raceguard and
CUDA Sanitizer. ``--steps N`` shortens it (the CPU proxy); ``--d-model``, ``--batch`` and ``--seq``
shrink the tensors, not the op mix (the proxy's launch-bound estimate wants kernels that cost
next to nothing).
"""

import argparse
import copy
import threading
import time

import torch
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--d-model", type=int, default=256)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--seq", type=int, default=64)
args = ap.parse_args()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(args.d_model, nhead=8, dim_feedforward=4 * args.d_model, dropout=0.0,
                                   batch_first=True)
model = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).to(DEVICE)
ema = copy.deepcopy(model).requires_grad_(False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(args.batch, args.seq, args.d_model, device=DEVICE)
target = torch.randn(args.batch, args.seq, args.d_model, device=DEVICE)
lock = threading.Lock()
snapshot_due = threading.Semaphore(0)
done = threading.Event()


def ema_worker() -> None:
    while True:
        snapshot_due.acquire()
        if done.is_set():
            return
        with lock, torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.mul_(0.9).add_(p, alpha=0.1)


def step() -> float:
    with lock:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
    return loss


worker = threading.Thread(target=ema_worker, name="ema")
worker.start()
for _ in range(args.warmup):
    step()
if DEVICE.type == "cuda":
    torch.cuda.synchronize()
started = time.perf_counter()
for i in range(args.steps):
    loss = step()
    if (i + 1) % 10 == 0:
        snapshot_due.release()
final = float(loss.item())  # waits for the device: the loop's kernels are all in the time
loop = time.perf_counter() - started
done.set()
snapshot_due.release()
worker.join()
print(f"transformer_adamw_ema: device {DEVICE.type}, final loss {final:.4f}, loop_seconds={loop:.4f}")
