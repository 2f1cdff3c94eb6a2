"""Super weights (Yu et al. 2024): detection from one prompt, the spike statistic, known coordinates.

Features
- `find_super_weights(model, tokenizer, prompt)` hooks every decoder layer's FFN output projection
  (`mlp.down_proj` for Llama/Mistral/OLMo/Qwen/Phi-3; another layout is one `module=` name away) and runs one
  prompt (BOS first). Per layer: the max-|.| output Y[t, j] (token t, hidden channel j) and the input channel k
  that feeds it most, k = argmax_k |X[t, k] W[j, k]| (the max-|.| input channel whenever one input dominates, as
  in the paper; this also finds siblings once the first weight of a row is zeroed). Candidate: W[j, k].
- Stand-out rule. `relative` (default): a layer fires when BOTH its max |input| and max |output| are at least
  `threshold` (10) times the median of the same maxima over the other layers (`layer_ratios`). Per-layer maxima
  of a model without super weights stay within a factor of ~2 of each other (random init: < 2.3 over 120
  models), while a super weight makes its layer stand out by 10^2..10^4; a median over layers ignores the few
  spiking ones. `absolute`: the official code's rule, both maxima > `abs_threshold` (50), which misses e.g.
  SmolLM2-1.7B (input ~26). Under both rules the output spike must also stand out within its own token:
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
  weights are restored bit-exactly at the end, even on error (`edited`). Siblings sharing a row or a column
  are listed.
- Q-Sparse models: hooks see the raw down_proj input (spikes reported on it); contributions use the effective
  input and weight (`effective_input`, `effective_weight`: top-K sparsified, ternary if 1.58-bit), and
  `kept_by_topk` says whether top-K keeps the super activation's input X[t, k].
- Both decisions are pure functions of published-style numbers: `layer_rule(in_max, out_max)` (which layers
  fire, from per-layer maxima alone) and `is_echo(layer, n_layers, output_spike, residual_after)` (the echo
  filter); `find_super_weights` calls them, and tests/test_published_activations.py runs them on Llama-7B's
  maxima as the authors' notebook prints them.
- `spike_profile`: per-layer max |input|, max |output| (the paper's Fig. 3), JSON {"layers": [...]}.
  `spike_stats(model, input_ids)`: the detector's statistic (largest input / output ratio and its layer) in
  one forward pass without gradients, cheap enough for every evaluation of a training run.
- Known coordinates of published models ship in `known_super_weights.json`, each weight with its sources (the
  paper's Table 2, the authors' code map) and a status (agreed, paper_only, code_only, disputed, unverified);
  `compare_known` scores a detection by source: matched / missed / extra, disputed weights apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsescale.errors import UserError
from sparsescale.layout import DEFAULT_FFN_OUT, decoder_layers, ffn_out_modules
from sparsescale.qsparse import effective_weight
from sparsescale.superweight import probes

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

def effective_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the matmul sees: the top-K sparsified (quantized) input for a QSparseLinear, else x."""
    f = getattr(mod, "sparsify_input", None)
    return f(x) if f is not None else x


@contextlib.contextmanager
def edited(coords: list[tuple[nn.Module, int, int]]):
    """Save the weights at (module, row, col); restore them bit-exactly on exit (detection and ablations)."""
    saved = [(m, r, c, m.weight[r, c].detach().clone()) for m, r, c in coords]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, r, c, v in reversed(saved):
                m.weight[r, c] = v


def super_positions(y: torch.Tensor) -> torch.Tensor:
    """Per sequence, the position of the super activation: argmax_t |y[b, t]| of one channel, (B, T) -> (B,).

    The paper's code finds it per sequence in the unmodified model; it is where BOS sits (the first token of
    a prompt, anywhere in a window cut from a stream)."""
    return y.abs().argmax(dim=-1)


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


