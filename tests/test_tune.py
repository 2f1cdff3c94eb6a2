"""The tune stage (sparsescale.tune and workflow/rules/tune.smk): one rate per size x precision from a grid of
runs, the train rule reading it, and a dry run of a tune-enabled config."""

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsescale.cli import main
from sparsescale.errors import UserError
from sparsescale.io import write_json
from sparsescale.tune import interpolate_lr, read_tune_runs, select

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fake_run(root: Path, size, prec, s, lr, loss, seed=0):
    d = root / f"{size}-s{s:.2f}-b{prec}-seed{seed}-lr{lr:.3g}"
    if math.isfinite(loss):
        write_json(d / "final.json", {"size": size, "precision": prec, "sparsity": s, "lr": lr, "val_loss": loss})
    else:  # diverged: failed.json and the config written at the start of the run
        write_json(d / "config.json", {"size": size, "precision": prec, "sparsity": s, "lr": lr})
        write_json(d / "failed.json", {"size": size, "precision": prec, "sparsity": s, "status": "diverged"})
    return d


def grid(tmp_path):
    """d1 fp: 2e-3 best at S=0, 4e-3 best at S=0.9, 4e-3 best on average; 8e-3 diverged at S=0.9.
    d1 1.58: the best rate is the largest of the grid (an edge)."""
    losses = {
        ("d1", "fp"): {2e-3: (3.50, 3.80), 4e-3: (3.52, 3.70), 8e-3: (3.60, math.inf)},
        ("d1", "1.58"): {3e-3: (3.70, 3.95), 6e-3: (3.65, 3.90), 1.2e-2: (3.60, 3.85)},
    }
    dirs = []
    for (size, prec), per_lr in losses.items():
        for lr, (l0, l9) in per_lr.items():
            dirs += [fake_run(tmp_path, size, prec, 0.0, lr, l0), fake_run(tmp_path, size, prec, 0.9, lr, l9)]
    return dirs


def test_select_averages_over_sparsities_and_warns_at_edges_and_disagreements(tmp_path):
    runs = read_tune_runs([str(d) for d in grid(tmp_path)])
    assert len(runs) == 12 and runs["val_loss"].isin([math.inf]).sum() == 1
    out = select(runs)
    assert out["chosen"] == {"d1": {"fp": 4e-3, "1.58": 1.2e-2}}
    assert any("d1 1.58: the best rate 0.012 is at the edge" in w for w in out["warnings"])
    assert any("d1 fp: the best rate differs between sparsities ({0.0: 0.002, 0.9: 0.004})" in w for w in out["warnings"])
    fp = [r for r in out["table"] if r["precision"] == "fp"]
    assert [r["lr"] for r in fp] == [2e-3, 4e-3, 8e-3] and [r["chosen"] for r in fp] == [False, True, False]
    assert fp[1]["mean_loss"] == pytest.approx(3.61) and fp[2]["mean_loss"] == math.inf


def test_interpolate_rule_gives_each_sparsity_its_winner(tmp_path):
    out = select(read_tune_runs([str(d) for d in grid(tmp_path)]), "interpolate")
    assert out["rule"] == "interpolate"
    assert out["per_sparsity"] == {"d1": {"fp": {"0.00": 2e-3, "0.90": 4e-3}, "1.58": {"0.00": 1.2e-2, "0.90": 1.2e-2}}}
    assert out["chosen"] == {"d1": {"fp": 4e-3, "1.58": 1.2e-2}}  # the mean rule's answer stays beside it
    per = {0.0: 2e-3, 0.9: 4e-3}
    assert interpolate_lr(per, 0.0) == pytest.approx(2e-3) and interpolate_lr(per, 0.9) == pytest.approx(4e-3)
    assert interpolate_lr(per, 0.45) == pytest.approx(math.sqrt(8e-6))  # halfway in S: the geometric mean
    assert interpolate_lr(per, 0.95) == pytest.approx(4e-3)  # clamped beyond the tuned range
    assert interpolate_lr({0.0: 1e-3, 0.5: 4e-3, 0.9: 1e-3}, 0.7) == pytest.approx(2e-3)  # piecewise
    assert sum("at the edge" in w for w in out["warnings"]) == 3  # d1 1.58 at both S, d1 fp at S = 0 (2e-3)
    assert any(w.startswith("d1 fp: the best rate at S = 0, 0.002, is at the edge") for w in out["warnings"])
    fp = [r for r in out["table"] if r["precision"] == "fp"]
    assert [r["chosen"] for r in fp] == [True, True, False]
    with pytest.raises(UserError, match="tune rule must be one of"):
        select(read_tune_runs([str(d) for d in grid(tmp_path)]), "median")


