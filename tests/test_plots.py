"""Figures: every figure renders from the synthetic runs, draws the law it was given, reruns byte-identically,
and degrades to a labelled empty panel (never a crash) when an optional input is missing."""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import synthetic  # noqa: E402

from sparsescale import plots as P  # noqa: E402
from sparsescale import results as R  # noqa: E402
from sparsescale.errors import UserError  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from sparsescale.scaling import PAPER_S_STAR, law  # noqa: E402

OPTS = argparse.Namespace(curves_size=None)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return synthetic.write_inputs(tmp_path_factory.mktemp("plots"))


@pytest.fixture(scope="module")
def results(inputs):
    return R.load_results(inputs["runs"], inputs["fit_dir"], inputs["curves"])


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def legend_labels(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_cli_renders_every_figure_as_png_and_pdf(inputs, tmp_path):
    out = tmp_path / "figs"
    argv = ["--runs", str(inputs["runs"]), "--curves", str(inputs["curves"]), "--fit-dir", str(inputs["fit_dir"]), "--out", str(out),
            "--dpi", "60"]  # low resolution keeps the test fast; the default is 200
    assert P.cli_figures(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.{e}" for n in P.FIGURES for e in ("png", "pdf"))
    assert len(P.FIGURES) == 8
    for n in P.FIGURES:
        png, pdf = (out / f"{n}.png").read_bytes(), (out / f"{n}.pdf").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in png  # no version stamp
        assert pdf[:5] == b"%PDF-" and b"CreationDate" not in pdf  # no timestamp
        assert len(png) > 5_000  # something was drawn


def test_rerun_is_byte_identical(results, tmp_path):
    paths = []
    for name in ("a", "b"):
        paths.append(P.make_figures(results, tmp_path / name, OPTS, names=["fig1_scaling"], dpi=60))
    assert len(paths[0]) == 2
    for a, b in zip(*paths):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_fig1_lines_are_the_fitted_law(results):
    fig = P.plot_scaling(results.runs, results.fits)
    for ax, prec in zip(fig.axes[:2], ("fp", "1.58")):
        params = results.fits[prec]["params"]
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 200]
        assert len(lines) == 4  # one law line per sparsity
        for ln, s in zip(lines, sorted(results.runs.sparsity.unique())):
            x, y = np.asarray(ln.get_xdata()), np.asarray(ln.get_ydata())
            np.testing.assert_allclose(y, law(params, x, s), rtol=1e-12)
    assert ax.get_xscale() == "log"
    assert fig.axes[0].get_ylabel() == "validation loss (nats/token)"
    assert fig.axes[0].get_xlabel() == "non-embedding parameters N"
    assert "S = 0% (dense)" in legend_labels(fig)


def test_fig2_marks_dense_loss_per_size(results):
    fig = P.plot_loss_vs_sparsity(results.runs, results.fits)
    ax = fig.axes[0]
    runs = results.runs
    dense = runs[(runs.precision == "fp") & (runs.sparsity == 0)].groupby("n_params").val_loss.mean()
    hlines = sorted(ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == ":")
    np.testing.assert_allclose(hlines, sorted(dense.values), rtol=1e-12)


def test_fig2_frames_the_measured_losses_not_the_extrapolated_law(results):
    """A law that shoots up past the largest measured S must not squash the data (seen on the default sweep)."""
    fits = {p: dict(f, params=dict(f["params"], C=f["params"]["C"] * 1e6)) for p, f in results.fits.items() if f}
    fig = P.plot_loss_vs_sparsity(results.runs, fits)
    lo, hi = fig.axes[0].get_ylim()
    y = results.runs.groupby(["precision", "n_params", "sparsity"]).val_loss
    ymin, ymax = (y.mean() - y.std().fillna(0)).min(), (y.mean() + y.std().fillna(0)).max()
    pad = max(0.5 * (ymax - ymin), 0.05)
    assert lo == pytest.approx(ymin - pad) and hi == pytest.approx(ymax + pad)


def test_fig3_marks_fitted_and_paper_s_star(results):
    fig = P.plot_optimal_sparsity(results.fits)
    ax = fig.axes[0]
    vlines = {round(float(ln.get_xdata()[0]), 6) for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1}
    for prec in ("fp", "1.58"):
        assert round(results.fits[prec]["s_star"], 6) in vlines
        assert round(PAPER_S_STAR[prec], 6) in vlines
    bands = [p.get_x() for p in ax.patches]  # axvspan rectangles: the bootstrap intervals
    assert sorted(round(b, 6) for b in bands) == sorted(round(results.fits[p]["s_star_ci"][0], 6) for p in ("fp", "1.58"))
    labels = legend_labels(fig)
    assert any("paper: S* = 45.58%" in s for s in labels) and any("paper: S* = 61.25%" in s for s in labels)
    assert any("printed constants: S* = 50.2%" in s for s in labels)


def test_fig3_one_legend_entry_per_shaded_interval(results):
    """Each precision's bootstrap band is shaded in its own colour and named once in the legend; no other shading."""
    fig = P.plot_optimal_sparsity(results.fits)
    ax = fig.axes[0]
    spans = ax.patches  # the axvspan rectangles: nothing else on this axes is a patch
    assert len(spans) == 2
    (legend,) = fig.legends
    bands = [(t.get_text(), h) for t, h in zip(legend.get_texts(), legend.legend_handles) if "bootstrap interval" in t.get_text()]
    assert [t for t, _ in bands] == ["full precision: 95% bootstrap interval of S*", "1.58-bit: 95% bootstrap interval of S*"]
    for (_, handle), span, prec in zip(bands, spans, ("fp", "1.58")):
        assert to_rgb(handle.get_facecolor()) == to_rgb(span.get_facecolor()) == to_rgb(P.PRECISION_COLOR[prec])
        lo, hi = results.fits[prec]["s_star_ci"]
        assert span.get_x() == pytest.approx(lo) and span.get_x() + span.get_width() == pytest.approx(hi)
    # every legend patch is one of the two bands (no unlabelled extra shading, no band without a shading)
    assert sum(isinstance(h, matplotlib.patches.Patch) for h in legend.legend_handles) == 2


def test_fig4_frontier_is_the_minimum_over_s(results):
    fig = P.plot_activated(results.runs, results.fits)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 200]
    frontier = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert len(frontier) == 1 and len(lines) == 5
    fy = np.asarray(frontier[0].get_ydata())
    for ln in lines:
        assert np.all(fy <= np.asarray(ln.get_ydata()) + 1e-12)
    # and it is reached: a dense grid of S never beats it
    params, na = results.fits["fp"]["params"], np.asarray(frontier[0].get_xdata())
    best = min(law(params, na / (1 - s), s).min() for s in np.linspace(0, 0.95, 96))
    assert best >= fy.min() - 1e-9


