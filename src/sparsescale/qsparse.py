"""Q-Sparse: top-K activation sparsity (+ BitNet b1.58) as a module converter for HF decoder models.

Features
- `convert(model, sparsity, weight_bits="fp"|"1.58", act_bits=None|8, block=None, rescale=False)` swaps every
  `nn.Linear` inside the decoder layers (q/k/v/o, gate/up/down; not the embeddings, not the LM head) for a
  `QSparseLinear` in place; the model stays a plain HF model and the settings go to `config.qsparse`.
- Top-K by magnitude per token along the input dimension, K = round((1 - S) D_in), straight-through
  gradient (dY/dX = dY/d(X*M)), exactly K kept per token; one tie rule on every path and dtype (`topk_mask`):
  the first ties by position. CPU: numba keys (|x| as bits, zeros keyed by position), numpy's partition, a
  numba masking pass (bf16/fp16 on their exact fp32 values); elsewhere torch.topk for the K-th magnitude + a
  cumulative count of the ties.
- Block Q-Sparse (N:M): top-K inside each block of `block` consecutive inputs.
- BitNet b1.58: per-token absmax 8-bit activations (mask computed on the unquantized input), per-tensor
  absmean ternary weights with latent fp weights, both with the STE.
- Optional L2 re-scaling of the sparsified input to the norm of the dense input (paper text; off by default,
  the official code does not do it).
- Inputs shared by several projections (q/k/v; gate/up) are sparsified once: the projections of one parent
  module share a one-entry cache keyed on the input tensor's identity.
- `measured_sparsity(model, input_ids)`: fraction of zero inputs per projection type and overall, weighted by
  the size of the weight each input feeds (the paper's Table 2).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsescale.config import PRECISIONS, check_sparsity, kept
from sparsescale.errors import UserError
from sparsescale.layout import PROJECTION_GROUPS, decoder_layers
from sparsescale.numba_threads import numba_threads

WEIGHT_BITS = PRECISIONS  # "fp" | "1.58": the sweep's precisions are the weights' bit widths
ACT_BITS = (None, 8)


@dataclass(frozen=True)
class QSparseSettings:
    sparsity: float = 0.0
    weight_bits: str = "fp"
    act_bits: int | None = None
    block: int | None = None
    rescale: bool = False

    def __post_init__(self):
        check_sparsity(self.sparsity)
        if self.weight_bits not in WEIGHT_BITS:
            raise UserError(f"weight_bits must be one of {WEIGHT_BITS}: got {self.weight_bits!r}")
        if self.act_bits not in ACT_BITS:
            raise UserError(f"act_bits must be None (full precision) or 8: got {self.act_bits!r}")
        if self.block is not None and (not isinstance(self.block, int) or self.block < 2):
            raise UserError(f"block must be None or an integer >= 2 (N:M block size M): got {self.block!r}")


# ----------------------------------------------------------------------------------------------------------
# top-K selection

def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest-|x| entries of the last dim, by the one tie rule of every path: all
    entries above the k-th largest magnitude, then the first ties by position (torch ops, any device/dtype)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    a = x.abs()
    t = torch.topk(a, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th magnitude, exact
    gt = a > t
    ties = a == t
    room = k - gt.sum(-1, keepdim=True)
    return gt | (ties & (torch.cumsum(ties.to(torch.int32), -1) <= room))


def _topk_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but the k largest-|x| entries of the last dim zeroed (exactly k kept, first ties by position)."""
    return torch.where(topk_mask(x, k), x, torch.zeros((), dtype=x.dtype, device=x.device))


@numba.njit(cache=True, inline="always")
def _mask_row(x, t, k, out, r):  # row r of x, out: keep |x| >= t, then drop the last ties: k in all
    xr, orow = x[r], out[r]
    D = xr.shape[0]
    c = 0
    for j in range(D):  # branch-free select (vectorises): 20x faster than branching on ties here
        v = xr[j]
        keep = abs(v) >= t
        orow[j] = v if keep else 0.0
        c += keep
    j = D - 1
    while c > k and j >= 0:  # entries equal to t beyond the k-th: zero the last ones (first ties kept)
        if abs(xr[j]) == t:
            orow[j] = 0.0
            c -= 1
        j -= 1


_ABS_BITS = np.int32(0x7FFFFFFF)  # |x| of an fp32 as its bit pattern: non-negative floats order like their bits


