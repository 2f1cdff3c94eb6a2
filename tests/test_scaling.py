"""Scaling-law fit (sparsescale.scaling), bootstrap (diagnostics) and the fit report / CLI (fit), on synthetic runs."""

import json

import numpy as np
import pandas as pd
import pytest

from sparsescale import diagnostics as dg
from sparsescale import fit as ft
from sparsescale import scaling as sc
from sparsescale.bench.fit import synthetic_runs
from sparsescale.errors import UserError

# Constants with a sharp minimum of A(S)(1-S)^alpha, so 1% noise pins S* to about a point.
TRUE = {"E": 1.0, "B": 100.0, "C": 470.0, "alpha": 0.5, "beta": 0.25}
SIZES = np.logspace(5, 8, 6)
SPARSITIES = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8)


def runs_for(params=TRUE, form="paper", noise=0.01, seed=0, seeds=1, sizes=SIZES, sparsities=SPARSITIES):
    return synthetic_runs(params, form, sizes=sizes, sparsities=sparsities, seeds=seeds, noise=noise, rng_seed=seed)


def brute_force_s_star(p, form):
    """Independent check: the cost A(S)(1-S)^alpha written out, minimised on a 2e6-point grid."""
    s = np.linspace(0.0, 1.0 - 1e-7, 2_000_001)
    x = 1.0 / (1.0 - s) if form == "paper" else s / (1.0 - s)
    with np.errstate(over="ignore", invalid="ignore"):  # exp overflows to inf near S = 1: never the minimum
        cost = (p["B"] + p["C"] * np.exp(p["beta"] * x)) * (1.0 - s) ** p["alpha"]
    return s[np.argmin(cost)]


# ---------------------------------------------------------------------------------------------------
# Optimal sparsity


def test_paper_constants_give_502_not_4558():
    opt = sc.optimal_sparsity(sc.PAPER_CONSTANTS)
    assert opt["s_star"] == pytest.approx(0.50238, abs=1e-4)
    assert opt["n_over_na"] == pytest.approx(1 / (1 - opt["s_star"]))
    check = sc.paper_constants_check()
    lo, hi = check["rounding_range"]
    assert lo == pytest.approx(0.4224, abs=1e-3) and hi == pytest.approx(0.5745, abs=1e-3)
    assert lo < sc.PAPER_S_STAR["fp"] < check["s_star"] < hi  # the stated 45.58% is within rounding
    assert check["paper_stated_s_star"] == 0.4558 and "45.58%" in check["note"]


@pytest.mark.parametrize("form", sc.FORMS)
@pytest.mark.parametrize(
    "p",
    [
        TRUE,
        sc.PAPER_CONSTANTS,
        {"E": 2.0, "B": 3.0, "C": 0.4, "alpha": 0.3, "beta": 0.6},
        {"E": 2.0, "B": 0.0, "C": 1.0, "alpha": 0.05, "beta": 0.01},
    ],
)
def test_s_star_matches_brute_force_grid(p, form):
    opt = sc.optimal_sparsity(p, form)
    assert opt["interior"]
    assert opt["s_star"] == pytest.approx(brute_force_s_star(p, form), abs=2e-6)
    assert opt["inference_cost_factor"] == pytest.approx(sc.inference_cost_factor(p, opt["s_star"], form), rel=1e-12)


def test_s_star_satisfies_stationary_condition():
    # paper form: C e^{beta/(1-S)} (beta/(1-S) - alpha) = alpha B at S*
    p = TRUE
    u = 1.0 / (1.0 - sc.optimal_sparsity(p)["s_star"])
    assert p["C"] * np.exp(p["beta"] * u) * (p["beta"] * u - p["alpha"]) == pytest.approx(p["alpha"] * p["B"], rel=1e-6)


