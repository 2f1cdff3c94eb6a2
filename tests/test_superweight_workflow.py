"""Super weights in the workflow: the summary across models from synthetic detect JSONs (exact counts,
"none found" rows, the spike ratio the detection compares with its threshold), every figure and table rendered
from small synthetic JSONs and read back to its inputs, the CLI end to end, and the Snakemake DAG of the
smoke config."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from sparsescale.superweight import report as SR  # noqa: E402
from sparsescale.superweight import summary as SS  # noqa: E402
from sparsescale.errors import UserError  # noqa: E402
from sparsescale.superweight.cli import cli_superweight  # noqa: E402
from sparsescale.tables import fmt_num, to_csv, to_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# synthetic result files

def sw(layer, row, col, kept=None):
    return {"layer": layer, "row": row, "col": col, "value": 0.4, "input_spike": 19.0, "output_spike": 7.6,
            "token_index": 0, "iteration": 1, "kept_by_topk": kept}


def detect_json(model: str, inputs: list[float], outputs: list[float], sws=(), echoes=(), qsparse=None, known=None):
    layers = [{"layer": i, "max_abs_input": a, "max_abs_output": b, "input_channel": 3, "output_channel": 5,
               "token_index": 0, "input_token_index": 0} for i, (a, b) in enumerate(zip(inputs, outputs))]
    return {"model": model, "dtype": "torch.float32", "qsparse": qsparse, "rule": "relative", "threshold": 10.0,
            "n_layers": len(layers), "super_weights": list(sws), "echoes": list(echoes), "siblings": [],
            "profile": {"layers": layers}, "known": known}


def condition(name, loss, acc, p_the, **extra):
    return {"condition": name, **extra, "val": {"loss": loss, "ppl": float(np.exp(loss)), "n_tokens": 1024},
            "last_word_accuracy": acc, "n_prompts": 16, "stopword_prob": {"the": p_the, ".": 0.02, ",": 0.01},
            "top_tokens": [{"token": " cold", "id": 7, "prob": 0.5}]}


def ablation_json(with_sw: bool):
    conds = [condition("original", 3.0, 0.40, 0.10)]
    if with_sw:
        conds += [condition("zero_super_weights", 5.0, 0.05, 0.20),
                  condition("zero_super_weights_restore_activation", 3.8, 0.25, 0.12),
                  condition("prune_7000_other_weights", 3.1, 0.38, 0.11, n=7000),
                  condition("prune_1_other_weights", 3.0, 0.40, 0.10, n=1)]
    for c in conds:
        c["stopword_ratio"] = {w: p / conds[0]["stopword_prob"][w] for w, p in c["stopword_prob"].items()}
    summary = {"restore_recovered_fraction": 0.6,
               "per_weight": {"base": 3.0, "weights": [{"coord": [1, 17, 42], "value": 0.4, "loss_increase": 2.0,
                                                         "verdict": "super weight"}],
                              "control": {"name": "layers.0.mlp.down_proj", "row": 3, "col": 4, "value": 0.09,
                                          "loss_increase": 0.001}}} if with_sw else {}
    note = None if with_sw else "no super weight detected: nothing to ablate (only the original model is measured)"
    return {"super_weights": [sw(1, 17, 42)] if with_sw else [], "conditions": conds, "summary": summary, "note": note}


def scale_json(with_sw: bool):
    pts = [condition(f"scale_{f:g}", loss, acc, 0.1, factor=f) for f, loss, acc in
           ((0.0, 5.0, 0.05), (1.0, 3.0, 0.40), (2.0, 3.2, 0.35))] if with_sw else []
    return {"super_weights": [sw(1, 17, 42)] if with_sw else [], "factors": [0, 1, 2] if with_sw else [], "points": pts}


QUANT_PPL = {(4, 64, "rtn"): 21.0, (4, 64, "sw_aware"): 20.5, (4, 256, "rtn"): 30.0, (4, 256, "sw_aware"): 22.0,
             (3, 64, "rtn"): 40.0, (3, 64, "sw_aware"): 33.0, (3, 256, "rtn"): 90.0, (3, 256, "sw_aware"): 45.0}


def quantize_json(scale: float = 1.0):
    points = [{"bits": b, "block": blk, "method": m, "z": None if m == "rtn" else 3.0, "calib_mse": 0.1,
               "loss": float(np.log(p * scale)), "ppl": p * scale} for (b, blk, m), p in QUANT_PPL.items()]
    act = [{"weight_bits": 8, "weight_block": "channel", "act_bits": 8, "act_granularity": g, "method": m,
            "n_super_activations": int(m == "sa_aware"), "loss": 3.0, "ppl": ppl * scale}
           for g, m, ppl in (("tensor", "naive", 25.0), ("tensor", "sa_aware", 21.0), ("token", "naive", 20.2),
                             ("token", "sa_aware", 20.1))]
    return {"baseline": {"loss": 3.0, "ppl": 20.0 * scale}, "points": points, "act_points": act}


@pytest.fixture()
def sweep(tmp_path):
    """Three models: a dense run with a super weight (final.json beside its checkpoint), a ternary Q-Sparse run
    with none, and an HF-style checkpoint with two (one dropped by top-K) and an echo."""
    runs = {"d3-s0.00-bfp-seed0": ("fp", 0.0, 332448), "d3-s0.50-b1.58-seed0": ("1.58", 0.5, 332448)}
    for rid, (prec, s, n) in runs.items():
        (tmp_path / "runs" / rid / "model").mkdir(parents=True)
        (tmp_path / "runs" / rid / "final.json").write_text(json.dumps(
            {"run_id": rid, "size": "d3", "precision": prec, "sparsity": s, "n_params": n}))
    dets = {
        "d3-s0.00-bfp-seed0": detect_json(str(tmp_path / "runs/d3-s0.00-bfp-seed0/model"), [1, 200, 2, 1.5],
                                          [0.5, 100, 1, 0.4], [sw(1, 17, 42)],
                                          qsparse={"sparsity": 0.0, "weight_bits": "fp"}),
        "d3-s0.50-b1.58-seed0": detect_json(str(tmp_path / "runs/d3-s0.50-b1.58-seed0/model"), [8, 2, 1, 4],
                                            [1, 0.5, 0.25, 2], qsparse={"sparsity": 0.5, "weight_bits": "1.58"}),
        "org__tiny": detect_json("org/tiny", [1, 1, 300, 1, 1], [1, 1, 50, 1, 60],
                                 [sw(2, 5, 9, kept=True), sw(2, 5, 11, kept=False)], echoes=[sw(4, 5, 3)],
                                 qsparse={"sparsity": 0.4, "weight_bits": "fp"}, known={"agrees": False}),
    }
    dirs = []
    for i, (name, det) in enumerate(dets.items()):
        d = tmp_path / "superweight" / name
        d.mkdir(parents=True)
        with_sw = bool(det["super_weights"])
        for kind, obj in (("detect", det), ("ablation", ablation_json(with_sw)), ("scale", scale_json(with_sw)),
                          ("quantize", quantize_json(1.0 + i))):
            (d / f"{kind}.json").write_text(json.dumps(obj))
        dirs.append(d)
    return dirs


def report_inputs(dirs, summary):
    inputs = SR.load_report_inputs(dirs, log=lambda *_: None)
    inputs["summary"] = summary
    return inputs


def md_rows(markdown: str) -> list[list[str]]:
    """The body cells of a Markdown table (header and alignment rows dropped)."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


