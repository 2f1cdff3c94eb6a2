"""The README's commands as a new user types them: plain `snakemake` (no --workflow-profile) picks up
profiles/default, so a sweep SIGKILLed mid-training (Snakemake and its jobs, as a dying node or `kill -9`
of the process group) and rerun with the same command finishes with the losses of an uninterrupted run; and
`snakemake --report report.html` works after it (the profile sets `cores`, which fit's `workflow.cores` needs).

A Snakemake killed with SIGKILL cannot remove its lock: the next call says so and names `--unlock` (Snakemake's
own rule, which keeps two live invocations apart; tests/test_faults.py checks that). After `snakemake --unlock`
the same command reruns the killed jobs and training resumes from its last checkpoint. (rerun-incomplete, from
the profile, matters when a job dies with some outputs written, e.g. the fit or a model without final.json:
without it Snakemake stops at IncompleteFilesException.)
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsescale import data as D

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
from workflow_dir import REPO, env, fault_env, make_workdir, snakemake, snakemake_cmd, wait_stopped  # noqa: E402

pytestmark = pytest.mark.slow

# 6 runs (d1, d2 x S 0, 0.5, 0.8) of 4 steps, a checkpoint after each; fit and figures on
TINY = {
    "results": "results",
    "data": {"name": "fixture", "source": "files", "files": ["tests/fixtures/english.jsonl"], "vocab_size": 512,
             "val_fraction": 0.1},
    "sweep": {"sizes": ["d1", "d2"], "sparsity": [0.0, 0.5, 0.8], "precision": ["fp"], "seeds": [0]},
    "train": {"seq_len": 32, "batch_size": 4, "tokens": 512, "eval_tokens": 256, "checkpoint_every": 1,
              "eval_every": 2, "threads": 1, "lr": {"fp": {"default": 3.0e-3}},
              "warm_start": False},  # the test reads the frozen run's --out from its /proc cmdline: a forked run has none
    "resources": {"train": {"threads": 1, "gpu": 0, "mem_mb": 1000, "runtime": 5}},
    "fit": {"bootstrap": 2},
    "figures": {"enabled": True, "dpi": 60},
    "continue": {"enabled": False},
    "finetune": {"enabled": False},
    "superweight": {"enabled": False},
}
PLAIN = ["--configfile", "tiny.yaml", "--cores", "2"]  # what the README says, on the tiny config (targets may follow)


def workdir(path: Path, dataset: Path) -> Path:
    wd = make_workdir(path)
    (wd / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (wd / "results" / "data").mkdir(parents=True)
    os.symlink(dataset, wd / "results" / "data" / "fixture")  # what `prepare` would make: saves a job
    return wd


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("resume")
    dataset = base / "fixture"
    D.prepare(D.files_corpus([str(REPO / "tests/fixtures/english.jsonl")]), dataset, vocab_size=512, val_fraction=0.1)
    wd = workdir(base / "wd", dataset)
    out: dict = {"dir": wd}
    # 1. the sweep, frozen by the fault hook right after one job's checkpoint 2 of 4, then SIGKILLed whole
    proc = subprocess.Popen(snakemake_cmd(*PLAIN), cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(**fault_env("after:step_00000002.pt.sha256:stop", base / "pid")),
                            start_new_session=True)
    try:
        pid = wait_stopped(base / "pid", proc)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        out["killed_run"] = Path(cmd[cmd.index(b"--out") + 1].decode()).name
        os.killpg(proc.pid, signal.SIGKILL)
        out["first"] = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out["first_rc"] = proc.returncode
    # 2. the stale lock of the killed Snakemake: refused, with the way out named; --unlock removes it
    out["locked"] = snakemake(wd, *PLAIN)
    out["unlock"] = snakemake(wd, "--unlock", "--configfile", "tiny.yaml")
    # 3. the same command again
    out["rerun"] = snakemake(wd, *PLAIN)
    # 4. the report, exactly as the README writes it
    out["report"] = snakemake(wd, "--report", "report.html")
    # the killed run, uninterrupted, in a fresh working directory
    ref = workdir(base / "ref", dataset)
    out["reference"] = snakemake(ref, *PLAIN, f"results/runs/{out['killed_run']}/final.json")
    out["ref_dir"] = ref
    return out


def test_plain_snakemake_uses_the_default_profile(story):
    assert "Using workflow specific profile profiles/default" in story["first"]
    assert story["first_rc"] == -signal.SIGKILL


def test_the_killed_snakemakes_lock_is_named_with_the_fix(story):
    locked = story["locked"]
    assert locked.returncode == 1 and "Directory cannot be locked" in locked.stdout
    assert "--unlock" in locked.stdout and "rule train:" not in locked.stdout
    assert story["unlock"].returncode == 0, story["unlock"].stdout[-2000:]


def test_default_profile_settings():
    profile = yaml.safe_load((REPO / "profiles/default/config.yaml").read_text())
    assert profile["rerun-incomplete"] is True and profile["keep-going"] is True and profile["cores"] == "all"


def test_rerun_of_the_same_command_resumes_to_the_uninterrupted_losses(story):
    rerun = story["rerun"]
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "Using workflow specific profile profiles/default" in rerun.stdout
    assert story["reference"].returncode == 0, story["reference"].stdout[-3000:]
    rid = story["killed_run"]
    resumed, uninterrupted = final(story["dir"] / "results/runs" / rid), final(story["ref_dir"] / "results/runs" / rid)
    assert resumed["resumed_from_step"] == 2 and uninterrupted["resumed_from_step"] == 0
    assert resumed["val_loss"] == uninterrupted["val_loss"]  # bit for bit on CPU
    runs = (story["dir"] / "results/tables/runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 6 and all(",ok," in r for r in runs[1:])


def test_report_works_after_a_run(story):
    p = story["report"]
    assert p.returncode == 0, p.stdout[-3000:]
    assert "total number of cores" not in p.stdout
    html = story["dir"] / "report.html"
    assert html.stat().st_size > 100_000
    assert "fig1_scaling.png" in html.read_text(errors="replace")


def test_logs_stay_under_the_results_root(story):
    """Every rule logs under {results}/logs: no `logs/` in the working directory (it was there, shared by the smoke
    and default sweeps) nor anywhere else outside the results root, after the killed run, the rerun and the report."""
    for wd in (story["dir"], story["ref_dir"]):
        results = wd / TINY["results"]
        assert not (wd / "logs").exists()
        stray = [Path(d) / "logs" for d, subdirs, _ in os.walk(wd)  # symlinks (workflow/, config/, ...) not followed
                 if "logs" in subdirs and not Path(d, "logs").is_relative_to(results)]
        assert stray == [], stray
        assert (results / "logs").is_dir()
    logs = story["dir"] / TINY["results"] / "logs"
    assert (logs / "train" / f"{story['killed_run']}.log").is_file()
    assert {f"{rid}.log" for rid in (f"{s}-s{p:.2f}-bfp-seed0" for s in ("d1", "d2") for p in (0.0, 0.5, 0.8))} \
        == {p.name for p in (logs / "train").iterdir() if p.suffix == ".log"}
    assert (logs / "aggregate.log").is_file() and (logs / "fit.log").is_file() and (logs / "figures.log").is_file()
