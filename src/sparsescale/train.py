"""`train(cfg)`: one readable training loop for every run of the sweep (no Trainer class hierarchy).

Features
- `train(cfg)` reads top to bottom as named steps: `plan` (data, budget, intervals, checks), `build_model`,
  `resume` (run directory, newest checkpoint that verifies), `distribute` (DDP/FSDP wrapper, optimizer),
  `train_step` (one optimizer step), `validation_loss` at intervals, `save_checkpoint`, then `evaluate` (the
  end-of-run evaluation row), `final_record` (final.json) and `save` (model, then final.json).
- Modes: scratch (ReLU^2 GLU Llama, Q-Sparse from step 0), continue (load a dense checkpoint, ours or any HF
  Llama-style path, convert it, keep training; a SiLU model keeps SiLU), finetune (start from a checkpoint with
  a small learning rate on another dataset).
- AdamW (0.9, 0.95), weight decay on matrices only, linear warm-up + cosine decay, gradient clipping,
  gradient accumulation; bf16 autocast (`validation.autocast`, and optional torch.compile) on CUDA, fp32 on CPU.
- Token budget fixed or proportional to N; validation loss (nats/token) on a fixed set at intervals and at
  the end, each time with the super-weight spike statistic (`spike_in_ratio`, `spike_out_ratio`, `spike_layer`
  of the first validation window) in metrics.jsonl (the last step's measurement is the final one: it is not repeated); measured sparsity per
  projection; a progress bar with loss and tokens/s.
- Checkpoints written atomically with a sha256 sidecar every M steps; a rerun resumes from the latest
  checkpoint that verifies (a corrupted one is skipped with a warning). The batch stream is a pure function of
  (seed, step), so a resumed run equals an uninterrupted one bit for bit on CPU. Checkpoints carry the run's
  time so far, so the times of a resumed run cover all of it.
- Cost in final.json: `wall_time_s` (the training loop), `wall_seconds` (the whole process, start-up included)
  and `core_seconds` (process CPU time, all threads, summed over ranks); per phase (start-up, setup, steps,
  validation, checkpoints, final evaluation, save) `phase_seconds` (wall) and `phase_core_seconds` (CPU, rank 0).
- A NaN/inf loss stops the run with a clear message (exit 3) and leaves no final.json.
- Output in results/runs/{run_id}/: config.json, metrics.jsonl, final.json (written last: it marks the run
  complete), model/ (HF checkpoint, safetensors).
- Several processes with the same code path: `sparsescale train --nproc-per-node N [--nnodes M]` relaunches
  through torchrun (srun + torchrun across SLURM nodes); DDP or FSDP (`distributed.py`); the global batch stays
  batch_size x seq_len tokens whatever the number of processes; checkpoints hold full state dicts, so a run
  resumes on any number of processes; only rank 0 writes files.
- CLI: every TrainConfig field is a flag whose --help is the field's docstring (`config.field_docs`);
  `--eval-out eval.json` then re-measures the saved model, loaded from disk (`evaluate.evaluate_checkpoint`,
  what `sparsescale eval` writes), in the same process: the workflow's one process per run.
- The loss and the validation loss live in `validation.py` (shared with `sparsescale eval`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from sparsescale import data as D
from sparsescale import distributed as dist
from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.config import TrainConfig, count_params, field_docs, get_size
from sparsescale.errors import TrainingDiverged, UserError
from sparsescale.evaluate import evaluate_checkpoint
from sparsescale.io import atomic_path, read_json, sha256_file, versions, write_json
from sparsescale.io import process_age as io_process_age
from sparsescale.superweight.detect import spike_stats
from sparsescale.validation import autocast, evaluate_loss, lm_loss

GROUPS = ("qkv", "o", "gate_up", "down")  # projection groups of measured sparsity (qsparse.PROJECTION_GROUPS)


# ----------------------------------------------------------------------------------------------------------
# pieces of the loop

def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        warnings.warn("device=cuda asked for but CUDA is not available: falling back to CPU")
        return "cpu"
    return name


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    warm = max(1, int(round(cfg.warmup_frac * total)))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def build_model(cfg: TrainConfig, vocab_size: int, token_ids: dict) -> torch.nn.Module:
    if cfg.mode == "scratch":
        model = M.build(cfg.size, vocab_size, max_seq_len=cfg.seq_len, hidden_act=cfg.hidden_act,
                        seed=cfg.seed, **token_ids)
    else:
        model = M.load(cfg.init_from, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise UserError(f"tokenizer vocab ({vocab_size}) does not fit the model loaded from {cfg.init_from} "
                            f"(vocab_size={model.config.vocab_size}): prepare the data with that model's tokenizer")
    Q.convert(model, cfg.sparsity, weight_bits=cfg.precision, act_bits=8 if cfg.precision == "1.58" else None,
              block=cfg.block, rescale=cfg.rescale)
    return model


# ----------------------------------------------------------------------------------------------------------
# checkpoints: step_XXXXXXXX.pt + step_XXXXXXXX.pt.sha256, newest that verifies wins

def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, model_sd: dict, opt_sd: dict, keep: int, times: dict | None = None) -> Path:
    """Full (unsharded) state dicts, as one process writes them: any number of processes can resume.
    `times`: the run's cost so far (Clock.so_far), carried over by a resume."""
    d = _ckpt_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"step": step, "model": model_sd, "optimizer": opt_sd, "times": times or {}}, tmp)
    with atomic_path(path.with_suffix(".pt.sha256")) as tmp:
        tmp.write_text(sha256_file(path) + "\n")
    for old in sorted(d.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return path


def latest_checkpoint(out: Path) -> Path | None:
    """Newest checkpoint whose sha256 matches its sidecar; corrupted ones are reported and skipped."""
    for path in sorted(_ckpt_dir(out).glob("step_*.pt"), reverse=True):
        side = path.with_suffix(".pt.sha256")
        if side.is_file() and side.read_text().strip() == sha256_file(path):
            return path
        msg = f"checkpoint {path} fails its checksum (truncated or corrupted): skipping it, using the previous one"
        warnings.warn(msg)
        print(f"WARNING: {msg}", file=sys.stderr)
    return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------------------
# time and CPU of a run (a resumed run adds what its checkpoint carries)

def process_age() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module was imported).
    A run forked by the warm-start server (warm.py) counts from its client's start instead."""
    if started := os.environ.get("SPARSESCALE_STARTED_AT"):
        return max(0.0, time.time() - float(started))
    age = io_process_age()
    return time.perf_counter() - _IMPORTED if age is None else age


