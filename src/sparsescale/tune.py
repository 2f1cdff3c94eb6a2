"""Learning rates chosen by the pipeline: a small grid of runs per size x precision, the winner in a file.

Small-scale scaling laws go wrong when the learning rate is not tuned per size (Porian et al. 2024); a rate
probed only on dense runs can favour one sparsity over another. The `tune` stage of the workflow trains every
size x precision at a few rates (factors of the base table `train.lr`), at S = 0 and at the largest S of the
sweep, on the sweep's own token budget; this file reads those runs and picks one rate per size x precision.

Features
- `select(runs, rule)`: per (size, precision), rule "mean": the rate with the lowest validation loss
  averaged over the tuned sparsities (a diverged run counts as +inf), one rate for every S; rule
  "interpolate": the winner at each tuned sparsity, and between them the rate interpolated linearly in S on
  a log scale (clamped beyond the tuned range), so that a rate good for dense runs does not handicap sparse
  ones or the reverse (measured: ternary d3 at D = 250k, S = 0 preferred 9e-3, S = 0.9 preferred 2.25e-3).
  Beside it the winner at each sparsity, and a warning when a winner sits at an edge of the grid (widen
  `tune.factors`).
- `read_tune_runs(dirs)`: final.json (or failed.json) of every tune run, with its rate.
- CLI: `sparsescale tune select RUN_DIRS --out results/tune` writes lr.json, lr.csv and lr.md (the table
  rendered into the report); `sparsescale tune lr results/tune/lr.json --size d2 --precision fp --sparsity
  0.5` prints the chosen rate (what the train rule passes as --lr).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from sparsescale.errors import UserError
from sparsescale.io import atomic_write_text, read_json, versions, write_json


def read_tune_runs(dirs: list[str]) -> pd.DataFrame:
    """One row per tune run: size, precision, sparsity, lr, val_loss (inf when it diverged)."""
    rows = []
    for d in dirs:
        d = Path(d)
        final, failed = d / "final.json", d / "failed.json"
        if final.is_file():
            f = read_json(final)
            rows.append({"run": d.name, "size": f["size"], "precision": str(f["precision"]), "sparsity": float(f["sparsity"]),
                         "lr": float(f["lr"]), "val_loss": float(f["val_loss"])})
        elif failed.is_file():
            f = read_json(failed)
            cfg = read_json(d / "config.json") if (d / "config.json").is_file() else {}
            rows.append({"run": d.name, "size": f["size"], "precision": str(f["precision"]), "sparsity": float(f["sparsity"]),
                         "lr": float(cfg.get("lr", math.nan)), "val_loss": math.inf})
        else:
            raise UserError(f"tune run {d} has neither final.json nor failed.json: rerun the workflow to finish it")
    if not rows:
        raise UserError("no tune runs given: pass the run directories of the tune stage (results/tune/runs/*)")
    df = pd.DataFrame(rows)
    if df["lr"].isna().any():
        raise UserError(f"tune run {df.loc[df['lr'].isna(), 'run'].iloc[0]} does not record its lr (config.json): rerun it")
    return df


RULES = ("mean", "interpolate")


def interpolate_lr(per_s: dict[float, float], sparsity: float) -> float:
    """The rate at `sparsity` from the winners at the tuned sparsities: linear in S on a log scale, clamped."""
    pts = sorted((float(s), math.log(float(lr))) for s, lr in per_s.items())
    s = float(sparsity)
    if s <= pts[0][0]:
        return math.exp(pts[0][1])
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if s <= s1:
            return math.exp(l0 + (l1 - l0) * (s - s0) / (s1 - s0))
    return math.exp(pts[-1][1])


def select(runs: pd.DataFrame, rule: str = "mean") -> dict:
    """The chosen rate per size x precision, the per-sparsity winners, and warnings (see the module docstring)."""
    if rule not in RULES:
        raise UserError(f"tune rule must be one of {RULES}: got {rule!r}")
    chosen, per_sparsity, table, warnings = {}, {}, [], []
    for (size, prec), grp in runs.groupby(["size", "precision"], sort=True):
        pivot = grp.pivot_table(index="lr", columns="sparsity", values="val_loss", aggfunc="mean").sort_index()
        mean = pivot.mean(axis=1)  # inf if any sparsity diverged at that rate
        if not math.isfinite(float(mean.min())):
            raise UserError(f"every tune rate diverged for {size} {prec}: lower train.lr or tune.factors")
        best = float(mean.idxmin())
        per_s = {float(s): float(pivot[s].idxmin()) for s in pivot.columns}
        if rule == "interpolate" and not all(math.isfinite(float(pivot[s].min())) for s in pivot.columns):
            raise UserError(f"every tune rate diverged for {size} {prec} at some tuned sparsity: lower train.lr or "
                            "tune.factors")
        lrs = [float(v) for v in pivot.index]
        edge = (lambda lr: len(lrs) > 1 and lr in (lrs[0], lrs[-1]))
        if rule == "mean" and edge(best):
            warnings.append(f"{size} {prec}: the best rate {best:g} is at the edge of the tuned grid {lrs}: widen tune.factors")
        if rule == "interpolate":
            for sp, lr in per_s.items():
                if edge(lr):
                    warnings.append(f"{size} {prec}: the best rate at S = {sp:g}, {lr:g}, is at the edge of the tuned "
                                    f"grid {lrs}: widen tune.factors")
        if len(set(per_s.values())) > 1:
            how = "the mean over them is used" if rule == "mean" else "interpolated between them"
            warnings.append(f"{size} {prec}: the best rate differs between sparsities ({per_s}); {how}")
        chosen.setdefault(size, {})[prec] = best
        per_sparsity.setdefault(size, {})[prec] = {f"{sp:.2f}": lr for sp, lr in per_s.items()}
        for lr in lrs:
            row = {"size": size, "precision": prec, "lr": lr,
                   "chosen": lr == best if rule == "mean" else lr in per_s.values()}
            row.update({f"loss_s{s:.2f}": float(pivot.loc[lr, s]) for s in pivot.columns})
            row["mean_loss"] = float(mean.loc[lr])
            table.append(row)
    return {"rule": rule, "chosen": chosen, "per_sparsity": per_sparsity, "table": table, "warnings": warnings}


def _markdown(table: list[dict], rule: str = "mean") -> str:
    cols = [c for c in table[0] if c.startswith("loss_s")]
    head = ["size", "precision", "lr"] + [f"S = {c[6:]}" for c in cols] + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        mark = "**" if r["chosen"] else ""
        cells = [r["size"], r["precision"], f"{mark}{r['lr']:.3g}{mark}"] + [
            f"{r[c]:.4f}" if math.isfinite(r[c]) else "diverged" for c in cols] + [
            f"{mark}{r['mean_loss']:.4f}{mark}" if math.isfinite(r["mean_loss"]) else "diverged"]
        lines.append("| " + " | ".join(cells) + " |")
    what = ("the chosen rate per size and precision in bold" if rule == "mean" else
            "in bold the winner at some tuned sparsity; a run's rate is interpolated between the winners (linear "
            "in S, log scale)")
    return f"Validation loss (nats/token) of the tune runs; {what}.\n\n" + "\n".join(lines) + "\n"


def chosen_lr(path: str, size: str, precision: str, sparsity: float | None = None) -> float:
    """The rate of one run: the size x precision's rate (rule "mean"), or interpolated at `sparsity`."""
    try:
        table = read_json(path)
    except FileNotFoundError:
        raise UserError(f"tune result not found: {path}; run the tune stage (`snakemake {path}`)") from None
    chosen = table["chosen"]
    try:
        if table.get("rule", "mean") == "interpolate":
            if sparsity is None:
                raise UserError(f"{path} interpolates the rate in S: pass --sparsity")
            per = table["per_sparsity"][size][precision]
            return interpolate_lr({float(k): v for k, v in per.items()}, sparsity)
        return float(chosen[size][precision])
    except KeyError:
        raise UserError(f"{path} has no rate for size {size!r}, precision {precision!r}: tuned are "
                        f"{json.dumps({s: sorted(p) for s, p in chosen.items()})}; add them to the tune stage") from None


