"""Process-group plumbing for `train(cfg)`: one process, or many under torchrun (DDP or FSDP).

Features
- `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU.
- `wrap(model, ctx, cfg)`: DistributedDataParallel by default, FullyShardedDataParallel (bf16 mixed precision on
  CUDA) with `cfg.distributed == "fsdp"`; the model itself when there is one process.
- Gradient accumulation without needless all-reduces (`no_sync_unless_last`), the loss averaged over ranks,
  gradient clipping that is correct for sharded parameters.
A crash on one rank ends the job: torchrun tears down the group when a worker exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return Context(rank=rank, world_size=world, local_rank=local, device=device)


def wrap(model: torch.nn.Module, ctx: Context, cfg) -> torch.nn.Module:
    if ctx.world_size == 1:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision

        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ctx.device.startswith("cuda") else None
        return FSDP(model, mixed_precision=mp, use_orig_params=True,
                    device_id=torch.device(ctx.device) if ctx.device.startswith("cuda") else None)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.startswith("cuda") else None)


def no_sync_unless_last(model, last: bool):
    """Skip the gradient all-reduce on every micro-batch but the last one."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(value: float, ctx: Context) -> float:
    if ctx.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t) / ctx.world_size


def clip_grad_norm(model, max_norm: float):
    if hasattr(model, "clip_grad_norm_"):  # FSDP: norm over all shards
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(ctx: Context) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
