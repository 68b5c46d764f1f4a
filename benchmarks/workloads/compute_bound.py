"""Compute-bound: 10 chained 2048x2048 @ 2048x2048 matmuls in one thread. Few ops, heavy
kernels: the capture's fixed per-op cost should vanish next to the compute."""

import torch

N = 2048
ITERS = 10


def main() -> None:
    torch.manual_seed(0)
    a = torch.randn(N, N)
    b = torch.randn(N, N) / N**0.5
    for _ in range(ITERS):
        a = a @ b
        a = a / a.norm()
    print(f"compute_bound: checksum {float(a.sum()):.6f}")


if __name__ == "__main__":
    main()
