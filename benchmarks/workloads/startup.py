"""Reference: only imports torch and does one op. Its raceguard/plain difference is the fixed cost
of ``raceguard check`` (the supervisor, the child's set-up, the report), not a per-op cost."""

import torch

print(f"startup: {float(torch.ones(4).sum()):.0f}")