def test_s_star_edges_dense_optimal_and_no_finite_optimum():
    dense = sc.optimal_sparsity({"B": 0.0, "C": 1.0, "alpha": 0.1, "beta": 1.0})  # 1 - beta/alpha < 0
    assert dense["s_star"] == 0.0 and dense["n_over_na"] == 1.0 and not dense["interior"]
    for p in ({"B": 1.0, "C": 0.0, "alpha": 0.2, "beta": 0.3}, {"B": 0.5, "C": 1.0, "alpha": 0.2, "beta": -0.3}):
        edge = sc.optimal_sparsity(p)
        assert edge["s_star"] == 1.0 and edge["n_over_na"] == float("inf") and "no finite optimum" in edge["note"]


def test_best_config_for_budget_beats_every_sparsity():
    n_active = 3e6
    best = sc.best_config_for_budget(TRUE, n_active)
    s = np.linspace(0, 0.95, 9501)
    losses = sc.law(TRUE, n_active / (1 - s), s)  # every (N, S) with N (1 - S) = N_a
    assert best["predicted_loss"] == pytest.approx(losses.min(), abs=1e-8)  # grid step 1e-4
    assert best["predicted_loss"] <= losses.min() + 1e-12
    assert best["n_params"] * (1 - best["sparsity"]) == pytest.approx(n_active)
    assert best["predicted_loss"] == pytest.approx(float(sc.law(TRUE, best["n_params"], best["sparsity"])), rel=1e-12)
    assert best["dense_loss"] == pytest.approx(losses[0]) and best["dense_loss"] > best["predicted_loss"]


# ---------------------------------------------------------------------------------------------------
# Fit


@pytest.mark.parametrize("form", sc.FORMS)
def test_exact_recovery_without_noise(form):
    fit = sc.fit_law(runs_for(form=form, noise=0.0), form, n_starts=32)
    assert fit["converged"] and fit["n_converged"] >= 1 and fit["n_starts"] == 32 and fit["on_bound"] == []
    for k, v in TRUE.items():
        assert fit["params"][k] == pytest.approx(v, rel=1e-5), k
    assert fit["objective"] < 1e-15


def test_paper_and_card_are_one_family():
    runs = runs_for(seed=3)
    paper, card = sc.fit_law(runs, "paper", n_starts=48), sc.fit_law(runs, "card", n_starts=48)
    assert card["objective"] == pytest.approx(paper["objective"], rel=1e-6)
    assert card["params"]["C"] == pytest.approx(paper["params"]["C"] * np.exp(paper["params"]["beta"]), rel=1e-3)
    assert card["params"]["alpha"] == pytest.approx(paper["params"]["alpha"], rel=1e-4)


@pytest.mark.parametrize("form", sc.FORMS)
def test_parameter_recovery_with_noise_inside_intervals(form):
    s_true = sc.optimal_sparsity(TRUE, form)["s_star"]
    covered = 0
    for seed in range(3):
        runs = runs_for(form=form, seed=seed, seeds=2)  # two seeds per cell: the seed bootstrap
        fit = sc.fit_law(runs, form, n_starts=48)
        boot = dg.bootstrap(runs, fit, n_boot=100, seed=seed, jobs=2, multistart=2)
        assert boot["method"] == "seeds" and boot["n_ok"] >= 95
        covered += all(boot["ci"][k][0] <= v <= boot["ci"][k][1] for k, v in TRUE.items())
        assert sc.optimal_sparsity(fit["params"], form)["s_star"] == pytest.approx(s_true, abs=0.02)
    assert covered >= 2  # "most seeds": every parameter inside its 95% interval in at least 2 of 3


def test_bootstrap_same_for_any_number_of_jobs():
    runs = runs_for(seed=1)
    fit = sc.fit_law(runs, n_starts=16)
    one, two = dg.bootstrap(runs, fit, 6, seed=5, jobs=1), dg.bootstrap(runs, fit, 6, seed=5, jobs=2)
    assert one["samples"].shape == (6, 7)
    np.testing.assert_allclose(one["samples"], two["samples"], rtol=1e-12)
    assert not np.allclose(one["samples"], dg.bootstrap(runs, fit, 6, seed=6, jobs=1)["samples"])


def test_fit_that_stops_early_says_so():
    fit = sc.fit_law(runs_for(), n_starts=4, maxiter=2)
    assert fit["converged"] is False and fit["n_converged"] == 0
    assert "did not converge" in fit["warnings"][0]


def test_parameter_on_bound_is_reported():
    runs = runs_for(dict(TRUE, alpha=0.0, B=1.0, C=0.5), noise=0.0)  # loss independent of N
    fit = sc.fit_law(runs, n_starts=16)
    assert "alpha" in fit["on_bound"]
    assert any("alpha" in w and "bound" in w for w in fit["warnings"])


def test_leave_one_size_out_and_dense_baseline_exact_on_clean_data():
    runs = runs_for(noise=0.0)
    loso = dg.leave_one_size_out(runs, n_starts=16)
    assert loso["held_out_n_params"] == SIZES.max() and len(loso["points"]) == len(SPARSITIES)
    assert loso["mean_abs_rel_error"] < 1e-6
    dense = sc.fit_dense_per_s(runs)
    assert [row["sparsity"] for row in dense["fits"]] == list(SPARSITIES) and dense["n_params_fitted"] == 18
    for row in dense["fits"]:
        assert row["E"] == pytest.approx(1.0, rel=1e-6) and row["alpha"] == pytest.approx(0.5, rel=1e-6)
        assert row["A"] == pytest.approx(float(sc.a_of_s(TRUE, row["sparsity"])), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.drop(columns="val_loss"), "lacks column"),
        (lambda r: r.assign(sparsity=r["sparsity"].where(r.index != 0, 1.0)), r"sparsity must be in \[0, 1\): got 1"),
        (lambda r: r.assign(sparsity=r["sparsity"].where(r.index != 0, -0.1)), "sparsity must be in"),
        (lambda r: r.assign(val_loss=r["val_loss"].where(r.index != 2, -1.0)), "val_loss must be > 0"),
        (lambda r: r.assign(val_loss=r["val_loss"].where(r.index != 2, 0.0)), "val_loss must be > 0"),
        (lambda r: r.assign(n_params=r["n_params"].where(r.index != 1, 0.0)), "n_params must be > 0"),
        (lambda r: r[r["n_params"] == SIZES[0]], r"1 distinct n_params .* needs >= 2 sizes"),
        (lambda r: r[r["sparsity"].isin([0.0, 0.5])], "2 distinct sparsity"),
        (lambda r: r.assign(val_loss=np.where(r["n_params"] == SIZES[0], r["val_loss"], np.nan)), "1 distinct n_params"),
    ],
)
def test_bad_runs_raise_one_clear_error(mutate, message):
    with pytest.raises(UserError, match=message):
        sc.fit_law(mutate(runs_for(noise=0.0)), n_starts=2)


def test_other_bad_input():
    runs = runs_for(noise=0.0)
    with pytest.raises(UserError, match="unknown law form 'chinchilla'"):
        sc.fit_law(runs, "chinchilla")
    with pytest.raises(UserError, match="no runs with precision '1.58': the table has fp"):
        ft.fit_all(runs, precision="1.58", n_boot=2)
    with pytest.raises(UserError, match="precision has missing"):
        ft.fit_all(runs.assign(precision=[None] + ["fp"] * (len(runs) - 1)), n_boot=2)
    with pytest.raises(UserError, match="B must be a finite number >= 0: got -1"):
        sc.optimal_sparsity({"B": -1.0, "C": 1.0, "alpha": 0.1, "beta": 0.1})
    with pytest.raises(UserError, match="lack beta"):
        sc.optimal_sparsity({"B": 1.0, "C": 1.0, "alpha": 0.1})
    with pytest.raises(UserError, match="E is needed"):
        sc.best_config_for_budget({"B": 1.0, "C": 1.0, "alpha": 0.1, "beta": 0.1}, 1e6)
    fit = sc.fit_law(runs, n_starts=2)
    with pytest.raises(UserError, match="--bootstrap must be >= 1: got 0"):
        dg.bootstrap(runs, fit, 0)
    with pytest.raises(UserError, match="--jobs must be >= 1: got 0"):
        dg.bootstrap(runs, fit, 2, jobs=0)