def cli_tune(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale tune", description="Learning rates chosen from a grid of tune runs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("select", help="pick one rate per size x precision from the tune runs")
    s.add_argument("runs", nargs="+", help="tune run directories (results/tune/runs/*)")
    s.add_argument("--out", required=True, help="output directory: lr.json, lr.csv, lr.md")
    s.add_argument("--rule", default="mean", choices=RULES, help="one rate per size x precision (mean over the "
                   "tuned sparsities), or the winners per sparsity interpolated in S (default: mean)")
    g = sub.add_parser("lr", help="print the chosen rate of one size and precision")
    g.add_argument("table", help="lr.json written by `sparsescale tune select`")
    g.add_argument("--size", required=True)
    g.add_argument("--precision", required=True)
    g.add_argument("--sparsity", type=float, help="the run's S (needed when lr.json interpolates in S)")
    a = ap.parse_args(argv)
    if a.cmd == "lr":
        print(f"{chosen_lr(a.table, a.size, a.precision, a.sparsity):.6g}")
        return 0
    out = select(read_tune_runs(a.runs), a.rule)
    out_dir = Path(a.out)
    df = pd.DataFrame(out["table"])
    atomic_write_text(out_dir / "lr.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "lr.md", _markdown(out["table"], a.rule))
    write_json(out_dir / "lr.json", out | {"runs": sorted(Path(r).name for r in a.runs), "versions": versions()})
    for w in out["warnings"]:
        print(f"warning: {w}")
    for size, per in (out["chosen"] if a.rule == "mean" else out["per_sparsity"]).items():
        print(f"{size}: " + ", ".join(f"{p} lr {v}" for p, v in per.items()))
    return 0