@numba.njit(cache=True, inline="always")
def _kth_smallest(a, b, n, kth):
    """The value of rank kth (0-based, ascending) among a[:n]; a and b are scratch of length >= n (overwritten).
    Branch-free quickselect: each round copies the candidates into b around a median-of-3 pivot (below it from
    the front, the rest from the back: no unpredictable branch) and keeps the side that holds rank kth."""
    while True:
        if n <= 16:  # insertion sort of the few left
            for i in range(1, n):
                v = a[i]
                j = i - 1
                while j >= 0 and a[j] > v:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = v
            return a[kth]
        p0, p1, p2 = a[0], a[n >> 1], a[n - 1]
        p = max(min(p0, p1), min(max(p0, p1), p2))
        lo = 0
        hi = n - 1
        for i in range(n):
            v = a[i]
            less = v < p
            b[lo] = v
            b[hi] = v
            lo += less
            hi -= 1 - less
        if kth < lo:  # b[:lo] < p
            n = lo
            a, b = b, a
            continue
        eq = 0
        for i in range(lo, n):
            eq += b[i] == p
        if kth < lo + eq:
            return p
        m = 0
        for i in range(lo, n):  # keep the ones above p
            v = b[i]
            a[m] = v
            m += v > p
        kth -= lo + eq
        n = m


@numba.njit(cache=True)
def _small_row(x, nnz, k, out, r):
    """Row r when its k-th largest key is <= D (not a normal magnitude): with at most k non-zeros the row is
    kept whole (the zeros are zero either way); else its k-th largest magnitude is a denormal as small as the
    zeros' stand-ins, so it is found exactly among the non-zeros' bits by a quickselect."""
    xr, br = x[r], x[r].view(np.int32)
    D = xr.shape[0]
    if nnz[r] <= k:
        for j in range(D):
            out[r, j] = xr[j]
        return
    s, s2 = np.empty(D, np.int32), np.empty(D, np.int32)
    m = 0
    for j in range(D):  # the non-zero magnitudes, compacted
        v = br[j] & _ABS_BITS
        s[m] = v
        m += v != 0
    s[0] = _kth_smallest(s, s2, m, m - k)  # the k-th largest magnitude, as bits
    _mask_row(x, s[:1].view(np.float32)[0], k, out, r)  # then the one masking pass (first ties kept)


@numba.njit(cache=True, inline="always")
def _key_row(x, keys, nnz, r):  # row r: |x| as bits, each exact zero replaced by its position + 1 (distinct)
    br, kr = x[r].view(np.int32), keys[r]
    c = 0
    for j in range(br.shape[0]):  # branch-free (vectorises)
        v = br[j] & _ABS_BITS
        nz = v != 0
        c += nz
        kr[j] = v if nz else j + 1
    nnz[r] = c


@numba.njit(parallel=True, cache=True)
def _keys_rows_parallel(x, keys, nnz):
    for r in numba.prange(x.shape[0]):
        _key_row(x, keys, nnz, r)


@numba.njit(cache=True)
def _keys_rows_serial(x, keys, nnz):
    for r in range(x.shape[0]):
        _key_row(x, keys, nnz, r)


@numba.njit(parallel=True, cache=True)
def _select_rows_parallel(x, thr, nnz, k, out):  # x, out: (R, D) float32; thr: (R,) k-th largest key (bits)
    thr_f = thr.view(np.float32)  # the same bits as floats (a view: no per-row cast)
    for r in numba.prange(x.shape[0]):
        if thr[r] <= x.shape[1]:  # not a normal magnitude: <= k non-zeros (thr 0), or a denormal threshold
            _small_row(x, nnz, k, out, r)
        else:  # (_mask_row inlined here, not through a shared row function: two levels of inlining ran 2x slower)
            _mask_row(x, thr_f[r], k, out, r)


@numba.njit(cache=True)
def _select_rows_serial(x, thr, nnz, k, out):
    thr_f = thr.view(np.float32)
    for r in range(x.shape[0]):
        if thr[r] <= x.shape[1]:
            _small_row(x, nnz, k, out, r)
        else:
            _mask_row(x, thr_f[r], k, out, r)


def _get_numba_kernels(parallel: bool = False):
    """The two numba passes of the CPU path (compiled on first call, cached on disk): `keys(x, keys, nnz)`
    writes each row's sort keys and non-zero count; `select(x, thr, nnz, k, out)`, given the k-th largest key
    of every row, keeps the entries at or above it and drops the last ties, so that exactly k entries survive
    (the first ties by position are kept).

    A serial and a parallel build of each: with one thread the serial one is used, because an OpenMP pool that
    was started once keeps spinning idle workers that steal the CPU of the other jobs of a sweep. The two are
    separate functions on purpose: numba's disk cache is keyed by the function's name, not by `parallel`, so
    one function compiled both ways would load the parallel machine code into a serial caller (and start the
    pool anyway, resetting torch's thread count). They live at module level: numba's cache cannot match a
    function defined inside another (a closure), so each new process compiled it again (~2 s) and appended
    one more entry to the cache."""
    if parallel:
        return _keys_rows_parallel, _select_rows_parallel
    return _keys_rows_serial, _select_rows_serial


