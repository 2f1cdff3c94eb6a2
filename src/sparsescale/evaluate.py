"""`sparsescale eval`: re-measure a saved checkpoint on the fixed validation set.

Features
- Loads the checkpoint through `model.load` (Q-Sparse settings re-applied from its config.json), so the numbers
  check the saved model, not the training process's memory.
- Validation loss (nats/token) on the first `eval_tokens` tokens of the validation split, exactly as training
  measures it (`train.evaluate_loss`), and measured sparsity per projection averaged over several batches.
- Writes eval.json (atomically) with the checkpoint's config, the counts and versions.
"""

from __future__ import annotations

import argparse
import math

import torch

from sparsescale import data as D
from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.errors import UserError
from sparsescale.io import versions, write_json


def evaluate_checkpoint(model_dir: str, data_dir: str, eval_tokens: int = 65536, seq_len: int = 256,
                        batch_size: int = 8, sparsity_batches: int = 4, device: str = "cpu") -> dict:
    from sparsescale.train import evaluate_loss

    model = M.load(model_dir, dtype=torch.float32, device=device)
    meta = D.load_meta(data_dir)
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"dataset {data_dir} has vocab {meta['vocab_size']} > model vocab {model.config.vocab_size}: "
                        "evaluate on the dataset the model was trained on")
    val = D.load_tokens(data_dir, "val")
    loss = evaluate_loss(model, val, eval_tokens, seq_len, batch_size, device)
    if not Q.qsparse_linears(model):
        Q.convert(model, 0.0)  # measure natural zeros of a dense checkpoint
    per = []
    for i, (x, _) in enumerate(D.val_batches(val, min(eval_tokens, sparsity_batches * batch_size * seq_len),
                                             seq_len, batch_size)):
        per.append(Q.measured_sparsity(model, x.to(device)))
    measured = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
    counts = M.param_counts(model)
    return {"model": str(model_dir), "data": str(data_dir), "val_loss": loss, "eval_tokens": eval_tokens,
            "seq_len": seq_len, "perplexity": math.exp(loss),
            "sparsity_measured": measured["overall"],
            **{f"sparsity_measured_{g}": measured.get(g) for g in ("qkv", "o", "gate_up", "down")},
            "qsparse": getattr(model.config, "qsparse", None), **counts, "versions": versions()}


def cli_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (results/runs/{run_id}/model) or HF id")
    p.add_argument("--data", required=True, help="dataset directory from `sparsescale prepare`")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="eval.json to write")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = evaluate_checkpoint(a.model, a.data, a.eval_tokens, a.seq_len, a.batch_size,
                              device="cuda" if torch.cuda.is_available() else "cpu")
    write_json(a.out, res)
    print(f"{a.model}: val_loss {res['val_loss']:.4f} nats/token, measured sparsity {res['sparsity_measured']:.3f}")
    return 0
