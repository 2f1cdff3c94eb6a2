"""Rough edges, each fed its bad input: one clear message, a non-zero exit, no partial output.

- `sparsescale` with no command; `sparsescale aggregate /nonexistent/*`;
- `sparsescale eval` without --seq-len/--eval-tokens uses the training's (recorded in the checkpoint), so it
  reproduces the training's loss; a different value is announced;
- a top-level config typo and a `data.files` glob that matches nothing stop `snakemake -n` with a short message.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparsescale import data as D
from sparsescale import evaluate as E
from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.train import evaluate_loss

sys.path.insert(0, str(Path(__file__).parent / "cluster"))
from workflow_dir import env, make_workdir, snakemake  # noqa: E402

SPARSESCALE = str(Path(sys.executable).parent / "sparsescale")
CORPUS = Path(__file__).parent / "fixtures" / "english.jsonl"


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([SPARSESCALE, *args], capture_output=True, text=True, timeout=300, env=env(), **kw)


def test_no_command_exits_nonzero_with_usage():
    proc = run()
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: sparsescale COMMAND") and "no command given" in proc.stderr
    assert proc.stdout == ""
    assert run("--help").returncode == 0  # asking for help is not an error


def test_aggregate_of_paths_that_do_not_exist_writes_nothing(tmp_path):
    out = tmp_path / "tables"
    proc = run("aggregate", "/nonexistent/*", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sparsescale aggregate: error: 1 of the 1 run paths do not exist: /nonexistent/*; pass run directories "
        "(results/runs/{run_id}) or their final.json files (a glob that matched nothing reaches this command as "
        "it was typed)"]
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# eval defaults from the checkpoint

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A prepared fixture corpus and a (random-weight) S=0.5 model saved as `train` saves it: seq_len 16 and
    384 evaluation tokens recorded; the model's own context is 64, so neither default is guessable."""
    base = tmp_path_factory.mktemp("ckpt")
    D.prepare(D.files_corpus([str(CORPUS)]), base / "data", vocab_size=512, val_fraction=0.1)
    tok = D.load_tokenizer(base / "data")
    model = Q.convert(M.build("d1", len(tok), max_seq_len=64, seed=0), 0.5)
    M.save(model, base / "run" / "model", tokenizer=tok, training={"seq_len": 16, "val_tokens": 384})
    return base


def test_eval_defaults_are_the_trainings(checkpoint):
    model_dir, data_dir = checkpoint / "run" / "model", checkpoint / "data"
    res = E.evaluate_checkpoint(str(model_dir), str(data_dir))
    assert (res["seq_len"], res["eval_tokens"], res["settings_from"]) == (16, 384, "training")
    model = M.load(model_dir, dtype=torch.float32)
    expected = evaluate_loss(model, D.load_tokens(data_dir, "val"), 384, 16, 8, "cpu")
    assert res["val_loss"] == expected
    assert res["val_loss"] != evaluate_loss(model, D.load_tokens(data_dir, "val"), 384, 64, 8, "cpu")


def test_eval_with_another_seq_len_says_the_loss_is_not_comparable(checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    proc = run("eval", "--model", str(checkpoint / "run" / "model"), "--data", str(checkpoint / "data"),
               "--seq-len", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: seq_len 32 differs from the training's 16: this val loss is not comparable to the "
                     "run's final.json (omit --seq-len to use the training's)"]
    assert yaml.safe_load(out.read_text())["eval_tokens"] == 384


# ----------------------------------------------------------------------------------------------------------
# config errors at `snakemake -n`

def _dry_run(tmp_path, cfg: dict) -> subprocess.CompletedProcess:
    wd = make_workdir(tmp_path)
    (wd / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(wd, "-n", "--configfile", "config/smoke.yaml", "bad.yaml")
    assert proc.returncode == 1
    assert not (wd / "results").exists() and not (wd / "logs").exists()
    return proc


def test_top_level_config_typo_is_one_short_message(tmp_path):
    proc = _dry_run(tmp_path, {"trian": {"lr": 1e-3}})
    out = proc.stdout
    assert len(out.splitlines()) <= 12, out  # was 356 lines (the schema and the whole config)
    assert out.count("ValidationError: Additional properties are not allowed ('trian' was unexpected)") == 1
    assert "fix: 'trian' is not a config key; did you mean 'train'?" in out
    assert "'$schema'" not in out


def test_missing_data_files_fail_the_dry_run(tmp_path):
    proc = _dry_run(tmp_path, {"data": {"files": ["corpus/missing-*.jsonl"]}})
    assert proc.stdout.count("config data.files: 'corpus/missing-*.jsonl' matches no file") == 1, proc.stdout