def test_select_averages_the_seeds_of_a_rate(tmp_path):
    """tune.seed: [0, 1]: each rate's loss at a tuned S is the mean over its seeds, so one lucky seed does not
    pick the rate (S = 0.9: seed 0 alone prefers 4e-3, the two seeds together 2e-3); a diverged seed makes the
    rate diverged."""
    losses = {2e-3: ((3.50, 3.50), (3.80, 3.78)), 4e-3: ((3.55, 3.56), (3.70, 4.00)), 8e-3: ((3.60, 3.62), (3.75, math.inf))}
    dirs = [fake_run(tmp_path, "d1", "fp", s, lr, per_seed[i], seed=i)
            for lr, by_s in losses.items() for s, per_seed in zip((0.0, 0.9), by_s) for i in (0, 1)]
    runs = read_tune_runs([str(d) for d in dirs])
    assert len(runs) == 12
    only_seed0 = select(runs[runs["run"].str.contains("seed0")], "interpolate")
    assert only_seed0["per_sparsity"]["d1"]["fp"] == {"0.00": 2e-3, "0.90": 4e-3}
    both = select(runs, "interpolate")
    assert both["per_sparsity"]["d1"]["fp"] == {"0.00": 2e-3, "0.90": 2e-3}
    row = {r["lr"]: r for r in both["table"]}
    assert row[4e-3]["loss_s0.90"] == pytest.approx(3.85) and row[2e-3]["loss_s0.90"] == pytest.approx(3.79)
    assert row[8e-3]["loss_s0.90"] == math.inf


def test_cli_interpolated_lr(tmp_path, capsys):
    dirs = [str(d) for d in grid(tmp_path / "runs")]
    out = tmp_path / "tune"
    assert main(["tune", "select", *dirs, "--out", str(out), "--rule", "interpolate"]) == 0
    assert "interpolated between" in (out / "lr.md").read_text()
    capsys.readouterr()
    table = str(out / "lr.json")
    assert main(["tune", "lr", table, "--size", "d1", "--precision", "fp", "--sparsity", "0.45"]) == 0
    assert capsys.readouterr().out == "0.00282843\n"
    assert main(["tune", "lr", table, "--size", "d1", "--precision", "fp"]) == 2
    assert "interpolates the rate in S: pass --sparsity" in capsys.readouterr().err
    assert main(["tune", "lr", table, "--size", "d9", "--precision", "fp", "--sparsity", "0.5"]) == 2


