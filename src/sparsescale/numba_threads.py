"""numba's thread settings for the CPU kernels (top-K masking in `qsparse`, sparse GEMV in `kernels`).

numba's OpenMP threading layer loads the system libgomp beside torch's own and resets torch's thread count
(torch.get_num_threads() jumps to the core count after the first parallel numba call, whatever
torch.set_num_threads said); its spinning pool also fights torch's for the cores. numba's own "workqueue"
layer has neither problem, so it is chosen (before any pool starts) unless the user named a layer.
"""
from __future__ import annotations

import os

import numba
import torch
from numba.np.ufunc import parallel as _parallel


def prefer_workqueue() -> None:
    """Choose numba's workqueue layer unless the user named one or numba already started a pool."""
    if "NUMBA_THREADING_LAYER" not in os.environ and not _parallel._is_initialized:
        numba.config.THREADING_LAYER = "workqueue"


def numba_threads(threads: int | None = None) -> int:
    """Threads for a numba call: `threads`, or as many as torch uses (the user's one knob), capped by
    NUMBA_NUM_THREADS. More than one: the workqueue layer, and numba's pool sized to match."""
    want = max(1, min(threads or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if want > 1:
        prefer_workqueue()
        if numba.get_num_threads() != want:
            numba.set_num_threads(want)
    return want
