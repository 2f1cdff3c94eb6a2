"""Paper tables from result files: Markdown (README/report), LaTeX with booktabs (papers), CSV (machines).

Notable features:
- made only from `results/tables/runs.csv` and the fit JSONs in `results/fit/` (never from logs), read by
  `sparsescale.results`;
- five tables: fitted constants with 95% intervals next to the paper's values (incl. the S* that the
  paper's own rounded constants give), the loss of every (N, S) cell per precision with the gap to the
  dense model in %, sparse against dense at equal activated parameters (no law: `matched_active`), the
  measured sparsity per projection (the paper's Table 2 layout), and the diagnostics of S* (design,
  interval, drop-one-size / drop-one-sparsity refits, flags);
- byte-identical on rerun: rows sorted, fixed float formats, no timestamps, '\\n' line ends;
- all writes atomic (`sparsescale.io`); missing inputs raise `UserError` naming the command that makes them.

CLI: `sparsescale tables --runs results/tables/runs.csv --fit-dir results/fit --out results/tables`.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparsescale.config import PRECISIONS
from sparsescale.io import atomic_write_text
from sparsescale.results import (
    MISSING, MODES, PAPER_N_OVER_NA, PRECISION_LABEL, PROJECTION_LABEL, PROJECTIONS, Results, finite, fmt_ci, fmt_n,
    fmt_num, fmt_pct, fmt_s, interval, load_results, paper_constants_s_star, paper_value, s_star_of,
)
from sparsescale.scaling import PAPER_CONSTANTS, PAPER_S_STAR, PARAM_NAMES

# ----------------------------------------------------------------------------------------------------------
# Table container and the three renderers


@dataclass
class Table:
    """Display cells for Markdown/LaTeX plus a tidy numeric frame for CSV."""

    name: str
    header: list[str]  # Markdown header; LaTeX gets the same text escaped
    rows: list[list[str]]
    data: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    tex_first: list[str] | None = None  # LaTeX first-column cells (already LaTeX), e.g. "$\\alpha$" for "α"
    groups: list[int] = field(default_factory=list)  # row indices before which LaTeX draws a \midrule


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def to_markdown(t: Table) -> str:
    lines = [_md_row(t.header), "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(t.header))) + "|"]
    lines += [_md_row(r) for r in t.rows]
    if t.notes:
        lines += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", MISSING: "--"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); notes become LaTeX comments below it."""
    head = [tex_escape(h) for h in t.header]
    lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    for i, r in enumerate(t.rows):
        if i in t.groups and i > 0:
            lines.append(r"\midrule")
        first = t.tex_first[i] if t.tex_first else tex_escape(r[0])
        lines.append(" & ".join([first] + [tex_escape(c) for c in r[1:]]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    t.data.to_csv(buf, index=False, lineterminator="\n", float_format="%.12g")
    return buf.getvalue()


def write_table(t: Table, out_dir: str | Path) -> list[Path]:
    """Write `{name}.md`, `{name}.tex`, `{name}.csv` atomically; return the paths."""
    out_dir = Path(out_dir)
    paths = []
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
        path = out_dir / f"{t.name}.{ext}"
        atomic_write_text(path, render(t))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Table 1: fitted constants, S*, N/N_a, with the paper's values beside them

_CONST_ROWS = (  # key, Markdown label, LaTeX label
    ("E", "E", "$E$"), ("B", "B", "$B$"), ("C", "C", "$C$"), ("alpha", "α", r"$\alpha$"), ("beta", "β", r"$\beta$"),
    ("s_star", "S* (inference-optimal sparsity)", r"$S^*$"), ("n_over_na", "N/N_a at S*", r"$N/N_a$ at $S^*$"),
)


def _fit_value(fit: dict | None, prec: str, key: str):
    """(value, 95% interval, paper value) of one quantity of one precision's fit; None where absent."""
    form = (fit or {}).get("form", "paper")
    if key in PARAM_NAMES:
        return (fit["params"][key] if fit else None), interval(fit, key), paper_value(key, prec, form)
    paper = PAPER_S_STAR[prec] if key == "s_star" else PAPER_N_OVER_NA[prec]
    if not fit:
        return None, None, paper
    if key == "s_star":
        return s_star_of(fit), interval(fit, key), paper
    value = fit.get("n_over_na")
    if not finite(value):  # from S*; none where S* = 1 (no finite optimum: the fit's warnings say why)
        s_star = s_star_of(fit)
        value = 1.0 / (1.0 - s_star) if finite(s_star) and s_star < 1 else None
    return (float(value) if value is not None else None), interval(fit, key), paper


def fit_constants_table(fits: dict[str, dict | None], optimal: dict | None = None) -> Table:
    """Constants of L(N,S) = E + A(S)/N^alpha per precision, 95% intervals, paper values beside them."""
    records, rows, tex_first = [], [], []
    for key, label, tex in _CONST_ROWS:
        fmt = {"s_star": fmt_pct, "n_over_na": _fmt3}.get(key, fmt_num)
        cells = [label]
        for prec in PRECISIONS:
            value, ci, paper = _fit_value(fits.get(prec), prec, key)
            cells += [fmt(value), fmt_ci(ci, fmt), fmt(paper)]
            records.append(_record(prec, key, value, ci, paper))
        rows.append(cells)
        tex_first.append(tex)

    # The paper-constants check: its printed constants do not reproduce its stated S*.
    check = paper_constants_s_star()
    rows.append(["S* of the paper's printed constants", MISSING, MISSING, fmt_pct(check)] + [MISSING] * 3)
    tex_first.append(r"$S^*$ of the paper's printed constants")
    records.append(_record("fp", "s_star_paper_constants", check, None, PAPER_S_STAR["fp"]))

    # Fit bookkeeping a reader needs to trust the numbers above.
    for key, label in (("n_runs", "runs in the fit"), ("n_sizes", "model sizes"), ("loso", "leave-one-size-out mean abs. error")):
        cells = [label]
        for prec in PRECISIONS:
            fit = fits.get(prec) or {}
            value = (fit.get("loso") or {}).get("mean_abs_rel_error") if key == "loso" else fit.get(key)
            value = float(value) if finite(value) else None
            shown = MISSING if value is None else (fmt_pct(value) if key == "loso" else f"{value:.0f}")
            cells += [shown, MISSING, MISSING]
            records.append(_record(prec, "loso_mean_abs_rel_error" if key == "loso" else key, value, None, None))
        rows.append(cells)
        tex_first.append(tex_escape(label))

    header = ["Quantity"] + [f"{PRECISION_LABEL[p]} {c}" for p in PRECISIONS for c in ("fit", "95% CI", "paper")]
    groups = [len(_CONST_ROWS), len(_CONST_ROWS) + 1]
    return Table("fit_constants", header, rows, pd.DataFrame(records), _fit_notes(fits, optimal, check),
                 tex_first=tex_first, groups=groups)


def _fit_notes(fits: dict[str, dict | None], optimal: dict | None, check: float) -> list[str]:
    notes = [f"95% intervals: bootstrap over runs ({_boot(fits)}). Paper values from Q-Sparse; "
             "it published no 1.58-bit constants. N counts non-embedding parameters; N_a = N (1 - S)."]
    notes.append(f"The paper's printed constants (E={PAPER_CONSTANTS['E']}, B={PAPER_CONSTANTS['B']}, C={PAPER_CONSTANTS['C']}, "
                 f"alpha={PAPER_CONSTANTS['alpha']}, beta={PAPER_CONSTANTS['beta']}) give S* = {fmt_pct(check)}, "
                 f"not the stated {fmt_pct(PAPER_S_STAR['fp'])}: they are rounded.")
    paper_check = (optimal or {}).get("paper_check")
    if isinstance(paper_check, dict) and isinstance(paper_check.get("note"), str) and paper_check["note"]:
        notes.append(f"Fit note on the paper check: {paper_check['note']}")
    for prec in PRECISIONS:
        fit, name = fits.get(prec), PRECISION_LABEL[prec]
        if not fit:
            notes.append(f"{name}: no fit (no fit_{prec}.json with constants).")
            continue
        if fit.get("form") == "card":
            notes.append(f"{name}: card form A(S) = B + C exp(beta S/(1-S)); the paper's C is shown as C e^beta.")
        if fit.get("converged") is False:
            notes.append(f"{name}: the fit did not converge.")
        if fit.get("on_bound"):
            notes.append(f"{name}: constants on a bound of the fit: {', '.join(map(str, fit['on_bound']))}.")
        notes += [f"{name}: {w}" for w in fit.get("warnings") or [] if isinstance(w, str)]
    return notes


def _fmt3(x) -> str:
    return f"{float(x):.3f}" if finite(x) else MISSING


def _record(prec, key, value, ci, paper) -> dict:
    nan = float("nan")
    return {"precision": prec, "quantity": key, "value": float(value) if finite(value) else nan,
            "ci_lo": ci[0] if ci else nan, "ci_hi": ci[1] if ci else nan, "paper": float(paper) if finite(paper) else nan}


def _boot(fits) -> str:
    parts = []
    for prec in PRECISIONS:
        b = (fits.get(prec) or {}).get("bootstrap") or {}
        if finite(b.get("n")):
            parts.append(f"{PRECISION_LABEL[prec]} {int(b.get('n_ok', b['n']))}/{int(b['n'])} resamples")
    return ", ".join(parts) or "no bootstrap recorded"
# ----------------------------------------------------------------------------------------------------------
# Table 2: loss of every (N, S) cell per precision, with the gap to the dense model


def _mode_key(m: str) -> tuple[int, str]:
    return (MODES.index(m) if m in MODES else len(MODES), m)


def _row_groups(runs: pd.DataFrame) -> list[tuple[str, str, str, int]]:
    """(precision, mode, size, n_params) in display order: precision, mode, then N."""
    keys = runs[["precision", "mode", "size", "n_params"]].drop_duplicates().itertuples(index=False)
    return sorted((tuple(k) for k in keys), key=lambda k: (PRECISIONS.index(k[0]), _mode_key(k[1]), int(k[3]), k[2]))


def loss_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged val_loss per (precision, mode, size, N, S) and its gap to the same row's dense (S=0) cell."""
    records = []
    for prec, mode, size, n in _row_groups(runs):
        g = runs[(runs.precision == prec) & (runs["mode"] == mode) & (runs["size"] == size)]
        dense = g.loc[g.sparsity == 0.0, "val_loss"].mean()  # NaN when no dense run (or all failed)
        for s in sorted(g.sparsity.unique()):
            v = g.loc[g.sparsity == s, "val_loss"]
            mean = v.mean()
            records.append({
                "precision": prec, "mode": mode, "size": size, "n_params": int(n), "sparsity": float(s),
                "n_runs": int(len(v)), "n_ok": int(v.notna().sum()), "val_loss_mean": mean,
                "val_loss_std": v.std(ddof=1) if v.notna().sum() > 1 else np.nan, "dense_loss": dense,
                "gap_pct": 100.0 * (mean / dense - 1.0) if finite(dense) and finite(mean) else np.nan,
            })
    return pd.DataFrame(records, columns=["precision", "mode", "size", "n_params", "sparsity", "n_runs", "n_ok",
                                          "val_loss_mean", "val_loss_std", "dense_loss", "gap_pct"])


def losses_table(runs: pd.DataFrame) -> Table:
    """Pivot N x S per precision (and training mode): mean validation loss, (gap to dense in %)."""
    cells = loss_cells(runs)
    sparsities = sorted(cells.sparsity.unique())
    show_mode = cells["mode"].nunique() > 1
    header = ["Precision"] + (["Mode"] if show_mode else []) + ["Model", "N"] + [fmt_s(s) for s in sparsities]
    rows, groups, partial, last = [], [], False, None
    for prec, mode, size, n in _row_groups(runs):
        if prec != last:
            groups.append(len(rows))
            last = prec
        row = [PRECISION_LABEL[prec]] + ([mode] if show_mode else []) + [size, fmt_n(n)]
        for s in sparsities:
            c = cells[(cells.precision == prec) & (cells["mode"] == mode) & (cells["size"] == size) & (cells.sparsity == s)]
            if c.empty:
                row.append(MISSING)
                continue
            c = c.iloc[0]
            if c.n_ok == 0:
                row.append("failed")
                continue
            text = f"{c.val_loss_mean:.4f}"
            if s != 0.0 and finite(c.gap_pct):
                text += f" ({c.gap_pct:+.2f}%)"
            if c.n_ok < c.n_runs:
                text += "*"
                partial = True
            row.append(text)
        rows.append(row)
    seeds = sorted(set(cells.n_runs))
    notes = ["Validation loss in nats/token, mean over seeds "
             f"({'/'.join(map(str, seeds))} per cell); in brackets the gap to the dense (S=0) model of the same row.",
             "N: non-embedding parameters; S: target sparsity of every projection input."]
    if partial:
        notes.append("*: some seeds of this cell failed (no loss); the mean is over the others.")
    return Table("losses", header, rows, cells, notes, groups=groups)


# ----------------------------------------------------------------------------------------------------------
# Table 2b: sparse against dense at equal activated parameters (no law)


def matched_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (precision, mode, size, S > 0): the sparse cell's mean loss against the dense loss at its activated
    parameters N_a = (1 - S) N, interpolated linearly in log N between the two dense sizes around N_a (seed
    means; no extrapolation: outside the dense sizes' range `delta` is NaN). delta < 0: at equal inference
    cost the larger sparse model beats the dense one. This checks S* without the law."""
    cells = loss_cells(runs)
    records = []
    for (prec, mode), g in cells.groupby(["precision", "mode"], sort=False):
        dense = g[(g.sparsity == 0.0) & g.val_loss_mean.notna()].sort_values("n_params")
        log_n, loss = np.log(dense.n_params.to_numpy(float)), dense.val_loss_mean.to_numpy(float)
        for c in g[g.sparsity > 0].itertuples(index=False):
            n_a = (1.0 - c.sparsity) * c.n_params
            inside = len(log_n) >= 2 and log_n[0] - 1e-9 <= np.log(n_a) <= log_n[-1] + 1e-9
            at = float(np.interp(np.log(n_a), log_n, loss)) if inside else np.nan
            records.append({"precision": prec, "mode": mode, "size": c.size, "n_params": c.n_params,
                            "sparsity": c.sparsity, "n_active": n_a, "val_loss_mean": c.val_loss_mean,
                            "dense_at_n_active": at, "delta": c.val_loss_mean - at if inside else np.nan})
    return pd.DataFrame(records, columns=["precision", "mode", "size", "n_params", "sparsity", "n_active",
                                          "val_loss_mean", "dense_at_n_active", "delta"])


def matched_table(runs: pd.DataFrame) -> Table:
    """Pivot N x S per precision (and mode): sparse loss minus dense loss at the same activated parameters."""
    cells = matched_cells(runs)
    sparsities = sorted(cells.sparsity.unique())
    show_mode = cells["mode"].nunique() > 1
    header = ["Precision"] + (["Mode"] if show_mode else []) + ["Model", "N"] + [fmt_s(s) for s in sparsities]
    rows, groups, last = [], [], None
    for prec, mode, size, n in _row_groups(runs):
        g = cells[(cells.precision == prec) & (cells["mode"] == mode) & (cells["size"] == size)]
        if g.empty:
            continue
        if prec != last:
            groups.append(len(rows))
            last = prec
        row = [PRECISION_LABEL[prec]] + ([mode] if show_mode else []) + [size, fmt_n(n)]
        for s in sparsities:
            c = g[g.sparsity == s]
            row.append(f"{c.delta.iloc[0]:+.3f}" if len(c) and finite(c.delta.iloc[0]) else MISSING)
        rows.append(row)
    notes = ["Loss of the sparse model minus the loss of a dense model with as many parameters as the sparse one "
             "activates, N_a = (1 - S) N (nats/token, seed means; the dense loss interpolated linearly in log N "
             "between the two dense sizes around N_a, never extrapolated: — outside them).",
             "Negative: at equal inference cost the larger sparse model is better. No fitted law is involved: a "
             "check of S* from the runs alone."]
    return Table("matched_active", header, rows, cells, notes, groups=groups)


# ----------------------------------------------------------------------------------------------------------
# Table 3: measured sparsity per projection (the paper's Table 2 layout)

SPARSITY_COLUMNS = tuple(f"sparsity_measured_{p}" for p in PROJECTIONS) + ("sparsity_measured",)


def sparsity_table(runs: pd.DataFrame) -> Table:
    """Per model and target S: activated parameters and the measured sparsity of each projection's input."""
    records = []
    for prec, mode, size, n in _row_groups(runs):
        g = runs[(runs.precision == prec) & (runs["mode"] == mode) & (runs["size"] == size)]
        for s in sorted(g.sparsity.unique()):
            c = g[g.sparsity == s]
            rec = {"precision": prec, "mode": mode, "size": size, "n_params": int(n), "sparsity": float(s),
                   "n_runs": int(len(c)), "n_active": pd.to_numeric(c["n_active"], errors="coerce").mean()}
            rec.update({col: pd.to_numeric(c[col], errors="coerce").mean() for col in SPARSITY_COLUMNS})
            records.append(rec)
    data = pd.DataFrame(records, columns=["precision", "mode", "size", "n_params", "sparsity", "n_runs", "n_active", *SPARSITY_COLUMNS])
    show_mode = data["mode"].nunique() > 1
    header = (["Model", "Precision"] + (["Mode"] if show_mode else []) + ["N", "Target S", "Activated N_a"]
              + [PROJECTION_LABEL[p] for p in PROJECTIONS] + ["Overall"])
    rows, groups, last = [], [], None
    for r in data.itertuples(index=False):
        if r.precision != last:
            groups.append(len(rows))
            last = r.precision
        rows.append([r.size, PRECISION_LABEL[r.precision]] + ([r.mode] if show_mode else [])
                    + [fmt_n(r.n_params), fmt_pct(r.sparsity, 0), fmt_n(r.n_active) if finite(r.n_active) else MISSING]
                    + [fmt_pct(getattr(r, col), 1) for col in SPARSITY_COLUMNS])
    notes = ["Measured sparsity: fraction of zero inputs of each projection on a validation batch, mean over seeds; "
             "Overall weights each projection by the size of the weight matrix it feeds.",
             "N: non-embedding parameters; N_a: parameters touched per token (runs.csv n_active)."]
    return Table("sparsity", header, rows, data, notes, groups=groups)


# ----------------------------------------------------------------------------------------------------------
# CLI


# ----------------------------------------------------------------------------------------------------------
# Table 4: how far S* can be trusted (design, interval, stability, flags)


def _shift(row: dict) -> str:
    return MISSING if row.get("s_star") is None else f"{fmt_pct(row['s_star'], 1)} ({100 * row['shift']:+.1f})"


def _shape_cell(ok, violations: list[dict]) -> str:
    if ok is None:
        return MISSING
    if ok:
        return "yes"
    beyond = sum(1 for v in violations if v.get("significant") is not False)
    return f"no: {len(violations)} step(s), {beyond} beyond 2 s.e."


def diagnostics_table(fits: dict[str, dict | None], optimal: dict | None = None) -> Table:
    """Per precision: the sweep's design, S* with its interval and the share of resamples without an
    optimum, S* refitted without each size and each sparsity, and the flags of the fit."""
    keys = [("sizes", "model sizes (N span)"), ("sparsities", "sparsities (largest)"), ("seeds", "seeds per cell"),
            ("tokens", "token budget D"), ("s_star", "S* [95% interval]"), ("no_opt", "resamples without a finite S*"),
            ("method", "bootstrap"), ("e_range", "S* with E pinned at 0 … 0.9 x the smallest loss"),
            ("seed_sd", "seed s.d. of a run (nats)"),
            ("falls", "loss falls with N at every S"), ("grows", "gap to dense grows with S at every N"),
            ("shrinks", "gap to dense shrinks with N at every S")]
    sizes = sorted({(r.get("size") or fmt_n(r["n_params"]), r["n_params"]) for f in fits.values() if f
                    for r in (f.get("stability") or {}).get("drop_size") or []}, key=lambda t: t[1])
    sparsities = sorted({r["sparsity"] for f in fits.values() if f for r in (f.get("stability") or {}).get("drop_sparsity") or []})
    rows, records = [], []

    def add(label, key, per_prec):
        rows.append([label] + [per_prec.get(p, MISSING) for p in PRECISIONS])

    cells = {k: {} for k, _ in keys}
    drop = {f"size:{name}": {} for name, _ in sizes} | {f"sparsity:{v}": {} for v in sparsities}
    extra = {"max_size": {}, "max_sparsity": {}, "flags": {}}
    for prec in PRECISIONS:
        f = fits.get(prec)
        if not f:
            continue
        d, b, st = f.get("design") or {}, f.get("bootstrap") or {}, f.get("stability") or {}
        tok = d.get("tokens") or {}
        cells["sizes"][prec] = f"{d.get('n_sizes', MISSING)} ({d['n_span']:.0f}x)" if finite(d.get("n_span")) else MISSING
        cells["sparsities"][prec] = (f"{d['n_sparsities']} (up to {fmt_pct(d['max_sparsity'], 0)})"
                                     if finite(d.get("max_sparsity")) else MISSING)
        cells["seeds"][prec] = "–".join(str(v) for v in sorted(set(d.get("seeds_per_cell") or []))) or MISSING
        cells["tokens"][prec] = (MISSING if not tok else f"{tok['values'][0]:,} (one D)" if tok.get("fixed")
                                 else f"varies with N: {', '.join(f'{v:,}' for v in tok['values'])}")
        ci = interval(f, "s_star")
        cells["s_star"][prec] = f"{fmt_pct(s_star_of(f), 1)} {fmt_ci(ci, lambda v: fmt_pct(v, 1))}"
        cells["no_opt"][prec] = fmt_pct(b.get("share_no_finite_optimum"), 0)
        cells["method"][prec] = f"{b.get('method', MISSING)}, {b.get('n_ok', MISSING)}/{b.get('n', MISSING)} refits"
        rng = (f.get("e_profile") or {}).get("s_star_range")
        if rng:
            cells["e_range"][prec] = f"{fmt_pct(rng[0], 1)} – {fmt_pct(rng[1], 1)}"
        sh = f.get("shape") or {}
        cells["seed_sd"][prec] = fmt_num(sh.get("seed_sd")) if finite(sh.get("seed_sd")) else MISSING
        by_s = sh.get("seed_sd_by_s") or {}
        if by_s and finite(sh.get("seed_sd")):  # fits written before it was pooled per S have none
            cells["seed_sd"][prec] += "; by S: " + ", ".join(
                f"{fmt_pct(float(k), 0)} {fmt_num(v)}" for k, v in sorted(by_s.items(), key=lambda kv: float(kv[0])))
        for key, ok, viol in (("falls", "loss_falls_with_n", "violations_n"), ("grows", "gap_grows_with_s", "violations_s"),
                              ("shrinks", "gap_shrinks_with_n", "violations_gap_n")):
            cells[key][prec] = _shape_cell(sh.get(ok), sh.get(viol) or [])
        for r in st.get("drop_size") or []:
            drop[f"size:{r.get('size') or fmt_n(r['n_params'])}"][prec] = _shift(r)
        for r in st.get("drop_sparsity") or []:
            drop[f"sparsity:{r['sparsity']}"][prec] = _shift(r)
        for key, name in (("max_size", "max_shift_size"), ("max_sparsity", "max_shift_sparsity")):
            extra[key][prec] = fmt_num(st.get(name)) if finite(st.get(name)) else MISSING
        extra["flags"][prec] = ", ".join(f.get("flags") or []) or "none"
        records.append({"precision": prec, "s_star": s_star_of(f), "ci_lo": ci[0] if ci else float("nan"),
                        "ci_hi": ci[1] if ci else float("nan"),
                        "share_no_finite_optimum": b.get("share_no_finite_optimum", float("nan")),
                        "max_shift_size": st.get("max_shift_size"), "max_shift_sparsity": st.get("max_shift_sparsity"),
                        "stable": st.get("stable"), "trustworthy": f.get("trustworthy"), "flags": ";".join(f.get("flags") or [])})
    for key, label in keys:
        if key == "e_range" and not cells[key]:  # fits written before the E profile existed
            continue
        add(label, key, cells[key])
    for name, _ in sizes:
        add(f"S* without size {name} (shift, points)", None, drop[f"size:{name}"])
    for v in sparsities:
        add(f"S* without S = {100 * v:g}% (shift, points)", None, drop[f"sparsity:{v}"])
    add("largest shift: one size / one sparsity dropped", None,
        {p: f"{extra['max_size'].get(p, MISSING)} / {extra['max_sparsity'].get(p, MISSING)}" for p in extra["max_size"]})
    add("flags", None, extra["flags"])
    notes = ["A headline S* needs: one token budget for every size, >= 4 sizes and >= 5 sparsities reaching past S*, "
             "an interval of at most +-0.1 and shifts of at most 0.05 when one size or one sparsity is dropped."]
    diff = (optimal or {}).get("difference_1.58_minus_fp")
    if diff and None not in (diff.get("difference_ci") or [None]):
        lo, hi = diff["difference_ci"]
        notes.append(f"S*(1.58) - S*(fp) = {100 * diff['difference']:+.1f} points, 95% interval [{100 * lo:+.1f}, {100 * hi:+.1f}]; "
                     f"1.58-bit sparser in {fmt_pct(diff.get('share_1.58_sparser'), 0)} of paired resamples.")
    header = ["Quantity"] + [PRECISION_LABEL[p] for p in PRECISIONS]
    return Table("fit_diagnostics", header, rows, pd.DataFrame(records), notes, tex_first=[tex_escape(r[0]) for r in rows])


def make_tables(results: Results) -> list[Table]:
    return [fit_constants_table(results.fits, results.optimal), losses_table(results.runs), matched_table(results.runs),
            sparsity_table(results.runs), diagnostics_table(results.fits, results.optimal)]


def cli_tables(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale tables", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="results/tables/runs.csv", help="runs table from `sparsescale aggregate`")
    ap.add_argument("--fit-dir", default="results/fit", help="folder with fit_fp.json / fit_1.58.json from `sparsescale fit`")
    ap.add_argument("--out", default="results/tables", help="output folder for {fit_constants,losses,sparsity}.{md,tex,csv}")
    args = ap.parse_args(argv)
    results = load_results(args.runs, args.fit_dir)
    for t in make_tables(results):
        for path in write_table(t, args.out):
            print(path)
    return 0
