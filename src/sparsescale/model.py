"""Models are plain Hugging Face `LlamaForCausalLM`; sparsity and quantization are module converters.

Features
- `build(size, vocab_size, ...)`: a Llama from the size table (`config.SIZES`) with the squared-ReLU GLU
  FFN (`hidden_act="relu2"`) used for models trained from scratch; untied LM head.
- `load(path)`: any local HF checkpoint of a Llama/Mistral/OLMo/Qwen-style causal LM (or a hub name, for users
  with a hub), in the checkpoint's own dtype; if its `config.json` carries a `qsparse` entry (written by
  `qsparse.convert`), the converter is re-applied so logits match the saved model exactly.
- `save(model, path, tokenizer=None, training=None)`: `save_pretrained` (safetensors), written atomically, with
  a model card (README.md, `model_card.py`) and, for a Q-Sparse model, its modeling code beside the weights
  (`modeling_sparsescale.py` from `hf_modeling.py`, named in config.json's `auto_map`): plain transformers
  loads it as trained with `trust_remote_code=True`. `training` (a run's final.json) adds the training facts
  to config.json (`sparsescale_training`: seq_len, eval_tokens, tokens, val loss) and to the card.
- A truncated or corrupted `model.safetensors` is one UserError naming the file and the fix.
- `param_counts(model)`: N (non-embedding), N with embeddings, measured with `numel()`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from sparsescale.config import ModelArgs, count_params, get_size
from sparsescale.errors import UserError
from sparsescale.io import atomic_dir
from sparsescale.layout import decoder_layers
from sparsescale.model_card import model_card, training_record
from sparsescale import qsparse

HF_MODELING = Path(__file__).with_name("hf_modeling.py")  # copied, not imported: it imports transformers
REMOTE_CODE = "modeling_sparsescale.py"  # hf_modeling.py under the name config.json's auto_map gives it
AUTO_MAP = {"AutoModelForCausalLM": f"{REMOTE_CODE[:-3]}.SparseScaleForCausalLM"}

def llama_config(args: ModelArgs, vocab_size: int, max_seq_len: int = 2048, hidden_act: str = "relu2",
                 bos_token_id: int | None = None, eos_token_id: int | None = None):
    from transformers import LlamaConfig  # deferred on purpose: transformers costs ~3 s; `sparsescale sizes` needs none

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, hidden_act=hidden_act, max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
    )


def build(size: str | ModelArgs, vocab_size: int, max_seq_len: int = 2048, hidden_act: str = "relu2",
          seed: int | None = None, **token_ids) -> nn.Module:
    """A freshly initialised LlamaForCausalLM of a named size (fp32, eval mode off)."""
    from transformers import LlamaForCausalLM  # deferred: see llama_config

    args = get_size(size) if isinstance(size, str) else size
    if vocab_size < 2:
        raise UserError(f"vocab_size must be >= 2: got {vocab_size}")
    if seed is not None:
        torch.manual_seed(seed)
    cfg = llama_config(args, vocab_size, max_seq_len, hidden_act, **token_ids)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if isinstance(size, str):
        model.config.sparsescale_size = size
    return model


def param_counts(model: nn.Module) -> dict[str, int]:
    """N = parameters inside the decoder layers + final norm; N total = every parameter (numel)."""
    total = sum(p.numel() for p in model.parameters())
    layers = sum(p.numel() for p in decoder_layers(model).parameters())
    norm = getattr(getattr(model, "model", None), "norm", None)
    n = layers + (sum(p.numel() for p in norm.parameters()) if norm is not None else 0)
    return {"n_params": n, "n_params_total": total}


def expected_counts(model: nn.Module, sparsity: float = 0.0) -> dict[str, int]:
    """The formula of `config.count_params` for a built model's shape (cross-checks `param_counts`)."""
    c = model.config
    args = ModelArgs(d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                     ffn_dim=c.intermediate_size, n_kv_heads=c.num_key_value_heads)
    return count_params(args, c.vocab_size, sparsity)


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def load(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | None = None) -> nn.Module:
    """Load a causal LM checkpoint (local path, or a hub name where a hub is reachable) and re-apply Q-Sparse."""
    from transformers import AutoModelForCausalLM  # deferred: see llama_config

    p = Path(path)
    if p.exists() and not _is_checkpoint(p):
        raise UserError(f"{path} is not a checkpoint: no config.json in it (expected a directory written by save_pretrained)")
    local = p.exists()
    if not local and (str(path).startswith((".", "/")) or str(path).count("/") != 1):
        raise UserError(f"checkpoint {path!r} does not exist (a local directory with config.json, or an 'org/name' hub id)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=local)
    except SafetensorError as err:  # a write cut short (full disk, killed copy) or a damaged file
        raise UserError(f"checkpoint {path}: the weights file is truncated or corrupted ({err}); copy it again, "
                        "or retrain the run (delete its model/ and final.json, then rerun)") from None
    except OSError as err:
        raise UserError(f"cannot load checkpoint {path!r}: {err}") from None
    qcfg = getattr(model.config, "qsparse", None)
    if qcfg:
        qsparse.convert(model, **qcfg)
    if device is not None:
        model.to(device)
    return model


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, training: dict | None = None) -> None:
    """`save_pretrained` (safetensors) + model card (+ modeling code for a Q-Sparse model) into a temp dir,
    renamed into place: never a half-written checkpoint. `training`: the run's final.json (optional)."""
    record = training_record(training)
    sparse = bool(getattr(model.config, "qsparse", None))
    if record:
        model.config.sparsescale_training = record
    if sparse:
        model.config.auto_map = dict(AUTO_MAP)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if sparse:
            shutil.copyfile(HF_MODELING, Path(tmp) / REMOTE_CODE)
        config = json.loads((Path(tmp) / "config.json").read_text())
        (Path(tmp) / "README.md").write_text(model_card(config, param_counts(model), record))


def training_info(path: str | os.PathLike) -> dict:
    """The training facts of a checkpoint: config.json's `sparsescale_training`, else the run's final.json
    next to the checkpoint (results/runs/{id}/model -> results/runs/{id}/final.json); {} when neither exists."""
    p = Path(path)
    cfg = p / "config.json"
    if cfg.is_file():
        rec = json.loads(cfg.read_text()).get("sparsescale_training")
        if rec:
            return rec
    final = p.parent / "final.json"
    if final.is_file():
        return training_record(json.loads(final.read_text()))
    return {}
