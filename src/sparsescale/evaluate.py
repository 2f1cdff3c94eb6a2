"""`sparsescale eval`: re-measure a saved checkpoint on the fixed validation set.

Features
- Loads the checkpoint through `model.load` (Q-Sparse settings re-applied from its config.json), so the numbers
  check the saved model, not the training process's memory.
- Validation loss (nats/token) on the first `eval_tokens` tokens of the validation split, exactly as training
  measures it (`validation.evaluate_loss`), and measured sparsity per projection averaged over several batches.
- `--seq-len` and `--eval-tokens` default to the training's (config.json's `sparsescale_training`, else the
  run's final.json beside the checkpoint), so a bare `sparsescale eval` reproduces the training's val loss;
  a value that differs from the training's is printed as a note (the loss is then not comparable).
- Writes eval.json (atomically) with the checkpoint's config, the counts and versions.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from sparsescale import data as D
from sparsescale import model as M
from sparsescale import qsparse as Q
from sparsescale.errors import UserError
from sparsescale.io import versions, write_json
from sparsescale.validation import evaluate_loss


FALLBACK_EVAL_TOKENS = 65536  # a checkpoint that records no training facts (not written by sparsescale train)


def eval_settings(model_dir: str, model, eval_tokens: int | None, seq_len: int | None) -> dict:
    """seq_len and eval_tokens: as given, else the training's, else the model's context and 65536 tokens."""
    info = M.training_info(model_dir)
    out = {"seq_len": seq_len or info.get("seq_len") or model.config.max_position_embeddings,
           "eval_tokens": eval_tokens or info.get("eval_tokens") or FALLBACK_EVAL_TOKENS,
           "settings_from": "training" if info else "defaults"}
    for key in ("seq_len", "eval_tokens"):
        if info.get(key) and out[key] != info[key]:
            print(f"note: {key} {out[key]} differs from the training's {info[key]}: this val loss is not "
                  f"comparable to the run's final.json (omit --{key.replace('_', '-')} to use the training's)",
                  file=sys.stderr)
    return out


def evaluate_checkpoint(model_dir: str, data_dir: str, eval_tokens: int | None = None, seq_len: int | None = None,
                        batch_size: int = 8, sparsity_batches: int = 4, device: str = "cpu") -> dict:
    """eval_tokens / seq_len None: the training's (see `eval_settings`)."""
    model = M.load(model_dir, dtype=torch.float32, device=device)
    settings = eval_settings(model_dir, model, eval_tokens, seq_len)
    eval_tokens, seq_len = settings["eval_tokens"], settings["seq_len"]
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
            "seq_len": seq_len, "settings_from": settings["settings_from"], "perplexity": math.exp(loss),
            "sparsity_measured": measured["overall"],
            **{f"sparsity_measured_{g}": measured.get(g) for g in ("qkv", "o", "gate_up", "down")},
            "qsparse": getattr(model.config, "qsparse", None), **counts, "versions": versions()}


def cli_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sparsescale eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (results/runs/{run_id}/model) or HF id")
    p.add_argument("--data", required=True, help="dataset directory from `sparsescale prepare`")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"validation tokens (default: the training's; {FALLBACK_EVAL_TOKENS} if the checkpoint records none)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the training's; else the model's context length)")
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
