import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from sparsescale import data as D
from sparsescale import train as T
from sparsescale.cli import main as cli
from sparsescale.config import RUN_ID_PATTERN, TrainConfig, field_docs, run_id
from sparsescale.errors import TrainingDiverged, UserError

FIXTURE = Path(__file__).parent / "fixtures" / "english.jsonl"
VOCAB = 512


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "english"
    D.prepare(D.files_corpus([str(FIXTURE)]), out, vocab_size=VOCAB, val_fraction=0.1)
    return out


def cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out=str(out), size="d2", sparsity=0.5, seq_len=64, batch_size=8,
                tokens=8 * 64 * 20, lr=3e-3, eval_tokens=4096, eval_every=10, checkpoint_every=5, log_every=1,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def strip_times(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_val_loss_falls_clearly_on_real_text(data_dir, tmp_path):
    final = T.train(cfg(data_dir, tmp_path / "run", tokens=8 * 64 * 120, eval_every=40))
    first = math.log(VOCAB)  # an untrained model predicts ~uniformly
    assert final["val_loss"] < first - 1.0, final["val_loss"]
    vals = [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.2
    for key in ("n_params", "n_params_total", "n_active", "sparsity", "sparsity_measured", "precision", "seed",
                "tokens", "val_loss", "run_id"):
        assert key in final
    assert final["run_id"] == "d2-s0.50-bfp-seed0"
    assert final["tokens"] == 8 * 64 * 120
    assert final["sparsity_measured_qkv"] == pytest.approx(0.5)
    saved = json.loads((tmp_path / "run" / "final.json").read_text())
    assert saved["val_loss"] == pytest.approx(final["val_loss"])
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    # the last step's validation is the final one (measured once), and the run's cost is recorded
    assert vals[-1] == final["val_loss"] and metrics(tmp_path / "run")[-1]["step"] == 120
    # every evaluation also logs the super-weight spike statistic (issue 14: do super activations emerge?)
    evals = [m for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert [m["step"] for m in evals] == [40, 80, 120]
    for m in evals:
        assert m["spike_in_ratio"] > 0 and m["spike_out_ratio"] > 0 and m["spike_layer"] in (0, 1)  # d2: 2 layers
    from sparsescale.aggregate import aggregate

    _, curves = aggregate([tmp_path / "run"])
    logged = curves.dropna(subset=["val_loss"])
    assert logged["spike_in_ratio"].tolist() == [m["spike_in_ratio"] for m in evals]
    phases = final["phase_seconds"]
    assert set(phases) == set(T.Clock.PHASES) and phases["startup"] == 0.0  # called in-process: no start-up
    assert all(v >= 0 for v in phases.values()) and phases["steps"] > 0 and phases["save"] > 0
    assert final["wall_seconds"] == pytest.approx(sum(phases.values()), rel=0.05)
    cores = final["phase_core_seconds"]
    assert set(cores) == set(phases) and cores["steps"] > 0
    assert final["core_seconds"] == pytest.approx(sum(cores.values()), rel=0.05)
    assert 0 < final["wall_time_s"] < final["wall_seconds"]
    assert 0 < final["core_seconds"] < 4 * final["wall_seconds"]  # threads=1 (+ a few helper threads)


def test_same_seed_identical_curve(data_dir, tmp_path):
    a = T.train(cfg(data_dir, tmp_path / "a", precision="1.58"))
    b = T.train(cfg(data_dir, tmp_path / "b", precision="1.58"))
    assert strip_times(metrics(tmp_path / "a")) == strip_times(metrics(tmp_path / "b"))
    assert a["val_loss"] == b["val_loss"]


def test_kill_and_resume_equals_uninterrupted(data_dir, tmp_path, monkeypatch):
    full = T.train(cfg(data_dir, tmp_path / "full"))
    real_get_batch = D.get_batch

    def dying(tokens, step, *a, **k):
        if step == 13:
            raise KeyboardInterrupt("simulated kill at step 13")
        return real_get_batch(tokens, step, *a, **k)

    monkeypatch.setattr(D, "get_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg(data_dir, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "final.json").exists()
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("*.pt")) == \
        ["step_00000005.pt", "step_00000010.pt"]
    monkeypatch.setattr(D, "get_batch", real_get_batch)
    before = torch.load(tmp_path / "resumed" / "checkpoints" / "step_00000010.pt", weights_only=False)["times"]
    assert before["wall_time_s"] > 0 and before["core_seconds"] > 0
    resumed = T.train(cfg(data_dir, tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 10
    assert resumed["val_loss"] == full["val_loss"]
    assert strip_times(metrics(tmp_path / "resumed")) == strip_times(metrics(tmp_path / "full"))
    # the times of a resumed run cover the session before the kill (what its checkpoint carried)
    for key in ("wall_time_s", "wall_seconds", "core_seconds"):
        assert resumed[key] > before[key] > 0, key


def test_corrupted_checkpoint_falls_back_to_previous(data_dir, tmp_path, monkeypatch):
    full = T.train(cfg(data_dir, tmp_path / "full"))
    real_get_batch = D.get_batch
    monkeypatch.setattr(D, "get_batch", lambda tokens, step, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
                        if step == 13 else real_get_batch(tokens, step, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg(data_dir, tmp_path / "run"))
    monkeypatch.setattr(D, "get_batch", real_get_batch)
    latest = tmp_path / "run" / "checkpoints" / "step_00000010.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # truncated write
    with pytest.warns(UserWarning, match="fails its checksum"):
        resumed = T.train(cfg(data_dir, tmp_path / "run"))
    assert resumed["resumed_from_step"] == 5
    assert resumed["val_loss"] == full["val_loss"]


def test_nan_stops_with_clear_error(data_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 3"):
        T.train(cfg(data_dir, tmp_path / "nan", debug_nan_at_step=3))
    assert not (tmp_path / "nan" / "final.json").exists()
    rc = cli(["train", "--data", str(data_dir), "--out", str(tmp_path / "nan2"), "--size", "d1", "--tokens", "4096",
              "--seq-len", "64", "--batch-size", "8", "--eval-tokens", "1024", "--debug-nan-at-step", "2"])
    assert rc == 3 and not (tmp_path / "nan2" / "final.json").exists()


def test_continue_from_dense_and_from_plain_hf_silu(data_dir, tmp_path):
    dense = T.train(cfg(data_dir, tmp_path / "dense", sparsity=0.0, tokens=8 * 64 * 10))
    cont = T.train(cfg(data_dir, tmp_path / "cont", mode="continue", init_from=str(tmp_path / "dense" / "model"),
                       sparsity=0.6, tokens=8 * 64 * 10, lr=1e-3))
    assert cont["run_id"] == "d2-s0.60-bfp-seed0-continue"
    assert cont["sparsity_measured_qkv"] == pytest.approx(0.6, abs=0.01)
    assert dense["val_loss"] < math.log(VOCAB)

    from transformers import LlamaConfig, LlamaForCausalLM

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, hidden_act="silu"))
    plain.save_pretrained(tmp_path / "plain")
    ft = T.train(cfg(data_dir, tmp_path / "ft", mode="finetune", init_from=str(tmp_path / "plain"), sparsity=0.5,
                     tokens=8 * 64 * 5, lr=1e-4))
    from sparsescale.model import load

    back = load(tmp_path / "ft" / "model")
    assert back.config.hidden_act == "silu" and back.config.qsparse["sparsity"] == 0.5
    assert math.isfinite(ft["val_loss"])


@pytest.mark.parametrize("kw,msg", [
    (dict(size="d99"), "unknown model size 'd99'"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\): got 1.0"),
    (dict(precision="4"), "precision must be one of"),
    (dict(tokens=100), "token budget 100 is smaller than one batch"),
    (dict(mode="continue"), "needs init_from"),
])
def test_bad_input(data_dir, tmp_path, kw, msg):
    with pytest.raises(UserError, match=msg):
        T.train(cfg(data_dir, tmp_path / "bad", **kw))
    assert not (tmp_path / "bad" / "final.json").exists()


def test_cli_bad_input_exit_code(tmp_path, capsys):
    rc = cli(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_vocab_too_large_for_continued_model(data_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match=r"tokenizer vocab \(512\) does not fit"):
        T.train(cfg(data_dir, tmp_path / "r", mode="continue", init_from=str(tmp_path / "small")))


def test_lr_schedule():
    c = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [T.lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_every_flag_has_its_field_docstring_as_help(capsys):
    docs = field_docs(TrainConfig)
    assert len(docs) == len(dataclasses.fields(TrainConfig)) == 33
    assert docs["lr"] == "peak learning rate (AdamW)"
    assert docs["tokens"] == "token budget; None = tokens_per_param x n_params"
    helps = {a.dest: a.help for a in T.config_parser("sparsescale train")._actions}
    for name, doc in docs.items():
        assert helps[name].replace("%%", "%") == doc, name
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--micro-batch-size MICRO_BATCH_SIZE sequences per forward/backward per process" in text


def test_field_docs_needs_a_docstring_under_every_field():
    @dataclasses.dataclass
    class Partly:
        a: int = 0
        """documented"""
        b: int = 1

    with pytest.raises(AssertionError, match=r"Partly fields without a docstring: \['b'\]"):
        field_docs(Partly)


def test_run_id_one_pattern():
    assert RUN_ID_PATTERN == "{size}-s{s}-b{prec}-seed{seed}"
    assert run_id("d4", 0.6, "1.58", 0) == "d4-s0.60-b1.58-seed0"
    assert run_id("d4", "0.5", "fp", "1", "continue", block=8) == "d4-s0.50-bfp-seed1-nm8-continue"
    c = TrainConfig(size="d3", sparsity=0.125, precision="fp", seed=2, block=16, mode="finetune", init_from="m")
    assert c.run_id == "d3-s0.12-bfp-seed2-nm16-finetune" == run_id("d3", 0.125, "fp", 2, "finetune", 16)


def test_cli_eval_out_remeasures_the_saved_model_in_process(data_dir, tmp_path):
    from sparsescale.evaluate import evaluate_checkpoint

    run = tmp_path / "r"
    rc = cli(["train", "--data", str(data_dir), "--out", str(run), "--size", "d1", "--sparsity", "0.5",
              "--tokens", str(8 * 64 * 12), "--seq-len", "64", "--batch-size", "8", "--eval-tokens", "2048",
              "--threads", "1", "--eval-out", str(run / "eval.json")])
    assert rc == 0
    final, ev = json.loads((run / "final.json").read_text()), json.loads((run / "eval.json").read_text())
    assert ev["model"] == str(run / "model") and ev["eval_tokens"] == 2048 and ev["seq_len"] == 64
    assert ev["val_loss"] == pytest.approx(final["val_loss"], abs=1e-5)  # the saved model, loaded from disk
    again = evaluate_checkpoint(str(run / "model"), str(data_dir), 2048, 64)  # what `sparsescale eval` writes
    assert {k: v for k, v in again.items() if k != "versions"} == {k: v for k, v in ev.items() if k != "versions"}
    assert final["phase_seconds"]["startup"] > 0  # the CLI counts the process's start-up in the run's cost
    assert final["wall_seconds"] > final["phase_seconds"]["startup"] and final["core_seconds"] > 0
