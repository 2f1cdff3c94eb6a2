"""Run the project's Snakemake workflow from a private working directory (tests only).

Snakemake keeps its lock, metadata and `logs/` relative to the working directory, so every test gets its own:
a folder holding symlinks to the repository's Snakefile, workflow/, config/ and tests/ (the fixture corpus),
in which `results/` and `logs/` are the test's alone; `fault_env` arms tests/cluster/fault_hook in its jobs.
Used by tests/test_faults.py and tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINKED = ("Snakefile", "workflow", "profiles", "config", "tests")
FAULT_HOOK = Path(__file__).resolve().parent / "fault_hook"  # sitecustomize.py: see its docstring


def make_workdir(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (path / name).exists():
            (path / name).symlink_to(REPO / name)
    return path


def env(**extra: str) -> dict:
    """os.environ with the interpreter's bin/ first on PATH (the rules call `sparsescale`), plus `extra`."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **extra}


def fault_env(spec: str, marker: str | os.PathLike) -> dict:
    """Environment that arms the fault hook in every Python process started with it (jobs included)."""
    path = os.pathsep.join(p for p in (str(FAULT_HOOK), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "SPARSESCALE_FAULT": spec, "SPARSESCALE_FAULT_MARKER": str(marker)}


def snakemake_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def snakemake(workdir: str | os.PathLike, *args: str, extra_env: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`snakemake ARGS` in `workdir`; returns the finished process (stdout and stderr captured, together)."""
    return subprocess.run(snakemake_cmd(*args), cwd=workdir, env=env(**(extra_env or {})), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_runs(path: str | os.PathLike) -> dict[str, dict]:
    """runs.csv as {run_id: row}, numbers as written (strings)."""
    with open(path, newline="") as f:
        return {row["run_id"]: row for row in csv.DictReader(f)}


def wait_stopped(marker: Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    """PID the fault hook wrote into `marker`, once that process (`proc` or a child of it) is frozen by SIGSTOP."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            out = proc.communicate()[0] if proc.stdout else ""
            raise AssertionError(f"exited ({proc.returncode}) before the fault point:\n{(out or '')[-3000:]}")
        try:
            pid = int(marker.read_text())
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "T":
                    return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no process stopped at the fault point within {timeout:.0f}s")
