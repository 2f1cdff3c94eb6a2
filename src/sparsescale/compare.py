"""`sparsescale compare-fits`: S* of two independent fits side by side, and their difference with an interval.

The question it answers is the one a second design asks: does S* move when the token budget D (or the
precision, or the grid) changes? Each fit_{precision}.json keeps the S* of every bootstrap resample
(`bootstrap.s_star_samples`); the two fits' resamples are independent, so pairing them by index draws from the
distribution of the difference. Pairs where either resample has no finite optimum (S* = 1 or missing) are
left out and counted, never folded into the interval.

`compare_fits(a, b)` is also what optimal_sparsity.json's S*(1.58) - S*(fp) is made of (`fit.compare_precisions`).

CLI: `sparsescale compare-fits results/reference/cpu4m/fit/fit_fp.json results/reference/cpu16m/fit/fit_fp.json
--out compare.json` prints both S* with their design (D, sizes, sparsities) and S*(B) - S*(A).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sparsescale.errors import UserError
from sparsescale.io import dumps_json, read_json, write_json


def s_star_samples(fit: dict) -> np.ndarray:
    """The S* of every bootstrap resample of a fit (NaN where the resample failed)."""
    return np.array([np.nan if v is None else v for v in fit["bootstrap"].get("s_star_samples", [])], float)


def compare_fits(a: dict, b: dict) -> dict | None:
    """S*(b) - S*(a): the point estimate, the interval of the paired differences (resamples paired by index, both
    with a finite optimum, at a's bootstrap level), the share of pairs where b is sparser and how many pairs
    there were. None when either fit kept no resamples."""
    x, y = s_star_samples(a), s_star_samples(b)
    m = min(len(x), len(y))
    if not m:
        return None
    x, y = x[:m], y[:m]
    ok = np.isfinite(x) & np.isfinite(y) & (x < 1) & (y < 1)
    level = a["bootstrap"]["level"]
    d = y[ok] - x[ok]
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {
        "difference": b["s_star"] - a["s_star"],
        "difference_ci": [float(v) for v in np.percentile(d, q)] if len(d) else [None, None],
        "share_b_sparser": float((d > 0).mean()) if len(d) else None,
        "n_pairs": int(ok.sum()),
        "level": level,
    }


def _design(fit: dict) -> dict:
    d = fit.get("design") or {}
    tokens = (d.get("tokens") or {}).get("values")
    return {
        "precision": fit.get("precision"),
        "s_star": fit["s_star"],
        "s_star_ci": fit.get("s_star_ci"),
        "tokens": tokens[0] if tokens and len(tokens) == 1 else tokens,
        "sizes": fit.get("sizes"),
        "sparsities": fit.get("sparsities"),
        "n_runs": fit.get("n_runs"),
        "trustworthy": fit.get("trustworthy"),
        "flags": fit.get("flags"),
        "max_shift_size": (fit.get("stability") or {}).get("max_shift_size"),
        "max_shift_sparsity": (fit.get("stability") or {}).get("max_shift_sparsity"),
    }


def _load_fit(path: str) -> dict:
    try:
        fit = read_json(path)
    except FileNotFoundError:
        raise UserError(f"fit file not found: {path} (make it with `sparsescale fit runs.csv --out DIR`)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON ({err}); pass a fit_{{precision}}.json written by `sparsescale fit`") from None
    if not isinstance(fit, dict) or "s_star" not in fit or "bootstrap" not in fit:
        raise UserError(f"{path} is not a fit file (no `s_star` and `bootstrap`); pass a fit_{{precision}}.json "
                        f"written by `sparsescale fit`, not optimal_sparsity.json")
    if not fit["bootstrap"].get("s_star_samples"):
        raise UserError(f"{path} keeps no bootstrap S* samples (`bootstrap.s_star_samples`); refit it with "
                        f"`sparsescale fit ... --bootstrap 1000`")
    return fit


def cli_compare_fits(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="sparsescale compare-fits",
        description="S* of two fits (e.g. two token budgets) with their designs, and S*(B) - S*(A) with a bootstrap interval.",
    )
    ap.add_argument("a", help="fit_{precision}.json of the first fit (A)")
    ap.add_argument("b", help="fit_{precision}.json of the second fit (B)")
    ap.add_argument("--out", default=None, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    a, b = _load_fit(args.a), _load_fit(args.b)
    if a.get("form") != b.get("form"):
        raise UserError(f"the fits use different A(S) forms ({a.get('form')!r} in {args.a}, {b.get('form')!r} in "
                        f"{args.b}); refit one with `sparsescale fit --form {a.get('form')}`")
    if a["bootstrap"].get("level") != b["bootstrap"].get("level"):
        raise UserError(f"the fits' bootstrap levels differ ({a['bootstrap'].get('level')} in {args.a}, "
                        f"{b['bootstrap'].get('level')} in {args.b}); refit one at the other's level")
    diff = compare_fits(a, b)
    out = {"a": {"file": args.a, **_design(a)}, "b": {"file": args.b, **_design(b)}, "form": a.get("form"),
           "difference_b_minus_a": diff}
    if args.out:
        write_json(args.out, out)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for k in ("a", "b"):
        d = out[k]
        lo, hi = d["s_star_ci"] or (None, None)
        print(f"{k.upper()}: {d['precision']} S* = {fmt(d['s_star'])} [{fmt(lo)}, {fmt(hi)}], D = {d['tokens']}, "
              f"{len(d['sizes'] or [])} sizes, {len(d['sparsities'] or [])} sparsities, {d['n_runs']} runs ({d['file']})")
    lo, hi = diff["difference_ci"]
    if lo is None:
        print(f"S*(B) - S*(A) = {diff['difference']:+.3f}: no resample pair with a finite optimum in both, no interval")
    else:
        verdict = "B sparser" if lo > 0 else "A sparser" if hi < 0 else "not resolved"
        print(f"S*(B) - S*(A) = {diff['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({diff['level']:.0%}, {diff['n_pairs']} "
              f"pairs, B sparser in {diff['share_b_sparser']:.0%}): {verdict}")
    return 0
