"""`sparsescale aggregate`: collect every run's final.json (+ eval.json, metrics.jsonl) into two tables.

- results/tables/runs.csv: one row per run with every scalar field of final.json (nested fields as JSON text),
  plus `eval_val_loss` from eval.json when present, and a `status` column: "ok", or "diverged"/"missing" for
  runs that were asked for but did not finish (their val_loss is empty; the fit skips and lists them).
- `lmeval_*` columns from lmeval.json (`sparsescale lm-eval`, the optional lmeval rule) when present.
- A path that does not exist (e.g. an unmatched glob, `/nonexistent/*`) is one UserError; nothing is written.
- results/tables/curves.csv: the training curves (step, tokens, train_loss, val_loss) of every finished run.
Rows are sorted, floats written at full precision, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from sparsescale.errors import UserError
from sparsescale.io import atomic_path, read_json

KEY_COLUMNS = ["run_id", "size", "mode", "n_params", "n_params_total", "n_active", "sparsity", "sparsity_measured",
               "sparsity_measured_qkv", "sparsity_measured_o", "sparsity_measured_gate_up", "sparsity_measured_down",
               "precision", "seed", "tokens", "val_loss", "status"]
CURVE_KEYS = ["run_id", "size", "n_params", "sparsity", "precision", "seed", "mode"]


def _row(run_dir: Path) -> dict:
    final = read_json(run_dir / "final.json")
    row = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in final.items()}
    row["status"] = "ok"
    ev = run_dir / "eval.json"
    if ev.exists():
        e = read_json(ev)
        row["eval_val_loss"] = e.get("val_loss")
    lm = run_dir / "lmeval.json"
    if lm.exists():
        row.update({f"lmeval_{k}": v for k, v in read_json(lm).get("scores", {}).items()})
    return row


def _missing_row(run_dir: Path) -> dict:
    failed = run_dir / "failed.json"
    info = read_json(failed) if failed.exists() else {}
    name = run_dir.name
    info.setdefault("mode", next((m for m in ("continue", "finetune") if name.endswith(f"-{m}")), "scratch"))
    return {"run_id": run_dir.name, "status": info.get("status", "missing"), "error": info.get("error", ""),
            **{k: info.get(k) for k in ("size", "mode", "n_params", "sparsity", "precision", "seed")}}


# per-evaluation values of metrics.jsonl carried into curves.csv (the spike statistic: superweight.detect.spike_stats)
CURVE_VALUES = ["train_loss", "val_loss", "spike_in_ratio", "spike_out_ratio", "spike_layer"]


def aggregate(run_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, curves = [], []
    for d in run_dirs:
        if (d / "final.json").exists():
            row = _row(d)
            rows.append(row)
            mpath = d / "metrics.jsonl"
            if mpath.exists():
                for line in mpath.read_text().splitlines():
                    if line.strip():
                        m = json.loads(line)
                        curves.append({**{k: row.get(k) for k in CURVE_KEYS}, "step": m["step"], "tokens": m["tokens"],
                                       **{k: m.get(k) for k in CURVE_VALUES}})
        else:
            rows.append(_missing_row(d))
    if not rows:
        raise UserError("no runs to aggregate: pass run directories (results/runs/{run_id}) that hold final.json")
    runs = pd.DataFrame(rows)
    cols = [c for c in KEY_COLUMNS if c in runs.columns] + sorted(c for c in runs.columns if c not in KEY_COLUMNS)
    runs = runs[cols].sort_values("run_id", kind="stable").reset_index(drop=True)
    curves_df = pd.DataFrame(curves, columns=CURVE_KEYS + ["step", "tokens", *CURVE_VALUES])
    curves_df = curves_df.sort_values(["run_id", "step"], kind="stable").reset_index(drop=True)
    return runs, curves_df


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.10g")


def cli_aggregate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale aggregate", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (results/runs/{run_id}) or their final.json files")
    p.add_argument("--out", default="results/tables", help="directory for runs.csv and curves.csv")
    a = p.parse_args(argv)
    absent = [r for r in a.runs if not Path(r).exists()]
    if absent:
        raise UserError(f"{len(absent)} of the {len(a.runs)} run paths do not exist: {', '.join(absent[:5])}"
                        + (" ..." if len(absent) > 5 else "")
                        + "; pass run directories (results/runs/{run_id}) or their final.json files "
                        "(a glob that matched nothing reaches this command as it was typed)")
    dirs = sorted({(Path(r).parent if Path(r).name.endswith(".json") else Path(r)) for r in a.runs})
    runs, curves = aggregate(dirs)
    out = Path(a.out)
    write_csv(runs, out / "runs.csv")
    write_csv(curves, out / "curves.csv")
    bad = runs[runs["status"] != "ok"]
    print(f"aggregated {len(runs) - len(bad)} finished runs into {out / 'runs.csv'}"
          + (f"; not finished: {', '.join(bad['run_id'])}" if len(bad) else ""))
    if "core_seconds" in runs.columns and runs["core_seconds"].notna().any():
        cs = runs["core_seconds"].dropna()
        print(f"core-seconds per run: median {cs.median():.0f}, max {cs.max():.0f}, total {cs.sum():.0f} ({len(cs)} runs)")
    return 0
