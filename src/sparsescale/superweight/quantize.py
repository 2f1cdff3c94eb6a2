"""Super-outlier-aware quantization (Yu et al. 2024, section 5): weights by blocks, activations W8A8-style.

Features
- `rtn_rows(x, bits)`: asymmetric round-to-nearest per row, `step = (max - min) / (2^b - 1)`,
  `q = round((x - min) / step)`, `x_hat = q step + min`; every element within step/2 of its value
  (a constant row is reproduced exactly).
- `quantize_tensor(w, bits, block, z, keep)`: granularity `block` = an int (contiguous blocks of that many
  elements of the row-major flattened weight), "channel" (one block per output row) or "tensor".
  When the block does not divide the tensor, the last block is short (the remaining elements, quantized on
  their own min/max and statistics: the same as padding it with copies of its own values) and this is counted
  in the returned stats (`n_short_blocks`; `n_whole_tensor` counts tensors no larger than one block, which
  then get per-tensor quantization); `partial="refuse"` raises instead. Never another granularity silently.
- z-score clipping per block at `z std(|W|) + mean(|W|)` (population std) before quantization; `keep`
  coordinates (the super weights) are written back in full precision after dequantization. z = None means
  no clipping; the default grid includes it, so tuning can never pick a clip worse than none on calibration.
- `quantized(model, ...)`: every nn.Linear inside the decoder layers quantized/dequantized in place (not the
  embeddings, norms or LM head), restored on exit. z of the super-weight-aware method is picked from a grid
  for the minimum reconstruction error (mean squared error of the logits against the unquantized model) on a
  calibration stream from the TRAIN split; perplexity is measured on the validation split.
- `fake_quant_activations(model, bits, "tensor"|"token", super_activations)`: the input of every decoder
  linear quantized/dequantized (asymmetric RTN, per tensor or per token); at each super activation (the
  down_proj input X[b, t, k] of a super weight's layer, t found per sequence where |X[b, :, k]| is largest)
  the value is replaced by the median before quantization (so it does not set the range) and restored in
  full precision after.
- `sweep(...)`: plain RTN vs super-weight-aware over bits x block sizes (the paper's Fig. 7 in miniature),
  plus W8A8 naive vs super-activation-aware; `sparsescale superweight quantize` (in `superweight.cli`) runs it on a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from sparsescale.data import val_batches
from sparsescale.errors import UserError
from sparsescale.layout import DEFAULT_FFN_OUT, decoder_layers, ffn_out_modules
from sparsescale.superweight import probes
from sparsescale.superweight.detect import super_positions

GRANULARITIES = ("tensor", "channel")
DEFAULT_BLOCKS = ("64", "256", "1024", "4096", "16384")
DEFAULT_Z_GRID = (None, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # None: no clipping (z = infinity)
METHODS = ("rtn", "clip", "sw_aware")  # plain; z-clip only; z-clip + super weights restored (the paper's)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise UserError(f"bits must be an integer in 2..8: got {bits!r}")
    return int(bits)


def check_block(block) -> int | str:
    """An int > 0 (elements per block), "channel" or "tensor"; numeric strings are accepted (CLI)."""
    if isinstance(block, str) and block not in GRANULARITIES:
        try:
            block = int(block)
        except ValueError:
            raise UserError(f"block must be a positive integer, 'channel' or 'tensor': got {block!r}") from None
    if isinstance(block, str):
        return block
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise UserError(f"block size must be a positive integer (elements per block), 'channel' or 'tensor': got {block!r}")
    return int(block)


# ---------------------------------------------------------------------------------------------------------
# pure math on (n_blocks, block) float32 tensors

def rtn_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric RTN of each row of x (n, m): (x_hat (n, m), step (n, 1))."""
    levels = 2**bits - 1
    lo = x.amin(dim=1, keepdim=True)
    step = (x.amax(dim=1, keepdim=True) - lo) / levels  # (n, 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = ((x - lo) / safe).round().clamp(0, levels)
    return torch.where(step > 0, q * safe + lo, lo.expand_as(x)), step


def zclip_rows(x: torch.Tensor, z: float) -> torch.Tensor:
    """Clip each row to +-(z std(|x|) + mean(|x|)) (row statistics, population std)."""
    a = x.abs()
    thr = z * a.std(dim=1, unbiased=False, keepdim=True) + a.mean(dim=1, keepdim=True)
    return torch.maximum(torch.minimum(x, thr), -thr)


def _quantize_rows(x: torch.Tensor, bits: int, z: float | None) -> torch.Tensor:
    return rtn_rows(x if z is None else zclip_rows(x, z), bits)[0]


