"""Single-thread training: a 3-layer MLP (256 wide, batch 64) trained with Adam for 150 steps.

Many small ops in one thread, no synchronisation: the per-op cost of the capture dominates.
"""

import torch
from torch import nn

STEPS = 150
WIDTH = 256
BATCH = 64


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, WIDTH),
        nn.ReLU(),
        nn.Linear(WIDTH, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(BATCH, WIDTH)
    y = torch.randint(0, 10, (BATCH,))
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    print(f"mlp_single: final loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
