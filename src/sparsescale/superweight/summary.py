"""Super weights across models: the summary table of "do Q-Sparse and ternary models develop super weights,
and does top-K keep them?", one row per detect JSON (made only from those files).

Features
- `summary_row(detect, name)`: one row per detect JSON, "none found" rows included: precision, S, N (from the
  run's final.json next to the checkpoint when there is one, else the checkpoint's `qsparse` entry; N is empty
  for a checkpoint outside the sweep), number of super weights and their coordinates, the strongest spike,
  whether top-K keeps each super activation's input, echoes, and the agreement with the known coordinates.
- Strongest spike: per layer (of the unedited model, the detection's first pass) the max |down_proj input| and
  max |output| each divided by the median of the same maxima over the other layers; a layer fires when BOTH
  reach the detection threshold, so `max_spike_ratio` = max over layers of min(input ratio, output ratio) is the
  number to compare with `threshold` (it says how close a model with none found came).
- `read_summary(path)`: the CSV back, precision kept as text ("1.58"), for the tables of `superweight.report`.
- `sparsescale superweight summarize --detect A/detect.json ... --out summary.csv` (in `superweight.cli`; a
  model is named by its detect file's folder, --names overrides). Figures and tables: `superweight report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from sparsescale.errors import UserError
from sparsescale.superweight.detect import layer_ratios

SUMMARY_COLUMNS = (
    "model", "source", "size", "precision", "sparsity", "n_params", "n_layers", "n_super_weights", "coordinates",
    "max_spike_ratio", "spike_layer", "max_input_ratio", "max_output_ratio", "kept_by_topk", "n_kept_by_topk",
    "n_echoes", "known_agrees", "rule", "threshold", "dtype",
)
NONE_FOUND = "none found"
# The command that writes each result file, for the messages naming a missing one.
MAKER = {"detect": "sparsescale superweight detect", "ablation": "sparsescale superweight ablate",
         "scale": "sparsescale superweight ablate", "quantize": "sparsescale superweight quantize"}


def read_result(path: Path, kind: str) -> dict:
    """A per-model result JSON; a missing or broken one names the command that writes it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {kind} results {path} ({type(err).__name__}: {err}): make it with `{MAKER[kind]}`") from None


def spike_ratios(profile: dict) -> tuple[float, int | None, float, float]:
    """(max over layers of min(input ratio, output ratio), that layer, max input ratio, max output ratio)."""
    layers = sorted((profile or {}).get("layers") or [], key=lambda r: r["layer"])
    if len(layers) < 2:
        return float("nan"), None, float("nan"), float("nan")
    r_in = layer_ratios([r["max_abs_input"] for r in layers])  # the detection's own rule
    r_out = layer_ratios([r["max_abs_output"] for r in layers])
    both = [min(a, b) for a, b in zip(r_in, r_out)]
    i = max(range(len(both)), key=both.__getitem__)
    return both[i], layers[i]["layer"], max(r_in), max(r_out)


def _kept(sws: list[dict]) -> tuple[str, float]:
    """kept_by_topk over the super weights: yes / no / partial, or why it does not apply; and the count."""
    flags = [s.get("kept_by_topk") for s in sws]
    if not sws:
        return f"n/a ({NONE_FOUND})", float("nan")
    if all(f is None for f in flags):
        return "n/a (dense)", float("nan")
    k = sum(bool(f) for f in flags)
    return ("yes" if k == len(flags) else "no" if k == 0 else "partial"), float(k)


def summary_row(det: dict, name: str) -> dict:
    """One summary row of a detect JSON (see the module docstring)."""
    q = det.get("qsparse") or {}
    final_path = Path(str(det.get("model", ""))).parent / "final.json"
    final = json.loads(final_path.read_text()) if det.get("model") and final_path.is_file() else {}
    sws = det.get("super_weights") or []
    ratio, layer, r_in, r_out = spike_ratios(det.get("profile"))
    kept, n_kept = _kept(sws)
    known = det.get("known")
    return {
        "model": name, "source": "sweep" if final else "checkpoint", "size": final.get("size", ""),
        "precision": str(final.get("precision") or q.get("weight_bits") or "fp"),
        "sparsity": float(final.get("sparsity", q.get("sparsity") or 0.0)),
        "n_params": final.get("n_params", float("nan")), "n_layers": det.get("n_layers"), "n_super_weights": len(sws),
        "coordinates": "; ".join(f"({s['layer']}, {s['row']}, {s['col']})" for s in sws) or NONE_FOUND,
        "max_spike_ratio": ratio, "spike_layer": layer, "max_input_ratio": r_in, "max_output_ratio": r_out,
        "kept_by_topk": kept, "n_kept_by_topk": n_kept, "n_echoes": len(det.get("echoes") or []),
        "known_agrees": "" if not known else ("yes" if known.get("agrees") else "no"),
        "rule": det.get("rule", ""), "threshold": det.get("threshold", float("nan")), "dtype": det.get("dtype", ""),
    }


def summarize(paths: list[str | Path], names: list[str] | None = None) -> pd.DataFrame:
    """The summary table of detect JSONs, in the given order; names default to each file's folder name."""
    paths = [Path(p) for p in paths]
    names = names or [p.parent.name for p in paths]
    if len(names) != len(paths):
        raise UserError(f"--names gives {len(names)} names for {len(paths)} detect files: give one per file or none")
    if len(set(names)) != len(names):
        raise UserError(f"model names must be unique: got {names}; put each detect.json in its own folder or pass --names")
    rows = [summary_row(read_result(p, "detect"), n) for p, n in zip(paths, names)]
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def read_summary(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"super-weight summary not found: {path}; make it with `sparsescale superweight summarize`")
    text = ("model", "source", "size", "precision", "coordinates", "kept_by_topk", "known_agrees", "rule", "dtype")
    df = pd.read_csv(path, dtype=dict.fromkeys(text, str))  # "1.58" stays text
    missing = [c for c in SUMMARY_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"super-weight summary {path} lacks column(s) {', '.join(missing)}; rerun `sparsescale superweight summarize`")
    df[list(text)] = df[list(text)].fillna("")
    return df


def to_csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n", float_format="%.6g")
