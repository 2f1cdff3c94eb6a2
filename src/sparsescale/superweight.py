"""Super weights (Yu et al. 2024): detection from one prompt, ablations, and the `sparsescale superweight` CLI.

Features
- `detect(model, tokenizer, prompt)` hooks every decoder layer's FFN output projection (`mlp.down_proj` for
  Llama/Mistral/OLMo/Qwen/Phi-3; another layout is one `module=` name away) and runs one prompt (BOS first).
  Per layer: the max-|.| output Y[t, j] (token t, hidden channel j) and the input channel k that feeds it most,
  k = argmax_k |X[t, k] W[j, k]| (the max-|.| input channel whenever one input dominates, as in the paper;
  this also finds siblings once the first weight of a row is zeroed). Candidate super weight: W[j, k].
- Stand-out rule. `relative` (default): a layer fires when BOTH its max |input| and max |output| are at least
  `threshold` (10) times the median of the same maxima over the other layers. Per-layer maxima of a model
  without super weights stay within a factor of ~2 of each other (random init: < 2.3 over 120 models), while
  a super weight makes its layer stand out by 10^2..10^4; a median over layers ignores the few spiking ones.
  `absolute`: the official code's rule, both maxima > `abs_threshold` (50), which misses e.g. SmolLM2-1.7B
  (input ~26). Under both rules the output spike must also stand out within its own token:
  |Y[t, j]| >= threshold x median_j' |Y[t, j']| ("concentration"). Without it, once a super weight is zeroed
  the still-huge input X[t, k] times the ordinary weights of column k would pass for new "super weights"
  (a column of Gaussian weights gives a concentration of ~4-6; a super weight, one outlier of its column,
  gives 10^1..10^2).
- Echo filter: a candidate in the last layer (nothing downstream for it to reach through the skip
  connections), in a layer seen echoing before, or whose output does not persist in the residual stream
  (|h[t, j]| after its layer < `persist` x |Y[t, j]|: it cancels a massive activation instead of creating
  one) is reported under `echoes`, not kept.
- The relative rule compares a layer with the median of the others: it needs fewer than half of the layers
  to spike (true of real models; a 3-layer toy with two spiking layers defeats it).
- Iterate: zero the weights found, run again, stop when no new candidate stands out (or `max_iter`); the
  weights are restored bit-exactly at the end, even on error. Siblings sharing a row or a column are listed.
- Q-Sparse models: hooks see the raw down_proj input (spikes reported on it); contributions use the effective
  input and weight (top-K sparsified, ternary if 1.58-bit), and `kept_by_topk` says whether top-K keeps the
  super activation's input X[t, k].
- `spike_profile`: per-layer max |input|, max |output| (the paper's Fig. 3), JSON {"layers": [...]}.
- Ablations, each a context manager that restores the model: `zeroed`, `scaled(factor)`,
  `restored_activation` (zeroed, but the hook writes back each super activation Y[:, t, j] exactly as the
  original weights would have produced it), `pruned_others(n)` (the n largest-|W| other weights, super weights
  kept: the paper's "7,000 outliers" control).
- Known coordinates of REFERENCE.md section 2 ship in `known_super_weights.json`; a detection on a listed model
  (matched by `_name_or_path` or --known) records matched / missed / extra coordinates.
- CLI: `sparsescale superweight detect|ablate|quantize|summarize|report` (quantize lives in `sparsescale.quantize`,
  summarize and report, across models, in `superweight_summary` / `superweight_report`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsescale import probes
from sparsescale.errors import UserError
from sparsescale.layout import DEFAULT_FFN_OUT, decoder_layers, ffn_out_modules

OFFICIAL_PROMPT = "Apple Inc. is a worldwide tech company."
DEFAULT_MODULE = DEFAULT_FFN_OUT
DEFAULT_THRESHOLD = 10.0
ABS_THRESHOLD = 50.0
PERSIST = 0.5
RULES = ("relative", "absolute")
KNOWN_PATH = Path(__file__).with_name("known_super_weights.json")


@dataclass
class SuperWeight:
    layer: int
    row: int  # j: output channel of the FFN output projection (hidden dim)
    col: int  # k: input channel (FFN intermediate dim)
    value: float  # W[j, k]
    input_spike: float  # X[t, k], raw down_proj input
    output_spike: float  # Y[t, j], down_proj output
    token_index: int  # t, position in the prompt (BOS = 0)
    iteration: int = 1
    input_ratio: float | None = None  # max |X| of the layer / median over the other layers
    output_ratio: float | None = None
    concentration: float | None = None  # |Y[t, j]| / median_j' |Y[t, j']|: the spike stands out in its own token
    col_is_max_input: bool | None = None  # k is the layer's max-|X| channel (the paper's rule)
    kept_by_topk: bool | None = None  # Q-Sparse: top-K keeps X[t, k] (None: dense model)

    @property
    def coord(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


# ---------------------------------------------------------------------------------------------------------
# modules and forward capture

def _effective_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the matmul sees: the top-K sparsified (quantized) input for a QSparseLinear, else x."""
    f = getattr(mod, "sparsify_input", None)
    return f(x) if f is not None else x


