"""Warm start (warm.py): `sparsescale train` forked from a server that has imported torch already.

The run it makes is the run a fresh process makes (the same loss, bit for bit), its start-up is a fraction of
a fresh process's, bad input fails the same way, and a killed client stops its run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import shutil
import tempfile

import pytest

REPO = Path(__file__).resolve().parents[1]
SPARSESCALE = str(Path(sys.executable).parent / "sparsescale")
CORPUS = REPO / "tests" / "fixtures" / "english.jsonl"
ARGS = ["--size", "d1", "--sparsity", "0.5", "--precision", "fp", "--seed", "0", "--lr", "0.01", "--seq-len", "32",
        "--batch-size", "4", "--eval-tokens", "1024", "--threads", "1", "--eval-every", "10", "--checkpoint-every",
        "0", "--tokens", "2560"]


def _env(sock: Path, warm: bool, idle: float = 60.0) -> dict:
    env = dict(os.environ, SPARSESCALE_WARM_DIR=str(sock), SPARSESCALE_WARM_IDLE=str(idle),
               SPARSESCALE_WARM="1" if warm else "0", OMP_NUM_THREADS="1")
    env.pop("SPARSESCALE_STARTED_AT", None)
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "fixture"
    proc = subprocess.run([SPARSESCALE, "prepare", "--source", "files", "--files", str(CORPUS), "--vocab-size", "512",
                           "--val-fraction", "0.1", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _train(out: Path, dataset: Path, sock: Path, warm: bool, *extra: str, idle: float = 60.0):
    return subprocess.run([SPARSESCALE, "train", "--data", str(dataset), "--out", str(out), *ARGS, *extra],
                          env=_env(sock, warm, idle), capture_output=True, text=True, timeout=300)


@pytest.fixture
def sock():
    """A short folder for the sockets: a Unix socket's path holds at most 107 bytes, pytest's tmp_path is long."""
    path = Path(tempfile.mkdtemp(prefix="ssw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _servers(sock: Path) -> list[Path]:
    return sorted(sock.glob("sparsescale-warm-*/*.sock"))


def test_warm_run_equals_a_fresh_process_and_skips_its_start_up(dataset, tmp_path, sock):
    direct = _train(tmp_path / "direct", dataset, sock, False, "--eval-out", str(tmp_path / "direct/eval.json"))
    assert direct.returncode == 0, direct.stderr
    assert _servers(sock) == []
    runs = []
    for i in range(2):  # the first starts the server, the second finds it
        proc = _train(tmp_path / f"warm{i}", dataset, sock, True, "--eval-out", str(tmp_path / f"warm{i}/eval.json"))
        assert proc.returncode == 0, proc.stderr
        assert len(re.findall(r"warm start: the run is pid (\d+)", proc.stderr)) == 1
        runs.append(json.loads((tmp_path / f"warm{i}/final.json").read_text()))
    assert len(_servers(sock)) == 1
    ref = json.loads((tmp_path / "direct/final.json").read_text())

    def curve(run: str) -> list:
        return [(r["step"], r["train_loss"], r.get("val_loss")) for r in
                map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert curve("warm0") == curve("warm1") == curve("direct") and len(curve("direct")) == 2
    for run in runs:
        assert run["val_loss"] == ref["val_loss"] and run["steps"] == ref["steps"] == 20
        assert json.loads((tmp_path / "warm0/eval.json").read_text())["val_loss"] == \
            json.loads((tmp_path / "direct/eval.json").read_text())["val_loss"]
    # start-up (interpreter + imports) and setup (the model's import) are the server's: a fraction of a fresh one's
    fresh = ref["phase_seconds"]["startup"] + ref["phase_seconds"]["setup"]
    warm = runs[1]["phase_seconds"]["startup"] + runs[1]["phase_seconds"]["setup"]
    assert fresh > 1.0 and warm < 0.5 * fresh, (fresh, warm)
    assert runs[1]["phase_seconds"]["startup"] > 0.0  # counted from the client's start, not the fork


def test_warm_bad_input_fails_as_a_fresh_process_does(dataset, tmp_path, sock):
    procs = [_train(tmp_path / f"bad{w}", dataset, sock, w, "--size", "d99") for w in (False, True)]
    msgs = [[line for line in p.stderr.splitlines() if "error" in line] for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert msgs[0] == msgs[1] and msgs[0][0].startswith("sparsescale train: error: unknown model size 'd99'")
    assert not (tmp_path / "badFalse").exists() and not (tmp_path / "badTrue").exists()


def test_killed_client_stops_its_run_and_an_idle_server_exits(dataset, tmp_path, sock):
    warmup = _train(tmp_path / "warmup", dataset, sock, True, idle=8.0)  # the server is up and idle
    assert warmup.returncode == 0, warmup.stderr
    log = tmp_path / "long.log"
    with log.open("w") as fh:
        client = subprocess.Popen([SPARSESCALE, "train", "--data", str(dataset), "--out", str(tmp_path / "long"), *ARGS,
                                   "--tokens", "10000000"], env=_env(sock, True, 8.0), stdout=fh, stderr=fh)
    deadline = time.monotonic() + 60
    while not (m := re.search(r"the run is pid (\d+)", log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert m, log.read_text()
    child = int(m.group(1))
    time.sleep(1.0)
    assert Path(f"/proc/{child}").exists()  # training
    client.send_signal(signal.SIGKILL)
    client.wait(timeout=10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the run outlived its killed client"
    assert not (tmp_path / "long/final.json").exists()
    deadline = time.monotonic() + 30
    while _servers(sock) and time.monotonic() < deadline:  # idle for 8 s: the server exits and removes its socket
        time.sleep(0.2)
    assert _servers(sock) == []


def test_unusable_socket_folder_runs_in_process_with_one_message(dataset, tmp_path, sock):
    blocker = sock / "f"  # short: under pytest-xdist tmp_path alone makes the socket path too long
    blocker.write_text("a file where the socket folder would go")
    proc = _train(tmp_path / "run", dataset, blocker, True)
    assert proc.returncode == 0, proc.stderr
    assert "(set SPARSESCALE_WARM_DIR to a writable folder); running in this process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "run/final.json").read_text())["steps"] == 20


def test_too_long_socket_path_runs_in_process_with_one_message(dataset, tmp_path):
    proc = _train(tmp_path / "run", dataset, tmp_path / ("x" * 120), True)
    assert proc.returncode == 0, proc.stderr
    assert "longer than 107 bytes (the limit of a Unix socket): set SPARSESCALE_WARM_DIR" in proc.stderr
    assert json.loads((tmp_path / "run/final.json").read_text())["steps"] == 20


def _server_processes(sock: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(sock).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def test_jobs_that_start_together_start_one_server(dataset, tmp_path, sock):
    procs = [subprocess.Popen([SPARSESCALE, "train", "--warm-start", "--data", str(dataset), "--out",
                               str(tmp_path / f"r{i}"), *ARGS], env=_env(sock, False, 5.0), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert all("warm start: the run is pid" in e for e in errs), errs
    assert len(_server_processes(sock)) == 1 and len(_servers(sock)) == 1
    deadline = time.monotonic() + 30
    while _server_processes(sock) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_processes(sock) == [] and _servers(sock) == []  # idle: gone, socket and empty log removed
    assert sorted(p.name for p in sock.glob("sparsescale-warm-*/*")) == ["start.lock"]  # no log, no socket left


def test_requested_only_for_one_process_and_never_inside_the_forked_run(monkeypatch):
    from sparsescale import warm

    monkeypatch.delenv("SPARSESCALE_WARM", raising=False)
    monkeypatch.delenv("SPARSESCALE_WARM_CHILD", raising=False)
    assert warm.requested(["--warm-start", "--size", "d1"])
    assert not warm.requested(["--size", "d1"])
    assert warm.requested(["--warm-start", "--nproc-per-node", "1", "--nnodes", "1"])
    assert not warm.requested(["--warm-start", "--nproc-per-node", "2"])  # torchrun: a fork cannot hand it over
    assert not warm.requested(["--warm-start", "--nnodes=2"])
    monkeypatch.setenv("SPARSESCALE_WARM", "1")
    assert warm.requested(["--size", "d1"])
    monkeypatch.setenv("SPARSESCALE_WARM_CHILD", "1")
    assert not warm.requested(["--warm-start"])
