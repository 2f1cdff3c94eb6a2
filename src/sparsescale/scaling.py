"""Scaling laws of loss in model size N and activation sparsity S, and the inference-optimal sparsity.

    L(N, S) = E + A(S) / N^alpha
    paper form:  A(S) = B + C * exp(beta / (1 - S))
    card form:   A(S) = B + C * exp(beta * S / (1 - S))      (same family: C_card = C_paper * e^beta)

N is the number of non-embedding parameters (`n_params`), S the target sparsity, L the validation loss
in nats/token. With activated parameters N_a = N (1 - S) the loss at fixed inference cost is
E + A(S) (1 - S)^alpha / N_a^alpha, so S* = argmin_S A(S) (1 - S)^alpha, independent of N_a and E.

Notable features:
- one law implementation: every form (paper, card, and the dense per-S baseline E + A/N^alpha) is a
  log-sum-exp of terms that are *linear* in the fitted parameters, so one objective with an analytic
  gradient serves them all (`_objective`);
- Chinchilla approach 3: summed Huber loss (delta = 1e-3) on log loss, L-BFGS-B from a grid of
  initialisations, best kept; tight tolerances because the objective is tiny (~1e-4) and scipy's default
  stops early on it; the number of starts, converged starts and parameters on a bound are reported;
  many-start refits (bootstrap, drop-one) run loose tolerances and polish the best;
- log N is centred inside the fit (better conditioning of B, C against alpha); reported constants are in
  the units of `n_params` as given;
- S* by a dense grid on [0, 1) (fine near 1) then a bounded scalar search, with S* = 0 and
  "no finite optimum" (monotone) edges; the inverse question for a fixed activated-parameter budget;
- the paper's printed constants evaluated, with the range their rounding admits.

Uncertainty and stability (bootstrap, drop-one refits, design checks) are in `diagnostics.py`; the report
that `sparsescale fit` writes (fit_{precision}.json) is assembled in `fit.py`.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
from scipy.optimize import minimize, minimize_scalar  # at import: threadpoolctl limits only loaded BLAS libraries

from sparsescale.errors import UserError

FORMS = ("paper", "card")
PARAM_NAMES = ("E", "B", "C", "alpha", "beta")

# The constants printed in the Q-Sparse paper (full precision); the unit of N is not stated there.
PAPER_CONSTANTS = {"E": 1.86, "B": 0.01, "C": 1.89, "alpha": 0.10, "beta": 0.05}
# S* stated in the paper (full precision, 1.58-bit). The rounded constants above give about 50.2%.
PAPER_S_STAR = {"fp": 0.4558, "1.58": 0.6125}

DELTA = 1e-3  # Huber threshold on log loss (Chinchilla / Epoch AI)
LEVEL = 0.95  # confidence level of the bootstrap intervals
REQUIRED = ("n_params", "sparsity", "val_loss")
MIN_SIZES, MIN_SPARSITIES = 2, 3  # A(S) has 3 parameters (B, C, beta): 3 sparsities; alpha, E need 2 sizes
# L-BFGS-B stops when f changes by < ftol * max(|f|, 1); with f ~ 1e-4 the default (2e-9) stops early.
_LBFGS = {"ftol": 1e-14, "gtol": 1e-10}
_LOOSE = {"ftol": 1e-10, "gtol": 1e-7, "maxiter": 300}


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise UserError(f"unknown law form {form!r}: use one of {', '.join(FORMS)}")


def x_of_s(s, form: str):
    """The argument of exp(beta * x) in A(S): 1/(1-S) (paper) or S/(1-S) (card)."""
    s = np.asarray(s, dtype=float)
    return 1.0 / (1.0 - s) if form == "paper" else s / (1.0 - s)


def a_of_s(params: dict, s, form: str = "paper"):
    """A(S) of the law, vectorised over `s` in [0, 1)."""
    _check_form(form)
    return params["B"] + params["C"] * np.exp(params["beta"] * x_of_s(s, form))


def law(params: dict, n, s, form: str = "paper"):
    """Predicted loss L(N, S) (nats/token), vectorised over `n` (non-embedding params) and `s`."""
    n = np.asarray(n, dtype=float)
    return params["E"] + a_of_s(params, s, form) / n ** params["alpha"]


def inference_cost_factor(params: dict, s, form: str = "paper"):
    """A(S) (1 - S)^alpha: the loss term at fixed activated parameters N_a; S* minimises it."""
    s = np.asarray(s, dtype=float)
    return a_of_s(params, s, form) * (1.0 - s) ** params["alpha"]


# ----------------------------------------------------------------------------------------------------
# One objective for every law: log L = logsumexp_k (F_k @ p), Huber on log L - log y, summed.
#
# Law (paper / card), p has 5 entries, z = log N - log N_ref, x = x_of_s(S):
#   p[0] = log E, p[1] = log B', p[2] = log C', p[3] = alpha, p[4] = beta
#   terms: log E | log B' - alpha z | log C' + beta x - alpha z,   B = B' N_ref^alpha, C = C' N_ref^alpha
# Dense baseline at one S, q has 3 entries:
#   q[0] = log E, q[1] = log A', q[2] = alpha;  terms: log E | log A' - alpha z,   A = A' N_ref^alpha


def law_design(z, x):
    """Stacked term matrix (K * n, 5) with K = 3 terms; row k * n + i is term k of run i."""
    n = len(z)
    F = np.zeros((3, n, 5))
    F[0, :, 0] = 1.0
    F[1, :, 1], F[1, :, 3] = 1.0, -z
    F[2, :, 2], F[2, :, 3], F[2, :, 4] = 1.0, -z, x
    return F.reshape(3 * n, 5)


def dense_design(z):
    n = len(z)
    F = np.zeros((2, n, 3))
    F[0, :, 0] = 1.0
    F[1, :, 1], F[1, :, 2] = 1.0, -z
    return F.reshape(2 * n, 3)


def one_blas_thread(fn):
    """Run `fn` with single-threaded BLAS: on tiny problems OpenBLAS threads only spin, and on a shared
    machine that made L-BFGS-B ~20x slower (threadpoolctl; without it the call runs unchanged). Only
    libraries loaded before the call are limited: hence scipy.optimize is imported at module level."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits  # optional: without it the call runs unchanged
        except ImportError:
            return fn(*args, **kwargs)
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(p, F, log_y, delta=DELTA):
    """Summed Huber loss of log predictions and its gradient; p (P,), F (K*n, P), log_y (n,)."""
    T = (F @ p).reshape(-1, len(log_y))  # (K, n) log of each term
    m = T.max(axis=0)
    w = np.exp(T - m)  # (K, n)
    s = w.sum(axis=0)
    r = m + np.log(s) - log_y  # (n,) residual in log space
    dr = np.clip(r, -delta, delta)  # Huber derivative
    return float(dr @ (r - 0.5 * dr)), (w * (dr / s)).ravel() @ F  # Huber = dr (r - dr/2) in both regimes


