"""`sparsescale bench gemv`: batch-1 sparse GEMV (selection included) vs two dense baselines, side by side.

For every shape, dtype and sparsity S, timed interleaved in one run on a rotating pool of inputs (so a high S
cannot keep its few active rows in cache by always selecting the same ones):
    dense        the framework's `F.linear(x, W)` (cuBLAS / oneDNN), W in the same memory treatment as the
                 sparse side (huge pages on CPU: `kernels.hugepage_copy`)
    kernel S=0   the sparse kernel reading every row (its own streaming speed)
    sparse       `kernels.SparseWeight`: exact top-K of |x|, then only the active rows of W^T
The fair baseline is the faster of the two dense ones (`baseline`, `baseline_ms`); `speedup` and
`fraction_of_ideal` = speedup / (1/(1-S)) are against it, and both baselines' speedups are in the CSV.
A memory-bound GEMV cannot beat 1/(1-S): a fraction above 1.0 means the baseline is off, so the bench says
BENCHMARK BUG instead of printing it (the CSV keeps the ratio in `speedup`, leaves `fraction_of_ideal` empty
and sets `above_ideal`). Goal (issue 17), CPU fp32: >= 0.85 of ideal at S = 0.5 and 0.6.

Printed and in the JSON sidecar: the naive torch gather (`backend="torch"`) at the middle S, and with
`--union-batches` the batch > 1 choice: dense matmul vs the union-of-actives kernel.
"""

from __future__ import annotations

import argparse
import csv
import io
import os

import torch
import torch.nn.functional as F

from sparsescale.bench.timing import interleaved_median_ms
from sparsescale.config import check_sparsity, kept
from sparsescale.errors import UserError
from sparsescale.io import atomic_write_text, versions, write_json

COLUMNS = ("d_in", "d_out", "dtype", "sparsity", "dense_ms", "kernel_s0_ms", "baseline", "baseline_ms", "sparse_ms",
           "speedup", "speedup_vs_dense", "speedup_vs_kernel_s0", "ideal", "fraction_of_ideal", "above_ideal")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_INPUTS = 8  # rotating pool of inputs


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # deferred: only where /proc/cpuinfo is missing

    return platform.processor() or "unknown"


def machine() -> dict:
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": os.getloadavg()}


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise UserError(f"--shapes must be a comma list of D_INxD_OUT: got {text!r}, e.g. 4096x11008,11008x4096")
    return out


