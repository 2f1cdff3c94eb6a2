"""CPU kernels (numba): the fused selection + sparse GEMV of one token, the batch > 1 union GEMM, huge pages.

Features
- `sparse_gemv_cpu(flat, d_out, x, how, k, thr, idx, threads, tiles)`: selection (how 0: exact top-K of |x| by
  radix select of the K-th magnitude, the first ties by position kept, the rule of `qsparse.topk_sparsify`;
  1: |x| > thr; 2: x != 0) and the GEMV y = sum_{i active} x[i] W^T[i, :] in one call, fp32 accumulation.
  W^T (D_in, D_out) is read row by row: output columns split in blocks, one per thread (each thread owns a
  slice of y and streams that slice of every active row), active rows unrolled by 8; bf16 weights are read
  as uint16 and widened to fp32 in registers (`_to_f32`). threads=1 runs on the calling thread (no pool to
  wake); more use numba's workqueue layer (see `numba_threads.prefer_workqueue`).
- `union_gemm_cpu`: batch > 1 over the union of the tokens' active inputs.
- `select_active`, `col_block`, `accumulate_rows`, `gemv_serial`, `gemv_parallel`: the compiled pieces behind
  `sparse_gemv_cpu` (selection; a thread's block of output columns; one column block of the GEMV; the whole call
  on one thread or numba's pool),
  callable from other compiled code (`step`).
- `hugepage_empty(shape, dtype)`: CPU memory advised for transparent huge pages; `hugepage_linears(model)`
  moves the decoder-layer linear weights there in their own layout (the dense baseline's equal treatment).
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch
from torch import nn

from sparsescale.layout import decoder_layers
from sparsescale.numba_threads import numba_threads, prefer_workqueue

try:  # numba is a dependency; guard anyway so that the torch backend works without it
    import numba  # noqa: F401  (the package itself: its absence is what the guard catches)
    from llvmlite import ir as _ir
    from numba import njit, prange, types as _nbtypes
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

if HAVE_NUMBA:
    prefer_workqueue()  # before numba starts a pool

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
    def select_active(x, how, k, thr, idx):
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
    def accumulate_rows(w, d_out, x, idx, r0, r1, c0, c1, acc):
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

    @njit(cache=True, nogil=True, boundscheck=False)
    def col_block(d_out, cb, n_col):
        """Block cb [c0, c1) of d_out output columns cut in n_col 64-byte aligned blocks (one block: all)."""
        colw = ((d_out + n_col - 1) // n_col + 15) // 16 * 16
        c0 = min(d_out, cb * colw)
        return c0, min(d_out, c0 + colw)

    @njit(cache=True, boundscheck=False)
    def _gemv_task(w, d_out, x, idx, n, t, n_col, n_split, part):
        """Task t of n_col column blocks x n_split slices of the active list: its partial sums into part."""
        kb = t // n_col
        c0, c1 = col_block(d_out, t % n_col, n_col)
        acc = np.zeros(c1 - c0, np.float32)  # this task's slice of y stays in L1/L2 while the rows stream
        accumulate_rows(w, d_out, x, idx, kb * n // n_split, (kb + 1) * n // n_split, c0, c1, acc)
        part[kb, c0:c1] = acc

    @njit(cache=True, boundscheck=False)
    def _reduce(part, y):
        for j in range(y.shape[0]):
            s = np.float32(0.0)
            for kb in range(part.shape[0]):
                s += part[kb, j]
            y[j] = s

    @njit(parallel=True, cache=True, boundscheck=False)
    def gemv_parallel(w, d_out, x, how, k, thr, idx, y, n_col, n_split):
        """y (d_out,) = W^T[active]^T x[active]; w: flat (D_in * d_out,) fp32 or uint16 (bf16 bits); returns n."""
        n = select_active(x, how, k, thr, idx)
        part = np.empty((n_split, d_out), np.float32)
        for t in prange(n_col * n_split):
            _gemv_task(w, d_out, x, idx, n, t, n_col, n_split, part)
        _reduce(part, y)
        return n

    @njit(cache=True, boundscheck=False)
    def gemv_serial(w, d_out, x, how, k, thr, idx, y, n_col, n_split):
        """The same on the calling thread only: no thread pool to wake (see `threads` in SparseWeight)."""
        n = select_active(x, how, k, thr, idx)
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
        for cb in prange(n_col):
            c0, c1 = col_block(d_out, cb, n_col)
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


def column_tiles(d_out: int, threads: int) -> tuple[int, int]:
    """(column blocks, active-list slices): columns while every thread still gets >= 512 of them (contiguous
    runs of >= 2 KiB per row); narrow outputs split the active rows instead (partial sums, added at the end)."""
    if threads <= 1:
        return 1, 1
    n_col = max(1, min(threads, d_out // 512))
    return n_col, max(1, threads // n_col)




def sparse_gemv_cpu(flat: np.ndarray, d_out: int, x: np.ndarray, how: int, k: int, thr: float, idx: np.ndarray,
                    threads: int | None = None, tiles: tuple[int, int] | None = None) -> tuple[np.ndarray, int]:
    """(y (d_out,) fp32, n active) for one token x (D_in,) fp32; flat: W^T as (D_in * d_out,) fp32 or uint16."""
    threads = numba_threads(threads)
    n_col, n_split = tiles or column_tiles(d_out, threads)
    kernel = gemv_parallel if threads > 1 else gemv_serial
    y = np.empty(d_out, np.float32)
    n = kernel(flat, d_out, x, how, k, thr, idx, y, n_col, n_split)
    return y, int(n)


def union_gemm_cpu(flat: np.ndarray, d_out: int, x2: np.ndarray, idx: np.ndarray, n_col: int):
    y = np.empty((x2.shape[0], d_out), np.float32)
    n = _union_gemm_numba(flat, d_out, x2, idx, y, n_col)
    return y, int(n)


def hugepage_empty(shape, dtype) -> torch.Tensor:
    """An empty CPU tensor in memory advised for transparent huge pages (Linux), else a plain one.

    The sparse GEMV jumps from row to row of W^T; with 4 KiB pages nearly every active row costs a TLB miss
    (a 300M-model row is 2-20 KiB), with 2 MiB pages almost none: 10-25% faster measured here. The dense
    baselines of the benchmarks get the same memory (`hugepage_linears`), so that the comparison is fair."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    mm = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: THP applies (shared: shmem)
    mm.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mm, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps mm alive


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor in huge-page memory (same layout, same values)."""
    return hugepage_empty(t.shape, t.dtype).copy_(t)


@torch.no_grad()
def hugepage_linears(model: nn.Module) -> int:
    """Move every 2-D weight inside the decoder layers into huge-page memory (CPU, layout kept); return bytes
    moved. Used for the dense baseline of the benchmarks: the sparse path's weights live in huge pages too."""
    moved = 0
    for layer in decoder_layers(model):
        for mod in layer.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, nn.Parameter) and w.ndim == 2 and w.device.type == "cpu":
                w.data = hugepage_copy(w.data)
                moved += w.numel() * w.element_size()
    return moved
