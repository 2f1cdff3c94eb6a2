"""Learning rates chosen by the pipeline: a small grid of runs per size x precision, the winner in a file.

Small-scale scaling laws go wrong when the learning rate is not tuned per size (Porian et al. 2024); a rate
probed only on dense runs can favour one sparsity over another. The `tune` stage of the workflow trains every
size x precision at a few rates (factors of the base table `train.lr`), at S = 0 and at the largest S of the
sweep, on the sweep's own token budget; this file reads those runs and picks one rate per size x precision.

Features
- `select(runs)`: per (size, precision), the rate with the lowest validation loss averaged over the tuned
  sparsities (a diverged run counts as +inf); the winner at each sparsity beside it, whether they agree, and
  a warning when the winner sits at an edge of the grid (widen `tune.factors`).
- `read_tune_runs(dirs)`: final.json (or failed.json) of every tune run, with its rate.
- CLI: `sparsescale tune select RUN_DIRS --out results/tune` writes lr.json, lr.csv and lr.md (the table
  rendered into the report); `sparsescale tune lr results/tune/lr.json --size d2 --precision fp` prints the
  chosen rate (what the train rule passes as --lr).
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


def select(runs: pd.DataFrame) -> dict:
    """The chosen rate per size x precision, the per-sparsity winners, and warnings (see the module docstring)."""
    chosen, table, warnings = {}, [], []
    for (size, prec), grp in runs.groupby(["size", "precision"], sort=True):
        pivot = grp.pivot_table(index="lr", columns="sparsity", values="val_loss", aggfunc="mean").sort_index()
        mean = pivot.mean(axis=1)  # inf if any sparsity diverged at that rate
        if not math.isfinite(float(mean.min())):
            raise UserError(f"every tune rate diverged for {size} {prec}: lower train.lr or tune.factors")
        best = float(mean.idxmin())
        per_s = {float(s): float(pivot[s].idxmin()) for s in pivot.columns}
        lrs = [float(v) for v in pivot.index]
        at_edge = len(lrs) > 1 and best in (lrs[0], lrs[-1])
        if at_edge:
            warnings.append(f"{size} {prec}: the best rate {best:g} is at the edge of the tuned grid {lrs}: widen tune.factors")
        if len(set(per_s.values())) > 1:
            warnings.append(f"{size} {prec}: the best rate differs between sparsities ({per_s}); the mean over them is used")
        chosen.setdefault(size, {})[prec] = best
        for lr in lrs:
            row = {"size": size, "precision": prec, "lr": lr, "chosen": lr == best}
            row.update({f"loss_s{s:.2f}": float(pivot.loc[lr, s]) for s in pivot.columns})
            row["mean_loss"] = float(mean.loc[lr])
            table.append(row)
    return {"chosen": chosen, "table": table, "warnings": warnings}


def _markdown(table: list[dict]) -> str:
    cols = [c for c in table[0] if c.startswith("loss_s")]
    head = ["size", "precision", "lr"] + [f"S = {c[6:]}" for c in cols] + ["mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        mark = "**" if r["chosen"] else ""
        cells = [r["size"], r["precision"], f"{mark}{r['lr']:.3g}{mark}"] + [
            f"{r[c]:.4f}" if math.isfinite(r[c]) else "diverged" for c in cols] + [
            f"{mark}{r['mean_loss']:.4f}{mark}" if math.isfinite(r["mean_loss"]) else "diverged"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("Validation loss (nats/token) of the tune runs; the chosen rate per size and precision in bold.\n\n"
            + "\n".join(lines) + "\n")


def chosen_lr(path: str, size: str, precision: str) -> float:
    try:
        chosen = read_json(path)["chosen"]
    except FileNotFoundError:
        raise UserError(f"tune result not found: {path}; run the tune stage (`snakemake {path}`)") from None
    try:
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
    g = sub.add_parser("lr", help="print the chosen rate of one size and precision")
    g.add_argument("table", help="lr.json written by `sparsescale tune select`")
    g.add_argument("--size", required=True)
    g.add_argument("--precision", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "lr":
        print(f"{chosen_lr(a.table, a.size, a.precision):.6g}")
        return 0
    out = select(read_tune_runs(a.runs))
    out_dir = Path(a.out)
    df = pd.DataFrame(out["table"])
    atomic_write_text(out_dir / "lr.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "lr.md", _markdown(out["table"]))
    write_json(out_dir / "lr.json", out | {"runs": sorted(Path(r).name for r in a.runs), "versions": versions()})
    for w in out["warnings"]:
        print(f"warning: {w}")
    for size, per in out["chosen"].items():
        print(f"{size}: " + ", ".join(f"{p} lr {v:g}" for p, v in per.items()))
    return 0
