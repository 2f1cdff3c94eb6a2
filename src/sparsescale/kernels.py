"""Sparse inference: a sparse GEMV that reads only the weight rows of active inputs, and a batch-1 decode path.

Features
- `SparseWeight(weight)`: W^T stored input-major, (D_in, D_out) contiguous, so the weights one input feeds are
  one contiguous row. `sw(x, k=...)` selects the active inputs of a single token and computes
  y = sum_{i active} x[i] * W^T[i, :] straight from those rows: no gather copy, fp32 accumulation.
  Selection, one of: exact top-K of |x| (ties broken by position, the same rule as `qsparse.topk_sparsify`),
  `threshold=` (|x| > t: a calibrated approximation of top-K, K varies per token), or `presparsified=True`
  (x is already X*M; the non-zeros are the active inputs).
- Backends behind one switch (`backend="auto"|"numba"|"torch"|"triton"`):
  numba (CPU, fp32 and bf16 weights): selection (radix select of the K-th |x|) and GEMV fused in one call;
    W^T in transparent huge pages (few TLB misses when jumping between rows); output columns split in
    blocks, one per thread (each thread owns a slice of y and streams that slice of every active row), active
    rows unrolled by 8; bf16 is read as uint16 and widened to fp32 in registers (`_to_f32`). threads=1 runs
    on the calling thread (no pool to wake); more use numba's workqueue layer (see `prefer_workqueue`).
  triton (CUDA): programs over (column block, slice of the active list), fp32 atomics into y; the active
    count stays on the device (no host sync). Chosen by `auto` on CUDA when triton imports.
  torch (anything): a portable reference: index_select of the active rows, then a matmul (a gather copy;
    slower than dense on CPU, kept for devices and dtypes the fast kernels do not cover).
- `enable_sparse_decode(model, mode="topk"|"threshold", backend=...)`: for a `qsparse.convert`ed model, every
  single-token call (batch 1, one position: KV-cache decoding, e.g. through HF `generate`) of a QSparseLinear
  runs the sparse GEMV; anything larger (prefill, batch > 1) and anything needing gradients falls back to the
  normal Q-Sparse forward (top-K + dense matmul). Projections reading one input (q/k/v; gate/up) are fused
  into one W^T and one call. Memory cost: one extra copy of every decoder-layer weight (W^T), reported in
  bytes. `disable_sparse_decode(model)` frees it. Block (N:M), 8-bit activations, re-scaling and ternary
  weights go through the exact Q-Sparse transform (`presparsified`), so logits match the normal forward.
- `calibrate_thresholds(model, input_ids)`: per input, the median over tokens of the K-th largest |x|, for
  mode="threshold" (labelled an approximation everywhere: outputs differ from exact top-K).
- `union_gemm(...)`: batch > 1 over the union of the tokens' active inputs (measured by `bench gemv`:
  the union grows fast with the batch, so the decode path falls back to dense there).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os

import numpy as np
import torch
from torch import nn

from sparsescale.errors import UserError
from sparsescale.layout import PROJECTION_GROUPS
from sparsescale.numba_threads import numba_threads, prefer_workqueue
from sparsescale.qsparse import QSparseLinear, qsparse_linears, quant_weight_ternary

BACKENDS = ("auto", "numba", "torch", "triton")
MODES = ("topk", "threshold")
_NUMBA_DTYPES = (torch.float32, torch.bfloat16)
# selection codes shared by all backends
_TOPK, _THRESHOLD, _NONZERO = 0, 1, 2

try:  # numba is a dependency; guard anyway so that the torch backend works without it
    import numba
    from llvmlite import ir as _ir
    from numba import njit, prange, types as _nbtypes
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


if HAVE_NUMBA:
    prefer_workqueue()  # before numba starts a pool

try:  # only on CUDA machines (pyproject extra "gpu")
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


# ----------------------------------------------------------------------------------------------------------
# numba CPU kernels

if HAVE_NUMBA:

    @intrinsic
    def _to_f32(typingctx, v):
        """fp32 value of a weight: floats are cast; uint16 holds bf16 bits, which are the top half of an fp32."""
        if isinstance(v, _nbtypes.Float):
            def codegen(context, builder, sig, args):
                return context.cast(builder, args[0], v, _nbtypes.float32)
            return _nbtypes.float32(v), codegen
        if isinstance(v, _nbtypes.Integer) and v.bitwidth == 16:
            def codegen(context, builder, sig, args):
                u = builder.shl(builder.zext(args[0], _ir.IntType(32)), _ir.Constant(_ir.IntType(32), 16))
                return builder.bitcast(u, _ir.FloatType())
            return _nbtypes.float32(v), codegen
        return None

    @njit(cache=True, boundscheck=False)
    def _kth_largest_bits(bits, k):
        """Bit pattern of the k-th largest of non-negative fp32 values given as their uint32 bits (for x >= 0
        the bit patterns order like the values). Radix select: a histogram of the top 11 bits finds the bin
        holding it, a partition of that bin's few members finds it exactly: ~3 passes, no sort, no full copy."""
        hist = np.zeros(2048, np.int32)
        for b in bits:
            hist[b >> 20] += 1
        above = 0
        top = 2047
        while above + hist[top] < k:
            above += hist[top]
            top -= 1
        cand = np.empty(hist[top], np.uint32)
        m = 0
        for b in bits:
            if b >> 20 == top:
                cand[m] = b
                m += 1
        rank = k - above  # 1-based, from the largest, inside the bin
        return np.partition(cand, m - rank)[m - rank]

    @njit(cache=True, boundscheck=False)
    def _select(x, how, k, thr, idx):
        """Fill idx[:n] with the active positions of x in increasing order; return n.
        how 0: exact top-K of |x|: all entries above the K-th largest magnitude, then the first ties up to K
        (the rule of qsparse's kernel); 1: |x| > thr; 2: x != 0."""
        d = x.shape[0]
        n = 0
        if how == 0 and k >= d:
            for j in range(d):
                idx[j] = j
            return d
        if how == 0:
            if k <= 0:
                return 0
            bits = np.abs(x).view(np.uint32)
            t = _kth_largest_bits(bits, k)
            n_gt = 0
            for b in bits:
                if b > t:
                    n_gt += 1
            ties = k - n_gt
            for j in range(d):
                b = bits[j]
                if b > t:
                    idx[n] = j
                    n += 1
                elif b == t and ties > 0:
                    idx[n] = j
                    n += 1
                    ties -= 1
        elif how == 1:
            for j in range(d):
                if abs(x[j]) > thr:
                    idx[n] = j
                    n += 1
        else:
            for j in range(d):
                if x[j] != 0:
                    idx[n] = j
                    n += 1
        return n

    @njit(cache=True, fastmath=True, boundscheck=False)
    def _accumulate(w, d_out, x, idx, r0, r1, c0, c1, acc):
        """acc[:] += sum over active rows r0..r1 of x[i] * W^T[i, c0:c1]; 8 rows per pass over acc (8 streams)."""
        n = c1 - c0
        r = r0
        while r + 8 <= r1:
            i0 = idx[r]; i1 = idx[r + 1]; i2 = idx[r + 2]; i3 = idx[r + 3]  # noqa: E702
            i4 = idx[r + 4]; i5 = idx[r + 5]; i6 = idx[r + 6]; i7 = idx[r + 7]  # noqa: E702
            x0 = x[i0]; x1 = x[i1]; x2 = x[i2]; x3 = x[i3]  # noqa: E702
            x4 = x[i4]; x5 = x[i5]; x6 = x[i6]; x7 = x[i7]  # noqa: E702
            # one-dimensional slices: numba then vectorises the loop below (2-D indexing defeats it)
            w0 = w[i0 * d_out + c0:i0 * d_out + c1]; w1 = w[i1 * d_out + c0:i1 * d_out + c1]  # noqa: E702
            w2 = w[i2 * d_out + c0:i2 * d_out + c1]; w3 = w[i3 * d_out + c0:i3 * d_out + c1]  # noqa: E702
            w4 = w[i4 * d_out + c0:i4 * d_out + c1]; w5 = w[i5 * d_out + c0:i5 * d_out + c1]  # noqa: E702
            w6 = w[i6 * d_out + c0:i6 * d_out + c1]; w7 = w[i7 * d_out + c0:i7 * d_out + c1]  # noqa: E702
            for j in range(n):
                acc[j] += ((x0 * _to_f32(w0[j]) + x1 * _to_f32(w1[j])) + (x2 * _to_f32(w2[j]) + x3 * _to_f32(w3[j]))
                           + (x4 * _to_f32(w4[j]) + x5 * _to_f32(w5[j])) + (x6 * _to_f32(w6[j]) + x7 * _to_f32(w7[j])))
            r += 8
        while r < r1:
            i0 = idx[r]
            x0 = x[i0]
            w0 = w[i0 * d_out + c0:i0 * d_out + c1]
            for j in range(n):
                acc[j] += x0 * _to_f32(w0[j])
            r += 1

    @njit(cache=True, boundscheck=False)
    def _gemv_task(w, d_out, x, idx, n, t, n_col, n_split, part):
        """Task t of n_col column blocks x n_split slices of the active list: its partial sums into part."""
        colw = (d_out + n_col - 1) // n_col
        colw = (colw + 15) // 16 * 16  # 64-byte aligned column blocks
        cb = t % n_col
        kb = t // n_col
        c0 = min(d_out, cb * colw)
        c1 = min(d_out, c0 + colw)
        acc = np.zeros(c1 - c0, np.float32)  # this task's slice of y stays in L1/L2 while the rows stream
        _accumulate(w, d_out, x, idx, kb * n // n_split, (kb + 1) * n // n_split, c0, c1, acc)
        part[kb, c0:c1] = acc

    @njit(cache=True, boundscheck=False)
    def _reduce(part, y):
        for j in range(y.shape[0]):
            s = np.float32(0.0)
            for kb in range(part.shape[0]):
                s += part[kb, j]
            y[j] = s

    @njit(parallel=True, cache=True, boundscheck=False)
    def _sparse_gemv_parallel(w, d_out, x, how, k, thr, idx, y, n_col, n_split):
        """y (d_out,) = W^T[active]^T x[active]; w: flat (D_in * d_out,) fp32 or uint16 (bf16 bits); returns n."""
        n = _select(x, how, k, thr, idx)
        part = np.empty((n_split, d_out), np.float32)
        for t in prange(n_col * n_split):
            _gemv_task(w, d_out, x, idx, n, t, n_col, n_split, part)
        _reduce(part, y)
        return n

    @njit(cache=True, boundscheck=False)
    def _sparse_gemv_serial(w, d_out, x, how, k, thr, idx, y, n_col, n_split):
        """The same on the calling thread only: no thread pool to wake (see `threads` in SparseWeight)."""
        n = _select(x, how, k, thr, idx)
        part = np.empty((n_split, d_out), np.float32)
        for t in range(n_col * n_split):
            _gemv_task(w, d_out, x, idx, n, t, n_col, n_split, part)
        _reduce(part, y)
        return n

    @njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
    def _union_gemm_numba(w, d_out, xs, idx, y, n_col):
        """Y (B, d_out) = Xs W for sparsified rows Xs (B, D_in), reading each row of the union of actives once."""
        b_sz, d_in = xs.shape
        n = 0
        for i in range(d_in):
            for b in range(b_sz):
                if xs[b, i] != 0:
                    idx[n] = i
                    n += 1
                    break
        colw = (d_out + n_col - 1) // n_col
        colw = (colw + 15) // 16 * 16
        for cb in prange(n_col):
            c0 = min(d_out, cb * colw)
            c1 = min(d_out, c0 + colw)
            acc = np.zeros((b_sz, c1 - c0), np.float32)
            wf = np.empty(c1 - c0, np.float32)
            for r in range(n):
                i = idx[r]
                wi = w[i * d_out + c0:i * d_out + c1]
                for j in range(c1 - c0):  # widen once per row, use it for every token
                    wf[j] = _to_f32(wi[j])
                for b in range(b_sz):
                    xb = xs[b, i]
                    if xb != 0:
                        for j in range(c1 - c0):
                            acc[b, j] += xb * wf[j]
            y[:, c0:c1] = acc
        return n


def _tiles(d_out: int, threads: int) -> tuple[int, int]:
    """(column blocks, active-list slices): columns while every thread still gets >= 512 of them (contiguous
    runs of >= 2 KiB per row); narrow outputs split the active rows instead (partial sums, added at the end)."""
    if threads <= 1:
        return 1, 1
    n_col = max(1, min(threads, d_out // 512))
    return n_col, max(1, threads // n_col)


# ----------------------------------------------------------------------------------------------------------
# Triton GPU kernel (tested only where CUDA is present)

if HAVE_TRITON:

    @triton.jit
    def _sparse_gemv_triton(wt_ptr, x_ptr, idx_ptr, n_ptr, y_ptr, d_out, stride_w, rows_per_split,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program (pid_n, pid_k): output columns [pid_n*BLOCK_N, +BLOCK_N), active-list entries
        # [pid_k*rows_per_split, +rows_per_split) capped at n (read on the device: no host sync)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < d_out
        n = tl.load(n_ptr)
        r_start = pid_k * rows_per_split
        r_end = tl.minimum(r_start + rows_per_split, n)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(r_start, r_end, BLOCK_K):
            rs = r0 + tl.arange(0, BLOCK_K)
            r_ok = rs < r_end
            rows = tl.load(idx_ptr + rs, mask=r_ok, other=0).to(tl.int64)
            xv = tl.load(x_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
            # (BLOCK_K, BLOCK_N) tile: each of its rows is BLOCK_N contiguous weights of one active input
            w = tl.load(wt_ptr + rows[:, None] * stride_w + cols[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
        tl.atomic_add(y_ptr + cols, acc, mask=col_ok)


def _triton_gemv(wt: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """y (D_out,) fp32 on the GPU; idx (D_in,) int32 with the n (a 1-element device tensor) active first."""
    d_in, d_out = wt.shape
    block_n, block_k = 128, 32
    n_colblocks = triton.cdiv(d_out, block_n)
    sms = torch.cuda.get_device_properties(wt.device).multi_processor_count
    # enough programs to fill every SM a few times; each keeps >= 4 row tiles of work
    split = max(1, min(triton.cdiv(d_in, 4 * block_k), triton.cdiv(4 * sms, n_colblocks)))
    rows_per_split = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k
    y = torch.zeros(d_out, device=wt.device, dtype=torch.float32)
    grid = (n_colblocks, triton.cdiv(d_in, rows_per_split))
    _sparse_gemv_triton[grid](wt, x, idx, n, y, d_out, wt.stride(0), rows_per_split,
                              BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y


# ----------------------------------------------------------------------------------------------------------
# selection and the portable torch path

def select_mask(x: torch.Tensor, k: int | None = None, threshold: float | None = None,
                presparsified: bool = False) -> torch.Tensor:
    """Boolean mask of the active inputs of x (last dim), by the same rules as the kernels (torch ops only)."""
    if presparsified:
        return x != 0
    a = x.detach().abs()
    if threshold is not None:
        return a > threshold
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    t = torch.topk(a.float(), k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True).to(a.dtype)
    gt = a > t
    ties = a == t
    # keep the first (k - #above) ties by position, like qsparse's kernel
    room = k - gt.sum(-1, keepdim=True)
    return gt | (ties & (torch.cumsum(ties.to(torch.int32), -1) <= room))


def _check_one_mode(k, threshold, presparsified):
    if sum(v is not None and v is not False for v in (k, threshold, presparsified)) != 1:
        raise UserError(f"give exactly one of k (exact top-K), threshold or presparsified=True: "
                        f"got k={k!r}, threshold={threshold!r}, presparsified={presparsified!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `auto` means here, or an error naming why the asked one cannot run."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}: got {backend!r}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda:
            return "triton" if HAVE_TRITON else "torch"
        return "numba" if HAVE_NUMBA and device.type == "cpu" and dtype in _NUMBA_DTYPES else "torch"
    if backend == "numba" and not (HAVE_NUMBA and device.type == "cpu" and dtype in _NUMBA_DTYPES):
        raise UserError(f"backend='numba' needs numba, a CPU tensor and fp32/bf16 weights: got {device.type}/{dtype}; "
                        "use backend='torch' (or 'auto')")
    if backend == "triton" and not (HAVE_TRITON and cuda):
        raise UserError(f"backend='triton' needs triton and a CUDA tensor: got device {device}, triton "
                        f"{'installed' if HAVE_TRITON else 'not installed'}; "
                        "pip install 'sparsescale[gpu]' or use backend='auto'")
    return backend


def _hugepage_empty(shape, dtype) -> torch.Tensor:
    """An empty CPU tensor in memory advised for transparent huge pages (Linux), else a plain one.

    The sparse GEMV jumps from row to row of W^T; with 4 KiB pages nearly every active row costs a TLB miss
    (a 300M-model row is 2-20 KiB), with 2 MiB pages almost none: 10-25% faster measured here."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies (shared: shmem)
    mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps mm alive


class SparseWeight:
    """W^T (D_in, D_out), contiguous, plus the views each backend reads; call it on one token's input."""

    def __init__(self, weight: torch.Tensor, backend: str = "auto", threads: int | None = None,
                 tiles: tuple[int, int] | None = None):
        # weight: (D_out, D_in) as in nn.Linear
        self.backend = resolve_backend(backend, weight.device, weight.dtype)
        wt = weight.detach().t()  # (D_in, D_out): the rows of one input, once contiguous
        self.wt = _hugepage_empty(wt.shape, wt.dtype).copy_(wt) if self.backend == "numba" else wt.contiguous()
        self.d_in, self.d_out = self.wt.shape
        # numba threads: None follows torch.get_num_threads(); 1 runs on the calling thread (no pool to wake)
        self.threads = threads
        self.tiles = tiles  # (column blocks, active slices) for numba; None: from the thread count
        if self.backend == "numba":
            flat = self.wt.view(-1)
            self._flat = (flat.view(torch.int16).numpy().view(np.uint16) if self.wt.dtype == torch.bfloat16
                          else flat.numpy())
            self._idx = np.empty(self.d_in, np.int64)

    @property
    def nbytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()

    def __call__(self, x: torch.Tensor, k: int | None = None, threshold: float | None = None,
                 presparsified: bool = False) -> tuple[torch.Tensor, int | torch.Tensor]:
        """(y, n_active): y (D_out,) fp32 = W (x*M) for one token x (D_in,) (any leading dims of size 1)."""
        _check_one_mode(k, threshold, presparsified)
        x = x.detach().reshape(-1)
        if x.shape[0] != self.d_in:
            raise UserError(f"sparse GEMV expects one token of {self.d_in} inputs: got shape {tuple(x.shape)}")
        how = _TOPK if k is not None else _THRESHOLD if threshold is not None else _NONZERO
        return self.run(x, how, int(k or 0), float(threshold or 0.0))

    def run(self, x: torch.Tensor, how: int, k: int = 0, thr: float = 0.0):
        """`__call__` without the checks (the decode path's per-token call).
        x (D_in,); how: _TOPK (k), _THRESHOLD (thr) or _NONZERO."""
        if self.backend == "numba":
            threads = numba_threads(self.threads)
            n_col, n_split = self.tiles or _tiles(self.d_out, threads)
            kernel = _sparse_gemv_parallel if threads > 1 else _sparse_gemv_serial
            y = np.empty(self.d_out, np.float32)
            n = kernel(self._flat, self.d_out, x.float().contiguous().numpy(), how, k, thr, self._idx, y,
                       n_col, n_split)
            return torch.from_numpy(y), n
        mask = select_mask(x, k if how == _TOPK else None, thr if how == _THRESHOLD else None, how == _NONZERO)
        if self.backend == "triton":
            # active positions first, in increasing order (stable sort of ~mask); the count stays on the GPU
            idx = torch.argsort((~mask).to(torch.int8), stable=True).to(torch.int32)
            n = mask.sum(dtype=torch.int32).reshape(1)
            return _triton_gemv(self.wt, x.float().contiguous(), idx, n), n
        idx = mask.nonzero().squeeze(-1)
        y = x.float().index_select(0, idx) @ self.wt.index_select(0, idx).float()  # gathers: reference only
        return y, int(idx.numel())


def union_gemm(sw: SparseWeight, xs: torch.Tensor, n_col: int | None = None) -> tuple[torch.Tensor, int]:
    """(Y, n_union): Y (B, D_out) = xs W^T for already sparsified rows xs (B, D_in), numba backend, reading only
    the rows in the union of the B tokens' active inputs (the batch > 1 alternative to a dense matmul)."""
    if sw.backend != "numba":
        raise UserError(f"union_gemm needs a SparseWeight with the numba backend: got {sw.backend!r}")
    x2 = xs.detach().reshape(-1, sw.d_in).float().contiguous().numpy()
    y = np.empty((x2.shape[0], sw.d_out), np.float32)
    n = _union_gemm_numba(sw._flat, sw.d_out, x2, sw._idx, y, n_col or _tiles(sw.d_out, numba_threads(sw.threads))[0])
    return torch.from_numpy(y), int(n)


# ----------------------------------------------------------------------------------------------------------
# the decode path for converted models

def _effective_weight(m) -> torch.Tensor:
    """The weight the normal Q-Sparse forward multiplies by (ternary when weight_bits="1.58")."""

    w = m.weight.detach()
    return quant_weight_ternary(w) if m.settings.weight_bits == "1.58" else w


class _Group:
    """Projections that read one input (q/k/v, or gate/up, or a single projection): one fused W^T, one call."""

    def __init__(self, members, mode, threshold, backend, threads, decode):
        self.members = members
        lead = members[0]
        self.settings, self.k, self.mode, self.threshold, self.decode = lead.settings, lead.k, mode, threshold, decode
        s = lead.settings
        # the exact Q-Sparse transform is needed unless the input is plain top-K of the raw activations
        self.plain = s.block is None and s.act_bits is None and not s.rescale
        w = torch.cat([_effective_weight(m) for m in members], dim=0)  # (sum D_out, D_in)
        self.sw = SparseWeight(w, backend, threads)
        bounds = np.cumsum([0] + [m.out_features for m in members])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features, dtype=w.dtype, device=w.device)
             for b, m in zip(biases, members)])
        self.key = None  # the last input (held, so its identity cannot be reused) and its fused output
        self.out = None
        self.calls = 0
        self.active = 0

    def applies(self, x: torch.Tensor) -> bool:
        return (self.decode.active and x.shape[:-1].numel() == 1 and x.device == self.sw.wt.device
                and not (torch.is_grad_enabled() and x.requires_grad))

    def output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        if self.key is not x:
            x1 = x.detach().reshape(-1)  # (D_in,)
            if self.mode == "threshold":
                y, n = self.sw.run(x1, _THRESHOLD, thr=self.threshold)
            elif self.plain:
                y, n = self.sw.run(x1, _TOPK, k=self.k if self.settings.sparsity > 0 else self.sw.d_in)
            else:  # block / int8 / rescale: the exact Q-Sparse transform, then its non-zeros
                y, n = self.sw.run(self.members[0].sparsify_input(x1), _NONZERO)
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
            self.key, self.out = x, (y + self.bias.to(y.dtype) if self.bias is not None else y)
            self.calls += 1
            self.active += n
        return self.out[..., self.slices[slot]]


def _decode_forward(self, x: torch.Tensor) -> torch.Tensor:
    """QSparseLinear.forward with the sparse GEMV for one token; everything else the normal forward."""
    group, slot = self._sparse_group
    if self.record is not None or not group.applies(x):
        return type(self).forward(self, x)
    return group.output(x, slot)


class SparseDecode:
    """What `enable_sparse_decode` set up: the groups, their W^T memory, a pause switch, and counters."""

    def __init__(self, model, mode, backend):
        self.model, self.mode, self.active = model, mode, True
        self.groups: list[_Group] = []
        self.backend = backend

    @property
    def label(self) -> str:
        return ("exact top-K" if self.mode == "topk"
                else "calibrated magnitude threshold (approximation of top-K: K varies per token)")

    @property
    def extra_bytes(self) -> int:
        """Memory of the W^T copies (the original weights stay for prefill and batch > 1)."""
        return sum(g.sw.nbytes for g in self.groups)

    @contextlib.contextmanager
    def paused(self):
        """Run the normal Q-Sparse forward (top-K + dense matmul) inside the block, keeping the W^T copies."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def stats(self) -> dict:
        """Sparse-GEMV calls so far and the measured fraction of inputs skipped (weighted by weight size)."""
        calls = sum(g.calls for g in self.groups)
        read = sum(float(g.active) * g.sw.d_out for g in self.groups)  # float(): a device count (triton)
        total = sum(g.calls * g.sw.d_in * g.sw.d_out for g in self.groups)
        return {"mode": self.mode, "label": self.label, "backend": self.backend, "calls": calls,
                "sparsity_measured": 1.0 - read / total if total else float("nan"), "extra_bytes": self.extra_bytes}


def _groups_of(model) -> list[list[tuple[str, nn.Module]]]:
    """Lists of (name, module): siblings that read one input (q/k/v; gate/up, by layout.PROJECTION_GROUPS) and
    agree on shape, dtype and settings form one group; every other QSparseLinear is a group of its own."""

    out = []
    for pname, parent in model.named_modules():
        fused: dict[str, list] = {}
        for name, child in parent.named_children():
            if not isinstance(child, QSparseLinear):
                continue
            full = f"{pname}.{name}" if pname else name
            g = PROJECTION_GROUPS.get(name)
            if g in ("qkv", "gate_up"):
                fused.setdefault(g, []).append((full, child))
            else:
                out.append([(full, child)])
        for members in fused.values():
            lead = members[0][1]
            same = all(m.in_features == lead.in_features and m.settings == lead.settings
                       and m.weight.dtype == lead.weight.dtype and m.weight.device == lead.weight.device
                       for _, m in members)
            out.extend([members] if same else [[nm] for nm in members])
    return out


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Per QSparseLinear name: the median over the tokens of `input_ids` of the K-th largest |x| of its input.

    With mode="threshold" an input is active when |x| exceeds it: an APPROXIMATION of top-K (no selection cost
    beyond one comparison per input, but K varies per token and outputs differ from exact top-K).
    """

    mods = qsparse_linears(model)
    if not mods:
        raise UserError("calibrate_thresholds needs a converted model: call qsparse.convert(model, sparsity) first")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in mods}
    hooks = []
    for name, m in mods:
        def hook(mod, args, _name=name):
            a = args[0].detach().reshape(-1, mod.in_features).abs().float()
            seen[_name].append(torch.topk(a, min(mod.k, mod.in_features), dim=-1).values[:, -1])
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: float(torch.cat(v).median()) for name, v in seen.items()}


def enable_sparse_decode(model: nn.Module, mode: str = "topk", backend: str = "auto",
                         thresholds: dict[str, float] | None = None, threads: int | None = None) -> SparseDecode:
    """Switch every QSparseLinear of a converted model to the sparse GEMV for single-token calls.

    mode="topk": exact top-K, outputs equal the normal forward within fp32 rounding.
    mode="threshold": |x| > calibrated threshold (`calibrate_thresholds`), an approximation.
    Extra memory: one W^T copy of every converted weight (`.extra_bytes` of the returned handle). The copies
    are a snapshot: after changing the weights, call this again.
    threads (numba): None follows torch.get_num_threads(); 1 keeps the GEMV on the calling thread.
    """

    if mode not in MODES:
        raise UserError(f"mode must be one of {MODES}: got {mode!r}")
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}: got {backend!r}")
    if not qsparse_linears(model):
        raise UserError("enable_sparse_decode needs a converted model: call qsparse.convert(model, sparsity) first")
    if mode == "threshold" and thresholds is None:
        raise UserError("mode='threshold' needs thresholds: pass thresholds=calibrate_thresholds(model, input_ids)")
    disable_sparse_decode(model)
    decode = SparseDecode(model, mode, backend)
    for members in _groups_of(model):
        lead_name, lead = members[0]
        if mode == "threshold":
            if lead_name not in thresholds:
                raise UserError(f"no threshold for {lead_name}: calibrate on this model with calibrate_thresholds")
            if not (lead.settings.block is None and lead.settings.act_bits is None and not lead.settings.rescale):
                raise UserError(f"mode='threshold' supports plain top-K models only: {lead_name} has {lead.settings}; "
                                "use mode='topk'")
        group = _Group([m for _, m in members], mode, thresholds[lead_name] if mode == "threshold" else None,
                       backend, threads, decode)
        decode.groups.append(group)
        for slot, (_, m) in enumerate(members):
            m._sparse_group = (group, slot)
            m.forward = _decode_forward.__get__(m)  # instance attribute: nn.Module.__call__ finds it first
    decode.backend = decode.groups[0].sw.backend
    model._sparse_decode = decode
    return decode


def disable_sparse_decode(model: nn.Module) -> None:
    """Back to the normal Q-Sparse forward everywhere; frees the W^T copies."""

    for _, m in qsparse_linears(model):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_sparse_group", None)
    model.__dict__.pop("_sparse_decode", None)
