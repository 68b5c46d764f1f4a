"""Inference server: 4 request threads share a 512->1024->512 MLP (eval mode) under a lock.

Each thread serves 60 requests of batch 32 with ``torch.no_grad()``; results go to a
thread-private list and are summed after ``join()``.
"""

import threading

import torch
from torch import nn

THREADS = 4
REQUESTS = 60
BATCH = 32


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    model.eval()
    lock = threading.Lock()
    results: list[list[float]] = [[] for _ in range(THREADS)]

    def serve(idx: int) -> None:
        gen = torch.Generator().manual_seed(idx)
        out = results[idx]
        for _ in range(REQUESTS):
            request = torch.randn(BATCH, 512, generator=gen)
            with lock, torch.no_grad():
                reply = model(request)
            out.append(float(reply.sum()))

    threads = [threading.Thread(target=serve, args=(i,), name=f"request-{i}") for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(sum(r) for r in results)
    print(f"mlp_server: {sum(len(r) for r in results)} requests, checksum {total:.3f}")


if __name__ == "__main__":
    main()