# ---------------------------------------------------------------------------------------------------
# CLI end to end

FIT_KEYS = {
    "precision",
    "form",
    "params",
    "ci",
    "s_star",
    "s_star_ci",
    "n_over_na",
    "n_over_na_ci",
    "objective",
    "n_starts",
    "n_converged",
    "converged",
    "on_bound",
    "warnings",
    "n_runs",
    "n_sizes",
    "sizes",
    "sparsities",
    "bootstrap",
    "loso",
    "comparison",
    "dense_baseline",
    "design",
    "stability",
    "shape",
    "flags",
    "trustworthy",
    "missing",
    "versions",
}


def test_cli_fit_end_to_end(tmp_path, capsys):
    from sparsescale.cli import main

    fp = runs_for(seed=0, sizes=SIZES[:4], sparsities=(0.0, 0.5, 0.7, 0.8))
    ternary = runs_for(dict(TRUE, beta=0.15), seed=1, sizes=SIZES[:4], sparsities=(0.0, 0.5, 0.7, 0.8)).assign(precision="1.58")
    table = pd.concat([fp, ternary], ignore_index=True)
    table.loc[5, "val_loss"] = np.nan  # a failed run
    csv = tmp_path / "runs.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "fit"
    assert main(["fit", str(csv), "--out", str(out), "--bootstrap", "20", "--jobs", "1", "--starts", "16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["fit_1.58.json", "fit_fp.json", "optimal_sparsity.json"]
    err = capsys.readouterr().err
    assert "warning [fp]: 1 run(s) left out (n_params=" in err

    rep = json.loads((out / "fit_fp.json").read_text())
    assert set(rep) >= FIT_KEYS
    assert rep["precision"] == "fp" and rep["form"] == "paper" and rep["n_runs"] == 15 and rep["n_sizes"] == 4
    assert set(rep["params"]) == set(sc.PARAM_NAMES) == set(rep["ci"])
    assert all(lo <= rep["params"][k] <= hi for k, (lo, hi) in rep["ci"].items())
    b = rep["bootstrap"]
    assert (b["n"], b["seed"], b["level"], b["method"], b["multistart"]) == (20, 0, 0.95, "residual", 16) and b["n_ok"] >= 18
    assert len(b["s_star_samples"]) == 20 and b["share_no_finite_optimum"] == 0.0
    assert len(rep["missing"]) == 1 and rep["missing"][0]["n_params"] == table.loc[5, "n_params"]
    assert rep["missing"][0]["reason"] == "no val_loss (failed or unfinished)"
    assert [r["n_params"] for r in rep["stability"]["drop_size"]] == list(SIZES[:4])
    assert [r["sparsity"] for r in rep["stability"]["drop_sparsity"]] == [0.0, 0.5, 0.7, 0.8]
    assert rep["design"]["n_sizes"] == 4 and rep["design"]["n_sparsities"] == 4 and "few_sparsities" in rep["flags"]
    assert rep["loso"]["held_out_n_params"] == SIZES[3] and len(rep["loso"]["points"]) == 4
    assert set(rep["comparison"]) == {"paper", "card", "dense_per_s"}
    assert set(rep["comparison"]["card"]) == {"objective", "aic", "loso_mean_abs_rel_error"}
    assert rep["comparison"]["card"]["objective"] == pytest.approx(rep["objective"], rel=1e-6)  # one family
    assert [row["sparsity"] for row in rep["dense_baseline"]] == [0.0, 0.5, 0.7, 0.8]
    assert rep["n_over_na"] == pytest.approx(1 / (1 - rep["s_star"]))

    summary = json.loads((out / "optimal_sparsity.json").read_text())
    assert set(summary["precisions"]) == {"fp", "1.58"} and isinstance(summary["separate"], bool)
    assert summary["paper_constants"]["s_star"] == pytest.approx(0.5024, abs=1e-3)
    one = json.loads((out / "fit_1.58.json").read_text())
    assert one["precision"] == "1.58" and one["missing"] == []

    # one precision only; a precision the table lacks is one clear error (exit code 2)
    assert (
        main(
            [
                "fit",
                str(csv),
                "--out",
                str(tmp_path / "only"),
                "--bootstrap",
                "4",
                "--jobs",
                "1",
                "--starts",
                "4",
                "--precision",
                "1.58",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["fit_1.58.json", "optimal_sparsity.json"]
    capsys.readouterr()
    assert main(["fit", str(csv), "--out", str(tmp_path / "x"), "--precision", "int4"]) == 2
    assert "no runs with precision 'int4'" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2


def test_cli_optimal_sparsity(capsys):
    from sparsescale.cli import main

    args = [f"--{k}={v}" for k, v in sc.PAPER_CONSTANTS.items()]
    assert main(["optimal-sparsity", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["s_star"] == pytest.approx(0.50238, abs=1e-4) and out["n_over_na"] == pytest.approx(2.0096, abs=1e-3)
    assert out["inference_cost_factor"] == pytest.approx(float(sc.inference_cost_factor(sc.PAPER_CONSTANTS, out["s_star"])))
    assert main(["optimal-sparsity", *args, "--form", "card", "--n-active", "1e9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["form"] == "card" and out["budget"]["n_params"] == pytest.approx(1e9 / (1 - out["s_star"]))
    assert main(["optimal-sparsity", "--B", "-1", "--C", "1", "--alpha", "0.1", "--beta", "0.1"]) == 2


def test_fit_all_names_precisions_as_strings():
    runs = runs_for(noise=0.0, sizes=SIZES[:3], sparsities=(0.0, 0.5, 0.8)).assign(precision=1.58)  # as pandas reads "1.58"
    reports = ft.fit_all(runs, n_boot=2, jobs=1, n_starts=4)
    assert list(reports) == ["1.58"] and reports["1.58"]["precision"] == "1.58" and reports["1.58"]["n_runs"] == 9
    assert ft.optimal_sparsity_summary(reports)["separate"] is None


def test_bootstrap_refits_converge_on_the_real_default_sweep():
    """The fp fit of the default sweep is ill-conditioned (E and C go to their bounds, alpha is small: a flat
    E-B valley). Grid starts of the refits used to run out of iterations at the lowest point, and those
    refits were dropped as failed (888 of 1000 kept), which biased the intervals. The lowest point is now
    polished by one more L-BFGS-B run, so every refit converges."""
    from pathlib import Path

    runs = pd.read_csv(Path(__file__).parent / "fixtures" / "default_sweep_runs.csv", comment="#")
    fp = runs[runs["precision"].astype(str) == "fp"]
    fit = sc.fit_law(fp, n_starts=64)
    assert fit["converged"] and set(fit["on_bound"]) == {"E", "C"}
    boot = dg.bootstrap(fp, fit, 60, seed=0, jobs=1)
    assert boot["n_ok"] == 60
    lo, hi = boot["s_star_ci"]
    assert 0.7 < lo < sc.optimal_sparsity(fit["params"])["s_star"] <= hi <= 1.0


def test_fit_all_runs_precisions_side_by_side_with_identical_results():
    fp, q = runs_for(seed=2).assign(precision="fp"), runs_for(dict(TRUE, C=300.0), seed=3).assign(precision="1.58")
    runs = pd.concat([fp, q], ignore_index=True)
    one = ft.fit_all(runs, n_boot=6, seed=1, jobs=1, n_starts=8)
    two = ft.fit_all(runs, n_boot=6, seed=1, jobs=2, n_starts=8)  # one worker per precision
    assert sorted(one) == sorted(two) == ["1.58", "fp"]
    for p in one:
        assert one[p]["precision"] == p and one[p]["n_runs"] == 36
        for key in ("params", "ci", "s_star", "s_star_ci", "bootstrap", "comparison", "dense_baseline"):
            assert one[p][key] == two[p][key], (p, key)
    assert one["fp"]["params"] != one["1.58"]["params"]
