"""Tables: the numbers written are the numbers read (parsed back), reruns are byte-identical, bad input is named."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import synthetic

from sparsescale import results as R
from sparsescale import tables as T
from sparsescale.errors import UserError
from sparsescale.io import read_json, write_json
from sparsescale.scaling import PAPER_CONSTANTS, PAPER_S_STAR, inference_cost_factor


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return synthetic.write_inputs(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def results(inputs):
    return R.load_results(inputs["runs"], inputs["fit_dir"])


def md_rows(text: str) -> list[list[str]]:
    """Cells of a Markdown table (header first), separator row dropped."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for i, line in enumerate(lines) if i != 1]


def csv_frame(t: T.Table) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(T.to_csv(t)), dtype={"precision": str, "size": str, "mode": str})


# ---------------------------------------------------------------------------------------------- fit constants


def test_fit_constants_csv_round_trips_the_fit_json(inputs, results):
    df = csv_frame(T.fit_constants_table(results.fits, results.optimal))
    for prec in ("fp", "1.58"):
        fit = read_json(inputs["fit_dir"] / f"fit_{prec}.json")
        for key in ("E", "B", "C", "alpha", "beta"):
            row = df[(df.precision == prec) & (df.quantity == key)].iloc[0]
            assert row.value == pytest.approx(fit["params"][key], rel=1e-11)
            assert (row.ci_lo, row.ci_hi) == pytest.approx(tuple(fit["ci"][key]), rel=1e-11)
            if prec == "fp":
                assert row.paper == PAPER_CONSTANTS[key]
            else:  # no 1.58-bit constants were published
                assert math.isnan(row.paper)
        star = df[(df.precision == prec) & (df.quantity == "s_star")].iloc[0]
        assert star.value == pytest.approx(fit["s_star"], rel=1e-11)
        assert (star.ci_lo, star.ci_hi) == pytest.approx(tuple(fit["s_star_ci"]), rel=1e-11)
        assert star.paper == PAPER_S_STAR[prec]
        nna = df[(df.precision == prec) & (df.quantity == "n_over_na")].iloc[0]
        assert nna.value == pytest.approx(fit["n_over_na"], rel=1e-11)
        assert nna.paper == pytest.approx(1 / (1 - PAPER_S_STAR[prec]), rel=1e-11)
        assert df[(df.precision == prec) & (df.quantity == "n_runs")].value.iloc[0] == fit["n_runs"]
    assert len(df) == 2 * 7 + 1 + 2 * 3


def test_paper_constants_check_is_about_50_percent_not_45_58(results):
    s = R.paper_constants_s_star()
    grid = np.linspace(0, 0.99, 99_001)
    assert s == pytest.approx(grid[np.argmin(inference_cost_factor(PAPER_CONSTANTS, grid))], abs=2e-5)
    assert 0.50 < s < 0.505
    t = T.fit_constants_table(results.fits, results.optimal)
    row = next(r for r in md_rows(T.to_markdown(t)) if r[0].startswith("S* of the paper"))
    assert row[3] == f"{100 * s:.2f}%" == "50.24%"
    assert "not the stated 45.58%" in T.to_markdown(t)


def test_fit_constants_markdown_shows_fit_ci_and_paper_side_by_side(results):
    rows = md_rows(T.to_markdown(T.fit_constants_table(results.fits)))
    assert rows[0] == ["Quantity", "full precision fit", "full precision 95% CI", "full precision paper",
                       "1.58-bit fit", "1.58-bit 95% CI", "1.58-bit paper"]
    by = {r[0]: r for r in rows}
    assert by["E"][1:4] == ["2.5", "[2.375, 2.625]", "1.86"]
    assert by["β"][4:7] == ["0.15", "[0.1425, 0.1575]", "—"]
    star_fp = results.fits["fp"]["s_star"]
    assert by["S* (inference-optimal sparsity)"][1] == f"{100 * star_fp:.2f}%"
    assert by["S* (inference-optimal sparsity)"][3] == "45.58%"
    assert by["S* (inference-optimal sparsity)"][6] == "61.25%"
    assert by["N/N_a at S*"][3] == "1.838" and by["N/N_a at S*"][6] == "2.581"