def test_fig5_picks_largest_size_and_rejects_unknown(results):
    assert P.pick_curve_size(results.curves) == "d8"
    fig = P.plot_curves(results.curves)
    assert "d8" in fig._suptitle.get_text()
    train = fig.axes[0].get_lines()
    assert len(train) == 8  # 4 sparsities x 2 precisions
    assert {ln.get_linestyle() for ln in train} == {"-", "--"}
    fig = P.plot_curves(results.curves, "d2")
    assert "d2" in fig._suptitle.get_text()
    with pytest.raises(UserError, match="no training curves for size 'd99'"):
        P.plot_curves(results.curves, "d99")


def test_fig5_marks_each_precision_with_its_own_marker(results):
    """Validation-loss points: circles for full precision, squares for 1.58-bit (not one marker for both)."""
    fig = P.plot_curves(results.curves)
    train, val = fig.axes[0].get_lines(), fig.axes[1].get_lines()
    assert {ln.get_marker() for ln in train} == {"None"}  # training loss: lines only
    assert len(val) == 8
    assert {ln.get_marker() for ln in val} == {"o", "s"}
    style_to_marker = {P.PRECISION_STYLE[p]: P.PRECISION_MARKER[p] for p in ("fp", "1.58")}
    assert style_to_marker == {"-": "o", "--": "s"}
    for ln in val:  # four sparsities per precision, each with its precision's marker
        assert ln.get_marker() == style_to_marker[ln.get_linestyle()]
    assert sorted(ln.get_marker() for ln in val) == ["o"] * 4 + ["s"] * 4
    # the legend names the precisions with the same markers
    (legend,) = fig.legends
    marks = {t.get_text(): h.get_marker() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert marks["full precision"] == "o" and marks["1.58-bit"] == "s"


def test_fig6_plots_measured_sparsity_per_projection(results):
    fig = P.plot_measured_sparsity(results.runs)
    ax = fig.axes[0]
    data = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 4 and ln.get_linestyle() != "None"]
    assert len(data) == 5  # qkv, o, gate/up, down, overall
    down = data[3]
    np.testing.assert_allclose(np.asarray(down.get_ydata(), float), [synthetic.measured_sparsity(s)["down"] for s in (0, 0.4, 0.6, 0.8)])


def test_fig7_residuals_are_small_against_the_true_law(results):
    r = P.residuals(P.fit_runs(results.runs[results.runs.precision == "fp"]), results.fits["fp"])
    assert len(r) == 32
    assert np.abs(r.residual).max() < 4 * synthetic.NOISE
    expected = r.val_loss / law(synthetic.TRUE_PARAMS["fp"], r.n_params, r.sparsity) - 1
    np.testing.assert_allclose(r.residual, expected, rtol=1e-12)
    fig = P.plot_residuals(results.runs, results.fits)
    assert len(fig.axes) == 6
    assert any("held out: N = 8M" in t for t in texts(fig))