def _rotating(fn, inputs):
    """A no-argument callable that runs fn on the next input of the pool each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        return fn(inputs[state["i"]])
    return call


def _union_rows(sw, w, d_in, dtype_name, s, batches, repeats, g):
    """Batch > 1 at sparsity s: dense F.linear vs the union-of-actives kernel (selection included)."""
    from sparsescale import kernels as K  # deferred on purpose: numba reads its thread settings at import, after --threads
    from sparsescale.qsparse import topk_sparsify

    rows = []
    for b in batches:
        xs = [torch.randn(b, d_in, generator=g).to(w.dtype) for _ in range(N_INPUTS)]
        k = kept(d_in, s)
        ms = interleaved_median_ms({
            "dense": _rotating(lambda x: F.linear(x, w), xs),
            "union": _rotating(lambda x: K.union_gemm(sw, topk_sparsify(x.float(), k)), xs),
        }, repeats=repeats, warmup=1)
        union = 1.0 - s ** b  # expected union fraction for independent random top-K sets
        rows.append({"d_in": d_in, "d_out": w.shape[0], "dtype": dtype_name, "sparsity": s, "batch": b,
                     "dense_ms": ms["dense"], "union_ms": ms["union"], "speedup": ms["dense"] / ms["union"],
                     "union_fraction_expected": union})
    return rows


def bench_gemv(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale bench gemv", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x11008,11008x4096", help="comma list of D_INxD_OUT")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.8])
    p.add_argument("--repeats", type=int, default=15, help="interleaved repeats per row (median reported)")
    p.add_argument("--backend", default="auto", help="kernels backend: auto, numba, torch, triton")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (Triton vs cuBLAS)")
    p.add_argument("--threads", type=int, help="torch threads for every variant (default: torch's current)")
    p.add_argument("--kernel-threads", type=int, help="numba threads of the sparse kernel (default: = torch's)")
    p.add_argument("--union-batches", default="", help="comma list of batch sizes > 1 for the union study, e.g. 2,4,8")
    p.add_argument("--union-out", help="write the union study rows here (CSV)")
    p.add_argument("--quick", action="store_true", help="S in {0.5, 0.6}, 5 repeats: a short run")
    p.add_argument("--out", help="write the rows here (CSV); machine and versions go to the same name + .json")
    a = p.parse_args(argv)

    from sparsescale import kernels as K  # deferred on purpose: numba reads its thread settings at import, after --threads

    if a.threads:
        torch.set_num_threads(a.threads)
    sparsities = [0.5, 0.6] if a.quick else [check_sparsity(s, "--sparsity") for s in a.sparsity]
    repeats = 5 if a.quick else a.repeats
    dtypes = [d.strip() for d in a.dtypes.split(",")]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise UserError(f"--dtypes must name fp32 and/or bf16: got {bad}")
    batches = [int(b) for b in a.union_batches.split(",") if b.strip()]
    g = torch.Generator().manual_seed(0)
    info = machine()
    print(f"cpu: {info['cpu_model']} ({info['cpu_count']} cores), torch threads {info['torch_threads']}, "
          f"kernel threads {a.kernel_threads or info['torch_threads']}, load average {info['loadavg'][0]:.1f} "
          "(a shared machine: other jobs run alongside)")
    print("speedup and frac against the faster dense baseline ('base': torch = F.linear, S=0 = the sparse kernel "
          "reading every row); frac = speedup / ideal")
    print(f"{'d_in':>6} {'d_out':>6} {'dtype':>5} {'S':>5} {'dense ms':>9} {'S=0 ms':>9} {'base':>5} {'sparse ms':>9} "
          f"{'speedup':>7} {'ideal':>6} {'frac':>5}")
    rows, extra, union_rows, bugs = [], [], [], []
    for d_in, d_out in _shapes(a.shapes):
        for dname in dtypes:
            w = torch.randn(d_out, d_in, generator=g).to(DTYPES[dname]).to(a.device)  # (D_out, D_in) nn.Linear
            sw = K.SparseWeight(w, a.backend, threads=a.kernel_threads)
            if w.device.type == "cpu":  # the same memory treatment as the sparse side's W^T
                w = K.hugepage_copy(w)
            xs = [torch.randn(1, d_in, generator=g).to(w.dtype).to(a.device) for _ in range(N_INPUTS)]
            dense = _rotating(lambda x: F.linear(x, w), xs)
            for s in sparsities:
                k = kept(d_in, s)
                # the sparse path returns what F.linear does: the input's dtype
                fns = {"dense": dense, "sparse": _rotating(lambda x, k=k: sw(x, k=k)[0].to(x.dtype), xs),
                       "kernel S=0": _rotating(lambda x: sw(x, k=d_in)[0].to(x.dtype), xs)}
                if s == sparsities[len(sparsities) // 2] and sw.backend != "torch":  # the naive reference
                    gather = K.SparseWeight(w, "torch")
                    fns["torch gather"] = _rotating(lambda x, k=k: gather(x, k=k)[0].to(x.dtype), xs)
                ms = interleaved_median_ms(fns, repeats=repeats, warmup=2, device=a.device)
                row = gemv_row(d_in, d_out, dname, s, ms["dense"], ms["kernel S=0"], ms["sparse"])
                rows.append(row)
                frac = (f"{row['fraction_of_ideal']:>5.2f}" if not row["above_ideal"] else "  BUG")
                print(f"{d_in:>6} {d_out:>6} {dname:>5} {s:>5.2f} {row['dense_ms']:>9.3f} {row['kernel_s0_ms']:>9.3f} "
                      f"{'torch' if row['baseline'] == 'dense' else 'S=0':>5} {row['sparse_ms']:>9.3f} "
                      f"{row['speedup']:>7.2f} {row['ideal']:>6.2f} {frac}")
                if row["above_ideal"]:
                    bugs.append(row)
                    print(f"BENCHMARK BUG: {d_in}x{d_out} {dname} S={s}: faster than the ideal 1/(1-S) against the "
                          "faster dense baseline; the baseline (or the timing) is off, no fraction is reported")
                if "torch gather" in ms:
                    extra.append({"d_in": d_in, "d_out": d_out, "dtype": dname, "sparsity": s,
                                  "variant": "torch gather", "ms": ms["torch gather"],
                                  "speedup_vs_dense": ms["dense"] / ms["torch gather"]})
                    print(f"{'':>27} naive torch gather: {ms['torch gather']:.2f} ms "
                          f"({ms['dense'] / ms['torch gather']:.2f}x dense)")
            if batches and sw.backend == "numba":
                s = 0.5 if 0.5 in sparsities else sparsities[0]
                for r in _union_rows(sw, w, d_in, dname, s, batches, max(3, repeats // 2), g):
                    union_rows.append(r)
                    print(f"{'':>27} batch {r['batch']}: union-of-actives {r['union_ms']:.2f} ms vs dense "
                          f"{r['dense_ms']:.2f} ms ({r['speedup']:.2f}x; expected union "
                          f"{r['union_fraction_expected']:.2f})")
            del w, sw, xs, fns
    if a.out:
        write_csv(a.out, rows, COLUMNS)
        write_json(f"{os.path.splitext(a.out)[0]}.json", {
            "benchmark": "gemv", "backend": a.backend, "device": a.device, "repeats": repeats,
            "kernel_threads": a.kernel_threads or info["torch_threads"], "machine": info,
            "loadavg_end": os.getloadavg(), "rows": rows, "naive_gather": extra, "union": union_rows,
            "versions": versions()})
        print(f"wrote {a.out}")
    if a.union_out and union_rows:
        write_csv(a.union_out, union_rows, tuple(union_rows[0]))
    if bugs:
        print(f"BENCHMARK BUG in {len(bugs)} row(s): see above; their fraction_of_ideal is left empty")
    return 0


def gemv_row(d_in: int, d_out: int, dtype: str, s: float, dense_ms: float, kernel_s0_ms: float,
             sparse_ms: float) -> dict:
    """One CSV row: speedups against both dense baselines; speedup and fraction against the faster one.
    A fraction above 1.0 is flagged (`above_ideal`), not reported (`fraction_of_ideal` NaN)."""
    base = "dense" if dense_ms <= kernel_s0_ms else "kernel_s0"
    base_ms = min(dense_ms, kernel_s0_ms)
    ideal = 1.0 / (1.0 - s)
    sp = base_ms / sparse_ms
    above = sp / ideal > 1.0
    return {"d_in": d_in, "d_out": d_out, "dtype": dtype, "sparsity": s, "dense_ms": dense_ms,
            "kernel_s0_ms": kernel_s0_ms, "baseline": base, "baseline_ms": base_ms, "sparse_ms": sparse_ms,
            "speedup": sp, "speedup_vs_dense": dense_ms / sparse_ms, "speedup_vs_kernel_s0": kernel_s0_ms / sparse_ms,
            "ideal": ideal, "fraction_of_ideal": float("nan") if above else sp / ideal, "above_ideal": bool(above)}


def write_csv(path, rows, columns):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c]) for c in columns})
    atomic_write_text(path, buf.getvalue())
