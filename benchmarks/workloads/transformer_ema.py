"""Training with an EMA thread: a 2-layer TransformerEncoder (d_model=128, nhead=4) is trained
in the main thread for 40 steps; after every step an EMA thread folds the weights into a shadow
copy. A Condition hands each step over (the trainer waits until the EMA has consumed the previous
step, so every step is folded in exactly once); its lock orders the optimiser step against the
EMA's reads of the live parameters.
"""

import copy
import threading

import torch
from torch import nn

STEPS = 40
D_MODEL = 128
BATCH = 16
SEQ = 32
DECAY = 0.99


def main() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    shadow = copy.deepcopy(model)
    for p in shadow.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    target = torch.randn(BATCH, SEQ, D_MODEL)

    cond = threading.Condition()  # its lock also guards the live parameters while the EMA reads
    state = {"published": 0, "consumed": 0, "done": False}

    def ema_worker() -> None:
        while True:
            with cond:
                cond.wait_for(lambda: state["published"] > state["consumed"] or state["done"])
                if state["published"] == state["consumed"]:  # done and nothing new
                    return
                with torch.no_grad():
                    for s, p in zip(shadow.parameters(), model.parameters()):
                        s.mul_(DECAY).add_(p, alpha=1 - DECAY)
                state["consumed"] += 1
                cond.notify_all()

    ema = threading.Thread(target=ema_worker, name="ema")
    ema.start()
    for _ in range(STEPS):
        with cond:
            cond.wait_for(lambda: state["consumed"] == state["published"])
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            state["published"] += 1
            cond.notify_all()
    with cond:
        state["done"] = True
        cond.notify_all()
    ema.join()
    with torch.no_grad():
        drift = sum(float((s - p).abs().sum()) for s, p in zip(shadow.parameters(), model.parameters()))
    print(f"transformer_ema: final loss {loss.item():.4f}, ema drift {drift:.3f}")


if __name__ == "__main__":
    main()
