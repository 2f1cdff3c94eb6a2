"""Figures from result files: one function per figure, one seaborn theme, PNG for the report, PDF for papers.

Notable features:
- made only from `results/tables/runs.csv`, `results/tables/curves.csv` and the fit JSONs (read by
  `sparsescale.results`, shared with `tables.py`); the fitted law is evaluated with `sparsescale.scaling`,
  never re-derived here;
- one theme (seaborn "ticks", paper context) and colour-blind-safe colours: the "colorblind" palette for
  categories (precision, projection), perceptually uniform sequential maps for ordered values (S, N);
- every figure draws both precisions in a fixed order; a precision without runs (or without a fit) gets a
  panel that says so, so a partial sweep still renders;
- deterministic bytes where matplotlib allows: no pyplot state, no random jitter, PNG without the Software
  tag, PDF without CreationDate; each file written atomically (`sparsescale.io.atomic_path`);
- `FIGURES` is the registry the CLI walks; later figures (super-weight spike profile, inference speedup)
  plug in the same way (`plot_spike_profile`, `plot_speedup` take their own input files); the figures across
  super-weight models live in `superweight/report.py` and draw their spike panels with `spike_panel`.

CLI: `sparsescale figures --runs results/tables/runs.csv --curves results/tables/curves.csv
--fit-dir results/fit --out results/figures` writes `{name}.png` and `{name}.pdf` per figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, MaxNLocator, MultipleLocator, NullFormatter, PercentFormatter

from sparsescale.errors import UserError
from sparsescale.io import atomic_path, read_json
from sparsescale.scaling import PAPER_CONSTANTS, PAPER_S_STAR, inference_cost_factor, law
from sparsescale.config import PRECISIONS
from sparsescale.results import (
    PRECISION_LABEL, PROJECTION_LABEL, PROJECTIONS, Results, finite, fmt_n, interval, load_results,
    paper_constants_s_star, s_star_of,
)

LOSS_LABEL = "validation loss (nats/token)"
N_LABEL = "non-embedding parameters N"
NA_LABEL = r"activated parameters $N_a = N\,(1-S)$"
S_LABEL = "target sparsity S"

# One theme for every figure: seaborn's ticks style at paper scale, TrueType fonts in PDFs (editable text).
THEME = {
    **sns.axes_style("ticks"),
    **sns.plotting_context("paper", font_scale=1.05),
    "axes.prop_cycle": matplotlib.cycler(color=sns.color_palette("colorblind")),
    "axes.grid": True, "grid.color": "0.9", "grid.linewidth": 0.6,
    "legend.frameon": False, "pdf.fonttype": 42, "ps.fonttype": 42, "savefig.dpi": 200,
    "figure.constrained_layout.h_pad": 0.06, "figure.constrained_layout.w_pad": 0.06,
}
CB = sns.color_palette("colorblind")
PRECISION_COLOR = {"fp": CB[0], "1.58": CB[1]}
PRECISION_STYLE = {"fp": "-", "1.58": "--"}
PRECISION_MARKER = {"fp": "o", "1.58": "s"}
PROJECTION_STYLE = {  # colour, marker per projection; overall in black so it stands out
    "qkv": (CB[0], "o"), "o": (CB[1], "s"), "gate_up": (CB[2], "^"), "down": (CB[4], "D"), "overall": ("0.1", "P"),
}
PNG_METADATA = {"Software": None}  # no matplotlib version stamp: byte-stable reruns
PDF_METADATA = {"CreationDate": None}  # no timestamp


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def theme():
    """Context manager applying THEME; figures are both built and saved inside it."""
    return matplotlib.rc_context(THEME)


def figure_grid(nrows: int, ncols: int, size: tuple[float, float], **kw):
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def sequential_colors(values, cmap: str = "viridis", lo: float = 0.0, hi: float = 0.85) -> dict:
    """Ordered values -> colours of a perceptually uniform map (cut before the pale end, visible on white)."""
    values = sorted(set(float(v) for v in values))
    cols = matplotlib.colormaps[cmap](np.linspace(lo, hi, max(len(values), 2)))
    return {v: tuple(cols[i]) for i, v in enumerate(values)}


def s_colors(values) -> dict:
    return sequential_colors(values, "viridis", 0.0, 0.85)


def n_colors(values) -> dict:
    return sequential_colors(values, "rocket", 0.15, 0.75)


def s_label(s: float) -> str:
    return "S = 0% (dense)" if s == 0 else f"S = {100 * s:g}%"


def n_label(n: float, size: str | None = None) -> str:
    return f"N = {fmt_n(n)}" + (f" ({size})" if size else "")


def no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize="large", color="0.4")
    # tick_params, not set_xticks([]): the latter would also strip the ticks of axes shared with this one
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
    ax.grid(False)


def corner_text(ax, text: str, loc: str = "lower left") -> None:
    x, ha = (0.03, "left") if "left" in loc else (0.97, "right")
    y, va = (0.04, "bottom") if "lower" in loc else (0.96, "top")
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize="small", color="0.25")


def percent_axis(axis, decimals: int | None = 0) -> None:
    """Fractions shown as percent; decimals=None: as many digits as the ticks need (0.25%, 0.5%)."""
    if decimals is None:
        axis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:.3g}%".replace("-", "−")))
    else:
        axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=decimals))


def log_n_axis(axis, subs: tuple[float, ...] | None = None) -> None:
    """A log axis of N (or tokens) labelled 100k, 1M; no minor labels (2x10^4, 3x10^4, ... overlapped).
    subs=(1, 2, 5): majors at 100k, 200k, 500k, for a sweep that spans < 2 decades. Call after set_xscale("log")."""
    if subs is not None:
        axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(EngFormatter(sep=""))
    axis.set_minor_formatter(NullFormatter())


def fit_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a scaling law describes: trained from scratch, with a loss."""
    return runs[(runs["mode"] == "scratch") & runs.val_loss.notna()]


