"""Where things sit inside a Hugging Face decoder: a leaf module (imports nothing of sparsescale but errors).

Features
- `decoder_layers(model)`: the list of decoder layers, for the layouts named in `DECODER_LAYER_PATHS`
  (Llama/Mistral/Qwen/OLMo `model.layers`, OPT `model.decoder.layers`, GPT-2 `transformer.h`, GPT-NeoX);
  add a layout by naming its attribute path there.
- `ffn_out_modules(model, module)`: the FFN output projection of every layer (`mlp.down_proj` by default),
  where super weights live.
- `PROJECTION_GROUPS`: the linear targets of Q-Sparse by name, and the group each is reported under
  (q/k/v share one input and one mask, so do gate/up).
"""
from __future__ import annotations

import torch
from torch import nn

from sparsescale.errors import UserError

DECODER_LAYER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
DEFAULT_FFN_OUT = "mlp.down_proj"
# projection name -> the group reported in measured sparsity (paper Table 2 layout)
PROJECTION_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "qkv_proj": "qkv", "o_proj": "o",
                     "gate_proj": "gate_up", "up_proj": "gate_up", "gate_up_proj": "gate_up", "down_proj": "down"}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in DECODER_LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}: tried {', '.join(DECODER_LAYER_PATHS)}; "
                    "add its attribute path to sparsescale.layout.DECODER_LAYER_PATHS")


def ffn_out_modules(model: nn.Module, module: str = DEFAULT_FFN_OUT) -> list[nn.Module]:
    """The FFN output projection of every decoder layer (a Linear-like module with a 2-D .weight)."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        obj = layer
        for part in module.split("."):
            obj = getattr(obj, part, None)
        w = getattr(obj, "weight", None)
        if not isinstance(obj, nn.Module) or not isinstance(w, torch.Tensor) or w.ndim != 2:
            raise UserError(f"decoder layer {i} of {type(model).__name__} has no linear module {module!r}: pass "
                            "the path of the FFN output projection inside a decoder layer (--module, e.g. mlp.c_proj)")
        out.append(obj)
    return out
