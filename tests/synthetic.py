"""Small synthetic result files for tests of figures, tables and anything else that reads them.

Everything here is generated from a known law, so tests can compare what they read back with the truth:
- `runs_frame()`     one row per run, the `results/tables/runs.csv` schema (losses from the law + noise)
- `curves_frame()`   training curves, the `results/tables/curves.csv` schema
- `fit_result()`     a fit JSON as `sparsescale fit` writes it (true constants, made-up intervals)
- `write_inputs()`   all of the above written under a tmp dir, returning their paths

Deterministic: a fixed seed per (size, sparsity, precision, seed) cell, no clocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sparsescale.io import write_json
from sparsescale.scaling import inference_cost_factor, law

# Non-embedding parameter counts of the synthetic sizes (flavor name -> N).
SIZES = {"d2": 200_000, "d4": 1_000_000, "d6": 3_000_000, "d8": 8_000_000}
SPARSITIES = (0.0, 0.4, 0.6, 0.8)
SEEDS = (0, 1)
# True constants (paper form). Chosen so that S* is near 0.45 (fp) and near 0.6 (1.58) and the sparse-dense
# gap is visible at these tiny N.
TRUE_PARAMS = {
    "fp": {"E": 2.5, "B": 6.14, "C": 20.0, "alpha": 0.3, "beta": 0.2},
    "1.58": {"E": 2.8, "B": 7.3, "C": 20.0, "alpha": 0.3, "beta": 0.15},
}
NOISE = 0.003  # relative noise of a run's loss (seed to seed)
# Relative size of the weight matrices each projection feeds (q,k,v: 3 d^2; o: d^2; gate,up: 2 d f; down: f d,
# with f = 8/3 d): the weights of the measured overall sparsity.
_PROJ_WEIGHT = {"qkv": 3.0, "o": 1.0, "gate_up": 16.0 / 3.0, "down": 8.0 / 3.0}


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int(round(float(k) * 1000)) for k in key])


def measured_sparsity(s: float) -> dict[str, float]:
    """Measured sparsity per projection at target `s`: down_proj is sparser (ReLU^2 zeroes half of the rest)."""
    per = {"qkv": s, "o": s, "gate_up": s, "down": s + 0.5 * (1.0 - s)}
    overall = sum(_PROJ_WEIGHT[k] * v for k, v in per.items()) / sum(_PROJ_WEIGHT.values())
    return {**per, "overall": overall}


def runs_frame(
    sizes: dict[str, int] = SIZES,
    sparsities=SPARSITIES,
    seeds=SEEDS,
    precisions=("fp", "1.58"),
    failed: tuple[str, ...] = ("d2-s0.8-1.58-seed1",),
    extra_modes: bool = False,
) -> pd.DataFrame:
    """The runs table: losses are the true law times (1 + noise); the runs named in `failed` have NaN loss."""
    rows = []
    for prec in precisions:
        for size, n in sizes.items():
            for s in sparsities:
                for seed in seeds:
                    run_id = f"{size}-s{s}-{prec}-seed{seed}"
                    loss = float(law(TRUE_PARAMS[prec], n, s)) * (1.0 + NOISE * _rng(n, s, prec == "fp", seed).standard_normal())
                    rows.append(_row(run_id, size, "scratch", n, s, prec, seed, np.nan if run_id in failed else loss))
    if extra_modes:  # a continue-trained pair at one size: must not enter the scaling figures
        n = sizes[list(sizes)[1]]
        for s in (0.0, 0.4):
            loss = float(law(TRUE_PARAMS["fp"], n, s)) + 0.2
            rows.append(_row(f"{list(sizes)[1]}-s{s}-fp-continue", list(sizes)[1], "continue", n, s, "fp", 0, loss))
    return pd.DataFrame(rows)


def _row(run_id, size, mode, n, s, prec, seed, loss) -> dict:
    m = measured_sparsity(s)
    return {
        "run_id": run_id, "size": size, "mode": mode, "n_params": n, "n_params_total": n + 65_536,
        "n_active": int(round(n * (1.0 - m["overall"]))), "sparsity": s, "sparsity_measured": m["overall"],
        "sparsity_measured_qkv": m["qkv"], "sparsity_measured_o": m["o"],
        "sparsity_measured_gate_up": m["gate_up"], "sparsity_measured_down": m["down"],
        "precision": prec, "seed": seed, "tokens": 2_000_000, "val_loss": loss, "lr": 1e-3,
        "wall_time_s": 12.5, "device": "cpu",
    }


def curves_frame(runs: pd.DataFrame, n_steps: int = 40, eval_every: int = 5) -> pd.DataFrame:
    """Training curves that decay from ln(vocab) to each run's final loss; val_loss every `eval_every` steps."""
    rows = []
    for r in runs.itertuples():
        final = r.val_loss if np.isfinite(r.val_loss) else 6.0
        rng = _rng(r.n_params, r.sparsity, r.precision == "fp", r.seed, 7)
        for step in range(0, n_steps + 1):
            tokens = step * r.tokens // n_steps
            clean = final + (8.3 - final) * np.exp(-step / (n_steps / 6))
            val = clean if step % eval_every == 0 else np.nan
            rows.append({
                "run_id": r.run_id, "n_params": r.n_params, "size": r.size, "sparsity": r.sparsity,
                "precision": r.precision, "seed": r.seed, "step": step, "tokens": tokens,
                "train_loss": clean + 0.03 * rng.standard_normal(), "val_loss": val,
            })
    return pd.DataFrame(rows)


