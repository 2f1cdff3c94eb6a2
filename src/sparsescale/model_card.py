"""The model card (`README.md`) of a saved checkpoint: what the model is and how to load it faithfully.

Features
- `model_card(config, counts, training)`: Markdown with a YAML header (library_name, tags), the size, N
  (non-embedding parameters), N with embeddings, the activated parameters, S, the weight/activation precision,
  the tokens trained on and the validation loss when known (`training`, the run's final.json fields), and how
  to load it: `trust_remote_code=True` (the Q-Sparse code saved beside the weights), `sparsescale.model.load`,
  and a warning that plain loading gives the dense full-precision network, a different model.
- `training_record(final)`: the fields of a run's final.json that go into config.json (`sparsescale_training`):
  what `sparsescale eval` reads its defaults from (seq_len, eval_tokens) and what the card shows.
"""

from __future__ import annotations

TRAINING_FIELDS = ("run_id", "size", "mode", "sparsity", "precision", "seed", "tokens", "steps", "seq_len",
                   "val_tokens", "val_loss", "n_params", "n_params_total", "n_active", "lr", "batch_size", "data")


def training_record(final: dict | None) -> dict:
    """The training facts of final.json worth keeping in the checkpoint (eval_tokens = final's val_tokens)."""
    if not final:
        return {}
    rec = {k: final[k] for k in TRAINING_FIELDS if final.get(k) is not None}
    if "val_tokens" in rec:
        rec["eval_tokens"] = rec.pop("val_tokens")
    return rec


def _fmt_count(n) -> str:
    return "unknown" if n is None else f"{int(n):,} ({int(n) / 1e6:.3g}M)"


def model_card(config: dict, counts: dict, training: dict | None = None) -> str:
    """README.md of a checkpoint from its config.json fields, parameter counts and (optional) training facts."""
    t = training or {}
    q = config.get("qsparse") or {}
    s = q.get("sparsity", 0.0)
    wbits = q.get("weight_bits", "fp")
    precision = ("BitNet b1.58: ternary weights {-1, 0, 1} x absmean scale, 8-bit absmax activations"
                 if wbits == "1.58" else "full-precision weights" + (", 8-bit activations" if q.get("act_bits") else ""))
    size = t.get("size") or config.get("sparsescale_size") or "custom"
    val = t.get("val_loss")
    rows = [
        ("size", size),
        ("N (non-embedding parameters)", _fmt_count(counts.get("n_params"))),
        ("N with embeddings and LM head", _fmt_count(counts.get("n_params_total"))),
        ("activated parameters per token (N_a)", _fmt_count(t.get("n_active")) if t.get("n_active") else "unknown"),
        ("activation sparsity S (top-K per projection input)", f"{s:g}" + (f", N:M blocks of {q['block']}"
                                                                          if q.get("block") else "")),
        ("precision", precision),
        ("training tokens", f"{int(t['tokens']):,}" if t.get("tokens") else "unknown"),
        ("context length (training)", t.get("seq_len") or config.get("max_position_embeddings")),
        ("validation loss (nats/token)", f"{val:.4f} on {int(t.get('eval_tokens', 0)):,} held-out tokens"
         if val is not None else "unknown"),
        ("architecture", f"Llama decoder, {config.get('num_hidden_layers')} layers, d_model "
                         f"{config.get('hidden_size')}, FFN {config.get('intermediate_size')} "
                         f"({config.get('hidden_act')} GLU), vocabulary {config.get('vocab_size')}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    name = t.get("run_id") or size
    sparse = bool(q) and (s > 0 or wbits != "fp" or q.get("act_bits"))
    warning = ("**Load it with `trust_remote_code=True`.** Without it, transformers builds a plain "
               "`LlamaForCausalLM`: the dense, full-precision network, a different model from the one trained "
               "(other logits, another loss, no sparsity), and it says nothing about it." if sparse else
               "This model is dense and full precision: plain loading gives the model as trained.")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [sparsescale, q-sparse, activation-sparsity{", bitnet-b1.58" if wbits == "1.58" else ""}, custom_code]
---
# {name}

A small causal language model trained from scratch by sparsescale (Q-Sparse activation sparsity, BitNet b1.58)
to measure how loss scales with model size N and activation sparsity S. A research artifact, not a general
purpose model.

| | |
|---|---|
{table}

## How to load it

{warning}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # modeling_sparsescale.py, beside the weights
tokenizer = AutoTokenizer.from_pretrained(path)
```

With sparsescale installed, `sparsescale.model.load(path)` gives the same model (same loss) with its CPU
kernels. The Q-Sparse settings are in `config.json` (`qsparse`); the training facts in `sparsescale_training`.

Evaluate with lm-evaluation-harness: `sparsescale lm-eval --model PATH --data DATASET --out scores.json` (model
type `sparsescale`). lm-eval's own `hf` model needs `trust_remote_code=True` in `--model_args` to evaluate this
model rather than the dense network.
"""