def _objective_many(P, F, log_y, delta=DELTA):
    """The objective at many parameter vectors at once, P (G, P) -> (G,); used to screen start grids."""
    T = (F @ P.T).reshape(-1, len(log_y), len(P))  # (K, n, G)
    m = T.max(axis=0)
    r = m + np.log(np.exp(T - m).sum(axis=0)) - log_y[:, None]
    return _huber(r, delta).sum(axis=0)


def minimise(F, log_y, starts, bounds, delta=DELTA, maxiter=2000, loose=False):
    """L-BFGS-B from every start; -> (best p, its objective, n starts converged to it, best's message).

    A start counts as converged when L-BFGS-B declares convergence within 1e-6 (relative) of the best. When
    the best point is one where a start ran out of iterations (in a flat valley, e.g. E against B when alpha
    is small), one more L-BFGS-B run from it (fresh curvature memory) usually converges within a few dozen
    iterations; without it such bootstrap refits were counted as failed although they held the lowest point.

    loose=True (bootstrap and drop-one refits, many starts each): every start runs at loose tolerances
    (ftol 1e-10, 300 iterations: ~3x cheaper), then the best is polished at the tight ones; a start counts as
    converged when it reached the polished optimum within 1e-4 (relative).
    """
    tight = dict(_LBFGS, maxiter=maxiter)

    def run(p0, opts):
        return minimize(_objective, p0, args=(F, log_y, delta), jac=True, method="L-BFGS-B", bounds=bounds, options=opts)

    results = [run(p0, _LOOSE if loose else tight) for p0 in starts]
    best = min(results, key=lambda r: r.fun)
    if loose or not best.success:  # polish the lowest point (fresh curvature memory, tight tolerances)
        polished = run(best.x, tight)
        if polished.fun <= best.fun:
            best = polished
        results.append(polished)
    tol = 1e-4 if loose else 1e-6
    n_conv = sum(r.success and r.fun <= best.fun * (1 + tol) + 1e-15 for r in results)
    return best.x, float(best.fun), n_conv, best.message


