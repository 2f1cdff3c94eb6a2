"""The smoke sweep on a real SLURM (slurmctld + slurmd + munged started by this test) equals a local run.

- The cluster is a session fixture: started once, stopped at the end by the PIDs of the daemons it started;
  skipped with the reason when this machine cannot run one (not root, packages missing: run
  tests/cluster/install-slurm.sh). CI runs it as root after installing the packages.
- config/smoke.yaml reduced by tests/cluster/cluster.yaml: 2 sizes x 3 sparsities, fp; every training job asks
  for one GPU (`--gpus=1` against fake GPU gres) and falls back to the CPU, so its loss is bit-identical to the
  local run's.
- A fault on the way: the first training job to write its second checkpoint is SIGKILLed; the profile's
  `retries` resubmits it with 1.5x memory and time and it resumes from that checkpoint, to the same loss.
- The local reference runs at the same time as the SLURM run (the plugin mostly waits on its polls).
- Job arrays are not used: plugin 2.8.0 breaks them (see profiles/slurm/config.yaml).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm import SYS_CONF, Cluster, alive, unavailable
from workflow_dir import env, fault_env, make_workdir, read_runs, snakemake_cmd

pytestmark = pytest.mark.cluster

CONFIGS = ["--configfile", "config/smoke.yaml", "tests/cluster/cluster.yaml"]
RUN_IDS = [f"{n}-s{s}-bfp-seed0" for n in ("d1", "d2") for s in ("0.00", "0.50", "0.80")]


@pytest.fixture(scope="session")
def slurm_cluster():
    why = unavailable()
    if why:
        pytest.skip(why)
    cluster = Cluster().start()  # in a fresh /tmp/sparsescale-slurm-*, removed by stop()
    pids = dict(cluster.started)
    yield cluster
    cluster.stop()
    # the harness stops what it started, and only that
    assert [d for d, p in pids.items() if alive(p)] == []
    assert not (SYS_CONF.is_symlink() and Path(os.readlink(SYS_CONF)) == cluster.conf)
    assert not cluster.base.exists()


def test_smoke_sweep_on_slurm_equals_local_run(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    local_dir, slurm_dir = make_workdir(tmp_path / "local"), make_workdir(tmp_path / "slurm")
    # the reference: same configs, local executor, only the training runs (their final.json hold the losses)
    local = subprocess.Popen(snakemake_cmd("--cores", "1", *CONFIGS, "--workflow-profile", "profiles/default",
                                           *[f"results/smoke/runs/{rid}/final.json" for rid in RUN_IDS]),
                             cwd=local_dir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # a fault: the first training job to write its second checkpoint is SIGKILLed (once); the profile's
    # `retries` resubmits it with more memory and time, and it resumes from that checkpoint
    faults = {**fault_env("after:step_00000002.pt.sha256:kill", tmp_path / "killed.pid"),
              "SLURM_CONF": str(slurm_cluster.conf)}
    slurm = subprocess.run(
        snakemake_cmd(*CONFIGS, "--workflow-profile", "profiles/slurm",
                      "--slurm-init-seconds-before-status-checks", "3",  # 40 s by default: fine on a cluster, slow here
                      "--slurm-no-account", "--cores", "2", "--latency-wait", "5"),
        cwd=slurm_dir, env=env(**faults), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    local_out, _ = local.communicate(timeout=600)
    print(f"SLURM sweep: {time.monotonic() - t0:.0f}s wall (cluster up in {slurm_cluster.startup_s:.1f}s)")
    assert slurm.returncode == 0, slurm.stdout[-6000:]
    assert local.returncode == 0, local_out[-4000:]

    # same runs, same losses (CPU training is deterministic, a resumed run equals an uninterrupted one)
    rows = read_runs(slurm_dir / "results/smoke/tables/runs.csv")
    assert sorted(rows) == RUN_IDS and all(r["status"] == "ok" for r in rows.values())
    resumed = {}
    for rid in RUN_IDS:
        got = json.loads((slurm_dir / f"results/smoke/runs/{rid}/final.json").read_text())
        want = json.loads((local_dir / f"results/smoke/runs/{rid}/final.json").read_text())
        assert got["val_loss"] == want["val_loss"], rid  # bit for bit
        assert got["device"] == "cpu"  # asked SLURM for a GPU, got a fake one, trained on the CPU
        resumed[rid] = got["resumed_from_step"]
    assert sorted(resumed.values()) == [0] * (len(RUN_IDS) - 1) + [2], resumed
    killed = next(rid for rid, step in resumed.items() if step == 2)
    fit = json.loads((slurm_dir / "results/smoke/fit/fit_fp.json").read_text())
    assert fit["n_runs"] == len(RUN_IDS) and math.isfinite(fit["s_star"])

    # every job went through SLURM, each training job with one GPU; the killed one twice, the second
    # time with 1.5x the memory and time (the rules scale mem_mb and runtime by the attempt number)
    fields = "JobID:|,State:|,tres-per-job:|,MinMemory:|,TimeLimit:|,Comment:"
    jobs = [line.split("|") for line in slurm_cluster.run("squeue", "-h", "-t", "all", "-O", fields).splitlines()]
    by_rule = {}
    for jid, state, tres, mem, limit, comment in jobs:
        by_rule.setdefault(comment.split("_wildcards_")[0], []).append((state, tres, mem, limit, comment))
    assert {r: len(j) for r, j in by_rule.items()} == {
        "rule_prepare": 1, "rule_train": len(RUN_IDS) + 1, "rule_aggregate": 1,
        "rule_fit": 1}, jobs
    assert all(tres == "gres:gpu:1" for _, tres, *_ in by_rule["rule_train"]), jobs
    size, s = killed.split("-")[0], killed.split("-s")[1][:4]
    tries = sorted((state, mem, limit) for state, _, mem, limit, comment in by_rule["rule_train"]
                   if comment == f"rule_train_wildcards_{size}_{s}_fp_0")
    assert tries == [("COMPLETED", "3000M", "15:00"), ("FAILED", "2000M", "10:00")], jobs
