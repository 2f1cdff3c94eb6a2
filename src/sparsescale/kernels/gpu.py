"""GPU kernel (Triton): selection and sparse GEMV of one token fused in one launch.

Features
- `fused_sparse_gemv(wt, x, how, k, thr)` -> (y fp32 (D_out,), n (1,) int32 on the device): one Triton launch
  per projection (plus the zero fill of y and n). Every program first finds the selection on its own:
  how 0, exact top-K: the K-th largest |x| by a 31-step bisection over the fp32 bit patterns of |x| (held in
  registers, no sort, no host sync), then all entries above it and the first ties by position up to K (the
  rule of `qsparse.topk_sparsify` on every path and dtype: bf16/fp16 inputs are compared as their exact fp32
  values); how 1: |x| > thr; how 2: x != 0 (an input the Q-Sparse transform already sparsified); how 3: all.
  It then streams the weight rows of its output-column block for its slice of the inputs with masked loads
  (a dropped input's row is never fetched) and adds its partial sums into y with fp32 atomics. n counts the
  active inputs (on the device: no host sync).
- Runs on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before import),
  which is how the tests check it on machines without a GPU (`INTERPRET`).
"""

from __future__ import annotations

import os

import torch

try:  # optional: installed by the dev extra (CPU wheels run the interpreter) and on CUDA machines
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_D_IN = 1 << 15  # the selection holds |x| of one token in registers: up to 32768 inputs
BLOCK_N, BLOCK_K = 64, 32  # output columns x active-candidate rows per tile


if HAVE_TRITON:

    @triton.jit
    def _fused_sparse_gemv(wt_ptr, x_ptr, y_ptr, n_ptr, d_in, d_out, stride_w, k, thr, rows_per_split,
                           HOW: tl.constexpr, XBLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (pid_n, pid_k): output columns [pid_n*BLOCK_N, +BLOCK_N), inputs [pid_k*rows_per_split, +rows)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        r_start = pid_k * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, d_in)
        t = 0
        ties_left = 0
        if HOW == 0:
            offs = tl.arange(0, XBLOCK)
            ok = offs < d_in
            # for x >= 0 the fp32 bit patterns order like the values: bisect for the K-th largest pattern
            bits = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            lo = tl.full((), 0, tl.int64)  # invariant: #(bits >= lo) >= k > #(bits >= hi)
            hi = tl.full((), 2147483648, tl.int64)
            for _ in range(31):
                mid = (lo + hi) // 2
                big = tl.sum(tl.where(ok & (bits >= mid), 1, 0)) >= k
                lo = tl.where(big, mid, lo)
                hi = tl.where(big, hi, mid)
            t = lo.to(tl.int32)
            n_gt = tl.sum(tl.where(ok & (bits > t), 1, 0))
            # ties at t kept by position: those before this program's slice used up part of the room
            ties_left = k - n_gt - tl.sum(tl.where(ok & (bits == t) & (offs < r_start), 1, 0))
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d_out
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        kept = 0
        for r0 in range(r_start, r_end, BLOCK_K):
            rs = r0 + tl.arange(0, BLOCK_K)
            r_ok = rs < r_end
            xv = tl.load(x_ptr + rs, mask=r_ok, other=0.0).to(tl.float32)
            if HOW == 0:
                b = xv.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                tie = tl.where(r_ok & (b == t), 1, 0)
                rank = tl.cumsum(tie, axis=0) - tie  # ties before this one inside the tile
                keep = r_ok & ((b > t) | ((tie == 1) & (rank < ties_left)))
                ties_left -= tl.sum(tie)
            elif HOW == 1:
                keep = r_ok & (tl.abs(xv) > thr)
            elif HOW == 2:
                keep = r_ok & (xv != 0.0)
            else:
                keep = r_ok
            # (BLOCK_K, BLOCK_N) tile: each row is BLOCK_N contiguous weights of one input; dropped rows masked
            w = tl.load(wt_ptr + rs.to(tl.int64)[:, None] * stride_w + cols[None, :],
                        mask=keep[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * tl.where(keep, xv, 0.0)[:, None], axis=0)
            kept += tl.sum(tl.where(keep, 1, 0))
        tl.atomic_add(y_ptr + cols, acc, mask=col_ok)
        tl.atomic_add(n_ptr, kept, mask=pid_n == 0)


def _programs(device: torch.device) -> int:
    """How many programs fill the device a few times (4 per SM on CUDA; a few in the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def fused_sparse_gemv(wt: torch.Tensor, x: torch.Tensor, how: int, k: int = 0, thr: float = 0.0,
                      block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = 8):
    """(y (D_out,) fp32, n (1,) int32), both on wt's device; wt: (D_in, D_out) with unit column stride."""
    d_in, d_out = wt.shape
    if how == 0 and k >= d_in:
        how = 3
    if how == 0 and d_in > MAX_D_IN:
        raise ValueError(f"fused top-K holds one token in registers: D_in {d_in} > {MAX_D_IN}")
    y = torch.zeros(d_out, device=wt.device, dtype=torch.float32)
    n = torch.zeros(1, device=wt.device, dtype=torch.int32)
    if how == 0 and k <= 0:
        return y, n
    n_colblocks = triton.cdiv(d_out, block_n)
    # enough programs to fill the device; each keeps >= 4 row tiles of work
    split = max(1, min(triton.cdiv(d_in, 4 * block_k), triton.cdiv(_programs(wt.device), n_colblocks)))
    rows_per_split = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k
    grid = (n_colblocks, triton.cdiv(d_in, rows_per_split))
    _fused_sparse_gemv[grid](wt, x, y, n, d_in, d_out, wt.stride(0), int(k), float(thr), rows_per_split,
                             HOW=how, XBLOCK=triton.next_power_of_2(d_in) if how == 0 else 16,
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return y, n
