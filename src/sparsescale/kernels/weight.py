"""`SparseWeight`: one weight in the layout the sparse GEMV reads, and the backend switch.

Features
- `SparseWeight(weight)`: W^T stored input-major, (D_in, D_out) contiguous, so the weights one input feeds are
  one contiguous row; `SparseWeight.adopt(wt)` takes an existing W^T without a copy (the decode path owns the
  model's weights in this layout, see `decode`). `sw(x, k=...)` selects the active inputs of one token and
  computes y = sum_{i active} x[i] * W^T[i, :] from those rows, fp32 accumulation. Selection, one of:
  exact top-K of |x| (the first ties by position, as `qsparse.topk_sparsify` on every path and dtype),
  `threshold=` (|x| > t, a calibrated approximation: K varies per token), `presparsified=True` (non-zeros).
- Backends (`backend="auto"|"numba"|"torch"|"triton"`): numba (CPU, fp32/bf16; `cpu`), triton (CUDA, or CPU
  tensors under `TRITON_INTERPRET=1`; one fused launch, `gpu`), torch (anything: mask, gather, matmul; a
  reference). `auto`: triton on CUDA when it imports, numba on CPU for fp32/bf16, else torch.
- `select_mask(x, k|threshold|presparsified)`: the active inputs by the same rules, torch ops only.
- `union_gemm(sw, xs)`: batch > 1 over the union of the tokens' active inputs (numba).
"""

from __future__ import annotations

import numpy as np
import torch

from sparsescale.errors import UserError
from sparsescale.kernels import cpu, gpu
from sparsescale.numba_threads import numba_threads
from sparsescale.qsparse import topk_mask

BACKENDS = ("auto", "numba", "torch", "triton")
_NUMBA_DTYPES = (torch.float32, torch.bfloat16)
# selection codes shared by all backends
TOPK, THRESHOLD, NONZERO = 0, 1, 2


def select_mask(x: torch.Tensor, k: int | None = None, threshold: float | None = None,
                presparsified: bool = False) -> torch.Tensor:
    """Boolean mask of the active inputs of x (last dim), by the same rules as the kernels (torch ops only)."""
    if presparsified:
        return x != 0
    if threshold is not None:
        return x.detach().abs() > threshold
    return topk_mask(x.detach(), k)


def _check_one_mode(k, threshold, presparsified):
    if sum(v is not None and v is not False for v in (k, threshold, presparsified)) != 1:
        raise UserError(f"give exactly one of k (exact top-K), threshold or presparsified=True: "
                        f"got k={k!r}, threshold={threshold!r}, presparsified={presparsified!r}")


def _triton_ok(device: torch.device) -> bool:
    return gpu.HAVE_TRITON and (device.type == "cuda" or (gpu.INTERPRET and device.type == "cpu"))


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `auto` means here, or an error naming why the asked one cannot run."""
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}: got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if gpu.HAVE_TRITON else "torch"
        return "numba" if cpu.HAVE_NUMBA and device.type == "cpu" and dtype in _NUMBA_DTYPES else "torch"
    if backend == "numba" and not (cpu.HAVE_NUMBA and device.type == "cpu" and dtype in _NUMBA_DTYPES):
        raise UserError(f"backend='numba' needs numba, a CPU tensor and fp32/bf16 weights: got {device.type}/{dtype}; "
                        "use backend='torch' (or 'auto')")
    if backend == "triton" and not _triton_ok(device):
        raise UserError(f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors): "
                        f"got device {device}, triton {'installed' if gpu.HAVE_TRITON else 'not installed'}; "
                        "pip install triton or use backend='auto'")
    return backend


class SparseWeight:
    """W^T (D_in, D_out), contiguous, plus the views each backend reads; call it on one token's input."""

    def __init__(self, weight: torch.Tensor, backend: str = "auto", threads: int | None = None,
                 tiles: tuple[int, int] | None = None):
        # weight: (D_out, D_in) as in nn.Linear; copied once into W^T (huge pages for numba)
        backend = resolve_backend(backend, weight.device, weight.dtype)
        wt = weight.detach().t()
        wt = cpu.hugepage_copy(wt) if backend == "numba" else wt.contiguous()
        self._setup(wt, backend, threads, tiles)

    @classmethod
    def adopt(cls, wt: torch.Tensor, backend: str = "auto", threads: int | None = None,
              tiles: tuple[int, int] | None = None) -> "SparseWeight":
        """A SparseWeight reading an existing contiguous W^T (D_in, D_out) in place: no copy."""
        if wt.ndim != 2 or not wt.is_contiguous():
            raise UserError(f"SparseWeight.adopt needs a contiguous (D_in, D_out) tensor: got {tuple(wt.shape)}, "
                            f"strides {wt.stride()}")
        sw = cls.__new__(cls)
        sw._setup(wt, resolve_backend(backend, wt.device, wt.dtype), threads, tiles)
        return sw

    def _setup(self, wt, backend, threads, tiles):
        self.backend, self.wt = backend, wt
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
        how = TOPK if k is not None else THRESHOLD if threshold is not None else NONZERO
        return self.run(x, how, int(k or 0), float(threshold or 0.0))

    def run(self, x: torch.Tensor, how: int, k: int = 0, thr: float = 0.0):
        """`__call__` without the checks (the decode path's per-token call).
        x (D_in,); how: TOPK (k), THRESHOLD (thr) or NONZERO. n is a device tensor for triton."""
        if self.backend == "numba":
            y, n = cpu.sparse_gemv_cpu(self._flat, self.d_out, x.float().contiguous().numpy(), how, k, thr,
                                       self._idx, self.threads, self.tiles)
            return torch.from_numpy(y), n
        if self.backend == "triton":
            if how == TOPK and self.d_in > gpu.MAX_D_IN:  # too wide to select in registers: mask first
                return gpu.fused_sparse_gemv(self.wt, x * topk_mask(x, k), NONZERO)
            return gpu.fused_sparse_gemv(self.wt, x.contiguous(), how, k, thr)
        mask = select_mask(x, k if how == TOPK else None, thr if how == THRESHOLD else None, how == NONZERO)
        idx = mask.nonzero().squeeze(-1)
        y = x.float().index_select(0, idx) @ self.wt.index_select(0, idx).float()  # gathers: reference only
        return y, int(idx.numel())


def union_gemm(sw: SparseWeight, xs: torch.Tensor, n_col: int | None = None) -> tuple[torch.Tensor, int]:
    """(Y, n_union): Y (B, D_out) = xs W^T for already sparsified rows xs (B, D_in), numba backend, reading only
    the rows in the union of the B tokens' active inputs (the batch > 1 alternative to a dense matmul)."""
    if sw.backend != "numba":
        raise UserError(f"union_gemm needs a SparseWeight with the numba backend: got {sw.backend!r}")
    x2 = xs.detach().reshape(-1, sw.d_in).float().contiguous().numpy()
    y, n = cpu.union_gemm_cpu(sw._flat, sw.d_out, x2, sw._idx,
                              n_col or cpu.column_tiles(sw.d_out, numba_threads(sw.threads))[0])
    return torch.from_numpy(y), n
