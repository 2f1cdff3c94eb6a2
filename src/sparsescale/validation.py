"""The language-model loss and the validation loss on the fixed set: what training and `sparsescale eval` both
measure, in one leaf module (train -> evaluate -> validation, no cycle).

Features
- `autocast(device)`: bf16 autocast on CUDA, a no-op elsewhere (CPU trains and evaluates in fp32).
- `lm_loss(model, x, y)`: mean next-token cross-entropy in nats/token.
- `evaluate_loss(...)`: validation loss over the fixed first `n_tokens` tokens of the validation split; with
  several processes the batches are split over ranks and the sums all-reduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsescale import data as D
from sparsescale import distributed as dist


def autocast(device: str):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU trains and evaluates in fp32)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats/token. x, y: (B, T)."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate_loss(model, val_tokens, n_tokens: int, seq_len: int, batch_size: int, device: str, ctx=None) -> float:
    """Validation loss (nats/token) over the fixed first `n_tokens` tokens of the validation split.

    With several processes (`ctx`) rank r evaluates batches r, r+W, ... and the sums are all-reduced; every
    rank runs the same number of forwards (FSDP's are collective), the last round padded with a repeat."""
    ctx = ctx or dist.Context()
    was = model.training
    model.eval()
    total, count, mine, first = 0.0, 0, 0, None
    for i, (x, y) in enumerate(D.val_batches(val_tokens, n_tokens, seq_len, batch_size)):
        first = first or (x, y)
        if i % ctx.world_size != ctx.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device):
            loss = lm_loss(model, x, y)
        total += float(loss) * y.numel()
        count += y.numel()
        mine += 1
    for _ in range(mine, math.ceil((i + 1) / ctx.world_size)):  # padding forwards, results unused
        with autocast(device):
            lm_loss(model, first[0].to(device), first[1].to(device))
    total, count = dist.sum_over_ranks([total, count], ctx)
    model.train(was)
    return total / count
