"""Probes: runs outside a sweep, each testing one explanation of the sweep's result.

A probe is a banked sweep cell trained again with exactly **one** setting changed, and its folder name says
which: `{cell}-lr{rate}` (the learning rate, e.g. `d5-s0.90-b1.58-seed0-lr0.0015`) or `{cell}-D{millions}m`
(the token budget, e.g. `d4-s0.90-bfp-seed0-D16m`; the warm-up and the cosine stretch with it). Only the
validation interval (`--eval-every`, a longer run may want fewer points) and the run's own folder may differ
besides. A probe is never part of a sweep or a fit; its result files are banked beside the sweep's
(`results/reference/cpu4m/probes/{id}/`: config.json, final.json, metrics.jsonl, eval.json when written),
and `tests/test_reference.py` checks every banked probe against its cell.

CLI:
  sparsescale probe results/reference/cpu4m/runs/d5-s0.90-b1.58-seed0 --lr 1.5e-3 \\
      --bank results/reference/cpu4m/probes
trains in `results/probes/{id}/` (`--work`; a killed probe resumes from its checkpoints there) and banks the
finished run. A probe that is banked already is not trained again.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sparsescale.config import TrainConfig
from sparsescale.errors import UserError
from sparsescale.io import read_json
from sparsescale.reference import bank
from sparsescale.train import config_file_fields, train

PROBE_ID = re.compile(r"^(?P<cell>.+)-(?:D(?P<d>\d+)m|lr(?P<lr>[0-9.]+(?:e-?\d+)?))$")
"""`{cell}-D{millions}m` or `{cell}-lr{rate}`: the sweep cell and the one setting changed."""

MAY_DIFFER = frozenset({"out", "eval_every"})
"""Fields a probe may set besides its one change: where it runs, and how often it validates."""


def probe_id(cell: str, lr: float | None = None, tokens: int | None = None) -> str:
    """The probe's folder name: the cell's run id and the one change."""
    if (lr is None) == (tokens is None):
        raise UserError("a probe changes exactly one setting: pass --lr RATE or --tokens TOKENS, not both or neither")
    if lr is not None:
        if not lr > 0:
            raise UserError(f"--lr {lr}: a learning rate is a positive number, e.g. --lr 1.5e-3")
        return f"{cell}-lr{lr:g}"
    if tokens <= 0 or tokens % 1_000_000:
        raise UserError(f"--tokens {tokens}: a budget probe is named by whole millions of tokens "
                        f"(-D<n>m); pass a multiple of 1000000, e.g. --tokens 16000000")
    return f"{cell}-D{tokens // 1_000_000}m"


def parse_probe_id(name: str) -> tuple[str, str, float | int]:
    """(cell run id, changed field, its value) of a probe folder name; UserError if it is not one."""
    m = PROBE_ID.match(name)
    if not m:
        raise UserError(f"{name!r} is not a probe id: name it CELL-D<millions>m or CELL-lr<rate>")
    return (m["cell"], "tokens", int(m["d"]) * 1_000_000) if m["d"] else (m["cell"], "lr", float(m["lr"]))


def cell_config(cell_dir: Path) -> dict:
    """The TrainConfig fields of a banked sweep run (its config.json without run_id and versions)."""
    if not (cell_dir / "config.json").is_file():
        raise UserError(f"{cell_dir}: no config.json; pass a banked sweep run (results/reference/cpu4m/runs/{{run_id}})")
    return config_file_fields(cell_dir / "config.json")


def probe_config(cell_dir: str | Path, work: str | Path, lr: float | None = None, tokens: int | None = None,
                 eval_every: int | None = None) -> TrainConfig:
    """The cell's config with the one change, run in `work/{probe id}`."""
    cell_dir = Path(cell_dir)
    base = cell_config(cell_dir)
    pid = probe_id(cell_dir.name, lr=lr, tokens=tokens)
    field, value = ("lr", lr) if lr is not None else ("tokens", tokens)
    if base.get(field) == value:
        raise UserError(f"{cell_dir.name} already has {field} = {value}: a probe changes it; pass another value")
    over = {field: value, "out": str(Path(work) / pid)}
    if eval_every is not None:
        over["eval_every"] = eval_every
    cfg = TrainConfig(**{**base, **over})
    if cfg.run_id != cell_dir.name:
        raise UserError(f"{cell_dir}: its config.json describes run {cfg.run_id}, not {cell_dir.name}; "
                        "pass the run's own folder")
    if not Path(cfg.data).is_dir():
        raise UserError(f"the cell's dataset {cfg.data} is missing: build it first with the sweep's config "
                        f"(snakemake {cfg.data} --cores 1 --configfile config/<sweep>.yaml)")
    return cfg


def run_probe(cell_dir: str | Path, bank_dir: str | Path, work: str | Path = "results/probes",
              lr: float | None = None, tokens: int | None = None, eval_every: int | None = None) -> Path:
    """Train the probe (resuming from its checkpoints) and bank its result files; return the banked folder."""
    cfg = probe_config(cell_dir, work, lr=lr, tokens=tokens, eval_every=eval_every)
    banked = Path(bank_dir) / Path(cfg.out_dir).name
    if (banked / "final.json").is_file():
        raise UserError(f"probe {banked.name} is banked already ({banked}); remove that folder to train it again")
    train(cfg)
    (out,), _ = bank([cfg.out_dir], bank_dir)
    return out


def cli_probe(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale probe",
                                 description="Train a banked sweep cell again with one setting changed (a probe) and "
                                             "bank its result files as {bank}/{cell}-lr{rate} or {cell}-D{n}m.")
    ap.add_argument("cell", help="a banked sweep run folder (results/reference/cpu4m/runs/{run_id}) with its config.json")
    change = ap.add_mutually_exclusive_group(required=True)
    change.add_argument("--lr", type=float, help="the learning rate to try instead of the cell's")
    change.add_argument("--tokens", type=int, help="the token budget to try instead of the cell's (whole millions)")
    ap.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (default: the cell's)")
    ap.add_argument("--bank", required=True, help="probe bank folder (results/reference/cpu4m/probes)")
    ap.add_argument("--work", default="results/probes", help="where the probe trains (checkpoints; ignored by git)")
    a = ap.parse_args(argv)
    out = run_probe(a.cell, a.bank, a.work, lr=a.lr, tokens=a.tokens, eval_every=a.eval_every)
    final = read_json(out / "final.json")
    print(f"probe {out.name}: val_loss {final['val_loss']:.4f}; banked in {out}")
    return 0
