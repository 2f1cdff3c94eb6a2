"""Checkpoints outside sparsescale: model card, modeling code beside the weights (trust_remote_code, with
transformers 5 and 4.x), plain loading documented as dense, training facts in config.json, a truncated weights
file as one clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.errors import UserError

SPARSESCALE = str(Path(sys.executable).parent / "sparsescale")
FINAL = {"run_id": "d1-s0.60-b1.58-seed0", "size": "d1", "mode": "scratch", "sparsity": 0.6, "precision": "1.58",
         "seed": 0, "tokens": 10240, "steps": 20, "seq_len": 32, "val_tokens": 256, "val_loss": 4.1234,
         "n_params": 13408, "n_params_total": 17504, "n_active": 6000, "lr": 3e-3, "batch_size": 8}

SETTINGS = {  # id -> convert() arguments
    "ternary S=0.6": {"sparsity": 0.6, "weight_bits": "1.58", "act_bits": 8},
    "fp S=0.5": {"sparsity": 0.5},
    "fp N:M block 8, rescale": {"sparsity": 0.5, "block": 8, "rescale": True},
}


def saved(tmp_path, settings=None, training=FINAL) -> Path:
    model = M.build("d1", 64, max_seq_len=32, seed=0)
    if settings is not None:
        Q.convert(model, **settings)
    path = tmp_path / "model"
    M.save(model, path, training=training)
    return path


def loss(model, ids) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


IDS = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_trust_remote_code_gives_the_trained_model(tmp_path, case):
    path = saved(tmp_path, SETTINGS[case])
    assert (path / "modeling_sparsescale.py").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoModelForCausalLM": "modeling_sparsescale.SparseScaleForCausalLM"}
    ours = loss(M.load(path, dtype=torch.float32), IDS)
    remote = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32)
    assert type(remote).__name__ == "SparseScaleForCausalLM"
    assert abs(loss(remote, IDS) - ours) <= 1e-6
    # plain loading builds the dense full-precision Llama: another model (what the card warns about)
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert abs(loss(plain, IDS) - ours) > 1e-4


# transformers 4.x, installed with `pip install --target` beside the 5.x of the environment (`make test` does it)
TRANSFORMERS4 = os.environ.get("SPARSESCALE_TRANSFORMERS4")
LOAD_WITH_TRANSFORMERS4 = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
paths, ids, out = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2])), {}
for case, path in paths.items():
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        res = model(input_ids=ids, labels=ids)
    out[case] = {"cls": type(model).__name__, "dtype": str(model.dtype), "loss": res.loss.item(), "logits": res.logits}
torch.save({"version": transformers.__version__, "models": out}, sys.argv[3])
"""


@pytest.mark.skipif(not TRANSFORMERS4,
                    reason="set SPARSESCALE_TRANSFORMERS4 to a directory holding transformers 4.x (pip install --target)")
def test_trust_remote_code_gives_the_trained_model_with_transformers_4(tmp_path):
    """modeling_sparsescale.py under transformers 4.x (a subprocess with the 4.x install first on PYTHONPATH) gives
    the logits and loss of sparsescale.model.load under transformers 5, for every setting of SETTINGS."""
    paths = {case: str(saved(tmp_path / f"c{i}", settings)) for i, (case, settings) in enumerate(sorted(SETTINGS.items()))}
    ours = {}
    for case, path in paths.items():
        model = M.load(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ours[case] = model(input_ids=IDS, labels=IDS)
    env = {**os.environ, "PYTHONPATH": TRANSFORMERS4, "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}  # the remote code's copy, not the user's cache
    out = tmp_path / "tf4.pt"
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS4, json.dumps(paths), json.dumps(IDS.tolist()),
                           str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out)
    assert res["version"].startswith("4.")
    for case in paths:
        got = res["models"][case]
        assert (got["cls"], got["dtype"]) == ("SparseScaleForCausalLM", "torch.float32"), case
        assert torch.allclose(got["logits"], ours[case].logits, rtol=0, atol=1e-5), \
            (case, (got["logits"] - ours[case].logits).abs().max().item())
        assert abs(got["loss"] - ours[case].loss.item()) <= 1e-5, (case, got["loss"], ours[case].loss.item())


def test_model_card_names_size_counts_sparsity_precision_tokens_and_loss(tmp_path):
    card = (saved(tmp_path, SETTINGS["ternary S=0.6"]) / "README.md").read_text()
    for text in ("| size | d1 |", "| N (non-embedding parameters) | 13,408", "| N with embeddings and LM head | 17,504",
                 "| activation sparsity S (top-K per projection input) | 0.6 |", "BitNet b1.58: ternary weights",
                 "| training tokens | 10,240 |", "| validation loss (nats/token) | 4.1234 on 256 held-out tokens |",
                 "trust_remote_code=True", "the dense, full-precision network"):
        assert text in card, text
    assert card.startswith("---\nlibrary_name: transformers\n")


def test_dense_checkpoint_has_no_remote_code_and_says_plain_loading_is_faithful(tmp_path):
    path = saved(tmp_path, None, training=None)
    assert not (path / "modeling_sparsescale.py").exists()
    assert "auto_map" not in json.loads((path / "config.json").read_text())
    card = (path / "README.md").read_text()
    assert "plain loading gives the model as trained" in card and "| training tokens | unknown |" in card


def test_training_facts_recorded_in_config_json(tmp_path):
    path = saved(tmp_path, SETTINGS["fp S=0.5"])
    rec = json.loads((path / "config.json").read_text())["sparsescale_training"]
    assert (rec["seq_len"], rec["eval_tokens"], rec["tokens"], rec["val_loss"]) == (32, 256, 10240, 4.1234)
    assert M.training_info(path) == rec


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    path = saved(tmp_path, SETTINGS["fp S=0.5"])
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(UserError, match=r"the weights file is truncated or corrupted .*retrain the run"):
        M.load(path)
    out = tmp_path / "eval.json"
    proc = subprocess.run([SPARSESCALE, "eval", "--model", str(path), "--data", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"sparsescale eval: error: checkpoint {path}: the weights file")
    assert "Traceback" not in proc.stderr and not out.exists()
