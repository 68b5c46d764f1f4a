"""Issue 14's second GPU workload: 4 request threads, each on its own CUDA stream (when there is a
GPU), serve 100 requests each from a shared 3-layer MLP in eval mode; every reply is read back with
``.item()``. Device-agnostic (cuda when available, else cpu, where there are no streams). Prints
the loop time after warm-up (``loop_seconds``). ``--requests N`` shortens it; ``--batch``,
``--in-features`` and ``--hidden`` shrink the tensors, not the op mix (the proxy's launch-bound
estimate wants kernels that cost next to nothing).
"""

import argparse
import contextlib
import threading
import time

import torch
from torch import nn

ap = argparse.ArgumentParser()
ap.add_argument("--requests", type=int, default=100)
ap.add_argument("--threads", type=int, default=4)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--in-features", type=int, default=256)
ap.add_argument("--hidden", type=int, default=512)
args = ap.parse_args()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(args.in_features, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(),
                      nn.Linear(args.hidden, 10))
model = model.to(DEVICE).eval()
if DEVICE.type == "cuda":
    torch.cuda.synchronize()  # the weights are on the device before any side stream reads them
start = threading.Barrier(args.threads + 1)
checksums = [0.0] * args.threads


def serve(idx: int) -> None:
    stream = torch.cuda.Stream() if DEVICE.type == "cuda" else None
    gen = torch.Generator(device=DEVICE).manual_seed(idx)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        with torch.no_grad():
            model(torch.randn(args.batch, args.in_features, device=DEVICE, generator=gen))  # warm-up
        start.wait()
        total = 0.0
        for _ in range(args.requests):
            with torch.no_grad():
                reply = model(torch.randn(args.batch, args.in_features, device=DEVICE, generator=gen))
            total += float(reply.sum().item())  # the request waits for its own stream
        checksums[idx] = total


threads = [threading.Thread(target=serve, args=(i,), name=f"request-{i}") for i in range(args.threads)]
for t in threads:
    t.start()
start.wait()
started = time.perf_counter()
for t in threads:
    t.join()
loop = time.perf_counter() - started
print(f"stream_requests: device {DEVICE.type}, checksum {sum(checksums):.3f}, loop_seconds={loop:.4f}")
