"""Benchmark of the scaling-law fit: one full multi-start fit plus a bootstrap of a 60-run table.

Notable features:
- synthetic runs from known constants (6 sizes x 5 sparsities x 2 seeds, 1% multiplicative noise), so the
  benchmark needs no training and also prints how far the fit lands from the truth;
- times the full fit, the bootstrap and the per-resample cost (wall and CPU-seconds per resample), the
  numbers the <= 30 s goal (fit + 1000 resamples on 2 cores) is judged by.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from sparsescale import diagnostics, scaling

# Well-identified constants (sharp minimum of A(S)(1-S)^alpha): the same ones the tests recover.
TRUE = {"E": 1.0, "B": 100.0, "C": 470.0, "alpha": 0.5, "beta": 0.25}
SIZES = np.logspace(5, 8, 6)  # n_params
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8)


def synthetic_runs(params=TRUE, form="paper", sizes=SIZES, sparsities=SPARSITIES, seeds=2, noise=0.01, rng_seed=0):
    """A runs table (n_params, sparsity, seed, precision, val_loss) from the law with multiplicative noise."""
    rng = np.random.default_rng(rng_seed)
    n, s, seed = (
        a.ravel() for a in np.meshgrid(np.asarray(sizes, float), np.asarray(sparsities, float), np.arange(seeds), indexing="ij")
    )
    loss = scaling.law(params, n, s, form) * np.exp(noise * rng.standard_normal(n.size))
    return pd.DataFrame({"n_params": n, "sparsity": s, "seed": seed, "precision": "fp", "val_loss": loss})


def bench_fit(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale bench fit", description="time fit_law + bootstrap on a synthetic 60-run table")
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: 1000)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--form", default="paper", choices=scaling.FORMS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--starts", type=int, default=64, help="L-BFGS-B starts, as `sparsescale fit` (0 = all 432)")
    ap.add_argument("--multistart", type=int, default=diagnostics.MULTISTART, help="grid starts per bootstrap refit, as `sparsescale fit`")
    args = ap.parse_args(argv)
    jobs = diagnostics.jobs_or_cores(args.jobs)
    runs = synthetic_runs(form=args.form, rng_seed=args.seed)

    t0, c0 = time.perf_counter(), time.process_time()
    fit = scaling.fit_law(runs, args.form, n_starts=args.starts or None)
    t1, c1 = time.perf_counter(), time.process_time()
    boot = diagnostics.bootstrap(runs, fit, args.bootstrap, args.seed, jobs, multistart=args.multistart)
    t2 = time.perf_counter()
    # CPU seconds of this process and the (reaped) workers: wall time on a busy shared machine misleads
    boot_cpu = os.times().children_user + os.times().children_system + time.process_time() - c1

    s_true = scaling.optimal_sparsity(TRUE, args.form)["s_star"]
    s_fit = scaling.optimal_sparsity(fit["params"], args.form)["s_star"]
    print(f"table: {len(runs)} runs ({len(SIZES)} sizes x {len(SPARSITIES)} sparsities x 2 seeds), form {args.form}, jobs {jobs}")
    print(f"fit:       {t1 - t0:7.2f} s wall, {c1 - c0:6.2f} s CPU  ({fit['n_starts']} starts, {fit['n_converged']} converged)")
    print(f"bootstrap: {t2 - t1:7.2f} s wall, {boot_cpu:6.2f} s CPU  ({boot['n']} resamples, {boot['n_ok']} converged)")
    print(f"per resample: {(t2 - t1) / boot['n'] * 1e3:.1f} ms wall, {boot_cpu / boot['n'] * 1e3:.1f} ms CPU")
    print(f"total:     {t2 - t0:7.2f} s wall  (goal <= 30 s on 2 cores; idle-machine estimate {c1 - c0 + boot_cpu / jobs:.1f} s)")
    print(
        "recovered: "
        + ", ".join(
            f"{k} {fit['params'][k]:.4g} [{boot['ci'][k][0]:.4g}, {boot['ci'][k][1]:.4g}] (true {TRUE[k]:g})"
            for k in scaling.PARAM_NAMES
        )
    )
    print(f"S*: {s_fit:.4f} [{boot['s_star_ci'][0]:.4f}, {boot['s_star_ci'][1]:.4f}] (true {s_true:.4f})")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(bench_fit(sys.argv[1:]))
