"""Readers of the result files, and the labels and formats that figures and tables share.

Figures and tables are made only from result files (`results/tables/runs.csv`, `curves.csv` and the fit JSONs
in `results/fit/`), never from logs; this file is the one place that reads them.

Features
- `read_runs`, `read_curves`, `read_fits`, `read_optimal`, `load_results` -> `Results`: validated frames
  (required columns, "1.58" kept a string, optional columns filled, rows sorted for byte-stable output) and
  fit JSONs; a missing input is one `UserError` naming the command that makes it;
- pure helpers on fit JSONs (`interval`, `s_star_of`, `paper_value`, `paper_constants_s_star`);
- shared labels and formats (`PRECISION_LABEL`, `PROJECTION_LABEL`, `fmt_n`, `fmt_pct`, `fmt_ci`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparsescale.config import PRECISIONS
from sparsescale.errors import UserError
from sparsescale.io import read_json
from sparsescale.scaling import PAPER_CONSTANTS, PAPER_S_STAR, PARAM_NAMES, optimal_sparsity

PRECISION_LABEL = {"fp": "full precision", "1.58": "1.58-bit"}
MODES = ("scratch", "continue", "finetune")
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # columns sparsity_measured_<p> of runs.csv
PROJECTION_LABEL = {"qkv": "QKV", "o": "Out", "gate_up": "Gate/Up", "down": "Down"}
# Columns without which no table or figure can be made; the rest are optional (NaN when absent).
REQUIRED_RUN_COLUMNS = ("run_id", "size", "n_params", "sparsity", "precision", "seed", "val_loss")
OPTIONAL_RUN_COLUMNS = ("mode", "n_active", "sparsity_measured") + tuple(f"sparsity_measured_{p}" for p in PROJECTIONS)
REQUIRED_CURVE_COLUMNS = ("run_id", "n_params", "size", "sparsity", "precision", "seed", "tokens", "train_loss", "val_loss")
# Read as text: "1.58" must stay the string "1.58", never the float 1.58.
_TEXT_COLUMNS = {"run_id": str, "size": str, "mode": str, "precision": str, "device": str}
# The paper states S* and N/N_a = 1/(1 - S*) (1.84 and 2.58); no 1.58-bit constants were published.
PAPER_N_OVER_NA = {p: 1.0 / (1.0 - s) for p, s in PAPER_S_STAR.items()}
MISSING = "—"


# ----------------------------------------------------------------------------------------------------------
# Reading the result files (shared with plots.py)


def _need(path: Path, what: str, how: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; make it with `{how}` (or pass its path)")
    return path


def _read_csv(path: Path, required: tuple[str, ...], what: str, how: str) -> pd.DataFrame:
    _need(path, what, how)
    try:
        df = pd.read_csv(path, dtype=_TEXT_COLUMNS, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{what} is empty: {path}; rerun `{how}`") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{what} {path} lacks column(s) {', '.join(missing)}; rerun `{how}` to rewrite it")
    bad = sorted(set(df["precision"].dropna()) - set(PRECISIONS))
    if bad:
        raise UserError(f"unknown precision {bad[0]!r} in {path}: use one of {', '.join(PRECISIONS)}")
    return df


def read_runs(path: str | Path) -> pd.DataFrame:
    """runs.csv with the optional columns filled (mode 'scratch', NaN), sorted for determinism."""
    df = _read_csv(Path(path), REQUIRED_RUN_COLUMNS, "runs table", "sparsescale aggregate")
    for col in OPTIONAL_RUN_COLUMNS:
        if col not in df.columns:
            df[col] = "scratch" if col == "mode" else np.nan
    df["mode"] = df["mode"].fillna("scratch")
    df["val_loss"] = pd.to_numeric(df["val_loss"], errors="coerce")  # failed runs: empty -> NaN
    return df.sort_values(["precision", "mode", "n_params", "sparsity", "seed", "run_id"], kind="mergesort").reset_index(drop=True)


def read_curves(path: str | Path) -> pd.DataFrame:
    df = _read_csv(Path(path), REQUIRED_CURVE_COLUMNS, "training curves table", "sparsescale aggregate")
    return df.sort_values(["precision", "n_params", "sparsity", "seed", "tokens"], kind="mergesort").reset_index(drop=True)


def read_fits(fit_dir: str | Path) -> dict[str, dict | None]:
    """{precision: fit JSON or None}. At least one fit must exist; a fit without usable constants counts as none."""
    fit_dir = Path(fit_dir)
    fits: dict[str, dict | None] = {}
    for prec in PRECISIONS:
        path = fit_dir / f"fit_{prec}.json"
        fit = read_json(path) if path.is_file() else None
        params = (fit or {}).get("params") or {}
        usable = all(isinstance(params.get(k), (int, float)) for k in PARAM_NAMES)
        fits[prec] = fit if usable else None
    if not any(fits.values()):
        raise UserError(
            f"no fit results in {fit_dir} (expected fit_fp.json and/or fit_1.58.json with constants {', '.join(PARAM_NAMES)}); "
            f"make them with `sparsescale fit` (or pass --fit-dir)"
        )
    return fits


def read_optimal(fit_dir: str | Path) -> dict:
    """optimal_sparsity.json if present, else {} (it is optional: the per-precision fit JSONs come first)."""
    path = Path(fit_dir) / "optimal_sparsity.json"
    try:
        out = read_json(path)
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


@dataclass
class Results:
    """Everything figures and tables are made from."""

    runs: pd.DataFrame
    fits: dict[str, dict | None]
    optimal: dict = field(default_factory=dict)
    curves: pd.DataFrame | None = None


def load_results(runs: str | Path, fit_dir: str | Path, curves: str | Path | None = None) -> Results:
    return Results(
        runs=read_runs(runs), fits=read_fits(fit_dir), optimal=read_optimal(fit_dir),
        curves=None if curves is None else read_curves(curves),
    )


# ----------------------------------------------------------------------------------------------------------
# Small pure helpers


def finite(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(float(x))


def interval(fit: dict | None, key: str) -> tuple[float, float] | None:
    """A [lo, hi] interval from a fit JSON, or None where absent/null."""
    if not fit:
        return None
    ci = fit.get("ci", {}).get(key) if key in PARAM_NAMES else fit.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


def optimal_s(params: dict, form: str = "paper") -> float:
    """S* = argmin_S A(S)(1-S)^alpha (`scaling.optimal_sparsity`), for fit JSONs that lack `s_star`."""
    return float(optimal_sparsity(params, form)["s_star"])


def s_star_of(fit: dict) -> float:
    return float(fit["s_star"]) if finite(fit.get("s_star")) else optimal_s(fit["params"], fit.get("form", "paper"))


def paper_constants_s_star() -> float:
    """S* that the paper's printed (rounded) constants give: about 0.502, not the stated 0.4558."""
    return optimal_s(PAPER_CONSTANTS, "paper")


def paper_value(key: str, precision: str, form: str = "paper") -> float | None:
    """The paper's value of a constant in the fit's own form (card form: C_card = C * e^beta)."""
    if precision != "fp":  # no 1.58-bit constants were published
        return None
    if key == "C" and form == "card":
        return PAPER_CONSTANTS["C"] * math.exp(PAPER_CONSTANTS["beta"])
    return PAPER_CONSTANTS[key]


def fmt_num(x) -> str:
    if not finite(x):
        return MISSING
    x = float(x)
    return f"{x:.3e}" if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3) else f"{x:.4g}"


def fmt_pct(x, digits: int = 2) -> str:
    return f"{100.0 * float(x):.{digits}f}%" if finite(x) else MISSING


def fmt_ci(ci, fmt=fmt_num) -> str:
    return MISSING if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_n(n) -> str:
    """Parameter count in short form: 950k, 1.2M, 3.4B."""
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def fmt_s(s) -> str:
    return f"S={100.0 * float(s):g}%"
