"""How far to trust a fitted S*: bootstrap intervals, drop-one stability, design checks, held-out error.

A number from a scaling-law fit is a result only with its design, its interval and its stability. This
file computes all three for one precision's runs (`fit.py` assembles them into fit_{precision}.json).

Features
- `design_check(runs)`: sizes, N span, sparsities, seeds per cell, token budgets; loud warnings for < 4
  sizes, < 5 sparsities, and budgets that vary with N (the law has no data term: it is a law at fixed D).
- `shape_check(runs)`: whether the cell means have the law's shape (loss falls with N at every S, the gap to
  dense grows with S at every N); each violating step with its standard error from the seeds, flagged beyond 2.
- `bootstrap(runs, fit)`: resamples seeds within each (N, S) cell when cells hold >= 2 seeds (every
  resample keeps the design; deviations from the cell mean inflated by sqrt(m/(m-1)), without which 2-seed
  cells carry half the variance), a residual bootstrap otherwise (centred log-space residuals of the full fit,
  inflated by sqrt(n/(n-p)), put back on its predictions). Every refit is a multi-start: the full-data
  optimum plus the resample's own best grid starts, loose L-BFGS-B, best polished. Resample indices come
  from one seeded generator in this process: the result does not depend on --jobs.
- `s_star_interval(samples)`: the percentile interval over resamples with a finite optimum; the share with
  no finite optimum (S* -> 1) and the share with S* = 0 reported beside it, never folded into the interval.
- `drop_one(runs, fit)`: S* refitted without each size and without each sparsity, and the largest shift.
- `e_profile(runs, fit)`: S* refitted with E pinned at fractions of the smallest loss. Over a narrow span of N
  the floor E and the exponent alpha trade off (E on its bound at 0 with alpha ~0.04 fits about as well as
  E = 2 with alpha ~0.13); S* = argmin A(S)(1-S)^alpha depends on alpha, so a headline S* must not depend on
  where in that valley the fit landed: `s_star_range` is the spread of S* along it.
- `leave_one_size_out`, `dense_leave_one_size_out`, `aic`: held-out error of the largest size and a
  pseudo-AIC for the model comparison.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from sparsescale.errors import UserError
from sparsescale.scaling import (
    LEVEL,
    MIN_SIZES,
    MIN_SPARSITIES,
    PARAM_NAMES,
    design_arrays,
    param_bounds,
    init_grid,
    law_design,
    minimise,
    one_blas_thread,
    screen_starts,
    to_params,
    x_of_s,
    fit_dense_per_s,
    fit_law,
    law,
    optimal_sparsity,
    validate_runs,
)

# The standard a headline S* is held to (README, "What the reference result shows").
GOOD_SIZES, GOOD_SPARSITIES = 4, 5
STABLE_SHIFT = 0.05  # dropping one size or one sparsity moves S* by at most this
NARROW_HALF_WIDTH = 0.10  # the S* interval is at most +-0.1
UNDETERMINED_SHARE = 0.05  # at most this share of resamples may lack a finite optimum
MULTISTART = 16  # grid starts per refit (besides the full-data optimum)


# ----------------------------------------------------------------------------------------------------
# Design


def _cells(runs: pd.DataFrame) -> pd.core.groupby.DataFrameGroupBy:
    return runs.groupby(["n_params", "sparsity"], sort=True)


def design_check(runs: pd.DataFrame) -> dict:
    """What the sweep behind a fit measured, and loud warnings where it falls short of a trustworthy S*."""
    counts = _cells(runs).size()
    sizes = sorted(runs["n_params"].unique().tolist())
    sparsities = sorted(runs["sparsity"].unique().tolist())
    flags = {}  # code -> message: fit.flags_of reports them as they are
    if len(sizes) < GOOD_SIZES:
        flags["few_sizes"] = (
            f"only {len(sizes)} model sizes: S* from fewer than {GOOD_SIZES} sizes moves when one is dropped; "
            f"add sizes (sweep.sizes)"
        )
    if len(sparsities) < GOOD_SPARSITIES:
        flags["few_sparsities"] = (
            f"only {len(sparsities)} sparsities: A(S) has 3 parameters and S* sits where its exponential wakes up; "
            f"measure >= {GOOD_SPARSITIES}, up to past the optimum (e.g. 0, .3, .5, .6, .7, .8, .9)"
        )
    tokens = None
    if "tokens" in runs.columns and runs["tokens"].notna().any():
        per_size = runs.groupby("n_params")["tokens"].median()
        values = sorted({int(v) for v in per_size.dropna()})
        tokens = {"fixed": len(values) == 1, "values": values}
        if len(values) > 1:
            flags["budget_varies_with_n"] = (
                f"the token budget varies with N ({values[0]:,} to {values[-1]:,} tokens): the law has no data term, "
                f"so the data-limited part of the loss is absorbed into B and moves S*; give every size one budget "
                f"(train.tokens: one number)"
            )
    return {
        "n_runs": int(len(runs)),
        "n_sizes": len(sizes),
        "n_span": float(sizes[-1] / sizes[0]) if sizes else None,
        "n_sparsities": len(sparsities),
        "max_sparsity": float(sparsities[-1]) if sparsities else None,
        "seeds_per_cell": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
        "tokens": tokens,
        "flags": flags,
        "warnings": list(flags.values()),
    }


def _monotone_violations(means: pd.DataFrame, se: pd.DataFrame | None, axis: str, direction: str) -> list[dict]:
    """Consecutive pairs along `axis` ('n': rows are N, loss should fall; 's': gap should grow) that break it."""
    out = []
    outer, inner = (means.columns, means.index) if axis == "n" else (means.index, means.columns)
    for o in outer:
        line = means[o] if axis == "n" else means.loc[o]
        err = None if se is None else (se[o] if axis == "n" else se.loc[o])
        pts = [(k, float(line[k])) for k in inner if pd.notna(line[k])]
        for (a, va), (b, vb) in zip(pts, pts[1:]):
            step = vb - va  # N: should be < 0 (loss falls); S: should be > 0 (gap grows)
            if (step < 0) if direction == "falls" else (step > 0):
                continue
            noise = None if err is None else float(np.hypot(err[a], err[b]))
            key = "sparsity" if axis == "n" else "n_params"
            out.append({key: float(o), "from": float(a), "to": float(b), "value_from": va, "value_to": vb,
                        "step": step, "se": noise,
                        "significant": None if noise is None or not np.isfinite(noise) else bool(abs(step) > 2 * noise)})
    return out


def shape_check(runs: pd.DataFrame) -> dict:
    """Do the cell means have the law's shape? Loss falls with N at every S; the gap to dense, L(N,S) - L(N,0),
    grows with S at every N; and that gap, (A(S) - A(0)) / N^alpha under the law, shrinks with N at every S > 0.
    Violations are listed with the standard error of the step; one beyond 2 standard errors (or any, with one
    seed per cell) is flagged. The seed variance is pooled per sparsity (`seed_sd_by_s`), since it grows with S
    (top-K at S = 0.9 trains far noisier than dense: one pooled value would overstate the noise at low S and
    understate it at high S); a sparsity without repeated seeds uses the variance pooled over all cells."""
    cells = _cells(runs)["val_loss"]
    means = cells.mean().unstack("sparsity")  # rows N, columns S
    counts = cells.size().unstack("sparsity")
    sq = ((runs["val_loss"] - cells.transform("mean")) ** 2).groupby(runs["sparsity"]).sum()
    dof_s = (counts - 1).clip(lower=0).sum()
    dof = int(dof_s.sum())
    seed_sd = float(np.sqrt(sq.sum() / dof)) if dof > 0 else None
    sd_by_s = {float(c): float(np.sqrt(sq[c] / dof_s[c])) if dof_s[c] > 0 else seed_sd for c in means.columns}
    se = None if seed_sd is None else counts.pow(-0.5).mul(pd.Series(sd_by_s), axis=1)
    falls = _monotone_violations(means, se, "n", "falls")
    grows, shrinks, gaps = [], [], None
    if 0.0 in means.columns:
        gap = means.sub(means[0.0], axis=0)
        gaps = {float(n): {float(s): float(v) for s, v in row.items() if pd.notna(v)} for n, row in gap.iterrows()}
        # a step of the gap between two sparsities is the step of the loss (the dense cell cancels): its noise too
        grows = _monotone_violations(gap, se, "s", "grows")
        # a step of the gap between two sizes involves four cells: each gap's noise adds its dense cell's
        sparse = [c for c in gap.columns if c > 0]
        se_gap = None if se is None else ((se ** 2).add(se[0.0] ** 2, axis=0)) ** 0.5
        shrinks = _monotone_violations(gap[sparse], None if se_gap is None else se_gap[sparse], "n", "falls")
    flags = {}
    for code, viol, what in (("loss_not_falling_with_n", falls, "loss does not fall with N"),
                             ("gap_not_growing_with_s", grows, "the gap to dense does not grow with S"),
                             ("gap_not_shrinking_with_n", shrinks, "the gap to dense does not shrink with N")):
        bad = [v for v in viol if v["significant"] is not False]
        if bad:
            first = bad[0]
            where = (f"S = {first['sparsity']:g}, N {first['from']:,.0f} -> {first['to']:,.0f}" if "sparsity" in first
                     else f"N = {first['n_params']:,.0f}, S {first['from']:g} -> {first['to']:g}")
            flags[code] = (f"{what} in {len(bad)} step(s) beyond 2 standard errors (e.g. {where}: "
                           f"{first['value_from']:.4f} -> {first['value_to']:.4f}): the law's shape does not hold there")
    return {"seed_sd": seed_sd, "seed_sd_by_s": sd_by_s if seed_sd is not None else None,
            "loss_falls_with_n": not falls, "gap_grows_with_s": None if gaps is None else not grows,
            "gap_shrinks_with_n": None if gaps is None else not shrinks,
            "violations_n": falls, "violations_s": grows, "violations_gap_n": shrinks, "gaps": gaps, "flags": flags}


# ----------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_method(runs: pd.DataFrame) -> str:
    """'seeds' when the typical (N, S) cell holds >= 2 runs, else 'residual'."""
    return "seeds" if float(_cells(runs).size().median()) >= 2 else "residual"


def _resamples(runs: pd.DataFrame, fit: dict, method: str, n_boot: int, rng: np.random.Generator):
    """(idx (n_boot, m) rows of runs, y (n_boot, m) losses) of every resample."""
    y = runs["val_loss"].to_numpy(float)
    if method == "seeds":
        # Seeds drawn with replacement within each cell, as deviations from the cell mean (log space) scaled by
        # sqrt(m/(m-1)): plain resampling of m seeds has (m-1)/m of the variance of their mean (1/2 at m = 2,
        # the usual sweep), which made 95% intervals cover the true S* in ~2/3 of planted draws.
        log_y = np.log(y)
        idx_parts, dev_parts = [], []
        for g in _cells(runs).indices.values():
            m = len(g)
            pick = g[rng.integers(0, m, size=(n_boot, m))]
            mean = log_y[g].mean()
            scale = np.sqrt(m / (m - 1)) if m > 1 else 1.0
            idx_parts.append(np.tile(g, (n_boot, 1)))
            dev_parts.append(mean + scale * (log_y[pick] - mean))
        return np.concatenate(idx_parts, axis=1), np.exp(np.concatenate(dev_parts, axis=1))
    pred = law(fit["params"], runs["n_params"].to_numpy(float), runs["sparsity"].to_numpy(float), fit["form"])
    r = np.log(y) - np.log(pred)
    n = len(r)
    r = (r - r.mean()) * np.sqrt(n / max(n - len(PARAM_NAMES), 1))  # centred; leverage: p = 5 parameters
    draws = r[rng.integers(0, n, size=(n_boot, n))]
    return np.tile(np.arange(n), (n_boot, 1)), pred[None, :] * np.exp(draws)


@one_blas_thread
def _refit_chunk(args):
    """Refit a list of resamples (in a worker process); -> rows [ok, E, B, C, alpha, beta, S*]."""
    n, s, form, warm, log_n_ref, idx, ys, k = args
    F_all = law_design(np.log(n) - log_n_ref, x_of_s(s, form)).reshape(3, len(n), 5)
    rows = []
    for i, y in zip(idx, ys):
        F, log_y = F_all[:, i].reshape(-1, 5), np.log(y)
        starts = np.vstack([warm[None], screen_starts(init_grid(log_y), F, log_y, k)])
        p, _, n_conv, _ = minimise(F, log_y, starts, param_bounds(log_y), loose=True)
        params = to_params(p, log_n_ref)
        rows.append([float(n_conv > 0)] + [params[name] for name in PARAM_NAMES] + [optimal_sparsity(params, form)["s_star"]])
    return rows


def jobs_or_cores(jobs: int | None) -> int:
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1: got {jobs}")
    return jobs


def s_star_interval(s_star: np.ndarray, level: float = LEVEL) -> dict:
    """Percentile interval of S* over resamples with a finite optimum, and the shares at the edges."""
    s_star = np.asarray(s_star, float)
    finite = s_star[s_star < 1.0]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    n = max(len(s_star), 1)
    return {
        "ci": [float(v) for v in np.percentile(finite, q)] if len(finite) else [None, None],
        "share_no_finite_optimum": float((s_star >= 1.0).sum() / n),
        "share_dense_optimal": float((s_star == 0.0).sum() / n),
    }


def bootstrap(runs, fit: dict, n_boot: int = 1000, seed: int = 0, jobs: int | None = None, level: float = LEVEL,
              multistart: int = MULTISTART, method: str = "auto") -> dict:
    """Bootstrap intervals of every constant and of S* (see the module docstring for the method).

    Returns {"samples": (n_boot, 7) array [ok, E, B, C, alpha, beta, S*], "ci", "s_star_ci",
    "share_no_finite_optimum", "share_dense_optimal", "method", "n", "n_ok", "seed", "level", "multistart"}.
    """
    if n_boot < 1:
        raise UserError(f"--bootstrap must be >= 1: got {n_boot}")
    if method not in ("auto", "seeds", "residual"):
        raise UserError(f"bootstrap method must be auto, seeds or residual: got {method!r}")
    runs, _ = validate_runs(runs)
    method = bootstrap_method(runs) if method == "auto" else method
    idx, ys = _resamples(runs, fit, method, n_boot, np.random.default_rng(seed))
    n, s = runs["n_params"].to_numpy(float), runs["sparsity"].to_numpy(float)
    jobs = min(jobs_or_cores(jobs), n_boot)
    chunks = np.array_split(np.arange(n_boot), jobs * 4 if jobs > 1 else 1)
    tasks = [(n, s, fit["form"], fit["p"], fit["log_n_ref"], idx[c], ys[c], multistart) for c in chunks if len(c)]
    if jobs == 1:
        rows = [r for t in tasks for r in _refit_chunk(t)]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            rows = [r for out in pool.map(_refit_chunk, tasks) for r in out]
    samples = np.array(rows)
    ok = samples[:, 0] == 1.0
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    ci = {name: [float(v) for v in np.percentile(samples[ok, j], q)] if ok.any() else [None, None]
          for j, name in enumerate(PARAM_NAMES, start=1)}
    star = s_star_interval(samples[ok, -1], level)
    return {
        "samples": samples,
        "ci": ci,
        "s_star_ci": star["ci"],
        "share_no_finite_optimum": star["share_no_finite_optimum"],
        "share_dense_optimal": star["share_dense_optimal"],
        "method": method,
        "n": n_boot,
        "n_ok": int(ok.sum()),
        "seed": seed,
        "level": level,
        "multistart": multistart,
    }


# ----------------------------------------------------------------------------------------------------
# Stability: drop one size, drop one sparsity


@one_blas_thread
def _refit_s_star(runs: pd.DataFrame, fit: dict, multistart: int) -> float | None:
    if runs["n_params"].nunique() < MIN_SIZES or runs["sparsity"].nunique() < MIN_SPARSITIES or len(runs) < len(PARAM_NAMES) + 1:
        return None
    log_n_ref = fit["log_n_ref"]
    F, log_y = design_arrays(runs, fit["form"], log_n_ref)
    starts = np.vstack([fit["p"][None], screen_starts(init_grid(log_y), F, log_y, multistart)])
    p, _, _, _ = minimise(F, log_y, starts, param_bounds(log_y), loose=True)
    return optimal_sparsity(to_params(p, log_n_ref), fit["form"])["s_star"]


def drop_one(runs, fit: dict, multistart: int = MULTISTART, tolerance: float = STABLE_SHIFT) -> dict:
    """S* refitted without each size and without each sparsity; `stable` when no refit moves it by more
    than `tolerance` (a refit with no finite optimum counts as S* = 1). A drop that leaves too little to fit
    (< 2 sizes, < 3 sparsities) has s_star None and is not counted."""
    runs, _ = validate_runs(runs)
    s_full = optimal_sparsity(fit["params"], fit["form"])["s_star"]

    def rows(col):
        out = []
        for v in sorted(runs[col].unique()):
            s = _refit_s_star(runs[runs[col] != v], fit, multistart)
            row = {col: float(v), "s_star": s, "shift": None if s is None else s - s_full}
            if col == "n_params" and "size" in runs.columns:
                row["size"] = str(runs.loc[runs[col] == v, "size"].iloc[0])
            out.append(row)
        return out

    by_size, by_sparsity = rows("n_params"), rows("sparsity")

    def worst(rs):
        shifts = [abs(r["shift"]) for r in rs if r["shift"] is not None]
        return max(shifts) if shifts else None

    w_size, w_sparsity = worst(by_size), worst(by_sparsity)
    return {
        "s_star": s_full,
        "drop_size": by_size,
        "drop_sparsity": by_sparsity,
        "max_shift_size": w_size,
        "max_shift_sparsity": w_sparsity,
        "tolerance": tolerance,
        "stable": None if w_size is None or w_sparsity is None else bool(max(w_size, w_sparsity) <= tolerance),
    }


# ----------------------------------------------------------------------------------------------------
# The floor E: a profile


E_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)  # E pinned at these fractions of the smallest observed loss


@one_blas_thread
def e_profile(runs, fit: dict, fractions=E_FRACTIONS, multistart: int = 4 * MULTISTART,
              tolerance: float = STABLE_SHIFT) -> dict:
    """S* with E pinned at each fraction of the smallest observed loss (0: E at its lower bound), every other
    constant refitted (the grid's best starts with E replaced, and the full fit's optimum). Returns the points
    (E, objective, alpha, beta, s_star), `s_star_range` [min, max] over them and `sensitive` when that range is
    wider than `tolerance`. A refit with no finite optimum counts as S* = 1."""
    runs, _ = validate_runs(runs)
    log_n_ref = fit["log_n_ref"]
    F, log_y = design_arrays(runs, fit["form"], log_n_ref)
    lo_loss = float(runs["val_loss"].min())
    points = []
    for frac in fractions:
        bounds = list(param_bounds(log_y))
        log_e = bounds[0][0] if frac <= 0 else float(np.log(frac * lo_loss))
        bounds[0] = (log_e, log_e)
        grid = init_grid(log_y)
        grid[:, 0] = log_e
        warm = np.array(fit["p"], float)
        warm[0] = log_e
        starts = np.vstack([warm[None], screen_starts(grid, F, log_y, multistart)])
        p, fun, _, _ = minimise(F, log_y, starts, bounds)
        params = to_params(p, log_n_ref)
        points.append({"fraction": float(frac), "E": params["E"], "objective": float(fun), "alpha": params["alpha"],
                       "beta": params["beta"], "s_star": optimal_sparsity(params, fit["form"])["s_star"]})
    s = [pt["s_star"] for pt in points]
    return {"points": points, "s_star_range": [min(s), max(s)], "tolerance": tolerance,
            "sensitive": bool(max(s) - min(s) > tolerance)}


# ----------------------------------------------------------------------------------------------------
# Held-out error and model comparison


def leave_one_size_out(runs, form: str = "paper", n_starts: int | None = 32) -> dict | None:
    """Fit without the largest N and predict it; None when what is left is too little to fit."""
    runs, _ = validate_runs(runs)
    largest = runs["n_params"].max()
    train, test = runs[runs["n_params"] < largest], runs[runs["n_params"] == largest]
    if (train["n_params"].nunique() < MIN_SIZES or train["sparsity"].nunique() < MIN_SPARSITIES
            or len(train) < len(PARAM_NAMES) + 1):
        return None
    fit = fit_law(train, form, n_starts=n_starts)
    pred = law(fit["params"], test["n_params"].to_numpy(float), test["sparsity"].to_numpy(float), form)
    obs = test["val_loss"].to_numpy(float)
    rel = (pred - obs) / obs
    points = [
        {"n_params": float(n), "sparsity": float(s), "observed": float(o), "predicted": float(p), "rel_error": float(r)}
        for n, s, o, p, r in zip(test["n_params"], test["sparsity"], obs, pred, rel)
    ]
    return {"held_out_n_params": float(largest), "points": points, "mean_abs_rel_error": float(np.abs(rel).mean())}


def dense_leave_one_size_out(runs) -> float | None:
    """Leave-one-size-out for the per-S baseline: each S needs >= 3 other sizes; None if none qualifies."""
    largest = runs["n_params"].max()
    dense = fit_dense_per_s(runs[runs["n_params"] < largest])["fits"]
    errs = []
    for row in dense:
        test = runs[(runs["n_params"] == largest) & (runs["sparsity"] == row["sparsity"])]
        pred = row["E"] + row["A"] / test["n_params"] ** row["alpha"]
        errs += list(np.abs(pred - test["val_loss"]) / test["val_loss"])
    return float(np.mean(errs)) if errs else None


def aic(objective: float, n: int, k: int) -> float:
    """Pseudo-AIC: 2 x Huber objective stands in for the residual sum of squares (n log(RSS/n) + 2k)."""
    return float(n * np.log(max(2.0 * objective, 1e-300) / n) + 2 * k)

