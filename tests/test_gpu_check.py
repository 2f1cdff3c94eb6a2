"""`make gpu-check` without a GPU: the CPU dry run of the whole flow, and the loud failure without CUDA."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from sparsescale.bench import gpu_check


def test_dry_run_writes_every_table(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert gpu_check.bench_gpu_check(["--dry-run", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(["train.csv", "train.json", "gemv.csv", "gemv.json", "decode.csv",
                                              "decode.json", "summary.json", "summary.txt"])
    train = list(csv.DictReader(open(out / "train.csv")))
    assert [r["variant"] for r in train] == ["dense", "qsparse fp S=0.5", "qsparse 1.58 S=0.5"]
    assert float(train[0]["ratio_to_dense"]) == 1.0 and all(float(r["mfu"]) > 0 for r in train)
    gemv = list(csv.DictReader(open(out / "gemv.csv")))
    assert len(gemv) == 2 * 2 and {r["baseline"] for r in gemv} <= {"dense", "kernel_s0"}
    decode = list(csv.DictReader(open(out / "decode.csv")))
    assert len(decode) == 1 and decode[0]["tokens_equal"] == "True" and decode[0]["extra_bytes"] == "0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["wall_s"] > 0
    printed = capsys.readouterr().out
    assert "GPU check summary" in printed and (out / "summary.txt").read_text() in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_fails_loudly_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, "-m", "sparsescale.bench.gpu_check", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "gpu-check needs CUDA" in r.stderr and "--dry-run" in r.stderr
    assert not out.exists()  # no partial output


def test_peak_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("some card") != gpu_check.peak_tflops("some card")  # NaN: unknown