def test_fig7_size_axis_has_no_minor_tick_labels(results):
    """The log-N axes label only their major ticks: the minor labels (2x10^4, 3x10^4, ...) overlapped."""
    fig = P.plot_residuals(results.runs, results.fits)
    size_axes = [ax for ax in fig.axes if ax.get_xscale() == "log"]
    assert size_axes == [fig.axes[0], fig.axes[3]]  # column 1 of each precision's row
    FigureCanvasAgg(fig).draw()  # ticks and their labels are made at draw time
    for ax in size_axes:
        assert isinstance(ax.xaxis.get_minor_formatter(), NullFormatter)
        assert len(ax.get_xticks(minor=True)) > 0  # the minor ticks are there ...
        assert [t.get_text() for t in ax.get_xticklabels(minor=True)] == [""] * len(ax.get_xticks(minor=True))  # ... unlabelled
        lo, hi = ax.get_xlim()
        assert any(t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= x <= hi)  # majors are labelled


def test_missing_optional_inputs_give_labelled_panels(tmp_path):
    p = synthetic.write_inputs(tmp_path, precisions=("fp",), fits=("fp",))
    res = R.load_results(p["runs"], p["fit_dir"], p["curves"])
    assert res.fits["1.58"] is None
    for name, draw in P.FIGURES.items():
        fig = draw(res, OPTS)
        if name in ("fig1_scaling", "fig2_loss_vs_sparsity", "fig4_activated", "fig6_measured_sparsity", "fig7_residuals"):
            assert "no runs" in texts(fig), name
    assert any("1.58-bit: no fit" in s for s in legend_labels(P.plot_optimal_sparsity(res.fits)))
    # runs present but no fit: data only, said on the panel
    q = synthetic.write_inputs(tmp_path / "nofit", fits=("fp",))
    res = R.load_results(q["runs"], q["fit_dir"])
    assert "no fit: data only" in texts(P.plot_scaling(res.runs, res.fits))
    assert "no training curves" in texts(P.plot_curves(None))


def test_missing_required_inputs_name_the_command(inputs, tmp_path):
    base = ["--runs", str(inputs["runs"]), "--curves", str(inputs["curves"]), "--fit-dir", str(inputs["fit_dir"]), "--out", str(tmp_path)]
    with pytest.raises(UserError, match=r"training curves table not found: .*nope\.csv.*sparsescale aggregate"):
        P.cli_figures(base[:2] + ["--curves", str(tmp_path / "nope.csv")] + base[4:])
    with pytest.raises(UserError, match="no fit results in .*sparsescale fit"):
        P.cli_figures(base[:4] + ["--fit-dir", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="unknown figure 'fig0'"):
        P.cli_figures(base + ["--only", "fig0"])
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_extension_figures(tmp_path):
    profile = {"layers": [{"layer": i, "max_abs_input": 3.0 + 200 * (i == 1), "max_abs_output": 2.0 + 900 * (i == 1)} for i in range(4)]}
    fig = P.plot_spike_profile(profile)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and [float(v) for v in ax.get_lines()[0].get_ydata()] == [3.0, 203.0, 3.0, 3.0]
    bench = pd.DataFrame({"d_in": 64, "d_out": 128, "dtype": "float32", "sparsity": [0.0, 0.5, 0.8], "dense_ms": 1.0,
                          "sparse_ms": [1.0, 0.6, 0.4], "speedup": [1.0, 1.67, 2.5], "ideal": [1.0, 2.0, 5.0], "fraction_of_ideal": [1.0, 0.83, 0.5]})
    fig = P.plot_speedup(bench)
    assert [float(v) for v in fig.axes[0].get_lines()[0].get_ydata()] == [1.0, 1.67, 2.5]
    (tmp_path / "p.json").write_text(json.dumps(profile))
    bench.to_csv(tmp_path / "b.csv", index=False)
    fig = P.OPTIONAL_FIGURES["fig8_spike_profile"][1](str(tmp_path / "p.json"))  # the CLI's reader
    assert len(fig.axes[0].get_lines()) == 2
    paths = P.save_figure(P.OPTIONAL_FIGURES["fig9_speedup"][1](str(tmp_path / "b.csv")), tmp_path / "o", "fig9_speedup", dpi=50)
    assert [p.name for p in paths] == ["fig9_speedup.png", "fig9_speedup.pdf"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(UserError, match="--bench file not found"):
        P.OPTIONAL_FIGURES["fig9_speedup"][1](str(tmp_path / "none.csv"))
