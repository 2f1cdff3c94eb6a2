"""Timing helpers shared by the benchmarks: interleaved repeats, medians, CUDA-aware synchronisation."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_median_ms(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
                          device: str = "cpu", rewarm: bool = False) -> dict[str, float]:
    """Median wall time (ms) of each function, measured round-robin so that machine noise hits all alike.
    rewarm: each timed call follows an untimed call of the same function, so that no variant starts in the
    state its predecessor left (BLAS or OpenMP workers still spinning on a core for up to ~0.1 s after their
    last call; measured: a 300M decode step 30% slower right after the BLAS variant than after itself)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            if rewarm:
                f()
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}
