"""Hugging Face remote code of a sparsescale checkpoint: `modeling_sparsescale.py`, saved beside the weights.

Features
- `SparseScaleForCausalLM`: a `LlamaForCausalLM` whose decoder-layer linears apply the Q-Sparse settings
  recorded in `config.qsparse` (top-K activation sparsity, N:M blocks, per-token absmax 8-bit activations,
  per-tensor absmean ternary weights, optional L2 rescaling), so that
  `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` runs the model as it was trained.
  Weights and state_dict keys are those of the plain Llama (the converted linears keep `weight`/`bias`).
- Self-contained on purpose: `model.save` copies this file into every checkpoint (named in config.json's
  `auto_map`, the Hub convention for custom architectures), where sparsescale is not installed; it imports
  only torch and transformers. The reference implementation is `sparsescale.qsparse` (a numba kernel on CPU,
  same values: exactly K inputs kept per token, ties to the first position); tests/test_hf_export.py checks
  that both give the same loss on a saved checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM


def kept(d_in: int, sparsity: float) -> int:
    """K = round((1 - S) D_in), at least 1 (sparsescale.config.kept)."""
    return max(1, min(d_in, int(round((1.0 - sparsity) * d_in))))


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but the k largest-|x| entries of the last dim zeroed (exactly k kept, ties to the first)."""
    if k >= x.shape[-1]:
        return x
    # a stable sort on -|x| puts equal magnitudes in position order: the first ties are kept
    idx = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit: gamma = max|x| (>= 1e-5), Q = RoundClip(127/gamma x, -128, 127) * gamma/127."""
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * (127.0 / gamma)).round().clamp(-128, 127) * (gamma / 127.0)


def quant_weight_ternary(w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-tensor absmean ternary: alpha = mean|W|, Q = RoundClip(W/(alpha+eps), -1, 1) * alpha."""
    alpha = w.abs().mean()
    return (w / (alpha + eps)).round().clamp(-1, 1) * alpha


class _StraightThrough(torch.autograd.Function):
    """Forward: a precomputed f(x); backward: the identity (fine-tuning keeps the training's gradient)."""

    @staticmethod
    def forward(ctx, x, fx):
        return fx

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ste(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fx
    return _StraightThrough.apply(x, fx.detach())


class QSparseLinear(nn.Linear):
    """nn.Linear with a top-K (optionally 8-bit) input and an optionally ternary weight; same parameters."""

    def __init__(self, lin: nn.Linear, sparsity: float = 0.0, weight_bits: str = "fp", act_bits=None,
                 block=None, rescale: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight, self.bias = lin.weight, lin.bias  # shared: the state_dict keys stay those of nn.Linear
        self.sparsity, self.weight_bits, self.act_bits = float(sparsity), weight_bits, act_bits
        self.block, self.rescale = block, bool(rescale)
        self.k = kept(lin.in_features if block is None else block, self.sparsity)

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        xs = x
        if self.sparsity > 0.0:
            xd = x.detach()
            if self.block is None:
                fx = topk_sparsify(xd, self.k)
            else:
                d = xd.shape[-1]
                fx = topk_sparsify(xd.reshape(*xd.shape[:-1], d // self.block, self.block), self.k).reshape(xd.shape)
            xs = _ste(x, fx)
            if self.rescale:
                xs = xs * (x.norm(dim=-1, keepdim=True) / xs.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if self.act_bits == 8:
            xs = _ste(xs, quant_act_int8(xs.detach()))
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.sparsify_input(x)
        w = self.weight
        if self.weight_bits == "1.58":
            w = _ste(w, quant_weight_ternary(w.detach()))
        return F.linear(xs, w.to(xs.dtype) if w.dtype != xs.dtype else w, self.bias)


def convert(model: nn.Module, sparsity: float = 0.0, weight_bits: str = "fp", act_bits=None, block=None,
            rescale: bool = False) -> nn.Module:
    """Swap every nn.Linear inside the decoder layers (not embeddings, not the LM head) in place."""
    for layer in model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and not isinstance(child, QSparseLinear):
                    setattr(parent, name, QSparseLinear(child, sparsity, weight_bits, act_bits, block, rescale))
    return model


class SparseScaleForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with the Q-Sparse / BitNet b1.58 settings of `config.qsparse` applied."""

    def __init__(self, config):
        super().__init__(config)
        settings = getattr(config, "qsparse", None)
        if settings:
            convert(self, **settings)
