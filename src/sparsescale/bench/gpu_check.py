"""`sparsescale bench gpu-check` (`make gpu-check`): the prepared GPU check, one unattended run (<= 8 min, one H100).

Features
- Training throughput and model FLOPs utilisation of a ~300M model (size "300M"), dense vs Q-Sparse S=0.5 in
  both precisions (fp; 1.58-bit weights + 8-bit activations), bf16 autocast, AdamW, seq 1024 x batch 8;
  MFU = 6 N tokens/s over the card's dense bf16 peak (`PEAK_BF16_TFLOPS` by device name, or `--peak-tflops`),
  N the non-embedding parameters (the LM head's and attention's FLOPs are not counted: a lower bound).
- The fused Triton GEMV (`kernels.gpu`, selection + GEMV in one launch) against cuBLAS at 4096x11008 and
  11008x4096, S = 0.4 ... 0.8, bf16 and fp32 (`bench gemv --device cuda --backend triton`).
- Batch-1 decode tokens/s, dense vs sparse (`bench decode --device cuda`, bf16, S = 0.5).
- Writes `train.csv`, `gemv.csv`, `decode.csv` (each with a JSON sidecar), `summary.json` and `summary.txt`
  under `--out` (default results/bench/gpu/), prints one summary table. Offline: nothing is downloaded
  (random weights, random tokens). Fails loudly (exit 1, one message) when CUDA is missing.
- `--dry-run`: the same flow on CPU with tiny shapes (what the tests run), so it stays runnable without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from sparsescale.bench import decode as bench_decode_mod, gemv as bench_gemv_mod
from sparsescale.bench.timing import interleaved_median_ms
from sparsescale.errors import UserError
from sparsescale.io import atomic_write_text, versions, write_json
from sparsescale.validation import autocast

# dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 125.0, "L4": 121.0}
SPARSITIES = ("0.4", "0.5", "0.6", "0.7", "0.8")


def peak_tflops(name: str) -> float:
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return float("nan")


def train_rows(size: str, vocab: int, seq: int, batch: int, repeats: int, device: str, peak: float) -> list[dict]:
    """Step time, tokens/s and MFU of dense and Q-Sparse (fp, 1.58-bit) at S=0.5, interleaved."""
    from sparsescale import model as M, qsparse as Q  # deferred: transformers costs seconds; --dry-run/--help stay fast

    ids = torch.randint(0, vocab, (batch, seq), device=device)
    variants = {"dense": None, "qsparse fp S=0.5": ("fp", None), "qsparse 1.58 S=0.5": ("1.58", 8)}
    fns, n_params = {}, 0
    for name, conv in variants.items():
        m = M.build(size, vocab, max_seq_len=seq, seed=0).to(device)
        n_params = M.param_counts(m)["n_params"]
        if conv is not None:
            Q.convert(m, 0.5, weight_bits=conv[0], act_bits=conv[1])
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(m=m, opt=opt):
            with autocast(device):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[name] = step
    ms = interleaved_median_ms(fns, repeats=repeats, warmup=2, device=device)
    rows = []
    for name in variants:
        tok_s = batch * seq / (ms[name] / 1e3)
        rows.append({"variant": name, "size": size, "n_params": n_params, "seq": seq, "batch": batch,
                     "step_ms": ms[name], "tokens_per_s": tok_s, "ratio_to_dense": ms[name] / ms["dense"],
                     "mfu": 6.0 * n_params * tok_s / (peak * 1e12)})
    return rows


def _csv_rows(path: str) -> list[dict]:
    import csv  # deferred: only the dry run reads CSVs back

    with open(path) as f:
        return list(csv.DictReader(f))


def summary_table(train: list[dict], gemv: list[dict], decode: list[dict]) -> str:
    lines = ["GPU check summary", "", "training (bf16 autocast, AdamW):",
             f"  {'variant':<20} {'step ms':>9} {'tok/s':>10} {'vs dense':>8} {'MFU':>6}"]
    for r in train:
        lines.append(f"  {r['variant']:<20} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
                     f"{r['ratio_to_dense']:>8.2f} {r['mfu']:>6.1%}")
    lines += ["", "sparse GEMV (fused Triton) vs the faster of cuBLAS and the kernel at S=0:",
              f"  {'shape':>12} {'dtype':>5} {'S':>4} {'cuBLAS ms':>10} {'sparse ms':>10} {'speedup':>7} {'ideal':>6} "
              f"{'frac':>5}"]
    for r in gemv:
        frac = "BUG" if str(r["above_ideal"]).lower() == "true" else f"{float(r['fraction_of_ideal']):.2f}"
        lines.append(f"  {r['d_in'] + 'x' + r['d_out']:>12} {r['dtype']:>5} {float(r['sparsity']):>4.1f} "
                     f"{float(r['dense_ms']):>10.4f} {float(r['sparse_ms']):>10.4f} {float(r['speedup']):>7.2f} "
                     f"{float(r['ideal']):>6.2f} {frac:>5}")
    lines += ["", "batch-1 decode:"]
    for r in decode:
        lines.append(f"  S={float(r['sparsity']):.1f} {r['dtype']}: dense {float(r['dense_tok_s']):.1f} tok/s, sparse "
                     f"{float(r['sparse_tok_s']):.1f} tok/s ({float(r['speedup']):.2f}x the faster baseline, "
                     f"{r['baseline']}); tokens equal: {r['tokens_equal']}")
    return "\n".join(lines) + "\n"


def bench_gpu_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale bench gpu-check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench/gpu", help="output folder (default results/bench/gpu)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the flow without a GPU")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card (default: by device name)")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    if a.dry_run:
        device, peak, name = "cpu", a.peak_tflops or 1.0, "cpu (dry run)"
        train_cfg = ("d2", 256, 32, 2, 1)
        gemv_args = ["--shapes", "64x96", "--dtypes", "fp32,bf16", "--repeats", "1"]
        sparsities = ("0.5", "0.8")
        decode_args = ["--size", "d2", "--dtype", "fp32", "--vocab-size", "256", "--new-tokens", "3",
                       "--repeats", "1"]
    else:
        if not torch.cuda.is_available():
            raise UserError("gpu-check needs CUDA: torch.cuda.is_available() is False on this machine "
                            f"(torch {torch.__version__}); run it on a GPU machine, or pass --dry-run to check the flow")
        from sparsescale.kernels import HAVE_TRITON  # deferred: imports triton, on a CUDA machine only

        if not HAVE_TRITON:
            raise UserError("gpu-check needs triton for the fused sparse GEMV: it is in the dev extra "
                            "(pip install -e '.[dev]') and ships with CUDA builds of torch")
        device, name = "cuda", torch.cuda.get_device_name()
        peak = a.peak_tflops or peak_tflops(name)
        train_cfg = ("300M", 32000, 1024, 8, 5)
        gemv_args = ["--device", "cuda", "--backend", "triton", "--shapes", "4096x11008,11008x4096",
                     "--dtypes", "bf16,fp32", "--repeats", "30"]
        sparsities = SPARSITIES
        decode_args = ["--device", "cuda", "--size", "300M", "--dtype", "bf16", "--vocab-size", "32000",
                       "--new-tokens", "32", "--repeats", "3"]
    os.makedirs(a.out, exist_ok=True)
    print(f"gpu-check on {name}: peak {peak} TFLOP/s bf16 -> {a.out}", flush=True)

    size, vocab, seq, batch, repeats = train_cfg
    train = train_rows(size, vocab, seq, batch, repeats, device, peak)
    bench_gemv_mod.write_csv(os.path.join(a.out, "train.csv"), train, tuple(train[0]))
    write_json(os.path.join(a.out, "train.json"), {"benchmark": "train", "device": name, "peak_tflops": peak,
                                                   "rows": train, "versions": versions()})
    print(f"training done ({time.perf_counter() - t0:.0f} s)", flush=True)

    gemv_csv, decode_csv = os.path.join(a.out, "gemv.csv"), os.path.join(a.out, "decode.csv")
    if bench_gemv_mod.bench_gemv(gemv_args + ["--sparsity", *sparsities, "--out", gemv_csv]):
        raise UserError("the GEMV benchmark failed: see its output above")
    print(f"GEMV done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if bench_decode_mod.bench_decode(decode_args + ["--sparsity", "0.5", "--out", decode_csv]):
        raise UserError("the decode benchmark failed: see its output above")

    table = summary_table(train, _csv_rows(gemv_csv), _csv_rows(decode_csv))
    wall = time.perf_counter() - t0
    table += f"\nwall time {wall:.0f} s on {name}{' (dry run: numbers mean nothing)' if a.dry_run else ''}\n"
    atomic_write_text(os.path.join(a.out, "summary.txt"), table)
    write_json(os.path.join(a.out, "summary.json"), {"device": name, "dry_run": a.dry_run, "peak_tflops": peak,
                                                     "wall_s": wall, "train": train, "versions": versions()})
    print(table)
    return 0


if __name__ == "__main__":  # `python -m sparsescale.bench.gpu_check` (what `make gpu-check` runs)
    try:
        sys.exit(bench_gpu_check(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
