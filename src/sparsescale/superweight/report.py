"""Super-weight figures and tables across the analysed models, made only from their result files
(`results/superweight/{model}/{detect,ablation,scale,quantize}.json` and `summary.csv`).

Features
- Figures (`SUPERWEIGHT_FIGURES`, the theme and writer of `plots.py`, PNG + PDF, deterministic bytes):
  `sw_spike_profile` (one panel per model, super-weight layers shaded: the paper's Fig. 3), `sw_ablation`
  (perplexity and last-word accuracy per ablation condition: the paper's Table 1 as bars), `sw_scale` (metric vs
  the super-weight scaling factor 0..3; for a 1.58-bit model the effective ternary weight is scaled, and its
  legend says so), `sw_quantize` (perplexity vs block size, plain RTN vs super-weight aware, per bit width: the
  paper's Fig. 7 in miniature). One colour per model; a model without a super weight says so
  in its label or panel instead of vanishing.
- Tables (`SUPERWEIGHT_TABLES`, Markdown / LaTeX / CSV through `tables.py`): `superweight_summary` (who has super
  weights; its CSV is the summary itself), `superweight_ablation` (the paper's Tables 1-2 layout: perplexity,
  last-word accuracy, stopword probabilities with their ratio to the original, the top next token of
  "Summer is hot. Winter is"), `superweight_quantize` (models x bits x method by block size) and
  `superweight_w8a8` (naive vs super-activation aware activation quantization: the paper's Table 3 layout).
- Emergence in our own models, from curves.csv (the spike statistic the training loop logs at each
  evaluation: `spike_in_ratio`, `spike_out_ratio`, `spike_layer`): `sw_emergence` (ratios against tokens
  seen, one line per run, and against N at each run's last evaluation, by S and precision, the detection
  threshold dotted) and `superweight_emergence` (one row per run). Without those columns: a "no data" panel
  and an empty table that says why.
- `load_report_inputs(dirs)`: {kind: {model: JSON}}; a missing file is named on stdout and that model left out
  of the figure or table that needs it (never silently).
- `sparsescale superweight report --summary summary.csv --dirs A B ... [--curves curves.csv] [--figures DIR]
  [--tables DIR]` (in `superweight.cli`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from sparsescale.plots import (
    CB, N_LABEL, PRECISION_STYLE, figure_grid, side_legend, log_n_axis, no_data, percent_axis, s_colors, s_label, sequential_colors,
    spike_panel, theme,
)
from sparsescale.superweight.detect import DEFAULT_THRESHOLD
from sparsescale.superweight.probes import SUMMER_PROMPT
from sparsescale.superweight.summary import MAKER, read_result
from sparsescale.config import PRECISIONS
from sparsescale.results import MISSING, PRECISION_LABEL, finite, fmt_n, fmt_num, fmt_pct
from sparsescale.tables import Table

KINDS = ("detect", "ablation", "scale", "quantize")


def load_report_inputs(dirs: list[str | Path], log=print) -> dict[str, dict[str, dict]]:
    """{kind: {model name (folder name): JSON}} from each folder's detect/ablation/scale/quantize.json."""
    out: dict[str, dict[str, dict]] = {k: {} for k in KINDS}
    for d in map(Path, dirs):
        for kind in KINDS:
            path = d / f"{kind}.json"
            if path.is_file():
                out[kind][d.name] = read_result(path, kind)
            else:
                log(f"no {path} (made by `{MAKER[kind]}`): {d.name} is left out of the {kind} figure/table")
    return out


# ----------------------------------------------------------------------------------------------------------
# Figures: one colour per model (or one panel per model)

SW_CONDITION_LABEL = {"original": "original", "zero_super_weights": "super\nweights\nzeroed",
                      "zero_super_weights_restore_activation": "zeroed,\nsuper act.\nrestored"}
SW_METHOD_STYLE = {"rtn": ("-", "o", "plain RTN"), "clip": (":", "^", "z-clip only"),
                   "sw_aware": ("--", "s", "super-weight aware")}


