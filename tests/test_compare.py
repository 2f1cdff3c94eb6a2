"""`sparsescale compare-fits`: S* of two fits and their difference (compare.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from sparsescale import compare as cp
from sparsescale.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIT4M = ROOT / "results" / "reference" / "cpu4m" / "fit"


def fit(s_star, samples, level=0.95, form="paper", precision="fp", tokens=4_000_000):
    ok = [v for v in samples if v is not None]
    return {"precision": precision, "form": form, "s_star": s_star, "s_star_ci": [min(ok), max(ok)] if ok else [None, None],
            "sizes": ["d2", "d3"], "sparsities": [0.0, 0.5], "n_runs": 8, "design": {"tokens": {"values": [tokens]}},
            "bootstrap": {"level": level, "s_star_samples": samples}}


def test_compare_fits_pairs_resamples_with_a_finite_optimum_in_both():
    a = fit(0.5, [0.5, 0.4, 1.0, 0.45, None])
    b = fit(0.6, [0.6, 0.7, 0.6, 0.4, 0.5, 0.9])  # longer: only the first five are paired
    out = cp.compare_fits(a, b)
    d = np.array([0.1, 0.3, -0.05])  # pairs 0, 1, 3: pair 2 has S* = 1 in A, pair 4 no S* in A
    assert out["n_pairs"] == 3 and out["difference"] == pytest.approx(0.1) and out["level"] == 0.95
    assert out["share_b_sparser"] == pytest.approx(2 / 3)
    assert out["difference_ci"] == [pytest.approx(np.percentile(d, 2.5)), pytest.approx(np.percentile(d, 97.5))]
    assert cp.compare_fits(a, fit(0.6, [])) is None
    none = cp.compare_fits(fit(0.5, [1.0, 1.0]), fit(0.6, [0.6, 0.7]))
    assert none["n_pairs"] == 0 and none["difference_ci"] == [None, None] and none["share_b_sparser"] is None


def test_compare_fits_cli_reproduces_the_committed_precision_difference(tmp_path, capsys):
    """The 4M reference fits, fp against 1.58-bit: the same pairs, difference and interval as optimal_sparsity.json
    (which fit.compare_precisions writes from compare_fits)."""
    out = tmp_path / "cmp.json"
    assert main(["compare-fits", str(FIT4M / "fit_fp.json"), str(FIT4M / "fit_1.58.json"), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    committed = json.loads((FIT4M / "optimal_sparsity.json").read_text())["difference_1.58_minus_fp"]
    d = got["difference_b_minus_a"]
    assert d["difference"] == pytest.approx(committed["difference"], abs=1e-12)
    assert d["difference_ci"] == pytest.approx(committed["difference_ci"], abs=1e-12)
    assert d["n_pairs"] == committed["n_pairs"] and d["share_b_sparser"] == committed["share_1.58_sparser"]
    fp = json.loads((FIT4M / "fit_fp.json").read_text())
    assert got["a"]["s_star"] == fp["s_star"] and got["a"]["tokens"] == fp["design"]["tokens"]["values"][0]
    assert got["a"]["precision"] == "fp" and got["b"]["precision"] == "1.58"
    printed = capsys.readouterr().out
    lo, hi = committed["difference_ci"]
    assert f"S*(B) - S*(A) = {committed['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]" in printed
    assert ("A sparser" if hi < 0 else "B sparser" if lo > 0 else "not resolved") in printed


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "fit file not found"),
        (lambda d: (d / "b.json").write_text("{"), "is not JSON"),
        (lambda d: (d / "b.json").write_text(json.dumps({"statement": "x"})), "is not a fit file"),
        (lambda d: (d / "b.json").write_text(json.dumps(fit(0.5, []))), "keeps no bootstrap S* samples"),
        (lambda d: (d / "b.json").write_text(json.dumps(fit(0.5, [0.5], form="card"))), "different A(S) forms"),
        (lambda d: (d / "b.json").write_text(json.dumps(fit(0.5, [0.5], level=0.9))), "bootstrap levels differ"),
    ],
)
def test_compare_fits_refuses_bad_input_with_one_message_and_no_output(tmp_path, capsys, make, message):
    (tmp_path / "a.json").write_text(json.dumps(fit(0.5, [0.5, 0.6])))
    make(tmp_path)
    out = tmp_path / "cmp.json"
    assert main(["compare-fits", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not out.exists()