def screen_starts(grid, F, log_y, k, delta=DELTA):
    """The k grid points with the lowest starting objective."""
    if k is None or k >= len(grid):
        return grid
    return grid[np.argsort(_objective_many(grid, F, log_y, delta), kind="stable")[:k]]


# ----------------------------------------------------------------------------------------------------
# Input


def validate_runs(runs, what: str = "runs"):
    """Check a runs table; -> (usable runs, runs left out as dicts with a `reason`).

    Left out, not fatal: a failed or diverged run (val_loss empty, NaN or inf) and a finished run whose
    n_params or sparsity is missing (e.g. a row written from failed.json). Fatal (a bad table, not a bad run):
    a missing column, non-numeric values, n_params <= 0, sparsity outside [0, 1), val_loss <= 0.
    """
    if not isinstance(runs, pd.DataFrame):
        runs = pd.DataFrame(runs)
    absent = [c for c in REQUIRED if c not in runs.columns]
    if absent:
        raise UserError(
            f"{what} lacks column(s) {', '.join(absent)}: a runs table needs {', '.join(REQUIRED)} (e.g. from `sparsescale aggregate`)"
        )
    runs = runs.copy()
    for col in REQUIRED:
        try:
            runs[col] = runs[col].astype(float)
        except (TypeError, ValueError):
            raise UserError(f"{what}: column {col} must be numeric: got values like {runs[col].iloc[0]!r}") from None
    failed = runs["val_loss"].isna() | np.isinf(runs["val_loss"])  # failed or diverged runs
    unusable = ~failed & (runs["n_params"].isna() | runs["sparsity"].isna())
    ok = ~failed & ~unusable
    if (runs.loc[ok, "n_params"] <= 0).any():
        raise UserError(f"{what}: n_params must be > 0: got {runs.loc[ok, 'n_params'].min():g}")
    bad_s = runs.loc[ok, "sparsity"][(runs.loc[ok, "sparsity"] < 0) | (runs.loc[ok, "sparsity"] >= 1)]
    if len(bad_s):
        raise UserError(f"sparsity must be in [0, 1): got {bad_s.iloc[0]:g} ({what})")
    keep = [c for c in ("run_id", "precision", "n_params", "sparsity", "seed", "val_loss") if c in runs.columns]
    left_out = runs.loc[~ok, keep].astype(object).where(runs.loc[~ok, keep].notna(), None)
    left_out["reason"] = np.where(failed[~ok], "no val_loss (failed or unfinished)", "n_params or sparsity missing")
    runs = runs[ok]
    if (runs["val_loss"] <= 0).any():
        raise UserError(f"{what}: val_loss must be > 0 (nats/token): got {runs['val_loss'].min():g}")
    return runs.reset_index(drop=True), left_out.to_dict("records")


