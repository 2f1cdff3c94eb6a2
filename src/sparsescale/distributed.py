"""Several processes for one `train(cfg)`: launching them, the process group, DDP / FSDP, full checkpoints.

Features
- Launcher: `sparsescale train --nproc-per-node N [--nnodes M] ...` re-executes itself through torchrun
  (`python -m torch.distributed.run`) when N*M > 1 and it is not already a torchrun worker; one process
  otherwise. On M > 1 nodes it must run inside a SLURM allocation and starts one torchrun agent per node
  with `srun`, the c10d rendezvous on the allocation's first node:
      SLURM_JOB_ID      rendezvous id (and the proof that we are inside an allocation)
      SLURM_NNODES      nodes of the allocation (must be >= M)
      SLURM_JOB_NODELIST expanded by `scontrol show hostnames`; its first host holds the rendezvous
      MASTER_PORT       rendezvous port on that host (default 29500)
  `srun --kill-on-bad-exit=1` ends every node's agent when one fails.
- `init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on CUDA, gloo on CPU.
- `wrap(model, ctx, cfg)`: DistributedDataParallel by default; with `cfg.distributed == "fsdp"` FSDP2
  (`fully_shard`: every decoder layer, then the root; parameters, gradients and optimizer state sharded;
  bf16 compute with fp32 gradient reduction on CUDA, fp32 on CPU). The model itself for one process.
- Gradient accumulation without needless all-reduces (`no_sync_unless_last`, DDP), the loss averaged over
  ranks (every rank then takes the same NaN decision, so none is left waiting in a collective), gradient
  clipping over the global norm of sharded gradients.
- Checkpoints in one format whatever the world size or wrapper: the single-process `state_dict()`s (model;
  optimizer state keyed by parameter index). FSDP gathers them to rank 0 on CPU (`full_state_dicts`) and
  re-shards them on load (`load_optimizer_state`), so a run can resume with a different number of processes
  or switch between DDP and FSDP.
A crash on one rank ends the job with that rank's error: torchrun stops the other workers when one exits
non-zero (and `record` puts the error message in torchrun's summary).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsescale.errors import UserError
from sparsescale.layout import decoder_layers

DEFAULT_PORT = 29500
LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes")


# ----------------------------------------------------------------------------------------------------------
# launching: one process, torchrun on this node, or srun + torchrun on every node of a SLURM allocation

def under_torchrun(env=None) -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the process-group variables)."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env


def slurm_hosts(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("gpu[01-03]") with `scontrol show hostnames`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise UserError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames`: {err}") from None
    return out.stdout.split()


def launch_command(nproc_per_node: int, nnodes: int, train_argv: list[str], env=None, hosts=slurm_hosts) -> list[str]:
    """The command that runs `sparsescale train TRAIN_ARGV` on nnodes x nproc_per_node processes."""
    env = os.environ if env is None else env
    if nproc_per_node < 1 or nnodes < 1:
        raise UserError(f"--nproc-per-node and --nnodes must be >= 1: got {nproc_per_node} and {nnodes}")
    worker = ["-m", "sparsescale", "train", *train_argv]
    if nnodes == 1:
        # --standalone: rendezvous on localhost with a free port, so jobs sharing a node do not collide
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(nproc_per_node), *worker]
    if "SLURM_JOB_ID" not in env:
        raise UserError(f"--nnodes {nnodes} needs a SLURM allocation of {nnodes} nodes (sbatch/salloc --nodes {nnodes}); "
                        "elsewhere start `torchrun --nnodes ... -m sparsescale train` on every node yourself")
    have = int(env.get("SLURM_NNODES", "1"))
    if have < nnodes:
        raise UserError(f"--nnodes {nnodes} but this SLURM allocation has SLURM_NNODES={have}: "
                        f"ask for {nnodes} nodes (resources: nodes={nnodes}) or lower --nnodes")
    head = hosts(env["SLURM_JOB_NODELIST"])[0]
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    # one task per node, each a torchrun agent that starts nproc_per_node workers; --overlap lets the step
    # start even when the job's shell already runs inside a step; a failing node ends the others
    return ["srun", f"--nodes={nnodes}", f"--ntasks={nnodes}", "--ntasks-per-node=1", "--overlap",
            "--kill-on-bad-exit=1",
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", env["SLURM_JOB_ID"], *worker]


def check_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise UserError(f"batch_size={batch_size} is not divisible by the {world_size} processes: make the global "
                        "batch a multiple of the number of processes (nproc-per-node x nnodes)")


def strip_launch_flags(argv: list[str]) -> list[str]:
    """argv without --nproc-per-node/--nnodes (both `--flag N` and `--flag=N`): the workers do not relaunch."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(a)
    return out