# ---------------------------------------------------------------------------------------------------------
# summary

def test_summary_counts_coordinates_and_none_found(sweep):
    df = SS.summarize([d / "detect.json" for d in sweep])
    assert list(df.columns) == list(SS.SUMMARY_COLUMNS)
    assert df.model.tolist() == ["d3-s0.00-bfp-seed0", "d3-s0.50-b1.58-seed0", "org__tiny"]
    assert df.n_super_weights.tolist() == [1, 0, 2]
    assert df.coordinates.tolist() == ["(1, 17, 42)", "none found", "(2, 5, 9); (2, 5, 11)"]
    assert df.kept_by_topk.tolist() == ["n/a (dense)", "n/a (none found)", "partial"]
    assert df.n_kept_by_topk.isna().tolist() == [True, True, False] and df.n_kept_by_topk.iloc[2] == 1
    assert df.n_echoes.tolist() == [0, 0, 1] and df.known_agrees.tolist() == ["", "", "no"]
    # run metadata from final.json beside the checkpoint; the hub-style model falls back on its qsparse entry
    assert df.source.tolist() == ["sweep", "sweep", "checkpoint"]
    assert df.precision.tolist() == ["fp", "1.58", "fp"] and df.sparsity.tolist() == [0.0, 0.5, 0.4]
    assert df.n_params.iloc[:2].tolist() == [332448, 332448] and np.isnan(df.n_params.iloc[2])


def test_max_spike_ratio_is_what_the_detection_compares_with_its_threshold(sweep):
    df = SS.summarize([d / "detect.json" for d in sweep])
    # layer 1: input 200 / median(1, 2, 1.5) = 133.3, output 100 / median(0.5, 1, 0.4) = 200 -> min 133.3
    assert df.max_spike_ratio.iloc[0] == pytest.approx(200 / 1.5) and df.spike_layer.iloc[0] == 1
    assert df.max_output_ratio.iloc[0] == pytest.approx(200.0)
    # none found: layer 0 has input 8 / median(2, 1, 4) = 4, output 1 / median(0.5, 0.25, 2) = 2 -> 2;
    # layer 3: 4 / 2 = 2, 2 / 0.5 = 4 -> 2; the strongest is 2, far below the threshold of 10
    assert df.max_spike_ratio.iloc[1] == pytest.approx(2.0) and df.spike_layer.iloc[1] == 0
    assert df.max_input_ratio.iloc[1] == pytest.approx(4.0) and df.max_output_ratio.iloc[1] == pytest.approx(4.0)
    # the echo layer's output spike (60) does not count: the min over input/output picks layer 2 (300, 50)
    assert df.max_spike_ratio.iloc[2] == pytest.approx(50.0) and df.spike_layer.iloc[2] == 2


def test_summary_csv_round_trips(sweep, tmp_path):
    out = tmp_path / "summary.csv"
    assert cli_superweight(["summarize", "--detect", *map(str, (d / "detect.json" for d in sweep)), "--out", str(out)]) == 0
    back = SS.read_summary(out)
    want = SS.summarize([d / "detect.json" for d in sweep])
    assert back.precision.tolist() == ["fp", "1.58", "fp"]  # text, never the float 1.58
    pd.testing.assert_frame_equal(back[["model", "coordinates", "kept_by_topk", "known_agrees"]],
                                  want[["model", "coordinates", "kept_by_topk", "known_agrees"]])
    np.testing.assert_allclose(back.max_spike_ratio, want.max_spike_ratio, rtol=1e-5)
    assert back.n_super_weights.tolist() == [1, 0, 2]