def test_missing_precision_and_card_form(inputs, tmp_path):
    fit = read_json(inputs["fit_dir"] / "fit_fp.json")
    fit["form"] = "card"
    fit["s_star"] = None  # absent S*: computed from the constants
    write_json(tmp_path / "fit_fp.json", fit)
    fits = R.read_fits(tmp_path)
    assert fits["1.58"] is None
    t = T.fit_constants_table(fits)
    df = csv_frame(t)
    c = df[(df.precision == "fp") & (df.quantity == "C")].iloc[0]
    assert c.paper == pytest.approx(PAPER_CONSTANTS["C"] * math.exp(PAPER_CONSTANTS["beta"]))
    star = df[(df.precision == "fp") & (df.quantity == "s_star")].iloc[0].value
    grid = np.linspace(0, 0.99, 99_001)
    assert star == pytest.approx(grid[np.argmin(inference_cost_factor(fit["params"], grid, "card"))], abs=2e-5)
    assert df[df.precision == "1.58"].value.isna().all()
    md = T.to_markdown(t)
    assert "1.58-bit: no fit" in md and "card form" in md


def test_no_finite_optimum_renders_s_star_100_and_no_n_over_na(inputs, tmp_path):
    """A fit whose A(S)(1-S)^alpha falls all the way to S = 1 (beta <= 0): S* = 100%, N/N_a absent, no crash."""
    fit = read_json(inputs["fit_dir"] / "fit_fp.json")
    fit.update(s_star=1.0, n_over_na=None, s_star_ci=[0.0, 1.0], n_over_na_ci=[1.0, None])
    fit["params"]["beta"] = -2.0
    write_json(tmp_path / "fit_fp.json", fit)
    df = csv_frame(T.fit_constants_table(R.read_fits(tmp_path)))
    fp = df[df.precision == "fp"].set_index("quantity")
    assert fp.loc["s_star", "value"] == 1.0
    assert math.isnan(fp.loc["n_over_na", "value"])
    assert "100.00%" in T.to_markdown(T.fit_constants_table(R.read_fits(tmp_path)))


# ---------------------------------------------------------------------------------------------- losses


def test_losses_table_matches_runs(inputs, results):
    runs = pd.read_csv(inputs["runs"], dtype={"precision": str})
    t = T.losses_table(results.runs)
    df = csv_frame(t)
    assert len(df) == 2 * 4 * 4  # precisions x sizes x sparsities
    for r in df.itertuples():
        cell = runs[(runs.precision == r.precision) & (runs["size"] == r.size) & (runs.sparsity == r.sparsity)]
        dense = runs[(runs.precision == r.precision) & (runs["size"] == r.size) & (runs.sparsity == 0)].val_loss.mean()
        assert r.n_runs == 2 and r.n_ok == cell.val_loss.notna().sum()
        assert r.val_loss_mean == pytest.approx(cell.val_loss.mean(), rel=1e-11)
        assert r.gap_pct == pytest.approx(100 * (cell.val_loss.mean() / dense - 1), rel=1e-9, abs=1e-12)
    assert df[(df.precision == "1.58") & (df["size"] == "d2") & (df.sparsity == 0.8)].n_ok.iloc[0] == 1

    rows = md_rows(T.to_markdown(t))
    assert rows[0] == ["Precision", "Model", "N", "S=0%", "S=40%", "S=60%", "S=80%"]
    row = next(r for r in rows if r[:2] == ["full precision", "d4"])
    g = df[(df.precision == "fp") & (df["size"] == "d4")].set_index("sparsity")
    assert row[2] == "1M"
    assert row[3] == f"{g.val_loss_mean[0.0]:.4f}"
    assert row[4] == f"{g.val_loss_mean[0.4]:.4f} ({g.gap_pct[0.4]:+.2f}%)"
    failed = next(r for r in rows if r[:2] == ["1.58-bit", "d2"])
    assert failed[6].endswith("*")  # one of its two seeds failed


