"""A planted super weight: a tiny random Llama in which one down_proj entry really creates a super activation.

- `tokenizer()`: a byte-level BPE trained on the paragraphs below (no dataset needed), `<|endoftext|>` = BOS.
- `planted_model(tok)`: `model.build("d3", ...)` (3 layers, d_model 96, GLU 256, relu2) with, in layer
  PLANT_LAYER, a circuit like the one found in real models, in which the super weight is the only outlier:
    * the BOS embedding is spread evenly over the 16 residual channels CHANNELS_C (every other token has 0
      there), so in layer 1 the normalized BOS hidden state is about sqrt(96/16) ~ 2.45 on each of them;
    * gate/up row K read those channels with GATE_UP each (~3.75 sigma of the 0.02 init: not outliers): for BOS
      gate = up ~ 16 x 0.075 x 2.45 ~ 2.9 and relu(2.9)^2 x 2.9 ~ 18 is the down_proj input spike X[0, K];
      for other tokens gate ~ N(0, 0.3^2) and the cubic keeps X[t, K] ~1000x smaller;
    * down_proj W[J, K] = SUPER (20 sigma): Y[0, J] = X[0, K] W[J, K] ~ 7, about 250x the typical residual
      entry, and it persists in the residual stream through the last layer.
  The LM head is scaled up (HEAD_SCALE) so the random model makes confident predictions that the residual
  stream (and thus the super activation) can change.
- Options: `sibling=v` plants a second super weight W[ROW_J2, K] = v sharing the column (found in a second
  iteration); `inert=v` plants a weight as large as the super weight, W[ROW_INERT, COL_INERT] = v, on an input
  channel no token activates (a large weight that does nothing); `stopword_sink=True` plants in the next layer an
  attention sink on BOS that the super activation alone holds (see `_plant_stopword_sink`); `echo_layer=l` plants in layer l a circuit reading channel J that writes -Y[0, J] back to it,
  cancelling the super activation (an echo: its spike does not persist in the residual stream).
- `write_dataset(dir, tok)`: a prepared dataset (sparsescale.data.prepare) of these paragraphs, in `tok`.
- `self_generated(model, tok)`: BOS + random tokens, continued greedily by the model itself: fixed ids on
  which the planted model is the reference (ablations can only move away from it).
"""

from __future__ import annotations

import torch

PLANT_LAYER, ROW_J, COL_K = 1, 17, 42
CHANNELS_C = list(range(64, 80))
ROW_J2, COL_ECHO = 60, 77
ROW_INERT, COL_INERT = 30, 100  # a large weight on an input channel that never fires
CONST_CH, STOP_CH = 90, 91  # stopword sink: a channel every token but BOS carries; the stopword direction
SINK_HEAD_DIM = 15  # of head 0: RoPE's lowest frequency (10000^(-30/32) rad/position: no rotation to speak of)
SINK = 2.0  # q, k, v, o weights of the sink circuit; the LM head's stopword rows read STOP_CH with 2 SINK
GATE_UP = 0.075
ECHO_GATE_UP = 0.3  # the echo reads the one channel J (~9.8 after the norm): 9.8 x 0.3 = 16 x 2.45 x 0.075
SUPER = 0.4
HEAD_SCALE = 30.0

TEXT = [
    "The river ran past the old mill, and the miller watched the water turn the wheel all day long. "
    "When the rain came in the autumn, the river rose and the wheel turned faster than ever before.",
    "Summer is hot. Winter is cold. In the spring the fields turn green, and in the autumn the leaves fall "
    "from the trees and cover the roads with red and gold.",
    "She opened the door of the little house and called to her brother, who was reading by the fire. "
    "He put down his book, took his coat from the hook, and followed her out into the garden.",
    "The king of the northern country had three sons. The eldest was strong, the second was clever, and the "
    "youngest was kind to every creature he met on the road to the city.",
    "Every morning the baker rose before the sun, lit the great oven, and kneaded the dough for the bread "
    "that the people of the village would buy before they went to the fields.",
    "The ship left the harbour at dawn. The sailors sang as they raised the sails, and the captain stood at "
    "the wheel and looked out over the grey sea toward the distant island.",
]


def tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def random_model(tok, seed: int = 0, size: str = "d3", hidden_act: str = "relu2"):
    from sparsescale.model import build

    model = build(size, vocab_size=len(tok), max_seq_len=128, hidden_act=hidden_act, seed=seed,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model.eval()


def planted_model(tok, seed: int = 0, super_value: float = SUPER, hidden_act: str = "relu2", size: str = "d3",
                  sibling: float | None = None, echo_layer: int | None = None, inert: float | None = None,
                  stopword_sink: bool = False):
    model = random_model(tok, seed, size=size, hidden_act=hidden_act)
    bos = tok.bos_token_id
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # (V, D)
        emb[:, CHANNELS_C] = 0.0
        emb[bos] = 0.0
        emb[bos, CHANNELS_C] = 0.25  # norm 1
        mlp = model.model.layers[PLANT_LAYER].mlp
        mlp.gate_proj.weight[COL_K, CHANNELS_C] = GATE_UP
        mlp.up_proj.weight[COL_K, CHANNELS_C] = GATE_UP
        mlp.down_proj.weight[ROW_J, COL_K] = super_value
        if sibling is not None:
            mlp.down_proj.weight[ROW_J2, COL_K] = sibling
        if inert is not None:  # as large as the super weight, but X[:, COL_INERT] is ordinary (~0.01)
            mlp.down_proj.weight[ROW_INERT, COL_INERT] = inert
        if stopword_sink:
            _plant_stopword_sink(model, tok)
        if echo_layer is not None:  # the normalized BOS state is ~9.8 on channel J there: same circuit, sign flipped
            echo = model.model.layers[echo_layer].mlp
            echo.gate_proj.weight[COL_ECHO, ROW_J] = ECHO_GATE_UP
            echo.up_proj.weight[COL_ECHO, ROW_J] = ECHO_GATE_UP
            echo.down_proj.weight[ROW_J, COL_ECHO] = -super_value
    return model


def _plant_stopword_sink(model, tok) -> None:
    """Layer PLANT_LAYER + 1, head 0: an attention sink on BOS that exists only through the super activation.

    Query: CONST_CH (every token but BOS) -> head dim SINK_HEAD_DIM; key: channel J (only BOS's, ~9.8 after the
    norm, and only while the super weight is there) -> the same dim: every query attends to BOS (score ~17).
    Value: CONST_CH -> head dim 0 (0 on BOS); output: head dim 0 -> STOP_CH; LM head: STOP_CH -> " the", ".",
    ",". With the super weight the head reads BOS and writes nothing; without it, attention spreads over the
    other tokens, whose value writes STOP_CH, and the stopwords gain probability (the paper's Fig. 4).
    """
    emb = model.model.embed_tokens.weight
    emb[:, [CONST_CH, STOP_CH]] = 0.0
    emb[:, CONST_CH] = 0.2
    emb[tok.bos_token_id, CONST_CH] = 0.0
    attn = model.model.layers[PLANT_LAYER + 1].self_attn
    attn.q_proj.weight[SINK_HEAD_DIM, CONST_CH] = SINK
    attn.k_proj.weight[SINK_HEAD_DIM, ROW_J] = SINK
    attn.v_proj.weight[0, CONST_CH] = SINK
    attn.o_proj.weight[STOP_CH, 0] = SINK
    for w in (" the", ".", ","):
        (tid,) = tok(w, add_special_tokens=False)["input_ids"]
        model.lm_head.weight[tid, STOP_CH] = 2 * SINK


def documents(n: int = 48) -> list[str]:
    """n distinct documents made of the paragraphs above (distinct texts land in the split independently)."""
    return [f"Part {i}. {TEXT[i % len(TEXT)]}\n\n{TEXT[(i * 5 + 1) % len(TEXT)]}" for i in range(n)]


def write_dataset(out, tok, tok_dir) -> None:
    """A prepared dataset directory of `documents()` encoded with `tok` (saved to tok_dir first)."""
    from sparsescale.data import Corpus, prepare

    tok.save_pretrained(tok_dir)
    prepare(Corpus(documents(), {"kind": "planted"}), out, tokenizer=str(tok_dir), val_fraction=0.3)


@torch.no_grad()
def self_generated(model, tok, n_seq: int = 8, prompt_len: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    """(n_seq, length) ids: BOS, prompt_len random tokens, then the model's greedy continuation (BOS excluded)."""
    g = torch.Generator().manual_seed(seed)
    bos = tok.bos_token_id
    ids = torch.randint(1, len(tok), (n_seq, prompt_len), generator=g)
    ids = torch.cat([torch.full((n_seq, 1), bos), ids], dim=1)
    while ids.shape[1] < length:
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        logits[:, bos] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids
