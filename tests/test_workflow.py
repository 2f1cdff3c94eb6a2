"""The Snakemake workflow end to end on the smoke config (a copy of the repo in a temp dir), plus lint, format,
the paper config's DAG, schema errors, a targeted rerun, the rules' run ids (= TrainConfig.run_id for every config)
and the torchrun launcher of every train rule (continue / finetune included)."""

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sparsescale.config import TrainConfig, run_id
from sparsescale.train import config_from_args, config_parser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def snakemake(*args, cwd, check=True, timeout=1200):
    cmd = [str(BIN / "snakemake"), "--cores", "2", *args]
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "workflow", "profiles", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    (dest / "tests").mkdir()
    shutil.copytree(ROOT / "tests" / "fixtures", dest / "tests" / "fixtures")
    return dest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    wd = copy_workflow(tmp_path_factory.mktemp("wf"))
    t0 = time.time()
    snakemake("--configfile", "config/smoke.yaml", "--workflow-profile", "profiles/default", cwd=wd)
    print(f"smoke workflow: {time.time() - t0:.0f}s")
    return wd


def test_smoke_outputs(smoke):
    res = smoke / "results" / "smoke"
    runs = pd.read_csv(res / "tables" / "runs.csv")
    assert len(runs) == 3 * 3 * 2 + 2  # sizes x sparsities x precisions + continue + finetune
    assert (runs["status"] == "ok").all()
    for col in ("run_id", "n_params", "n_params_total", "n_active", "sparsity", "sparsity_measured", "precision",
                "seed", "tokens", "val_loss", "eval_val_loss"):
        assert col in runs.columns, col
    assert runs["val_loss"].map(math.isfinite).all()
    # eval.json re-measures the saved checkpoint: same loss as training's final evaluation
    assert (runs["val_loss"] - runs["eval_val_loss"]).abs().max() < 1e-4
    assert sorted(runs["mode"].unique()) == ["continue", "finetune", "scratch"]
    curves = pd.read_csv(res / "tables" / "curves.csv")
    assert set(curves["run_id"]) == set(runs["run_id"])
    for p in ("fp", "1.58"):
        assert (res / "fit" / f"fit_{p}.json").is_file()
    assert (res / "fit" / "optimal_sparsity.json").is_file()
    for name in ("fig1_scaling", "fig3_optimal_sparsity", "fig7_residuals"):
        assert (res / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (res / "figures" / f"{name}.pdf").is_file()
    for name in ("fit_constants", "losses", "matched_active", "sparsity"):
        for ext in ("md", "tex", "csv"):
            assert (res / "tables" / f"{name}.{ext}").is_file()
    # every run records its config and versions next to its results
    cfg = pd.read_json(res / "runs" / "d2-s0.50-b1.58-seed0" / "config.json", typ="series")
    assert cfg["precision"] == "1.58" and "torch" in cfg["versions"]


def test_a_fresh_checkout_with_the_bank_trains_nothing_again(smoke, tmp_path):
    """config `bank`: the smoke sweep's runs banked (`sparsescale reference bank`), a fresh copy of the workflow
    with an empty results folder aggregates them from the bank without one train job, to the same losses."""
    res = smoke / "results" / "smoke"
    runs = sorted(d for d in (res / "runs").iterdir() if (d / "final.json").is_file() and "-continue" not in d.name
                  and "-finetune" not in d.name)
    bank = tmp_path / "bank"
    p = subprocess.run([str(BIN / "sparsescale"), "reference", "bank", *map(str, runs), "--out", str(bank / "runs")],
                       env=ENV, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith(f"banked {len(runs)} run(s)"), p.stdout + p.stderr
    assert not list(bank.rglob("*.safetensors")) and not list(bank.rglob("checkpoints"))
    (tmp_path / "fresh").mkdir()
    wd = copy_workflow(tmp_path / "fresh")
    (wd / "bank.yaml").write_text(yaml.safe_dump({"bank": str(bank), "continue": {"enabled": False},
                                                  "finetune": {"enabled": False}}))
    args = ("results/smoke/tables/runs.csv", "--configfile", "config/smoke.yaml", "bank.yaml")
    jobs = [rule for rule, _ in dry_run_jobs(*args, cwd=wd)]
    assert jobs == ["aggregate"], jobs
    snakemake(*args, cwd=wd)
    got = pd.read_csv(wd / "results/smoke/tables/runs.csv").set_index("run_id")["val_loss"]
    want = pd.read_csv(res / "tables/runs.csv").set_index("run_id")["val_loss"]
    assert sorted(got.index) == [d.name for d in runs]
    assert (got == want[got.index]).all()
    curves = pd.read_csv(wd / "results/smoke/tables/curves.csv")
    assert set(curves["run_id"]) == set(got.index)  # metrics.jsonl is banked too


def test_rerun_after_deleting_one_final_reruns_only_that_run(smoke):
    final = smoke / "results" / "smoke" / "runs" / "d2-s0.50-bfp-seed0" / "final.json"
    final.unlink()
    p = snakemake("--configfile", "config/smoke.yaml", "-n", "--quiet", "rules", cwd=smoke)
    counts = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("train") == 1, p.stdout
    assert "train_continue" not in counts and "train_finetune" not in counts
    assert "evaluate" not in counts  # eval.json comes from the train job itself
    assert counts.get("aggregate") == 1 and counts.get("fit") == 1


def test_paper_dag_builds_fast():
    t0 = time.time()
    p = snakemake("--configfile", "config/paper.yaml", "-n", "--quiet", "rules", cwd=ROOT)
    took = time.time() - t0
    counts = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts.get("total", 0) >= 150, p.stdout
    # the sharded data preparation of issue 18: data.shards = data.parts = 256 in config/paper.yaml
    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["data"]
    shards, parts = cfg["shards"], cfg["parts"]
    assert (shards, parts) == (256, 256)
    assert counts.get("data_tokenizer") == 1, p.stdout
    assert counts.get("data_encode") == parts, p.stdout
    assert counts.get("data_shard") == shards + 1, p.stdout  # + the validation split
    assert counts.get("data_gather") == 1, p.stdout
    print(f"paper DAG: {counts['total']} jobs in {took:.1f}s")


def test_lint_and_format_clean():
    p = snakemake("--lint", cwd=ROOT, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    f = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert f.returncode == 0, f.stdout + f.stderr


@pytest.mark.parametrize("sweep,key", [
    ({"sizes": ["d2"], "sparsity": [1.2], "precision": ["fp"], "seeds": [0]}, "1.2"),
    ({"sizes": ["d99"], "sparsity": [0.5], "precision": ["fp"], "seeds": [0]}, "d99"),
    ({"sizes": ["d2"], "sparsity": [0.5], "precision": ["2bit"], "seeds": [0]}, "2bit"),
])
def test_bad_config_fails_at_startup(tmp_path, sweep, key):
    # a config file, not --config: on the command line Snakemake keeps nested values as strings
    wd = copy_workflow(tmp_path)
    (wd / "bad.yaml").write_text(yaml.safe_dump({"sweep": sweep}))
    p = snakemake("--configfile", "config/smoke.yaml", "bad.yaml", "-n", cwd=wd, check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert key in out and "at: sweep." in out, out[-3000:]  # one short message naming the key
    assert not (wd / "results").exists()


def test_extra_seeds_add_runs_at_one_sparsity_only(tmp_path):
    """sweep.extra_seeds: seeds 2 and 3 at S = 0.8 on the smoke grid (3 sizes x 3 S x 2 precisions, seed 0) add
    exactly 3 x 2 x 2 = 12 scratch runs, all at S = 0.8; an entry's `precision` narrows it to those precisions; a
    sparsity off the grid, a precision off the sweep or a seed run twice fails at start-up with one message
    naming it."""
    wd = copy_workflow(tmp_path)
    (wd / "extra.yaml").write_text(yaml.safe_dump({"sweep": {"extra_seeds": [{"sparsity": 0.8, "seeds": [2, 3]}]}}))
    base = {run_config(c)[0] for c in train_commands("config/smoke.yaml", cwd=wd)["train"]}
    more = {run_config(c)[0] for c in train_commands("config/smoke.yaml", "extra.yaml", cwd=wd)["train"]}
    assert len(base) == 18 and base < more
    assert sorted(more - base) == sorted(f"{n}-s0.80-b{p}-seed{seed}" for n in ("d1", "d2", "d3")
                                         for p in ("fp", "1.58") for seed in (2, 3))
    # `precision` narrows an entry: seed 2 at S = 0.5 for 1.58-bit only adds the 3 sizes' 1.58-bit runs
    (wd / "one.yaml").write_text(yaml.safe_dump({"sweep": {"extra_seeds": [
        {"sparsity": 0.5, "seeds": [2], "precision": ["1.58"]}, {"sparsity": 0.5, "seeds": [2], "precision": ["fp"]},
        {"sparsity": 0.8, "seeds": [3], "precision": ["1.58"]}]}}))
    one = {run_config(c)[0] for c in train_commands("config/smoke.yaml", "one.yaml", cwd=wd)["train"]}
    assert sorted(one - base) == sorted([f"{n}-s0.50-b{p}-seed2" for n in ("d1", "d2", "d3") for p in ("fp", "1.58")]
                                        + [f"{n}-s0.80-b1.58-seed3" for n in ("d1", "d2", "d3")])
    only_158 = {"sparsity": 0.8, "seeds": [2], "precision": ["1.58"]}
    for sweep, named in [
        ({"extra_seeds": [{"sparsity": 0.6, "seeds": [2]}]}, "extra_seeds[0].sparsity: 0.6 is not in sweep.sparsity"),
        ({"extra_seeds": [{"sparsity": 0.8, "seeds": [0, 2]}]}, "extra_seeds[0].seeds: seed 0 runs twice at S = 0.8"),
        ({"extra_seeds": [only_158, {"sparsity": 0.8, "seeds": [2]}]},
         "extra_seeds[0].seeds: seed 2 runs twice at S = 0.8, precision 1.58"),
        ({"precision": ["fp"], "extra_seeds": [only_158]}, "extra_seeds[0].precision: 1.58 is not in sweep.precision"),
    ]:
        (wd / "bad.yaml").write_text(yaml.safe_dump({"sweep": sweep}))
        p = snakemake("--configfile", "config/smoke.yaml", "bad.yaml", "-n", cwd=wd, check=False)
        assert p.returncode != 0 and named in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    assert not (wd / "results").exists()


def test_sweep_seeds_per_sparsity_and_precision():
    """sparsescale.config.sweep_seeds, the one definition the rules and the config check share."""
    from sparsescale.config import sweep_seeds

    sweep = {"seeds": [0, 1], "precision": ["fp", "1.58"],
             "extra_seeds": [{"sparsity": 0.9, "seeds": [2, 3]}, {"sparsity": 0.5, "seeds": [2], "precision": ["1.58"]}]}
    assert sweep_seeds(sweep, 0.0, "fp") == [0, 1]
    assert sweep_seeds(sweep, 0.9, "fp") == sweep_seeds(sweep, 0.9, "1.58") == [0, 1, 2, 3]
    assert (sweep_seeds(sweep, 0.5, "fp"), sweep_seeds(sweep, 0.5, "1.58")) == ([0, 1], [0, 1, 2])
    assert sweep_seeds({**sweep, "extra_seeds": [{"sparsity": 0.5, "seeds": [1]}]}, 0.5, "fp") == [0, 1, 1]


def test_lr_factor_scales_the_rate_of_one_sparsity_and_precision(tmp_path):
    """train.lr_factor: [{sparsity: 0.8, precision: [1.58], factor: 0.5}] on the smoke grid (train.lr 3e-3) halves the
    rate of exactly the three 1.58-bit S = 0.8 scratch runs; without `precision` both precisions; the continue and
    finetune stages keep their own rates. A sparsity off the grid, a precision off the sweep, a second factor for
    the same cell, or a factor together with a tune stage fails at start-up with one message naming it."""
    wd = copy_workflow(tmp_path)

    def rates(*extra):
        for i, e in enumerate(extra):
            (wd / f"x{i}.yaml").write_text(yaml.safe_dump(e))
        cmds = train_commands("config/smoke.yaml", *[f"x{i}.yaml" for i in range(len(extra))], cwd=wd)
        return {name: cfg.lr for lines in cmds.values() for name, cfg in map(run_config, lines)}

    base = rates()
    assert len(base) == 20 and set(base.values()) == {3e-3, 1e-3, 3e-4}
    half = rates({"train": {"lr_factor": [{"sparsity": 0.8, "precision": ["1.58"], "factor": 0.5}]}})
    changed = sorted(k for k in base if half[k] != base[k])
    assert changed == [f"{n}-s0.80-b1.58-seed0" for n in ("d1", "d2", "d3")]
    assert all(half[k] == 1.5e-3 for k in changed)
    both = rates({"train": {"lr_factor": [{"sparsity": 0.5, "factor": 2.0}]}})
    assert sorted(k for k in base if both[k] != base[k]) == sorted(
        f"{n}-s0.50-b{p}-seed0" for n in ("d1", "d2", "d3") for p in ("fp", "1.58"))
    assert {both[k] for k in base if both[k] != base[k]} == {6e-3}
    bad = [
        ([{"sparsity": 0.9, "factor": 0.5}], {}, "lr_factor[0].sparsity: 0.9 is not in sweep.sparsity"),
        ([{"sparsity": 0.8, "precision": ["1.58"], "factor": 0.5}], {"sweep": {"precision": ["fp"]}},
         "lr_factor[0].precision: 1.58 is not in sweep.precision"),
        ([{"sparsity": 0.8, "precision": ["1.58"], "factor": 0.5}, {"sparsity": 0.8, "factor": 0.7}], {},
         "lr_factor[1]: S = 0.8, precision 1.58 has a factor already"),
        ([{"sparsity": 0.8, "factor": 0.5}], {"tune": {"enabled": True}}, "train.lr_factor is set but tune.enabled"),
        ([{"sparsity": 0.8, "factor": 0}], {}, "lr_factor[0].factor"),
    ]
    for entries, other, named in bad:
        (wd / "bad.yaml").write_text(yaml.safe_dump({**other, "train": {"lr_factor": entries}}))
        p = snakemake("--configfile", "config/smoke.yaml", "bad.yaml", "-n", cwd=wd, check=False)
        assert p.returncode != 0 and named in p.stdout + p.stderr, (named, (p.stdout + p.stderr)[-2000:])
    assert not (wd / "results").exists()


def test_lr_factor_of_a_sparsity_and_precision():
    """sparsescale.config.lr_factor, the one definition the rules use."""
    from sparsescale.config import lr_factor

    train = {"lr_factor": [{"sparsity": 0.9, "precision": ["1.58"], "factor": 0.5}, {"sparsity": 0.3, "factor": 2}]}
    assert lr_factor(train, 0.9, "1.58") == 0.5 and lr_factor(train, "0.90", "1.58") == 0.5
    assert lr_factor(train, 0.9, "fp") == 1.0 and lr_factor(train, 0.8, "1.58") == 1.0
    assert lr_factor(train, 0.3, "fp") == lr_factor(train, 0.3, "1.58") == 2.0
    assert lr_factor({}, 0.9, "1.58") == lr_factor({"lr_factor": None}, 0.9, "1.58") == 1.0


def test_same_sparsity_matches_grid_values_across_types():
    """The one sparsity match of sweep_seeds, lr_factor and the config checks: YAML floats, wildcard strings."""
    from sparsescale.config import same_sparsity

    assert same_sparsity(0.9, "0.90") and same_sparsity(0.3, 0.1 + 0.2) and same_sparsity("0.50", 0.5)
    assert not same_sparsity(0.9, 0.8) and not same_sparsity(0.0, 0.01) and not same_sparsity("0.70", 0.75)


def train_commands(*configfiles, cwd=ROOT) -> dict[str, list[str]]:
    """The `sparsescale train` command lines of a forced dry run, by rule name."""
    p = snakemake("-n", "-p", "--forceall", "--configfile", *configfiles, cwd=cwd)
    out, rule = {}, None
    for line in p.stdout.splitlines():
        if line.startswith("rule "):
            rule = line[5:].rstrip(":")
        elif line.startswith("Shell command: sparsescale train "):
            out.setdefault(rule, []).append(line.removeprefix("Shell command: ").split(" > ")[0])
    return out


def run_config(command: str):
    """(the run directory's name, TrainConfig from the command's flags); the launcher flags are dropped,
    --eval-out must be the run's eval.json."""
    # a tuned sweep reads its rate from the tune stage at run time: $(sparsescale tune lr ...) -> a number here
    command = re.sub(r"\$\(sparsescale tune lr [^)]*\)", "0.001", command)
    argv = shlex.split(command)[2:]
    p = config_parser("sparsescale train")
    p.add_argument("--nproc-per-node")
    p.add_argument("--nnodes")
    p.add_argument("--warm-start", action="store_true")
    p.add_argument("--eval-out", required=True)
    a = p.parse_args(argv)
    eval_out = Path(a.eval_out)
    del a.nproc_per_node, a.nnodes, a.eval_out, a.warm_start
    cfg = config_from_args(a)
    assert isinstance(cfg, TrainConfig)
    assert eval_out == Path(cfg.out) / "eval.json"  # the train job re-measures its saved model
    return Path(cfg.out).name, cfg


def dry_run_jobs(*args, cwd) -> list[tuple[str, dict[str, str]]]:
    """(rule, {"input": ..., "output": ..., "log": ..., "Shell command": ...}) of every job of `snakemake -n -p`."""
    p = snakemake("-n", "-p", *args, cwd=cwd)
    jobs = []
    for line in p.stdout.splitlines():
        m = re.fullmatch(r"(?:local)?rule (\w+):", line)
        if m:
            jobs.append((m.group(1), {}))
        elif jobs and (line.startswith("    ") or line.startswith("Shell command: ")) and ": " in line:
            key, value = line.strip().split(": ", 1)
            jobs[-1][1].setdefault(key, value)
    return jobs


def test_lmeval_enabled_adds_one_job_per_run_and_feeds_aggregate(tmp_path):
    """lmeval.enabled on the smoke config: one lmeval job per training run, one figure job, and aggregate
    reads every run's lmeval.json (and with lmeval off: none of them)."""
    wd = copy_workflow(tmp_path)
    (wd / "lmeval.yaml").write_text(yaml.safe_dump({"lmeval": {"enabled": True}}))
    conf = yaml.safe_load((wd / "config" / "smoke.yaml").read_text())
    sweep = conf["sweep"]
    n_runs = len(sweep["sizes"]) * len(sweep["sparsity"]) * len(sweep["precision"]) * len(sweep["seeds"])
    n_runs += sum(len(conf[m]["sparsity"]) * len(conf[m]["precision"]) * len(sweep["seeds"])
                  for m in ("continue", "finetune") if conf[m]["enabled"])
    assert n_runs == 3 * 3 * 2 + 2

    jobs = dry_run_jobs("--configfile", "config/smoke.yaml", "lmeval.yaml", cwd=wd)
    by_rule = {}
    for rule, fields in jobs:
        by_rule.setdefault(rule, []).append(fields)
    trained = [f["output"].split(", ")[0] for r in ("train", "train_continue", "train_finetune") for f in by_rule[r]]
    run_dirs = sorted(os.path.dirname(o) for o in trained)  # results/smoke/runs/{id}
    assert len(run_dirs) == len(set(run_dirs)) == n_runs

    lmeval = by_rule["lmeval"]
    assert len(lmeval) == n_runs  # exactly one per training run
    assert sorted(f["output"] for f in lmeval) == sorted(f"{d}/lmeval.json" for d in run_dirs)
    for f in lmeval:
        d, rid = os.path.dirname(f["output"]), os.path.basename(os.path.dirname(f["output"]))
        assert f"{d}/final.json" in f["input"].split(", ") and f"{d}/model" in f["input"].split(", ")
        assert f["log"] == f"results/smoke/logs/lmeval/{rid}.log"
        assert f["Shell command"].startswith(f"sparsescale lm-eval --model {d}/model "), f["Shell command"]

    (fig,) = by_rule["lmeval_figure"]  # exactly one figure job
    assert fig["input"] == "results/smoke/tables/runs.csv"
    assert fig["output"] == "results/smoke/figures/fig_lmeval_accuracy.png"

    (agg,) = by_rule["aggregate"]
    inputs = agg["input"].split(", ")
    assert sorted(i for i in inputs if i.endswith("/lmeval.json")) == sorted(f"{d}/lmeval.json" for d in run_dirs)
    assert sorted(i for i in inputs if i.endswith("/eval.json")) == sorted(f"{d}/eval.json" for d in run_dirs)
    assert len(inputs) == 2 * n_runs

    # off (the smoke config as it is): no lmeval job, no figure job, aggregate reads eval.json only
    off = dry_run_jobs("--configfile", "config/smoke.yaml", cwd=wd)
    rules = [r for r, _ in off]
    assert "lmeval" not in rules and "lmeval_figure" not in rules
    (agg,) = [f for r, f in off if r == "aggregate"]
    assert not any(i.endswith("lmeval.json") for i in agg["input"].split(", "))
    assert not (wd / "results").exists()  # a dry run writes nothing


@pytest.mark.parametrize("configfile", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_rule_run_ids_are_train_config_run_ids(configfile):
    conf = yaml.safe_load((ROOT / "config" / configfile).read_text())
    defaults = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    sweep = {**defaults["sweep"], **conf.get("sweep", {})}
    extra = [(e["sparsity"], p, seed) for e in sweep.get("extra_seeds") or [] for seed in e["seeds"]
             for p in e.get("precision") or sweep["precision"]]
    scratch = {run_id(n, s, p, seed) for n in sweep["sizes"] for s in sweep["sparsity"] for p in sweep["precision"]
               for seed in sweep["seeds"]}
    scratch |= {run_id(n, s, p, seed) for n in sweep["sizes"] for s, p, seed in extra}
    # a banked run (config `bank`, committed) is not trained again
    bank = ROOT / conf["bank"] / "runs" if conf.get("bank") else None
    banked = {rid for rid in scratch if bank and any((bank / rid / f).is_file() for f in ("final.json", "failed.json"))}
    expected = {"train": len(scratch) - len(banked)}
    for mode in ("continue", "finetune"):
        stage = {**defaults[mode], **conf.get(mode, {})}
        if stage["enabled"]:
            expected[f"train_{mode}"] = len(stage["sparsity"]) * len(stage["precision"]) * len(sweep["seeds"])
    commands = train_commands(f"config/{configfile}")
    assert {rule: len(c) for rule, c in commands.items()} == {rule: n for rule, n in expected.items() if n}
    for rule, lines in commands.items():
        for line in lines:
            name, cfg = run_config(line)
            assert name == cfg.run_id and name not in banked, line
            assert cfg.mode == ("scratch" if rule == "train" else rule.removeprefix("train_"))


BANKED_CONFIGS = sorted(p.name for p in (ROOT / "config").glob("*.yaml") if yaml.safe_load(p.read_text()).get("bank"))


@pytest.mark.parametrize("configfile", BANKED_CONFIGS)
def test_banked_runs_were_trained_as_their_rule_would_train_them(tmp_path, configfile):
    """A banked run is never trained again, so its config.json must be what the train rule would run today:
    every field but the output and data folders (a bank may be seeded with runs made elsewhere, e.g. probes,
    on the same data) and, for a tuned sweep, the rate (the tune stage's, checked in test_reference.py)."""
    conf = yaml.safe_load((ROOT / "config" / configfile).read_text())
    tuned = conf.get("tune", {}).get("enabled", False)
    (tmp_path / "nobank.yaml").write_text("bank: null\n")
    commands = {name: cfg for line in train_commands(f"config/{configfile}", str(tmp_path / "nobank.yaml"))["train"]
                for name, cfg in [run_config(line)]}
    banked = sorted(p.parent for p in (ROOT / conf["bank"] / "runs").glob("*/final.json"))
    assert banked, f"{conf['bank']} holds no finished run"
    ignore = {"out", "data", "versions"} | ({"lr"} if tuned else set())
    for run in banked:
        got = json.loads((run / "config.json").read_text())
        want = {"run_id": commands[run.name].run_id, **dataclasses.asdict(commands[run.name])}
        assert {k: v for k, v in got.items() if k not in ignore} == {k: v for k, v in want.items() if k not in ignore}, run
        assert json.loads((run / "final.json").read_text())["run_id"] == run.name


def test_continue_and_finetune_jobs_launch_on_every_gpu(tmp_path):
    (tmp_path / "gpu2.yaml").write_text(yaml.safe_dump(
        {"resources": {"train": {"threads": 1, "gpu": 2, "nodes": 1, "mem_mb": 2000, "runtime": 10}}}))
    commands = train_commands("config/smoke.yaml", str(tmp_path / "gpu2.yaml"))
    assert sorted(commands) == ["train", "train_continue", "train_finetune"]
    for rule, lines in commands.items():
        for line in lines:
            assert line.startswith("sparsescale train --nproc-per-node 2 --nnodes 1 --data "), (rule, line)
    (cont,) = commands["train_continue"]
    name, cfg = run_config(cont)
    assert name == "d2-s0.50-bfp-seed0-continue" and cfg.lr == 1e-3 and cfg.tokens == 5120
    assert cfg.init_from == "results/smoke/runs/d2-s0.00-bfp-seed0/model"
