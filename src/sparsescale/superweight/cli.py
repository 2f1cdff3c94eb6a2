"""`sparsescale superweight detect|ablate|quantize|summarize|report`: the command-line edge of the subpackage.

Features
- `cli_superweight(argv)` dispatches to one subcommand (`SUBCOMMANDS`); `--help` after one gives its options.
- Shared loading: `add_common_args`, `resolve_tokenizer` (--tokenizer, else the checkpoint's, else the
  dataset's, else the hub name's), `load_model_and_tokenizer` (the checkpoint's own dtype by default; a
  tokenizer larger than the model's vocabulary is refused), `default_seq_len`.
- detect: one JSON (detection, profile, comparison with the known coordinates, versions); ablate:
  ablation.json (conditions, the recovered fraction, each weight zeroed alone against the largest other
  weight) and scale.json; quantize: one JSON; summarize: summary.csv; report: figures and tables.
- Every result file is written atomically with the versions of the libraries that made it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sparsescale.data import load_tokenizer
from sparsescale.errors import UserError
from sparsescale.io import atomic_write_text, versions, write_json
from sparsescale.layout import ffn_out_modules
from sparsescale.model import load
from sparsescale.superweight import probes
from sparsescale.superweight.ablate import (
    pruned_others, restored_activation, scale_target, scaled, single_weight_effects, zeroed,
)
from sparsescale.superweight.detect import (
    ABS_THRESHOLD, DEFAULT_MODULE, DEFAULT_THRESHOLD, KNOWN_PATH, OFFICIAL_PROMPT, PERSIST, RULES, Detection,
    compare_known, find_super_weights, known_entry, known_table, load_detection, siblings,
)
from sparsescale.superweight.quantize import (
    DEFAULT_BLOCKS, DEFAULT_Z_GRID, METHODS, check_bits, check_block, sweep, z_value,
)
from sparsescale.superweight.summary import read_summary, summarize, to_csv
from sparsescale.results import read_curves
from sparsescale.tables import write_table


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
    local = Path(model_path)
    has_own = local.is_dir() and any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = tokenizer or (model_path if has_own else None)
    if source is None and data is not None:
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


def cli_detect(argv: list[str]) -> int:
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
        for w in comparison["disputed"]:
            print(f"  {w['status']} {tuple(w['coord'])} ({', '.join(w['sources'])}): "
                  f"{'detected' if w['detected'] else 'not detected'}")
    write_json(a.out, {"model": a.model, "name_or_path": getattr(model.config, "_name_or_path", None),
                       "dtype": str(next(model.parameters()).dtype), "qsparse": getattr(model.config, "qsparse", None),
                       **det.to_json(), "known": comparison, "versions": versions()})
    print(f"wrote {a.out}")
    return 0


def cli_ablate(argv: list[str]) -> int:
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
        summary["per_weight"] = single_weight_effects(  # each weight zeroed alone vs the largest other weight
            model, sws, lambda: probes.perplexity(model, data["val"], seq_len, a.val_tokens, a.batch_size)["loss"],
            a.module)
    note = None if sws else "no super weight detected: nothing to ablate (only the original model is measured)"
    common = {"model": a.model, "detect": a.detect, "super_weights": [dataclasses.asdict(s) for s in sws],
              "siblings": siblings(sws), "settings": {"seq_len": seq_len, "val_tokens": a.val_tokens,
              "n_prompts": len(prompts), "same_tokenizer": data["same_tokenizer"], "module": a.module,
              "restore": "per sequence, at argmax_t |Y[b, t, j]| of the original weights"},
              "note": note, "versions": versions()}
    out = Path(a.out)
    write_json(out / "ablation.json", {**common, "conditions": conditions, "summary": summary})
    write_json(out / "scale.json", {**common, "factors": a.scales if sws else [], "points": points,
                                    "scaled": scale_target(model, sws, a.module) if sws else None})
    print(f"wrote {out / 'ablation.json'} and {out / 'scale.json'}")
    return 0

def cli_quantize(argv: list[str]) -> int:
    """`sparsescale superweight quantize`: the sweep on a checkpoint, written to one JSON file."""
    p = argparse.ArgumentParser(prog="sparsescale superweight quantize", description=cli_quantize.__doc__)
    add_common_args(p, data_required=True)
    p.add_argument("--detect", required=True, help="detect JSON (its super_weights are kept in full precision)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="weight bits, 2..8 (default 3 4)")
    p.add_argument("--blocks", nargs="+", default=list(DEFAULT_BLOCKS),
                   help="block sizes in elements, or channel / tensor (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=["rtn", "sw_aware"], choices=METHODS)
    p.add_argument("--z-grid", nargs="+", default=["none" if z is None else str(z) for z in DEFAULT_Z_GRID],
                   help="clipping z candidates; 'none' = no clipping (default %(default)s)")
    p.add_argument("--partial", choices=("short", "refuse"), default="short",
                   help="a block size that does not divide a weight: short last block (default) or refuse")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens from the train split")
    p.add_argument("--act-bits", type=int, default=8, help="activation bits of the W8A8 points (0: skip them)")
    p.add_argument("--act-granularity", nargs="+", default=["tensor", "token"], choices=("tensor", "token"))
    a = p.parse_args(argv)
    z_grid = [z_value(z) for z in a.z_grid]
    [check_bits(b) for b in a.bits]
    [check_block(b) for b in a.blocks]
    if a.act_bits:
        check_bits(a.act_bits)
    sws = load_detection(a.detect)
    model, tok = load_model_and_tokenizer(a)
    data = probes.eval_data(tok, a.data, a.val_tokens, a.calib_tokens)
    res = sweep(model, data["val"], data["train"], sws, a.bits, a.blocks, z_grid, a.methods, a.seq_len or
                default_seq_len(model), a.val_tokens, a.calib_tokens, a.batch_size, a.act_bits or None,
                a.act_granularity, a.partial, a.module)
    write_json(a.out, {"model": a.model, "detect": a.detect, "super_weights": [vars(s) for s in sws], **res,
                       "versions": versions()})
    print(f"wrote {a.out}")
    return 0


def cli_summarize(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale superweight summarize",
                                description="Collect detect JSONs into one summary CSV (one row per model).")
    p.add_argument("--detect", nargs="+", required=True, help="detect JSON files (results/superweight/{model}/detect.json)")
    p.add_argument("--names", nargs="+", help="model names (default: each file's folder name)")
    p.add_argument("--out", required=True, help="CSV file to write")
    a = p.parse_args(argv)
    df = summarize(a.detect, a.names)
    atomic_write_text(a.out, to_csv(df))
    for r in df.itertuples(index=False):
        print(f"{r.model:<32} {r.precision:>4} S={r.sparsity:<4g} super weights: {r.coordinates}  "
              f"(strongest spike x{r.max_spike_ratio:.3g}, top-K keeps: {r.kept_by_topk})")
    print(f"wrote {a.out}")
    return 0


def cli_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale superweight report",
                                description="Super-weight figures and tables from the per-model JSONs and the summary.")
    p.add_argument("--summary", required=True, help="summary CSV (sparsescale superweight summarize)")
    p.add_argument("--dirs", nargs="+", required=True, help="per-model folders with detect/ablation/scale/quantize.json")
    p.add_argument("--figures", help="folder for {name}.png and {name}.pdf")
    p.add_argument("--tables", help="folder for {name}.md, .tex and .csv")
    p.add_argument("--dpi", type=int, default=None, help="PNG resolution (default: the theme's 200)")
    p.add_argument("--curves", help="curves.csv of the sweep (sparsescale aggregate): the spike statistic over training")
    p.add_argument("--only", help="comma-separated figures/tables to make (default: all), e.g. "
                                  "sw_spike_profile,sw_emergence,superweight_summary,superweight_emergence after detect alone")
    a = p.parse_args(argv)
    # matplotlib deferred on purpose: only this subcommand draws (detect/ablate jobs need not load it)
    from sparsescale.plots import save_figure
    from sparsescale.superweight import report

    if not (a.figures or a.tables):
        raise UserError("nothing to do: pass --figures DIR and/or --tables DIR")
    names = list(report.SUPERWEIGHT_FIGURES) + list(report.SUPERWEIGHT_TABLES)
    only = names if not a.only else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UserError(f"unknown figure or table {unknown[0]!r} in --only: choose from {', '.join(names)}")
    inputs = report.load_report_inputs(a.dirs)
    inputs["summary"] = read_summary(a.summary)
    inputs["curves"] = read_curves(a.curves) if a.curves else None
    paths = []
    for name, draw in report.SUPERWEIGHT_FIGURES.items() if a.figures else ():
        if name in only:
            paths += save_figure(draw(inputs), a.figures, name, a.dpi)
    for name, make in report.SUPERWEIGHT_TABLES.items() if a.tables else ():
        if name in only:
            paths += write_table(make(inputs), a.tables)
    for path in paths:
        print(path)
    return 0


SUBCOMMANDS = {"detect": cli_detect, "ablate": cli_ablate, "quantize": cli_quantize, "summarize": cli_summarize,
               "report": cli_report}


def cli_superweight(argv: list[str]) -> int:
    usage = ("usage: sparsescale superweight {detect,ablate,quantize,summarize,report} [ARGS...]  "
             "(--help after one for its options)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise UserError(f"unknown superweight subcommand {argv[0]!r}: choose detect, ablate, quantize, summarize or report")
    return SUBCOMMANDS[argv[0]](argv[1:])