def _effective_weight(mod: nn.Module) -> torch.Tensor:
    s = getattr(mod, "settings", None)
    if s is not None and getattr(s, "weight_bits", "fp") == "1.58":
        from sparsescale.qsparse import quant_weight_ternary

        return quant_weight_ternary(mod.weight.detach())
    return mod.weight.detach()


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _capture(model: nn.Module, ids: list[int], mods: list[nn.Module]):
    """One forward: per layer X (T, F) down_proj input, Y (T, D) its output, H (T, D) the layer's output."""
    n = len(mods)
    xs, ys, hs = [None] * n, [None] * n, [None] * n
    handles = []
    for i, (layer, mod) in enumerate(zip(decoder_layers(model), mods)):
        def io_hook(m, args, out, i=i):
            xs[i], ys[i] = args[0][0].detach().float(), _layer_output(out)[0].detach().float()

        def h_hook(m, args, out, i=i):
            hs[i] = _layer_output(out)[0].detach().float()

        handles += [mod.register_forward_hook(io_hook), layer.register_forward_hook(h_hook)]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=torch.tensor([ids], device=probes.model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return xs, ys, hs


def _argmax2d(a: torch.Tensor) -> tuple[int, int, float]:
    """(row, col, value) of the max-|.| element of a 2-D tensor."""
    flat = int(a.abs().argmax())
    r, c = divmod(flat, a.shape[1])
    return r, c, float(a[r, c])


def _profile(xs, ys) -> list[dict]:
    rows = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        tx, k, vx = _argmax2d(x)
        ty, j, vy = _argmax2d(y)
        rows.append({"layer": i, "max_abs_input": abs(vx), "max_abs_output": abs(vy), "input_channel": k,
                     "output_channel": j, "token_index": ty, "input_token_index": tx})
    return rows


def spike_profile(model: nn.Module, tokenizer, prompt: str = OFFICIAL_PROMPT, module: str = DEFAULT_MODULE) -> dict:
    """Per-layer max |down_proj input| and max |output| on one prompt (for a Fig. 3-style plot)."""
    mods = ffn_out_modules(model, module)
    xs, ys, _ = _capture(model, probes.encode(tokenizer, prompt), mods)
    return {"layers": _profile(xs, ys)}


# ---------------------------------------------------------------------------------------------------------
# detection

def _ratios(values: list[float]) -> list[float]:
    """value of each layer / median of the other layers' values."""
    out = []
    for i, v in enumerate(values):
        ref = statistics.median(values[:i] + values[i + 1 :])
        out.append(v / ref if ref > 0 else float("inf"))
    return out


@dataclass
class Detection:
    super_weights: list[SuperWeight]
    echoes: list[SuperWeight]
    iterations: list[dict]
    profile: dict
    token_ids: list[int]
    bos_prepended: bool
    settings: dict

    def to_json(self) -> dict:
        return {**self.settings, "token_ids": self.token_ids, "bos_prepended": self.bos_prepended,
                "super_weights": [dataclasses.asdict(s) for s in self.super_weights],
                "echoes": [dataclasses.asdict(s) for s in self.echoes], "siblings": siblings(self.super_weights),
                "iterations": self.iterations, "profile": self.profile}


def find_super_weights(model: nn.Module, tokenizer, prompt: str = OFFICIAL_PROMPT, max_iter: int = 10,
                       threshold: float = DEFAULT_THRESHOLD, rule: str = "relative",
                       abs_threshold: float = ABS_THRESHOLD, module: str = DEFAULT_MODULE,
                       persist: float = PERSIST) -> Detection:
    """Detect super weights iteratively (see the module docstring); the model is restored at the end."""
    if rule not in RULES:
        raise UserError(f"rule must be one of {RULES}: got {rule!r}")
    if not threshold > 1:
        raise UserError(f"threshold must be > 1 (times the median layer / the median output of the token): got {threshold}")
    if max_iter < 1:
        raise UserError(f"max_iter must be >= 1: got {max_iter}")
    mods = ffn_out_modules(model, module)
    n_layers = len(mods)
    if rule == "relative" and n_layers < 2:
        raise UserError("the relative rule compares layers and this model has one: use rule='absolute' (--rule absolute)")
    ids = probes.encode(tokenizer, prompt)
    found: list[SuperWeight] = []
    echoes: dict[tuple, SuperWeight] = {}
    echo_layers: set[int] = set()
    iterations, profile = [], None
    with contextlib.ExitStack() as stack:  # restores every weight zeroed below, even on error
        for it in range(1, max_iter + 1):
            xs, ys, hs = _capture(model, ids, mods)
            rows = _profile(xs, ys)
            profile = profile or {"layers": rows}
            in_max = [r["max_abs_input"] for r in rows]
            out_max = [r["max_abs_output"] for r in rows]
            if rule == "relative":
                in_r, out_r = _ratios(in_max), _ratios(out_max)
                fires = [a >= threshold and b >= threshold for a, b in zip(in_r, out_r)]
            else:
                in_r, out_r = [None] * n_layers, [None] * n_layers
                fires = [a > abs_threshold and b > abs_threshold for a, b in zip(in_max, out_max)]
            new, record = [], []
            for layer in (i for i in range(n_layers) if fires[i]):
                sw = _candidate(mods[layer], layer, xs[layer], ys[layer], rows[layer], it, in_r[layer], out_r[layer])
                if sw.coord in {s.coord for s in found}:
                    continue
                y = sw.output_spike
                persists = abs(float(hs[layer][sw.token_index, sw.row])) >= persist * abs(y)
                is_echo = layer == n_layers - 1 or layer in echo_layers or not persists
                status = "diffuse" if sw.concentration < threshold else "echo" if is_echo else "super_weight"
                record.append({**dataclasses.asdict(sw), "status": status})
                if status == "diffuse":
                    continue
                if is_echo:
                    echo_layers.add(layer)
                    echoes.setdefault(sw.coord, sw)
                else:
                    new.append(sw)
            iterations.append({"iteration": it, "candidates": record})
            if not new:
                break
            found.extend(new)
            stack.enter_context(zeroed(model, new, module))
    settings = {"prompt": prompt, "module": module, "rule": rule, "threshold": threshold,
                "abs_threshold": abs_threshold, "persist": persist, "max_iter": max_iter, "n_layers": n_layers,
                "tokens": [tokenizer.decode([i]) for i in ids]}
    return Detection(found, list(echoes.values()), iterations, profile, ids, probes.bos_added(tokenizer, prompt), settings)


@torch.no_grad()
def _candidate(mod, layer, x, y, row, it, in_ratio, out_ratio) -> SuperWeight:
    """The weight W[j, k] behind the layer's output spike Y[t, j]: k = argmax_k |X_eff[t, k] W_eff[j, k]|."""
    t, j = row["token_index"], row["output_channel"]
    w = mod.weight
    x_eff = _effective_input(mod, x.to(w.dtype)).float()  # (T, F)
    contrib = x_eff[t] * _effective_weight(mod)[j].float()  # (F,)
    k = int(contrib.abs().argmax())
    kept = bool(x_eff[t, k] != 0) if hasattr(mod, "sparsify_input") else None
    median = float(y[t].abs().median())
    conc = abs(float(y[t, j])) / median if median > 0 else float("inf")
    return SuperWeight(layer, j, k, float(w[j, k]), float(x[t, k]), float(y[t, j]), t, it, in_ratio, out_ratio,
                       conc, k == row["input_channel"] and t == row["input_token_index"], kept)


def detect(model: nn.Module, tokenizer, prompt: str = OFFICIAL_PROMPT, **kwargs) -> list[SuperWeight]:
    """The super weights of `model` (see `find_super_weights` for the options and the full record)."""
    return find_super_weights(model, tokenizer, prompt, **kwargs).super_weights


def siblings(sws: list[SuperWeight]) -> list[dict]:
    """Groups of super weights sharing a row or a column of one layer's matrix (ablate them together)."""
    out = []
    for shared, key in (("row", lambda s: (s.layer, s.row)), ("col", lambda s: (s.layer, s.col))):
        groups: dict[tuple, list] = {}
        for s in sws:
            groups.setdefault(key(s), []).append(list(s.coord))
        out += [{"layer": k[0], "shared": shared, "index": k[1], "members": m} for k, m in groups.items() if len(m) > 1]
    return out


# ---------------------------------------------------------------------------------------------------------
# ablations (context managers; the model is restored on exit)

@contextlib.contextmanager
def _edited(coords: list[tuple[nn.Module, int, int]]):
    """Save the weights at (module, row, col); restore them bit-exactly on exit."""
    saved = [(m, r, c, m.weight[r, c].detach().clone()) for m, r, c in coords]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, r, c, v in reversed(saved):
                m.weight[r, c] = v


@contextlib.contextmanager
def scaled(model: nn.Module, sws: list[SuperWeight], factor: float, module: str = DEFAULT_MODULE):
    """Multiply each super weight by `factor` (0 = pruned, 1 = original)."""
    mods = ffn_out_modules(model, module)
    with _edited([(mods[s.layer], s.row, s.col) for s in sws]):
        with torch.no_grad():
            for s in sws:
                mods[s.layer].weight[s.row, s.col] *= factor
        yield model


def zeroed(model: nn.Module, sws: list[SuperWeight], module: str = DEFAULT_MODULE):
    """Set the super weights to zero (the paper's "prune SW")."""
    return scaled(model, sws, 0.0, module)


@contextlib.contextmanager
def restored_activation(model: nn.Module, sws: list[SuperWeight], module: str = DEFAULT_MODULE):
    """Zero the super weights but write back each super activation Y[:, t, j] (t = token_index) as the
    original weights produce it on the current input: the paper's "prune SW, restore SA" ablation."""
    mods = ffn_out_modules(model, module)
    rows: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer, t, j) -> original effective weight row
    for s in sws:
        rows.setdefault((s.layer, s.token_index, s.row), _effective_weight(mods[s.layer])[s.row].clone())
    handles = []
    for (layer, t, j), w_row in rows.items():
        mod = mods[layer]
        bias = None if getattr(mod, "bias", None) is None else mod.bias[j].detach()

        def hook(m, args, out, t=t, j=j, w_row=w_row, bias=bias):
            if out.shape[-2] <= t:
                return out
            x_t = _effective_input(m, args[0])[..., t, :]  # (B, F)
            y = F.linear(x_t, w_row.to(x_t.dtype)[None], None if bias is None else bias[None])[..., 0]
            out = out.clone()
            out[..., t, j] = y.to(out.dtype)
            return out

        handles.append(mod.register_forward_hook(hook))
    try:
        with zeroed(model, sws, module):
            yield model
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
    with _edited([(m, r, c) for m, _, r, c, _ in others]):
        with torch.no_grad():
            for m, _, r, c, _ in others:
                m.weight[r, c] = 0
        yield [(name, r, c, v) for _, name, r, c, v in others]


