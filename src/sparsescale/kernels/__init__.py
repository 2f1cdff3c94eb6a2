"""Sparse inference: a sparse GEMV that reads only the weight rows of active inputs, and a batch-1 decode path.

Features (one module per idea; everything public is re-exported here)
- `weight`: `SparseWeight` (W^T, input-major, in the layout the kernels read; `adopt` takes one in place),
  `select_mask`, `resolve_backend`, `union_gemm`; backends "auto" | "numba" | "torch" | "triton".
- `cpu`: numba kernels (radix-select top-K + GEMV fused in one call; union GEMM), huge-page memory
  (`hugepage_empty`, `hugepage_linears` for the dense baseline's equal treatment).
- `gpu`: one fused Triton launch per projection (selection + GEMV), also run on CPU tensors by Triton's
  interpreter (`TRITON_INTERPRET=1`) in the tests.
- `decode`: `enable_sparse_decode` / `disable_sparse_decode` (the model's weights live in the kernel's W^T
  layout: no second copy), `calibrate_thresholds` (threshold mode: an approximation of top-K).
- `step`: `FusedStep`, `fused_generate`: each decoder layer of a batch-1 token in one compiled call (fp32,
  numba), on the weights `decode` placed; no HF overhead per token.
One tie rule everywhere: exact top-K of |x| keeps all entries above the K-th magnitude and the first ties by
position (`qsparse.topk_mask`), for every backend and dtype.
"""

from sparsescale.kernels.cpu import HAVE_NUMBA, column_tiles, hugepage_copy, hugepage_empty, hugepage_linears
from sparsescale.kernels.decode import (MODES, SparseDecode, calibrate_thresholds, disable_sparse_decode,
                                        enable_sparse_decode)
from sparsescale.kernels.gpu import HAVE_TRITON, INTERPRET
from sparsescale.kernels.step import GEMVS, FusedStep, fused_generate
from sparsescale.kernels.weight import (BACKENDS, NONZERO, THRESHOLD, TOPK, SparseWeight, resolve_backend,
                                        select_mask, union_gemm)

__all__ = ["BACKENDS", "GEMVS", "FusedStep", "HAVE_NUMBA", "HAVE_TRITON", "INTERPRET", "MODES", "NONZERO", "THRESHOLD", "TOPK",
           "SparseDecode", "SparseWeight", "column_tiles", "calibrate_thresholds", "disable_sparse_decode",
           "enable_sparse_decode", "fused_generate", "hugepage_copy", "hugepage_empty", "hugepage_linears", "resolve_backend", "select_mask",
           "union_gemm"]
