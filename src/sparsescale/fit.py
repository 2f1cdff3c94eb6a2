"""`sparsescale fit`: the law fitted per precision, with its design, interval and stability, as JSON.

Features
- `fit_report(runs)`: everything fit_{precision}.json holds: constants with bootstrap intervals, S* with
  its interval over resamples that have a finite optimum and, beside it, the share that have none; the
  design the runs came from; S* refitted without each size and each sparsity; the largest size predicted
  from the others; a model comparison (paper / card form / dense law per S); `flags`, one short code per
  reason not to trust the headline (each explained in `warnings`), and `trustworthy` when there is none.
- `fit_all(runs)`: every precision of a table, side by side on the available cores.
- `optimal_sparsity_summary(reports)`: S* of both precisions, and whether S*(1.58) > S*(fp): the
  bootstrap distribution of the difference (independent resamples, paired by index), its interval and the
  share of resamples where it holds.
- runs the fit cannot use (failed, or missing n_params) are left out and named in `missing`, never fatal.

CLI: `sparsescale fit results/tables/runs.csv --out results/fit`, `sparsescale optimal-sparsity --B ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from sparsescale import diagnostics as dg
from sparsescale.compare import compare_fits
from sparsescale.errors import UserError
from sparsescale.io import dumps_json, versions, write_json
from sparsescale.scaling import (
    FORMS,
    LEVEL,
    PAPER_S_STAR,
    PARAM_NAMES,
    best_config_for_budget,
    check_design,
    fit_dense_per_s,
    fit_law,
    one_blas_thread,
    optimal_sparsity,
    paper_constants_check,
    validate_runs,
)

def flags_of(report: dict) -> tuple[list[str], list[str]]:
    """(codes, messages): every reason not to take the report's S* as a result."""
    codes, msgs = [], []

    def flag(code, msg):
        codes.append(code)
        msgs.append(msg)

    s, ci = report["s_star"], report["s_star_ci"]
    design, stab, boot = report["design"], report["stability"], report["bootstrap"]
    if s >= 1.0:
        flag("no_finite_optimum", "the fitted cost A(S)(1-S)^alpha falls all the way to S = 1: no finite S*")
    elif design["max_sparsity"] is not None and s > design["max_sparsity"]:
        flag("s_star_beyond_data",
             f"S* = {s:.3f} lies beyond the largest sparsity measured ({design['max_sparsity']:g}): an extrapolation "
             "of where the exponential wakes up; measure past it")
    for name in report["on_bound"]:
        flag(f"on_bound:{name}", f"{name} sits on a bound of the fit: the data do not constrain it")
    if None in ci:
        flag("no_interval", "no bootstrap resample has a finite optimum: S* has no interval")
    elif (ci[1] - ci[0]) / 2 > dg.NARROW_HALF_WIDTH:
        flag("wide_interval", f"the S* interval [{ci[0]:.3f}, {ci[1]:.3f}] is wider than +-{dg.NARROW_HALF_WIDTH}")
    if boot["share_no_finite_optimum"] > dg.UNDETERMINED_SHARE:
        flag("undetermined_in_resamples",
             f"{boot['share_no_finite_optimum']:.0%} of bootstrap resamples have no finite optimum (left out of the interval)")
    if stab["stable"] is False:
        flag("unstable",
             f"dropping one size moves S* by up to {stab['max_shift_size']:.3f}, one sparsity by up to "
             f"{stab['max_shift_sparsity']:.3f} (tolerance {stab['tolerance']})")
    prof = report.get("e_profile")
    if prof and prof["sensitive"]:
        lo, hi = prof["s_star_range"]
        flag("s_star_depends_on_e",
             f"S* ranges over [{lo:.3f}, {hi:.3f}] as the floor E is pinned from 0 to 0.9 x the smallest loss: the "
             "data leave E and alpha traded off, and S* follows alpha; add sizes or span more N")
    for code, msg in design["flags"].items():  # few_sizes, few_sparsities, budget_varies_with_n
        flag(code, msg)
    for code, msg in report.get("shape", {}).get("flags", {}).items():  # the data against the law's shape
        flag(code, msg)
    return codes, msgs