def _numba_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest-magnitude entries of the last dimension of x, per row (no gradient logic here).

    One tie rule on every path: all entries above the k-th largest magnitude, then the first ties by position.
    CPU, three passes: numba writes each row's keys, |x| as int32 bits with every exact zero replaced by its
    position + 1; numpy's partition (a vectorised introselect, several times faster than torch.topk or a numba
    quickselect on CPU) finds each row's k-th largest key; numba masks each row at it. The stand-ins are
    distinct and below every normal magnitude, so ReLU^2's mostly-zero inputs (the down projection) cost no
    more than dense ones (numpy's partition slows ~5x on many equal values), and the k-th key is a real
    magnitude whenever a row has more than k non-zeros; rows with at most k are copied, and a row whose k-th
    key falls among the stand-ins (a denormal threshold) is selected exactly by a numba quickselect.
    bf16/fp16 run on their exact fp32 values (the same order and ties). Elsewhere (CUDA): `topk_mask`
    (torch.topk for the k-th magnitude, a cumulative count for the ties).
    """
    d = x.shape[-1]
    if k >= d:
        return x
    if _numba_ok(x):
        try:
            keys_kernel, select_kernel = _get_numba_kernels(parallel=numba_threads() > 1)
        except ImportError:  # numba missing: torch path
            return _topk_torch(x, k)
        if x.dtype != torch.float32:  # widening is exact: the fp32 values order and tie as the originals
            return topk_sparsify(x.float(), k).to(x.dtype)
        x2 = x.detach().reshape(-1, d).contiguous().numpy()  # (R, D), shares memory
        keys = np.empty(x2.shape, np.int32)
        nnz = np.empty(x2.shape[0], np.int64)
        keys_kernel(x2, keys, nnz)
        thr = np.zeros(x2.shape[0], np.int32)  # stays 0 for rows with <= k non-zeros: they are copied
        rows = np.flatnonzero(nnz > k)
        if len(rows) == len(nnz):
            keys.partition(d - k, axis=1)  # in place: no second copy of the rows
            thr[:] = keys[:, d - k]
        elif len(rows):
            sub = keys[rows]
            sub.partition(d - k, axis=1)
            thr[rows] = sub[:, d - k]
        out = torch.empty(x2.shape, dtype=x.dtype)
        select_kernel(x2, thr, nnz, k, out.numpy())
        return out.view(x.shape)
    return _topk_torch(x, k)


def block_topk_sparsify(x: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """N:M sparsity: keep the k largest-|x| entries inside every block of `block` consecutive inputs."""
    d = x.shape[-1]
    if d % block:
        raise UserError(f"block={block} does not divide the input dimension {d}: choose a block size that divides it")
    xb = x.reshape(*x.shape[:-1], d // block, block)
    return topk_sparsify(xb, k).reshape(x.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: f(x) computed outside autograd; backward: the identity (dY/dX = dY/df)."""

    @staticmethod
    def forward(ctx, x, fx):
        return fx

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """Value fx, gradient of the identity w.r.t. x (no extra tensors saved for backward)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fx
    return _StraightThrough.apply(x, fx.detach())


# ----------------------------------------------------------------------------------------------------------
# BitNet b1.58 quantizers (fake-quant: values on the grid, kept in floating point)

def quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit: gamma = max|x| (>= 1e-5), Q = RoundClip(127/gamma x, -128, 127) * gamma/127."""
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * (127.0 / gamma)).round().clamp(-128, 127) * (gamma / 127.0)