def test_losses_pivot_reads_back_to_the_run_means(results):
    """Parse the Markdown pivot's numbers back and compare them with the seed means of the runs table."""
    runs = results.runs
    rows = md_rows(T.to_markdown(T.losses_table(runs)))
    labels = {v: k for k, v in R.PRECISION_LABEL.items()}
    sparsities = [0.0, 0.4, 0.6, 0.8]
    checked = 0
    for r in rows[1:]:
        for s, cell in zip(sparsities, r[3:]):
            sub = runs[(runs.precision == labels[r[0]]) & (runs["size"] == r[1]) & (runs.sparsity == s)]
            assert float(cell.split()[0].rstrip("*")) == pytest.approx(sub.val_loss.mean(), abs=5e-5)
            checked += 1
    assert checked == 32


def test_modes_get_their_own_rows_and_dense_reference(tmp_path):
    p = synthetic.write_inputs(tmp_path, extra_modes=True)
    t = T.losses_table(R.read_runs(p["runs"]))
    df = csv_frame(t)
    cont = df[df["mode"] == "continue"].set_index("sparsity")
    assert list(cont.index) == [0.0, 0.4]
    assert cont.dense_loss[0.4] == pytest.approx(cont.val_loss_mean[0.0])
    assert md_rows(T.to_markdown(t))[0][:3] == ["Precision", "Mode", "Model"]


# ---------------------------------------------------------------------------------------------- sparsity


def test_sparsity_table_matches_measured_values(results):
    t = T.sparsity_table(results.runs)
    df = csv_frame(t)
    assert len(df) == 32
    for r in df.itertuples():
        m = synthetic.measured_sparsity(r.sparsity)
        assert r.sparsity_measured_qkv == pytest.approx(m["qkv"])
        assert r.sparsity_measured_down == pytest.approx(m["down"])
        assert r.sparsity_measured == pytest.approx(m["overall"])
        assert r.n_active == pytest.approx(round(r.n_params * (1 - m["overall"])))
    rows = md_rows(T.to_markdown(t))
    assert rows[0] == ["Model", "Precision", "N", "Target S", "Activated N_a", "QKV", "Out", "Gate/Up", "Down", "Overall"]
    row = next(r for r in rows if r[:2] == ["d4", "full precision"] and r[3] == "40%")
    assert row[4:] == ["533k", "40.0%", "40.0%", "40.0%", "70.0%", "46.7%"]


# ---------------------------------------------------------------------------------------------- files and CLI