@one_blas_thread
def fit_report(
    runs,
    form: str = "paper",
    n_boot: int = 1000,
    seed: int = 0,
    jobs: int | None = None,
    level: float = LEVEL,
    n_starts: int | None = None,
    precision: str | None = None,
    compare: bool = True,
    multistart: int = dg.MULTISTART,
) -> dict:
    """Everything `fit_{precision}.json` holds for one precision's runs (unusable runs listed, not fitted)."""
    what = f"runs of precision {precision}" if precision else "runs"
    runs, missing = validate_runs(runs, what)
    check_design(runs, what)
    fit = fit_law(runs, form, n_starts=n_starts)
    boot = dg.bootstrap(runs, fit, n_boot, seed, jobs, level, multistart)
    opt = optimal_sparsity(fit["params"], form)
    design = dg.design_check(runs)
    stability = dg.drop_one(runs, fit, multistart)
    profile = dg.e_profile(runs, fit)
    warnings = list(fit["warnings"])
    if missing:
        names = ", ".join(str(m.get("run_id", f"n_params={m.get('n_params')}, S={m.get('sparsity')}")) for m in missing)
        warnings.append(f"{len(missing)} run(s) left out ({names}): see 'missing' for why")
    if boot["n_ok"] < 0.9 * boot["n"]:
        warnings.append(f"only {boot['n_ok']} of {boot['n']} bootstrap refits converged: intervals are less reliable")
    if opt["note"]:
        warnings.append(opt["note"])
    n_few = min(n_starts or 32, 32)  # held-out and other-form fits: the best 32 grid starts are plenty
    loso = dg.leave_one_size_out(runs, form, n_few)
    dense = fit_dense_per_s(runs)
    comparison = {}
    if compare:
        for other in FORMS:
            # paper and card are one family (C_card = C_paper e^beta): start the other form from this fit
            sign = 1.0 if other == "card" else -1.0
            warm = dict(fit["params"], C=fit["params"]["C"] * np.exp(sign * fit["params"]["beta"]))
            f_other = fit if other == form else fit_law(runs, other, n_starts=n_few, warm=warm)
            l_other = loso if other == form else dg.leave_one_size_out(runs, other, n_few)
            comparison[other] = {
                "objective": f_other["objective"],
                "aic": dg.aic(f_other["objective"], len(runs), len(PARAM_NAMES)),
                "loso_mean_abs_rel_error": l_other["mean_abs_rel_error"] if l_other else None,
            }
        comparison["dense_per_s"] = {
            "objective": dense["objective"],
            "aic": dg.aic(dense["objective"], len(runs), dense["n_params_fitted"]) if dense["fits"] else None,
            "loso_mean_abs_rel_error": dg.dense_leave_one_size_out(runs),
        }
    if dense["skipped_sparsities"]:
        warnings.append(f"dense baseline skipped sparsities {dense['skipped_sparsities']} (fewer than 3 sizes each)")
    s_ci = boot["s_star_ci"]
    report = {
        "precision": precision,
        "form": form,
        "params": fit["params"],
        "ci": boot["ci"],
        "s_star": opt["s_star"],
        "s_star_ci": s_ci,
        "n_over_na": opt["n_over_na"],
        "n_over_na_ci": [1.0 / (1.0 - v) if v is not None and v < 1 else None for v in s_ci],
        "inference_cost_factor": opt["inference_cost_factor"],
        "objective": fit["objective"],
        "n_starts": fit["n_starts"],
        "n_converged": fit["n_converged"],
        "converged": fit["converged"],
        "on_bound": fit["on_bound"],
        "n_runs": len(runs),
        "n_sizes": design["n_sizes"],
        "sizes": sorted(runs["n_params"].unique().tolist()),
        "sparsities": sorted(runs["sparsity"].unique().tolist()),
        "design": design,
        "shape": dg.shape_check(runs),
        "bootstrap": {k: boot[k] for k in ("method", "n", "n_ok", "seed", "level", "multistart",
                                           "share_no_finite_optimum", "share_dense_optimal")}
        | {"s_star_samples": [float(v) if v == v else None for v in boot["samples"][:, -1]],
           "ok": [bool(v) for v in boot["samples"][:, 0]]},
        "stability": stability,
        "e_profile": profile,
        "loso": loso,
        "comparison": comparison,
        "dense_baseline": dense["fits"],
        "missing": missing,
    }
    report["flags"], flag_msgs = flags_of(report)
    report["trustworthy"] = not report["flags"]
    report["warnings"] = warnings + [m for m in flag_msgs if m not in warnings]
    report["versions"] = versions()
    return report


def normalise_precisions(runs):
    """(runs with precision as the strings fp / 1.58, notes): "1.58" may have been read as the float 1.58."""
    if "precision" not in runs.columns:
        return runs.assign(precision="fp"), ["no precision column: all runs taken as full precision (fp)"]
    return runs.assign(precision=[p if isinstance(p, str) or p != p else f"{p:g}" for p in runs["precision"]]), []