def check_design(runs, what: str) -> None:
    n_sizes, n_sparsities = runs["n_params"].nunique(), runs["sparsity"].nunique()
    if n_sizes < MIN_SIZES or n_sparsities < MIN_SPARSITIES or len(runs) < len(PARAM_NAMES) + 1:
        raise UserError(
            f"{what}: {len(runs)} finished run(s) with {n_sizes} distinct n_params and {n_sparsities} distinct sparsity: "
            f"the law needs >= {MIN_SIZES} sizes, >= {MIN_SPARSITIES} sparsities and >= {len(PARAM_NAMES) + 1} runs: add runs to the sweep"
        )


# ----------------------------------------------------------------------------------------------------
# Fit


def param_bounds(log_y):
    hi = float(log_y.max())
    return [(-10.0, hi + 1.0), (-30.0, hi + 5.0), (-30.0, hi + 5.0), (0.0, 2.0), (-2.0, 10.0)]


def init_grid(log_y):
    """Chinchilla-style grid of starts (internal coordinates), scaled by the smallest observed loss."""
    lo = float(np.exp(log_y.min()))
    E, B, C = lo * np.array([0.3, 0.6, 0.9]), lo * np.array([0.01, 0.1, 0.5]), lo * np.array([0.05, 0.2, 0.8])
    alpha, beta = [0.05, 0.1, 0.2, 0.4], [0.01, 0.05, 0.2, 0.8]
    return np.array([[np.log(e), np.log(b), np.log(c), a, bb] for e, b, c, a, bb in itertools.product(E, B, C, alpha, beta)])


def to_params(p, log_n_ref) -> dict:
    return {
        "E": float(np.exp(p[0])),
        "B": float(np.exp(p[1] + p[3] * log_n_ref)),
        "C": float(np.exp(p[2] + p[3] * log_n_ref)),
        "alpha": float(p[3]),
        "beta": float(p[4]),
    }


def to_internal(params, log_n_ref, bounds):
    with np.errstate(divide="ignore"):  # B = 0 -> log B = -inf, clipped to the bound
        p = [
            np.log(params["E"]),
            np.log(params["B"]) - params["alpha"] * log_n_ref,
            np.log(params["C"]) - params["alpha"] * log_n_ref,
            params["alpha"],
            params["beta"],
        ]
    return np.clip(p, *np.array(bounds).T)


def design_arrays(runs, form, log_n_ref):
    log_n = np.log(runs["n_params"].to_numpy(float))
    z = log_n - log_n_ref
    return law_design(z, x_of_s(runs["sparsity"].to_numpy(float), form)), np.log(runs["val_loss"].to_numpy(float))


@one_blas_thread
def fit_law(
    runs,
    form: str = "paper",
    *,
    n_starts: int | None = None,
    warm: dict | None = None,
    delta: float = DELTA,
    maxiter: int = 2000,
    log_n_ref: float | None = None,
) -> dict:
    """Fit L(N, S) to finished runs (columns n_params, sparsity, val_loss) by multi-start L-BFGS-B.

    n_starts: keep only the n best grid points by starting objective (None: the whole grid, 432 starts);
    warm: constants (E, B, C, alpha, beta) to start from as well, e.g. another form's fit.
    Returns params (E, B, C, alpha, beta in the units of n_params), objective, n_starts, n_converged
    (starts that L-BFGS-B declared converged within 1e-6 of the best objective), converged, on_bound,
    warnings, and the internal vector `p` with its `log_n_ref` (for warm starts).
    """
    _check_form(form)
    runs, _ = validate_runs(runs)
    check_design(runs, "fit_law")
    if log_n_ref is None:
        log_n_ref = float(np.log(runs["n_params"].to_numpy(float)).mean())
    F, log_y = design_arrays(runs, form, log_n_ref)
    bounds = param_bounds(log_y)
    starts = screen_starts(init_grid(log_y), F, log_y, n_starts, delta)
    if warm is not None:
        starts = np.vstack([to_internal(warm, log_n_ref, bounds), starts])
    p, fun, n_conv, message = minimise(F, log_y, starts, bounds, delta, maxiter)
    params = to_params(p, log_n_ref)
    on_bound = [name for name, v, (lo, hi) in zip(PARAM_NAMES, p, bounds) if min(v - lo, hi - v) <= 1e-6 * (hi - lo)]
    warnings = []
    if not n_conv:
        warnings.append(
            f"{form} fit did not converge: no L-BFGS-B start declared convergence at the best objective {fun:.3g} ({message}); do not trust these constants"
        )
    for name in on_bound:
        warnings.append(
            f"{name} = {params[name]:.3g} sits on a bound of the fit: the data do not constrain it; its interval is unreliable"
        )
    if runs["n_params"].nunique() < 3:
        warnings.append("only 2 model sizes: alpha and E are weakly determined; add a third size")
    return {
        "form": form,
        "params": params,
        "objective": fun,
        "n_starts": len(starts),
        "n_converged": n_conv,
        "converged": n_conv > 0,
        "on_bound": on_bound,
        "warnings": warnings,
        "p": p,
        "log_n_ref": log_n_ref,
    }