def test_cli_writes_all_tables_byte_identically(inputs, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert T.cli_tables(["--runs", str(inputs["runs"]), "--fit-dir", str(inputs["fit_dir"]), "--out", str(out)]) == 0
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(f"{n}.{e}" for n in ("fit_constants", "losses", "matched_active", "sparsity", "fit_diagnostics")
                            for e in ("md", "tex", "csv"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    assert not any(p.name.startswith(".") for p in outs[0].iterdir())  # no temporary files left behind


def test_latex_is_booktabs_and_escaped(results):
    tex = T.to_latex(T.losses_table(results.runs))
    lines = tex.splitlines()
    assert lines[0] == r"\begin{tabular}{lrrrrrr}" and lines[1] == r"\toprule"
    assert r"\bottomrule" in lines and lines.count(r"\midrule") == 2  # header rule + between precisions
    assert r"S=40\%" in tex and "(+" in tex and " % " not in tex.split(r"\end{tabular}")[0]
    body = [line for line in lines if line.endswith(r"\\")]
    assert all(line.count("&") == 6 for line in body)
    fit_tex = T.to_latex(T.fit_constants_table(results.fits))
    assert r"$\alpha$ & " in fit_tex and r"95\% CI" in fit_tex


def test_missing_inputs_name_file_and_command(inputs, tmp_path):
    with pytest.raises(UserError, match=r"runs table not found: .*nope\.csv.*sparsescale aggregate"):
        R.read_runs(tmp_path / "nope.csv")
    with pytest.raises(UserError, match=r"no fit results in .*sparsescale fit"):
        R.read_fits(tmp_path)
    bad = tmp_path / "runs.csv"
    pd.read_csv(inputs["runs"]).drop(columns=["val_loss"]).to_csv(bad, index=False)
    with pytest.raises(UserError, match="lacks column.*val_loss"):
        R.read_runs(bad)
    wrong = tmp_path / "wrong.csv"
    pd.read_csv(inputs["runs"], dtype={"precision": str}).assign(precision="int4").to_csv(wrong, index=False)
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        R.read_runs(wrong)
    with pytest.raises(UserError, match="runs table not found"):
        T.cli_tables(["--runs", str(tmp_path / "x.csv"), "--fit-dir", str(inputs["fit_dir"]), "--out", str(tmp_path)])


def test_precision_stays_text_when_only_158_runs(tmp_path):
    p = synthetic.write_inputs(tmp_path, precisions=("1.58",), fits=("1.58",))
    runs = R.read_runs(p["runs"])
    assert set(runs.precision) == {"1.58"}
    assert R.read_fits(p["fit_dir"])["fp"] is None
    rows = md_rows(T.to_markdown(T.losses_table(runs)))
    assert {r[0] for r in rows[1:]} == {"1.58-bit"}


def test_matched_active_compares_sparse_with_dense_at_equal_active_parameters():
    """Dense losses 3.0, 2.8, 2.6 at N = 100, 1000, 10000 (linear in log N); sparse runs of the 1000 model:
    S = 0.9 activates 100 parameters (dense 3.0 exactly), S = 0.5 activates 500 (dense 3 - 0.2 log10 5, the
    log-linear interpolation); the 100 model at S = 0.5 activates 50, below the smallest dense size: no value."""
    rows = [("d1", 100, 0.0, 3.0), ("d2", 1000, 0.0, 2.8), ("d3", 10000, 0.0, 2.6),
            ("d2", 1000, 0.9, 2.95), ("d2", 1000, 0.5, 2.83), ("d1", 100, 0.5, 3.1)]
    runs = pd.DataFrame([{"precision": "fp", "mode": "scratch", "size": sz, "n_params": n, "sparsity": s,
                          "seed": k, "val_loss": v + (0.01 if k else -0.01)} for sz, n, s, v in rows for k in (0, 1)])
    t = T.matched_table(runs)
    d = csv_frame(t).set_index(["size", "sparsity"])
    assert d.loc[("d2", 0.9), "dense_at_n_active"] == pytest.approx(3.0)
    assert d.loc[("d2", 0.9), "delta"] == pytest.approx(-0.05)
    assert d.loc[("d2", 0.5), "dense_at_n_active"] == pytest.approx(3.0 - 0.2 * math.log10(5))
    assert d.loc[("d2", 0.5), "delta"] == pytest.approx(2.83 - (3.0 - 0.2 * math.log10(5)))
    assert math.isnan(d.loc[("d1", 0.5), "delta"]) and d.loc[("d1", 0.5), "n_active"] == pytest.approx(50)
    md = md_rows(T.to_markdown(t))
    assert md[0] == ["Precision", "Model", "N", "S=50%", "S=90%"]
    assert md[1] == ["full precision", "d1", "100", R.MISSING, R.MISSING]
    assert md[2] == ["full precision", "d2", "1k", f"{2.83 - (3.0 - 0.2 * math.log10(5)):+.3f}", "-0.050"]