def quantize_tensor(w: torch.Tensor, bits: int, block: int | str = "tensor", z: float | None = None,
                    keep=(), partial: str = "short") -> tuple[torch.Tensor, dict]:
    """Quantize/dequantize a 2-D weight; returns (w_hat in w's dtype, stats). See the module docstring."""
    bits, block = check_bits(bits), check_block(block)
    if partial not in ("short", "refuse"):
        raise UserError(f"partial must be 'short' or 'refuse': got {partial!r}")
    if w.ndim != 2:
        raise UserError(f"quantize_tensor expects a 2-D weight: got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    numel = w32.numel()
    size = {"tensor": numel, "channel": w32.shape[1]}.get(block, block)
    n_full, rest = divmod(numel, size)
    if rest and partial == "refuse":
        raise UserError(f"block size {size} does not divide the {tuple(w.shape)} weight ({numel} elements): choose a "
                        "divisor, or allow a short last block (partial='short', --partial short)")
    flat = w32.reshape(-1)
    parts = []
    if n_full:
        parts.append(_quantize_rows(flat[: n_full * size].view(n_full, size), bits, z).reshape(-1))
    if rest:
        parts.append(_quantize_rows(flat[n_full * size :].view(1, rest), bits, z).reshape(-1))
    w_hat = torch.cat(parts).view_as(w32)
    for r, c in keep:  # super weights back in full precision
        w_hat[r, c] = w32[r, c]
    stats = {"n_blocks": n_full + (1 if rest else 0), "n_short_blocks": int(rest > 0), "n_whole_tensor": int(size >= numel),
             "n_restored": len(keep)}
    return w_hat.to(w.dtype), stats


# ---------------------------------------------------------------------------------------------------------
# whole models

def linear_targets(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer, name, module) of every nn.Linear inside the decoder layers (no embeddings, norms, LM head)."""
    return [(i, name, m) for i, layer in enumerate(decoder_layers(model))
            for name, m in layer.named_modules() if isinstance(m, nn.Linear)]


@contextlib.contextmanager
def quantized(model: nn.Module, bits: int, block: int | str, z: float | None = None, super_weights=(),
              partial: str = "short", module: str | None = None):
    """Quantize every decoder linear in place (super weights kept in full precision); restore on exit.

    Yields stats: tensors, blocks, short blocks, whole-tensor blocks, restored super weights, and the weight
    mean squared error over all quantized weights.
    """
    keep = defaultdict(list)
    if super_weights:
        mods = ffn_out_modules(model, module or DEFAULT_FFN_OUT)
        for s in super_weights:
            keep[id(mods[s.layer])].append((s.row, s.col))
    saved = []
    stats = defaultdict(float)
    try:
        with torch.no_grad():
            for _, _, m in linear_targets(model):
                w_hat, st = quantize_tensor(m.weight, bits, block, z, keep.get(id(m), ()), partial)
                saved.append((m, m.weight.detach().clone()))
                stats["weight_sq_err"] += float(((w_hat.float() - m.weight.float()) ** 2).sum())
                stats["n_weights"] += m.weight.numel()
                m.weight.copy_(w_hat)
                stats["n_tensors"] += 1
                for k, v in st.items():
                    stats[k] += v
        out = {k: int(v) for k, v in stats.items() if k != "weight_sq_err"}
        out["weight_mse"] = stats["weight_sq_err"] / max(stats["n_weights"], 1)
        yield out
    finally:
        with torch.no_grad():
            for m, w in saved:
                m.weight.copy_(w)


@contextlib.contextmanager
def fake_quant_activations(model: nn.Module, bits: int = 8, granularity: str = "tensor", super_activations=(),
                           module: str | None = None):
    """Quantize/dequantize the input of every decoder linear (asymmetric RTN per tensor or per token).

    super_activations: (layer, k) channels of the FFN output projection's input; in each sequence b the super
    activation X[b, t, k] at t = argmax_t |X[b, t, k]| (`super_positions`: where that sequence's BOS is) is
    replaced by the median (of the tensor, or of that token) before quantization and restored after.
    """
    bits = check_bits(bits)
    if granularity not in ("tensor", "token"):
        raise UserError(f"activation granularity must be 'tensor' or 'token': got {granularity!r}")
    special = defaultdict(list)
    if super_activations:
        mods = ffn_out_modules(model, module or DEFAULT_FFN_OUT)
        for layer, k in super_activations:
            special[id(mods[layer])].append(k)

    def hook(m, args):
        x = args[0]  # (B, T, F)
        x32 = x.detach().float().clone()
        x3 = x32.view(-1, *x32.shape[-2:])  # (B, T, F), shares x32's storage
        b = torch.arange(x3.shape[0], device=x3.device)
        spots = [(super_positions(x3[..., k]), k) for k in special.get(id(m), ())]  # ((B,), k)
        kept = [x3[b, t, k].clone() for t, k in spots]
        median = x3.median() if granularity == "tensor" else None  # what sets the range: the tensor, or the token
        for t, k in spots:
            x3[b, t, k] = median if median is not None else x3[b, t, :].median(dim=-1).values
        rows = x32.reshape(1, -1) if granularity == "tensor" else x32.reshape(-1, x32.shape[-1])
        xq = rtn_rows(rows, bits)[0].view_as(x3)
        for (t, k), v in zip(spots, kept):
            xq[b, t, k] = v
        return (xq.view_as(x).to(x.dtype), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for _, _, m in linear_targets(model)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------
# sweep

@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    return [probes.logits_of(model, x) for x, _ in batches]


def calibration_error(model, calib_batches, reference: list[torch.Tensor]) -> float:
    """Mean squared error of the logits against the unquantized model's on the calibration batches."""
    got = _logits(model, calib_batches)
    return float(sum(((a - b) ** 2).sum() for a, b in zip(got, reference)) / sum(r.numel() for r in reference))


def best_z(model, bits, block, z_grid, super_weights, calib_batches, reference, partial="short", module=None):
    """(z, {z: calibration error}) minimizing the calibration reconstruction error."""
    errors = {}
    for z in z_grid:
        with quantized(model, bits, block, z, super_weights, partial, module):
            errors[z] = calibration_error(model, calib_batches, reference)
    return min(errors, key=errors.get), errors


def sweep(model: nn.Module, eval_tokens, calib_tokens, super_weights=(), bits=(3, 4), blocks=DEFAULT_BLOCKS,
          z_grid=DEFAULT_Z_GRID, methods=("rtn", "sw_aware"), seq_len: int = 256, n_eval: int = 16384,
          n_calib: int = 4096, batch_size: int = 8, act_bits: int | None = 8, act_granularities=("tensor", "token"),
          partial: str = "short", module: str | None = None, log=print) -> dict:
    """Perplexity per (bits, block, method) point, and W8A8 naive vs super-activation-aware."""
    bits = [check_bits(b) for b in bits]
    blocks = [check_block(b) for b in blocks]
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown quantization method {m!r}: choose from {', '.join(METHODS)}")
    calib = list(val_batches(np.asarray(calib_tokens), n_calib, seq_len, batch_size))
    reference = _logits(model, calib)

    def ppl():
        return probes.perplexity(model, eval_tokens, seq_len, n_eval, batch_size)

    base = ppl()
    log(f"unquantized: ppl {base['ppl']:.3f}")
    points = []
    for b in bits:
        for blk in blocks:
            for method in methods:
                keep = super_weights if method == "sw_aware" else ()
                z, errors = (None, None) if method == "rtn" else best_z(model, b, blk, z_grid, keep, calib, reference,
                                                                         partial, module)
                with quantized(model, b, blk, z, keep, partial, module) as stats:
                    res = ppl()
                    calib_err = calibration_error(model, calib, reference)
                points.append({"bits": b, "block": blk, "method": method, "z": z, "calib_mse": calib_err,
                               "z_errors": None if errors is None else [[k, v] for k, v in errors.items()],
                               **res, "quant": stats})
                log(f"W{b} block {blk:>6} {method:>8}: ppl {res['ppl']:.3f} (z={z})")
    act_points = []
    if act_bits:
        sas = sorted({(s.layer, s.col) for s in super_weights})  # positions found per sequence
        for gran in act_granularities:
            for aware in (False, True):
                with quantized(model, 8, "channel", module=module), \
                        fake_quant_activations(model, act_bits, gran, sas if aware else (), module):
                    res = ppl()
                method = "sa_aware" if aware else "naive"
                act_points.append({"weight_bits": 8, "weight_block": "channel", "act_bits": act_bits,
                                   "act_granularity": gran, "method": method, "n_super_activations": len(sas) if aware else 0,
                                   **res})
                log(f"W8A{act_bits} per-{gran} {method:>8}: ppl {res['ppl']:.3f}")
    return {"baseline": base, "points": points, "act_points": act_points,
            "settings": {"bits": bits, "blocks": blocks, "z_grid": list(z_grid), "methods": list(methods),
                         "seq_len": seq_len, "n_eval_tokens": n_eval, "n_calib_tokens": n_calib, "partial": partial,
                         "calibration": "train split, first n_calib tokens; z minimizes the logits MSE",
                         "evaluation": "validation split, first n_eval tokens", "act_bits": act_bits}}


def z_value(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        z = float(text)
    except ValueError:
        z = float("nan")
    if not (z > 0 and math.isfinite(z)):
        raise UserError(f"--z-grid values must be positive numbers or 'none': got {text!r}")
    return z