@one_blas_thread
def fit_dense_per_s(runs, delta: float = DELTA) -> dict:
    """The dense Chinchilla baseline E + A / N^alpha fitted separately at each sparsity (>= 3 sizes each)."""
    runs, _ = validate_runs(runs)
    rows, objective, k, skipped = [], 0.0, 0, []
    for s, grp in runs.groupby("sparsity"):
        if grp["n_params"].nunique() < 3:
            skipped.append(float(s))
            continue
        log_n = np.log(grp["n_params"].to_numpy(float))
        log_n_ref = float(log_n.mean())
        F, log_y = dense_design(log_n - log_n_ref), np.log(grp["val_loss"].to_numpy(float))
        lo, hi = float(np.exp(log_y.min())), float(log_y.max())
        starts = np.array(
            [
                [np.log(e * lo), np.log(a * lo), al]
                for e, a, al in itertools.product([0.3, 0.6, 0.9], [0.05, 0.3, 1.0], [0.05, 0.1, 0.2, 0.4, 0.8])
            ]
        )
        starts = screen_starts(starts, F, log_y, 12, delta)  # the 12 best of 45 by starting objective
        q, fun, _, _ = minimise(F, log_y, starts, [(-10.0, hi + 1.0), (-30.0, hi + 5.0), (0.0, 2.0)], delta)
        rows.append(
            {"sparsity": float(s), "E": float(np.exp(q[0])), "A": float(np.exp(q[1] + q[2] * log_n_ref)), "alpha": float(q[2])}
        )
        objective, k = objective + fun, k + 3
    return {"fits": rows, "objective": objective, "n_params_fitted": k, "skipped_sparsities": skipped}


# ----------------------------------------------------------------------------------------------------
# Optimal sparsity

_S_GRID = np.unique(np.concatenate([np.linspace(0.0, 0.999, 1000), 1.0 - np.logspace(-3, -9, 121)]))


def _log_cost(params, s, form):
    """log of A(S) (1-S)^alpha; stays finite where exp(beta/(1-S)) would overflow."""
    with np.errstate(divide="ignore"):
        log_a = np.logaddexp(np.log(params["B"]), np.log(params["C"]) + params["beta"] * x_of_s(s, form))
        return log_a + params["alpha"] * np.log1p(-np.asarray(s, dtype=float))


def _check_params(params: dict) -> dict:
    """Constants as floats; E is optional (S* does not depend on it)."""
    absent = [k for k in PARAM_NAMES[1:] if params.get(k) is None]
    if absent:
        raise UserError(
            f"law constants lack {', '.join(absent)}: give all of {', '.join(PARAM_NAMES[1:])} (and E to predict a loss)"
        )
    params = {k: float(params[k]) for k in PARAM_NAMES if params.get(k) is not None}
    for k in ("B", "C", "alpha"):
        if not params[k] >= 0 or not np.isfinite(params[k]):
            raise UserError(f"{k} must be a finite number >= 0: got {params[k]!r}")
    if not np.isfinite(params["beta"]) or params["B"] + params["C"] <= 0:
        raise UserError(f"beta must be finite and B + C > 0: got beta={params['beta']!r}, B={params['B']!r}, C={params['C']!r}")
    return params