def test_cli_select_and_lr(tmp_path, capsys):
    dirs = [str(d) for d in grid(tmp_path / "runs")]
    out = tmp_path / "tune"
    assert main(["tune", "select", *dirs, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["lr.csv", "lr.json", "lr.md"]
    assert json.loads((out / "lr.json").read_text())["chosen"]["d1"]["fp"] == 4e-3
    md = (out / "lr.md").read_text()
    assert "| d1 | fp | **0.004** | 3.5200 | 3.7000 | **3.6100** |" in md and "diverged" in md
    capsys.readouterr()
    assert main(["tune", "lr", str(out / "lr.json"), "--size", "d1", "--precision", "1.58"]) == 0
    assert capsys.readouterr().out == "0.012\n"
    assert main(["tune", "lr", str(out / "lr.json"), "--size", "d9", "--precision", "fp"]) == 2
    assert "has no rate for size 'd9'" in capsys.readouterr().err
    assert main(["tune", "lr", str(tmp_path / "nope.json"), "--size", "d1", "--precision", "fp"]) == 2


def test_bad_tune_input(tmp_path):
    with pytest.raises(UserError, match="neither final.json nor failed.json"):
        read_tune_runs([str(tmp_path / "empty")])
    d = [fake_run(tmp_path, "d1", "fp", 0.0, lr, math.inf) for lr in (1e-2, 2e-2)]
    with pytest.raises(UserError, match="every tune rate diverged for d1 fp"):
        select(read_tune_runs([str(x) for x in d]))


def _dry_run(tmp_path, tune: dict, **extra) -> tuple[str, list[str]]:
    """`snakemake -n -p` of the smoke config with this `tune` section (and `extra` top-level keys): its stdout and
    the tune runs' commands."""
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({"tune": tune, **extra}))
    p = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2", "--configfile",
                        "config/smoke.yaml", str(tmp_path / "tune.yaml")], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": f"{BIN}:/usr/bin:/bin"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, [line for line in p.stdout.splitlines() if line.startswith("Shell command: ( sparsescale train")]


def test_tune_enabled_dry_run_schedules_the_grid_and_train_reads_the_chosen_rate(tmp_path):
    out, tune_cmds = _dry_run(tmp_path, {"enabled": True, "factors": [0.5, 1.0, 2.0]})
    # smoke: 3 sizes x 2 precisions x (S = 0, 0.8) x 3 rates, at factor x the smoke's lr 3e-3
    assert len(tune_cmds) == 3 * 2 * 2 * 3
    lrs = sorted({shlex.split(c)[shlex.split(c).index("--lr") + 1] for c in tune_cmds})
    assert lrs == ["0.0015", "0.003", "0.006"]
    assert any("--out results/smoke/tune/runs/d1-s0.80-b1.58-seed0-lr0.006 " in c for c in tune_cmds)
    train = [line for line in out.splitlines() if line.startswith("Shell command: sparsescale train")]
    scratch = [c for c in train if "--mode" not in c]
    assert len(scratch) == 3 * 3 * 2
    assert all("--lr $(sparsescale tune lr results/smoke/tune/lr.json --size " in c for c in scratch)
    assert all(f"--sparsity {shlex.split(c)[shlex.split(c).index('--sparsity') + 1]})" in c for c in scratch)
    assert "--rule mean" in out
    assert "sparsescale tune select" in out
    # tune.seed as a list: every grid point once per seed
    _, tune_cmds = _dry_run(tmp_path, {"enabled": True, "factors": [1.0], "seed": [0, 3]})
    assert len(tune_cmds) == 3 * 2 * 2 * 2
    assert sorted({shlex.split(c)[shlex.split(c).index("--seed") + 1] for c in tune_cmds}) == ["0", "3"]
    assert any("--out results/smoke/tune/runs/d1-s0.80-b1.58-seed3-lr0.003 " in c for c in tune_cmds)


def test_banked_runs_are_not_trained_again_and_are_read_from_the_bank(tmp_path):
    """config `bank`: a banked run (final.json or failed.json) leaves the DAG; aggregate and tune select read
    its banked copy; every other scratch and tune run banks itself when it finishes."""
    bank = tmp_path / "bank"
    for rel, name in [("runs/d2-s0.50-bfp-seed0", "final.json"), ("runs/d3-s0.80-b1.58-seed0", "failed.json"),
                      ("tune/runs/d1-s0.00-bfp-seed0-lr0.003", "final.json"),
                      ("tune/runs/d3-s0.80-b1.58-seed0-lr0.003", "failed.json")]:
        (bank / rel).mkdir(parents=True)
        (bank / rel / name).write_text("{}")
    out, tune_cmds = _dry_run(tmp_path, {"enabled": True, "factors": [1.0]}, bank=str(bank))
    assert len(tune_cmds) == 3 * 2 * 2 - 2
    assert not any("d1-s0.00-bfp-seed0-lr0.003 " in c or "d3-s0.80-b1.58-seed0-lr0.003 " in c for c in tune_cmds)
    assert all(c.endswith(f"--out {bank}/tune/runs >> results/smoke/logs/tune/"
                          f"{shlex.split(c)[shlex.split(c).index('--out') + 1].split('/')[-1]}.log 2>&1")
               for c in tune_cmds)
    select_cmd = next(line for line in out.splitlines() if "sparsescale tune select" in line)
    assert f"{bank}/tune/runs/d1-s0.00-bfp-seed0-lr0.003 " in select_cmd
    assert f"{bank}/tune/runs/d3-s0.80-b1.58-seed0-lr0.003 " in select_cmd
    assert "results/smoke/tune/runs/d1-s0.00-bfp-seed0-lr0.003 " not in select_cmd
    train = [line for line in out.splitlines() if line.startswith("Shell command: sparsescale train")]
    scratch = [c for c in train if "--mode" not in c]
    assert len(scratch) == 3 * 3 * 2 - 2
    assert not any("/d2-s0.50-bfp-seed0 " in c or "/d3-s0.80-b1.58-seed0 " in c for c in scratch)
    for c in scratch:  # banked finished or diverged, the job keeping the run's exit code
        rid = shlex.split(c)[shlex.split(c).index("--out") + 1].split("/")[-1]
        assert c.endswith(f"2>&1 || rc=$?; sparsescale reference bank results/smoke/runs/{rid} --out {bank}/runs "
                          f">> results/smoke/logs/train/{rid}.log 2>&1; exit ${{rc:-0}}"), c
    assert not any("reference bank" in c for c in train if "--mode" in c)  # continue/finetune runs stay here
    agg = next(line for line in out.splitlines() if line.startswith("Shell command: sparsescale aggregate"))
    assert f"{bank}/runs/d2-s0.50-bfp-seed0 " in agg and f"{bank}/runs/d3-s0.80-b1.58-seed0 " in agg
    assert "results/smoke/runs/d2-s0.50-bfp-seed0 " not in agg
    # without a bank, nothing is banked
    out, tune_cmds = _dry_run(tmp_path, {"enabled": True, "factors": [1.0]})
    assert len(tune_cmds) == 3 * 2 * 2 and "reference bank" not in out
