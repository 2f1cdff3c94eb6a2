"""The committed reference result: export keeps result files only, and the tables regenerate from it alone."""

import json
import re
from pathlib import Path

import pytest

from sparsescale.errors import UserError
from sparsescale.io import read_json
from sparsescale.probe import MAY_DIFFER, parse_probe_id
from sparsescale.reference import bank, export

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "results" / "reference"
TSV_HEAD = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _sweep(root: Path) -> Path:
    files = {
        "tables/runs.csv": "run_id,val_loss\na,3.0\n", "tables/curves.csv": "run_id,step\na,1\n",
        "tables/losses.md": "| a |\n", "fit/fit_fp.json": '{"s_star": 0.5}', "fit/optimal_sparsity.json": "{}",
        "figures/fig1_scaling.png": "png", "figures/fig1_scaling.pdf": "pdf",
        "runs/a/final.json": "{}", "runs/a/config.json": "{}", "runs/a/metrics.jsonl": "{}\n",
        "runs/a/model/model.safetensors": "weights", "runs/a/checkpoints/step1/optim.pt": "state",
        "tune/lr.json": "{}", "tune/runs/a-lr0.01/final.json": "{}", "tune/runs/a-lr0.01/model/model.safetensors": "w",
        "logs/train/a.log": "log",
        "logs/benchmarks/train/a.tsv": TSV_HEAD + "10.5\t0:00:10\t300\t0\t0\t0\t0\t0\t90\t9.5\n",
        "logs/benchmarks/prepare.tsv": TSV_HEAD + "2.0\t0:00:02\t100\t0\t0\t0\t0\t0\t90\t1.5\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "cfg.yaml").write_text("results: x\n")
    return root


def test_export_keeps_result_files_only(tmp_path):
    root = _sweep(tmp_path / "res")
    out = tmp_path / "ref"
    export(root, root / "cfg.yaml", out, wall_s=120.0)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == sorted([
        "config.yaml", "fit/fit_fp.json", "fit/optimal_sparsity.json", "figures/fig1_scaling.png", "jobs.csv",
        "runs/a/config.json", "runs/a/final.json", "sweep.json", "tables/curves.csv", "tables/losses.md",
        "tables/runs.csv", "tune/lr.json", "tune/runs/a-lr0.01/final.json", "versions.json"])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["wall_s"] == 120.0 and sweep["jobs"] == 2
    assert sweep["cpu_seconds"] == pytest.approx(11.0) and sweep["job_seconds"] == pytest.approx(12.5)
    assert sweep["per_rule"]["train"] == {"jobs": 1, "seconds": 10.5, "cpu_seconds": 9.5}
    assert (out / "jobs.csv").read_text().splitlines()[1:] == ["prepare,prepare,2.0,1.5,100.0", "train,train/a,10.5,9.5,300.0"]
    # a second export replaces the first whole: a file gone from the sweep is gone from the reference
    (root / "tables/losses.md").unlink()
    export(root, root / "cfg.yaml", out)
    assert not (out / "tables/losses.md").exists() and json.loads((out / "sweep.json").read_text())["wall_s"] is None
    # folders an export does not write (pilots, a bank) are carried over, not deleted
    (out / "pilots/d5/r").mkdir(parents=True)
    (out / "pilots/d5/r/final.json").write_text('{"val_loss": 3.1}')
    export(root, root / "cfg.yaml", out)
    assert (out / "pilots/d5/r/final.json").read_text() == '{"val_loss": 3.1}' and (out / "runs/a/final.json").is_file()


def test_export_into_its_own_bank_keeps_every_banked_run_whole(tmp_path):
    """A sweep that ran across sessions: its results root has this session's runs only, the bank has them all.
    Exporting into the bank (`--out` = config `bank`) must lose no banked run and none of its files."""
    root = _sweep(tmp_path / "res")
    out = tmp_path / "ref"
    banked = {"runs/b/final.json": '{"val_loss": 2.9}', "runs/b/eval.json": "{}", "runs/b/metrics.jsonl": "{}\n",
              "runs/b/config.json": "{}", "runs/a/final.json": '{"val_loss": 3.0}', "runs/a/metrics.jsonl": "{}\n",
              "runs/killed/config.json": "{}", "tune/runs/b-lr0.01/failed.json": "{}", "probes/p/final.json": "{}"}
    for rel, text in banked.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    (root / "cfg.yaml").write_text(f"results: x\nbank: {out}\n")
    export(root, root / "cfg.yaml", out)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == sorted([
        "config.yaml", "fit/fit_fp.json", "fit/optimal_sparsity.json", "figures/fig1_scaling.png", "jobs.csv",
        "sweep.json", "tables/curves.csv", "tables/losses.md", "tables/runs.csv", "versions.json",
        "tune/lr.json", "tune/runs/a-lr0.01/final.json", "tune/runs/b-lr0.01/failed.json", "probes/p/final.json",
        "runs/a/final.json", "runs/a/metrics.jsonl", "runs/b/config.json", "runs/b/eval.json",
        "runs/b/final.json", "runs/b/metrics.jsonl"])
    # a banked run comes from the bank (not the results root's copy), an unfinished one is not exported
    assert (out / "runs/a/final.json").read_text() == '{"val_loss": 3.0}'
    assert (out / "runs/b/final.json").read_text() == '{"val_loss": 2.9}'
    (root / "cfg.yaml").write_text("bank: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        export(root, root / "cfg.yaml", out)
    assert (out / "runs/b/metrics.jsonl").is_file()


def test_bank_copies_finished_runs_result_files_only(tmp_path):
    runs = tmp_path / "runs"
    files = {"done/final.json": '{"val_loss": 2.5}', "done/config.json": "{}", "done/eval.json": "{}",
             "done/metrics.jsonl": "{}\n", "done/model/model.safetensors": "w", "done/checkpoints/s1/optim.pt": "o",
             "diverged/failed.json": '{"reason": "nan"}', "diverged/config.json": "{}",
             "running/config.json": "{}", "running/checkpoints/s1/optim.pt": "o"}
    for rel, text in files.items():
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_text(text)
    out = tmp_path / "bank/runs"
    banked, skipped = bank([runs / "done", runs / "diverged", runs / "running"], out)
    assert [p.name for p in banked] == ["done", "diverged"] and [p.name for p in skipped] == ["running"]
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["diverged/config.json", "diverged/failed.json", "done/config.json", "done/eval.json",
                   "done/final.json", "done/metrics.jsonl"]
    # banking again replaces the run whole (a rerun's files, not a mix of both)
    (runs / "done/eval.json").unlink()
    (runs / "done/final.json").write_text('{"val_loss": 2.4}')
    bank([runs / "done"], out)
    assert not (out / "done/eval.json").exists() and (out / "done/final.json").read_text() == '{"val_loss": 2.4}'
    with pytest.raises(UserError, match=r"run directory .*nowhere not found"):
        bank([runs / "nowhere"], out)


@pytest.mark.parametrize("case,match", [
    ("no_runs", r"tables/runs.csv not found: run the sweep to the end first"),
    ("no_config", r"config file .*missing.yaml not found"),
    ("bad_wall", r"--wall-s must be a positive number of seconds: got -1"),
])
def test_export_refuses_bad_input_and_writes_nothing(tmp_path, case, match):
    root = _sweep(tmp_path / "res")
    if case == "no_runs":
        (root / "tables/runs.csv").unlink()
    cfg = root / ("missing.yaml" if case == "no_config" else "cfg.yaml")
    with pytest.raises(UserError, match=match):
        export(root, cfg, tmp_path / "ref", wall_s=-1.0 if case == "bad_wall" else None)
    assert not (tmp_path / "ref").exists() and not list(tmp_path.glob(".ref.*"))


# the committed references: the D = 1M one (config/cpu.yaml) and the D = 4M one the README quotes (config/cpu4m.yaml)
REFERENCES = [REFERENCE, REFERENCE / "cpu4m"]
each_reference = pytest.mark.parametrize("ref", [
    pytest.param(r, id=r.relative_to(REPO).as_posix(), marks=pytest.mark.skipif(
        not (r / "tables" / "runs.csv").is_file(), reason=f"{r} not committed yet")) for r in REFERENCES])


@each_reference
def test_reference_tables_regenerate_byte_for_byte(tmp_path, ref):
    from sparsescale.results import load_results
    from sparsescale.tables import make_tables, write_table

    results = load_results(ref / "tables/runs.csv", ref / "fit")
    for table in make_tables(results):
        for path in write_table(table, tmp_path):
            assert path.read_bytes() == (ref / "tables" / path.name).read_bytes(), path.name


@each_reference
def test_reference_tune_table_and_headline_agree_with_their_sources(tmp_path, ref):
    from sparsescale.tune import read_tune_runs, select

    chosen = select(read_tune_runs(sorted(str(p.parent) for p in (ref / "tune/runs").glob("*/final.json"))))
    committed = json.loads((ref / "tune/lr.json").read_text())
    assert chosen["chosen"] == committed["chosen"]
    # every trained run used the rate the tune stage chose for its size x precision
    finals = list((ref / "runs").glob("*/final.json"))
    assert finals
    for final in finals:
        f = json.loads(final.read_text())
        assert f["lr"] == pytest.approx(committed["chosen"][f["size"]][str(f["precision"])]), final.parent.name
    optimal = json.loads((ref / "fit/optimal_sparsity.json").read_text())
    for prec in ("fp", "1.58"):
        fit = json.loads((ref / f"fit/fit_{prec}.json").read_text())
        assert optimal["precisions"][prec]["s_star"] == pytest.approx(fit["s_star"])


def _quoted(x: float) -> str:
    """A number as the README prints it: 3 decimals, a typographic minus."""
    return f"{x:.3f}".replace("-", "\u2212")


@pytest.mark.skipif(not (REFERENCE / "cpu4m/fit/optimal_sparsity.json").is_file(), reason="cpu4m not committed yet")
def test_readme_headline_quotes_the_committed_d4m_result():
    """The README's opening paragraph quotes S* of both precisions and their difference, with intervals, from
    results/reference/cpu4m/fit/optimal_sparsity.json: a re-export that moves them fails here until the text follows."""
    head = (REPO / "README.md").read_text().split("## Quick start")[0]
    optimal = json.loads((REFERENCE / "cpu4m/fit/optimal_sparsity.json").read_text())
    for prec, name in (("fp", "full precision"), ("1.58", "1.58-bit")):
        p = optimal["precisions"][prec]
        lo, hi = p["s_star_ci"]
        assert f"S\\* = {_quoted(p['s_star'])} [{_quoted(lo)}, {_quoted(hi)}] in {name}" in head, prec
    d = optimal["difference_1.58_minus_fp"]
    lo, hi = d["difference_ci"]
    assert f"({_quoted(d['difference'])} [{_quoted(lo)}, {_quoted(hi)}])" in head


# probes: runs outside the D = 4M sweep, each a sweep cell with one setting changed (its folder name says which)
PROBES = REFERENCE / "cpu4m" / "probes"
PROBE_DIRS = sorted(p.parent.relative_to(REFERENCE) for p in REFERENCE.glob("*/probes/*/final.json"))


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_probe_banks_are_found():
    assert len(PROBE_DIRS) >= 26 and {p.parts[0] for p in PROBE_DIRS} >= {"cpu4m"}


@pytest.mark.parametrize("probe", PROBE_DIRS, ids=str)
def test_each_probe_is_its_sweep_cell_with_one_setting_changed(probe):
    """Every banked probe of every reference sweep ({sweep}/probes/{id}) against its cell ({sweep}/runs/{cell})."""
    cell, field, value = parse_probe_id(probe.name)  # CELL-D<millions>m or CELL-lr<rate>, else UserError
    cfg, final = read_json(REFERENCE / probe / "config.json"), read_json(REFERENCE / probe / "final.json")
    base = read_json(REFERENCE / probe.parent.parent / "runs" / cell / "config.json")
    changed = {k for k in cfg.keys() | base.keys() if cfg.get(k) != base.get(k)} - {"versions"} - MAY_DIFFER
    assert changed == {field} and cfg[field] == value
    step_tokens = cfg["batch_size"] * cfg["seq_len"]
    assert cfg["tokens"] - step_tokens < final["tokens"] <= cfg["tokens"]  # the run finished its budget
    assert (final["run_id"], final["lr"]) == (cell, cfg["lr"])
    assert 2.0 < final["val_loss"] < 6.0


def _loss(run_dir: Path) -> str:
    return f"{read_json(run_dir / 'final.json')['val_loss']:.3f}"


def _column_run(sweep: str, column: str, cell: str) -> Path:
    """The run a column of a sweep's probes index (`{sweep}/probes/README.md`) quotes for one cell: `D = 8M` its
    budget probe, or the cell of the reference sweep trained at that budget (`D = 4M`: cpu4m; `D = 16M`:
    cpu16m); `×1 (sweep)` the sweep's run, `×0.5` its rate probe at half the cell's rate."""
    probes, runs = REFERENCE / sweep / "probes", REFERENCE / sweep / "runs"
    if m := re.fullmatch(r"D = (\d+)M", column):
        if (probe := probes / f"{cell}-D{m[1]}m").is_dir():
            return probe
        sweeps = [d for d in REFERENCE.glob(f"*/runs/{cell}")
                  if round(read_json(d / "config.json")["tokens"] / 1e6) == int(m[1])]
        assert len(sweeps) == 1, f"{cell} at D = {m[1]}M: no probe, and {len(sweeps)} sweep runs"
        return sweeps[0]
    m = re.fullmatch(r"×([0-9.]+)( \(sweep\))?", column)
    assert m, f"index column {column!r}: name it D = <n>M or ×<factor>"
    if float(m[1]) == 1:
        return runs / cell
    return probes / f"{cell}-lr{float(m[1]) * read_json(runs / cell / 'config.json')['lr']:g}"


# cell rows the probes indexes quote at least (each probe and each sweep run beside it is one)
INDEX_CHECKS = {
    # the 8M tables (14 probes, 14 sweep runs), the 16M S = 0.9 one (6 probes, 6 + 6 beside them) and its dense
    # one (2 runs of the D = 16M sweep, 2 + 2 beside them; then seeds 0 and 1 of both, 4), the 1.58-bit half-rate
    # ones (13 probes, 13 sweep runs)
    "cpu4m": 82,
    "cpu16m": 2,  # the d5 dense half-rate probe and the sweep run beside it
}


@pytest.mark.parametrize("sweep", sorted(INDEX_CHECKS))
def test_probes_index_quotes_every_budget_and_cell_rate_probe_from_its_files(sweep):
    """Every row of a probes index's cell tables (`| cell | seeds | D = 4M | D = 8M |`, `| cell | seeds |
    ×1 (sweep) | ×0.5 |`): the sweep's losses and the probes', seed by seed, as final.json rounds them."""
    checked, precision, columns = 0, None, []
    for line in (REFERENCE / sweep / "probes" / "README.md").read_text().splitlines():
        if line.startswith("## "):
            precision = "fp" if "full precision" in line else "1.58" if "1.58-bit" in line else None
            columns = []
        cells = _cells(line) if line.startswith("|") else []
        if not cells or precision is None or set(cells[0]) <= set("-"):
            continue
        if cells[0] == "cell":
            columns = cells[2:]
            continue
        row = re.fullmatch(r"(d\d) S = ([0-9.]+)", cells[0])
        if not (columns and row):
            continue
        seeds = [int(s) for s in cells[1].split(",")]
        for column, quoted in zip(columns, cells[2:]):
            cell = f"{row[1]}-s{float(row[2]):.2f}-b{precision}-seed{{}}"
            where = [_column_run(sweep, column, cell.format(s)) for s in seeds]
            assert [q.strip() for q in quoted.split(",")] == [_loss(w) for w in where], (cells[0], column)
            checked += len(seeds)
    assert checked >= INDEX_CHECKS[sweep]


def test_probes_index_quotes_every_rate_probe_from_its_files():
    text = (PROBES / "README.md").read_text()
    table = text.split("## Learning rate, d5 full precision, S = 0.9, D = 4M")[1].split("##")[0]
    rows = [_cells(ln) for ln in table.splitlines() if ln.startswith("|")]
    rates = [re.match(r"[0-9.e-]+", c)[0] for c in rows[0][1:]]
    checked = 0
    for cells in rows[2:]:
        for rate, quoted in zip(rates, cells[1:]):
            if not quoted or quoted.startswith("("):  # a run whose files were not kept says so in brackets
                continue
            run = f"d5-s0.90-bfp-seed{cells[0]}"
            where = REFERENCE / "cpu4m" / "runs" / run if float(rate) == 2e-3 else PROBES / f"{run}-lr{float(rate):g}"
            assert quoted == _loss(where), (run, rate)
            checked += 1
    assert checked == 10  # 6 rate probes and the 4 sweep runs beside them
