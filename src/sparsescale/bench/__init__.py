"""Benchmarks: scripts that print ratios measured side by side in one run (never timed unit tests).

    sparsescale bench train-step   Q-Sparse / dense training-step time at equal shape (issue: model core)
    sparsescale bench fit          fit + 1000 bootstrap resamples of a 60-run table
    sparsescale bench gemv         sparse GEMV vs dense matmul, fraction of the ideal 1/(1-S)
    sparsescale bench decode       batch-1 decode tokens/s, Q-Sparse vs dense
    sparsescale bench gpu-check    training MFU, Triton GEMV, decode on a GPU (make gpu-check; --dry-run on CPU)
    sparsescale bench tokenize     sharded data preparation: tokens/s per core, peak RSS at two corpus sizes
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, function)
BENCHES = {
    "train-step": ("sparsescale.bench.train_step", "bench_train_step"),
    "fit": ("sparsescale.bench.fit", "bench_fit"),
    "gemv": ("sparsescale.bench.gemv", "bench_gemv"),
    "decode": ("sparsescale.bench.decode", "bench_decode"),
    "gpu-check": ("sparsescale.bench.gpu_check", "bench_gpu_check"),
    "tokenize": ("sparsescale.bench.tokenize", "bench_tokenize"),
}


def cli_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown benchmark {argv[0]!r}: choose one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        return 0
    module, function = BENCHES[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