def test_summary_bad_input(sweep, tmp_path):
    with pytest.raises(UserError, match="model names must be unique"):
        SS.summarize([sweep[0] / "detect.json", sweep[0] / "detect.json"])
    with pytest.raises(UserError, match="gives 1 names for 2 detect files"):
        SS.summarize([sweep[0] / "detect.json", sweep[1] / "detect.json"], ["a"])
    with pytest.raises(UserError, match="make it with `sparsescale superweight detect`"):
        SS.summarize([tmp_path / "nowhere" / "detect.json"])
    with pytest.raises(UserError, match="sparsescale superweight summarize"):
        SS.read_summary(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------------------
# figures

def test_spike_profiles_one_panel_per_model_with_super_weight_layers_shaded(sweep):
    inputs = report_inputs(sweep, None)
    fig = SR.plot_spike_profiles(inputs["detect"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["d3-s0.00-bfp-seed0", "d3-s0.50-b1.58-seed0", "org__tiny"]
    assert [float(v) for v in axes[0].get_lines()[0].get_ydata()] == [1, 200, 2, 1.5]
    assert axes[0].get_yscale() == "log"
    assert [t.get_text() for t in axes[1].texts] == ["super weights: none found"]
    assert len(axes[0].patches) == 1 and len(axes[1].patches) == 0 and len(axes[2].patches) == 2  # SW + echo layer


def test_ablation_and_scale_figures_plot_the_measured_values(sweep):
    inputs = report_inputs(sweep, None)
    fig = SR.plot_sw_ablation(inputs["ablation"])
    ppl_ax, acc_ax = fig.axes[:2]
    labels = [t.get_text() for t in ppl_ax.get_xticklabels()]
    assert labels[:3] == ["original", "super\nweights\nzeroed", "zeroed,\nsuper act.\nrestored"]
    assert labels[3:] == ["1\nlargest\nothers\npruned", "7,000\nlargest\nothers\npruned"]  # ordered by n
    markers = [ln for ln in acc_ax.get_lines() if ln.get_marker() == "o"]
    assert [float(v) for v in markers[0].get_ydata()] == [0.40, 0.05, 0.25, 0.40, 0.38]
    assert [float(v) for v in markers[1].get_ydata()] == [0.40]  # none found: the original only
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[1] == "d3-s0.50-b1.58-seed0\n(no super weight:\noriginal only)"

    fig = SR.plot_sw_scale(inputs["scale"])
    curves = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert len(curves) == 2  # the model without a super weight has no curve...
    assert [float(v) for v in curves[0].get_xdata()] == [0.0, 1.0, 2.0]
    np.testing.assert_allclose(curves[0].get_ydata(), np.exp([5.0, 3.0, 3.2]))
    assert "d3-s0.50-b1.58-seed0: none found" in [t.get_text() for t in fig.legends[0].get_texts()]  # ...but a label
    ternary = SR.plot_sw_scale({"b158": {**scale_json(True), "scaled": "effective ternary weight (X[t, k] W_eff[j, k])"}})
    assert [t.get_text() for t in ternary.legends[0].get_texts()][0] == "b158\n(effective ternary\nweight scaled)"
    empty = SR.plot_sw_scale({"a": scale_json(False)})
    assert "nothing to scale" in empty.axes[0].texts[0].get_text()


def test_quantize_figure_draws_each_bits_and_method(sweep):
    fig = SR.plot_sw_quantize(report_inputs(sweep, None)["quantize"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8²", "16²"]
    lines = {(ln.get_linestyle(), ln.get_marker()): ln for ln in ax.get_lines() if ln.get_marker() in ("o", "s")}
    assert len([ln for ln in ax.get_lines() if ln.get_marker() in ("o", "s")]) == 4  # 2 bits x 2 methods
    rtn = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert sorted(tuple(float(v) for v in ln.get_ydata()) for ln in rtn) == [(21.0, 30.0), (40.0, 90.0)]
    assert ("--", "s") in lines
    assert any(ln.get_linestyle() == ":" and float(ln.get_ydata()[0]) == 20.0 for ln in ax.get_lines())  # unquantized


def test_empty_inputs_give_labelled_panels():
    assert "no detection results" in SR.plot_spike_profiles({}).axes[0].texts[0].get_text()
    assert "no ablation results" in SR.plot_sw_ablation({}).axes[0].texts[0].get_text()
    assert "no quantization results" in SR.plot_sw_quantize({}).axes[0].texts[0].get_text()


# ---------------------------------------------------------------------------------------------------------
# tables

def test_summary_table_reads_back(sweep):
    summary = SS.summarize([d / "detect.json" for d in sweep])
    t = SR.superweight_summary_table(summary)
    rows = md_rows(to_markdown(t))
    assert [r[0] for r in rows] == summary.model.tolist()
    assert [int(r[4]) for r in rows] == [1, 0, 2] and [r[5] for r in rows] == summary.coordinates.tolist()
    assert rows[1][1:4] == ["1.58-bit", "50%", "332k"] and rows[2][3] == "—"
    assert rows[0][6] == "133 (layer 1)" and rows[2][7] == "partial"
    assert t.data is not None and t.data.model.tolist() == summary.model.tolist()
    assert any("org__tiny (1)" in n for n in t.notes) and any("org__tiny: differs" in n for n in t.notes)


def test_ablation_table_reads_back(sweep):
    inputs = report_inputs(sweep, None)
    t = SR.superweight_ablation_table(inputs["ablation"])
    rows = md_rows(to_markdown(t))
    assert len(rows) == 5 + 1 + 5 and t.groups == [0, 5, 6]
    first = rows[:5]
    assert [r[1] for r in first] == ["original", "super weights zeroed", "zeroed, super act. restored",
                                     "1 largest others pruned", "7,000 largest others pruned"]
    assert [float(r[2]) for r in first] == [3.0, 5.0, 3.8, 3.0, 3.1]
    assert first[0][5] == fmt_num(0.10) and first[1][5] == f"{fmt_num(0.20)} (×2)"
    assert first[0][8] == '" cold" 50.0%'
    data = t.data
    assert data.val_ppl.iloc[1] == pytest.approx(np.exp(5.0)) and data.ratio_the.iloc[1] == pytest.approx(2.0)
    assert data.n.iloc[4] == 7000 and rows[5][1] == "original"
    assert any("recovers 60.0% of the loss increase" in n for n in t.notes)
    assert any("each weight zeroed alone: (1, 17, 42) +2 nats (super weight); the largest other weight "
               "(layers.0.mlp.down_proj [3, 4]) +0.001 nats." in n for n in t.notes)
    assert any("no super weight detected" in n for n in t.notes)


def test_quantize_and_w8a8_tables_read_back(sweep):
    inputs = report_inputs(sweep, None)
    t = SR.superweight_quantize_table(inputs["quantize"])
    assert t.header == ["Model", "Bits", "Method", "Unquantized", "block 8²", "block 16²"]
    rows = md_rows(to_markdown(t))
    assert len(rows) == 3 * 4
    by = {(r[0], r[1], r[2]): r[3:] for r in rows}
    assert by[("org__tiny", "3", "super-weight aware")] == ["60.00", "99.00", "135.00"]
    csv = pd.read_csv(io.StringIO(to_csv(t)))
    assert len(csv) == 3 * 8 and csv.val_ppl.iloc[:8].tolist() == list(QUANT_PPL.values())
    w = SR.superweight_w8a8_table(inputs["quantize"])
    assert w.header[2:] == ["W8A8 per-tensor naive", "W8A8 per-tensor super-act. aware", "W8A8 per-token naive",
                            "W8A8 per-token super-act. aware"]
    assert md_rows(to_markdown(w))[1][1:] == ["40.00", "50.00", "42.00", "40.40", "40.20"]
    assert SR.fmt_ppl(3.469e7) == "3.469e+07" and SR.fmt_ppl(float("nan")) == "—"
    assert [SR.block_text(b) for b in (64, 100, 16384, 262144, 1048576, "channel")] == [
        "8²", "100", "128²", "512²", "1024²", "channel"]


def test_paper_config_sweeps_blocks_to_the_papers_sizes():
    """The paper's RTN and super-weight-aware quantization separate from 512² on: the paper config reaches 1024²."""
    sw_cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())["superweight"]
    assert sw_cfg["blocks"] == [64**2, 128**2, 256**2, 512**2, 1024**2]


def test_quantize_report_shows_the_papers_large_blocks():
    q = quantize_json()
    for p in q["points"]:
        p["quant"] = {"n_tensors": 21, "n_whole_tensor": 0}
    big = [{**p, "block": b, "quant": {"n_tensors": 21, "n_whole_tensor": w}}
           for p in q["points"] if p["block"] == 256 for b, w in ((262144, 14), (1048576, 21))]
    q["points"] += big
    t = SR.superweight_quantize_table({"m": q})
    assert t.header[4:] == ["block 8²", "block 16²", "block 512²", "block 1024²"]
    assert "m, block 512²: 14 of 21 weight matrices are no larger than one block (quantized per tensor)." in t.notes
    assert "m, block 1024²: 21 of 21 weight matrices" in t.notes[-1] and len(t.notes) == 4
    assert t.data.n_whole_tensor.max() == 21
    fig = SR.plot_sw_quantize({"m": q})
    assert [x.get_text() for x in fig.axes[0].get_xticklabels()] == ["8²", "16²", "512²", "1024²"]


# ---------------------------------------------------------------------------------------------------------
# emergence in our own models (curves.csv with the spike statistic of each evaluation)

def curves_csv(with_spikes: bool = True) -> pd.DataFrame:
    """Two sizes x (dense, S=0.5) x (fp, 1.58), three evaluations each; the dense fp d4 run grows a spike."""
    rows = []
    for size, n in (("d3", 332448), ("d4", 786432)):
        for prec in ("fp", "1.58"):
            for s in (0.0, 0.5):
                rid = f"{size}-s{s:.2f}-b{prec}-seed0"
                for step, tokens in ((100, 1000), (200, 2000), (300, 3000)):
                    grow = size == "d4" and prec == "fp" and s == 0.0
                    r_in = (2.0 + step / 100) * (10 if grow and step == 300 else 1)
                    row = {"run_id": rid, "size": size, "n_params": n, "sparsity": s, "precision": prec, "seed": 0,
                           "mode": "scratch", "step": step, "tokens": tokens, "train_loss": 4.0, "val_loss": 4.1}
                    if with_spikes:
                        row.update(spike_in_ratio=r_in, spike_out_ratio=r_in / 2 if not grow else r_in * 1.2,
                                   spike_layer=1)
                    rows.append(row)
    return pd.DataFrame(rows)


def test_emergence_figure_plots_each_run_against_tokens_and_n():
    fig = SR.plot_spike_emergence(curves_csv())
    ax_tok, ax_n = fig.axes[0], fig.axes[1]
    runs = [ln for ln in ax_tok.get_lines() if ln.get_marker() == "o"]
    assert len(runs) == 8  # one line per run
    assert sorted(tuple(float(v) for v in ln.get_ydata()) for ln in runs)[-1] == (3.0, 4.0, 50.0)  # the growing run
    assert [float(v) for v in runs[0].get_xdata()] == [1000, 2000, 3000]
    per_n = [ln for ln in ax_n.get_lines() if ln.get_marker() == "s"]
    assert len(per_n) == 4 and all([float(v) for v in ln.get_xdata()] == [332448, 786432] for ln in per_n)
    assert sorted(tuple(float(v) for v in ln.get_ydata()) for ln in per_n)[-1] == (5.0, 50.0)  # last evaluation
    assert ax_n.get_xscale() == "log" and ax_tok.get_yscale() == "log"
    # no minor labels on the log axes (2x10^5, 3x10^5, ... overlapped on the reference sweep's N axis)
    assert all(isinstance(a.get_minor_formatter(), NullFormatter) for a in (ax_n.xaxis, ax_n.yaxis, ax_tok.yaxis))
    assert any(ln.get_linestyle() == ":" and float(ln.get_ydata()[0]) == 10.0 for ln in ax_tok.get_lines())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "S = 0% (dense)" in legend and "detection threshold (10)" in legend


@pytest.mark.parametrize("curves", [None, "no_columns", "all_nan"])
def test_emergence_without_spike_columns_says_no_data(curves):
    df = {"no_columns": curves_csv(False), "all_nan": curves_csv().assign(spike_in_ratio=np.nan, spike_out_ratio=np.nan),
          None: None}[curves]
    fig = SR.plot_spike_emergence(df)
    assert all("no spike statistics in curves.csv" in ax.texts[0].get_text() for ax in fig.axes)
    t = SR.superweight_emergence_table(df)
    assert t.rows == [] and "no spike statistics" in t.notes[0] and list(t.data.columns)[:2] == ["run_id", "size"]


def test_emergence_table_one_row_per_run_at_its_last_evaluation():
    t = SR.superweight_emergence_table(curves_csv())
    rows = md_rows(to_markdown(t))
    assert len(rows) == 8 and len(t.data) == 8
    assert [r[2] for r in rows] == ["full precision"] * 4 + ["1.58-bit"] * 4
    assert [(r[0], r[3]) for r in rows[:4]] == [("d3", "0%"), ("d3", "50%"), ("d4", "0%"), ("d4", "50%")]
    assert rows[2] == ["d4", "786k", "full precision", "0%", "0", "3k", "50", "60", "1", "yes"]  # stands out at the end
    assert rows[0][6:] == ["5", "2.5", "1", "no"] and [r[-1] for r in rows].count("yes") == 1
    assert t.data.tokens.tolist() == [3000] * 8 and t.data.spike_in_ratio.max() == 50.0


# ---------------------------------------------------------------------------------------------------------
# CLI and workflow

def test_cli_report_writes_everything_byte_identically(sweep, tmp_path, capsys):
    summary = tmp_path / "summary.csv"
    cli_superweight(["summarize", "--detect", *map(str, (d / "detect.json" for d in sweep)), "--out", str(summary)])
    args = ["report", "--summary", str(summary), "--dirs", *map(str, sweep), "--dpi", "40"]
    assert cli_superweight(args + ["--figures", str(tmp_path / "f1"), "--tables", str(tmp_path / "t1")]) == 0
    cli_superweight(args + ["--figures", str(tmp_path / "f2"), "--tables", str(tmp_path / "t2")])
    figs = sorted(p.name for p in (tmp_path / "f1").iterdir())
    assert figs == sorted(f"{n}.{e}" for n in SR.SUPERWEIGHT_FIGURES for e in ("png", "pdf"))
    tabs = sorted(p.name for p in (tmp_path / "t1").iterdir())
    assert tabs == sorted(f"{n}.{e}" for n in SR.SUPERWEIGHT_TABLES for e in ("md", "tex", "csv"))
    for sub in (("f1", "f2"), ("t1", "t2")):
        for name in (tmp_path / sub[0]).iterdir():
            assert name.read_bytes() == (tmp_path / sub[1] / name.name).read_bytes(), name.name
    (sweep[1] / "quantize.json").unlink()
    capsys.readouterr()
    cli_superweight(args + ["--tables", str(tmp_path / "t3")])
    assert f"no {sweep[1] / 'quantize.json'}" in capsys.readouterr().out  # named, not silently dropped
    assert "d3-s0.50-b1.58-seed0" not in (tmp_path / "t3" / "superweight_quantize.md").read_text()
    curves = tmp_path / "curves.csv"
    curves_csv().to_csv(curves, index=False)
    cli_superweight(args + ["--curves", str(curves), "--tables", str(tmp_path / "t4")])
    emergence = (tmp_path / "t4" / "superweight_emergence.md").read_text()
    assert "| d4 | 786k | full precision | 0% | 0 | 3k | 50 | 60 | 1 | yes |" in emergence
    assert "no spike statistics" in (tmp_path / "t1" / "superweight_emergence.md").read_text()  # without --curves
    with pytest.raises(UserError, match="nothing to do"):
        cli_superweight(["report", "--summary", str(summary), "--dirs", str(sweep[0])])
    # after detect alone: only what needs detect.json and curves.csv
    only = "sw_spike_profile,sw_emergence,superweight_summary,superweight_emergence"
    cli_superweight(args + ["--curves", str(curves), "--only", only, "--figures", str(tmp_path / "f5"),
                            "--tables", str(tmp_path / "t5")])
    assert sorted(p.name for p in (tmp_path / "f5").iterdir()) == [
        "sw_emergence.pdf", "sw_emergence.png", "sw_spike_profile.pdf", "sw_spike_profile.png"]
    assert sorted(p.stem for p in (tmp_path / "t5").iterdir()) == ["superweight_emergence"] * 3 + ["superweight_summary"] * 3
    assert (tmp_path / "t5" / "superweight_emergence.md").read_bytes() == (tmp_path / "t4" / "superweight_emergence.md").read_bytes()
    with pytest.raises(UserError, match="unknown figure or table 'sw_nope' in --only"):
        cli_superweight(args + ["--only", "sw_nope", "--tables", str(tmp_path / "t6")])
    assert not (tmp_path / "t6").exists()


@pytest.mark.skipif(shutil.which("snakemake") is None and not (Path(sys.executable).parent / "snakemake").exists(),
                    reason="snakemake not installed")
def test_smoke_config_schedules_the_superweight_rules(tmp_path):
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    out = subprocess.run([exe, "-n", "--configfile", "config/smoke.yaml", "--config", f"results={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert {k: counts.get(k) for k in ("superweight_detect", "superweight_ablate", "quantize_sweep",
                                        "superweight_summary", "superweight_figures", "superweight_tables")} == {
        "superweight_detect": 2, "superweight_ablate": 2, "quantize_sweep": 2, "superweight_summary": 1,
        "superweight_figures": 1, "superweight_tables": 1}
    assert f"{tmp_path}/superweight/d3-s0.50-b1.58-seed0/quantize.json" in out.stdout