def seed_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std of val_loss over seeds per (precision, size, N, S)."""
    g = runs.groupby(["precision", "size", "n_params", "sparsity"], sort=True).val_loss
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)  # one seed: no error bar
    return out


def _law(fit: dict, n, s):
    return law(fit["params"], n, s, fit.get("form", "paper"))


def precision_panels(axes, cells: pd.DataFrame, fits: dict):
    """One panel per precision, titled, in the fixed order: yields (ax, that precision's cells, its fit or None);
    a precision without runs gets a "no runs" panel and is not yielded."""
    for ax, prec in zip(axes, PRECISIONS):
        ax.set_title(PRECISION_LABEL[prec])
        c = cells[cells.precision == prec]
        if c.empty:
            no_data(ax, "no runs")
            continue
        yield ax, c, fits.get(prec)


def side_legend(fig: Figure, handles: list, title: str | None = None) -> None:
    fig.legend(handles=handles, loc="outside right center", title=title, fontsize="small", title_fontsize="small")


def save_figure(fig: Figure, out_dir: str | Path, name: str, dpi: int | None = None) -> list[Path]:
    """Write `{name}.png` (at `dpi`, default THEME's 200) and `{name}.pdf` atomically, without timestamps."""
    out_dir = Path(out_dir)
    paths = []
    with theme():
        for ext, meta in (("png", PNG_METADATA), ("pdf", PDF_METADATA)):
            path = out_dir / f"{name}.{ext}"
            with atomic_path(path, suffix=f".{ext}") as tmp:
                fig.savefig(tmp, format=ext, metadata=meta, dpi=dpi if ext == "png" else None)  # None: THEME's dpi
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Figure 1: loss vs N per S, fitted law (the paper's scaling figure)


def plot_scaling(runs: pd.DataFrame, fits: dict) -> Figure:
    runs = fit_runs(runs)
    cells = seed_cells(runs)
    colors = s_colors(cells.sparsity)
    with theme():
        fig, axes = figure_grid(1, 2, (7.2, 3.0), sharey=True)
        for ax, c, fit in precision_panels(axes[0], cells, fits):
            grid = np.geomspace(c.n_params.min() / 1.4, c.n_params.max() * 1.4, 200)
            for s, g in c.groupby("sparsity"):
                ax.errorbar(g.n_params, g["mean"], yerr=g["std"], fmt="o", ms=4, capsize=2, color=colors[s], zorder=3)
                if fit:
                    ax.plot(grid, _law(fit, grid, s), color=colors[s], lw=1.2)
            if not fit:
                corner_text(ax, "no fit: data only", "upper right")
            ax.set_xscale("log")
            ax.set_xlabel(N_LABEL)
            ax.tick_params(labelleft=True)
        axes[0, 0].set_ylabel(LOSS_LABEL)
        handles = [Line2D([], [], color=colors[s], marker="o", ms=4, lw=1.2, label=s_label(s)) for s in colors]
        handles += [Line2D([], [], color="0.3", lw=1.2, label="fitted law"),
                    Line2D([], [], color="0.3", marker="o", ms=4, lw=0, label="runs: mean ± sd\nover seeds")]
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 2: loss vs S per N, fitted law, dense loss marked


def plot_loss_vs_sparsity(runs: pd.DataFrame, fits: dict) -> Figure:
    runs = fit_runs(runs)
    cells = seed_cells(runs)
    colors = n_colors(cells.n_params)
    sizes = dict(zip(cells.n_params, cells["size"]))
    with theme():
        fig, axes = figure_grid(1, 2, (7.2, 3.0), sharey=True)
        for ax, c, fit in precision_panels(axes[0], cells, fits):
            grid = np.linspace(0.0, min(0.95, c.sparsity.max() + 0.05), 200)
            for n, g in c.groupby("n_params"):
                ax.errorbar(g.sparsity, g["mean"], yerr=g["std"], fmt="o", ms=4, capsize=2, color=colors[n], zorder=3)
                if fit:
                    ax.plot(grid, _law(fit, n, grid), color=colors[n], lw=1.2)
                dense = g.loc[g.sparsity == 0.0, "mean"]
                if len(dense):  # the dense loss this size has to match
                    ax.axhline(float(dense.iloc[0]), color=colors[n], ls=":", lw=0.9)
            if not fit:
                corner_text(ax, "no fit: data only", "upper left")
            percent_axis(ax.xaxis)
            ax.set_xlabel(S_LABEL)
            ax.tick_params(labelleft=True)
        axes[0, 0].set_ylabel(LOSS_LABEL)
        if not cells.empty:  # frame the measured losses: the law, extrapolated past the largest S, may shoot up
            lo = float((cells["mean"] - cells["std"].fillna(0.0)).min())
            hi = float((cells["mean"] + cells["std"].fillna(0.0)).max())
            pad = max(0.5 * (hi - lo), 0.05)
            axes[0, 0].set_ylim(lo - pad, hi + pad)
        handles = [Line2D([], [], color=colors[n], marker="o", ms=4, lw=1.2, label=n_label(n, sizes[n])) for n in colors]
        handles += [Line2D([], [], color="0.3", lw=1.2, label="fitted law"),
                    Line2D([], [], color="0.3", ls=":", lw=0.9, label="dense loss (S = 0)")]
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 3: the inference-optimal sparsity


def plot_optimal_sparsity(fits: dict) -> Figure:
    """A(S)(1−S)^α relative to its dense value, per precision; S* with its bootstrap band; the paper's S*."""
    grid = np.linspace(0.0, 0.9, 451)
    with theme():
        fig, axes = figure_grid(1, 1, (6.4, 3.4))
        ax = axes[0, 0]
        columns, tops, bottoms = {p: [] for p in PRECISIONS}, [], []  # one legend column per precision
        for prec in PRECISIONS:
            handles = columns[prec]
            fit, color = fits.get(prec), PRECISION_COLOR[prec]
            if fit:
                form = fit.get("form", "paper")
                y = inference_cost_factor(fit["params"], grid, form) / inference_cost_factor(fit["params"], 0.0, form)
                star = s_star_of(fit)
                ystar = float(inference_cost_factor(fit["params"], star, form) / inference_cost_factor(fit["params"], 0.0, form))
                ax.plot(grid, y, color=color, lw=1.6)
                ci = interval(fit, "s_star")
                if ci:
                    ax.axvspan(ci[0], ci[1], color=color, alpha=0.15, lw=0)
                    band = Patch(color=color, alpha=0.25, lw=0, label=f"{PRECISION_LABEL[prec]}: 95% bootstrap interval of S*")
                ax.axvline(star, color=color, lw=1.0)
                ax.plot([star], [ystar], "o", color=color, ms=5, zorder=4)
                text = f"{PRECISION_LABEL[prec]} fit: S* = {100 * star:.1f}%"
                text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]%" if ci else ""
                handles.append(Line2D([], [], color=color, lw=1.6, marker="o", ms=5, label=text))
                if ci:
                    handles.append(band)
                tops.append(float(y[grid <= 0.75].max()))  # above this S the curves shoot up: clip there
                bottoms.append(float(y.min()))
            else:
                handles.append(Line2D([], [], color=color, lw=0, label=f"{PRECISION_LABEL[prec]}: no fit"))
            ax.axvline(PAPER_S_STAR[prec], color=color, ls="--", lw=1.0)
            handles.append(Line2D([], [], color=color, ls="--", lw=1.0,
                                  label=f"{PRECISION_LABEL[prec]} paper: S* = {100 * PAPER_S_STAR[prec]:.2f}%"))
        # The paper's printed (rounded) constants, for reference: they put S* near 50%, not 45.58%.
        f0 = inference_cost_factor(PAPER_CONSTANTS, 0.0)
        yp, pstar = inference_cost_factor(PAPER_CONSTANTS, grid) / f0, paper_constants_s_star()
        ax.plot(grid, yp, color="0.55", ls="-.", lw=1.0)
        ax.plot([pstar], [inference_cost_factor(PAPER_CONSTANTS, pstar) / f0], "o", color="0.55", ms=4, zorder=4)
        columns["fp"].append(Line2D([], [], color="0.55", ls="-.", lw=1.0, marker="o", ms=4,
                                    label=f"paper's printed constants: S* = {100 * pstar:.1f}%"))
        tops.append(float(yp[grid <= 0.75].max()))
        bottoms.append(float(yp.min()))
        lo, hi = min(bottoms), max(tops)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_xlim(0.0, 0.9)
        percent_axis(ax.xaxis)
        ax.set_xlabel(S_LABEL)
        ax.set_ylabel(r"$A(S)\,(1-S)^{\alpha}\ /\ A(0)$")
        ax.set_title(r"loss term at equal activated parameters $N_a$, relative to dense", fontsize="medium")
        fig.legend(handles=columns["fp"] + columns["1.58"], loc="outside lower center", ncols=2, fontsize="small")
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 4: loss vs activated parameters, with the frontier


def plot_activated(runs: pd.DataFrame, fits: dict) -> Figure:
    """At equal activated parameters N_a = N(1−S), sparse models beat dense ones; the frontier sits at S*."""
    # figure 1's layout on the N_a axis (the law as a function of N_a = N (1-S)): two readable figure functions
    # rather than one with switches
    runs = fit_runs(runs)
    cells = seed_cells(runs)
    cells["n_active"] = cells.n_params * (1.0 - cells.sparsity)
    colors = s_colors(cells.sparsity)
    with theme():
        fig, axes = figure_grid(1, 2, (7.2, 3.0), sharey=True)
        for ax, c, fit in precision_panels(axes[0], cells, fits):
            grid = np.geomspace(c.n_active.min() / 1.4, c.n_active.max() * 1.4, 200)
            for s, g in c.groupby("sparsity"):
                ax.errorbar(g.n_active, g["mean"], yerr=g["std"], fmt="o", ms=4, capsize=2, color=colors[s], zorder=3)
                if fit:  # L at fixed S as a function of N_a: N = N_a / (1 - S)
                    ax.plot(grid, _law(fit, grid / (1.0 - s), s), color=colors[s], lw=1.1)
            if fit:  # min over S at each N_a; S* does not depend on N_a, so the frontier is the law at S*
                star = s_star_of(fit)
                ax.plot(grid, _law(fit, grid / (1.0 - star), star), color="k", ls="--", lw=1.4, zorder=4)
                corner_text(ax, f"frontier at S* = {100 * star:.1f}%", "lower left")
            else:
                corner_text(ax, "no fit: data only", "upper right")
            ax.set_xscale("log")
            ax.tick_params(labelleft=True)
        fig.supxlabel(NA_LABEL, fontsize="medium")
        axes[0, 0].set_ylabel(LOSS_LABEL)
        handles = [Line2D([], [], color=colors[s], marker="o", ms=4, lw=1.1, label=s_label(s)) for s in colors]
        handles += [Line2D([], [], color="k", ls="--", lw=1.4, label="frontier:\nmin over S of the law")]
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 5: training curves for one N across S and precision


def pick_curve_size(curves: pd.DataFrame) -> str:
    """The size with the most (precision, S) combinations; ties go to the largest N."""
    cov = curves.groupby(["size", "n_params"])[["precision", "sparsity"]].apply(lambda g: len(g.drop_duplicates()))
    cov = cov.reset_index(name="k").sort_values(["k", "n_params", "size"], ascending=[False, False, True], kind="mergesort")
    return str(cov.iloc[0]["size"])


def plot_curves(curves: pd.DataFrame | None, size: str | None = None) -> Figure:
    """Training and validation loss vs tokens, mean over seeds: dense vs Top-K, full precision vs 1.58-bit."""
    with theme():
        fig, axes = figure_grid(1, 2, (7.2, 3.0))
        if curves is None or curves.empty:
            for ax in axes[0]:
                no_data(ax, "no training curves")
            return fig
        size = size or pick_curve_size(curves)
        c = curves[curves["size"] == size]
        if c.empty:
            raise UserError(f"no training curves for size {size!r}: choose one of {', '.join(sorted(curves['size'].unique()))}")
        colors = s_colors(c.sparsity)
        tmax = float(c.tokens.max())
        for ax, col, title in zip(axes[0], ("train_loss", "val_loss"), ("training loss", "validation loss")):
            ax.set_title(title)
            mean = c.dropna(subset=[col]).groupby(["precision", "sparsity", "tokens"], sort=True)[col].mean().reset_index()
            if mean.empty:
                no_data(ax, f"no {title}")
                continue
            for (prec, s), g in mean.groupby(["precision", "sparsity"], sort=False):
                ax.plot(g.tokens, g[col], color=colors[s], ls=PRECISION_STYLE[prec], lw=1.2,
                        marker=PRECISION_MARKER[prec] if col == "val_loss" else None, ms=2.5)
            # Clip the first quarter of training on the y axis: early losses near ln(vocab) would flatten the rest.
            late = mean[mean.tokens >= 0.25 * tmax][col]
            lo, hi = float(mean[col].min()), float(late.max() if len(late) else mean[col].max())
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel("training tokens")
        axes[0, 0].set_ylabel("loss (nats/token)")
        n = int(c.n_params.iloc[0])
        fig.suptitle(f"{n_label(n, size)}, non-embedding; mean over seeds", fontsize="medium")
        handles = [Line2D([], [], color=colors[s], lw=1.2, label=s_label(s)) for s in colors]
        handles += [Line2D([], [], color="0.3", ls=PRECISION_STYLE[p], lw=1.2, marker=PRECISION_MARKER[p], ms=3,
                           label=PRECISION_LABEL[p]) for p in PRECISIONS if (c.precision == p).any()]
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 6: measured sparsity per projection, target vs measured


def plot_measured_sparsity(runs: pd.DataFrame) -> Figure:
    runs = runs[runs["mode"] == "scratch"]
    cols = {p: f"sparsity_measured_{p}" for p in PROJECTIONS} | {"overall": "sparsity_measured"}
    labels = {**PROJECTION_LABEL, "overall": "overall (weighted)"}
    with theme():
        fig, axes = figure_grid(1, 2, (7.2, 3.2), sharey=True)
        for ax, prec in zip(axes[0], PRECISIONS):
            ax.set_title(PRECISION_LABEL[prec])
            r = runs[runs.precision == prec]
            if r.empty or r[list(cols.values())].isna().all().all():
                no_data(ax, "no runs" if r.empty else "no measured sparsity")
                continue
            ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.9, zorder=1)
            for i, (key, col) in enumerate(cols.items()):
                g = r.groupby("sparsity")[col].agg(["mean", "std"]).dropna(subset=["mean"])
                color, marker = PROJECTION_STYLE[key]
                dodge = 0.012 * (i - (len(cols) - 1) / 2)  # fixed offset so coinciding projections stay visible
                ax.errorbar(g.index + dodge, g["mean"], yerr=g["std"].fillna(0.0), color=color, marker=marker, ms=4,
                            lw=2.0 if key == "overall" else 1.1, capsize=2, zorder=3 if key == "overall" else 2)
            ax.set_xlim(-0.04, min(1.0, float(r.sparsity.max()) + 0.06))
            ax.set_ylim(-0.03, 1.03)
            ax.xaxis.set_major_locator(MultipleLocator(0.2))
            percent_axis(ax.xaxis)
            percent_axis(ax.yaxis)
            ax.set_xlabel(S_LABEL)
            ax.tick_params(labelleft=True)
        axes[0, 0].set_ylabel("measured sparsity\n(fraction of zero inputs)")
        handles = [Line2D([], [], color=PROJECTION_STYLE[k][0], marker=PROJECTION_STYLE[k][1], ms=4,
                          lw=2.0 if k == "overall" else 1.1, label=labels[k]) for k in cols]
        handles.append(Line2D([], [], color="0.6", ls="--", lw=0.9, label="measured = target"))
        side_legend(fig, handles, title="input of")
    return fig


# ----------------------------------------------------------------------------------------------------------
# Figure 7: residuals of the fit and the leave-one-size-out prediction


def residuals(runs: pd.DataFrame, fit: dict) -> pd.DataFrame:
    """observed / predicted − 1 for every run of one precision."""
    r = runs.copy()
    r["residual"] = r.val_loss / _law(fit, r.n_params.to_numpy(), r.sparsity.to_numpy()) - 1.0
    return r


def plot_residuals(runs: pd.DataFrame, fits: dict) -> Figure:
    runs = fit_runs(runs)
    scolors, ncolors = s_colors(runs.sparsity), n_colors(runs.n_params)
    sizes = dict(zip(runs.n_params, runs["size"]))
    soff = {s: 1.06 ** (i - (len(scolors) - 1) / 2) for i, s in enumerate(scolors)}  # fixed dodge in log N
    with theme():
        fig, axes = figure_grid(2, 3, (8.6, 5.0))
        for row, prec in zip(axes, PRECISIONS):
            r, fit = runs[runs.precision == prec], fits.get(prec)
            row[0].set_ylabel(f"{PRECISION_LABEL[prec]}\nobserved / predicted − 1")
            if r.empty or not fit:
                for ax in row:
                    no_data(ax, "no runs" if r.empty else "no fit")
                continue
            r = residuals(r, fit)
            ax = row[0]
            ax.scatter(r.n_params * r.sparsity.map(soff), r.residual, c=[scolors[s] for s in r.sparsity], s=14, zorder=3)
            ax.set_xscale("log")
            log_n_axis(ax.xaxis)
            ax.set_xlabel(N_LABEL)
            ax = row[1]
            noff = {n: 0.012 * (i - (len(ncolors) - 1) / 2) for i, n in enumerate(ncolors)}  # fixed dodge in S
            ax.scatter(r.sparsity + r.n_params.map(noff), r.residual, c=[ncolors[n] for n in r.n_params], s=14, zorder=3)
            percent_axis(ax.xaxis)
            ax.set_xlabel(S_LABEL)
            _loso_panel(row[2], fit, scolors)
            for ax in row:
                ax.axhline(0.0, color="0.4", lw=0.8)
                percent_axis(ax.yaxis, None)
        axes[0, 0].set_title("by model size")
        axes[0, 1].set_title("by sparsity")
        axes[0, 2].set_title("leave-one-size-out")
        fig.legend(handles=[Line2D([], [], color=c, marker="o", lw=0, ms=4, label=s_label(s)) for s, c in scolors.items()],
                   loc="outside right upper", title="colour in columns 1, 3", fontsize="small", title_fontsize="small")
        fig.legend(handles=[Line2D([], [], color=c, marker="o", lw=0, ms=4, label=n_label(n, sizes[n])) for n, c in ncolors.items()],
                   loc="outside right lower", title="colour in column 2", fontsize="small", title_fontsize="small")
    return fig


def _loso_panel(ax, fit: dict, scolors: dict) -> None:
    """Leave-one-size-out: the law fitted without one size predicts it; same residual convention as the rest."""
    loso = fit.get("loso") or {}
    pts = [p for p in loso.get("points") or [] if finite(p.get("observed")) and finite(p.get("predicted"))]
    if not pts:
        no_data(ax, "no leave-one-size-out fit")
        return
    s = np.array([p["sparsity"] for p in pts])
    res = np.array([p["observed"] / p["predicted"] - 1.0 for p in pts])
    order = np.argsort(s, kind="mergesort")
    ax.plot(s[order], res[order], color="0.5", lw=0.8, zorder=2)
    ax.scatter(s, res, c=[scolors.get(float(v), "0.3") for v in s], s=22, marker="D", zorder=3)
    held = loso.get("held_out_n_params")
    text = f"held out: N = {fmt_n(held)}" if finite(held) else "held-out size"
    if finite(loso.get("mean_abs_rel_error")):
        text += f"\nmean |error| = {100 * loso['mean_abs_rel_error']:.2f}%"
    corner_text(ax, text, "upper left")
    percent_axis(ax.xaxis)
    ax.set_xlabel(S_LABEL)


# ----------------------------------------------------------------------------------------------------------
# Figure 10: how far S* can be trusted: drop-one refits, bootstrap interval, the share without an optimum


def plot_stability(fits: dict) -> Figure:
    """Per precision: S* of the full fit with its 95% interval, S* refitted without each size and each
    sparsity, and S* with the floor E pinned at fractions of the smallest loss (`e_profile`, when the fit has
    one); the band of +-tolerance around S* is what "stable" means. A refit without a finite optimum is drawn
    at 100%."""
    with theme():
        fig, axes = figure_grid(1, 2, (8.4, 3.2), sharey=True)
        for ax, prec in zip(axes[0], PRECISIONS):
            ax.set_title(PRECISION_LABEL[prec])
            fit = fits.get(prec)
            st = (fit or {}).get("stability")
            if not fit or not st:
                no_data(ax, "no fit" if not fit else "no stability refits\n(rerun `sparsescale fit`)")
                continue
            star, color = s_star_of(fit), PRECISION_COLOR[prec]
            labels, values = [], []
            for r in st.get("drop_size") or []:
                labels.append(f"−{r.get('size') or fmt_n(r['n_params'])}")
                values.append(r["s_star"])
            n_size = len(labels)
            for r in st.get("drop_sparsity") or []:
                labels.append(f"−S {100 * r['sparsity']:g}%")
                values.append(r["s_star"])
            n_drop = len(labels)
            for r in (fit.get("e_profile") or {}).get("points") or []:
                labels.append(f"E {r['fraction']:g}·L")
                values.append(r["s_star"])
            x = np.arange(len(labels))
            tol = st.get("tolerance", 0.05)
            ci = interval(fit, "s_star")
            if ci:
                ax.axhspan(ci[0], ci[1], color=color, alpha=0.15, lw=0)
            ax.axhspan(star - tol, star + tol, facecolor="none", edgecolor="0.5", hatch="//", lw=0.0, alpha=0.5)
            ax.axhline(star, color=color, lw=1.4)
            y = np.array([np.nan if v is None else v for v in values], float)
            ax.plot(x[:n_size], y[:n_size], "o", color=color, ms=5, zorder=3)
            ax.plot(x[n_size:n_drop], y[n_size:n_drop], "s", color=color, mfc="white", ms=5, zorder=3)
            ax.plot(x[n_drop:], y[n_drop:], "D", color=color, mfc="white", ms=4, zorder=3)
            ax.set_xticks(x, labels, rotation=60, ha="right", fontsize="small")
            ax.axvline(n_size - 0.5, color="0.7", lw=0.8)
            if len(labels) > n_drop:
                ax.axvline(n_drop - 0.5, color="0.7", lw=0.8)
            percent_axis(ax.yaxis)
            share = (fit.get("bootstrap") or {}).get("share_no_finite_optimum")
            text = f"S* = {100 * star:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
            if finite(share):
                text += f"\n{100 * share:.0f}% of resamples: no finite S*"
            flags = fit.get("flags") or []
            text += "\nflags: " + (", ".join(flags) if flags else "none")
            corner_text(ax, text, "upper left")
        axes[0, 0].set_ylabel("S* (refit)")
        handles = [Line2D([], [], color="0.3", lw=1.4, label="S* of the full fit"),
                   Patch(color="0.5", alpha=0.3, lw=0, label="95% bootstrap interval"),
                   Patch(facecolor="none", edgecolor="0.5", hatch="//", label="± tolerance of 'stable'"),
                   Line2D([], [], color="0.3", marker="o", lw=0, ms=5, label="one size dropped"),
                   Line2D([], [], color="0.3", marker="s", mfc="white", lw=0, ms=5, label="one sparsity dropped"),
                   Line2D([], [], color="0.3", marker="D", mfc="white", lw=0, ms=4,
                          label="E pinned at f × smallest loss L")]
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Extension figures (later issues): super-weight spike profile, inference speedup


def spike_panel(ax, det: dict, title: str | None = None) -> None:
    """One spike profile on `ax`: a bare {"layers": [...]} or a detect JSON (its super weights' layers shaded)."""
    profile = det.get("profile", det)
    layers = sorted(profile.get("layers") or [], key=lambda d: d["layer"])
    if title:
        ax.set_title(title, fontsize="medium")
    if not layers:
        no_data(ax, "no layers in the spike profile")
        return
    x = [d["layer"] for d in layers]
    ax.plot(x, [d["max_abs_input"] for d in layers], color=CB[0], marker="o", ms=3.5, label="down_proj input")
    ax.plot(x, [d["max_abs_output"] for d in layers], color=CB[3], marker="s", ms=3.5, label="down_proj output")
    for key, color in (("echoes", "0.75"), ("super_weights", CB[2])):
        for layer in sorted({s["layer"] for s in det.get(key) or []}):
            ax.axvspan(layer - 0.3, layer + 0.3, color=color, alpha=0.3, lw=0, zorder=1)
    if "super_weights" in det:  # a detect JSON: say what was found, "none found" included
        coords = [f"({s['layer']}, {s['row']}, {s['col']})" for s in det["super_weights"]]
        corner_text(ax, "super weights: " + (", ".join(coords[:3]) + (" …" if len(coords) > 3 else "") if coords else "none found"),
                "upper right")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation|")


def plot_spike_profile(profile: dict) -> Figure:
    """Per layer, max |down_proj input| and max |output| (log y): super activations show as spikes."""
    with theme():
        fig, axes = figure_grid(1, 1, (5.6, 3.0))
        spike_panel(axes[0, 0], profile, str(profile["model"]) if profile.get("model") else None)
        if axes[0, 0].get_lines():
            axes[0, 0].legend(fontsize="small")
    return fig


def plot_speedup(bench: pd.DataFrame) -> Figure:
    """Measured sparse-GEMV speedup vs S per shape/dtype, with the ideal 1/(1−S) of a memory-bound GEMV.

    Solid: against the faster dense baseline (`speedup`: framework matmul or the own kernel at S=0, whichever
    is faster); dotted: against the framework matmul alone (`speedup_vs_dense`, when the CSV has it). Rows the
    bench flagged `above_ideal` (a benchmark bug) are drawn as crosses."""
    with theme():
        fig, axes = figure_grid(1, 1, (5.6, 3.4))
        ax = axes[0, 0]
        if bench.empty:
            no_data(ax, "no benchmark rows")
            return fig
        keys = bench[["d_in", "d_out", "dtype"]].drop_duplicates().sort_values(["d_in", "d_out", "dtype"]).itertuples(index=False)
        for i, (d_in, d_out, dtype) in enumerate(keys):
            g = bench[(bench.d_in == d_in) & (bench.d_out == d_out) & (bench.dtype == dtype)].sort_values("sparsity")
            c = CB[i % len(CB)]
            ax.plot(g.sparsity, g.speedup, marker="o", ms=3.5, color=c, label=f"W {d_out}×{d_in}, {dtype}")
            if "speedup_vs_dense" in g:
                ax.plot(g.sparsity, g.speedup_vs_dense, ls=":", marker=".", ms=3, color=c, lw=1.0)
            if "above_ideal" in g:
                bad = g[g.above_ideal.astype(str).str.lower() == "true"]
                ax.plot(bad.sparsity, bad.speedup, ls="none", marker="x", ms=7, color="red")
        grid = np.linspace(0.0, float(bench.sparsity.max()), 100)
        ax.plot(grid, 1.0 / (1.0 - grid), color="0.4", ls="--", lw=1.0, label="ideal 1/(1 − S)")
        ax.axhline(1.0, color="0.7", lw=0.8)
        if "speedup_vs_dense" in bench:
            ax.plot([], [], color="0.3", ls=":", lw=1.0, label="vs framework dense only")
        percent_axis(ax.xaxis)
        ax.set_xlabel("activation sparsity S")
        ax.set_ylabel("speedup over the faster dense GEMV (×)")
        ax.legend(fontsize="small")
    return fig


# ----------------------------------------------------------------------------------------------------------
# Registry and CLI

# name -> function(results, options) -> Figure. Add a later figure by adding an entry.
FIGURES: dict[str, Callable[[Results, argparse.Namespace], Figure]] = {
    "fig1_scaling": lambda r, o: plot_scaling(r.runs, r.fits),
    "fig2_loss_vs_sparsity": lambda r, o: plot_loss_vs_sparsity(r.runs, r.fits),
    "fig3_optimal_sparsity": lambda r, o: plot_optimal_sparsity(r.fits),
    "fig4_activated": lambda r, o: plot_activated(r.runs, r.fits),
    "fig5_curves": lambda r, o: plot_curves(r.curves, o.curves_size),
    "fig6_measured_sparsity": lambda r, o: plot_measured_sparsity(r.runs),
    "fig7_residuals": lambda r, o: plot_residuals(r.runs, r.fits),
    "fig10_stability": lambda r, o: plot_stability(r.fits),
}
# Drawn only when their input is given on the command line.
OPTIONAL_FIGURES: dict[str, tuple[str, Callable[[str], Figure]]] = {
    "fig8_spike_profile": ("spike_profile", lambda path: plot_spike_profile(read_json(_need_file(path, "--spike-profile")))),
    "fig9_speedup": ("bench", lambda path: plot_speedup(pd.read_csv(_need_file(path, "--bench")))),
}


def _need_file(path: str, flag: str) -> str:
    if not Path(path).is_file():
        raise UserError(f"{flag} file not found: {path}; pass an existing file or drop {flag}")
    return path


def make_figures(results: Results, out_dir: str | Path, options: argparse.Namespace | None = None,
                 names: list[str] | None = None, dpi: int | None = None) -> list[Path]:
    """Render the named figures (default: all of FIGURES) into `out_dir`; return the written paths."""
    options = options or argparse.Namespace(curves_size=None)
    paths = []
    for name in names or list(FIGURES):
        paths += save_figure(FIGURES[name](results, options), out_dir, name, dpi)
    return paths


def cli_figures(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale figures", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="results/tables/runs.csv", help="runs table from `sparsescale aggregate`")
    ap.add_argument("--curves", default="results/tables/curves.csv", help="training curves from `sparsescale aggregate`")
    ap.add_argument("--fit-dir", default="results/fit", help="folder with fit_fp.json / fit_1.58.json from `sparsescale fit`")
    ap.add_argument("--out", default="results/figures", help="output folder for {name}.png and {name}.pdf")
    ap.add_argument("--curves-size", default=None, help="size (flavor) of figure 5; default: best-covered, largest N")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(FIGURES)}")
    ap.add_argument("--dpi", type=int, default=THEME["savefig.dpi"], help="PNG resolution (the PDF is vector)")
    ap.add_argument("--spike-profile", default=None, help="super-weight spike profile JSON -> fig8_spike_profile")
    ap.add_argument("--bench", default=None, help="GEMV benchmark CSV -> fig9_speedup")
    args = ap.parse_args(argv)
    names = list(FIGURES) + [n for n, (attr, _) in OPTIONAL_FIGURES.items() if getattr(args, attr)]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in FIGURES and n not in OPTIONAL_FIGURES]
        if unknown:
            raise UserError(f"unknown figure {unknown[0]!r} in --only: choose from "
                            f"{', '.join([*FIGURES, *OPTIONAL_FIGURES])}")
        for n in names:
            attr = OPTIONAL_FIGURES.get(n, (None,))[0]
            if attr and not getattr(args, attr):
                raise UserError(f"--only {n} needs its input: pass --{attr.replace('_', '-')} FILE")
    paths = []
    core = [n for n in names if n in FIGURES]
    if core:  # the sweep's figures need the runs table and the fits; the optional ones only their own file
        paths += make_figures(load_results(args.runs, args.fit_dir, args.curves), args.out, args, core, args.dpi)
    for name in names:
        if name in OPTIONAL_FIGURES:
            attr, draw = OPTIONAL_FIGURES[name]
            paths += save_figure(draw(getattr(args, attr)), args.out, name, args.dpi)
    for path in paths:
        print(path)
    return 0