_IMPORTED = time.perf_counter()


class Clock:
    """Phase timers of one run in this process, plus the totals a resumed run's checkpoint carries over.

    `startup` = (wall, CPU seconds) this process spent before `train()` that belong to the run: the CLI passes
    the interpreter start and imports; a caller that runs several things in one process passes nothing."""

    PHASES = ("startup", "setup", "steps", "validation", "checkpoints", "final_eval", "save")

    def __init__(self, startup: tuple[float, float] = (0.0, 0.0)):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.startup = startup
        self.before = {"wall_time_s": 0.0, "wall_seconds": 0.0, "core_seconds": 0.0}
        self.phase = dict.fromkeys(self.PHASES, 0.0)  # wall seconds
        self.phase_core = dict.fromkeys(self.PHASES, 0.0)  # CPU seconds of this process (all threads)
        self.phase["startup"], self.phase_core["startup"] = startup
        self.loop = [None, None]  # perf_counter at the start and end of the training loop

    @contextlib.contextmanager
    def timed(self, name: str):
        t, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phase[name] += time.perf_counter() - t
            self.phase_core[name] += time.process_time() - cpu

    def loop_wall(self) -> float:
        """Wall time of the training loop (steps, validation, checkpoints), earlier sessions included."""
        t0, t1 = self.loop
        return self.before["wall_time_s"] + ((t1 or time.perf_counter()) - t0 if t0 is not None else 0.0)

    def so_far(self, ctx) -> dict:
        """The run's cost up to now: loop wall, process wall, CPU seconds of every rank (every rank calls it)."""
        core = dist.sum_over_ranks([self.startup[1] + time.process_time() - self.cpu0], ctx)[0]
        return {"wall_time_s": self.loop_wall(),
                "wall_seconds": self.before["wall_seconds"] + self.startup[0] + time.perf_counter() - self.t0,
                "core_seconds": self.before["core_seconds"] + core}