def optimal_sparsity(params: dict, form: str = "paper") -> dict:
    """S* = argmin over [0, 1) of A(S) (1-S)^alpha, and N/N_a = 1/(1-S*).

    A dense grid (finer towards S = 1) brackets the global minimum, then a bounded Brent search refines it
    to 1e-10. If the cost still falls at S = 1 - 1e-9 there is no finite optimum: s_star = 1, interior False.
    """
    _check_form(form)
    params = _check_params(params)
    cost = _log_cost(params, _S_GRID, form)
    i = int(np.argmin(cost))
    note = None
    if i == len(_S_GRID) - 1:
        s_star, note = 1.0, "A(S)(1-S)^alpha decreases all the way to S = 1: no finite optimum (beta <= 0 or C = 0?)"
    else:
        lo, hi = _S_GRID[max(i - 1, 0)], _S_GRID[i + 1]
        res = minimize_scalar(
            lambda s: float(_log_cost(params, s, form)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
        )
        s_star = float(res.x) if res.fun < cost[i] else float(_S_GRID[i])
        if i == 0 and _log_cost(params, 0.0, form) <= _log_cost(params, s_star, form):
            s_star, note = 0.0, "the cost rises from S = 0: dense is inference-optimal"
    factor = float(np.exp(_log_cost(params, s_star, form))) if s_star < 1 else 0.0
    return {
        "s_star": s_star,
        "n_over_na": 1.0 / (1.0 - s_star) if s_star < 1 else float("inf"),
        "inference_cost_factor": factor,
        "inference_cost_factor_dense": float(np.exp(_log_cost(params, 0.0, form))),
        "interior": 0.0 < s_star < 1.0,
        "note": note,
    }


def best_config_for_budget(params: dict, n_active: float, form: str = "paper") -> dict:
    """For a fixed activated-parameter budget N_a: the best (N, S) and its predicted loss (needs E)."""
    params = _check_params(params)
    if not np.isfinite(params.get("E", np.nan)):
        raise UserError("E is needed to predict a loss: give --E")
    if not (n_active > 0 and np.isfinite(n_active)):
        raise UserError(f"n_active must be > 0: got {n_active!r}")
    opt = optimal_sparsity(params, form)
    s = opt["s_star"]
    return {
        "n_active": float(n_active),
        "sparsity": s,
        "n_params": n_active * opt["n_over_na"],
        "predicted_loss": params["E"] + opt["inference_cost_factor"] / n_active ** params["alpha"],
        "dense_loss": float(law(params, n_active, 0.0, form)),
        "note": opt["note"],
    }


def paper_constants_check(form: str = "paper") -> dict:
    """S* of the printed constants, next to the stated 45.58%, and the range their rounding admits."""
    opt = optimal_sparsity(PAPER_CONSTANTS, form)
    # Each printed constant is exact to +-0.005; S* is monotone in each of B, C, alpha, beta, so the
    # extremes over the rounding box sit at its 16 corners (E does not enter S*).
    corners = [
        optimal_sparsity(dict(PAPER_CONSTANTS, B=0.01 + b, C=1.89 + c, alpha=0.10 + a, beta=0.05 + bb), form)["s_star"]
        for b, c, a, bb in itertools.product((-0.005, 0.005), repeat=4)
    ]
    lo, hi = min(corners), max(corners)
    return {
        "params": dict(PAPER_CONSTANTS),
        "form": form,
        "s_star": opt["s_star"],
        "n_over_na": opt["n_over_na"],
        "paper_stated_s_star": PAPER_S_STAR["fp"],
        "rounding_range": [lo, hi],
        "note": (
            f"The printed constants give S* = {opt['s_star']:.1%}, not the stated {PAPER_S_STAR['fp']:.2%}: they are rounded to "
            f"two decimals and S* ~ 1 - beta/alpha is sensitive to that rounding; any S* in {lo:.1%}-{hi:.1%} is consistent with them."
        ),
    }