# ---------------------------------------------------------------------------------------------------------
# known coordinates

def known_table() -> dict:
    return json.loads(KNOWN_PATH.read_text())


def known_entry(name: str | None) -> tuple[str, list[list[int]]] | None:
    """(hub id, coordinates) of a listed model matched by hub id, alias or the last part of a path."""
    if not name:
        return None
    key = str(name).rstrip("/").lower()
    base = key.rsplit("/", 1)[-1]
    for hub_id, entry in known_table()["models"].items():
        names = {hub_id.lower(), hub_id.lower().rsplit("/", 1)[-1], *(a.lower() for a in entry.get("aliases", []))}
        if key in names or base in names:
            return hub_id, entry["coordinates"]
    return None


def compare_known(detected: list[SuperWeight], hub_id: str, known: list[list[int]]) -> dict:
    got = {s.coord for s in detected}
    ref = {tuple(c) for c in known}
    return {"model": hub_id, "known": sorted(map(list, ref)), "matched": sorted(map(list, got & ref)),
            "missed": sorted(map(list, ref - got)), "extra": sorted(map(list, got - ref)), "agrees": got == ref}


def load_detection(path: str) -> list[SuperWeight]:
    """The super weights of a detect JSON (the `super_weights` list)."""
    try:
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(SuperWeight)}
        return [SuperWeight(**{k: v for k, v in s.items() if k in fields}) for s in data["super_weights"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read super weights from {path} ({type(err).__name__}: {err}): "
                        "give the JSON written by `sparsescale superweight detect`") from None


# ---------------------------------------------------------------------------------------------------------
# CLI (shared loading helpers are also used by `quantize.cli_quantize`)

def add_common_args(p: argparse.ArgumentParser, data_required: bool = False, eval_args: bool = True) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (save_pretrained) or a hub name")
    p.add_argument("--tokenizer", help="tokenizer path or hub name (default: the checkpoint's, else the dataset's)")
    p.add_argument("--data", required=data_required, help="prepared dataset directory (sparsescale prepare)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="load dtype (default: the checkpoint's own)")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--module", default=DEFAULT_MODULE, help="FFN output projection inside a decoder layer")
    if eval_args:
        p.add_argument("--val-tokens", type=int, default=16384, help="validation tokens for perplexity")
        p.add_argument("--seq-len", type=int, help="window length (default min(256, max positions))")
        p.add_argument("--batch-size", type=int, default=8)


def resolve_tokenizer(model_path: str, tokenizer: str | None = None, data: str | None = None):
    """--tokenizer, else the checkpoint directory's tokenizer, else the dataset's, else the hub name's."""
    from transformers import AutoTokenizer

    local = Path(model_path)
    has_own = local.is_dir() and any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = tokenizer or (model_path if has_own else None)
    if source is None and data is not None:
        from sparsescale.data import load_tokenizer

        return load_tokenizer(data)
    if source is None and not local.exists():
        source = model_path  # a hub name
    if source is None:
        raise UserError(f"no tokenizer for {model_path}: pass --tokenizer PATH or --data DATA_DIR (its dataset)")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load tokenizer {source!r} ({err}): pass --tokenizer PATH") from None


def load_model_and_tokenizer(a: argparse.Namespace):
    from sparsescale.model import load

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype if a.dtype == "auto" else getattr(torch, a.dtype)
    model = load(a.model, dtype=dtype, device=device).eval()
    ffn_out_modules(model, a.module)  # a clear error now rather than mid-run
    tok = resolve_tokenizer(a.model, a.tokenizer, a.data)
    if len(tok) > model.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} tokens, the model {model.config.vocab_size}: "
                        "pass --tokenizer with the model's own tokenizer")
    return model, tok


def default_seq_len(model) -> int:
    return int(min(256, getattr(model.config, "max_position_embeddings", 256) or 256))


def print_profile(det: Detection) -> None:
    marks = {s.layer: f"<- echo ({s.row}, {s.col})" for s in det.echoes}
    marks.update({s.layer: f"<- super weight ({s.row}, {s.col})" for s in det.super_weights})
    print(f"{'layer':>5} {'max|input|':>12} {'ch':>6} {'max|output|':>12} {'ch':>6} {'tok':>4}")
    for r in det.profile["layers"]:
        print(f"{r['layer']:>5} {r['max_abs_input']:>12.4g} {r['input_channel']:>6} {r['max_abs_output']:>12.4g} "
              f"{r['output_channel']:>6} {r['token_index']:>4}  {marks.get(r['layer'], '')}")


def _cli_detect(argv: list[str]) -> int:
    from sparsescale.io import versions, write_json

    p = argparse.ArgumentParser(prog="sparsescale superweight detect", description="Detect super weights from one prompt.")
    add_common_args(p, eval_args=False)
    p.add_argument("--prompt", default=OFFICIAL_PROMPT)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--rule", choices=RULES, default="relative")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="relative stand-out factor (default 10)")
    p.add_argument("--abs-threshold", type=float, default=ABS_THRESHOLD, help="absolute rule: |value| > this (default 50)")
    p.add_argument("--max-iter", type=int, default=10)
    p.add_argument("--persist", type=float, default=PERSIST, help="echo filter: fraction that must persist (0.5)")
    p.add_argument("--known", help="compare with the listed coordinates of this model (hub id or alias)")
    a = p.parse_args(argv)
    known = known_entry(a.known)
    if a.known and known is None:
        raise UserError(f"--known {a.known!r} is not in {KNOWN_PATH.name}: choose one of {', '.join(known_table()['models'])}")
    model, tok = load_model_and_tokenizer(a)
    det = find_super_weights(model, tok, a.prompt, a.max_iter, a.threshold, a.rule, a.abs_threshold, a.module, a.persist)
    known = known or known_entry(getattr(model.config, "_name_or_path", None)) or known_entry(a.model)
    comparison = compare_known(det.super_weights, *known) if known else None
    print_profile(det)
    print(f"super weights: {[s.coord for s in det.super_weights] or 'none found'}"
          + (f"; echoes: {[s.coord for s in det.echoes]}" if det.echoes else ""))
    if comparison:
        print(f"known ({comparison['model']}): matched {comparison['matched']}, missed {comparison['missed']}, "
              f"extra {comparison['extra']}")
    write_json(a.out, {"model": a.model, "name_or_path": getattr(model.config, "_name_or_path", None),
                       "dtype": str(next(model.parameters()).dtype), "qsparse": getattr(model.config, "qsparse", None),
                       **det.to_json(), "known": comparison, "versions": versions()})
    print(f"wrote {a.out}")
    return 0


def _cli_ablate(argv: list[str]) -> int:
    from sparsescale.io import versions, write_json

    p = argparse.ArgumentParser(prog="sparsescale superweight ablate",
                                description="Probes with the super weights zeroed / restored / scaled, and the control.")
    add_common_args(p, data_required=True)
    p.add_argument("--detect", required=True, help="detect JSON")
    p.add_argument("--out", required=True, help="directory: writes ablation.json and scale.json")
    p.add_argument("--prompts", type=int, default=200, help="last-word prompts from validation paragraphs")
    p.add_argument("--scales", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3])
    p.add_argument("--n-others", type=int, nargs="+", help="sizes of the prune-other-weights control "
                   "(default: the number of super weights, and 7000 as in the paper)")
    p.add_argument("--others-scope", choices=("down_proj", "all"), default="down_proj")
    a = p.parse_args(argv)
    sws = load_detection(a.detect)
    model, tok = load_model_and_tokenizer(a)
    seq_len = a.seq_len or default_seq_len(model)
    data = probes.eval_data(tok, a.data, a.val_tokens)
    prompts = probes.last_word_prompts(tok, data["val_texts"], a.prompts, max_context_tokens=seq_len)

    def measure(name, **extra):
        res = {"condition": name, **extra, **probes.run_probes(model, tok, data["val"], prompts, seq_len,
                                                                 a.val_tokens, a.batch_size)}
        print(f"{name:<40} loss {res['val']['loss']:.4f}  ppl {res['val']['ppl']:10.3f}  "
              f"last-word {res['last_word_accuracy']:.3f}  top: {res['top_tokens'][0]['token']!r}")
        return res

    conditions, points = [measure("original")], []
    if sws:
        with zeroed(model, sws, a.module):
            conditions.append(measure("zero_super_weights"))
        with restored_activation(model, sws, a.module):
            conditions.append(measure("zero_super_weights_restore_activation"))
        for n in a.n_others or [len(sws), 7000]:
            with pruned_others(model, sws, n, a.others_scope, a.module) as pruned:
                conditions.append(measure(f"prune_{n}_other_weights", n=n, scope=a.others_scope,
                                          min_abs_pruned=min((abs(v) for *_, v in pruned), default=None)))
        for f in a.scales:
            with scaled(model, sws, f, a.module):
                points.append(measure(f"scale_{f:g}", factor=f))
    orig = conditions[0]
    for c in conditions:
        c["stopword_ratio"] = {w: (p / orig["stopword_prob"][w] if orig["stopword_prob"][w] > 0 else None)
                               for w, p in c["stopword_prob"].items()}
    summary = {}
    if sws:
        lo, zero, rest = (conditions[i]["val"]["loss"] for i in range(3))
        summary["restore_recovered_fraction"] = (zero - rest) / (zero - lo) if zero != lo else None
    note = None if sws else "no super weight detected: nothing to ablate (only the original model is measured)"
    common = {"model": a.model, "detect": a.detect, "super_weights": [dataclasses.asdict(s) for s in sws],
              "siblings": siblings(sws), "settings": {"seq_len": seq_len, "val_tokens": a.val_tokens,
              "n_prompts": len(prompts), "same_tokenizer": data["same_tokenizer"], "module": a.module},
              "note": note, "versions": versions()}
    out = Path(a.out)
    write_json(out / "ablation.json", {**common, "conditions": conditions, "summary": summary})
    write_json(out / "scale.json", {**common, "factors": a.scales if sws else [], "points": points})
    print(f"wrote {out / 'ablation.json'} and {out / 'scale.json'}")
    return 0


SUBCOMMANDS = {"detect": _cli_detect, "ablate": _cli_ablate}


def cli_superweight(argv: list[str]) -> int:
    usage = ("usage: sparsescale superweight {detect,ablate,quantize,summarize,report} [ARGS...]  "
             "(--help after one for its options)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] == "quantize":
        from sparsescale.quantize import cli_quantize

        return cli_quantize(argv[1:])
    if argv[0] == "summarize":  # across models
        from sparsescale.superweight_summary import cli_summarize

        return cli_summarize(argv[1:])
    if argv[0] == "report":
        from sparsescale.superweight_report import cli_report

        return cli_report(argv[1:])
    if argv[0] not in SUBCOMMANDS:
        raise UserError(f"unknown superweight subcommand {argv[0]!r}: choose detect, ablate, quantize, summarize or report")
    return SUBCOMMANDS[argv[0]](argv[1:])
