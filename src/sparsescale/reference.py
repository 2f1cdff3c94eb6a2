"""The committed reference result: a sweep's result files, small enough for git, from which figures and tables
regenerate.

A sweep writes everything under its results root (`results/cpu` for `config/cpu.yaml`), checkpoints included.
`export` copies the files a reader needs to check the README's numbers, and nothing else:

- `tables/`: runs.csv, curves.csv and the paper tables (.md/.tex/.csv);
- `fit/`: fit_{precision}.json (params, s_star, s_star_ci, bootstrap, drop-one refits, flags) and
  optimal_sparsity.json;
- `figures/*.png` (the PDFs are left out: they regenerate);
- `tune/`: lr.json / lr.csv / lr.md and each tune run's final.json and config.json (`tune/runs/{id}/`);
- `runs/{id}/`: final.json and config.json of every run (its full config and the library versions);
- `superweight/`: summary.csv, each model's detect/ablation/scale/quantize JSON, the figures (PNG) and tables,
  when the super-weight stage was run;
- `config.yaml` (the config file the sweep ran with), `versions.json` (this interpreter's libraries),
  `sweep.json` (wall time, number of jobs, core-seconds per rule from Snakemake's benchmark files),
  `jobs.csv` (one row per job: rule, output, seconds, CPU seconds, peak RSS).

Never copied: checkpoints, model weights, logs. The export is written to a temporary folder and renamed over
the target, so a failed export leaves the previous reference untouched.

Regenerate from the reference alone (what `make reference-figures` runs):
  sparsescale figures --runs R/tables/runs.csv --curves R/tables/curves.csv --fit-dir R/fit --out R/figures
  sparsescale tables --runs R/tables/runs.csv --fit-dir R/fit --out R/tables

CLI: `sparsescale reference export --results results/cpu --config config/cpu.yaml --out results/reference
[--wall-s SECONDS]`. Folders of the old reference that an export does not write (`pilots/`, banks) are carried
over, never deleted. With a config `bank`, every banked run is exported from the bank, whole: a sweep that ran
across sessions has only its last session's runs under its results root, and `--out` may be the bank itself
(`--results results/cpu4m --config config/cpu4m.yaml --out results/reference/cpu4m`).

**A bank** keeps a sweep that runs across sessions: checkpoints and ignored results do not survive a fresh
checkout, committed files do. `bank` copies each finished run's result files (final.json or failed.json, with
config.json, eval.json and metrics.jsonl) into `{bank}/{run_id}/`, one run at a time, atomically; unfinished
runs are skipped. With the config key `bank: results/reference/cpu4m` the workflow banks every scratch and tune
run as it finishes (`{bank}/runs/`, `{bank}/tune/runs/`) and counts a banked run as done: it is not trained
again, and aggregate and tune select read it from the bank (workflow/rules/common.smk).

CLI: `sparsescale reference bank RUN_DIR ... --out results/reference/cpu4m/runs`.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
from pathlib import Path

import yaml

from sparsescale.errors import UserError
from sparsescale.io import atomic_dir, atomic_write_text, read_json, versions, write_json

# (folder under the results root, glob) of every file the reference keeps
KEEP = [
    ("tables", "*.csv"), ("tables", "*.md"), ("tables", "*.tex"),
    ("fit", "*.json"),
    ("figures", "*.png"),
    ("tune", "lr.*"), ("tune/runs", "*/final.json"), ("tune/runs", "*/failed.json"), ("tune/runs", "*/config.json"),
    ("runs", "*/final.json"), ("runs", "*/failed.json"), ("runs", "*/config.json"),
    ("superweight", "summary.csv"), ("superweight", "*/*.json"),
    ("superweight/figures", "*.png"), ("superweight/tables", "*.*"),
]
# what a bank keeps of a finished run (final.json or failed.json marks it finished)
BANK_FILES = ("final.json", "failed.json", "config.json", "eval.json", "metrics.jsonl")
REQUIRED = ["tables/runs.csv", "tables/curves.csv", "fit/optimal_sparsity.json"]
# file names that must never reach git (weights, optimizer state)
FORBIDDEN_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")


def benchmark_rows(results: Path) -> list[dict]:
    """One row per Snakemake job from `{results}/logs/benchmarks/**.tsv` (rule = the first folder below, or the
    file's stem for top-level jobs): seconds, CPU seconds, peak RSS in MB."""
    rows = []
    root = results / "logs" / "benchmarks"
    for path in sorted(root.rglob("*.tsv")):
        rel = path.relative_to(root)
        lines = path.read_text().splitlines()
        if len(lines) < 2:
            continue
        head, last = lines[0].split("\t"), lines[-1].split("\t")  # the last line: the final attempt
        rec = dict(zip(head, last))
        rows.append({"rule": rel.parts[0] if len(rel.parts) > 1 else rel.stem, "job": str(rel.with_suffix("")),
                     "seconds": _num(rec.get("s")), "cpu_seconds": _num(rec.get("cpu_time")),
                     "max_rss_mb": _num(rec.get("max_rss"))})
    return rows


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def sweep_record(rows: list[dict], wall_s: float | None, config: str) -> dict:
    """Wall time (as measured by whoever ran the sweep), job counts and core-seconds per rule."""
    per_rule: dict[str, dict] = {}
    for r in rows:
        d = per_rule.setdefault(r["rule"], {"jobs": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        d["jobs"] += 1
        d["seconds"] += 0.0 if math.isnan(r["seconds"]) else r["seconds"]
        d["cpu_seconds"] += 0.0 if math.isnan(r["cpu_seconds"]) else r["cpu_seconds"]
    return {"config": config, "wall_s": wall_s, "jobs": len(rows),
            "job_seconds": sum(d["seconds"] for d in per_rule.values()),
            "cpu_seconds": sum(d["cpu_seconds"] for d in per_rule.values()),
            "per_rule": dict(sorted(per_rule.items())), "versions": versions()}


def _jobs_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["rule", "job", "seconds", "cpu_seconds", "max_rss_mb"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def export(results: str | Path, config: str | Path, out: str | Path, wall_s: float | None = None) -> list[Path]:
    """Copy the reference files of the sweep under `results` into `out` (replaced whole); return them."""
    results, config, out = Path(results), Path(config), Path(out)
    missing = [p for p in REQUIRED if not (results / p).is_file()]
    if missing:
        raise UserError(f"{results / missing[0]} not found: run the sweep to the end first "
                        f"(snakemake --cores all --configfile {config})")
    if not config.is_file():
        raise UserError(f"config file {config} not found: pass the --config the sweep ran with")
    if wall_s is not None and not (math.isfinite(wall_s) and wall_s > 0):
        raise UserError(f"--wall-s must be a positive number of seconds: got {wall_s}")
    bank_runs = _bank_runs(config)
    files = sorted({p for folder, pattern in KEEP for p in (results / folder).glob(pattern) if p.is_file()
                    and _run_rel(p.relative_to(results)) not in bank_runs})
    bad = [p for p in files if p.suffix in FORBIDDEN_SUFFIXES]
    if bad:
        raise UserError(f"{bad[0]} looks like model weights: the reference keeps result files only")
    rows = benchmark_rows(results)
    written = {folder.split("/")[0] for folder, _ in KEEP} | {"config.yaml", "versions.json", "sweep.json", "jobs.csv"}
    carried = sorted(p for p in out.iterdir() if p.name not in written) if out.is_dir() else []
    with atomic_dir(out) as tmp:
        for p in carried:  # pilots/, banks: not the sweep's, so not replaced by it
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copyfile(p, tmp / p.name)
        for rel, src in bank_runs.items():  # the bank's runs whole: every run of the sweep, with its curves
            (tmp / rel).mkdir(parents=True)
            for name in BANK_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / rel / name)
        for p in files:
            dst = tmp / p.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        shutil.copyfile(config, tmp / "config.yaml")
        write_json(tmp / "versions.json", versions())
        write_json(tmp / "sweep.json", sweep_record(rows, wall_s, str(config)))
        atomic_write_text(tmp / "jobs.csv", _jobs_csv(rows))
    return ([out / p.relative_to(results) for p in files] + [out / rel for rel in bank_runs]
            + [out / n for n in ("config.yaml", "versions.json", "sweep.json", "jobs.csv")])


def _run_rel(rel: Path) -> Path | None:
    """`runs/{id}` or `tune/runs/{id}` of a file below a results root or a bank, else None."""
    parts = rel.parts
    if len(parts) >= 3 and parts[0] == "runs":
        return Path(*parts[:2])
    if len(parts) >= 4 and parts[:2] == ("tune", "runs"):
        return Path(*parts[:3])
    return None


def _bank_runs(config: Path) -> dict[Path, Path]:
    """{`runs/{id}` or `tune/runs/{id}`: banked run dir} of the config's `bank` (empty without one). A sweep that
    ran across sessions has only the runs of its last session under its results root; the bank has them all, so
    an export takes each banked run from the bank, whole (eval.json and metrics.jsonl too): exporting into the
    bank itself (`--out` = the bank) keeps it as it was."""
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {config} is not valid YAML ({e}): pass the --config the sweep ran with") from e
    bank_dir = cfg.get("bank") if isinstance(cfg, dict) else None
    if not bank_dir:
        return {}
    bank_dir = Path(bank_dir)
    runs = {}
    for d in sorted([*bank_dir.glob("runs/*"), *bank_dir.glob("tune/runs/*")]):
        if (d / "final.json").is_file() or (d / "failed.json").is_file():
            runs[d.relative_to(bank_dir)] = d
    return runs


def bank(run_dirs: list[str | Path], out: str | Path) -> tuple[list[Path], list[Path]]:
    """Copy the result files of every finished run in `run_dirs` into `out/{run_id}/` (each replaced whole,
    atomically); return (banked, skipped) where skipped are the unfinished runs (neither final.json nor
    failed.json)."""
    out = Path(out)
    banked, skipped = [], []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise UserError(f"run directory {d} not found: pass run directories (results/cpu4m/runs/{{run_id}})")
        if not ((d / "final.json").is_file() or (d / "failed.json").is_file()):
            skipped.append(d)
            continue
        with atomic_dir(out / d.name) as tmp:
            for name in BANK_FILES:
                if (d / name).is_file():
                    shutil.copyfile(d / name, tmp / name)
        banked.append(out / d.name)
    return banked, skipped


def summary_line(out: Path) -> str:
    s = read_json(out / "sweep.json")
    wall = "not given" if s["wall_s"] is None else f"{s['wall_s'] / 60:.1f} min"
    jobs = ", ".join(f"{rule} {d['jobs']}" for rule, d in s["per_rule"].items())
    return f"reference: {s['jobs']} jobs ({jobs}), wall {wall}, {s['cpu_seconds'] / 3600:.2f} CPU-hours"


def cli_reference(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sparsescale reference",
                                 description="Export a sweep's result files (no checkpoints) as the committed reference, "
                                             "or bank finished runs of a sweep that runs across sessions.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="copy the result files of a sweep into the reference folder")
    ex.add_argument("--results", default="results/cpu", help="results root of the sweep (its config's `results:`)")
    ex.add_argument("--config", default="config/cpu.yaml", help="the config file the sweep ran with")
    ex.add_argument("--out", default="results/reference", help="reference folder (replaced whole)")
    ex.add_argument("--wall-s", type=float, default=None, help="measured wall time of the sweep in seconds")
    bk = sub.add_parser("bank", help="copy finished runs' result files (no weights) into a committed bank")
    bk.add_argument("runs", nargs="+", help="run directories (results/cpu4m/runs/{run_id}); unfinished ones are skipped")
    bk.add_argument("--out", required=True, help="bank folder: each run goes to OUT/{run_id}/")
    a = ap.parse_args(argv)
    if a.command == "bank":
        banked, skipped = bank(a.runs, a.out)
        print(f"banked {len(banked)} run(s) in {a.out}" + (f"; skipped {len(skipped)} unfinished: "
                                                          + ", ".join(p.name for p in skipped) if skipped else ""))
        return 0
    paths = export(a.results, a.config, a.out, a.wall_s)
    print(f"wrote {len(paths)} files to {a.out}")
    print(summary_line(Path(a.out)))
    return 0
