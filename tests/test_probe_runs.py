"""`sparsescale probe`: a banked sweep cell trained again with exactly one setting changed, banked by name."""

import json
from pathlib import Path

import pytest

from sparsescale import data as D
from sparsescale.cli import main as cli
from sparsescale.config import TrainConfig
from sparsescale.errors import UserError
from sparsescale.io import read_json
from sparsescale.probe import parse_probe_id, probe_config, probe_id
from sparsescale.reference import bank
from sparsescale.train import train

FIXTURE = Path(__file__).parent / "fixtures" / "english.jsonl"
CELL = "d2-s0.90-b1.58-seed0"


@pytest.fixture(scope="module")
def banked_cell(tmp_path_factory):
    """A finished sweep cell (1.58-bit, S = 0.9, 20 steps) banked as a sweep banks it."""
    root = tmp_path_factory.mktemp("probe")
    data = root / "data"
    D.prepare(D.files_corpus([str(FIXTURE)]), data, vocab_size=512, val_fraction=0.1)
    cfg = TrainConfig(data=str(data), out=str(root / "sweep" / "runs" / CELL), size="d2", sparsity=0.9,
                      precision="1.58", seq_len=64, batch_size=8, tokens=8 * 64 * 20, lr=6e-3, eval_tokens=4096,
                      eval_every=10, checkpoint_every=5, log_every=1, threads=1)
    train(cfg)
    (cell,), _ = bank([cfg.out_dir], root / "bank" / "runs")
    return cell


def _losses(run_dir: Path) -> list[float]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_probe_ids_name_the_one_change():
    assert probe_id(CELL, lr=1.5e-3) == "d2-s0.90-b1.58-seed0-lr0.0015"
    assert probe_id(CELL, tokens=16_000_000) == "d2-s0.90-b1.58-seed0-D16m"
    assert parse_probe_id("d2-s0.90-b1.58-seed0-lr0.0015") == (CELL, "lr", 0.0015)
    assert parse_probe_id(probe_id(CELL, lr=1e-5)) == (CELL, "lr", 1e-5)
    assert parse_probe_id("d4-s0.90-bfp-seed2-D16m") == ("d4-s0.90-bfp-seed2", "tokens", 16_000_000)
    for kw, msg in [({}, "exactly one setting"), ({"lr": 1e-3, "tokens": 10**6}, "exactly one setting"),
                    ({"tokens": 1_500_000}, "whole millions"), ({"lr": 0.0}, "positive")]:
        with pytest.raises(UserError, match=msg):
            probe_id(CELL, **kw)
    with pytest.raises(UserError, match="not a probe id"):
        parse_probe_id(CELL)


def test_probe_trains_the_cell_with_one_setting_changed_and_banks_it(banked_cell, tmp_path, capsys):
    probes, work = tmp_path / "probes", tmp_path / "work"
    assert cli(["probe", str(banked_cell), "--lr", "0.0015", "--bank", str(probes), "--work", str(work)]) == 0
    out = probes / "d2-s0.90-b1.58-seed0-lr0.0015"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "final.json", "metrics.jsonl"]
    cell_cfg, cfg = read_json(banked_cell / "config.json"), read_json(out / "config.json")
    assert {k for k in cell_cfg.keys() | cfg.keys() if cell_cfg.get(k) != cfg.get(k)} - {"versions"} == {"lr", "out"}
    assert (cfg["lr"], cfg["out"]) == (0.0015, str(work / out.name))
    cell_final, final = read_json(banked_cell / "final.json"), read_json(out / "final.json")
    assert (final["run_id"], final["tokens"], final["steps"]) == (CELL, cell_final["tokens"], 20)
    # the same model, data order and first batch: equal loss before the first update, then the rates part
    cell_losses, losses = _losses(banked_cell), _losses(out)
    assert len(losses) == len(cell_losses) == 20
    assert losses[0] == cell_losses[0] and losses[-1] != cell_losses[-1]
    assert f"probe {out.name}: val_loss {final['val_loss']:.4f}" in capsys.readouterr().out

    before = (out / "final.json").read_bytes()
    assert cli(["probe", str(banked_cell), "--lr", "0.0015", "--bank", str(probes), "--work", str(work)]) == 2
    assert "banked already" in capsys.readouterr().err and (out / "final.json").read_bytes() == before


def test_probe_refuses_no_change_a_missing_cell_and_a_missing_dataset(banked_cell, tmp_path):
    with pytest.raises(UserError, match="already has lr = 0.006"):
        probe_config(banked_cell, tmp_path, lr=6e-3)
    with pytest.raises(UserError, match="no config.json"):
        probe_config(tmp_path / CELL, tmp_path, lr=1e-3)
    moved = tmp_path / "bank" / CELL
    moved.mkdir(parents=True)
    cfg = read_json(banked_cell / "config.json")
    (moved / "config.json").write_text(json.dumps({**cfg, "data": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match=f"dataset {tmp_path / 'gone'} is missing"):
        probe_config(moved, tmp_path, tokens=2_000_000)
    (moved / "config.json").write_text(json.dumps({**cfg, "seed": 1}))
    with pytest.raises(UserError, match="describes run d2-s0.90-b1.58-seed1"):
        probe_config(moved, tmp_path, lr=1e-3)
    assert not (tmp_path / "probes").exists()