def relaunch(nproc_per_node: int, nnodes: int, argv: list[str]) -> None:
    """Replace this process by the torchrun (or srun) command; returns only if it cannot start."""
    cmd = launch_command(nproc_per_node, nnodes, strip_launch_flags(argv))
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        os.execvp(cmd[0], cmd)  # exec, not a child: SLURM's / the terminal's signals reach torchrun directly
    except OSError as err:
        raise UserError(f"cannot start {cmd[0]!r} ({err}): is this a SLURM node with srun on PATH?") from None


def record(fn):
    """torchrun's error recorder: the failing rank's exception appears in torchrun's final summary."""
    # deferred on purpose (as the FSDP and distributed-checkpoint imports below): these torch.distributed
    # submodules are slow to import and only multi-process runs need them
    from torch.distributed.elastic.multiprocessing.errors import record as _record

    return _record(fn)


# ----------------------------------------------------------------------------------------------------------
# the process group

@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Context:
    """Join the process group torchrun describes; a single-process Context when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and device != "cpu":
        if local >= torch.cuda.device_count():
            raise UserError(f"process {local} of this node has no GPU: {torch.cuda.device_count()} visible, so "
                            f"--nproc-per-node must be <= {torch.cuda.device_count()}")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        # the timeout is a last resort: torchrun already stops every worker when one of them fails
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return Context(rank=rank, world_size=world, local_rank=local, device=device)


def wrap(model: torch.nn.Module, ctx: Context, cfg) -> torch.nn.Module:
    """The module to train: DDP(model), or `model` itself sharded in place by FSDP, or `model` alone."""
    if ctx.world_size == 1:
        return model
    if cfg.distributed == "fsdp":
        # deferred, as in `record`: slow to import; only multi-process runs need it
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cuda = ctx.device.startswith("cuda")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
        for layer in decoder_layers(model):  # one all-gather per layer: only one layer is ever unsharded
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)  # embeddings, final norm, LM head
        return model
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.startswith("cuda") else None)


def is_sharded(model: torch.nn.Module) -> bool:
    # deferred, as in `record`: slow to import; only multi-process runs need it
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync_unless_last(model, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but the last one. FSDP reduce-scatters every
    micro-batch (keeping unsharded gradients across micro-batches would cost the memory FSDP saves)."""
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def sum_over_ranks(values: list[float], ctx: Context) -> list[float]:
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(value: float, ctx: Context) -> float:
    return value if ctx.world_size == 1 else sum_over_ranks([value], ctx)[0] / ctx.world_size


def clip_grad_norm(model, max_norm: float):
    """Clip by the global gradient norm; with FSDP the gradients are DTensor shards and the norm is reduced
    over all of them."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def finish(ctx: Context) -> None:
    if ctx.world_size > 1:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# checkpoints: full (unsharded) state dicts in the single-process format, loadable on any world size

def full_state_dicts(model: torch.nn.Module, opt: torch.optim.Optimizer | None, ctx: Context):
    """(model, optimizer) state dicts as one process would write them, on rank 0; (None, None) elsewhere.

    Every rank must call it: under FSDP the shards are gathered (to CPU, on rank 0 only).
    """
    if not is_sharded(model):
        if not ctx.is_main:
            return None, None
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    # deferred, as in `record`: slow to import; only multi-process runs need it
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # cpu_offload: only rank 0 gets tensors
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    if not ctx.is_main:
        return None, None
    return model_sd, (_by_index(optim_sd) if optim_sd is not None else None)


def _by_index(optim_sd: dict) -> dict:
    """FSDP's optimizer state keyed by parameter name -> keyed by position (what `Optimizer.state_dict()` writes)."""
    index: dict[str, int] = {}
    groups = []
    for g in optim_sd["param_groups"]:
        groups.append({**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]})
    return {"state": {index[name]: s for name, s in optim_sd["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, optim_sd: dict) -> None:
    """Load a full, position-keyed optimizer state dict; FSDP keeps only this rank's shard of it."""
    if not is_sharded(model):
        opt.load_state_dict(optim_sd)
        return
    # deferred, as in `record`: slow to import; only multi-process runs need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {p: n for n, p in model.named_parameters()}
    groups = [[names[p] for p in g["params"]] for g in opt.param_groups]
    if [len(g) for g in groups] != [len(g["params"]) for g in optim_sd["param_groups"]]:
        raise UserError("the checkpoint's optimizer has other parameter groups than this model's: it was written "
                        "by another model or optimizer layout; start from a fresh run directory")
    flat = [n for g in groups for n in g]
    by_name = {"state": {flat[i]: s for i, s in optim_sd["state"].items()},
               "param_groups": [{**g, "params": n} for g, n in zip(optim_sd["param_groups"], groups)]}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