def _panels(n: int, size=(3.3, 2.6), max_cols: int = 3, legend_w: float = 1.8):
    """A grid of n panels (max_cols wide) with room on the right for a shared legend; unused cells hidden."""
    ncols = min(max(n, 1), max_cols)
    nrows = -(-max(n, 1) // ncols)
    fig, axes = figure_grid(nrows, ncols, (size[0] * ncols + legend_w, size[1] * nrows))
    flat = list(axes.flat)
    for ax in flat[max(n, 1):]:
        ax.set_visible(False)
    return fig, flat[: max(n, 1)]


def _model_colors(names) -> dict:
    return {name: CB[i % len(CB)] for i, name in enumerate(names)}


def _no_sw(res: dict) -> bool:
    return not res.get("super_weights")


def _accuracy_axis(ax, values) -> None:
    """0 to a little above the best accuracy (at least 10%, so an all-zero panel still has readable ticks)."""
    v = [float(x) for x in values if finite(x)]
    ax.set_ylim(0, max([0.1] + [1.15 * x for x in v]))
    percent_axis(ax.yaxis)


def _log_if_wide(ax, values) -> None:
    """Log y when the values span a decade or more (ablations can multiply perplexity by 100), else linear."""
    v = [float(x) for x in values if finite(x) and x > 0]
    if v and max(v) / min(v) >= 10:
        ax.set_yscale("log")


def plot_spike_profiles(detects: dict[str, dict]) -> Figure:
    """The spike profile of every model (one panel each), super-weight layers shaded (the paper's Fig. 3)."""
    with theme():
        fig, axes = _panels(len(detects))
        if not detects:
            no_data(axes[0], "no detection results")
            return fig
        for ax, (name, det) in zip(axes, detects.items()):
            spike_panel(ax, det, name)
        handles = [Line2D([], [], color=CB[0], marker="o", ms=3.5, label="down_proj input"),
                   Line2D([], [], color=CB[3], marker="s", ms=3.5, label="down_proj output"),
                   Patch(color=CB[2], alpha=0.3, lw=0, label="layer of a super weight"),
                   Patch(color="0.75", alpha=0.3, lw=0, label="echo (not kept)")]
        side_legend(fig, handles, title="max |·| on one prompt")
    return fig


def _condition_order(cond: str) -> tuple[float, str]:
    if cond in SW_CONDITION_LABEL:
        return (list(SW_CONDITION_LABEL).index(cond), cond)
    n = cond.split("_")[1] if cond.startswith("prune_") else ""
    return (len(SW_CONDITION_LABEL) + (float(n) if n.isdigit() else 1e12), cond)


def _condition_label(cond: str) -> str:
    parts = cond.split("_")
    if cond.startswith("prune_") and parts[1].isdigit():
        return f"{int(parts[1]):,}\nlargest\nothers\npruned"
    return SW_CONDITION_LABEL.get(cond, cond.replace("_", " "))


def plot_sw_ablation(ablations: dict[str, dict]) -> Figure:
    """Perplexity and last-word accuracy per ablation condition, one marker per model, its original dotted."""
    with theme():
        fig, axes = figure_grid(1, 2, (8.0, 3.2))
        conds = sorted({c["condition"] for a in ablations.values() for c in a.get("conditions", [])}, key=_condition_order)
        if not conds:
            for ax in axes[0]:
                no_data(ax, "no ablation results")
            return fig
        colors, dodge = _model_colors(ablations), 0.5 / max(len(ablations), 1)
        for ax, (get, label) in zip(axes[0], ((lambda c: c["val"]["ppl"], "validation perplexity"),
                                               (lambda c: c["last_word_accuracy"], "last-word accuracy"))):
            seen = []
            for i, (name, a) in enumerate(ablations.items()):
                by = {c["condition"]: get(c) for c in a.get("conditions", [])}
                seen += by.values()
                xs = [j + (i - (len(ablations) - 1) / 2) * dodge for j, c in enumerate(conds) if c in by]
                ax.plot(xs, [by[c] for c in conds if c in by], "o", color=colors[name], ms=5, zorder=3)
                if "original" in by:
                    ax.axhline(by["original"], color=colors[name], ls=":", lw=0.9)
            ax.set_xticks(range(len(conds)), [_condition_label(c) for c in conds], fontsize="x-small")
            ax.set_xlim(-0.5, len(conds) - 0.5)
            ax.set_ylabel(label)
            (_log_if_wide if ax is axes[0, 0] else _accuracy_axis)(ax, seen)
        handles = [Line2D([], [], color=colors[n], marker="o", ms=5, lw=0,
                          label=n + ("\n(no super weight:\noriginal only)" if _no_sw(a) else "")) for n, a in ablations.items()]
        handles.append(Line2D([], [], color="0.4", ls=":", lw=0.9, label="original model"))
        side_legend(fig, handles)
    return fig


def _scale_label(name: str, sc: dict) -> str:
    """The model's legend entry; a 1.58-bit model says that its effective (ternary) weight was scaled."""
    if not sc.get("points"):
        return f"{name}: none found"
    return f"{name}\n(effective ternary\nweight scaled)" if str(sc.get("scaled", "")).startswith("effective") else name


def plot_sw_scale(scales: dict[str, dict]) -> Figure:
    """Perplexity and last-word accuracy with the super weights scaled by 0…3 (1 = the original model); in a
    1.58-bit model the effective ternary weight is scaled (its latent weight would round to the same value)."""
    with theme():
        fig, axes = figure_grid(1, 2, (7.6, 3.0))
        colors = _model_colors(scales)
        if not any(s.get("points") for s in scales.values()):
            for ax in axes[0]:
                no_data(ax, "none found:\nnothing to scale" if scales else "no scale results")
            if scales:
                side_legend(fig, [Line2D([], [], color=colors[n], lw=0, marker="o", label=f"{n}: none found") for n in scales])
            return fig
        for ax, (get, label) in zip(axes[0], ((lambda p: p["val"]["ppl"], "validation perplexity"),
                                               (lambda p: p["last_word_accuracy"], "last-word accuracy"))):
            seen = []
            for name, sc in scales.items():
                pts = sorted(sc.get("points") or [], key=lambda p: p["factor"])
                if pts:
                    seen += [get(p) for p in pts]
                    ax.plot([p["factor"] for p in pts], [get(p) for p in pts], color=colors[name], marker="o", ms=3.5)
            ax.axvline(1.0, color="0.5", ls=":", lw=0.9)
            ax.set_xlabel("super-weight scaling factor")
            ax.set_ylabel(label)
            (_log_if_wide if ax is axes[0, 0] else _accuracy_axis)(ax, seen)
        handles = [Line2D([], [], color=colors[n], marker="o", ms=3.5, lw=1.2 if sc.get("points") else 0,
                          label=_scale_label(n, sc)) for n, sc in scales.items()]
        handles.append(Line2D([], [], color="0.5", ls=":", lw=0.9, label="factor 1 = original"))
        side_legend(fig, handles)
    return fig


def block_text(b) -> str:
    """A block size as the paper writes it: 262144 -> "512²" (a square of a power of two), else the number."""
    if isinstance(b, str):
        return b
    r = round(b ** 0.5)
    return f"{r}²" if r * r == b and r & (r - 1) == 0 and r >= 8 else str(b)


def _block_order(blocks) -> list:
    """Numeric block sizes ascending, then the named granularities (channel, tensor)."""
    return sorted(set(blocks), key=lambda b: (1, str(b)) if isinstance(b, str) else (0, b))


def plot_sw_quantize(quants: dict[str, dict]) -> Figure:
    """Perplexity vs block size per model: plain RTN vs super-weight aware, per bit width (the paper's Fig. 7)."""
    with theme():
        fig, axes = _panels(len(quants))
        if not quants:
            no_data(axes[0], "no quantization results")
            return fig
        bits = sorted({p["bits"] for q in quants.values() for p in q.get("points", [])})
        bcolors = sequential_colors(bits, "rocket", 0.15, 0.75)
        for ax, (name, q) in zip(axes, quants.items()):
            ax.set_title(name + (" (no super weight)" if _no_sw(q) else ""), fontsize="medium")
            blocks = _block_order(p["block"] for p in q.get("points", []))
            if not blocks:
                no_data(ax, "no quantization points")
                continue
            for (b, method), g in pd.DataFrame(q["points"]).groupby(["bits", "method"], sort=True):
                g = g.assign(pos=[blocks.index(v) for v in g.block]).sort_values("pos")
                ls, marker, _ = SW_METHOD_STYLE.get(method, ("-.", "x", method))
                ax.plot(g.pos, g.ppl, color=bcolors[float(b)], ls=ls, marker=marker, ms=3.5)
            if finite((q.get("baseline") or {}).get("ppl")):
                ax.axhline(q["baseline"]["ppl"], color="0.4", ls=":", lw=0.9)
            ax.set_xticks(range(len(blocks)), [block_text(b) for b in blocks])
            _log_if_wide(ax, [p["ppl"] for p in q["points"]] + [(q.get("baseline") or {}).get("ppl")])
            ax.set_xlabel("block size (elements)")
            ax.set_ylabel("validation perplexity")
        methods = sorted({p["method"] for q in quants.values() for p in q.get("points", [])}, key=list(SW_METHOD_STYLE).index)
        handles = [Line2D([], [], color=bcolors[float(b)], lw=1.5, label=f"{b}-bit weights") for b in bits]
        handles += [Line2D([], [], color="0.3", ls=SW_METHOD_STYLE[m][0], marker=SW_METHOD_STYLE[m][1], ms=3.5,
                           label=SW_METHOD_STYLE[m][2]) for m in methods]
        handles.append(Line2D([], [], color="0.4", ls=":", lw=0.9, label="unquantized"))
        side_legend(fig, handles)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Emergence in our own models: the spike statistic logged at every evaluation (curves.csv)

SPIKE_COLUMNS = {"spike_in_ratio": "max |down_proj input| ratio", "spike_out_ratio": "max |down_proj output| ratio"}
NO_SPIKES = "no spike statistics in curves.csv\n(spike_in_ratio / spike_out_ratio,\nlogged at each evaluation)"


def spike_curves(curves: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of curves.csv that carry a spike statistic; None when the columns are absent or all empty."""
    need = {"run_id", "tokens", "sparsity", "precision", *SPIKE_COLUMNS}
    if curves is None or not need <= set(curves.columns):
        return None
    c = curves.dropna(subset=list(SPIKE_COLUMNS), how="all")
    return None if c.empty else c


def spike_last_rows(c: pd.DataFrame) -> pd.DataFrame:
    """Per run, its last row with a spike statistic (the most tokens)."""
    return c.sort_values(["run_id", "tokens"], kind="mergesort").groupby("run_id", sort=True).tail(1)


def plot_spike_emergence(curves: pd.DataFrame | None, threshold: float = DEFAULT_THRESHOLD) -> Figure:
    """Do super activations emerge in our models? The detector's spike ratios (input, output) against tokens seen
    (one line per run) and against N (each run's last evaluation, mean over seeds), by S and precision."""
    with theme():
        fig, axes = figure_grid(2, 2, (7.6, 5.2))
        c = spike_curves(curves)
        if c is None:
            for ax in axes.flat:
                no_data(ax, NO_SPIKES)
            return fig
        colors = s_colors(c.sparsity)
        last = spike_last_rows(c)
        for row, (col, label) in enumerate(SPIKE_COLUMNS.items()):
            ax = axes[row, 0]
            for (_, prec, s), g in c.dropna(subset=[col]).groupby(["run_id", "precision", "sparsity"], sort=True):
                g = g.sort_values("tokens")
                ax.plot(g.tokens, g[col], color=colors[s], ls=PRECISION_STYLE.get(prec, ":"), lw=1.0, marker="o", ms=2)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel("training tokens")
            ax.set_ylabel(label)
            ax = axes[row, 1]
            pts = last.dropna(subset=[col, "n_params"]) if "n_params" in last else last.iloc[:0]
            if pts.empty:
                no_data(ax, "no N (n_params)\nin curves.csv")
            for (prec, s), g in pts.groupby(["precision", "sparsity"], sort=True):
                m = g.groupby("n_params", sort=True)[col].mean()
                ax.plot(m.index, m.values, color=colors[s], ls=PRECISION_STYLE.get(prec, ":"), lw=1.0, marker="s", ms=3)
            if not pts.empty:
                ax.set_xscale("log")
                log_n_axis(ax.xaxis, subs=(1.0, 2.0, 5.0))
                ax.set_xlabel(N_LABEL + "\n(last evaluation)")
            for a in axes[row]:
                if a.has_data():
                    a.axhline(threshold, color="0.4", ls=":", lw=0.9)
                    a.set_yscale("log")
                    a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10: ratios read directly
                    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    a.yaxis.set_minor_formatter(NullFormatter())
        handles = [Line2D([], [], color=colors[s], lw=1.2, label=s_label(s)) for s in colors]
        handles += [Line2D([], [], color="0.3", ls=PRECISION_STYLE[p], lw=1.2, label=PRECISION_LABEL[p])
                    for p in PRECISIONS if (c.precision == p).any()]
        handles.append(Line2D([], [], color="0.4", ls=":", lw=0.9, label=f"detection threshold ({threshold:g})"))
        side_legend(fig, handles, title="ratio to the median layer")
    return fig


def superweight_emergence_table(curves: pd.DataFrame | None, threshold: float = DEFAULT_THRESHOLD) -> Table:
    """Per run, the spike statistic at its last evaluation: does a layer stand out as a super weight's would?"""
    header = ["Size", "N", "Precision", "S", "Seed", "Tokens", "Input ratio", "Output ratio", "Layer", "Both >= threshold"]
    cols = ["run_id", "size", "n_params", "precision", "sparsity", "seed", "tokens", "spike_in_ratio",
            "spike_out_ratio", "spike_layer"]
    c = spike_curves(curves)
    notes = [f"The detector's statistic at each run's last evaluation (one prompt): the largest max |down_proj input| and "
             f"max |output| of a layer divided by the median of the other layers, and the layer closest to firing; a "
             f"super weight makes both reach the threshold ({threshold:g}) in one layer (the two maxima may sit in "
             "different layers: the detection then decides). N: non-embedding parameters; S: target sparsity."]
    if c is None:
        return Table("superweight_emergence", header, [], pd.DataFrame(columns=cols),
                     [NO_SPIKES.replace("\n", " ")] + notes)
    last = spike_last_rows(c)
    last = last.assign(**{k: last[k] if k in last else float("nan") for k in cols})
    order = {p: i for i, p in enumerate(PRECISIONS)}
    last = last.assign(_p=last.precision.map(order)).sort_values(["_p", "n_params", "sparsity", "seed"], kind="mergesort")
    rows = []
    for r in last.itertuples(index=False):
        both = finite(r.spike_in_ratio) and finite(r.spike_out_ratio) and min(r.spike_in_ratio, r.spike_out_ratio) >= threshold
        rows.append([str(r.size) if isinstance(r.size, str) else MISSING, fmt_n(r.n_params) if finite(r.n_params) else MISSING,
                     PRECISION_LABEL.get(r.precision, str(r.precision)), fmt_pct(r.sparsity, 0),
                     str(int(r.seed)) if finite(r.seed) else MISSING, fmt_n(r.tokens),
                     f"{r.spike_in_ratio:.3g}" if finite(r.spike_in_ratio) else MISSING,
                     f"{r.spike_out_ratio:.3g}" if finite(r.spike_out_ratio) else MISSING,
                     str(int(r.spike_layer)) if finite(r.spike_layer) else MISSING, "yes" if both else "no"])
    return Table("superweight_emergence", header, rows, last[cols].reset_index(drop=True), notes)


# name -> function({kind: {model: JSON}}) -> Figure; drawn by `sparsescale superweight report --figures DIR`.
SUPERWEIGHT_FIGURES: dict[str, Callable[[dict], Figure]] = {
    "sw_spike_profile": lambda r: plot_spike_profiles(r["detect"]),
    "sw_ablation": lambda r: plot_sw_ablation(r["ablation"]),
    "sw_scale": lambda r: plot_sw_scale(r["scale"]),
    "sw_quantize": lambda r: plot_sw_quantize(r["quantize"]),
    "sw_emergence": lambda r: plot_spike_emergence(r.get("curves")),
}


# ----------------------------------------------------------------------------------------------------------
# Tables

STOPWORD_KEYS = {"the": "the", ".": "period", ",": "comma"}  # probes.STOPWORDS -> CSV column suffix


def superweight_summary_table(summary: pd.DataFrame) -> Table:
    """One row per model: do its super weights exist (coordinates, or "none found"), and does top-K keep them?"""
    header = ["Model", "Precision", "S", "N", "Super weights", "Coordinates (layer, row, col)", "Max spike ratio",
              "Kept by top-K"]
    rows = []
    for r in summary.itertuples(index=False):
        spike = f"{r.max_spike_ratio:.3g} (layer {int(r.spike_layer)})" if finite(r.max_spike_ratio) else MISSING
        rows.append([r.model, PRECISION_LABEL.get(r.precision, r.precision), fmt_pct(r.sparsity, 0),
                     fmt_n(r.n_params) if finite(r.n_params) else MISSING, str(int(r.n_super_weights)), r.coordinates,
                     spike, r.kept_by_topk])
    rules = sorted({f"{r.rule} rule, threshold {r.threshold:g}" for r in summary.itertuples(index=False)})
    notes = [f"Detection on one prompt ({'; '.join(rules) or 'no models'}): a layer fires when its max |down_proj input| "
             "and max |output| are both at least the threshold times the median of the other layers; max spike ratio is "
             "the largest, over layers, of the smaller of the two ratios (compare it with the threshold).",
             "Kept by top-K: whether the Q-Sparse mask keeps each super activation's input X[t, k] (n/a for dense models). "
             "N: non-embedding parameters (— for a checkpoint outside the sweep); S: target sparsity."]
    echoes = [f"{r.model} ({int(r.n_echoes)})" for r in summary.itertuples(index=False) if finite(r.n_echoes) and r.n_echoes > 0]
    if echoes:
        notes.append(f"Echoes (late-layer spikes that do not persist, not counted): {', '.join(echoes)}.")
    known = [f"{r.model}: {'agrees' if r.known_agrees == 'yes' else 'differs'}" for r in summary.itertuples(index=False)
             if r.known_agrees]
    if known:
        notes.append(f"Against the published coordinates: {', '.join(known)}.")
    return Table("superweight_summary", header, rows, summary.reset_index(drop=True), notes)


def fmt_ppl(x) -> str:
    """Perplexity with two decimals (quantization moves it by tenths), scientific when huge."""
    return MISSING if not finite(x) else f"{x:.2f}" if abs(x) < 1e4 else f"{x:.3e}"


def _top(c: dict) -> tuple[str, float]:
    t = (c.get("top_tokens") or [{}])[0]
    return t.get("token", ""), t.get("prob", float("nan"))


def superweight_ablation_table(ablations: dict[str, dict]) -> Table:
    """Per model and condition: loss, perplexity, last-word accuracy, stopword probabilities, the top next token."""
    header = ["Model", "Condition", "Val. loss", "PPL", "Last-word acc."] + [f"P({w})" for w in STOPWORD_KEYS]
    header.append(f'Top next token after "{SUMMER_PROMPT}"')
    rows, records, groups, notes = [], [], [], []
    for name, a in ablations.items():
        groups.append(len(rows))
        conds = sorted(a.get("conditions", []), key=lambda c: _condition_order(c["condition"]))
        for c in conds:
            token, prob = _top(c)
            rec = {"model": name, "condition": c["condition"], "n": c.get("n"), "val_loss": c["val"]["loss"],
                   "val_ppl": c["val"]["ppl"], "last_word_accuracy": c["last_word_accuracy"],
                   "n_prompts": c.get("n_prompts"), "top_token": token, "top_token_prob": prob}
            cells = [name, _condition_label(c["condition"]).replace("\n", " "), f"{c['val']['loss']:.4f}",
                     fmt_ppl(c["val"]["ppl"]), fmt_pct(c["last_word_accuracy"], 1)]
            for w, key in STOPWORD_KEYS.items():
                p, ratio = (c.get("stopword_prob") or {}).get(w), (c.get("stopword_ratio") or {}).get(w)
                rec[f"p_{key}"], rec[f"ratio_{key}"] = p, ratio
                cell = fmt_num(p)
                if c["condition"] != "original" and finite(ratio):
                    cell += f" (×{ratio:.3g})"
                cells.append(cell)
            cells.append(f"{json.dumps(token)} {fmt_pct(prob, 1)}" if token else MISSING)
            rows.append(cells)
            records.append(rec)
        frac = (a.get("summary") or {}).get("restore_recovered_fraction")
        if finite(frac):
            notes.append(f"{name}: restoring the super activation recovers {fmt_pct(frac, 1)} of the loss increase.")
        per = (a.get("summary") or {}).get("per_weight")
        if per and per.get("weights"):
            each = "; ".join(f"{tuple(w['coord'])} {w['loss_increase']:+.3g} nats ({w['verdict']})" for w in per["weights"])
            ctrl = per.get("control")
            notes.append(f"{name}: each weight zeroed alone: {each}" + (
                f"; the largest other weight ({ctrl['name']} [{ctrl['row']}, {ctrl['col']}]) {ctrl['loss_increase']:+.3g} nats"
                if ctrl else "") + ".")
        if a.get("note"):
            notes.append(f"{name}: {a['note']}.")
    notes.insert(0, "Loss in nats/token on the validation split; last-word accuracy and the stopword probabilities "
                    "(the mean next-token probability after the last-word contexts; in brackets the ratio to the "
                    "original model) over held-out paragraphs; top token of the model's own tokenizer.")
    cols = ["model", "condition", "n", "val_loss", "val_ppl", "last_word_accuracy", "n_prompts"]
    cols += [f"{p}_{k}" for k in STOPWORD_KEYS.values() for p in ("p", "ratio")] + ["top_token", "top_token_prob"]
    return Table("superweight_ablation", header, rows, pd.DataFrame(records, columns=cols), notes, groups=groups)


def _block_label(b) -> str:
    return f"block {block_text(b)}" if not isinstance(b, str) else f"per {b}"


def superweight_quantize_table(quants: dict[str, dict]) -> Table:
    """Validation perplexity per model, bits and method (rows) and block size (columns), the unquantized beside."""
    blocks = _block_order(p["block"] for q in quants.values() for p in q.get("points", []))
    header = ["Model", "Bits", "Method", "Unquantized"] + [_block_label(b) for b in blocks]
    rows, records, groups, whole = [], [], [], {}
    for name, q in quants.items():
        groups.append(len(rows))
        base = (q.get("baseline") or {}).get("ppl")
        pts = pd.DataFrame(q.get("points") or [], columns=["bits", "block", "method", "z", "calib_mse", "loss", "ppl"])
        for (bits, method), g in pts.groupby(["bits", "method"], sort=False):
            by = dict(zip(g.block, g.ppl))
            rows.append([name, str(bits), SW_METHOD_STYLE.get(method, ("", "", method))[2], fmt_ppl(base)]
                        + [fmt_ppl(by[b]) if b in by else MISSING for b in blocks])
        for p in q.get("points") or []:
            st = p.get("quant") or {}
            records.append({"model": name, "bits": p["bits"], "block": p["block"], "method": p["method"], "z": p.get("z"),
                            "calib_mse": p.get("calib_mse"), "val_loss": p["loss"], "val_ppl": p["ppl"], "baseline_ppl": base,
                            "n_tensors": st.get("n_tensors"), "n_whole_tensor": st.get("n_whole_tensor")})
            if st.get("n_whole_tensor"):
                whole.setdefault((name, p["block"]), (st["n_whole_tensor"], st["n_tensors"]))
    notes = ["Validation perplexity after quantizing every decoder linear (asymmetric round-to-nearest over blocks of "
             "contiguous elements; not the embeddings, norms or LM head). Super-weight aware: clip each block at "
             "z std(|W|) + mean(|W|), z chosen on a calibration split of the training data (z in the CSV), then restore "
             "the super weights in full precision. Without a super weight it is the clipping alone.",
             "Block sizes as in the paper (512² = 262144 elements): on Llama-7B (INT4) the two methods are equal up to "
             "256² and separate from 512² on (average accuracy 50.5 vs 57.9 at 512², 27.6 vs 45.4 at 1024²)."]
    notes += [f"{name}, block {block_text(b)}: {w} of {n} weight matrices are no larger than one block (quantized per "
              "tensor)." for (name, b), (w, n) in whole.items()]
    cols = ["model", "bits", "block", "method", "z", "calib_mse", "val_loss", "val_ppl", "baseline_ppl", "n_tensors",
            "n_whole_tensor"]
    return Table("superweight_quantize", header, rows, pd.DataFrame(records, columns=cols), notes, groups=groups)


def superweight_w8a8_table(quants: dict[str, dict]) -> Table:
    """W8A8 perplexity: naive vs super-activation aware activation quantization, per tensor and per token."""
    keys = list(dict.fromkeys((p["act_granularity"], p["method"]) for q in quants.values() for p in q.get("act_points") or []))
    label = {"naive": "naive", "sa_aware": "super-act. aware"}
    header = ["Model", "Unquantized"] + [f"W8A8 per-{g} {label.get(m, m)}" for g, m in keys]
    rows, records = [], []
    for name, q in quants.items():
        by = {(p["act_granularity"], p["method"]): p for p in q.get("act_points") or []}
        rows.append([name, fmt_ppl((q.get("baseline") or {}).get("ppl"))]
                    + [fmt_ppl(by[k]["ppl"]) if k in by else MISSING for k in keys])
        records += [{"model": name, "act_bits": p["act_bits"], "act_granularity": p["act_granularity"], "method": p["method"],
                     "n_super_activations": p["n_super_activations"], "val_loss": p["loss"], "val_ppl": p["ppl"]}
                    for p in q.get("act_points") or []]
    notes = ["Weights 8-bit per output channel, activations 8-bit (asymmetric, per tensor or per token) at the input of "
             "every decoder linear; super-activation aware: each super activation is replaced by the median before "
             "quantization and restored in full precision after (the paper's W8A8 comparison)."]
    cols = ["model", "act_bits", "act_granularity", "method", "n_super_activations", "val_loss", "val_ppl"]
    return Table("superweight_w8a8", header, rows, pd.DataFrame(records, columns=cols), notes)


# name -> function({kind: {model: JSON}, "summary": DataFrame}) -> Table; `superweight report --tables DIR`.
SUPERWEIGHT_TABLES: dict[str, Callable[[dict], Table]] = {
    "superweight_summary": lambda r: superweight_summary_table(r["summary"]),
    "superweight_ablation": lambda r: superweight_ablation_table(r["ablation"]),
    "superweight_quantize": lambda r: superweight_quantize_table(r["quantize"]),
    "superweight_w8a8": lambda r: superweight_w8a8_table(r["quantize"]),
    "superweight_emergence": lambda r: superweight_emergence_table(r.get("curves")),
}
