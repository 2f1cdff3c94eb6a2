"""The sparse decode path of a `qsparse.convert`ed model: batch-1 tokens through the sparse GEMV.

Features
- `enable_sparse_decode(model, mode="topk"|"threshold", backend=...)`: every single-token call (batch 1, one
  position: KV-cache decoding, e.g. through HF `generate`) of a QSparseLinear runs the sparse GEMV; anything
  larger (prefill, batch > 1) and anything needing gradients falls back to the normal Q-Sparse forward
  (top-K + dense matmul). Projections reading one input (q/k/v; gate/up) are fused into one W^T and one call.
- One weight layout: the group's W^T (D_in, sum D_out), in huge pages on CPU, *is* the model's weight
  storage: each member's `weight` becomes a transposed view of its column slice, so the dense forward
  (prefill, training) multiplies by the same memory (BLAS reads the transpose in place) and an optimizer step
  changes what the kernel reads. No second copy for fp/bf16 weights (`extra_bytes` 0); a model enabled again
  (or a second model sharing the parameters) reuses the layout. Ternary weights (weight_bits="1.58") keep
  their latent fp weights for training, so their W^T holds the ternary values: a snapshot, counted in
  `extra_bytes`. Moving the model (`.to(...)`) after enabling is caught on the next call (an error).
- Block (N:M), 8-bit activations and re-scaling go through the exact Q-Sparse transform (`presparsified`), so
  logits match the normal forward; plain top-K selects inside the kernel (one fused launch on GPU).
- `calibrate_thresholds(model, input_ids)`: per input, the median over tokens of the K-th largest |x|, for
  mode="threshold" (labelled an approximation everywhere: outputs differ from exact top-K).
- `disable_sparse_decode(model)`: the normal forward everywhere (the weights stay in the W^T layout).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from sparsescale.errors import UserError
from sparsescale.kernels import cpu
from sparsescale.kernels.weight import BACKENDS, NONZERO, THRESHOLD, TOPK, SparseWeight, resolve_backend
from sparsescale.layout import PROJECTION_GROUPS
from sparsescale.qsparse import QSparseLinear, effective_weight, qsparse_linears

MODES = ("topk", "threshold")
# below this many weight bytes read per call, threads=None runs the GEMV on the calling thread (measured at
# 2 threads, fp32, S = 0.5: 1024x1024 0.37 ms on numba's pool vs 0.19 ms on one thread; 1024x3072 0.95 vs
# 0.66 ms; 4096x11008 (90 MB read) 6.9 vs 8.4 ms)
PARALLEL_MIN_BYTES = 32 << 20
# attribute of a Parameter: (W^T buffer, first column, last column), the buffer its data is a transposed view of
_OWNED = "_sparsescale_wt"


def _owned_wt(members) -> torch.Tensor | None:
    """The W^T buffer the members' weights already are views of, in this order, or None."""
    entries = [getattr(m.weight, _OWNED, None) for m in members]
    if any(e is None for e in entries) or any(e[0] is not entries[0][0] for e in entries):
        return None
    wt, c = entries[0][0], 0
    for m, (_, c0, c1) in zip(members, entries):
        w = m.weight
        if (c0 != c or c1 - c0 != m.out_features or w.dtype != wt.dtype or w.stride() != (1, wt.shape[1])
                or w.data_ptr() != wt[:, c0].data_ptr()):
            return None
        c = c1
    return wt if c == wt.shape[1] else None