def quant_weight_ternary(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-tensor absmean ternary: alpha = mean|W|, Q = RoundClip(W/(alpha+eps), -1, 1) * alpha."""
    alpha = w.abs().mean()
    return (w / (alpha + eps)).round().clamp(-1, 1) * alpha


# ----------------------------------------------------------------------------------------------------------

class _SharedInputCache:
    """One-entry cache shared by the projections of one parent module (q/k/v read the same tensor)."""

    __slots__ = ("key", "value")

    def __init__(self):
        self.key = None
        self.value = None


class QSparseLinear(nn.Linear):
    """nn.Linear whose input is top-K sparsified (and optionally 8-bit quantized) and whose weight is optionally
    ternary. Same parameters and state_dict keys as the nn.Linear it replaces."""

    def __init__(self, in_features, out_features, bias=True, settings=QSparseSettings(), device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.settings = settings
        self.k = kept(in_features if settings.block is None else settings.block, settings.sparsity)
        self._cache = _SharedInputCache()
        self.record = None  # set to a list by `measured_sparsity` to collect (zeros, total)

    @classmethod
    def from_linear(cls, lin: nn.Linear, settings: QSparseSettings, cache: _SharedInputCache) -> "QSparseLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias  # share the parameters: no copy, same keys
        new.settings = settings
        new.k = kept(lin.in_features if settings.block is None else settings.block, settings.sparsity)
        new._cache = cache
        new.record = None
        return new

    def extra_repr(self) -> str:
        s = self.settings
        return (f"{super().extra_repr()}, sparsity={s.sparsity}, k={self.k}, weight_bits={s.weight_bits}, "
                f"act_bits={s.act_bits}, block={s.block}, rescale={s.rescale}")

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed input X*M (rescaled / quantized as configured), with the STE."""
        s = self.settings
        if s.sparsity == 0.0:
            xs = x
        else:
            fx = (topk_sparsify(x.detach(), self.k) if s.block is None
                  else block_topk_sparsify(x.detach(), s.block, self.k))
            xs = ste(x, fx)
            if s.rescale:
                xs = xs * (x.norm(dim=-1, keepdim=True) / xs.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if s.act_bits == 8:
            xs = ste(xs, quant_act_int8(xs.detach()))
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self._cache
        if c.key is not x:
            c.key, c.value = x, self.sparsify_input(x)
        xs = c.value
        if self.record is not None:
            self.record.append((int((xs == 0).sum()), xs.numel()))
        w = self.weight
        if self.settings.weight_bits == "1.58":
            w = ste(w, quant_weight_ternary(w.detach()))
        return F.linear(xs, w.to(xs.dtype) if w.dtype != xs.dtype else w, self.bias)


def convert(model: nn.Module, sparsity: float, weight_bits: str = "fp", act_bits: int | None = None,
            block: int | None = None, rescale: bool = False) -> nn.Module:
    """Swap every nn.Linear inside the decoder layers for a QSparseLinear, in place; return the model.

    A model converted before is re-converted with the new settings. sparsity=0, weight_bits="fp" leaves the
    outputs identical to the unconverted model.
    """
    settings = QSparseSettings(float(sparsity), weight_bits, act_bits, block, bool(rescale))
    n = 0
    for layer in decoder_layers(model):
        for parent in layer.modules():
            cache = _SharedInputCache()
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, QSparseLinear.from_linear(child, settings, cache))
                    n += 1
    if n == 0:
        raise UserError(f"convert found no nn.Linear inside the decoder layers of {type(model).__name__}")
    model.config.qsparse = asdict(settings)
    return model


def effective_weight(mod: nn.Module) -> torch.Tensor:
    """The weight a (Q-Sparse) linear multiplies by, detached: ternary when weight_bits="1.58", else its own."""
    settings = getattr(mod, "settings", None)
    w = mod.weight.detach()
    return quant_weight_ternary(w) if settings is not None and settings.weight_bits == "1.58" else w


def qsparse_linears(model: nn.Module):
    """(name, module) of every QSparseLinear."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QSparseLinear)]


@contextlib.contextmanager
def _recording(model):
    mods = qsparse_linears(model)
    for _, m in mods:
        m.record = []
    try:
        yield mods
    finally:
        for _, m in mods:
            m.record = None


@torch.no_grad()
def measured_sparsity(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Fraction of zero inputs per projection group (qkv, o, gate_up, down) and overall for one batch.

    Each projection's fraction is weighted by the number of weights its inputs feed (D_in x D_out), so
    `overall` is the fraction of weight reads skipped. Works on dense models after `convert(model, 0)`.
    """
    if not qsparse_linears(model):
        raise UserError("measured_sparsity needs a converted model: call qsparse.convert(model, sparsity) first")
    was_training = model.training
    model.eval()
    with _recording(model) as mods:
        model(input_ids=input_ids)
        zeros_w: dict[str, float] = {}
        total_w: dict[str, float] = {}
        for name, m in mods:
            group = PROJECTION_GROUPS.get(name.rsplit(".", 1)[-1], "other")
            z = sum(a for a, _ in m.record)
            t = sum(b for _, b in m.record)
            if t == 0:
                continue
            w = m.weight.numel()
            zeros_w[group] = zeros_w.get(group, 0.0) + z / t * w
            total_w[group] = total_w.get(group, 0.0) + w
    model.train(was_training)
    out = {g: zeros_w[g] / total_w[g] for g in sorted(total_w)}
    out["overall"] = sum(zeros_w.values()) / sum(total_w.values())
    return out