# ----------------------------------------------------------------------------------------------------------
# the steps of a run

@dataclasses.dataclass
class Plan:
    """What one run does, fixed before its first step."""

    ctx: dist.Context
    device: str
    out: Path
    meta: dict
    vocab_size: int
    train_tokens: object  # numpy token arrays (data.load_tokens)
    val_tokens: object
    counts: dict  # count_params: n_params, n_params_total, n_active
    steps: int
    tokens_per_step: int
    eval_every: int
    ckpt_every: int
    micro: int  # sequences per forward/backward per process

    @property
    def token_ids(self) -> dict:
        return {"bos_token_id": self.meta.get("bos_id"), "eos_token_id": self.meta.get("eos_id")}


def plan(cfg: TrainConfig) -> Plan:
    """Processes, device, data, the step count and intervals; every input check that needs the data."""
    ctx = dist.init(cfg.device)  # rank / world size from torchrun's environment; single process otherwise
    device = pick_device(cfg.device) if ctx.world_size == 1 else ctx.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = D.load_meta(cfg.data)
    vocab_size = int(meta["vocab_size"])
    train_tokens, val_tokens = D.load_tokens(cfg.data, "train"), D.load_tokens(cfg.data, "val")
    counts = count_params(get_size(cfg.size), vocab_size, cfg.sparsity)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    budget = cfg.tokens if cfg.tokens is not None else int(cfg.tokens_per_param * counts["n_params"])
    if budget < tokens_per_step:
        raise UserError(f"token budget {budget} is smaller than one batch ({cfg.batch_size} x {cfg.seq_len} = "
                        f"{tokens_per_step} tokens): raise tokens / tokens_per_param or lower batch_size")
    if len(train_tokens) <= cfg.seq_len + 1:
        raise UserError(f"training split of {cfg.data} has {len(train_tokens)} tokens, fewer than seq_len+1={cfg.seq_len + 1}")
    steps = budget // tokens_per_step
    micro = cfg.micro_batch_size or cfg.batch_size  # per process; accumulation keeps the global batch at batch_size
    dist.check_batch(cfg.batch_size, ctx.world_size)
    if (cfg.batch_size // ctx.world_size) % micro and micro != cfg.batch_size:
        raise UserError(f"batch_size={cfg.batch_size} / {ctx.world_size} processes is not a multiple of micro_batch_size={micro}")
    return Plan(ctx=ctx, device=device, out=Path(cfg.out_dir), meta=meta, vocab_size=vocab_size,
                train_tokens=train_tokens, val_tokens=val_tokens, counts=counts, steps=steps,
                tokens_per_step=tokens_per_step, eval_every=cfg.eval_every or max(1, steps // 10),
                ckpt_every=cfg.checkpoint_every or max(1, steps // 10), micro=micro)


def resume(cfg: TrainConfig, run: Plan, model: torch.nn.Module) -> tuple[int, dict | None]:
    """The run directory (config.json) and the newest checkpoint that verifies, loaded into `model`:
    (the step to start from, the checkpoint's state or None)."""
    if run.ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "config.json", {"run_id": cfg.run_id, **dataclasses.asdict(cfg), "versions": versions()})
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        return 0, None
    # every rank reads the full checkpoint; mmap shares one copy in the page cache between a node's ranks
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    model.load_state_dict(state["model"])
    if run.ctx.is_main:
        print(f"resuming {cfg.run_id} from {ckpt.name} (step {state['step']}/{run.steps})", file=sys.stderr)
        _truncate_metrics(run.out / "metrics.jsonl", state["step"])
    return state["step"], state


def distribute(model: torch.nn.Module, state: dict | None, run: Plan, cfg: TrainConfig):
    """(the module that takes the steps, the optimizer): DDP / FSDP / the model itself, optimizer state resumed."""
    step_model = dist.wrap(model, run.ctx, cfg)  # DDP wrapper, `model` sharded in place (FSDP) or `model` itself
    opt = make_optimizer(model, cfg)  # after wrapping: FSDP replaces the parameters by their shards
    if state is not None:
        dist.load_optimizer_state(model, opt, state["optimizer"])
    if cfg.compile and run.device.startswith("cuda"):
        step_model = torch.compile(step_model)
    return step_model, opt


def train_step(step_model, opt: torch.optim.Optimizer, step: int, run: Plan, cfg: TrainConfig) -> tuple[float, float]:
    """One optimizer step on the global batch of `step` (micro-batches accumulated): (train loss, lr)."""
    lr = lr_at(step, run.steps, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    ctx, micro = run.ctx, run.micro
    x_all, y_all = D.get_batch(run.train_tokens, step, cfg.batch_size, cfg.seq_len, cfg.seed,
                               rank=ctx.rank, world_size=ctx.world_size)
    n_micro = max(1, x_all.shape[0] // micro)
    loss_sum = 0.0
    for i in range(n_micro):
        x = x_all[i * micro:(i + 1) * micro].to(run.device, non_blocking=True)
        y = y_all[i * micro:(i + 1) * micro].to(run.device, non_blocking=True)
        with dist.no_sync_unless_last(step_model, i == n_micro - 1), autocast(run.device):
            loss = lm_loss(step_model, x, y)
            if cfg.debug_nan_at_step is not None and step == cfg.debug_nan_at_step:
                loss = loss * float("nan")
        (loss / n_micro).backward()
        loss_sum += float(loss.detach()) / n_micro
    loss_val = dist.mean_over_ranks(loss_sum, ctx)  # the same on every rank: all stop together on NaN
    if not math.isfinite(loss_val):
        raise TrainingDiverged(f"run {cfg.run_id}: training loss is {loss_val} at step {step} (lr {lr:.3g}); "
                               "lower the learning rate or raise warm-up; no final.json was written")
    if cfg.grad_clip > 0:
        dist.clip_grad_norm(step_model, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_val, lr


def validation_loss(model, run: Plan, cfg: TrainConfig) -> float:
    return evaluate_loss(model, run.val_tokens, cfg.eval_tokens, cfg.seq_len, run.micro, run.device, run.ctx)


def checkpoint(model, opt, done: int, run: Plan, cfg: TrainConfig, clock: Clock) -> None:
    model_sd, opt_sd = dist.full_state_dicts(model, opt, run.ctx)  # every rank: FSDP gathers shards
    times = clock.so_far(run.ctx)  # every rank: the CPU seconds are summed over ranks
    if run.ctx.is_main:
        save_checkpoint(run.out, done, model_sd, opt_sd, cfg.keep_checkpoints, times)


class MetricsLog:
    """metrics.jsonl (rank 0) and the progress bar: one record per log_every steps, with val_loss when measured."""

    def __init__(self, cfg: TrainConfig, run: Plan, start: int):
        self.cfg, self.run, self.main = cfg, run, run.ctx.is_main
        self.bar = tqdm(total=run.steps, initial=start, desc=cfg.run_id, disable=not self.main, mininterval=2.0,
                        file=sys.stderr, dynamic_ncols=True)
        self.file = open(run.out / "metrics.jsonl", "a") if self.main else None
        self.t0, self.tok_seen = time.perf_counter(), 0

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file:
            self.file.close()

    def step(self, done: int, loss: float, lr: float, val_loss: float | None, extra: dict | None = None) -> None:
        self.tok_seen += self.run.tokens_per_step
        if self.main and (val_loss is not None or done % self.cfg.log_every == 0 or done == self.run.steps):
            rec = {"step": done, "tokens": done * self.run.tokens_per_step, "train_loss": loss, "lr": lr}
            if val_loss is not None:
                rec["val_loss"] = val_loss
            rec.update(extra or {})
            elapsed = time.perf_counter() - self.t0
            rec["tokens_per_s"] = self.tok_seen / elapsed if elapsed > 0 else None
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}", refresh=False)
        self.bar.update(1)


def spike_row(model, run: Plan, cfg: TrainConfig) -> dict:
    """The super-weight detector's statistic at this point of training (one forward of the first validation
    window, no gradients): do super activations emerge, and does Top-K keep them? -> spike_* of metrics.jsonl."""
    ids = torch.as_tensor(run.val_tokens[: cfg.seq_len].astype("int64"))[None].to(run.device)
    with autocast(run.device):
        return spike_stats(model, ids)


def evaluate(model, run: Plan, cfg: TrainConfig, val_loss: float | None = None) -> dict:
    """The end-of-run evaluation row: validation loss on the fixed set (`val_loss` when the last step just
    measured it) and the measured sparsity per projection group on the first validation batch. Further
    statistics of the trained model belong here. Every rank calls it (FSDP's forwards are collective)."""
    if val_loss is None:
        val_loss = validation_loss(model, run, cfg)
    n = min(run.micro, 4)
    x_val, _ = next(D.val_batches(run.val_tokens, cfg.seq_len * n, cfg.seq_len, n))
    measured = Q.measured_sparsity(model, x_val.to(run.device))
    return {"val_loss": val_loss, "sparsity_measured": measured["overall"],
            **{f"sparsity_measured_{g}": measured.get(g) for g in GROUPS}}


def final_record(cfg: TrainConfig, run: Plan, row: dict, start: int, clock: Clock) -> dict:
    """The content of final.json: what was trained, the evaluation row, the cost, config and versions."""
    counts = run.counts
    times = clock.so_far(run.ctx)
    return {
        "run_id": cfg.run_id, "size": cfg.size, "mode": cfg.mode,
        "n_params": counts["n_params"], "n_params_total": counts["n_params_total"], "n_active": counts["n_active"],
        "sparsity": cfg.sparsity, "sparsity_measured": row["sparsity_measured"],
        **{f"sparsity_measured_{g}": row[f"sparsity_measured_{g}"] for g in GROUPS},
        "precision": cfg.precision, "seed": cfg.seed, "tokens": run.steps * run.tokens_per_step, "steps": run.steps,
        "val_loss": row["val_loss"], "val_tokens": cfg.eval_tokens, "lr": cfg.lr, "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len, "block": cfg.block, "rescale": cfg.rescale, "vocab_size": run.vocab_size,
        "wall_time_s": times["wall_time_s"], "wall_seconds": times["wall_seconds"],
        "core_seconds": times["core_seconds"], "phase_seconds": dict(clock.phase),
        "phase_core_seconds": dict(clock.phase_core),
        "device": run.device, "world_size": run.ctx.world_size, "resumed_from_step": start,
        **{k: v for k, v in row.items() if k != "val_loss" and not k.startswith("sparsity_measured")},
        "data": str(cfg.data), "data_sha256": run.meta.get("sha256", {}), "config": dataclasses.asdict(cfg),
        "versions": versions(),
    }


def save(model, final: dict, run: Plan, cfg: TrainConfig) -> None:
    """The model (HF safetensors), then final.json, which marks the run complete; checkpoints removed.
    Rank 0 saves alone: it adds its time (wall and CPU) to final's wall_seconds, core_seconds and phase save."""
    if not math.isfinite(final["val_loss"]):
        raise TrainingDiverged(f"run {cfg.run_id}: validation loss is {final['val_loss']}; no final.json was written")
    if dist.is_sharded(model):  # FSDP: gather the shards into a plain model on rank 0, which saves it
        weights, _ = dist.full_state_dicts(model, None, run.ctx)
        model = build_model(cfg, run.vocab_size, run.token_ids) if run.ctx.is_main else None
        if model is not None:
            model.load_state_dict(weights)
    if run.ctx.is_main:
        t, cpu = time.perf_counter(), time.process_time()
        tok = D.load_tokenizer(cfg.data) if (Path(cfg.data) / "tokenizer.json").exists() else None
        M.save(model, run.out / "model", tokenizer=tok, training=final)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        final["phase_seconds"]["save"] += wall
        final["phase_core_seconds"]["save"] += cpu
        final["wall_seconds"] += wall
        final["core_seconds"] += cpu
        write_json(run.out / "final.json", final)  # last: its presence marks the run complete
        for p in _ckpt_dir(run.out).glob("step_*"):
            p.unlink(missing_ok=True)
        print(f"{cfg.run_id}: val_loss {final['val_loss']:.4f} nats/token, measured sparsity "
              f"{final['sparsity_measured']:.3f}, {run.steps} steps, {final['wall_time_s']:.0f}s", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, startup: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Run (or resume) one training run; returns the content of final.json. `startup`: see `Clock`."""
    cfg.validate()
    clock = Clock(startup)
    with clock.timed("setup"):
        run = plan(cfg)
        model = build_model(cfg, run.vocab_size, run.token_ids).to(run.device)
        if model.config.vocab_size != run.vocab_size and cfg.mode == "scratch":
            raise UserError(f"tokenizer vocab {run.vocab_size} does not fit model vocab {model.config.vocab_size}")
        model.train()
        start, state = resume(cfg, run, model)
        clock.before.update((state or {}).get("times", {}))
        step_model, opt = distribute(model, state, run, cfg)
        del state
    val_loss = None
    clock.loop[0] = time.perf_counter()
    with MetricsLog(cfg, run, start) as log:
        for step in range(start, run.steps):
            with clock.timed("steps"):
                loss, lr = train_step(step_model, opt, step, run, cfg)
            done = step + 1
            val_loss, extra = None, None
            if done % run.eval_every == 0 or done == run.steps:
                with clock.timed("validation"):
                    val_loss = validation_loss(model, run, cfg)
                    extra = spike_row(model, run, cfg)
            with clock.timed("steps"):  # the step's log line belongs to the step: wall = the sum of the phases
                log.step(done, loss, lr, val_loss, extra)
            if done % run.ckpt_every == 0 and done < run.steps:
                with clock.timed("checkpoints"):
                    checkpoint(model, opt, done, run, cfg, clock)
    clock.loop[1] = time.perf_counter()
    with clock.timed("final_eval"):
        row = evaluate(model, run, cfg, val_loss)  # the last step measured the validation loss already
    final = final_record(cfg, run, row, start, clock)
    save(model, final, run, cfg)
    dist.finish(run.ctx)
    return final


# ----------------------------------------------------------------------------------------------------------
# CLI: every TrainConfig field is a flag; --config FILE (YAML/JSON) gives defaults that flags override

def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def config_parser(prog: str) -> argparse.ArgumentParser:
    """One flag per TrainConfig field, its --help the field's docstring."""
    p = argparse.ArgumentParser(prog=prog, description="Train one model and write results/runs/{run_id}/.")
    p.add_argument("--config", help="YAML or JSON file with TrainConfig fields (flags override it)")
    docs = field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        typ = f.type if isinstance(f.type, str) else f.type.__name__
        conv = _parse_bool if "bool" in typ else int if typ.startswith("int") else float if typ.startswith("float") else str
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=None,
                       help=docs[f.name].replace("%", "%%"))  # argparse formats help with %
    return p


def config_file_fields(path: str | Path) -> dict:
    """The TrainConfig fields of a YAML or JSON config file, e.g. a run's own config.json (its `run_id` and
    `versions` are dropped: they are written by a run, not read); unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    base = (yaml.safe_load(path.read_text()) or {}) if path.suffix in (".yaml", ".yml") else read_json(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(base) - known - {"run_id", "versions"})
    if unknown:
        raise UserError(f"{path}: unknown keys {unknown}; valid keys: {sorted(known)}")
    return {k: v for k, v in base.items() if k in known}


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    base = config_file_fields(a.config) if a.config else {}
    over = {k: v for k, v in vars(a).items() if k != "config" and v is not None}
    return TrainConfig(**{**base, **over})


def cli_train(argv: list[str]) -> int:
    # interpreter start and imports: part of this run's cost (with a warm start: the client's, see warm.py)
    startup = (process_age(), time.process_time() + float(os.environ.get("SPARSESCALE_STARTUP_CPU", "0")))
    p = config_parser("sparsescale train")
    launch = p.add_argument_group("processes (torchrun; srun + torchrun on several SLURM nodes)")
    launch.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes per node, one per GPU (default 1); > 1 relaunches through torchrun")
    launch.add_argument("--nnodes", type=int, default=1,
                        help="nodes (default 1); > 1 needs a SLURM allocation of that many nodes")
    p.add_argument("--eval-out", metavar="EVAL_JSON",
                   help="then re-measure the saved model, loaded from disk, as `sparsescale eval` does, and write "
                        "this eval.json (in this process: no second start-up)")
    p.add_argument("--warm-start", action="store_true",
                   help="fork this run from a server that has imported torch already (warm.py: ~7 s less start-up a "
                        "run); without a server it runs in this process")
    a = p.parse_args(argv)
    nproc, nnodes = vars(a).pop("nproc_per_node"), vars(a).pop("nnodes")
    vars(a).pop("warm_start")  # acted on by the CLI before this function (cli.py)
    eval_out = vars(a).pop("eval_out")
    cfg = config_from_args(a)
    if nproc * nnodes > 1 and not dist.under_torchrun():
        cfg.validate()  # bad input fails once, here, rather than once per process
        dist.check_batch(cfg.batch_size, nproc * nnodes)
        dist.relaunch(nproc, nnodes, argv)  # replaces this process: the workers run this function again
    failed = Path(cfg.out_dir) / "failed.json"
    failed.unlink(missing_ok=True)
    try:
        (dist.record(train) if dist.under_torchrun() else train)(cfg, startup)
    except TrainingDiverged as err:
        # a marker for the workflow: the sweep goes on without this run and the fit lists it as missing
        if int(os.environ.get("RANK", "0")) == 0:  # every rank diverges together; one writes
            write_json(failed, {"run_id": cfg.run_id, "status": "diverged", "error": str(err), "size": cfg.size,
                                "mode": cfg.mode, "sparsity": cfg.sparsity, "precision": cfg.precision, "seed": cfg.seed})
        raise
    if eval_out and int(os.environ.get("RANK", "0")) == 0:
        reevaluate(cfg, eval_out)
    return 0


def reevaluate(cfg: TrainConfig, eval_out: str) -> dict:
    """`sparsescale eval` of the run's saved model (loaded from disk) on the training's validation set."""
    model_dir = str(Path(cfg.out_dir) / "model")
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    res = evaluate_checkpoint(model_dir, cfg.data, cfg.eval_tokens, cfg.seq_len, device=device)
    write_json(eval_out, res)
    print(f"{model_dir}: val_loss {res['val_loss']:.4f} nats/token, measured sparsity "
          f"{res['sparsity_measured']:.3f} (eval.json)", file=sys.stderr)
    return res