def s_star(params: dict) -> float:
    grid = np.linspace(0.0, 0.99, 99_001)
    return float(grid[np.argmin(inference_cost_factor(params, grid))])


def fit_result(precision: str, runs: pd.DataFrame | None = None) -> dict:
    """A fit JSON with the true constants, +-5% intervals and a leave-one-size-out block from `runs`."""
    runs = runs_frame() if runs is None else runs
    p = dict(TRUE_PARAMS[precision])
    star = s_star(p)
    sub = runs[(runs.precision == precision) & runs.val_loss.notna()]
    held = int(sub.n_params.max())
    points = []
    for s, g in sub[sub.n_params == held].groupby("sparsity"):
        obs = float(g.val_loss.mean())
        pred = float(law(p, held, s))
        points.append({"n_params": held, "sparsity": float(s), "observed": obs, "predicted": pred, "rel_error": pred / obs - 1.0})
    return {
        "precision": precision, "form": "paper", "params": p,
        "ci": {k: [0.95 * v, 1.05 * v] for k, v in p.items()},
        "s_star": star, "s_star_ci": [star - 0.03, star + 0.03],
        "n_over_na": 1.0 / (1.0 - star), "n_over_na_ci": [1.0 / (1.03 - star), 1.0 / (0.97 - star)],
        "objective": 1e-6, "n_starts": 64, "n_converged": 60, "converged": True, "on_bound": [],
        "warnings": ["synthetic fit: constants are the truth"] if precision == "fp" else [],
        "n_runs": int(len(sub)), "n_sizes": int(sub.n_params.nunique()), "sizes": sorted(sub["size"].unique().tolist()),
        "sparsities": sorted(float(s) for s in sub.sparsity.unique()),
        "bootstrap": {"n": 200, "n_ok": 198, "seed": 0, "level": 0.95},
        "loso": {"held_out_n_params": held, "points": points,
                 "mean_abs_rel_error": float(np.mean([abs(q["rel_error"]) for q in points]))},
        "comparison": {}, "dense_baseline": [], "missing": [], "versions": {"sparsescale": "test"},
    }


def write_inputs(root: str | Path, precisions=("fp", "1.58"), fits=("fp", "1.58"), **runs_kwargs) -> dict[str, Path]:
    """Write runs.csv, curves.csv and the fit JSONs under `root`; return their paths."""
    root = Path(root)
    runs = runs_frame(precisions=precisions, **runs_kwargs)
    tables, fit_dir = root / "results" / "tables", root / "results" / "fit"
    tables.mkdir(parents=True, exist_ok=True)
    fit_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(tables / "runs.csv", index=False)
    curves_frame(runs).to_csv(tables / "curves.csv", index=False)
    for prec in fits:
        write_json(fit_dir / f"fit_{prec}.json", fit_result(prec, runs))
    write_json(fit_dir / "optimal_sparsity.json", {
        "precisions": {p: {"s_star": s_star(TRUE_PARAMS[p])} for p in fits},
        "paper_check": {"s_star_computed": 0.502, "s_star_stated": 0.4558, "note": "rounded constants"},
    })
    return {"runs": tables / "runs.csv", "curves": tables / "curves.csv", "fit_dir": fit_dir, "root": root}