class _Group:
    """Projections that read one input (q/k/v, or gate/up, or a single projection): one fused W^T, one call."""

    def __init__(self, members, mode, threshold, backend, threads, decode):
        self.members = members
        lead = members[0]
        self.settings, self.k, self.mode, self.threshold, self.decode = lead.settings, lead.k, mode, threshold, decode
        s = lead.settings
        # the exact Q-Sparse transform is needed unless the input is plain top-K of the raw activations
        self.plain = s.block is None and s.act_bits is None and not s.rescale
        bounds = np.cumsum([0] + [m.out_features for m in members])
        self.slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.widths = [m.out_features for m in members]
        w0 = lead.weight
        backend = resolve_backend(backend, w0.device, w0.dtype)
        self.shared = s.weight_bits != "1.58"  # ternary: the kernel reads the ternary values, a snapshot
        wt = _owned_wt(members) if self.shared else None
        if wt is None:
            shape = (lead.in_features, int(bounds[-1]))
            wt = (cpu.hugepage_empty(shape, w0.dtype) if backend == "numba"
                  else torch.empty(shape, dtype=w0.dtype, device=w0.device))
            with torch.no_grad():
                for m, sl in zip(members, self.slices):
                    wt[:, sl].copy_(effective_weight(m).t())
                    if self.shared:  # the parameter now lives in the kernel's layout: no second copy
                        m.weight.data = wt[:, sl].t()
                        setattr(m.weight, _OWNED, (wt, sl.start, sl.stop))
        if threads is None and wt.numel() * wt.element_size() * (1.0 - s.sparsity) < PARALLEL_MIN_BYTES:
            threads = 1  # numba's pool costs 0.2-0.3 ms a launch: more than a second thread saves on a small GEMV
        self.sw = SparseWeight.adopt(wt, backend, threads)
        self._ptr = w0.data_ptr() if self.shared else None
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features, dtype=wt.dtype, device=wt.device)
             for b, m in zip(biases, members)])
        self.key = None  # the last input (held, so its identity cannot be reused) and its fused output
        self.out = None
        self.parts = ()
        self.calls = 0
        self.active = 0

    def moved(self) -> bool:
        """True when the members' weights no longer live in this group's W^T (model.to, load_state_dict)."""
        return self.shared and self.members[0].weight.data_ptr() != self._ptr

    def applies(self, x: torch.Tensor) -> bool:
        ok = (self.decode.active and x.shape[:-1].numel() == 1 and x.device == self.sw.wt.device
              and not (torch.is_grad_enabled() and x.requires_grad))
        if ok and self.moved():
            raise UserError("the weights moved since enable_sparse_decode (model.to / load_state_dict replaced "
                            "them): call enable_sparse_decode(model) again")
        return ok

    def output(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        if self.key is not x:
            x1 = x.detach().reshape(-1)  # (D_in,)
            if self.mode == "threshold":
                y, n = self.sw.run(x1, THRESHOLD, thr=self.threshold)
            elif self.plain:
                y, n = self.sw.run(x1, TOPK, k=self.k if self.settings.sparsity > 0 else self.sw.d_in)
            else:  # block / int8 / rescale: the exact Q-Sparse transform, then its non-zeros
                y, n = self.sw.run(self.members[0].sparsify_input(x1), NONZERO)
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
            self.key, self.out = x, (y + self.bias.to(y.dtype) if self.bias is not None else y)
            # every member's view at once: one split is ~10x cheaper than a tensor index per member
            self.parts = self.out.split(self.widths, -1) if len(self.members) > 1 else (self.out,)
            self.calls += 1
            self.active += n
        return self.parts[slot]


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
        """Weight memory beyond the model's own parameters: 0 for fp/bf16 (the parameters are the W^T views),
        the ternary snapshot for weight_bits="1.58"."""
        return sum(g.sw.nbytes for g in self.groups if not g.shared)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every parameter of the model plus `extra_bytes`: the decode path's weight memory."""
        seen = {}
        for p in self.model.parameters():
            seen[p.data_ptr()] = p.numel() * p.element_size()
        return sum(seen.values()) + self.extra_bytes

    @contextlib.contextmanager
    def paused(self):
        """Run the normal Q-Sparse forward (top-K + dense matmul) inside the block, on the same weights."""
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
    Memory: the fp/bf16 weights move into the kernel's W^T layout (no copy; `.extra_bytes` 0); ternary
    weights get a W^T snapshot of their ternary values (`.extra_bytes`): after changing those, call this again.
    threads (numba): None follows torch.get_num_threads() for groups reading >= PARALLEL_MIN_BYTES a call and
    keeps smaller ones on the calling thread; 1 keeps every GEMV on the calling thread.
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
    """Back to the normal Q-Sparse forward everywhere (fp weights stay in the W^T layout; ternary snapshots are freed)."""

    for _, m in qsparse_linears(model):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_sparse_group", None)
    model.__dict__.pop("_sparse_decode", None)