@torch.no_grad()
def spike_stats(model: nn.Module, input_ids, module: str = DEFAULT_MODULE) -> dict:
    """The detector's statistic in one forward pass without gradients (cheap enough for every evaluation).

    input_ids: (B, T) or (T,) token ids (a list is accepted). Per layer, the max |down_proj input| and max
    |output| over every sequence and position, each divided by the median of the same maxima over the other
    layers (`layer_ratios`). Returns {"spike_in_ratio": the largest input ratio, "spike_out_ratio": the largest
    output ratio, "spike_layer": the layer where min(input ratio, output ratio) is largest: the one that comes
    closest to firing the detection, which needs both ratios >= threshold in one layer}. NaN / -1 with fewer
    than two layers. A DDP wrapper (`.module`) is looked through for the layers; the forward is the model's own.
    """
    inner = getattr(model, "module", model)
    mods = ffn_out_modules(inner, module)
    maxima = [[0.0, 0.0] for _ in mods]  # per layer: max |X|, max |Y|

    def hook(m, args, out, i):
        maxima[i][0] = float(args[0].detach().abs().amax())
        maxima[i][1] = float(_layer_output(out).detach().abs().amax())

    handles = [m.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i)) for i, m in enumerate(mods)]
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=probes.model_device(inner))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids.reshape(-1, ids.shape[-1]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if len(mods) < 2:
        return {"spike_in_ratio": float("nan"), "spike_out_ratio": float("nan"), "spike_layer": -1}
    r_in, r_out = layer_ratios([m[0] for m in maxima]), layer_ratios([m[1] for m in maxima])
    both = [min(a, b) for a, b in zip(r_in, r_out)]
    return {"spike_in_ratio": max(r_in), "spike_out_ratio": max(r_out),
            "spike_layer": max(range(len(both)), key=both.__getitem__)}


# ---------------------------------------------------------------------------------------------------------
# detection

def layer_ratios(values: list[float]) -> list[float]:
    """value of each layer / median of the other layers' values."""
    out = []
    for i, v in enumerate(values):
        ref = statistics.median(values[:i] + values[i + 1 :])
        out.append(v / ref if ref > 0 else float("inf"))
    return out


def layer_rule(in_max: list[float], out_max: list[float], rule: str = "relative",
               threshold: float = DEFAULT_THRESHOLD, abs_threshold: float = ABS_THRESHOLD):
    """Which layers stand out, from per-layer maxima alone (the stand-out rule of the module docstring).

    in_max, out_max: per layer (0-based, in order), the max |down_proj input| and max |output|; the absolute
    value is taken, so the signed element of largest magnitude (what the authors' code prints) works too.
    Returns (fires, in_ratios, out_ratios): fires[i] when layer i fires; the ratios are `layer_ratios` under
    the relative rule (both >= threshold to fire) and None under the absolute one (both > abs_threshold).
    """
    if rule not in RULES:
        raise UserError(f"rule must be one of {RULES}: got {rule!r}")
    if len(in_max) != len(out_max):
        raise UserError(f"one input maximum and one output maximum per layer: got {len(in_max)} and {len(out_max)}")
    a, b = [abs(float(v)) for v in in_max], [abs(float(v)) for v in out_max]
    if rule == "relative":
        in_r, out_r = layer_ratios(a), layer_ratios(b)
        return [x >= threshold and y >= threshold for x, y in zip(in_r, out_r)], in_r, out_r
    return [x > abs_threshold and y > abs_threshold for x, y in zip(a, b)], [None] * len(a), [None] * len(a)


def is_echo(layer: int, n_layers: int, output_spike: float, residual_after: float, persist: float = PERSIST,
            echo_layers=()) -> bool:
    """The echo filter: is a candidate of `layer` whose output spike is Y[t, j] = output_spike an echo?

    True in the last layer (nothing downstream for it to reach through the skip connections), in a layer seen
    echoing before (`echo_layers`), or when the spike does not persist in the residual stream:
    |residual_after| < persist x |Y[t, j]|, residual_after being h[t, j], the layer's output at the same token
    and channel (it cancels a massive activation instead of creating one). Any upper bound on |h[t, j]|, such
    as the max |.| of the layer's output, proves an echo whenever it is below the bar.
    """
    persists = abs(float(residual_after)) >= persist * abs(float(output_spike))
    return layer == n_layers - 1 or layer in echo_layers or not persists


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
            fires, in_r, out_r = layer_rule(in_max, out_max, rule, threshold, abs_threshold)
            new, record = [], []
            for layer in (i for i in range(n_layers) if fires[i]):
                sw = _candidate(mods[layer], layer, xs[layer], ys[layer], rows[layer], it, in_r[layer], out_r[layer])
                if sw.coord in {s.coord for s in found}:
                    continue
                echo = is_echo(layer, n_layers, sw.output_spike, float(hs[layer][sw.token_index, sw.row]), persist,
                               echo_layers)
                status = "diffuse" if sw.concentration < threshold else "echo" if echo else "super_weight"
                record.append({**dataclasses.asdict(sw), "status": status})
                if status == "diffuse":
                    continue
                if echo:
                    echo_layers.add(layer)
                    echoes.setdefault(sw.coord, sw)
                else:
                    new.append(sw)
            iterations.append({"iteration": it, "candidates": record})
            if not new:
                break
            found.extend(new)
            stack.enter_context(edited([(mods[s.layer], s.row, s.col) for s in new]))
            with torch.no_grad():
                for s in new:
                    mods[s.layer].weight[s.row, s.col] = 0
    settings = {"prompt": prompt, "module": module, "rule": rule, "threshold": threshold,
                "abs_threshold": abs_threshold, "persist": persist, "max_iter": max_iter, "n_layers": n_layers,
                "tokens": [tokenizer.decode([i]) for i in ids]}
    return Detection(found, list(echoes.values()), iterations, profile, ids, probes.bos_added(tokenizer, prompt), settings)


@torch.no_grad()
def _candidate(mod, layer, x, y, row, it, in_ratio, out_ratio) -> SuperWeight:
    """The weight W[j, k] behind the layer's output spike Y[t, j]: k = argmax_k |X_eff[t, k] W_eff[j, k]|."""
    t, j = row["token_index"], row["output_channel"]
    w = mod.weight
    x_eff = effective_input(mod, x.to(w.dtype)).float()  # (T, F)
    contrib = x_eff[t] * effective_weight(mod)[j].float()  # (F,)
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
# known coordinates

KNOWN_STATUSES = ("agreed", "paper_only", "code_only", "disputed", "unverified")
FIRM = ("agreed", "paper_only", "code_only")  # published by a source and not contested


def known_table() -> dict:
    return json.loads(KNOWN_PATH.read_text())


def known_entry(name: str | None) -> tuple[str, dict] | None:
    """(hub id, entry) of a listed model matched by hub id, alias or the last part of a path; the entry's
    "weights" give each published coordinate with its sources and status."""
    if not name:
        return None
    key = str(name).rstrip("/").lower()
    base = key.rsplit("/", 1)[-1]
    for hub_id, entry in known_table()["models"].items():
        names = {hub_id.lower(), hub_id.lower().rsplit("/", 1)[-1], *(a.lower() for a in entry.get("aliases", []))}
        if key in names or base in names:
            return hub_id, entry
    return None


def compare_known(detected: list[SuperWeight], hub_id: str, entry: dict) -> dict:
    """Score the detection against each published weight, by its source.

    matched / extra: detected coordinates that some source publishes / that none does; missed: firm weights
    (agreed, paper_only, code_only) not detected (a disputed or unverified weight is never "missed");
    by_source: matched and missed per source; agrees: every firm weight found and nothing extra.
    """
    got = {s.coord for s in detected}
    weights = [{**w, "coord": list(w["coord"]), "detected": tuple(w["coord"]) in got} for w in entry["weights"]]
    published = {tuple(w["coord"]) for w in weights}
    firm = {tuple(w["coord"]) for w in weights if w["status"] in FIRM}
    by_source: dict[str, dict] = {}
    for w in weights:
        for src in w["sources"]:
            rec = by_source.setdefault(src, {"matched": [], "missed": []})
            rec["matched" if w["detected"] else "missed"].append(w["coord"])
    return {"model": hub_id, "weights": weights, "known": sorted(map(list, firm)),
            "matched": sorted(map(list, got & published)), "missed": sorted(map(list, firm - got)),
            "extra": sorted(map(list, got - published)), "by_source": by_source,
            "disputed": [w for w in weights if w["status"] not in FIRM],
            "agrees": firm <= got and not got - published}


def load_detection(path: str) -> list[SuperWeight]:
    """The super weights of a detect JSON (the `super_weights` list)."""
    try:
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(SuperWeight)}
        return [SuperWeight(**{k: v for k, v in s.items() if k in fields}) for s in data["super_weights"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read super weights from {path} ({type(err).__name__}: {err}): "
                        "give the JSON written by `sparsescale superweight detect`") from None