def fit_all(runs, form: str = "paper", n_boot: int = 1000, seed: int = 0, jobs: int | None = None,
            level: float = LEVEL, precision: str | None = None, n_starts: int | None = None,
            multistart: int = dg.MULTISTART) -> dict:
    """fit_report for each precision in the table (or just `precision`); -> {precision: report}."""
    runs = runs if isinstance(runs, pd.DataFrame) else pd.DataFrame(runs)
    if "precision" in runs.columns and runs["precision"].isna().any():
        raise UserError("runs: column precision has missing values: set each run's precision to fp or 1.58")
    runs, notes = normalise_precisions(runs)
    present = sorted(runs["precision"].unique())
    if precision is not None:
        if precision not in present:
            raise UserError(f"no runs with precision {precision!r}: the table has {', '.join(present) or 'none'}")
        present = [precision]
    jobs = dg.jobs_or_cores(jobs)
    share = [max(1, jobs // len(present) + (i < jobs % len(present))) for i in range(len(present))]  # all cores used
    args = [(runs[runs["precision"] == p], form, n_boot, seed, share[i], level, n_starts, p, multistart)
            for i, p in enumerate(present)]
    if jobs > 1 and len(present) > 1:  # the precisions side by side, each with its share of the cores
        with ProcessPoolExecutor(max_workers=min(jobs, len(present))) as pool:
            reports = list(pool.map(_fit_report_args, args))
    else:
        reports = [_fit_report_args(a) for a in args]
    out = {}
    for p, rep in zip(present, reports):
        out[p] = rep
        out[p]["warnings"] = notes + out[p]["warnings"]
    return out


def _fit_report_args(a):
    runs, form, n_boot, seed, jobs, level, n_starts, precision, multistart = a
    return fit_report(runs, form, n_boot, seed, jobs, level, n_starts, precision=precision, multistart=multistart)


def compare_precisions(fp: dict, b158: dict) -> dict | None:
    """S*(1.58) - S*(fp): point estimate, bootstrap interval (resamples of the two independent fits paired by
    index, both with a finite optimum) and the share of pairs where 1.58-bit is sparser (compare.compare_fits)."""
    d = compare_fits(fp, b158)
    if d is None:
        return None
    return {"difference": d["difference"], "difference_ci": d["difference_ci"],
            "share_1.58_sparser": d["share_b_sparser"], "n_pairs": d["n_pairs"]}


def optimal_sparsity_summary(reports: dict, form: str = "paper") -> dict:
    """Both precisions' S* with intervals, whether 1.58-bit's S* is higher, and the paper-constants check."""
    keys = ("s_star", "s_star_ci", "n_over_na", "n_over_na_ci", "trustworthy", "flags")
    per = {p: {k: r.get(k) for k in keys} | {"share_no_finite_optimum": r["bootstrap"].get("share_no_finite_optimum")}
           for p, r in reports.items()}
    separate, statement, diff = None, "only one precision fitted: nothing to compare", None
    if "fp" in per and "1.58" in per:
        (a_lo, a_hi), (b_lo, b_hi) = per["fp"]["s_star_ci"], per["1.58"]["s_star_ci"]
        diff = compare_precisions(reports["fp"], reports["1.58"])
        if None not in (a_lo, a_hi, b_lo, b_hi):
            separate = bool(a_hi < b_lo or b_hi < a_lo)
            level = reports["fp"]["bootstrap"]["level"]
            desc = f"fp {per['fp']['s_star']:.3f} [{a_lo:.3f}, {a_hi:.3f}] vs 1.58 {per['1.58']['s_star']:.3f} [{b_lo:.3f}, {b_hi:.3f}]"
            statement = (
                f"the {level:.0%} intervals of S* separate ({desc})"
                if separate
                else f"the {level:.0%} intervals of S* overlap ({desc}): the data do not distinguish the two"
            )
            if diff and None not in diff["difference_ci"]:
                lo, hi = diff["difference_ci"]
                verdict = ("holds" if lo > 0 else "is reversed" if hi < 0 else "is not resolved")
                statement += (f"; S*(1.58) - S*(fp) = {diff['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]: the paper's finding "
                              f"S*(1.58) > S*(fp) {verdict} at this scale")
        else:
            statement = "an S* interval is missing (no bootstrap resample has a finite optimum): cannot compare"
    return {
        "form": form,
        "precisions": per,
        "separate": separate,
        "difference_1.58_minus_fp": diff,
        "statement": statement,
        "paper_constants": paper_constants_check("paper"),
        "paper_stated_s_star": dict(PAPER_S_STAR),
        "versions": versions(),
    }


# ----------------------------------------------------------------------------------------------------
# CLI


def cli_fit(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="sparsescale fit",
        description="Fit L(N,S) per precision with bootstrap intervals, drop-one stability and design checks; "
                    "write fit_{precision}.json and optimal_sparsity.json.",
    )
    ap.add_argument("runs", help="runs table (CSV) with columns n_params, sparsity, val_loss, precision (fp/1.58), optionally seed, tokens")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--form", default="paper", choices=FORMS, help="A(S) form (default: paper)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    ap.add_argument("--multistart", type=int, default=dg.MULTISTART,
                    help=f"grid starts of every bootstrap and drop-one refit, besides the full-data optimum (default {dg.MULTISTART})")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes: the precisions side by side, each bootstrapping on its share (default: all cores)")
    ap.add_argument("--precision", default=None, help="fit only this precision (fp or 1.58)")
    ap.add_argument("--starts", type=int, default=64,
                    help="L-BFGS-B starts of the main fit: the best of the 432-point grid by starting objective (default 64; 0 = all)")
    ap.add_argument("--mode", default="scratch",
                    help="fit only runs of this training mode when the table has a `mode` column (default: scratch; "
                         "continue/finetune runs start from a trained model and do not follow the law)")
    args = ap.parse_args(argv)
    try:
        runs = pd.read_csv(args.runs, dtype={"precision": str})
    except FileNotFoundError:
        raise UserError(f"runs table not found: {args.runs} (make it with `sparsescale aggregate`)") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read runs table {args.runs}: {err}") from None
    if "mode" in runs.columns:
        if not (runs["mode"] == args.mode).any():
            raise UserError(f"{args.runs} has no runs with mode={args.mode!r} (modes: {sorted(runs['mode'].dropna().unique())})")
        runs = runs[runs["mode"] == args.mode]
    reports = fit_all(runs, args.form, args.bootstrap, args.seed, args.jobs, precision=args.precision,
                      n_starts=args.starts or None, multistart=args.multistart)
    summary = optimal_sparsity_summary(reports, args.form)
    for p, rep in reports.items():  # all files written after every fit succeeded: no partial output
        write_json(os.path.join(args.out, f"fit_{p}.json"), rep)
    write_json(os.path.join(args.out, "optimal_sparsity.json"), summary)
    for p, rep in reports.items():
        for w in rep["design"]["warnings"]:
            print(f"WARNING [{p}] design: {w}", file=sys.stderr)
        for w in rep["warnings"]:
            print(f"warning [{p}]: {w}", file=sys.stderr)
        ci, st, b = rep["s_star_ci"], rep["stability"], rep["bootstrap"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(
            f"{p}: S* = {rep['s_star']:.3f} [{fmt(ci[0])}, {fmt(ci[1])}] ({b['share_no_finite_optimum']:.0%} of resamples without "
            f"a finite optimum), drop one size/sparsity: max shift {fmt(st['max_shift_size'])}/{fmt(st['max_shift_sparsity'])}, "
            f"{rep['n_runs']} runs, {b['n_ok']}/{b['n']} refits converged ({b['method']} bootstrap); "
            + ("no flags" if rep["trustworthy"] else "flags: " + ", ".join(rep["flags"]))
        )
    print(summary["statement"])
    return 0


def cli_optimal_sparsity(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="sparsescale optimal-sparsity", description="S* = argmin_S A(S)(1-S)^alpha and N/N_a for given law constants."
    )
    for name in PARAM_NAMES:
        ap.add_argument(f"--{name}", type=float, required=name != "E",
                        help=f"law constant {name}" + (" (only needed with --n-active)" if name == "E" else ""))
    ap.add_argument("--form", default="paper", choices=FORMS)
    ap.add_argument("--n-active", type=float, default=None, help="also give the best (N, S) and loss for this activated-parameter budget")
    args = ap.parse_args(argv)
    params = {k: getattr(args, k) for k in PARAM_NAMES}
    out = {"form": args.form, "params": params, **optimal_sparsity(params, args.form)}
    if args.n_active is not None:
        out["budget"] = best_config_for_budget(params, args.n_active, args.form)
    print(dumps_json(out), end="")
    return 0

