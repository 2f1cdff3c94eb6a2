"""Super-weight ablations: context managers that edit a model and restore it bit-exactly on exit.

Features
- `zeroed(model, sws)`: the super weights set to 0 (the paper's "prune SW"); `scaled(model, sws, factor)`:
  multiplied by `factor` (0 = pruned, 1 = original; the paper's 0..3 scaling curve). In a 1.58-bit model the
  effective ternary weight is scaled (a hook on the output), since scaling the latent weight leaves its
  ternary value unchanged; `scale_target` says which was scaled.
- `restored_activation(model, sws)`: zeroed, but a hook writes back each super activation Y[b, t, j] exactly
  as the original weights would have produced it (the paper's "prune SW, restore SA"), per sequence at the
  position where |Y[b, :, j]| is largest (`super_positions`), as the paper's code does: evaluation windows cut
  from a stream have their BOS anywhere. `position=t` keeps the older fixed-index rule for comparison.
- `largest_other_weights(model, sws, n)` and `pruned_others(model, sws, n)`: the n largest-|W| other weights
  (super weights kept) zeroed: the paper's "7,000 outliers" control.
- `single_weight_effects(model, sws, measure)`: each weight zeroed alone against the largest other weight,
  with a verdict (super weight / inert): what settles a published weight that may do nothing (the disputed
  second weight of OLMo-1B).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsescale.errors import UserError
from sparsescale.layout import decoder_layers, ffn_out_modules
from sparsescale.superweight.detect import (
    DEFAULT_MODULE, SuperWeight, edited, effective_input, effective_weight, super_positions,
)

VERIFY_FACTOR = 10.0  # a super weight's loss increase over the largest other weight's
VERIFY_MIN_INCREASE = 0.01  # nats/token


def is_ternary(mod: nn.Module) -> bool:
    """A 1.58-bit QSparseLinear: the matmul sees absmean-ternary weights, not the latent ones."""
    return getattr(getattr(mod, "settings", None), "weight_bits", "fp") == "1.58"


@contextlib.contextmanager
def scaled(model: nn.Module, sws: list[SuperWeight], factor: float, module: str = DEFAULT_MODULE):
    """Multiply each super weight by `factor` (0 = pruned, 1 = original).

    Full-precision weights are edited in place. A ternary (1.58-bit) weight cannot be scaled that way: its
    latent value times 0.25..3 rounds to the same ternary value (a flat curve by construction). There the
    effective weight is scaled instead: a hook adds (factor - 1) X_eff[..., k] W_eff[j, k] to Y[..., j], so the
    matmul sees factor x the ternary weight (alpha t, alpha the matrix's absmean scale).
    """
    mods = ffn_out_modules(model, module)
    latent = [s for s in sws if not is_ternary(mods[s.layer])]
    effective: dict[int, list[tuple[int, int, torch.Tensor]]] = {}  # layer -> (j, k, W_eff[j, k])
    for s in sws:
        if is_ternary(mods[s.layer]):
            effective.setdefault(s.layer, []).append((s.row, s.col, effective_weight(mods[s.layer])[s.row, s.col].clone()))

    def hook(m, args, out, entries):
        x = effective_input(m, args[0])  # (..., F)
        out = out.clone()
        for j, k, w in entries:
            out[..., j] += ((factor - 1.0) * x[..., k] * w.to(x.dtype)).to(out.dtype)
        return out

    handles = [mods[layer].register_forward_hook(lambda m, a, o, e=entries: hook(m, a, o, e))
               for layer, entries in effective.items()]
    try:
        with edited([(mods[s.layer], s.row, s.col) for s in latent]):
            with torch.no_grad():
                for s in latent:
                    mods[s.layer].weight[s.row, s.col] *= factor
            yield model
    finally:
        for h in handles:
            h.remove()


def scale_target(model: nn.Module, sws: list[SuperWeight], module: str = DEFAULT_MODULE) -> str:
    """What `scaled` scales for these weights (recorded next to a scaling curve)."""
    mods = ffn_out_modules(model, module)
    kinds = {is_ternary(mods[s.layer]) for s in sws}
    if kinds == {True}:
        return "effective ternary weight (X[t, k] W_eff[j, k] scaled; the latent weight would round to the same value)"
    return "weight" if kinds <= {False} else "weight (full precision) / effective ternary weight (1.58-bit)"


def zeroed(model: nn.Module, sws: list[SuperWeight], module: str = DEFAULT_MODULE):
    """Set the super weights to zero (the paper's "prune SW")."""
    return scaled(model, sws, 0.0, module)


@contextlib.contextmanager
def restored_activation(model: nn.Module, sws: list[SuperWeight], module: str = DEFAULT_MODULE,
                        position: int | None = None):
    """Zero the super weights but write back each super activation Y[b, t, j] as the original weights produce
    it: the paper's "prune SW, restore SA" ablation.

    position None (the paper's code): per sequence b, at t = argmax_t |Y[b, t, j]| of the original weights on
    the layer's current input (the unmodified model's own Y in the first super-weight layer: zeroing a weight
    does not change its own layer's input). An int: that fixed token index in every sequence (right only when
    every sequence starts with BOS; a window cut from a stream has its BOS anywhere, or none).
    """
    mods = ffn_out_modules(model, module)
    rows: dict[tuple[int, int], torch.Tensor] = {}  # (layer, j) -> original effective weight row (F,)
    for s in sws:
        rows.setdefault((s.layer, s.row), effective_weight(mods[s.layer])[s.row].clone())
    # zeroed first: a ternary model zeroes by a hook, which must run before the restoring ones
    with zeroed(model, sws, module), _restore_hooks(mods, rows, position):
        yield model


@contextlib.contextmanager
def _restore_hooks(mods, rows, position):
    """Hooks writing back each super activation (see `restored_activation`); removed when the caller exits."""
    handles = []
    for (layer, j), w_row in rows.items():
        mod = mods[layer]
        bias = None if getattr(mod, "bias", None) is None else mod.bias[j].detach()

        def hook(m, args, out, j=j, w_row=w_row, bias=bias):
            x = effective_input(m, args[0])  # (B, T, F) or (T, F)
            y = F.linear(x, w_row.to(x.dtype)[None], None if bias is None else bias[None])[..., 0]  # (B, T)
            y2 = y.reshape(-1, y.shape[-1])  # (B, T)
            if position is None:
                t = super_positions(y2)  # (B,)
            elif position < y2.shape[-1]:
                t = torch.full((y2.shape[0],), position, dtype=torch.long, device=y2.device)
            else:
                return out
            b = torch.arange(y2.shape[0], device=y2.device)
            out = out.clone()
            out2 = out.view(-1, *out.shape[-2:])  # (B, T, D)
            out2[b, t, j] = y2[b, t].to(out.dtype)
            return out

        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def largest_other_weights(model: nn.Module, sws: list[SuperWeight], n: int, scope: str = "down_proj",
                          module: str = DEFAULT_MODULE) -> list[tuple[nn.Module, str, int, int, float]]:
    """The n largest-|W| weights other than the super weights: (module, name, row, col, value), largest first.

    scope "down_proj": the FFN output projections (the matrices super weights live in); "all": every linear
    layer inside the decoder layers (never embeddings, norms or the LM head).
    """
    if scope == "down_proj":
        named = [(f"layers.{i}.{module}", m) for i, m in enumerate(ffn_out_modules(model, module))]
    elif scope == "all":
        named = [(f"layers.{i}.{name}", m) for i, layer in enumerate(decoder_layers(model))
                 for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    else:
        raise UserError(f"scope must be 'down_proj' or 'all': got {scope!r}")
    ffn = ffn_out_modules(model, module)
    skip = {(id(ffn[s.layer]), s.row, s.col) for s in sws}
    cands = []
    for name, m in named:
        w = m.weight.detach()
        top = w.abs().flatten().topk(min(w.numel(), n + len(sws)))
        for v, flat in zip(top.values.tolist(), top.indices.tolist()):
            r, c = divmod(flat, w.shape[1])
            if (id(m), r, c) not in skip:
                cands.append((v, name, r, c, m))
    cands.sort(key=lambda e: -e[0])
    return [(m, name, r, c, float(m.weight[r, c].detach())) for _, name, r, c, m in cands[:n]]


@contextlib.contextmanager
def pruned_others(model: nn.Module, sws: list[SuperWeight], n: int, scope: str = "down_proj",
                  module: str = DEFAULT_MODULE):
    """Zero the n largest other weights (super weights kept); yields what was pruned."""
    others = largest_other_weights(model, sws, n, scope, module)
    with edited([(m, r, c) for m, _, r, c, _ in others]):
        with torch.no_grad():
            for m, _, r, c, _ in others:
                m.weight[r, c] = 0
        yield [(name, r, c, v) for _, name, r, c, v in others]


def single_weight_effects(model: nn.Module, sws: list[SuperWeight], measure: Callable[[], float],
                          module: str = DEFAULT_MODULE, factor: float = VERIFY_FACTOR,
                          min_increase: float = VERIFY_MIN_INCREASE) -> dict:
    """Tell a super weight from a large weight that does nothing: zero each weight alone and measure.

    measure() returns a loss (nats/token) of the model as it is. The control is the largest-|W| down_proj weight
    that is not a super weight (as large as a super weight, or larger, in a model with an inert outlier). A
    weight is "super weight" when its loss increase is at least `factor` times the control's and at least
    `min_increase` nats, else "inert". Returns {"base", "control", "weights"}: per weight its coordinate, value,
    loss increase and verdict.
    """
    base = measure()
    mods = ffn_out_modules(model, module)
    rows = []
    for s in sws:
        value = float(mods[s.layer].weight[s.row, s.col].detach())
        with zeroed(model, [s], module):
            rows.append({"coord": list(s.coord), "value": value, "loss_increase": measure() - base})
    others = largest_other_weights(model, sws, 1, "down_proj", module)
    control = None
    if others:
        m, name, r, c, v = others[0]
        with edited([(m, r, c)]):
            with torch.no_grad():
                m.weight[r, c] = 0
            control = {"name": name, "row": r, "col": c, "value": v, "loss_increase": measure() - base}
    ref = abs(control["loss_increase"]) if control else 0.0
    for row in rows:
        big = row["loss_increase"] >= max(min_increase, factor * ref)
        row["verdict"] = "super weight" if big else "inert"
    return {"base": base, "control": control, "weights": rows,
            "rule": f"super weight: loss increase >= max({min_increase:g} nats, {factor:g} x the control's)"}
